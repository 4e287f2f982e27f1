"""Study completeness: rules, race-freedom, late instances, timers rebuilt from the database.

Every test runs on SQLite and on PostgreSQL (`db_url`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicomnode.assemble import completeness
from dicomnode.assemble.assembler import Assembler
from dicomnode.db import open_database
from dicomnode.db.engine import Database
from dicomnode.db.models import AuditEvent, Instance, Study, StudyState, as_utc
from dicomnode.errors import StudyNotFoundError
from dicomnode.receive.identifiers import Identifiers
from dicomnode.receive.ingest import Arrival, IngestResult, Outcome, record_arrival
from dicomnode.settings import CompletenessSettings

OP = "1.2.840.10008.5.1.4.1.1.77.1.5.1"


@pytest.fixture
def database(db_url: str) -> Iterator[Database]:
    database = open_database(db_url)
    yield database
    database.dispose()


def arrive(database: Database, study_uid: str, laterality: str | None = "R", *,
           quiet: float = 600, sop_uid: str | None = None) -> IngestResult:
    ids = Identifiers(
        study_uid=study_uid, series_uid=generate_uid(entropy_srcs=[study_uid]),
        sop_instance_uid=sop_uid or generate_uid(),
        sop_class_uid=OP, patient_id="P1", modality="OP", laterality=laterality,
    )
    arrival = Arrival(ids=ids, transfer_syntax_uid="1.2.840.10008.1.2.1", path="x.dcm",
                      size_bytes=1, calling_ae="CAM1", called_ae="DICOMNODE", peer="127.0.0.1")
    return record_arrival(database, arrival, quiet_seconds=quiet)


def study(database: Database, study_uid: str) -> Study:
    with database.transaction() as session:
        return session.execute(select(Study).where(Study.study_uid == study_uid)).scalar_one()


def test_both_eyes_complete_at_once_and_only_once(database: Database) -> None:
    uid = generate_uid()
    arrive(database, uid, "R")
    assert not completeness.complete_if_expected(database, uid, ["L", "R"])
    arrive(database, uid, "L")
    assert completeness.complete_if_expected(database, uid, ["L", "R"])
    assert not completeness.complete_if_expected(database, uid, ["L", "R"])
    row = study(database, uid)
    assert (row.state, row.completed_reason) == (StudyState.COMPLETE, "expected-content")
    assert row.announced_at is not None and row.quiet_until is None


def test_both_laterality_counts_for_each_eye(database: Database) -> None:
    uid = generate_uid()
    arrive(database, uid, "B")
    assert completeness.complete_if_expected(database, uid, ["L", "R"])


def test_no_expected_content_means_quiet_period_only(database: Database) -> None:
    uid = generate_uid()
    arrive(database, uid, "R")
    arrive(database, uid, "L")
    assert not completeness.complete_if_expected(database, uid, [])


def test_quiet_period(database: Database) -> None:
    waiting, quiet = generate_uid(), generate_uid()
    arrive(database, waiting, quiet=600)
    arrive(database, quiet, quiet=0)
    check = completeness.complete_if_quiet(database, waiting)
    assert not check.completed and check.recheck_at is not None
    assert completeness.due_studies(database) == [quiet]
    assert completeness.complete_if_quiet(database, quiet).completed
    assert study(database, quiet).completed_reason == "quiet-period"


def test_an_arrival_pushes_the_quiet_period_on(database: Database) -> None:
    uid = generate_uid()
    first = arrive(database, uid, quiet=0)
    second = arrive(database, uid, quiet=600)
    assert first.quiet_until is not None and second.quiet_until is not None
    assert second.quiet_until > first.quiet_until
    assert not completeness.complete_if_quiet(database, uid).completed


def test_force(database: Database) -> None:
    with pytest.raises(StudyNotFoundError):
        completeness.force_complete(database, "1.2.3.999")
    uid = generate_uid()
    arrive(database, uid)
    assert completeness.force_complete(database, uid, actor="cli:test")
    assert not completeness.force_complete(database, uid)
    row = study(database, uid)
    assert (row.state, row.completed_reason, row.announced_at) == ("complete", "forced", None)
    assert completeness.unannounced_studies(database) == [uid]
    assert completeness.claim_announcement(database, uid)
    assert not completeness.claim_announcement(database, uid)


def test_late_instance_is_recorded_and_flagged(database: Database) -> None:
    uid = generate_uid()
    arrive(database, uid, "R")
    completeness.force_complete(database, uid)
    result = arrive(database, uid, "L")
    assert result.outcome is Outcome.LATE
    row = study(database, uid)
    assert row.state == StudyState.COMPLETE and row.needs_reprocess
    with database.transaction() as session:
        late = session.scalars(select(Instance.late).where(Instance.study_id == row.id)).all()
        kinds = session.scalars(select(AuditEvent.kind).where(AuditEvent.study_uid == uid)).all()
    assert sorted(late) == [False, True]
    assert "late" in kinds


def test_duplicate_adds_no_row(database: Database) -> None:
    uid, sop = generate_uid(), generate_uid()
    assert arrive(database, uid, sop_uid=sop).outcome is Outcome.STORED
    assert arrive(database, uid, sop_uid=sop).outcome is Outcome.DUPLICATE
    with database.transaction() as session:
        assert len(session.scalars(select(Instance.id)).all()) == 1


def _race(threads: int, work: Callable[[], object]) -> list[object]:
    barrier = threading.Barrier(threads)
    results: list[object] = []
    lock = threading.Lock()

    def run() -> None:
        barrier.wait()
        value = work()
        with lock:
            results.append(value)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    return results


def test_completion_race_has_one_winner(database: Database) -> None:
    uid = generate_uid()
    arrive(database, uid, "R", quiet=0)
    arrive(database, uid, "L", quiet=0)
    # Different rules race each other, as the association end, the timer and the sweep can.
    rules = [
        lambda: completeness.complete_if_expected(database, uid, ["L", "R"]),
        lambda: completeness.complete_if_quiet(database, uid).completed,
    ]
    counter = iter(range(1000))
    results = _race(8, lambda: rules[next(counter) % 2]())
    assert results.count(True) == 1
    with database.transaction() as session:
        completions = session.scalars(
            select(AuditEvent.id).where(AuditEvent.study_uid == uid,
                                        AuditEvent.kind == "study-complete")
        ).all()
    assert len(completions) == 1


def test_concurrent_arrivals_all_land(database: Database) -> None:
    uid = generate_uid()
    results = _race(8, lambda: [arrive(database, uid).outcome for _ in range(10)])
    assert all(outcome is Outcome.STORED for batch in results for outcome in batch)  # type: ignore[attr-defined]
    with database.transaction() as session:
        assert len(session.scalars(select(Instance.id)).all()) == 80
        assert len(session.scalars(select(Study.id)).all()) == 1


def _wait(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_assembler_quiet_timer_runs_hooks_once(database: Database) -> None:
    seen: list[str] = []
    assembler = Assembler(database, CompletenessSettings(quiet_seconds=0.3, sweep_seconds=60),
                          [seen.append])
    assembler.start()
    try:
        uid = generate_uid()
        for _ in range(3):
            result = arrive(database, uid, "R", quiet=0.3)
            assert result.quiet_until is not None
            assembler.instance_stored(uid, result.quiet_until)
        assert _wait(lambda: seen == [uid])
        assembler.association_ended({uid})
        time.sleep(0.5)
        assert seen == [uid]
    finally:
        assembler.stop()


def test_association_end_completes_both_eyes(database: Database) -> None:
    seen: list[str] = []
    assembler = Assembler(database, CompletenessSettings(quiet_seconds=600, sweep_seconds=60),
                          [seen.append])
    assembler.start()
    try:
        uid = generate_uid()
        arrive(database, uid, "R")
        arrive(database, uid, "L")
        assembler.association_ended({uid})
        assert _wait(lambda: seen == [uid])
    finally:
        assembler.stop()


def test_timers_and_announcements_rebuilt_at_start(database: Database) -> None:
    overdue, forced, waiting = generate_uid(), generate_uid(), generate_uid()
    arrive(database, overdue, quiet=0)  # as if the node died during the quiet period
    arrive(database, forced)
    completeness.force_complete(database, forced)  # by the CLI, no node running
    arrive(database, waiting, quiet=600)
    seen: list[str] = []
    assembler = Assembler(database, CompletenessSettings(quiet_seconds=600, sweep_seconds=60),
                          [seen.append])
    assembler.start()
    try:
        assert _wait(lambda: sorted(seen) == sorted([overdue, forced]))
        assert study(database, waiting).state == StudyState.RECEIVING
    finally:
        assembler.stop()


def test_sweep_announces_a_study_forced_while_running(database: Database) -> None:
    seen: list[str] = []
    assembler = Assembler(database, CompletenessSettings(quiet_seconds=600, sweep_seconds=0.2),
                          [seen.append])
    assembler.start()
    try:
        uid = generate_uid()
        arrive(database, uid)
        completeness.force_complete(database, uid)
        assert _wait(lambda: seen == [uid])
        assert study(database, uid).announced_at is not None
    finally:
        assembler.stop()


def test_stop_while_jobs_run_does_not_deadlock(database: Database) -> None:
    # APScheduler 3 holds its job-store lock while shutdown(wait=True) joins the workers;
    # jobs that then call back into the scheduler used to hang the node's shutdown.
    seen: list[str] = []

    def slow_hook(study_uid: str) -> None:
        time.sleep(0.1)
        seen.append(study_uid)

    for _ in range(16):
        arrive(database, generate_uid(), quiet=0)
    assembler = Assembler(database, CompletenessSettings(quiet_seconds=0, sweep_seconds=60),
                          [slow_hook], workers=2)
    assembler.start()
    assert _wait(lambda: len(seen) >= 2)
    stopper = threading.Thread(target=assembler.stop)
    stopper.start()
    stopper.join(timeout=15)
    assert not stopper.is_alive(), "Assembler.stop() deadlocked"


def test_a_studys_own_quiet_period_counts_from_its_last_instance(database: Database) -> None:
    waiting, overdue = generate_uid(), generate_uid()
    arrive(database, waiting, quiet=600)  # the node's period is far off
    assert completeness.complete_if_quiet(database, waiting, quiet_seconds=0).completed
    arrive(database, overdue, quiet=0)  # the node's period is over, the study's own is not
    check = completeness.complete_if_quiet(database, overdue, quiet_seconds=600)
    assert not check.completed and check.recheck_at is not None
    last = study(database, overdue).last_instance_at
    assert abs((check.recheck_at - as_utc(last)).total_seconds() - 600) < 1e-3
    assert study(database, overdue).state == StudyState.RECEIVING
    # The sweep no longer finds it due (its rules are not asked again until then) ...
    quiet_until = study(database, overdue).quiet_until
    assert quiet_until is not None and as_utc(quiet_until) == check.recheck_at
    assert overdue not in completeness.due_studies(database)
    # ... until another instance comes: the receiver's quiet period counts again.
    arrive(database, overdue, quiet=0)
    assert overdue in completeness.due_studies(database)


def test_a_shorter_own_quiet_period_makes_the_sweep_find_the_study(database: Database) -> None:
    uid = generate_uid()
    arrive(database, uid, quiet=600)
    check = completeness.complete_if_quiet(database, uid, quiet_seconds=0.3)
    assert not check.completed  # looked at too early (e.g. at the association's end)
    time.sleep(0.4)
    assert uid in completeness.due_studies(database)  # not only after the node's 600 s


class _Rules:
    """Per-study completeness rules, as a preset's would be; `broken` studies raise."""

    def __init__(self, node: CompletenessSettings, own: dict[str, CompletenessSettings],
                 broken: set[str]) -> None:
        self.node, self.own, self.broken = node, own, broken

    def for_study(self, study_uid: str) -> CompletenessSettings:
        if study_uid in self.broken:
            raise RuntimeError("a bug in the rules")
        return self.own.get(study_uid, self.node)

    def shortest_quiet_seconds(self) -> float:
        return min([self.node.quiet_seconds, *(r.quiet_seconds for r in self.own.values())])


