"""From a real executor run's stored outputs to SEG and SR: content equals the stored outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid

from dicomnode.graph import Selection, resolve
from dicomnode.inference.decode import decode_rgb
from dicomnode.inference.executor import GraphExecutor
from dicomnode.inference.outputs import read_index, source_mask, write_outputs
from dicomnode.inference.preprocess import SourceImage
from dicomnode.inference.sessions import SessionPool
from dicomnode.registry import load_registry
from dicomnode.results.codes import NOT_ANALYSED
from dicomnode.results.job_outputs import results_from_outputs
from dicomnode.results.seg import build_segmentation
from dicomnode.results.sr import NodeIdentity, build_report
from dicomnode.synthetic import op_dataset, synthetic_fundus
from tests.support.executor_fixtures import write_diamond
from tests.support.onnx_models import detector_manifest
from tests.unit.results.sources import dciodvfy, errors


def _sources() -> list[Dataset]:
    study = generate_uid()
    gradable = synthetic_fundus(96, "R", seed=3)
    gradable[30:50, 40:60] = (200, 255, 0)  # a bright-green patch the fixture segmenter finds
    no_green = synthetic_fundus(96, "L", seed=4)
    no_green[..., 1] = 0  # the fixture quality gate calls an image without green ungradable
    return [op_dataset(gradable, laterality="R", study_uid=study, instance_number=1),
            op_dataset(no_green, laterality="L", study_uid=study, instance_number=2)]


def test_stored_outputs_become_valid_seg_and_sr(tmp_path: Path) -> None:
    writer = write_diamond(tmp_path / "registry", slow_repeats=1)
    writer.add(detector_manifest("seg-centre", source="seg.mask", modalities=("OP",)))
    registry = load_registry(tmp_path / "registry")
    executor = GraphExecutor(registry, SessionPool(["CPUExecutionProvider"],
                                                   intra_op_threads=1), max_batch=4)
    graph = resolve(Selection.of(["gated-fraction", "total", "seg-centre"], modality="OP"),
                    registry)
    sources = _sources()
    images = [SourceImage(str(s.SOPInstanceUID), decode_rgb(s), str(s.ImageLaterality))
              for s in sources]
    folder = tmp_path / "jobs" / "1"
    write_outputs(folder, executor.run(graph, images), registry, {"job": 1})
    index: dict[str, Any] = read_index(folder)

    results = results_from_outputs(folder, registry)
    good, bad = (str(s.SOPInstanceUID) for s in sources)
    assert [m.key for m in results.masks[good]] == ["seg.mask", "gated-seg.mask"]
    assert [m.key for m in results.masks[bad]] == ["seg.mask"]  # gated-seg skipped it
    not_analysed = results.findings[bad].not_analysed
    assert not_analysed is not None and not_analysed.reason.value == "UNGR"
    assert "gated-seg" in not_analysed.skipped_models

    segs = [build_segmentation(s, results.masks[str(s.SOPInstanceUID)], instance_number=n)
            for n, s in enumerate(sources, start=1)]
    sr = build_report(sources, results.findings, segs,
                      node=NodeIdentity.for_node("DICOMNODE", host="test"))
    for name, obj in [("seg1", segs[0]), ("seg2", segs[1]), ("sr", sr)]:
        path = tmp_path / f"{name}.dcm"
        obj.save_as(path)
        assert errors(dciodvfy(path)) == [], name

    # Masks pixel for pixel against the stored outputs.
    with np.load(folder / "seg.npz") as npz:
        stored = source_mask(npz, index["models"]["seg"]["outputs"]["mask"]["per_image"][good])
    seg = hd.seg.segread(tmp_path / "seg1.dcm")
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=[good],
                                               segment_numbers=[1])[0][..., 0]
    assert stored.any() and np.array_equal(pixels.astype(bool), stored)

    # Measurements to the precision DS allows (16 characters), each under its own model.
    report: Any = hd.sr.srread(tmp_path / "sr.dcm").content
    got: dict[str, float] = {}
    groups: list[Any] = report.get_image_measurement_groups(referenced_sop_instance_uid=good)
    groups += report.get_volumetric_roi_measurement_groups(
        referenced_sop_instance_uid=segs[0].SOPInstanceUID)
    for group in groups:
        for m in group.get_measurements():
            got[_algorithm_name(m)] = m.value
    want = {
        registry.get(model).manifest.name: entry["outputs"][output]["per_image"][good]["value"]
        for model, output in (("slow-b", "fraction"), ("slow-c", "fraction"),
                              ("gated-fraction", "fraction"), ("total", "total"))
        for entry in [index["models"][model]]
    }
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-12, abs=1e-14), name
    # The detection, as a SCOORD point at the stored source-pixel location.
    stored_xy = index["models"]["seg-centre"]["outputs"]["centre"]["per_image"][good]["xy"]
    [planar] = report.get_planar_roi_measurement_groups(referenced_sop_instance_uid=good)
    assert planar.roi.value.tolist() == [pytest.approx(stored_xy)]

    groups = report.get_image_measurement_groups(referenced_sop_instance_uid=bad)
    evaluations = {e.name.value: e.value.value for g in groups
                   for e in g.get_qualitative_evaluations()}
    assert evaluations[NOT_ANALYSED.value] == "UNGR"


def _algorithm_name(measurement: Any) -> str:
    for child in measurement[0].ContentSequence:
        if child.ConceptNameCodeSequence[0].CodeValue == "111001":  # Algorithm Name
            return str(child.TextValue)
    raise AssertionError("measurement without an algorithm name")
