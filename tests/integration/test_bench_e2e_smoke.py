"""scripts/bench_e2e.py runs end to end (fixture models, a batch of 2) and prints its figures:
the split of the demo study, the aim, studies per minute and the node's memory."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.peers import require_tool

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_bench_e2e_quick_run_prints_the_split_throughput_and_memory() -> None:
    require_tool("storescu", "dcmtk")
    require_tool("Orthanc", "orthanc")
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_e2e.py"), "--fixture-models",
         "--batch", "2", "--size", "256"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    [row] = [line for line in out.splitlines() if line.strip().startswith("fixture ")]
    values = [float(v) for v in re.findall(r"(-?\d+\.\d+)s", row)]
    assert len(values) == 7 and all(v >= 0 for v in values[:5]), row  # five parts, total, overhead
    # Each figure is printed rounded to 0.01 s, so the five parts and the total can each be off
    # by 0.005 s: their sum may miss the total by up to 0.03 s without any part being lost.
    assert abs(sum(values[:5]) - values[5]) <= 0.03 + 1e-9, row
    assert re.search(r"batch of 2 studies .* = \d+\.\d studies/min", out), out
    assert re.search(r"node RSS over the batch \(\d+ samples\): first \d+ MB, last \d+ MB, "
                     r"max \d+ MB", out), out
    assert "aim (total <= inference + 1 s)" in out
