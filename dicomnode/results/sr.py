"""TID 1500 Measurement Report (highdicom Comprehensive SR) for one study and job.

Layout (docs/results.md has the full tree and every code):
- observer: the node, as a device (DCM 121007);
- per source image and model, a TID 1501 group: the image as source, finding site (retina, or
  the site the model reports on) with laterality, the model as algorithm, its classifications
  as coded qualitative evaluations and its plain measurements;
- per segment of the image's SEG, a TID 1411 group referencing that segment (Referenced Segment,
  DCM 121191, segment number only: dicom3tools rejects a frame number next to it, and the
  Image Reference Macro makes the two alternatives), with the measurements made on that mask,
  each naming the model that measured it;
- per detection (point or box output), a TID 1410 group with the location as SCOORD on the
  source image (a point, or a closed polyline for a box);
- an image a gate stopped gets, in the gate's group, "Not analysed" = the gate's coded reason;
- each classification carries its probability (HAS PROPERTIES NUM Probability, unit 1);
- a study summary (TID 1500 "Qualitative Evaluations", UMLS C0034375): per output that declares
  `summary: worst`, the worst class over the analysed images (each such image referenced), and
  every image a gate stopped as "Not analysed" = its reason.
- per image and model of the graph that did not analyse it (a gate, a requirement such as
  colour or size, the modality, an upstream failure), a TID 1501 group naming that model with
  "Not analysed" = the coded reason (inference/reasons.py).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

from dicomnode import MANUFACTURER
from dicomnode.results.codes import (
    BEST_ILLUSTRATION,
    DEVICE,
    IMAGING_MEASUREMENT_REPORT,
    NOT_ANALYSED,
    PROBABILITY,
    PROCEDURE_FUNDUS_ANALYSIS,
    QUALITATIVE_EVALUATIONS,
    RETINA,
    UNIT_ONE,
    concept,
    declare_private_schemes,
    laterality_code,
)
from dicomnode.results.common import MODEL_NAME, stamp_equipment
from dicomnode.results.model import (
    AlgorithmInfo,
    Classification,
    ImageFindings,
    MeasurementResult,
    NotAnalysed,
    NotRun,
)
from dicomnode.results.uids import SEGMENTATION_STORAGE

logger = logging.getLogger(__name__)

SERIES_DESCRIPTION = "AI findings report (dicomnode)"
LO_MAX = 64


class ReportError(ValueError):
    """The inputs cannot become a consistent report (message says which image and why)."""


@dataclass(frozen=True)
class NodeIdentity:
    """The node as observer device: a stable UID and its AE title."""

    uid: str
    name: str
    serial_number: str | None = None
    institution_name: str | None = None

    @classmethod
    def for_node(cls, ae_title: str, *, host: str | None = None,
                 institution_name: str | None = None) -> NodeIdentity:
        """The same Device Observer UID for the same node (AE title on this host) every time,
        so reports from one node can be told apart from another's."""
        where = host if host is not None else socket.gethostname()
        uid = generate_uid(entropy_srcs=["dicomnode device observer", where, ae_title])
        return cls(uid=str(uid), name=ae_title, institution_name=institution_name)


@dataclass
class _ModelGroup:
    algorithm: AlgorithmInfo
    classifications: list[Classification]
    measurements: list[MeasurementResult]
    not_analysed: NotAnalysed | None = None


def _algorithm_id(algorithm: AlgorithmInfo) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(name=algorithm.name[:LO_MAX], version=algorithm.version)


def _measurement(item: MeasurementResult) -> hd.sr.Measurement:
    unit = hd.sr.CodedConcept(item.unit.code, "UCUM", item.unit.meaning)
    return hd.sr.Measurement(
        name=concept(item.code), value=item.value, unit=unit,
        algorithm_id=_algorithm_id(item.algorithm),
    )


def _header_laterality(source: Dataset) -> str | None:
    return str(source.get("ImageLaterality") or source.get("Laterality") or "") or None


def _laterality(source: Dataset, findings: ImageFindings) -> tuple[str | None, bool]:
    """(R / L / None, inferred?): the header's, else what a laterality model read."""
    header = _header_laterality(source)
    if header is not None:
        return header, False
    return findings.inferred_laterality, findings.inferred_laterality is not None


