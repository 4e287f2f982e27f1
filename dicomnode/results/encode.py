"""Build a job's result objects in memory: one SEG per source with masks, one SR per study and
job, an overlay per analysed source; which of them per the preset's `outputs`.

No files and no database here (the pipeline does those), so the same inputs give the same
objects: every UID is derived from a job-specific seed, which makes encoding a job twice
produce the same SOP Instance UIDs, so a re-run can neither duplicate rows nor, should a copy
already have been sent, duplicate objects in the PACS.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.uid import generate_uid

from dicomnode.results.eye import eye_of
from dicomnode.results.job_outputs import JobResults
from dicomnode.results.model import ImageFindings
from dicomnode.results.overlay import build_overlay
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

    @property
    def sop_instance_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)


def derived_uid(seed: str, *parts: str) -> str:
    """A UID that is the same for the same job and object (see the module docstring)."""
    return str(generate_uid(entropy_srcs=["dicomnode result", seed, *parts]))


def _series_uid(seed: str, kind: str, eye_key: str) -> str:
    return derived_uid(seed, kind, "series", eye_key)


def encode_objects(
    sources: Sequence[Dataset],
    results: JobResults,
    outputs: OutputOptions,
    *,
    node: NodeIdentity,
    seed: str,
    predecessor: Dataset | None = None,
) -> list[EncodedObject]:
    """The job's objects in sending order: SEGs, then the SR (it references them), overlays."""
    objects: list[EncodedObject] = []
    segs: list[Dataset] = []
    # SEGs and overlays go into one series per eye (dicomnode.results.eye); instance numbers
    # count within each series.
    numbers: dict[tuple[str, str], int] = {}

    def next_number(kind: str, key: str) -> int:
        numbers[kind, key] = numbers.get((kind, key), 0) + 1
        return numbers[kind, key]

    if outputs.seg:
        for source in sources:
            uid = str(source.SOPInstanceUID)
            masks = results.masks.get(uid)
            if not masks:
                continue
            eye = eye_of(source, results.findings.get(uid))
            seg = build_segmentation(source, masks,
                                     series_instance_uid=_series_uid(seed, SEG, eye.series_key),
                                     series_number=900 + eye.series_offset,
                                     instance_number=next_number(SEG, eye.series_key),
                                     sop_instance_uid=derived_uid(seed, SEG, uid), eye=eye)
            segs.append(seg)
            objects.append(EncodedObject(SEG, seg, uid))
    if outputs.sr:
        sr = build_report(sources, results.findings, segs, node=node,
                          series_instance_uid=derived_uid(seed, SR, "series"),
                          sop_instance_uid=derived_uid(seed, SR),
                          predecessor=predecessor)
        objects.append(EncodedObject(SR, sr, None))
    if outputs.overlay:
        for source in sources:
            uid = str(source.SOPInstanceUID)
            masks = results.masks.get(uid, [])
            findings = results.findings.get(uid, ImageFindings())
            if not masks and uid not in results.findings:
                continue  # no model looked at this image: nothing to draw
            eye = eye_of(source, findings)
            overlay = build_overlay(
                source, masks, findings,
                series_instance_uid=_series_uid(seed, OVERLAY, eye.series_key),
                series_number=902 + eye.series_offset,
                instance_number=next_number(OVERLAY, eye.series_key),
                sop_instance_uid=derived_uid(seed, OVERLAY, uid), eye=eye)
            objects.append(EncodedObject(OVERLAY, overlay, uid))
    return objects
