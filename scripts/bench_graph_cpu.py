#!/usr/bin/env python3
"""CPU time of the executor for one preset's graph, against the same graph with versions pinned.

The question it answers: what does a graph change cost or save, measured in CPU seconds (which
a loaded machine disturbs far less than wall time). Both graphs run the demo study's two
synthetic 1024 px eyes (R and L) through the real executor with the shipped registry; the runs
alternate (A, B, A, B, ...) after one warm-up each, so sessions are created and the load drifts
evenly. CPU time is the process's (all threads: ONNX Runtime's pools included).

  .venv/bin/python scripts/bench_graph_cpu.py --preset diabetic-screening \\
      --pin dr-grade@1.1.0 --pin dme-risk@1.1.0 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dicomnode.graph import Selection, resolve  # noqa: E402
from dicomnode.inference.executor import GraphExecutor  # noqa: E402
from dicomnode.inference.preprocess import SourceImage  # noqa: E402
from dicomnode.inference.sessions import SessionPool  # noqa: E402
from dicomnode.registry import load_registry  # noqa: E402
from dicomnode.routing.loader import load_presets  # noqa: E402
from dicomnode.settings import load_settings  # noqa: E402
from dicomnode.synthetic import synthetic_fundus  # noqa: E402

SIDES: tuple[Literal["R", "L"], ...] = ("R", "L")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="diabetic-screening")
    parser.add_argument("--pin", action="append", default=[], metavar="MODEL@VERSION",
                        help="graph B: this model at this version (repeatable)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args(argv)

    registry = load_registry(REPO / "model_registry")
    preset = load_presets(REPO / "presets", registry=registry, destinations=None).get(args.preset)
    pins = {ref.partition("@")[0]: ref for ref in args.pin}
    graphs = {}
    for label, models in (("latest", list(preset.models)),
                          ("pinned", [pins.get(m.partition("@")[0], m) for m in preset.models])):
        graph = resolve(Selection.of(models, modality="OP", preset=preset.id), registry)
        graphs[label] = graph
        print(f"{label}: " + ", ".join(f"{m}@{v}" for m, v in sorted(graph.models.items())),
              flush=True)
    config = load_settings().inference  # the node's defaults (config/dicomnode.yaml), on CPU
    executor = GraphExecutor(
        registry, SessionPool.for_settings(config.model_copy(
            update={"providers": ["CPUExecutionProvider"]})),
        max_batch=config.max_batch, model_threads=config.model_threads,
        batch_bytes=config.batch_bytes, chunk_bytes=config.chunk_bytes)
    images = [SourceImage(f"2.25.{i + 1}", synthetic_fundus(args.size, side, seed=i))
              for i, side in enumerate(SIDES)]
    times: dict[str, dict[str, list[float]]] = {k: {"cpu": [], "wall": []} for k in graphs}
    for repeat in range(args.repeats + 1):
        for label, graph in graphs.items():
            cpu, wall = time.process_time(), time.perf_counter()
            result = executor.run(graph, images)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            if result.outcome != "done":
                raise SystemExit(f"{label}: {result.outcome} {result.problems()}")
            if repeat:  # the first round creates the sessions
                times[label]["cpu"].append(cpu)
                times[label]["wall"].append(wall)
    report: dict[str, Any] = {
        label: {k: {"median": round(statistics.median(v), 3), "min": round(min(v), 3),
                    "max": round(max(v), 3)} for k, v in t.items()}
        for label, t in times.items()
    }
    report["cpu_ratio_latest_over_pinned"] = round(
        statistics.median(times["latest"]["cpu"]) / statistics.median(times["pinned"]["cpu"]), 3)
    report["load_average"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
