"""Every model that did not analyse an image says why, with a code: executor -> stored outputs
-> model-run rows -> `job show` -> SR. Also the manifest's per-class gate reasons."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from pydantic import ValidationError
from pydicom import Dataset
from pydicom.uid import generate_uid

from dicomnode.graph import Selection, resolve
from dicomnode.inference import reasons
from dicomnode.inference.decode import decode_rgb
from dicomnode.inference.executor import GraphExecutor, GraphResult
from dicomnode.inference.outputs import read_index, write_outputs
from dicomnode.inference.preprocess import SourceImage
from dicomnode.inference.sessions import SessionPool
from dicomnode.jobs.queue import not_analysed_by_image
from dicomnode.registry import Registry, load_registry
from dicomnode.registry.manifest import Manifest
from dicomnode.results.codes import NOT_ANALYSED
from dicomnode.results.job_outputs import results_from_outputs
from dicomnode.results.sr import NodeIdentity, build_report
from dicomnode.synthetic import op_dataset
from tests.support.executor_fixtures import disc_rgb
from tests.support.onnx_models import (
    RegistryWriter,
    classifier_manifest,
    mean_colour_classifier,
    measurement_manifest,
    private_code,
    segmenter_manifest,
)
from tests.unit.results.sources import dciodvfy, errors

UNGRADABLE_REASON = private_code("NA-UNGRADABLE", "Ungradable image")


def ungradable_without_green() -> Any:
    # A bias towards "ungradable": an image with no green at all is ungradable.
    return mean_colour_classifier(bias=[1.0, 0.0])


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """quality (gate, declared coded reason) <- colour-seg (colour, >= 80 px) <- fraction."""
    writer = RegistryWriter(tmp_path_factory.mktemp("registry"))
    quality = classifier_manifest("quality", modalities=("OP",))
    quality["outputs"][0]["gate"] = {
        "ineligible": ["ungradable"], "reason": "ungradable image",
        "reasons": {"ungradable": {"text": "ungradable image", "code": UNGRADABLE_REASON}},
    }
    writer.add(quality, ungradable_without_green())
    seg = segmenter_manifest("colour-seg", modalities=("OP",), requires=("quality",))
    seg["requirements"] = {"colour": "colour", "min_width": 80, "min_height": 80}
    writer.add(seg)
    writer.add(measurement_manifest("fraction", source="colour-seg.mask", modalities=("OP",)))
    reg = load_registry(writer.root)
    assert not reg.left_out, reg.left_out
    return reg


def _run(registry: Registry) -> tuple[GraphResult, dict[str, str]]:
    graph = resolve(Selection.of(["fraction"], modality="OP"), registry)
    grey = np.repeat(disc_rgb(green=200)[..., 1:2], 3, axis=2)  # red-free: R = G = B
    images = {
        "good": SourceImage("1.9.1", disc_rgb(green=200), modality="OP"),
        "grey": SourceImage("1.9.2", grey, modality="OP"),
        "small": SourceImage("1.9.3", disc_rgb(size=48, green=200), modality="OP"),
        "ungradable": SourceImage("1.9.4", disc_rgb(green=0), modality="OP"),
        "sc": SourceImage("1.9.5", disc_rgb(green=200), modality="SC"),
    }
    executor = GraphExecutor(registry, SessionPool(["CPUExecutionProvider"],
                                                   intra_op_threads=1))
    result = executor.run(graph, list(images.values()))
    return result, {k: v.sop_instance_uid for k, v in images.items()}


def test_each_skip_has_its_coded_reason_propagated_downstream(registry: Registry) -> None:
    result, uid = _run(registry)
    assert result.outcome == "done"
    quality, seg, fraction = (result.models[m] for m in ("quality", "colour-seg", "fraction"))
    assert quality.run_images == [uid["good"], uid["grey"], uid["small"], uid["ungradable"]]
    assert {u: r.value for u, r in quality.not_analysed.items()} == {uid["sc"]: "NA-MODALITY"}
    want = {uid["grey"]: "NA-MONOCHROME", uid["small"]: "NA-TOO-SMALL",
            uid["ungradable"]: "NA-UNGRADABLE", uid["sc"]: "NA-MODALITY"}
    for run in (seg, fraction):
        assert run.run_images == [uid["good"]]
        assert {u: r.value for u, r in run.not_analysed.items()} == want
        assert set(run.skipped) == set(want)  # the old text map still says the same images
    assert "48x48 is smaller than 80x80" in seg.not_analysed[uid["small"]].detail
    assert seg.not_analysed[uid["ungradable"]].detail == "quality: ungradable image"
    assert "SC" in seg.not_analysed[uid["sc"]].detail


def test_a_gate_without_declared_codes_uses_the_class_code(tmp_path: Path) -> None:
    writer = RegistryWriter(tmp_path)
    writer.add(classifier_manifest("quality", modalities=("OP",)), ungradable_without_green())
    writer.add(segmenter_manifest("seg", modalities=("OP",), requires=("quality",)))
    reg = load_registry(tmp_path)
    graph = resolve(Selection.of(["seg"], modality="OP"), reg)
    executor = GraphExecutor(reg, SessionPool(["CPUExecutionProvider"], intra_op_threads=1))
    result = executor.run(graph, [SourceImage("1.8", disc_rgb(green=0))])
    reason = result.models["seg"].not_analysed["1.8"]
    assert (reason.value, reason.meaning) == ("UNGR", "Ungradable")


def test_failed_upstream_marks_every_image_of_its_dependants(tmp_path: Path) -> None:
    writer = RegistryWriter(tmp_path)
    writer.add(classifier_manifest("quality", modalities=("OP",)))
    writer.add(segmenter_manifest("seg", modalities=("OP",), requires=("quality",)))
    reg = load_registry(tmp_path)
    graph = resolve(Selection.of(["seg"], modality="OP"), reg)
    executor = GraphExecutor(reg, SessionPool(["CPUExecutionProvider"], intra_op_threads=1))
    # A 2-D image makes pre-processing of the gate raise: the gate fails.
    result = executor.run(graph, [SourceImage("1.7", np.zeros((8, 8), np.uint8))])
    assert result.models["quality"].status == "failed"
    assert result.models["quality"].not_analysed["1.7"].value == "NA-MODEL-FAILED"
    blocked = result.models["seg"]
    assert blocked.status == "skipped"
    assert blocked.not_analysed["1.7"].value == "NA-UPSTREAM-FAILED"
    assert "needs quality" in blocked.not_analysed["1.7"].detail


def _sources() -> dict[str, Dataset]:
    study = generate_uid()
    grey = np.repeat(disc_rgb(green=200)[..., 1:2], 3, axis=2)
    return {
        "good": op_dataset(disc_rgb(green=200), laterality="R", study_uid=study,
                           instance_number=1),
        "grey": op_dataset(grey, laterality="L", study_uid=study, instance_number=2),
        "small": op_dataset(disc_rgb(size=48, green=200), laterality="R", study_uid=study,
                            instance_number=3),
    }


def test_stored_outputs_rows_and_sr_carry_the_reasons(
    registry: Registry, tmp_path: Path
) -> None:
    sources = _sources()
    images = [SourceImage(str(s.SOPInstanceUID), decode_rgb(s), modality="OP")
              for s in sources.values()]
    graph = resolve(Selection.of(["fraction"], modality="OP"), registry)
    executor = GraphExecutor(registry, SessionPool(["CPUExecutionProvider"],
                                                   intra_op_threads=1))
    result = executor.run(graph, images)
    folder = tmp_path / "jobs" / "1"
    write_outputs(folder, result, registry, {"job": 1})
    grey, small = str(sources["grey"].SOPInstanceUID), str(sources["small"].SOPInstanceUID)
    index: dict[str, Any] = read_index(folder)
    stored = index["models"]["colour-seg"]["not_analysed"]
    assert stored[grey]["value"] == "NA-MONOCHROME"
    assert stored[grey]["meaning"] == "Monochrome image"
    assert stored[small]["scheme"] == "99DICOMNODE"

    # What `job show`, the API and the console list, from run rows shaped as job_detail's.
    runs = [{"model_id": m, "version": r.version,
             "not_analysed": json.loads(json.dumps({u: x.to_dict()
                                                    for u, x in r.not_analysed.items()}))}
            for m, r in result.models.items()]
    rows = not_analysed_by_image(runs)
    assert [(r["sop_instance_uid"], r["model_id"], r["code"]) for r in rows] == sorted([
        (grey, "colour-seg", "NA-MONOCHROME"), (grey, "fraction", "NA-MONOCHROME"),
        (small, "colour-seg", "NA-TOO-SMALL"), (small, "fraction", "NA-TOO-SMALL")])

    findings = results_from_outputs(folder, registry).findings
    sr = build_report(list(sources.values()), findings,
                      node=NodeIdentity.for_node("DICOMNODE", host="test"))
    path = tmp_path / "sr.dcm"
    sr.save_as(path)
    assert errors(dciodvfy(path)) == []
    report: Any = hd.sr.srread(path).content
    for uid, code, meaning in ((grey, "NA-MONOCHROME", "Monochrome image"),
                               (small, "NA-TOO-SMALL", "Image too small")):
        said = {}
        for group in report.get_image_measurement_groups(referenced_sop_instance_uid=uid):
            for evaluation in group.get_qualitative_evaluations():
                if evaluation.name.value == NOT_ANALYSED.value:
                    said[_algorithm_name(group)] = (evaluation.value.value,
                                                    evaluation.value.meaning,
                                                    evaluation.value.scheme_designator)
        assert said == {"Colour Seg": (code, meaning, "99DICOMNODE"),
                        "Fraction": (code, meaning, "99DICOMNODE")}
    good = str(sources["good"].SOPInstanceUID)
    for group in report.get_image_measurement_groups(referenced_sop_instance_uid=good):
        assert NOT_ANALYSED.value not in {e.name.value for e in group.get_qualitative_evaluations()}


def _algorithm_name(group: Any) -> str:
    for child in group[0].ContentSequence:
        if child.ConceptNameCodeSequence[0].CodeValue == "111001":  # Algorithm Name
            return str(child.TextValue)
    raise AssertionError("group without an algorithm name")


def _manifest_with_gate(gate: dict[str, Any]) -> dict[str, Any]:
    manifest = copy.deepcopy(classifier_manifest("quality"))
    manifest["outputs"][0]["classes"].append(
        {"label": "not-fundus", "code": private_code("NF", "Not fundus")})
    manifest["outputs"][0]["threshold"] = None
    manifest["outputs"][0]["gate"] = gate
    return manifest


def test_gate_reasons_per_class_validate_with_precise_errors() -> None:
    ok = Manifest.model_validate(_manifest_with_gate({
        "ineligible": ["ungradable", "not-fundus"], "reason": "ungradable image",
        "reasons": {"not-fundus": {"text": "not a fundus photograph",
                                   "code": private_code("NA-NOT-FUNDUS",
                                                        "Not a fundus photograph")}},
    }))
    (gate,) = [o.gate for o in ok.gates]
    assert gate is not None
    assert gate.text_for("not-fundus") == "not a fundus photograph"
    assert gate.text_for("ungradable") == "ungradable image"
    problems: dict[str, dict[str, Any]] = {
        "not in gate.ineligible": {"ineligible": ["ungradable"],
                                   "reasons": {"not-fundus": {"text": "x"}}},
        "gate reason's text must not be blank": {"ineligible": ["not-fundus"],
                                                 "reasons": {"not-fundus": {"text": " "}}},
        "more than once": {"ineligible": ["not-fundus", "not-fundus"]},
        "unknown class labels": {"ineligible": ["blurred"]},
        "Extra inputs": {"ineligible": ["not-fundus"],
                         "reasons": {"not-fundus": {"text": "x", "colour": "red"}}},
    }
    for message, gate_spec in problems.items():
        with pytest.raises(ValidationError, match=message):
            Manifest.model_validate(_manifest_with_gate(gate_spec))


def test_reason_codes_are_distinct_and_private() -> None:
    values = [r.value for r in reasons.ALL_REASONS]
    assert len(set(values)) == len(values)
    assert {r.scheme for r in reasons.ALL_REASONS} == {"99DICOMNODE"}
    assert reasons.NOT_FUNDUS.meaning != reasons.UNGRADABLE.meaning
