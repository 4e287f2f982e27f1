"""scripts/bench_inference.py runs end to end on the tiny fixture registry: a ratio per model
and a peak-memory row from its subprocess (figures themselves are not asserted: timings are
the benchmark's business, not a test's)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from dicomnode.registry import load_registry
from tests.support.onnx_models import write_example_registry

ROOT = Path(__file__).resolve().parents[2]
ROW = re.compile(r"^(\S+@\S+)\s+\d+\s+\S+\s+\d+\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$")


def test_bench_inference_prints_a_ratio_per_model(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_inference.py"), "--fixtures",
         "--images", "2", "--size", "96", "--memory-sizes", "2", "--memory-size", "96",
         "--providers", "CPUExecutionProvider"],
        capture_output=True, text=True, timeout=300, check=False, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {m.group(1): m.groups()[1:] for m in map(ROW.match, run.stdout.splitlines()) if m}
    expected = {e.key for e in load_registry(write_example_registry(tmp_path).root)
                .latest_entries()}
    assert set(rows) == expected, run.stdout
    for raw, executor, ratio in rows.values():
        assert float(raw) > 0 and float(executor) > 0
        assert abs(float(ratio) - float(executor) / float(raw)) < 0.01 + 0.01 * float(ratio)
    memory = re.search(r"^\s+2\s+(\d+)\s+[\d.]+\s+[\d.]+$", run.stdout, re.MULTILINE)
    assert memory is not None and int(memory.group(1)) > 0, run.stdout
