"""A preset's `completeness` decides when the studies it takes are complete, not the node's.

A real `dicomnode serve` whose own rules would hold every study for 300 s (both eyes expected,
300 s quiet period) and three presets routed by calling AE title: `right-eye` expects the
right eye only, `quick` has a 1 s quiet period and no expected eyes, `as-node` sets nothing.
storescu sends one right-eye image per study: the first two studies complete in seconds, each
for its preset's reason; the third keeps receiving under the node's rules.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from dicomnode.db.engine import Database
from dicomnode.db.models import Study
from dicomnode.synthetic import demo_study
from tests.support.node import NODE_AE, NodeProcess, classifier_node_config
from tests.support.peers import require_tool

pytestmark = pytest.mark.integration

NODE_WAIT = 300.0
DEADLINE = 30.0  # far below NODE_WAIT: only a preset's rule can complete a study in time


def _state(database: Database, study_uid: str) -> tuple[str, str | None] | None:
    with database.transaction() as session:
        study = session.scalar(select(Study).where(Study.study_uid == study_uid))
        return None if study is None else (study.state, study.completed_reason)


def test_each_study_completes_by_its_presets_rule(tmp_path: Path) -> None:
    storescu = require_tool("storescu", "dcmtk")
    config, db_url = classifier_node_config(tmp_path, {
        "right-eye": {"routing": {"calling_ae": "CAM1"},
                      "completeness": {"expected_laterality": ["R"]}},
        "quick": {"routing": {"calling_ae": "CAM2"},
                  "completeness": {"quiet_seconds": 1, "expected_laterality": []}},
        "as-node": {"routing": {"calling_ae": "CAM3"}},
    }, completeness={"quiet_seconds": NODE_WAIT, "sweep_seconds": 0.5,
                     "expected_laterality": ["L", "R"]},
        inference={"providers": ["CPUExecutionProvider"]})
    studies: dict[str, tuple[Path, str]] = {}
    for caller in ("CAM1", "CAM2", "CAM3"):
        right_eye = demo_study(tmp_path / caller, size=128, seed=len(studies))[0]
        assert dcmread(right_eye).ImageLaterality == "R"
        studies[caller] = (right_eye, str(dcmread(right_eye).StudyInstanceUID))
    database = Database(db_url)
    try:
        with NodeProcess(config) as node:
            for caller, (path, _) in studies.items():
                subprocess.run([storescu, "-aet", caller, "-aec", NODE_AE, "127.0.0.1",
                                str(node.port), str(path)],
                               check=True, capture_output=True, timeout=60)
            # completed for the preset's reason (then planned and processed: the state moves on)
            expected = {"CAM1": "expected-content", "CAM2": "quiet-period"}
            deadline = time.monotonic() + DEADLINE
            while time.monotonic() < deadline:
                seen = {c: _state(database, uid) for c, (_, uid) in studies.items()}
                if all(seen[c] is not None and seen[c][1] == want  # type: ignore[index]
                       for c, want in expected.items()):
                    break
                time.sleep(0.2)
            else:
                pytest.fail(f"studies {seen}, wanted {expected}; log:\n{node.log()[-4000:]}")
            time.sleep(2.0)  # well past `quick`'s quiet period and several sweeps
            assert _state(database, studies["CAM3"][1]) == ("receiving", None)
    finally:
        database.dispose()
