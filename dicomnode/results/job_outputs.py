"""A job's stored outputs (index.json + one .npz per model, see inference/outputs.py) as the
encoders' inputs: masks and findings per source image.

Only models that ran ("ok") contribute. The manifest of the exact version that ran supplies
codes, units and labels. Finding sites: a mask whose segment is an anatomical structure
(category SCT 91723000), e.g. the optic disc, is the finding site of that model's items and of
measurements made on it; everything else reports on the retina. A classifier asking Laterality
(SCT 272741003) and answering Right / Left gives the image's inferred laterality, which the SR
uses only where the header has none.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.errors import RegistryLookupError
from dicomnode.inference.outputs import read_index, source_mask
from dicomnode.registry.manifest import (
    BoxOutput,
    Code,
    Manifest,
    MaskOutput,
    MeasurementOutput,
    PointOutput,
    ProbabilitiesOutput,
    UcumUnit,
)
from dicomnode.registry.registry import Registry
from dicomnode.results.codes import LATERALITY_CONCEPT, PRIVATE_SCHEME, side_of
from dicomnode.results.model import (
    AlgorithmInfo,
    Classification,
    ImageFindings,
    MaskResult,
    MeasurementResult,
    NotAnalysed,
    NotRun,
    RegionResult,
)

logger = logging.getLogger(__name__)

ANATOMICAL_STRUCTURE = ("SCT", "91723000")


@dataclass
class JobResults:
    """Encoder inputs for one job, keyed by source SOP Instance UID."""

    masks: dict[str, list[MaskResult]] = field(default_factory=lambda: defaultdict(list))
    findings: dict[str, ImageFindings] = field(default_factory=dict)


@dataclass
class _Collect:
    classifications: list[Classification] = field(default_factory=list)
    measurements: list[MeasurementResult] = field(default_factory=list)
    not_analysed: NotAnalysed | None = None
    regions: list[RegionResult] = field(default_factory=list)
    sites: dict[str, Code] = field(default_factory=dict)
    laterality: str | None = None
    not_run: list[NotRun] = field(default_factory=list)


def _concept(manifest: Manifest, spec: ProbabilitiesOutput) -> Code:
    """What the classifier answers; a private code named after the output when unstated."""
    if spec.concept is not None:
        return spec.concept
    return Code(scheme=PRIVATE_SCHEME, value=f"{manifest.id}.{spec.name}",
                meaning=f"{manifest.name}: {spec.name}")


def _mask_source(manifest: Manifest, ran: dict[str, Any], registry: Registry) -> str | None:
    """The `<model>.<output>` mask a measurement model consumed, if it consumed one."""
    for spec in manifest.upstream_inputs:
        for ref in spec.sources:
            entry = ran.get(ref.model)
            if entry is None:
                continue
            upstream = registry.get(ref.model, entry["version"]).manifest.output(ref.output)
            if isinstance(upstream, MaskOutput):
                return str(ref)
    return None


def results_from_outputs(folder: Path, registry: Registry) -> JobResults:
    """Read a job's output folder into masks and findings per image."""
    index = read_index(folder)
    models: dict[str, Any] = index.get("models", {})
    ran = {m: e for m, e in models.items() if e.get("status") == "ok"}
    skipped_by_image: dict[str, list[str]] = defaultdict(list)
    for model_id, entry in models.items():
        for uid in entry.get("skipped", {}):
            skipped_by_image[uid].append(model_id)
    collected: dict[str, _Collect] = defaultdict(_Collect)
    results = JobResults()
    for model_id, entry in ran.items():
        manifest = registry.get(model_id, entry["version"]).manifest
        algorithm = AlgorithmInfo.from_manifest(manifest)
        outputs: dict[str, Any] = entry.get("outputs", {})
        npz = np.load(folder / entry["file"]) if entry.get("file") else None
        try:
            for spec in manifest.outputs:
                per_image: dict[str, Any] = outputs.get(spec.name, {}).get("per_image", {})
                for uid, value in per_image.items():
                    _add(results, collected[uid], uid, value, spec, manifest, algorithm, npz,
                         ran, registry, skipped_by_image)
        finally:
            if npz is not None:
                npz.close()
    _collect_not_run(models, registry, collected)
    for uid, c in collected.items():
        results.findings[uid] = ImageFindings(
            classifications=c.classifications, measurements=c.measurements,
            not_analysed=c.not_analysed, regions=c.regions, finding_sites=c.sites,
            inferred_laterality=c.laterality, not_run=c.not_run,
        )
    return results


