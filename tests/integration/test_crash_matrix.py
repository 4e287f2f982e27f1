"""The crash matrix: one real node (`dicomnode serve`) killed with SIGKILL at each stage of the
flow in turn, on SQLite and on PostgreSQL, restarted after each kill.

Pynetdicom cameras send two studies and count the 0x0000 acknowledgements: study A (two
eyes, routed to a preset whose slow fixture models keep its job running for a while) and
study B (a burst of many images from another camera, stored but routed nowhere). DCMTK
storescp, writing one file per reception, is the PACS. Each stage is found by the node's own
durable signals, polled from the test:

1. mid-burst and mid-job: B's burst cut after some acknowledgements while A's job is
   `running`;
2. mid-encoding: A's job finished, its result set not yet encoded;
3. mid-delivery: the PACS (sleeping after each object) has stored some of A's objects, the
   rest are not yet answered.

After the kills and restarts:

- every acknowledged instance is held: its row, and a readable file with its SOP Instance
  UID, checked right after the kill (before a restart could mend anything);
- both studies reach a final state within a bound, A's results all reach the PACS, and
  nothing arrives twice, with the one exception DICOM cannot avoid: the C-STORE in flight
  when the node died may have been stored by the PACS without the node hearing the answer,
  and is sent again under the same SOP Instance UID (a PACS files it as the same object);
- the killed job ran once more and no more, and made one set of results (their UIDs are
  derived from the job and from the content, so encoding again makes the same objects).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import pydicom
import pytest
import yaml
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from sqlalchemy import func, select

from dicomnode.db.engine import Database
from dicomnode.db.models import (
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    ModelRun,
    Result,
    ResultSet,
    ResultSetState,
    Study,
)
from dicomnode.synthetic import op_dataset, synthetic_fundus
from tests.support.executor_fixtures import write_diamond
from tests.support.node import NODE_AE, NodeProcess, results_delivered, write_config
from tests.support.peers import free_port
from tests.support.storescp import STORESCP_AET, StoreScp

pytestmark = pytest.mark.integration

BURST = 12  # study B: a burst cut after a third, far from its end
SIZE = 128
OP_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
_FINAL = {"done", "partial", "failed", "not-routed"}
# Each stage's wait, and the bound for every study to be final after the last restart.
STAGE_TIMEOUT = 60.0
FINAL_BOUND = 60.0


def _node_config(tmp_path: Path, db_url: str, pacs_port: int) -> Path:
    registry = tmp_path / "registry"
    # seg -> slow-b, slow-c -> total: the slow models keep the job running for a while.
    write_diamond(registry, slow_repeats=120)
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "screening.yaml").write_text(yaml.safe_dump({
        "id": "screening", "name": "Screening", "audience": "tests",
        "description": "crash matrix preset", "models": ["total"],
        "outputs": {"sr": True, "seg": True, "overlay": True},
        "destinations": ["pacs"], "routing": {"modality": ["OP"], "calling_ae": ["CAM1"]},
    }), encoding="utf-8")
    return write_config(
        tmp_path, db_url,
        # A study completes when a camera's association ends with both eyes held; the quiet
        # timer is what completes one whose association a kill cut off.
        completeness={"quiet_seconds": 3, "sweep_seconds": 1},
        destinations={"pacs": {"ae_title": STORESCP_AET, "host": "127.0.0.1",
                               "port": pacs_port}},
        registry={"path": str(registry)}, presets={"path": str(presets)},
        # The default 300 s leases: a restarted node must take its work back by itself.
        inference={"workers": 1, "poll_seconds": 0.2, "providers": ["CPUExecutionProvider"]},
        results={"retry_seconds": 1},
        dispatch={"poll_seconds": 0.2, "first_delay_seconds": 0.5, "factor": 1,
                  "max_delay_seconds": 1, "max_attempts": 100, "connect_timeout_seconds": 2,
                  "network_timeout_seconds": 10},
    )


def _study_files(folder: Path, images: int, patient_id: str) -> tuple[str, list[Path]]:
    """A two-eye study of Ophthalmic Photography files (right, left, ...), a series per eye."""
    folder.mkdir()
    study_uid = generate_uid()
    series = {"R": generate_uid(), "L": generate_uid()}
    pictures = {"R": synthetic_fundus(SIZE, "R", 0), "L": synthetic_fundus(SIZE, "L", 0)}
    paths = []
    for index in range(images):
        lat: Literal["R", "L"] = "R" if index % 2 == 0 else "L"
        ds = op_dataset(pictures[lat], laterality=lat, patient_id=patient_id,
                        study_uid=study_uid, series_uid=series[lat],
                        instance_number=index // 2 + 1)
        path = folder / f"{index:02d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return study_uid, paths


class _Camera:
    """Sends files over one association and records each SOP Instance UID acknowledged with
    0x0000. With `pause_after`, it waits after that many acknowledgements until `go` is set
    (so the test can line the kill up with another stage), then sends on at once."""

    def __init__(self, port: int, ae_title: str, paths: list[Path],
                 pause_after: int | None = None) -> None:
        self.port, self.ae_title, self.paths = port, ae_title, paths
        self.pause_after = pause_after
        self.paused, self.go = threading.Event(), threading.Event()
        self.acknowledged: list[str] = []

    def run(self) -> None:
        ae = AE(ae_title=self.ae_title)
        ae.add_requested_context(OP_8BIT, ExplicitVRLittleEndian)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
        assoc = ae.associate("127.0.0.1", self.port, ae_title=NODE_AE)
        assert assoc.is_established, "the node refused the association"
        try:
            for path in self.paths:
                if len(self.acknowledged) == self.pause_after:
                    self.paused.set()
                    self.go.wait(STAGE_TIMEOUT)
                ds = pydicom.dcmread(path)
                if not assoc.is_established:
                    return
                status = assoc.send_c_store(ds)
                if status is not None and "Status" in status and int(status.Status) == 0:
                    self.acknowledged.append(str(ds.SOPInstanceUID))
        finally:
            if assoc.is_established:
                assoc.release()


def _uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def _wait(what: str, predicate: Callable[[], bool], timeout: float, node: NodeProcess,
          poll: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll)
    pytest.fail(f"timed out waiting for {what}; node log:\n{node.log()[-6000:]}")


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[StoreScp]:
    # Sleeps 1 s after each object until stage 3 is done: a delivery lasts seconds.
    peer = StoreScp(tmp_path / "pacs", free_port(), sleep_after=1)
    yield peer
    peer.stop()


def test_killed_at_every_stage_the_node_loses_nothing_and_sends_nothing_twice(
    db_url: str, tmp_path: Path, pacs: StoreScp
) -> None:
    pacs.start()
    config = _node_config(tmp_path, db_url, pacs.port)
    study_a, files_a = _study_files(tmp_path / "study-a", 2, "CRASHA")
    study_b, files_b = _study_files(tmp_path / "study-b", BURST, "CRASHB")
    database = Database(db_url)
    nodes: list[NodeProcess] = []
    timings: dict[str, float] = {}
    began = time.monotonic()

    def start() -> NodeProcess:
        nodes.append(NodeProcess(config).start(timeout=90))  # each run its own log
        return nodes[-1]

    def kill(stage: str) -> None:
        nodes[-1].kill()
        timings[stage] = round(time.monotonic() - began, 1)

    def job() -> Job | None:
        with database.transaction() as session:
            return session.scalars(select(Job).where(Job.study_uid == study_a)).one_or_none()

    def assert_held(acknowledged: list[str]) -> None:
        with database.transaction() as session:
            held = dict(session.execute(
                select(Instance.sop_instance_uid, Instance.path)).all())
        missing = [uid for uid in acknowledged if uid not in held]
        assert not missing, f"acknowledged, but no row after the kill: {missing}"
        for uid in acknowledged:
            stored = pydicom.dcmread(nodes[-1].storage / held[uid])
            assert str(stored.SOPInstanceUID) == uid and stored.pixel_array.shape[0] == SIZE

    try:
        # -- 1. mid-burst (study B) and mid-job (study A) -----------------------------------
        node = start()
        burst = _Camera(node.port, "CAM2", files_b, pause_after=BURST // 3)
        sender = threading.Thread(target=burst.run, daemon=True)
        sender.start()
        assert burst.paused.wait(STAGE_TIMEOUT), "the burst did not start"
        camera_a = _Camera(node.port, "CAM1", files_a)
        camera_a.run()
        assert len(camera_a.acknowledged) == 2
        _wait("A's job running", lambda: (j := job()) is not None
              and j.state == JobState.RUNNING, STAGE_TIMEOUT, node)
        burst.go.set()  # B's burst goes on, and the node dies inside it
        time.sleep(0.01)
        kill("burst and job")
        sender.join(2)  # no acknowledgement can come from a dead node
        acknowledged_b = list(burst.acknowledged)
        assert BURST // 3 <= len(acknowledged_b) < BURST, "the kill missed the burst"
        killed = job()
        assert killed is not None and killed.state == JobState.RUNNING, "the kill missed the job"
        assert_held(camera_a.acknowledged + acknowledged_b)

        # -- 2. mid-encoding (A): the job finished again, its results not yet committed ------
        node = start()
        _wait("A's job to finish (attempt 2)",
              lambda: (j := job()) is not None and j.state in JobState.FINISHED,
              STAGE_TIMEOUT, node, poll=0.01)
        kill("encoding")
        finished = job()
        assert finished is not None
        with database.transaction() as session:
            encoded = session.scalar(select(ResultSet.state)
                                     .where(ResultSet.job_id == finished.id))
            queued = session.scalar(select(func.count()).select_from(Delivery))
        assert encoded != ResultSetState.ENCODED and queued == 0, \
            "the kill missed the encoding"

        # -- 3. mid-delivery (A): the slow PACS holds some objects, the rest unanswered ----
        node = start()
        _wait("the PACS to store two objects", lambda: pacs.files() >= 2,
              STAGE_TIMEOUT, node, poll=0.05)
        kill("delivery")
        with database.transaction() as session:
            states = session.scalars(select(Delivery.state)).all()
        assert any(s != DeliveryState.SENT for s in states), "the kill missed the delivery"
        # The PACS stops sleeping: once the dead node's association is over, a fresh one.
        time.sleep(1.2)
        pacs.stop()
        pacs.sleep_after = 0
        pacs.start()

        # -- after the last restart: everything final within the bound -----------------------
        node = start()
        restarted = time.monotonic()
        resend = _Camera(node.port, "CAM2", files_b)  # the camera sends the whole study again
        resend.run()
        assert set(resend.acknowledged) == _uids(files_b)

        def final() -> bool:
            with database.transaction() as session:
                studies = session.execute(select(Study.state, Study.needs_reprocess)).all()
                delivered = results_delivered(session)
            # Final, and no late instances (B's resend) waiting to be looked at.
            return (len(studies) == 2 and all(s in _FINAL and not late for s, late in studies)
                    and delivered)
        _wait("both studies final and every delivery sent", final, FINAL_BOUND, node, poll=0.1)
        timings["final after the last restart"] = round(time.monotonic() - restarted, 1)
        time.sleep(1.0)  # a (wrong) second encoding or delivery would show now
        node.terminate()
        timings["total"] = round(time.monotonic() - began, 1)

        with database.transaction() as session:
            states_by_study = dict(session.execute(select(Study.study_uid, Study.state)).all())
            jobs = session.scalars(select(Job)).all()
            results = session.scalars(select(Result.sop_instance_uid)).all()
            runs = session.scalar(select(func.count()).select_from(ModelRun))
            instances = session.scalars(select(Instance.sop_instance_uid)).all()
        receptions = pacs.receptions()
    finally:
        for each in nodes:
            each.kill()
        database.dispose()
    print(f"crash matrix timings (s): {timings}")  # shown with -s
    assert states_by_study == {study_a: "done", study_b: "not-routed"}
    assert sorted(instances) == sorted(_uids(files_a) | _uids(files_b))
    assert len(jobs) == 1 and jobs[0].attempts == 2 and jobs[0].state == JobState.DONE
    assert runs == 4  # seg, slow-b, slow-c, total: once each, for the run that finished
    # One SEG and one overlay per image, one SR: recorded once each, all at the PACS.
    assert len(results) == 2 * 2 + 1 and len(set(results)) == len(results)
    assert set(receptions) == set(results), "the PACS holds other objects than the results"
    twice = {uid: n for uid, n in receptions.items() if n > 1}
    # At most the one C-STORE in flight at the kill arrived again (same UID), never more.
    assert len(twice) <= 1 and all(n == 2 for n in twice.values()), twice
