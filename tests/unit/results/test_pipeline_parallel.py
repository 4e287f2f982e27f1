"""The results pipeline's encoders: jobs of different studies are encoded at the same time,
jobs of one study one after another in job order, each job once; the running pipeline is
woken by the commit that finishes a job (no poll).

Runs on SQLite and PostgreSQL (`db_url`) with the tiny fixture models of test_pipeline.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from sqlalchemy import select

from dicomnode.db.engine import Database
from dicomnode.db.models import Delivery, Result, ResultSet
from dicomnode.results.pipeline import EncodeOutcome, ResultsPipeline
from dicomnode.settings import Settings
from tests.support.executor_fixtures import add_study, mark_late
from tests.unit.results.test_pipeline import _parts, env  # noqa: F401 (the fixture)

LONG_POLL = 300.0  # the pipeline must be woken, never wait for this


class _Recording(ResultsPipeline):
    """Records when each job's encoding ran; `gate` holds each encoding until released."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.spans: dict[int, tuple[float, float]] = {}
        self.started = threading.Semaphore(0)
        self.gate = threading.Event()

    def encode_job(self, job_id: int) -> EncodeOutcome:
        began = time.monotonic()
        self.started.release()
        self.gate.wait(30)
        try:
            return super().encode_job(job_id)
        finally:
            self.spans[job_id] = (began, time.monotonic())


def _wait_encoded(database: Database, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with database.transaction() as session:
            done = len(session.scalars(select(ResultSet.id)
                                       .where(ResultSet.state == "encoded")).all())
        if done >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"{count} job(s) not encoded within {timeout} s")


def _pipeline(settings: Settings, database: Database, encoders: int) -> _Recording:
    _, plain = _parts(settings, database)
    return _Recording(settings, database, plain.registry, plain.presets,
                      poll_seconds=LONG_POLL, encoders=encoders)


def test_two_studies_are_encoded_at_once_and_woken_by_the_finishing_commit(
    env: tuple[Settings, Database, Path],  # noqa: F811
) -> None:
    settings, database, storage = env
    service, _ = _parts(settings, database)
    pipeline = _pipeline(settings, database, encoders=2)
    pipeline.start()  # idle: its first pass found nothing; the next poll is LONG_POLL away
    try:
        for green in (200, 180):
            uid, _ = add_study(database, storage, [green, green])
            service.on_study_complete(uid)
            assert service.run_once() is not None
        # Both encodings start while neither may finish: only two encoders at once can.
        assert pipeline.started.acquire(timeout=30)
        assert pipeline.started.acquire(timeout=30), "the second study waited for the first"
        pipeline.gate.set()
        _wait_encoded(database, 2)
    finally:
        pipeline.gate.set()
        pipeline.stop()
    (a_start, a_end), (b_start, b_end) = pipeline.spans.values()
    assert a_start < b_end and b_start < a_end  # overlapped
    with database.transaction() as session:
        sent = list(session.scalars(select(Delivery.sop_instance_uid)))
        results = list(session.scalars(select(Result.sop_instance_uid)))
    assert len(sent) == len(set(sent)) == len(results) > 0


def test_jobs_of_one_study_are_encoded_in_order_and_reuse_what_did_not_change(
    env: tuple[Settings, Database, Path],  # noqa: F811
) -> None:
    settings, database, storage = env
    service, _ = _parts(settings, database)
    uid, _ = add_study(database, storage, [200, 180])
    service.on_study_complete(uid)
    first = service.run_once()
    mark_late(database, uid)
    [second] = service.plan_pending()
    assert service.run_once() == second and first is not None
    pipeline = _pipeline(settings, database, encoders=2)
    pipeline.gate.set()
    pipeline.start()
    try:
        _wait_encoded(database, 2)
    finally:
        pipeline.stop()
    assert pipeline.spans[first][1] <= pipeline.spans[second][0]  # one after the other
    with database.transaction() as session:
        second_kinds = sorted(session.scalars(select(Result.kind)
                                              .where(Result.job_id == second)))
    # The second job's SEGs equal the first's, so they are kept, not made and sent again:
    # only true if the first job's rows were committed before the second was encoded.
    assert "seg" not in second_kinds and "sr" in second_kinds
