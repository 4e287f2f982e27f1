"""Wake, don't poll: with every poll interval set far longer than the test's deadline, a study
still goes from complete to delivered in seconds, because each stage is woken when the row
that makes its work commits (dicomnode.db.wakeups).

storescu sends the demo study to a real node (tiny fixture models) and the results go to a
real Orthanc, on PostgreSQL, where work committed by another process arrives as a
notification (LISTEN/NOTIFY): a re-run queued from the command line, and a `dicomnode worker`
process doing the inference for a `serve` node (jobs and finished jobs cross processes).
Within one process (SQLite or PostgreSQL) the wake-ups are in memory; the first delivery of
the re-run test covers that path.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select

from dicomnode.db.engine import Database
from dicomnode.db.models import Delivery, DeliveryState, Job, ResultSet
from dicomnode.synthetic import demo_study
from tests.support.databases import postgres_database
from tests.support.node import NODE_AE, NodeProcess, write_config
from tests.support.onnx_models import (
    RegistryWriter,
    classifier_manifest,
    green_threshold_segmenter,
    segmenter_manifest,
)
from tests.support.orthanc import ORTHANC_AET, Orthanc
from tests.support.peers import free_port, require_tool

pytestmark = pytest.mark.integration

# Every stage's poll: a stage that waits for one fails the test's deadline.
POLL = 300.0
# Complete to delivered with fixture models takes about a second on a quiet 2-core machine;
# the margin is for a loaded one. Far below one POLL either way.
DEADLINE = 60.0


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    peer = Orthanc(tmp_path_factory.mktemp("pacs"), free_port(), free_port())
    peer.start()
    yield peer
    peer.stop()


def _config(tmp_path: Path, db_url: str, orthanc: Orthanc, **inference: object) -> Path:
    writer = RegistryWriter(tmp_path / "registry")
    writer.add(segmenter_manifest("vessel-seg", modalities=("OP",)),
               green_threshold_segmenter(threshold=0.3))
    writer.add(classifier_manifest("image-quality", gate=False, modalities=("OP",)))
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "screening.yaml").write_text(yaml.safe_dump({
        "id": "screening", "name": "Screening", "audience": "tests", "description": "wake",
        "models": ["vessel-seg", "image-quality"],
        "outputs": {"sr": True, "seg": True, "overlay": False},
        "destinations": ["pacs"], "routing": {"modality": ["OP"]},
    }), encoding="utf-8")
    return write_config(
        tmp_path, db_url,
        destinations={"pacs": {"ae_title": ORTHANC_AET, "host": "127.0.0.1",
                               "port": orthanc.dicom_port}},
        registry={"path": str(tmp_path / "registry")}, presets={"path": str(presets)},
        # Both eyes complete a study at the association's end; the quiet period never does.
        completeness={"quiet_seconds": POLL, "sweep_seconds": POLL,
                      "expected_laterality": ["L", "R"]},
        inference={"providers": ["CPUExecutionProvider"], "poll_seconds": POLL, **inference},
        dispatch={"poll_seconds": POLL},
    )


def _send(storescu: str, port: int, files: list[Path]) -> float:
    """Send over one association; return when storescu finished (monotonic)."""
    subprocess.run([storescu, "-aet", "CAM1", "-aec", NODE_AE, "127.0.0.1", str(port),
                    *map(str, files)], check=True, capture_output=True, timeout=120)
    return time.monotonic()


def _delivered_jobs(database: Database) -> int:
    """Jobs whose results are encoded and every delivery acknowledged by the PACS."""
    with database.transaction() as session:
        encoded = set(session.scalars(select(ResultSet.job_id)
                                      .where(ResultSet.state == "encoded")))
        deliveries = list(session.scalars(select(Delivery)))
    by_path = {d.path: d.state for d in deliveries}
    waiting = {job for job in encoded
               if any(f"results/{job}/" in p and s != DeliveryState.SENT
                      for p, s in by_path.items())}
    return len(encoded - waiting) if deliveries else 0


def _wait_delivered(database: Database, jobs: int, since: float, logs: str) -> float:
    """Seconds from `since` until `jobs` jobs are delivered; fails past DEADLINE."""
    while time.monotonic() - since < DEADLINE:
        if _delivered_jobs(database) >= jobs:
            return time.monotonic() - since
        time.sleep(0.1)
    pytest.fail(f"{jobs} job(s) not delivered within {DEADLINE:.0f} s (polls are "
                f"{POLL:.0f} s: a stage waited for its poll); log:\n{logs[-6000:]}")


def test_a_rerun_from_the_command_line_is_run_and_delivered_without_waiting_for_a_poll(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    """One node on PostgreSQL; `dicomnode study rerun` (another process) queues a job."""
    storescu = require_tool("storescu", "dcmtk")
    with postgres_database() as db_url:
        config = _config(tmp_path, db_url, orthanc)
        files = demo_study(tmp_path / "study", size=256, seed=3, patient_id="WAKE1")
        database = Database(db_url)
        try:
            with NodeProcess(config) as node:
                # In-process: the job worker, encoders and dispatcher wake one another.
                _wait_delivered(database, 1, _send(storescu, node.port, files), node.log())
                subprocess.run([sys.executable, "-m", "dicomnode.cli", "study", "rerun",
                                _study_uid(files[0]), "--config", str(config)],
                               check=True, capture_output=True, timeout=120)
                _wait_delivered(database, 2, time.monotonic(), node.log())
            with database.transaction() as session:
                jobs = [(j.reason, j.state) for j in session.scalars(select(Job).order_by(Job.id))]
                sent = list(session.scalars(select(Delivery.sop_instance_uid)))
            assert jobs == [("complete", "done"), ("rerun", "done")]
            # Sent once each: 1 SR and 2 SEGs, then the re-run's new SR (unchanged SEGs kept).
            assert len(sent) == len(set(sent)) == 4
            assert set(sent) <= set(orthanc.sop_instance_uids())
        finally:
            database.dispose()


def test_a_worker_process_on_shared_postgresql_is_woken_by_notifications(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    """`serve` receives, encodes and sends; a separate `dicomnode worker` runs the job."""
    storescu = require_tool("storescu", "dcmtk")
    with postgres_database() as db_url:
        serve_config = _config(tmp_path, db_url, orthanc, workers=0)
        worker_config = tmp_path / "worker.yaml"
        settings = yaml.safe_load(serve_config.read_text(encoding="utf-8"))
        settings["inference"]["workers"] = 1
        worker_config.write_text(yaml.safe_dump(settings), encoding="utf-8")
        files = demo_study(tmp_path / "study", size=256, seed=5, patient_id="WAKE2")
        database = Database(db_url)
        worker_log = tmp_path / "worker.log"
        try:
            with NodeProcess(serve_config) as node:
                worker = _start_worker(worker_config, worker_log)
                try:
                    _wait_listening(worker_log)
                    _wait_delivered(database, 1, _send(storescu, node.port, files),
                                    node.log() + worker_log.read_text(errors="replace"))
                finally:
                    worker.send_signal(signal.SIGTERM)
                    assert worker.wait(30) == 0
            with database.transaction() as session:
                [job] = list(session.scalars(select(Job)))
            # The worker process ran it, not the serving node (which has no job worker).
            assert job.state == "done" and "worker" in (job.claimed_by or ""), job.claimed_by
        finally:
            database.dispose()


def _study_uid(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def _start_worker(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "dicomnode.cli", "worker", "--config", str(config)],
            stdout=handle, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _wait_listening(log: Path, timeout: float = 60.0) -> None:
    """Until the worker's job threads run (its first pass is done; the next is a POLL away)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "job worker(s)" in log.read_text(errors="replace"):
            time.sleep(1.0)  # its first pass (an empty queue) and LISTEN
            return
        time.sleep(0.1)
    pytest.fail(f"worker did not start; log:\n{log.read_text(errors='replace')[-4000:]}")
