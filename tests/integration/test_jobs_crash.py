"""Crash recovery with real processes: `kill -9` a worker during a job, start another; the job
completes once (one set of model runs, one output folder, one completion in the audit trail).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import func, select

from dicomnode.db import open_database
from dicomnode.db.engine import Database
from dicomnode.db.models import AuditEvent, Job, ModelRun, Study
from tests.support.executor_fixtures import add_study, write_diamond, write_preset
from tests.support.node import write_config


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "dicomnode.cli", *args],
            stdout=handle, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def _wait(condition: Callable[[], bool], timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; log:\n{log.read_text()[-4000:]}")


def _job(database: Database) -> Job | None:
    with database.transaction() as session:
        return session.scalars(select(Job)).one_or_none()


# `worker` runs the processing service alone; `serve` is the whole node (listener, assembler,
# processing), which is what a hospital runs.
@pytest.mark.parametrize("command", ["worker", "serve"])
def test_kill_9_during_a_job_then_restart_completes_once(
    command: str, db_url: str, tmp_path: Path
) -> None:
    write_diamond(tmp_path / "registry", slow_repeats=240)  # seconds per job, even on a fast VM
    write_preset(tmp_path / "presets", "screening", ["total"])
    config = write_config(
        tmp_path, db_url,
        registry={"path": str(tmp_path / "registry")},
        presets={"path": str(tmp_path / "presets")},
        inference={"workers": 1, "lease_seconds": 3, "poll_seconds": 0.2,
                   "providers": ["CPUExecutionProvider"]},
    )
    database = open_database(db_url)
    log = tmp_path / "workers.log"
    try:
        study_uid, _ = add_study(database, tmp_path / "storage", [200] * 6)
        first = _start([command, "--config", str(config)], log)
        try:
            _wait(lambda: (job := _job(database)) is not None and job.state == "running",
                  60, "the first worker to claim the job", log)
            time.sleep(0.5)  # inside the graph now
            first.send_signal(signal.SIGKILL)
            first.wait(10)
        finally:
            if first.poll() is None:
                first.kill()
        job = _job(database)
        assert job is not None and job.state == "running" and job.attempts == 1
        dead_worker = job.claimed_by

        second = _start([command, "--config", str(config)], log)
        try:
            _wait(lambda: (j := _job(database)) is not None and j.state == "done",
                  120, "the second worker to finish the job", log)
            time.sleep(1.0)  # give a (wrong) second completion the chance to happen
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(30) == 0
        job = _job(database)
        assert job is not None
        # The restarted process holds the same identity and took its job back itself.
        assert job.attempts == 2 and job.claimed_by == dead_worker
        with database.transaction() as session:
            runs = session.scalar(select(func.count()).select_from(ModelRun))
            completions = session.scalar(
                select(func.count()).select_from(AuditEvent)
                .where(AuditEvent.kind.like("job-%"), AuditEvent.kind != "job-queued")
            )
            state = session.scalars(select(Study.state).where(Study.study_uid == study_uid)).one()
        assert runs == 4  # seg, slow-b, slow-c, total: once each
        assert completions == 1 and state == "done"
        folders = sorted(p.name for p in (tmp_path / "storage" / "jobs").iterdir())
        assert folders == [str(job.id)]
    finally:
        database.dispose()


def test_a_restart_takes_its_job_back_at_once_and_attempts_are_bounded(
    tmp_path: Path
) -> None:
    """The default 300 s lease: a restarted node must not wait for it. A job that dies with
    its worker `inference.max_job_attempts` times is failed with that reason."""
    db_url = f"sqlite:///{tmp_path / 'node.db'}"
    write_diamond(tmp_path / "registry", slow_repeats=240)
    write_preset(tmp_path / "presets", "screening", ["total"])
    config = write_config(
        tmp_path, db_url,
        registry={"path": str(tmp_path / "registry")},
        presets={"path": str(tmp_path / "presets")},
        inference={"workers": 1, "lease_seconds": 300, "poll_seconds": 0.2,
                   "max_job_attempts": 2, "providers": ["CPUExecutionProvider"]},
    )
    database = open_database(db_url)
    log = tmp_path / "node.log"
    try:
        study_uid, _ = add_study(database, tmp_path / "storage", [200] * 6)
        for attempt in (1, 2):
            node = _start(["serve", "--config", str(config)], log)
            try:
                # 40 s, well inside the 300 s lease: taken back at start, not when it lapses.
                _wait(lambda a=attempt: (j := _job(database)) is not None  # type: ignore[misc]
                      and j.state == "running" and j.attempts == a,
                      40, f"attempt {attempt} running", log)
                time.sleep(0.3)
                node.send_signal(signal.SIGKILL)
                node.wait(10)
            finally:
                if node.poll() is None:
                    node.kill()
        node = _start(["serve", "--config", str(config)], log)
        try:
            _wait(lambda: (j := _job(database)) is not None and j.state == "failed",
                  40, "the job to be failed after two attempts", log)
        finally:
            node.send_signal(signal.SIGTERM)
            assert node.wait(30) == 0
        job = _job(database)
        assert job is not None and job.attempts == 2 and job.outcome_json is not None
        assert "max_job_attempts is 2" in job.outcome_json
        with database.transaction() as session:
            state = session.scalars(select(Study.state).where(Study.study_uid == study_uid)).one()
            runs = session.scalar(select(func.count()).select_from(ModelRun))
        assert state == "failed" and runs == 0
    finally:
        database.dispose()
