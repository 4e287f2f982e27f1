"""Retention against a real SQLite database and real files, with a test clock (no sleeping):
only eligible studies go, disk pressure takes the oldest first, and a purge cut off half-way
leaves no row pointing at a missing file."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from dicomnode.cli import main
from dicomnode.db import open_database
from dicomnode.db.engine import Database
from dicomnode.db.models import (
    AuditEvent,
    Delivery,
    Instance,
    Job,
    Result,
    ResultSet,
    Study,
)
from dicomnode.receive import ingest, storage
from dicomnode.receive.identifiers import Identifiers
from dicomnode.retention import Purger
from dicomnode.settings import (
    DatabaseSettings,
    RetentionSettings,
    Settings,
    StorageSettings,
)

NOW = datetime(2027, 6, 1, 12, 0, tzinfo=UTC)
OP = "1.2.840.10008.5.1.4.1.1.77.1.5.1"


@dataclass
class Env:
    root: Path
    database: Database

    def settings(self, **retention: object) -> Settings:
        return Settings(storage=StorageSettings(path=self.root, min_free_mb=0),
                        database=DatabaseSettings(url="sqlite://"),
                        retention=RetentionSettings.model_validate(retention))


@pytest.fixture
def env(tmp_path: Path, db_url: str) -> Iterator[Env]:
    """SQLite and PostgreSQL (the conftest's `db_url`)."""
    database = open_database(db_url)
    try:
        yield Env(tmp_path / "storage", database)
    finally:
        database.dispose()


def _study(env: Env, *, state: str, days_ago: float, delivery: str | None = "sent",
           size: int = 1000, reprocess: bool = False) -> str:
    """A study of two instances with files; for done/partial a job with a SEG result in an
    outbox row in state `delivery` (None: a preset without destinations)."""
    study_uid, series_uid = generate_uid(), generate_uid()
    for _ in range(2):
        sop = generate_uid()
        relative = storage.relative_path(study_uid, series_uid, sop)
        (env.root / relative).parent.mkdir(parents=True, exist_ok=True)
        (env.root / relative).write_bytes(b"\0" * size)
        ingest.record_arrival(env.database, ingest.Arrival(
            ids=Identifiers(study_uid, series_uid, sop, OP, "P1", "OP", "R"),
            transfer_syntax_uid="1.2.840.10008.1.2.1", path=relative.as_posix(),
            size_bytes=size, calling_ae="CAM1", called_ae="NODE", peer="127.0.0.1"),
            quiet_seconds=5)
    when = NOW - timedelta(days=days_ago)
    with env.database.transaction() as session:
        study = session.scalars(select(Study).where(Study.study_uid == study_uid)).one()
        study.state, study.last_instance_at, study.needs_reprocess = state, when, reprocess
        if state in ("done", "partial", "failed"):
            job = Job(study_id=study.id, study_uid=study_uid, graph_json="{}",
                      state="failed" if state == "failed" else "done", reason="complete",
                      attempts=1)
            session.add(job)
            session.flush()
            job.output_path = f"jobs/{job.id}"
            (env.root / job.output_path).mkdir(parents=True)
            (env.root / job.output_path / "mask.npy").write_bytes(b"mask")
            if state != "failed":
                folder = f"results/{job.id}/1"
                (env.root / folder).mkdir(parents=True)
                (env.root / folder / "seg.dcm").write_bytes(b"seg")
                session.add(ResultSet(job_id=job.id, study_uid=study_uid, state="encoded",
                                      attempts=1, folder=folder))
                result_uid = generate_uid()
                session.add(Result(job_id=job.id, study_uid=study_uid, kind="seg",
                                   sop_instance_uid=result_uid, sop_class_uid=OP,
                                   series_instance_uid=generate_uid(),
                                   path=f"{folder}/seg.dcm"))
                if delivery is not None:
                    session.add(Delivery(path=f"{folder}/seg.dcm", sop_instance_uid=result_uid,
                                         sop_class_uid=OP, study_uid=study_uid,
                                         destination="pacs", state=delivery, attempts=1))
    return study_uid


def _files(env: Env, study_uid: str) -> list[Path]:
    folder = env.root / study_uid
    return sorted(folder.rglob("*.dcm")) if folder.exists() else []


def _purged(env: Env) -> set[str]:
    with env.database.transaction() as session:
        return set(session.scalars(select(Study.study_uid).where(Study.purged_at.is_not(None))))


def _no_row_points_at_a_missing_file(env: Env) -> None:
    with env.database.transaction() as session:
        live = list(session.scalars(select(Instance.path).where(Instance.purged_at.is_(None))))
        results = list(session.scalars(select(Result.path).where(Result.purged_at.is_(None))))
    missing = [p for p in live + results if not (env.root / p).exists()]
    assert missing == []


def test_only_eligible_studies_are_purged(env: Env) -> None:
    delivered = _study(env, state="done", days_ago=40)
    sending = _study(env, state="done", days_ago=40, delivery="pending")
    receiving = _study(env, state="receiving", days_ago=40, delivery=None)
    processing = _study(env, state="processing", days_ago=40, delivery=None)
    not_routed = _study(env, state="not-routed", days_ago=40, delivery=None)
    young = _study(env, state="done", days_ago=5)
    late = _study(env, state="done", days_ago=40, reprocess=True)
    no_destination = _study(env, state="partial", days_ago=40, delivery=None)
    failed_delivery = _study(env, state="done", days_ago=40, delivery="failed")
    failed_job = _study(env, state="failed", days_ago=100, delivery=None)
    settings = env.settings(received_days=30, keep_failed_days=90)

    planned = Purger(settings, env.database, clock=lambda: NOW).plan()
    assert _purged(env) == set()  # a dry run changes nothing
    expected = {delivered, not_routed, no_destination, failed_job}
    assert {c.study_uid for c in planned} == expected

    report = Purger(settings, env.database, clock=lambda: NOW).run()
    assert {c.study_uid for c in report.purged} == expected
    assert _purged(env) == expected
    for uid in expected:
        assert _files(env, uid) == []
        assert not (env.root / uid).exists()  # empty folders went too
    for uid in (sending, receiving, processing, young, late, failed_delivery):
        assert len(_files(env, uid)) == 2
    _no_row_points_at_a_missing_file(env)
    with env.database.transaction() as session:
        # The rows stay: the study existed, what was received, what was sent.
        assert session.scalar(select(Study.state).where(Study.study_uid == delivered)) == "done"
        kept = session.execute(select(Instance.sop_instance_uid, Instance.purged_at)
                               .join(Study).where(Study.study_uid == delivered)).all()
        assert len(kept) == 2 and all(p is not None for _, p in kept)
        assert session.scalar(select(Delivery.state).where(
            Delivery.study_uid == delivered)) == "sent"
        audited = set(session.scalars(select(AuditEvent.study_uid).where(
            AuditEvent.kind == "purged")))
        # Job outputs went with the received files; results stay (results_days unset).
        job_folders = list(session.scalars(select(Job.output_path).where(
            Job.study_uid == delivered)))
    assert audited == expected
    assert job_folders and all(f and not (env.root / f).exists() for f in job_folders)
    assert (env.root / "results").exists()
    # A second run finds nothing more.
    assert Purger(settings, env.database, clock=lambda: NOW).run().purged == []


def test_results_go_after_results_days(env: Env) -> None:
    uid = _study(env, state="done", days_ago=400)
    settings = env.settings(received_days=30, results_days=365)
    report = Purger(settings, env.database, clock=lambda: NOW).run()
    assert sorted(c.kind for c in report.purged) == ["received", "results"]
    with env.database.transaction() as session:
        path = session.scalar(select(Result.path).where(Result.study_uid == uid))
        assert session.scalar(select(Result.purged_at).where(Result.study_uid == uid))
    assert path is not None and not (env.root / path).exists()
    _no_row_points_at_a_missing_file(env)


def test_disk_pressure_takes_the_oldest_finished_studies_first(env: Env) -> None:
    mb = 1024 * 1024
    oldest = _study(env, state="done", days_ago=3, size=mb)
    middle = _study(env, state="not-routed", days_ago=2, size=mb, delivery=None)
    newest = _study(env, state="done", days_ago=1, size=mb)
    busy = _study(env, state="done", days_ago=9, size=mb, delivery="sending")
    capacity = 10 * mb

    def free(_root: Path) -> float:  # a 10 MB volume holding exactly our files
        used = sum(p.stat().st_size for p in env.root.rglob("*") if p.is_file())
        return (capacity - used) / mb

    settings = env.settings(min_free_mb=5)  # 8 MB of images: 2 MB free; 4 MB must go
    assert free(env.root) < 5
    plan = Purger(settings, env.database, clock=lambda: NOW, free_space=free).plan()
    assert [c.study_uid for c in plan] == [oldest, middle]
    report = Purger(settings, env.database, clock=lambda: NOW, free_space=free).run()
    assert [c.study_uid for c in report.purged] == [oldest, middle]
    assert all(c.reason == "disk-pressure" for c in report.purged)
    assert free(env.root) >= 5
    assert len(_files(env, newest)) == 2 and len(_files(env, busy)) == 2


class _Crash(BaseException):
    """Stands in for SIGKILL: nothing after it runs (not caught as an Exception)."""


def test_a_purge_cut_off_half_way_leaves_no_row_at_a_missing_file(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    uid = _study(env, state="done", days_ago=40)
    settings = env.settings(received_days=30)
    deleted: list[Path] = []
    real_unlink = Path.unlink

    def unlink_then_die(self: Path, missing_ok: bool = False) -> None:
        real_unlink(self, missing_ok=missing_ok)
        deleted.append(self)
        raise _Crash  # killed right after the first file went

    monkeypatch.setattr(Path, "unlink", unlink_then_die)
    with pytest.raises(_Crash):
        Purger(settings, env.database, clock=lambda: NOW).run()
    monkeypatch.setattr(Path, "unlink", real_unlink)
    assert len(deleted) == 1 and len(_files(env, uid)) == 1  # one file gone, one left
    _no_row_points_at_a_missing_file(env)
    with env.database.transaction() as session:
        study = session.scalars(select(Study).where(Study.study_uid == uid)).one()
        assert study.purged_at is not None and study.purge_finished_at is None
    # The next run (after a restart) finishes it.
    report = Purger(settings, env.database, clock=lambda: NOW).run()
    assert report.finished_earlier == 1 and report.purged == []
    assert _files(env, uid) == []
    with env.database.transaction() as session:
        assert session.scalar(select(Study.purge_finished_at).where(
            Study.study_uid == uid)) is not None


def test_a_study_that_changed_since_the_plan_is_left_alone(env: Env) -> None:
    uid = _study(env, state="done", days_ago=40)
    purger = Purger(env.settings(received_days=30), env.database, clock=lambda: NOW)
    plan = purger.plan()
    with env.database.transaction() as session:  # late instances arrived meanwhile
        session.execute(update(Study).where(Study.study_uid == uid)
                        .values(needs_reprocess=True))
    assert [c.study_uid for c in plan] == [uid]
    assert purger._purge(plan[0]) is False
    assert len(_files(env, uid)) == 2


def test_purge_command_dry_run_lists_and_changes_nothing(
    env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uid = _study(env, state="done", days_ago=400)  # before the real today too (the CLI's clock)
    config = tmp_path / "dicomnode.yaml"
    config.write_text(json.dumps({
        "storage": {"path": str(env.root), "min_free_mb": 0},
        "database": {"url": str(env.database.engine.url.render_as_string(
            hide_password=False))},
        "retention": {"received_days": 30}}), "utf-8")
    assert main(["purge", "--dry-run", "--json", "--config", str(config)]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["study_uid"] for r in listed["would_purge"]] == [uid]
    assert len(_files(env, uid)) == 2 and _purged(env) == set()
    assert main(["purge", "--config", str(config)]) == 0
    assert "1 purge(s) purged" in capsys.readouterr().out
    assert _files(env, uid) == [] and _purged(env) == {uid}


def test_an_instance_arriving_after_a_purge_is_kept_until_its_study_is_finished_again(
    env: Env
) -> None:
    uid = _study(env, state="done", days_ago=40)
    settings = env.settings(received_days=30)
    assert [c.study_uid for c in Purger(settings, env.database, clock=lambda: NOW).run()
            .purged] == [uid]
    with env.database.transaction() as session:
        series = session.scalar(select(Instance.path).join(Study)
                                .where(Study.study_uid == uid))
    assert series is not None
    sop = generate_uid()
    relative = storage.relative_path(uid, series.split("/")[1], sop)
    (env.root / relative).parent.mkdir(parents=True, exist_ok=True)
    (env.root / relative).write_bytes(b"late")
    late = ingest.record_arrival(env.database, ingest.Arrival(
        ids=Identifiers(uid, series.split("/")[1], sop, OP, "P1", "OP", "L"),
        transfer_syntax_uid="1.2.840.10008.1.2.1", path=relative.as_posix(), size_bytes=4,
        calling_ae="CAM1", called_ae="NODE", peer="127.0.0.1"), quiet_seconds=5)
    assert late.outcome is ingest.Outcome.LATE
    # Waiting for re-processing: kept, however old the study.
    assert Purger(settings, env.database, clock=lambda: NOW).run().purged == []
    assert (env.root / relative).exists()
    _no_row_points_at_a_missing_file(env)
    with env.database.transaction() as session:  # re-processed and delivered
        session.execute(update(Study).where(Study.study_uid == uid)
                        .values(needs_reprocess=False))
    report = Purger(settings, env.database, clock=lambda: NOW).run()
    assert [(c.study_uid, c.files) for c in report.purged] == [(uid, 1)]
    assert not (env.root / relative).exists()
    _no_row_points_at_a_missing_file(env)