def test_assembler_completes_each_study_by_its_own_rules(database: Database) -> None:
    node = CompletenessSettings(quiet_seconds=600, expected_laterality=["L", "R"],
                                sweep_seconds=0.2)
    right_only, quick, as_node, broken = (generate_uid() for _ in range(4))
    rules = _Rules(node, {
        right_only: node.model_copy(update={"expected_laterality": ["R"]}),
        quick: node.model_copy(update={"quiet_seconds": 0.3, "expected_laterality": []}),
    }, {broken})
    seen: list[str] = []
    assembler = Assembler(database, node, [seen.append], rules=rules)
    assembler.start()
    try:
        for uid in (right_only, quick, as_node, broken):
            result = arrive(database, uid, "R", quiet=node.quiet_seconds)
            assert result.quiet_until is not None
            assembler.instance_stored(uid, result.quiet_until)
        assembler.association_ended({right_only, quick, as_node, broken})
        # the quick study's timer looks at the shortest period, not the node's 600 s
        assert _wait(lambda: sorted(seen) == sorted([right_only, quick]))
        time.sleep(1.0)  # several sweeps: the others wait for the node's rules
        assert sorted(seen) == sorted([right_only, quick])
        assert study(database, right_only).completed_reason == completeness.EXPECTED_CONTENT
        assert study(database, quick).completed_reason == completeness.QUIET_PERIOD
        arrive(database, broken, "L", quiet=node.quiet_seconds)
        assembler.association_ended({broken})  # falls back to the node's rules: both eyes
        assert _wait(lambda: broken in seen)
    finally:
        assembler.stop()
