"""The node as a process: concurrency, crash and restart, clean shutdown, the study commands."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
from sqlalchemy import func, select

from dicomnode import cli
from dicomnode.db.engine import Database
from dicomnode.db.models import Instance, Study, StudyState
from tests.support.dicom_files import write_op, write_study
from tests.support.node import NODE_AE, NodeProcess, write_config
from tests.support.peers import require_tool
from tests.support.waiting import poll_until

pytestmark = pytest.mark.integration


def _storescu_cmd(port: int, files: list[Path], calling: str = "CAM1") -> list[str]:
    exe = require_tool("storescu", "dcmtk")
    return [exe, "-aet", calling, "-aec", NODE_AE, "127.0.0.1", str(port), *map(str, files)]


# A completed study moves on at once to processing (routed, or recorded not-routed): for the
# receiving stage, any of these states means "completed".
_COMPLETED = {StudyState.COMPLETE, StudyState.PROCESSING, StudyState.DONE, StudyState.PARTIAL,
              StudyState.FAILED, StudyState.NOT_ROUTED}


def _all_completed(states: dict[str, str], uids: Iterable[str]) -> bool:
    return set(states) == set(uids) and all(state in _COMPLETED for state in states.values())


def _states(database: Database) -> dict[str, str]:
    with database.transaction() as session:
        return dict(session.execute(select(Study.study_uid, Study.state)).all())


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicomnode.cli", *args, "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )


def test_twenty_concurrent_senders_every_instance_lands_every_study_completes(
    db_url: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path, db_url, completeness={"quiet_seconds": 30})
    studies = {
        uid: files
        for uid, files in (
            write_study(tmp_path / f"s{i:02d}", patient_id=f"P{i:04d}") for i in range(20)
        )
    }
    with NodeProcess(config) as node:
        senders = [
            subprocess.Popen(_storescu_cmd(node.port, files), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
            for files in studies.values()
        ]
        outputs = [sender.communicate(timeout=120)[0] for sender in senders]
        assert [s.returncode for s in senders] == [0] * 20, outputs
        database = Database(db_url)
        try:
            # Both eyes arrived: each completes at the end of its association, not after 30 s.
            assert poll_until(
                lambda: _all_completed(_states(database), studies), 20
            ), _states(database)
            with database.transaction() as session:
                assert session.scalar(select(func.count()).select_from(Instance)) == 40
        finally:
            database.dispose()
        for uid, files in studies.items():
            for sent in files:
                stored = list((node.storage / uid).rglob("*.dcm"))
                assert len(stored) == 2, (uid, sent)


def test_kill_9_during_quiet_period_then_restart_completes(db_url: str, tmp_path: Path) -> None:
    config = write_config(tmp_path, db_url, completeness={"quiet_seconds": 2})
    uid, files = write_study(tmp_path / "study", lateralities="R")  # one eye: waits quietly
    node = NodeProcess(config).start()
    try:
        subprocess.run(_storescu_cmd(node.port, files), check=True, capture_output=True,
                       timeout=60)
    finally:
        node.kill()
    database = Database(db_url)
    try:
        assert _states(database) == {uid: StudyState.RECEIVING}
        # The restarted node rebuilds the timer from the database (nothing else re-sends).
        with NodeProcess(config) as restarted:
            assert poll_until(lambda: _all_completed(_states(database), [uid]), 15), \
                restarted.log()
        with database.transaction() as session:
            study = session.execute(select(Study)).scalar_one()
        assert study.completed_reason == "quiet-period" and study.announced_at is not None
    finally:
        database.dispose()


def test_sigterm_shuts_down_cleanly(db_url: str, tmp_path: Path) -> None:
    config = write_config(tmp_path, db_url)
    _uid, files = write_study(tmp_path / "study")
    node = NodeProcess(config).start()
    subprocess.run(_storescu_cmd(node.port, files), check=True, capture_output=True, timeout=60)
    # An idle connection (a port probe) must not hold shutdown for the 60 s network timeout.
    with socket.create_connection(("127.0.0.1", node.port)):
        time.sleep(0.3)
        started = time.monotonic()
        assert node.terminate(timeout=30) == 0
        assert time.monotonic() - started < 10
    log = node.log()
    assert "listening on 127.0.0.1:" in log
    assert "callers is empty" in log  # warned: any caller accepted
    assert "received SIGTERM" in log and "dicomnode stopped" in log
    assert "Traceback" not in log
    assert "TEST0001" not in log  # no patient data in the ordinary log


def _cli_here(capsys: pytest.CaptureFixture[str], config: Path, *args: str
              ) -> tuple[int, str, str]:
    """The same command in this process (cheaper than a new interpreter)."""
    code = cli.main([*args, "--config", str(config)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_study_commands(db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # No job workers: their sweep would re-plan the late instance below before it is checked.
    config = write_config(tmp_path, db_url, completeness={"quiet_seconds": 600},
                          inference={"workers": 0})
    uid, files = write_study(tmp_path / "study", lateralities="R")
    with NodeProcess(config) as node:
        subprocess.run(_storescu_cmd(node.port, files), check=True, capture_output=True,
                       timeout=60)
        listed = _cli(config, "studies", "--json")
        assert listed.returncode == 0, listed.stderr
        rows = json.loads(listed.stdout)
        assert [row["study_uid"] for row in rows] == [uid]
        row = rows[0]
        assert set(row) == {"study_uid", "patient_id", "study_date", "station_name",
                            "calling_ae", "instances", "modalities", "preset", "state",
                            "created_at", "updated_at", "completed_at", "completed_reason",
                            "needs_reprocess", "delivery"}
        assert row["delivery"] is None  # no job yet: nothing to deliver
        assert (row["patient_id"], row["calling_ae"], row["instances"], row["modalities"],
                row["state"], row["completed_at"]) == ("TEST0001", "CAM1", 1, ["OP"],
                                                       "receiving", None)
        code, out, _err = _cli_here(capsys, config, "studies")
        assert code == 0 and uid in out and "receiving" in out

        code, _out, err = _cli_here(capsys, config, "study", "complete", "1.2.3.4.5")
        assert code == 2
        assert "no study with Study Instance UID 1.2.3.4.5" in err

        forced = _cli(config, "study", "complete", uid)
        assert forced.returncode == 0, forced.stderr
        database = Database(db_url)
        try:
            def announced() -> bool:  # the running node's sweep picked the forced study up
                with database.transaction() as session:
                    study = session.execute(select(Study)).scalar_one()
                return study.state in _COMPLETED and study.announced_at is not None

            assert poll_until(announced, 10), node.log()
        finally:
            database.dispose()
        # An instance after completion is stored, flagged late, the study marked for re-run.
        late = write_op(tmp_path / "late.dcm", laterality="L", study_uid=uid)
        subprocess.run(_storescu_cmd(node.port, [late]), check=True, capture_output=True,
                       timeout=60)
        database = Database(db_url)
        try:
            with database.transaction() as session:
                study = session.execute(select(Study)).scalar_one()
                flags = sorted(session.scalars(select(Instance.late)))
            assert study.state in _COMPLETED and study.needs_reprocess
            assert flags == [False, True]
        finally:
            database.dispose()
        code, out, _err = _cli_here(capsys, config, "study", "complete", uid)
        assert code == 0 and "already complete" in out
        code, out, _err = _cli_here(capsys, config, "studies", "--json")
        rows = json.loads(out)
        assert rows[0]["state"] in _COMPLETED and rows[0]["completed_at"] is not None
        assert rows[0]["instances"] == 2


def test_sigterm_during_a_burst_leaves_files_and_rows_consistent(
    db_url: str, tmp_path: Path
) -> None:
    # No grace: open associations are aborted at once, stores inside the handler finish.
    config = write_config(tmp_path, db_url, node={"shutdown_grace_seconds": 0})
    files = [
        path
        for i in range(12)
        for path in write_study(tmp_path / f"s{i}", size=600, patient_id=f"P{i}")[1]
    ]
    node = NodeProcess(config).start()
    sender = subprocess.Popen(_storescu_cmd(node.port, files), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    database = Database(db_url)
    try:
        def some_arrived() -> bool:
            with database.transaction() as session:
                return bool(session.scalar(select(func.count()).select_from(Instance)))

        assert poll_until(some_arrived, 30)
        assert node.terminate(timeout=30) == 0
        sender.wait(timeout=30)
        with database.transaction() as session:
            rows = set(session.scalars(select(Instance.path)))
        # (.nodes holds the node's identity, dicomnode/identity.py: not received data.)
        on_disk = {p.relative_to(node.storage).as_posix()
                   for p in node.storage.rglob("*")
                   if p.is_file() and p.relative_to(node.storage).parts[0] != ".nodes"}
        assert rows and rows == on_disk  # every row has its file; no stray or temp files
        # (pynetdicom itself logs the aborted transfer; dicomnode must log no error.)
        assert " ERROR dicomnode" not in node.log()
    finally:
        sender.kill()
        database.dispose()
