"""Build a job's result objects in memory: one SEG per source with masks, one SR per study and
job, an overlay per analysed source; which of them per the preset's `outputs`.

No files and no database here (the pipeline does those), so the same inputs give the same
objects. The SR's UIDs are derived from a job-specific seed. A SEG's or overlay's SOP Instance
UID is derived from its content (the source image, the masks bit for bit, the models and
versions that made them, the overlay's text): a re-run (late image, operator re-run) that
finds an earlier job's object with that UID uses that object, which is already in the PACS,
instead of making and sending a second copy of the same thing. Encoding a job twice gives the
same UIDs, so a retry can neither duplicate rows nor objects in the PACS.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from pydicom import Dataset
from pydicom.uid import generate_uid

from dicomnode.results.eye import eye_of
from dicomnode.results.job_outputs import JobResults
from dicomnode.results.model import ImageFindings, MaskResult
from dicomnode.results.overlay import build_overlay, finding_lines
from dicomnode.results.seg import build_segmentation
from dicomnode.results.sr import NodeIdentity, build_report
from dicomnode.routing.preset import OutputOptions

logger = logging.getLogger(__name__)

SR, SEG, OVERLAY = "sr", "seg", "overlay"


@dataclass(frozen=True)
class EncodedObject:
    kind: str  # sr | seg | overlay
    dataset: Dataset
    source_uid: str | None  # the image a SEG or overlay is made from; None for the SR
    # An earlier job's object with the same content: already recorded and sent, not again.
    reused: bool = False

    @property
    def sop_instance_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)


def derived_uid(seed: str, *parts: str) -> str:
    """A UID that is the same for the same job and object (see the module docstring)."""
    return str(generate_uid(entropy_srcs=["dicomnode result", seed, *parts]))


def _series_uid(seed: str, kind: str, eye_key: str) -> str:
    return derived_uid(seed, kind, "series", eye_key)


# (kind, SOP Instance UID) -> the earlier job's object with that UID, or None. It may also
# answer None for an object on record whose file is gone: then `fresh` names a new one.
Earlier = Callable[[str, str], Dataset | None]


def _mask_parts(masks: Sequence[MaskResult]) -> list[bytes]:
    parts = []
    for m in masks:
        parts.append(repr((m.key, m.label, m.category, m.type, m.algorithm, m.description,
                           m.mask.shape)).encode())
        parts.append(np.packbits(np.asarray(m.mask, dtype=bool)).tobytes())
    return parts


def content_uid(kind: str, source: Dataset, masks: Sequence[MaskResult],
                findings: ImageFindings | None = None) -> str:
    """The SOP Instance UID of a SEG or overlay: the same for the same content (module doc)."""
    digest = hashlib.sha256()
    digest.update(f"{kind}|{source.StudyInstanceUID}|{source.SOPInstanceUID}".encode())
    for part in _mask_parts(masks):
        digest.update(part)
    if findings is not None:  # the overlay's text, as it is drawn (rounded values)
        digest.update("\n".join(finding_lines(masks, findings)).encode())
    return derived_uid("content", kind, digest.hexdigest())


def encode_objects(
    sources: Sequence[Dataset],
    results: JobResults,
    outputs: OutputOptions,
    *,
    node: NodeIdentity,
    seed: str,
    predecessor: Dataset | None = None,
    earlier: Earlier | None = None,
    fresh: Callable[[str], bool] | None = None,
) -> list[EncodedObject]:
    """The job's objects: SEGs, then the SR (it references them), then overlays.

    `earlier` finds an earlier job's object by content UID (reused, not made again);
    `fresh(uid)` is False when a UID is on record but `earlier` cannot give its object (its
    file is gone): then a new object with a job-specific UID is made instead. The pipeline
    calls the two halves itself (`encode_images`, then `encode_report`), so that the images'
    objects can be on their way to the PACS while the report is built.
    """
    images = list(encode_images(sources, results, outputs, seed=seed, earlier=earlier,
                                fresh=fresh))
    segs = [o for o in images if o.kind == SEG]
    report = encode_report(sources, results, outputs, segs, node=node, seed=seed,
                           predecessor=predecessor)
    return [*segs, *([report] if report is not None else []),
            *(o for o in images if o.kind == OVERLAY)]


def encode_images(
    sources: Sequence[Dataset],
    results: JobResults,
    outputs: OutputOptions,
    *,
    seed: str,
    earlier: Earlier | None = None,
    fresh: Callable[[str], bool] | None = None,
) -> Iterator[EncodedObject]:
    """The per-image objects the preset asks for, one at a time as each is built: SEGs (one
    per source with masks), then overlays (one per analysed source). Nothing here depends on
    the report."""
    # SEGs and overlays go into one series per eye (dicomnode.results.eye); instance numbers
    # count within each series.
    numbers: dict[tuple[str, str], int] = {}

    def next_number(kind: str, key: str) -> int:
        numbers[kind, key] = numbers.get((kind, key), 0) + 1
        return numbers[kind, key]

    def pick(kind: str, source_uid: str, uid: str) -> tuple[Dataset | None, str]:
        found = earlier(kind, uid) if earlier is not None else None
        if found is not None:
            return found, uid
        if fresh is not None and not fresh(uid):
            return None, derived_uid(seed, kind, source_uid)
        return None, uid

    if outputs.seg:
        for source in sources:
            uid = str(source.SOPInstanceUID)
            masks = results.masks.get(uid)
            if not masks:
                continue
            eye = eye_of(source, results.findings.get(uid))
            found, sop_uid = pick(SEG, uid, content_uid(SEG, source, masks))
            if found is not None:
                yield EncodedObject(SEG, found, uid, reused=True)
                continue
            seg = build_segmentation(source, masks,
                                     series_instance_uid=_series_uid(seed, SEG, eye.series_key),
                                     series_number=900 + eye.series_offset,
                                     instance_number=next_number(SEG, eye.series_key),
                                     sop_instance_uid=sop_uid, eye=eye)
            yield EncodedObject(SEG, seg, uid)
    if outputs.overlay:
        for source in sources:
            uid = str(source.SOPInstanceUID)
            masks = results.masks.get(uid, [])
            findings = results.findings.get(uid, ImageFindings())
            if not masks and uid not in results.findings:
                continue  # no model looked at this image: nothing to draw
            eye = eye_of(source, findings)
            found, sop_uid = pick(OVERLAY, uid, content_uid(OVERLAY, source, masks, findings))
            if found is not None:
                yield EncodedObject(OVERLAY, found, uid, reused=True)
                continue
            overlay = build_overlay(
                source, masks, findings,
                series_instance_uid=_series_uid(seed, OVERLAY, eye.series_key),
                series_number=902 + eye.series_offset,
                instance_number=next_number(OVERLAY, eye.series_key),
                sop_instance_uid=sop_uid, eye=eye)
            yield EncodedObject(OVERLAY, overlay, uid)


def encode_report(
    sources: Sequence[Dataset],
    results: JobResults,
    outputs: OutputOptions,
    segs: Sequence[EncodedObject],
    *,
    node: NodeIdentity,
    seed: str,
    predecessor: Dataset | None = None,
) -> EncodedObject | None:
    """The study's SR over `segs` (this job's SEGs, made or reused), if the preset asks."""
    if not outputs.sr:
        return None
    sr = build_report(sources, results.findings, [o.dataset for o in segs], node=node,
                      series_instance_uid=derived_uid(seed, SR, "series"),
                      sop_instance_uid=derived_uid(seed, SR),
                      predecessor=predecessor)
    return EncodedObject(SR, sr, None)
