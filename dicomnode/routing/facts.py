"""What routing may look at: the header values of a study's instances and the AE titles.

Built from pydicom datasets (headers only are enough) or from plain dicts, so the router can
be tested and explained without files. Values are kept as text, keyed 'GGGGEEEE'.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicomnode.routing.tags import normalise_tag

# Bulk and nested data say nothing routing can use, and would bloat stored facts.
_SKIPPED_VRS = {"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN"}


def _text(value: Any) -> str:
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return "" if value is None else str(value)


def _names(value: str | Iterable[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else list(value)
    return tuple(sorted({v.strip() for v in items if v and v.strip()}))


def _readable(ds: Dataset) -> Iterator[DataElement]:
    """The elements of `ds` whose values parse. pydicom parses lazily, on access: a value
    whose length does not fit its VR (a 3-byte US) raises there, and routing must not stop
    at one bad attribute; the element is left out, as if absent."""
    for tag in list(ds.keys()):
        try:
            elem = ds[tag]
            _ = elem.value
        except Exception:  # any parse error of that one element
            continue
        yield elem


@dataclass(frozen=True)
class StudyFacts:
    instances: tuple[dict[str, str], ...]  # per instance: 'GGGGEEEE' -> value as text
    calling_ae_titles: tuple[str, ...] = ()
    called_ae_titles: tuple[str, ...] = ()

    @classmethod
    def from_datasets(
        cls,
        datasets: Iterable[Dataset],
        *,
        calling_ae: str | Iterable[str] | None = None,
        called_ae: str | Iterable[str] | None = None,
    ) -> StudyFacts:
        instances = []
        for ds in datasets:
            values: dict[str, str] = {}
            for elem in _readable(ds):
                if elem.VR in _SKIPPED_VRS or elem.tag == 0x7FE00010:
                    continue
                if isinstance(elem.value, bytes | bytearray):  # e.g. ambiguous 'OB or OW'
                    continue
                values[f"{int(elem.tag):08X}"] = _text(elem.value).strip()
            instances.append(values)
        return cls(tuple(instances), _names(calling_ae), _names(called_ae))

    @classmethod
    def from_headers(
        cls,
        headers: Iterable[Mapping[str, Any]],
        *,
        calling_ae: str | Iterable[str] | None = None,
        called_ae: str | Iterable[str] | None = None,
    ) -> StudyFacts:
        """Dicts keyed by DICOM keyword ('Modality') or tag ('0008,0060')."""
        instances = tuple(
            {normalise_tag(key): _text(value).strip() for key, value in header.items()}
            for header in headers
        )
        return cls(instances, _names(calling_ae), _names(called_ae))

    def values(self, tag: str) -> list[str]:
        """The distinct non-empty values of a tag over the study's instances, sorted."""
        key = normalise_tag(tag)
        return sorted({inst[key] for inst in self.instances if inst.get(key)})

    @property
    def modalities(self) -> list[str]:
        return [m.upper() for m in self.values("00080060")]

    def to_dict(self) -> dict[str, Any]:
        return {
            "instances": [dict(i) for i in self.instances],
            "calling_ae_titles": list(self.calling_ae_titles),
            "called_ae_titles": list(self.called_ae_titles),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StudyFacts:
        return cls(
            tuple(dict(i) for i in data.get("instances", ())),
            tuple(data.get("calling_ae_titles", ())),
            tuple(data.get("called_ae_titles", ())),
        )