def _finding_site(findings: ImageFindings, model_id: str, source: Dataset) -> hd.sr.FindingSite:
    site = findings.finding_sites.get(model_id)
    return hd.sr.FindingSite(
        anatomic_location=concept(site) if site is not None else RETINA,
        laterality=laterality_code(_laterality(source, findings)[0]),
    )


def _label(source: Dataset, findings: ImageFindings, what: str) -> str:
    side, inferred = _laterality(source, findings)
    eye = {"R": "right eye", "L": "left eye"}.get(side or "", "eye ?")
    if inferred:
        eye += " (from image)"
    number = source.get("InstanceNumber", "")
    return f"{eye} image {number} {what}"[:LO_MAX]


def _check_laterality(source: Dataset, findings: ImageFindings) -> None:
    header = _header_laterality(source)
    inferred = findings.inferred_laterality
    if header in ("R", "L") and inferred is not None and inferred != header:
        # The header wins; a disagreement is worth a look (mislabelled eye, or a model error).
        logger.warning("image %s: header laterality %s, the laterality model read %s",
                       source.SOPInstanceUID, header, inferred)


def _model_groups(findings: ImageFindings, segment_keys: set[str]) -> list[_ModelGroup]:
    groups: dict[str, _ModelGroup] = {}

    def group(algorithm: AlgorithmInfo) -> _ModelGroup:
        return groups.setdefault(algorithm.key, _ModelGroup(algorithm, [], []))

    for classification in findings.classifications:
        group(classification.algorithm).classifications.append(classification)
    for item in findings.measurements:
        if item.mask_key is None or item.mask_key not in segment_keys:
            group(item.algorithm).measurements.append(item)
    if findings.not_analysed is not None:
        group(findings.not_analysed.algorithm).not_analysed = findings.not_analysed
    return list(groups.values())


def _image_group(
    source: Dataset, findings: ImageFindings, group: _ModelGroup
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    evaluations = [_evaluation(c) for c in group.classifications]
    if group.not_analysed is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(
            name=NOT_ANALYSED, value=concept(group.not_analysed.reason)
        ))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(), identifier=_label(source, findings, group.algorithm.model_id)
        ),
        algorithm_id=_algorithm_id(group.algorithm),
        finding_sites=[_finding_site(findings, group.algorithm.model_id, source)],
        source_images=[hd.sr.SourceImageForMeasurementGroup(
            referenced_sop_class_uid=source.SOPClassUID,
            referenced_sop_instance_uid=source.SOPInstanceUID,
        )],
        qualitative_evaluations=evaluations or None,
        measurements=[_measurement(m) for m in group.measurements] or None,
    )


def _evaluation(item: Classification) -> hd.sr.QualitativeEvaluation:
    """The coded finding, with the probability of that answer as its property."""
    evaluation = hd.sr.QualitativeEvaluation(name=concept(item.concept), value=concept(item.value))
    if item.probability is not None:
        evaluation[0].ContentSequence = [hd.sr.NumContentItem(
            name=PROBABILITY, value=float(item.probability), unit=UNIT_ONE,
            relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES,
        )]
    return evaluation


def _image_reference(source: Dataset) -> hd.sr.ImageContentItem:
    return hd.sr.ImageContentItem(
        name=BEST_ILLUSTRATION, referenced_sop_class_uid=source.SOPClassUID,
        referenced_sop_instance_uid=source.SOPInstanceUID,
        relationship_type=hd.sr.RelationshipTypeValues.INFERRED_FROM,
    )


