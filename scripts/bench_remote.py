"""Remote inference cost: the same graph, same images, in-process vs an Open Inference
Protocol server (Seldon MLServer, started on loopback, serving the same ONNX files with ONNX
Runtime on CPU) through the real executor. Prints seconds per image for both, the ratio and the
latency each image gains (JSON tensors over HTTP, plus the server's own overhead).

    python scripts/bench_remote.py                                  # shipped disc chain
    python scripts/bench_remote.py --models vessel-seg --images 8 --repeats 3
Needs MLServer in .mlserver-venv/ (or $DICOMNODE_MLSERVER); see docs/remote-inference.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dicomnode.graph import Selection, resolve  # noqa: E402
from dicomnode.inference.executor import GraphExecutor  # noqa: E402
from dicomnode.inference.preprocess import SourceImage  # noqa: E402
from dicomnode.inference.remote import RemoteClient  # noqa: E402
from dicomnode.inference.sessions import SessionPool  # noqa: E402
from dicomnode.registry import load_registry  # noqa: E402
from dicomnode.settings import RemoteInferenceSettings  # noqa: E402
from dicomnode.synthetic import synthetic_fundus  # noqa: E402
from tests.support.mlserver import mlserver  # noqa: E402


def _best(executor: GraphExecutor, graph: object, images: list[SourceImage], repeats: int
          ) -> float:
    executor.run(graph, images)  # type: ignore[arg-type]  # warm: sessions, connections
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = executor.run(graph, images)  # type: ignore[arg-type]
        times.append(time.perf_counter() - start)
        assert result.outcome == "done", result.problems()
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", type=Path, default=ROOT / "model_registry")
    parser.add_argument("--models", nargs="+", default=["optic-disc", "disc-metrics"])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=512, help="synthetic image side (px)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    registry = load_registry(args.registry)
    graph = resolve(Selection.of(args.models, modality="OP"), registry)
    images = [SourceImage(f"1.2.826.0.1.3680043.10.99.{i}",
                          synthetic_fundus(args.size, "RL"[i % 2], seed=i))  # type: ignore[arg-type]
              for i in range(args.images)]
    local = GraphExecutor(registry, SessionPool(["CPUExecutionProvider"]))
    local_s = _best(local, graph, images, args.repeats)
    with tempfile.TemporaryDirectory() as folder, mlserver(
            [registry.get(m) for m in graph.models], Path(folder)) as url:
        client = RemoteClient(RemoteInferenceSettings(url=url, timeout_seconds=120))
        remote = GraphExecutor(registry, SessionPool(
            ["CPUExecutionProvider"], remote=client, backend_for=lambda _m: "remote"))
        remote_s = _best(remote, graph, images, args.repeats)
    n = len(images)
    load = os.getloadavg()
    print(f"models: {', '.join(graph.order)}; {n} images of {args.size} px; best of "
          f"{args.repeats}; load average {load[0]:.2f} / {load[1]:.2f}, {os.cpu_count()} CPUs")
    print(f"in-process: {local_s / n * 1000:8.1f} ms/image  ({n / local_s:6.1f} images/s)")
    print(f"remote    : {remote_s / n * 1000:8.1f} ms/image  ({n / remote_s:6.1f} images/s)")
    print(f"ratio remote/in-process: {remote_s / local_s:.2f}; added latency "
          f"{(remote_s - local_s) / n * 1000:.1f} ms/image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
