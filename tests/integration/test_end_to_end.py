"""End to end: storescu -> `dicomnode serve` -> models -> SR, SEG, overlays -> Orthanc.

A real node process with a tmp registry of tiny fixture models (a segmentation, a classifier,
a measurement on the segmentation's mask) and a preset routing OP studies to the destination
`pacs`, an Orthanc on free ports. What arrives in Orthanc is fetched back, checked with
dciodvfy, and read with highdicom; its content must equal the outputs the node stored.
Then the PACS outage cases: results wait and retry, and arrive once when the PACS is back,
also when the node is restarted in between.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import yaml
from pydicom import dcmread
from sqlalchemy import select

from dicomnode.db.engine import Database
from dicomnode.db.models import Delivery, DeliveryState, Job, Result, ResultSet
from dicomnode.inference.outputs import read_index, source_mask
from dicomnode.synthetic import demo_study
from tests.support.node import NODE_AE, NodeProcess, results_delivered, write_config
from tests.support.onnx_models import (
    RegistryWriter,
    classifier_manifest,
    green_threshold_segmenter,
    measurement_manifest,
    segmenter_manifest,
)
from tests.support.orthanc import ORTHANC_AET, Orthanc
from tests.support.peers import free_port, require_tool
from tests.unit.results.sources import content_items, dciodvfy, errors

pytestmark = pytest.mark.integration

PRESET = {
    "id": "fundus-screening", "name": "Fundus screening", "audience": "tests",
    "description": "end-to-end test preset",
    "models": ["vessel-seg", "image-quality", "vessel-fraction"],
    "outputs": {"sr": True, "seg": True, "overlay": True},
    "destinations": ["pacs"],
    "routing": {"modality": ["OP"]},
}


def _registry(root: Path) -> None:
    writer = RegistryWriter(root)
    # Threshold 0.3 on green: a mask covering part of the synthetic fundus, neither empty
    # nor full, so the pixel-for-pixel comparison below means something.
    writer.add(segmenter_manifest("vessel-seg", modalities=("OP",)),
               green_threshold_segmenter(threshold=0.3))
    writer.add(classifier_manifest("image-quality", gate=False, modalities=("OP",)))
    writer.add(measurement_manifest("vessel-fraction", source="vessel-seg.mask",
                                    modalities=("OP",)))


def _config(tmp_path: Path, pacs_port: int, *, first_delay: float = 0.5) -> Path:
    _registry(tmp_path / "registry")
    presets = tmp_path / "presets"
    presets.mkdir(exist_ok=True)
    (presets / "screening.yaml").write_text(yaml.safe_dump(PRESET), encoding="utf-8")
    return write_config(
        tmp_path, f"sqlite:///{tmp_path / 'node.db'}",
        destinations={"pacs": {"ae_title": ORTHANC_AET, "host": "127.0.0.1",
                               "port": pacs_port}},
        registry={"path": str(tmp_path / "registry")},
        presets={"path": str(presets)},
        inference={"providers": ["CPUExecutionProvider"], "poll_seconds": 0.5},
        dispatch={"first_delay_seconds": first_delay, "factor": 1.5, "max_delay_seconds": 2,
                  "max_attempts": 100, "poll_seconds": 0.2, "connect_timeout_seconds": 2},
    )


def _send(port: int, files: list[Path]) -> None:
    storescu = require_tool("storescu", "dcmtk")
    subprocess.run([storescu, "-aet", "CAM1", "-aec", NODE_AE, "127.0.0.1", str(port),
                    *map(str, files)], check=True, capture_output=True, timeout=120)


def _wait(what: str, predicate: Callable[[], bool], timeout: float, log: Callable[[], str]
          ) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    if not predicate():
        pytest.fail(f"timed out waiting for {what}; node log:\n{log()[-6000:]}")


def _results(database: Database) -> list[Result]:
    with database.transaction() as session:
        return list(session.scalars(select(Result).order_by(Result.id)))


def _deliveries(database: Database) -> list[Delivery]:
    with database.transaction() as session:
        return list(session.scalars(select(Delivery).order_by(Delivery.id)))


def _encoded(database: Database) -> bool:
    with database.transaction() as session:
        return session.scalar(select(ResultSet.state)) == "encoded"


def _all_sent(database: Database) -> bool:
    with database.transaction() as session:
        return results_delivered(session)


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    peer = Orthanc(tmp_path / "pacs", free_port(), free_port())
    yield peer
    peer.stop()


@pytest.fixture
def study(tmp_path: Path) -> list[Path]:
    return demo_study(tmp_path / "demo", size=512)


def test_camera_to_pacs_valid_sr_seg_overlay_equal_to_stored_outputs(
    tmp_path: Path, orthanc: Orthanc, study: list[Path]
) -> None:
    require_tool("dciodvfy", "dicom3tools")
    orthanc.start()
    config = _config(tmp_path, orthanc.dicom_port)
    database = Database(f"sqlite:///{tmp_path / 'node.db'}")
    try:
        with NodeProcess(config) as node:
            _send(node.port, study)
            _wait("all results sent", lambda: _encoded(database) and _all_sent(database),
                  90, node.log)
            log = node.log()
        results = _results(database)
        with database.transaction() as session:
            output_path = session.scalars(select(Job.output_path)).one()
    finally:
        database.dispose()
    assert "Traceback" not in log
    # One SEG and one overlay per image (both eyes), one SR for the study.
    assert sorted(r.kind for r in results) == ["overlay", "overlay", "seg", "seg", "sr"]
    by_uid = {r.sop_instance_uid: r for r in results}
    ids = orthanc.instance_ids()
    fetched: dict[str, Path] = {}
    for orthanc_id in ids:
        path = orthanc.download(orthanc_id, tmp_path / f"pacs-{orthanc_id}.dcm")
        fetched[_sop_uid(path)] = path
    # Exactly the node's results (the camera sent to the node, not to the PACS).
    assert sorted(fetched) == sorted(by_uid) and len(ids) == len(results)
    for uid, path in fetched.items():
        assert errors(dciodvfy(path)) == [], (by_uid[uid].kind, dciodvfy(path))

    assert output_path is not None
    outputs = tmp_path / "storage" / output_path
    index = read_index(outputs)
    seg_entry = index["models"]["vessel-seg"]
    areas = []
    with np.load(outputs / seg_entry["file"]) as npz:
        for row in (r for r in results if r.kind == "seg"):
            seg = hd.seg.segread(fetched[row.sop_instance_uid])
            assert row.source_uid is not None
            stored = source_mask(npz, seg_entry["outputs"]["mask"]["per_image"][row.source_uid])
            got = seg.get_pixels_by_source_instance(
                [row.source_uid], segment_numbers=[1])[0, :, :, 0].astype(bool)
            np.testing.assert_array_equal(got, stored)
            assert str(seg.SegmentSequence[0].TrackingID) == "vessel-seg.mask"
            areas.append(stored.mean())
    assert all(0.01 < a < 0.99 for a in areas), areas  # a real mask, not empty or full

    [sr_row] = [r for r in results if r.kind == "sr"]
    sr = hd.sr.srread(fetched[sr_row.sop_instance_uid])
    [measurements] = [c for c in sr.ContentSequence
                      if c.ConceptNameCodeSequence[0].CodeMeaning == "Imaging Measurements"]
    items = list(content_items(measurements.ContentSequence))
    reported = sorted(float(i.MeasuredValueSequence[0].NumericValue)
                      for i in items if i.ValueType == "NUM"
                      and i.ConceptNameCodeSequence[0].CodeValue != "122157")  # probabilities
    stored_values = sorted(
        float(v["value"])
        for v in index["models"]["vessel-fraction"]["outputs"]["fraction"]["per_image"].values())
    assert len(reported) == 2
    assert reported == pytest.approx(stored_values, rel=1e-12)
    # The classifier's answers are coded qualitative evaluations, one per image.
    answers = sorted(str(i.ConceptCodeSequence[0].CodeValue)
                     for i in items if i.ValueType == "CODE"
                     and i.ConceptNameCodeSequence[0].CodeValue == "QUAL")
    stored_answers = sorted(
        v["code"]["value"] for v in
        index["models"]["image-quality"]["outputs"]["probabilities"]["per_image"].values())
    assert answers == stored_answers and len(answers) == 2
    # The overlays have the source's width (a legend band below the fundus when no corner is
    # free of retina), name their source, and sit in one series per eye.
    series = set()
    for row in (r for r in results if r.kind == "overlay"):
        overlay = hd.imread(fetched[row.sop_instance_uid])
        assert overlay.SourceImageSequence[0].ReferencedSOPInstanceUID == row.source_uid
        assert overlay.Columns == 512 and overlay.Rows >= 512
        series.add((str(overlay.SeriesInstanceUID), str(overlay.Laterality)))
    assert sorted(side for _, side in series) == ["L", "R"] and len(series) == 2


def _sop_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)



def _waiting(database: Database) -> bool:
    """Deliveries exist, none sent, each tried at least once and due again later."""
    rows = _deliveries(database)
    return bool(rows) and all(
        d.state == DeliveryState.PENDING and d.attempts >= 1 and d.last_error for d in rows)


@pytest.mark.parametrize("restart_node", [False, True], ids=["node-running", "node-restarted"])
def test_pacs_outage_loses_nothing_and_duplicates_nothing(
    tmp_path: Path, orthanc: Orthanc, study: list[Path], restart_node: bool
) -> None:
    config = _config(tmp_path, orthanc.dicom_port)  # Orthanc not started: the PACS is down
    database = Database(f"sqlite:///{tmp_path / 'node.db'}")
    try:
        node = NodeProcess(config).start()
        try:
            _send(node.port, study)
            _wait("deliveries waiting to retry", lambda: _waiting(database), 90, node.log)
            if restart_node:
                assert node.terminate(timeout=60) == 0
                # The restarted node must neither re-encode nor re-queue (checked below).
                node = NodeProcess(config).start()
            orthanc.start()
            _wait("all results sent", lambda: _all_sent(database), 60, node.log)
            log = node.log()
        finally:
            if node.proc is not None and node.proc.poll() is None:
                node.terminate(timeout=60)
        results = _results(database)
        deliveries = _deliveries(database)
        with database.transaction() as session:
            result_sets = list(session.scalars(select(ResultSet)))
    finally:
        database.dispose()
    assert "Traceback" not in log
    assert len(result_sets) == 1 and result_sets[0].attempts == 1
    assert len(results) == 5
    # One delivery per object, each sent after at least one failed attempt.
    assert sorted(d.sop_instance_uid for d in deliveries) == sorted(
        r.sop_instance_uid for r in results)
    assert all(d.attempts >= 2 for d in deliveries)
    arrived = [_sop_uid(orthanc.download(i, tmp_path / f"got-{i}.dcm"))
               for i in orthanc.instance_ids()]
    assert sorted(arrived) == sorted(r.sop_instance_uid for r in results)