def _finding_item(name: hd.sr.CodedConcept, value: hd.sr.CodedConcept,
                  images: Sequence[Dataset]) -> hd.sr.CodeContentItem:
    item = hd.sr.CodeContentItem(name=name, value=value,
                                 relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    item.ContentSequence = DicomSequence([_image_reference(s) for s in images])
    return item


def study_summary(sources: Sequence[Dataset], findings: Mapping[str, ImageFindings]
                  ) -> list[tuple[Classification, list[Dataset]]]:
    """Per summarised concept (classifications with a `severity`), the worst answer over the
    study's images and the images that gave it, in the order the concepts first appear."""
    worst: dict[tuple[str, str], tuple[Classification, list[Dataset]]] = {}
    for source in sources:
        for item in findings.get(str(source.SOPInstanceUID), ImageFindings()).classifications:
            if item.severity is None:
                continue
            key = (item.concept.scheme, item.concept.value)
            held = worst.get(key)
            if held is None or item.severity > (held[0].severity or 0):
                worst[key] = (item, [source])
            elif item.severity == held[0].severity:
                held[1].append(source)
    return list(worst.values())


def _summary_container(sources: Sequence[Dataset], findings: Mapping[str, ImageFindings]
                       ) -> hd.sr.ContainerContentItem | None:
    """TID 1500's Qualitative Evaluations: the study summary a grader reads first."""
    items: list[hd.sr.CodeContentItem] = [
        _finding_item(concept(item.concept), concept(item.value), images)
        for item, images in study_summary(sources, findings)
    ]
    for source in sources:
        stopped = findings.get(str(source.SOPInstanceUID), ImageFindings()).not_analysed
        if stopped is not None:
            items.append(_finding_item(concept(NOT_ANALYSED), concept(stopped.reason), [source]))
    if not items:
        return None
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    container.ContentSequence = DicomSequence(items)
    return container


def _not_run_group(
    source: Dataset, findings: ImageFindings, item: NotRun
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """A TID 1501 group saying that `item`'s model did not analyse the image, and why."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(),
            identifier=_label(source, findings, f"{item.algorithm.model_id} not analysed"),
        ),
        algorithm_id=_algorithm_id(item.algorithm),
        finding_sites=[_finding_site(findings, item.algorithm.model_id, source)],
        source_images=[hd.sr.SourceImageForMeasurementGroup(
            referenced_sop_class_uid=source.SOPClassUID,
            referenced_sop_instance_uid=source.SOPInstanceUID,
        )],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(
            name=NOT_ANALYSED, value=concept(item.reason))],
    )


def _not_run_groups(
    source: Dataset, findings: ImageFindings
) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    return [_not_run_group(source, findings, item) for item in findings.not_run]


def _segment_groups(
    source: Dataset, findings: ImageFindings, seg: Dataset, algorithms: list[AlgorithmInfo]
) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    """One TID 1411 group per segment; adds the segmenting models to `algorithms`."""
    groups = []
    for segment in seg.SegmentSequence:
        key = str(segment.get("TrackingID", ""))
        model_id = key.split(".", 1)[0]
        algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
        measured = [m for m in findings.measurements if m.mask_key == key]
        algorithms.append(AlgorithmInfo(model_id=model_id, name=str(algorithm.AlgorithmName),
                                        version=str(algorithm.AlgorithmVersion)))
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=generate_uid(), identifier=_label(source, findings, key)
            ),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID,
                sop_instance_uid=seg.SOPInstanceUID,
                segment_number=int(segment.SegmentNumber),
                source_images=[hd.sr.SourceImageForSegmentation(
                    referenced_sop_class_uid=source.SOPClassUID,
                    referenced_sop_instance_uid=source.SOPInstanceUID,
                )],
            ),
            finding_type=hd.sr.CodedConcept.from_dataset(
                segment.SegmentedPropertyTypeCodeSequence[0]
            ),
            algorithm_id=hd.sr.AlgorithmIdentification(
                name=str(algorithm.AlgorithmName), version=str(algorithm.AlgorithmVersion)
            ),
            finding_sites=[_finding_site(findings, model_id, source)],
            measurements=[_measurement(m) for m in measured] or None,
        ))
    return groups


def _region_groups(
    source: Dataset, findings: ImageFindings
) -> list[hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    """One TID 1410 group per detection: a SCOORD point, or a closed polyline for a box."""
    groups = []
    for region in findings.regions:
        if region.kind == "point":
            graphic_type = hd.sr.GraphicTypeValues.POINT
            data = np.array([region.coordinates], dtype=np.float64)
        else:
            x0, y0, x1, y1 = region.coordinates
            graphic_type = hd.sr.GraphicTypeValues.POLYLINE
            data = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]],
                            dtype=np.float64)
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=generate_uid(), identifier=_label(source, findings, region.algorithm.model_id)
            ),
            referenced_region=hd.sr.ImageRegion(
                graphic_type=graphic_type, graphic_data=data,
                source_image=hd.sr.SourceImageForRegion(
                    referenced_sop_class_uid=source.SOPClassUID,
                    referenced_sop_instance_uid=source.SOPInstanceUID,
                ),
            ),
            finding_type=concept(region.code),
            algorithm_id=_algorithm_id(region.algorithm),
            finding_sites=[_finding_site(findings, region.algorithm.model_id, source)],
        ))
    return groups


def _segmentations_by_source(segs: Sequence[Dataset]) -> dict[str, Dataset]:
    by_source: dict[str, Dataset] = {}
    for seg in segs:
        if seg.SOPClassUID != SEGMENTATION_STORAGE:
            raise ReportError(f"{seg.SOPInstanceUID} is not a Segmentation")
        for series in seg.ReferencedSeriesSequence:
            for ref in series.ReferencedInstanceSequence:
                by_source[str(ref.ReferencedSOPInstanceUID)] = seg
    return by_source


def build_report(
    sources: Sequence[Dataset],
    findings: Mapping[str, ImageFindings],
    segs: Sequence[Dataset] = (),
    *,
    node: NodeIdentity,
    series_instance_uid: str | None = None,
    series_number: int = 901,
    instance_number: int = 1,
    sop_instance_uid: str | None = None,
    predecessor: Dataset | None = None,
    series_description: str = SERIES_DESCRIPTION,
) -> hd.sr.ComprehensiveSR:
    """The study's TID 1500 report. `findings` is keyed by source SOP Instance UID.

    `segs` are the Segmentations built for these sources (each references its source);
    `predecessor` is the previous report of this study, listed in Predecessor Documents.
    """
    if not sources:
        raise ReportError("a report needs at least one source image")
    studies = {str(s.StudyInstanceUID) for s in sources}
    if len(studies) != 1:
        raise ReportError(f"sources span {len(studies)} studies; one report is per study")
    seg_for = _segmentations_by_source(segs)
    groups: list[
        hd.sr.MeasurementsAndQualitativeEvaluations
        | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
        | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    ] = []
    algorithms: list[AlgorithmInfo] = []
    for source in sources:
        uid = str(source.SOPInstanceUID)
        image = findings.get(uid, ImageFindings())
        _check_laterality(source, image)
        seg = seg_for.get(uid)
        keys = {str(s.get("TrackingID", "")) for s in seg.SegmentSequence} if seg else set()
        for group in _model_groups(image, keys):
            groups.append(_image_group(source, image, group))
            algorithms.append(group.algorithm)
        groups.extend(_not_run_groups(source, image))
        if seg is not None:
            groups.extend(_segment_groups(source, image, seg, algorithms))
        groups.extend(_region_groups(source, image))
        algorithms.extend(r.algorithm for r in image.regions)
        algorithms.extend(m.algorithm for m in image.measurements)
    observer = hd.sr.ObserverContext(
        observer_type=DEVICE,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=node.uid, name=node.name[:LO_MAX], manufacturer_name=MANUFACTURER,
            model_name=MODEL_NAME, serial_number=node.serial_number,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE_FUNDUS_ANALYSIS,
        imaging_measurements=groups or None,
        title=IMAGING_MEASUREMENT_REPORT,
        referenced_images=list(sources),  # the Image Library: what the report is about
    )
    summary = _summary_container(sources, findings)
    if summary is not None:  # TID 1500 row order: after Imaging Measurements
        report[0].ContentSequence.append(summary)
    sr = hd.sr.ComprehensiveSR(
        evidence=[*sources, *segs],
        content=report[0],
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=True,
        # Final: the node never amends this document; re-processing writes a new one that
        # names it as predecessor. Verification stays UNVERIFIED (no person signed it).
        is_final=True,
        institution_name=node.institution_name,
        previous_versions=[predecessor] if predecessor is not None else None,
        series_description=series_description,
    )
    stamp_equipment(sr, algorithms)
    declare_private_schemes(sr)
    logger.info("built SR %s: %d group(s) over %d image(s)%s", sr.SOPInstanceUID, len(groups),
                len(sources), " (replaces an earlier report)" if predecessor is not None else "")
    return sr
