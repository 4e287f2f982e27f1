"""Temporary files left by a killed writer are swept at start; live writers' are not."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from dicomnode.durable import STALE_TEMPORARY_SECONDS, sweep_temporaries
from tests.support.node import NodeProcess, write_config

pytestmark = pytest.mark.integration


def _tmp(folder: Path, name: str, *, age: float) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(b"half an image")
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def test_only_stale_temporaries_are_swept(tmp_path: Path) -> None:
    study = tmp_path / "1.2.3" / "1.2.3.4"
    stale = _tmp(study, ".1.2.3.4.5.dcm.4242.abcdef.tmp", age=STALE_TEMPORARY_SECONDS + 5)
    fresh = _tmp(study, ".1.2.3.4.6.dcm.4243.abcdef.tmp", age=1)
    kept = _tmp(study, "1.2.3.4.7.dcm", age=3600)  # a stored instance, however old
    assert sweep_temporaries(tmp_path) == 1
    assert not stale.exists() and fresh.exists() and kept.exists()


def test_a_starting_node_sweeps_what_a_killed_one_left(tmp_path: Path) -> None:
    config = write_config(tmp_path, f"sqlite:///{tmp_path / 'node.db'}")
    storage = tmp_path / "storage"
    stale = _tmp(storage / "1.2.3" / "1.2.3.4", ".x.dcm.1.ab.tmp",
                 age=STALE_TEMPORARY_SECONDS * 2)
    with NodeProcess(config) as node:
        deadline = time.monotonic() + 10
        while stale.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        log = node.log()
    assert not stale.exists(), log
    assert "removed 1 temporary file(s)" in log
