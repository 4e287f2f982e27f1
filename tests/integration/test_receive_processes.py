"""Several receiving processes (`receive.processes: 2`) against real DCMTK senders, on SQLite
and PostgreSQL: every instance stored once and durable, studies completed by the main
process from what the workers report, a killed worker restarted while the other serves,
SIGTERM stopping them all."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select

from dicomnode.db.engine import Database
from dicomnode.db.models import AuditEvent, Instance, Study, StudyState
from tests.support.dicom_files import write_study
from tests.support.node import NODE_AE, NodeProcess, write_config
from tests.support.peers import require_tool
from tests.support.waiting import poll_until

pytestmark = pytest.mark.integration

_RECEIVING = {StudyState.RECEIVING}
_LOCKS = (".incoming", ".locks")  # the workers' per-instance lock files (not received data)


def _storescu(port: int, files: list[Path]) -> subprocess.Popen[str]:
    exe = require_tool("storescu", "dcmtk")
    return subprocess.Popen([exe, "-aet", "CAM1", "-aec", NODE_AE, "127.0.0.1", str(port),
                             *map(str, files)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _worker_pids(node: NodeProcess) -> list[int]:
    found = re.search(r"2 receiving processes started \(pids (\d+), (\d+)\)", node.log())
    assert found, node.log()
    return [int(found.group(1)), int(found.group(2))]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _send_all(port: int, batches: list[list[Path]]) -> None:
    senders = [_storescu(port, files) for files in batches]
    outputs = [sender.communicate(timeout=180)[0] for sender in senders]
    assert [s.returncode for s in senders] == [0] * len(senders), outputs


def _check_stored_once(database: Database, storage: Path, sent: list[Path]) -> None:
    """One row and one file per sent instance, the bytes as sent, nothing else left."""
    with database.transaction() as session:
        rows = dict(session.execute(select(Instance.sop_instance_uid, Instance.path)).all())
        arrived = session.scalar(select(func.count()).select_from(AuditEvent)
                                 .where(AuditEvent.kind == "arrived"))
    uids = {str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID): path
            for path in sent}
    assert set(rows) == set(uids)
    assert arrived == len(uids)  # each stored once: no duplicate arrivals
    on_disk = {p.relative_to(storage).as_posix() for p in storage.rglob("*")
               if p.is_file() and p.relative_to(storage).parts[0] != ".nodes"
               and p.relative_to(storage).parts[:2] != _LOCKS}
    assert on_disk == set(rows.values())  # no temporary or stray files
    for uid, path in uids.items():
        held = pydicom.dcmread(storage / rows[uid])
        assert held.PixelData == pydicom.dcmread(path).PixelData


def test_two_receiving_processes_store_every_instance_once(db_url: str, tmp_path: Path
                                                           ) -> None:
    # Quiet period far away: each study completes because its sender's association ended
    # in a worker and the main process's assembler heard of it.
    config = write_config(tmp_path, db_url, receive={"processes": 2},
                          completeness={"quiet_seconds": 120})
    studies = [write_study(tmp_path / f"s{i}", size=256, patient_id=f"P{i:03d}")
               for i in range(8)]
    sent = [path for _uid, files in studies for path in files]
    with NodeProcess(config) as node:
        pids = _worker_pids(node)
        _send_all(node.port, [files for _uid, files in studies])
        database = Database(db_url)
        try:
            def completed() -> bool:
                with database.transaction() as session:
                    states = dict(session.execute(select(Study.study_uid, Study.state)).all())
                return (set(states) == {uid for uid, _ in studies}
                        and not set(states.values()) & _RECEIVING)

            assert poll_until(completed, 30), node.log()[-4000:]
            _check_stored_once(database, node.storage, sent)
        finally:
            database.dispose()
        assert node.terminate(timeout=60) == 0
        log = node.log()
    assert all(not _alive(pid) for pid in pids)
    served = {int(n) for n in re.findall(r"\[receive (\d)\] association from CAM1", log)}
    assert served and served <= {0, 1}
    assert "Traceback" not in log and " ERROR " not in log


def test_a_killed_worker_is_restarted_and_sigterm_stops_all(db_url: str, tmp_path: Path
                                                             ) -> None:
    config = write_config(tmp_path, db_url, receive={"processes": 2})
    first = write_study(tmp_path / "first", size=128, patient_id="P1")[1]
    second = [write_study(tmp_path / f"second{i}", size=128, patient_id=f"Q{i}")[1]
              for i in range(4)]
    with NodeProcess(config) as node:
        pids = _worker_pids(node)
        _send_all(node.port, [first])
        os.kill(pids[0], signal.SIGKILL)
        # The other worker serves meanwhile: senders succeed at once, before any restart.
        _send_all(node.port, second)
        assert poll_until(lambda: "receiving process 0 serving again" in node.log(), 60), \
            node.log()[-4000:]
        log = node.log()
        assert re.search(r"receiving process 0 \(pid \d+\) ended with exit code -9", log)
        restarted = int(re.findall(r"receiving process 0 serving again \(pid (\d+)\)", log)[-1])
        assert restarted not in pids
        database = Database(db_url)
        try:
            _check_stored_once(database, node.storage,
                               [*first, *(p for files in second for p in files)])
        finally:
            database.dispose()
        assert node.terminate(timeout=60) == 0
        log = node.log()
    assert not _alive(restarted) and not _alive(pids[1])
    assert "received SIGTERM" in log and "dicomnode stopped" in log
    assert "Traceback" not in log


def test_workers_stop_when_the_main_process_is_killed_and_a_restart_serves(
    db_url: str, tmp_path: Path
) -> None:
    """kill -9 of the node's main process mid-burst: its workers finish the stores they are
    in, stop by themselves, and the restarted node listens on the same port; every row has
    its file, nothing half-written is left."""
    config = write_config(tmp_path, db_url, receive={"processes": 2},
                          node={"shutdown_grace_seconds": 1})
    files = [p for i in range(10)
             for p in write_study(tmp_path / f"s{i}", size=400, patient_id=f"P{i}")[1]]
    node = NodeProcess(config).start()
    pids = _worker_pids(node)
    senders = [_storescu(node.port, files[i::2]) for i in range(2)]
    database = Database(db_url)
    try:
        def some_arrived() -> bool:
            with database.transaction() as session:
                return bool(session.scalar(select(func.count()).select_from(Instance)))

        assert poll_until(some_arrived, 60)
        node.kill()
        assert poll_until(lambda: not any(_alive(pid) for pid in pids), 30), node.log()[-3000:]
        for sender in senders:
            sender.wait(timeout=60)
        with NodeProcess(config) as restarted:
            _send_all(restarted.port, [files[:2]])  # serving again on the same port
            restarted_pids = _worker_pids(restarted)
        assert not any(_alive(pid) for pid in restarted_pids)
        with database.transaction() as session:
            rows = set(session.scalars(select(Instance.path)))
        on_disk = {p.relative_to(node.storage).as_posix() for p in node.storage.rglob("*")
                   if p.is_file() and p.relative_to(node.storage).parts[0] != ".nodes"
                   and p.relative_to(node.storage).parts[:2] != _LOCKS}
        assert rows and rows == on_disk
    finally:
        for sender in senders:
            sender.kill()
        database.dispose()
