"""scripts/bench_ingest.py in --quick mode against real DCMTK storescu/storescp and a real node
(SQLite and PostgreSQL): it finishes and reports every receiver and every ratio.

A smoke test of the benchmark, not a timed test: no figure is compared with an aim here.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.databases import postgres_database
from tests.support.peers import require_tool

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_ingest.py"
DATABASES = ("sqlite", "postgres")
# One and two receiving processes (receive.processes): "dicomnode sqlite", "... sqlite p2".
NODES = (*DATABASES, *(f"{db} p2" for db in DATABASES))
REFERENCES = ("storescp", "storescp --fork", "storescp --ignore")
NUMBER = r"(\d+\.\d+)"


def test_quick_bench_reports_every_receiver_and_ratio(tmp_path: Path) -> None:
    storescu = require_tool("storescu", "dcmtk")
    storescp = require_tool("storescp", "dcmtk")
    with postgres_database():
        pass  # reachable (else skipped here, failed in CI); the bench makes its own database
    # Four senders only: the aims are set for them, and each node start costs seconds.
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--senders", "4", "--seed", "7",
         "--databases", ",".join(DATABASES), "--processes", "1,2",
         "--workdir", str(tmp_path),
         "--storescu", storescu, "--storescp", storescp],
        capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert "seed 7" in out and "repetition 1 order: " in out

    for receiver in (*(f"dicomnode {node}" for node in NODES), *REFERENCES):
        row = re.search(rf"^\s+4  {re.escape(receiver)}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}"
                        rf"\s+\d+\s+{NUMBER}\s+(\d+)$", out, re.MULTILINE)
        assert row is not None, f"no table row for {receiver}:\n{out}"
        low, median, high, cpu_ms, rss = (float(value) for value in row.groups())
        assert 0 < low <= median <= high
        assert rss > 0  # the receiver's VmHWM was read
        if receiver.startswith("dicomnode"):
            assert cpu_ms > 0  # a Python node cannot take four images in under one tick

    for db in NODES:
        for reference in REFERENCES:
            row = re.search(rf"^ratio {db}\s+4  dicomnode / {re.escape(reference)}\s+"
                            rf"{NUMBER}x\s+{NUMBER}-{NUMBER}\s+>=\d\.\dx\s+(yes|no)$",
                            out, re.MULTILINE)
            assert row is not None, f"no ratio row for {db} / {reference}:\n{out}"
            assert float(row.group(1)) > 0
    # The burst, the stored files and the per-run databases are gone with the work folder.
    assert list(tmp_path.iterdir()) == []