def _collect_not_run(models: dict[str, Any], registry: Registry,
                     collected: dict[str, _Collect]) -> None:
    """Each model's `not_analysed` images (index entries written before it existed have
    none): the model, its coded reason and the detail, per image, in graph order."""
    for model_id, entry in models.items():
        reasons: dict[str, Any] = entry.get("not_analysed") or {}
        if not reasons:
            continue
        try:
            algorithm = AlgorithmInfo.from_manifest(
                registry.get(model_id, entry["version"]).manifest)
        except RegistryLookupError:  # the version left the registry: the report names it
            algorithm = AlgorithmInfo(model_id=model_id, name=model_id,
                                      version=str(entry["version"]))
        for uid, reason in reasons.items():
            code = Code(scheme=reason["scheme"], value=reason["value"],
                        meaning=reason["meaning"])
            collected[uid].not_run.append(NotRun(algorithm, code, str(reason.get("detail", ""))))


def _add(
    results: JobResults, c: _Collect, uid: str, value: dict[str, Any], spec: Any,
    manifest: Manifest, algorithm: AlgorithmInfo, npz: Any, ran: dict[str, Any],
    registry: Registry, skipped_by_image: dict[str, list[str]],
) -> None:
    if isinstance(spec, ProbabilitiesOutput):
        answer = Code(**value["code"])
        asked = _concept(manifest, spec)
        label = value.get("label")
        labels = [k.label for k in spec.classes]
        severity = (labels.index(label) if spec.summary == "worst" and label in labels
                    else None)
        c.classifications.append(Classification(
            algorithm, asked, answer, float(value["probability"]), label=label,
            severity=severity))
        if (asked.scheme, asked.value) == LATERALITY_CONCEPT and c.laterality is None:
            c.laterality = side_of(answer.scheme, answer.value)
        label = value.get("label")
        if spec.gate is not None and label in spec.gate.ineligible:
            declared = spec.gate.reasons.get(str(label))
            reason = declared.code if declared is not None and declared.code else answer
            c.not_analysed = NotAnalysed(algorithm, reason,
                                         tuple(sorted(skipped_by_image.get(uid, []))))
    elif isinstance(spec, MaskOutput) and npz is not None:
        segment = spec.segment
        results.masks[uid].append(MaskResult(
            key=f"{manifest.id}.{spec.name}", label=segment.label, category=segment.category,
            type=segment.type, algorithm=algorithm, mask=source_mask(npz, value),
            description=segment.description,
        ))
        if (segment.category.scheme, segment.category.value) == ANATOMICAL_STRUCTURE:
            c.sites.setdefault(manifest.id, segment.type)
    elif isinstance(spec, MeasurementOutput):
        mask_key = _mask_source(manifest, ran, registry)
        # Each reported value (source pixels, then mm where Pixel Spacing is known); outputs
        # written before "values" existed hold one value in the declared unit.
        reported = value.get("values") or [
            {"value": value["value"], "unit": spec.reported_unit.model_dump()}]
        for item in reported:
            c.measurements.append(MeasurementResult(
                algorithm, spec.code, float(item["value"]), UcumUnit(**item["unit"]),
                mask_key=mask_key))
        if mask_key is not None:
            mask_model = mask_key.split(".", 1)[0]
            mask_spec = registry.get(mask_model, ran[mask_model]["version"]).manifest.output(
                mask_key.split(".", 1)[1])
            if isinstance(mask_spec, MaskOutput) and (
                mask_spec.segment.category.scheme, mask_spec.segment.category.value
            ) == ANATOMICAL_STRUCTURE:
                c.sites.setdefault(manifest.id, mask_spec.segment.type)
    elif isinstance(spec, PointOutput) and "xy" in value:
        c.regions.append(RegionResult(algorithm, spec.code, "point",
                                      tuple(float(v) for v in value["xy"])))
    elif isinstance(spec, BoxOutput) and "box" in value:
        c.regions.append(RegionResult(algorithm, spec.code, "box",
                                      tuple(float(v) for v in value["box"])))
    else:
        logger.debug("output %s.%s (%s) is not encoded", manifest.id, spec.name, spec.kind)
