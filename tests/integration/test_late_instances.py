"""Late images make one re-run once they stop coming, not one per image.

A real `dicomnode serve` (quiet period 3 s): storescu sends both eyes (complete at the end of
the association, processed), then two late images of the same study over two associations
1 s apart. The study is re-run once, after the quiet period that follows the second (before,
the first late image was re-run at once and the second made another).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from dicomnode.db.engine import Database
from dicomnode.db.models import Job, Study
from dicomnode.synthetic import demo_study
from tests.support.node import NODE_AE, NodeProcess, classifier_node_config
from tests.support.peers import require_tool

pytestmark = pytest.mark.integration

QUIET = 3.0
DEADLINE = 60.0


def _jobs(database: Database) -> list[tuple[str, str]]:
    with database.transaction() as session:
        return [(j.reason, j.state) for j in session.scalars(select(Job).order_by(Job.id))]


def _wait(database: Database, want: list[tuple[str, str]], node: NodeProcess) -> None:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if _jobs(database) == want:
            return
        time.sleep(0.2)
    pytest.fail(f"jobs {_jobs(database)}, wanted {want}; log:\n{node.log()[-4000:]}")


def test_two_late_images_make_one_rerun_after_the_quiet_period(tmp_path: Path) -> None:
    storescu = require_tool("storescu", "dcmtk")
    config, db_url = classifier_node_config(
        tmp_path, {"screening": {"routing": {"modality": "OP"}}},
        completeness={"quiet_seconds": QUIET, "sweep_seconds": 0.5,
                      "expected_laterality": ["L", "R"]},
        inference={"providers": ["CPUExecutionProvider"], "poll_seconds": 0.2})
    study = demo_study(tmp_path / "study", size=128, seed=1)
    uid = str(dcmread(study[0]).StudyInstanceUID)
    # Two more images of the same study (new SOP instances): a camera re-sending after a retake.
    late = [demo_study(tmp_path / f"late{i}", size=128, seed=2 + i, study_uid=uid)[0]
            for i in range(2)]
    database = Database(db_url)

    def send(paths: list[Path]) -> None:
        subprocess.run([storescu, "-aet", "CAM1", "-aec", NODE_AE, "127.0.0.1", str(node.port),
                        *map(str, paths)], check=True, capture_output=True, timeout=60)

    try:
        with NodeProcess(config) as node:
            send(study)
            _wait(database, [("complete", "done")], node)
            send(late[:1])
            time.sleep(1.0)  # inside the quiet period: the first late image waits
            assert _jobs(database) == [("complete", "done")]
            send(late[1:])
            last_late = time.monotonic()
            _wait(database, [("complete", "done"), ("late-instances", "done")], node)
            assert time.monotonic() - last_late >= QUIET - 0.5  # it waited for the quiet
            time.sleep(1.0)  # no third job follows
            assert _jobs(database) == [("complete", "done"), ("late-instances", "done")]
            with database.transaction() as session:
                row = session.scalars(select(Study).where(Study.study_uid == uid)).one()
                assert not row.needs_reprocess
    finally:
        database.dispose()
