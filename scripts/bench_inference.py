"""Inference throughput and memory: the executor against bare ONNX Runtime, every model.

Throughput, for each model (latest version) of a registry, on N decoded synthetic fundus
images of --size pixels (decoding the DICOM files is outside both sides):
- executor: `GraphExecutor.run` on the model's graph (the model plus what it requires, as a
  job runs it): field of view, pre-processing, batching, inference, gates, classification;
- raw: a bare `session.run` loop over the SAME tensors (made by the same functions, in the
  executor's batches), on the SAME session objects with the same options, summed over the
  graph's models: the inference work the executor did, and nothing else.
Sessions are created and warmed up (one run at the executor's batch size) before either side
is timed; a graph slower than --seconds an image gets fewer images (at least 2), a light one is
timed best of 3, raw right after the executor. Prints img/s both ways and executor / raw.
Pre-processing a large source image is the executor's own work and is in its time: for light
models (a few ms of inference an image) it dominates, so their ratio says how much.

Memory: a job's peak RSS (VmHWM), whole job path (read and decode the stored DICOM files in
chunks, run the graph, write the outputs), one fresh subprocess per study size.

    python scripts/bench_inference.py          # shipped registry: 3.5 min at load 11-17
    python scripts/bench_inference.py --models fundus-quality optic-disc
    python scripts/bench_inference.py --memory-models vessel-seg --memory-sizes 2 8 16 32
    python scripts/bench_inference.py --fixtures --images 2 --size 128 --memory-sizes 2 \
        --memory-size 128
    python scripts/bench_inference.py --models dr-grade dme-risk --together --intra-op 1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dicomnode.db import open_database  # noqa: E402
from dicomnode.db.engine import Database  # noqa: E402
from dicomnode.db.models import Instance, Series, Study, StudyState, utcnow  # noqa: E402
from dicomnode.graph import Selection, resolve  # noqa: E402
from dicomnode.graph.model import ResolvedGraph  # noqa: E402
from dicomnode.inference.executor import GraphExecutor, GraphResult  # noqa: E402
from dicomnode.inference.postprocess import binary_mask  # noqa: E402
from dicomnode.inference.preprocess import SourceImage, prepare_batch  # noqa: E402
from dicomnode.inference.sessions import SessionPool  # noqa: E402
from dicomnode.jobs import ProcessingService, queue  # noqa: E402
from dicomnode.jobs.planning import Plan  # noqa: E402
from dicomnode.receive.storage import relative_path  # noqa: E402
from dicomnode.registry import Registry, load_registry  # noqa: E402
from dicomnode.registry.manifest import MaskOutput, TensorInput  # noqa: E402
from dicomnode.routing.loader import PresetSet  # noqa: E402
from dicomnode.settings import Settings  # noqa: E402
from dicomnode.synthetic import op_dataset, synthetic_fundus  # noqa: E402

logger = logging.getLogger("bench_inference")

Feeds = dict[str, NDArray[Any]]


def base_images(count: int, size: int) -> list[NDArray[np.uint8]]:
    """`count` distinct fundus pictures from two generated ones (generating a large synthetic
    fundus takes seconds): mirrored and shifted copies, each eye's content different."""
    made = min(size, 1024)  # larger ones are enlarged: the memory runs need size, not detail
    bases = [synthetic_fundus(made, "R", 0), synthetic_fundus(made, "L", 1)]
    if made != size:
        bases = [np.asarray(Image.fromarray(b).resize((size, size), Image.Resampling.BILINEAR))
                 for b in bases]
    out = []
    for index in range(count):
        rgb = bases[index % 2]
        variant = index // 2
        if variant % 2:
            rgb = rgb[::-1]
        out.append(np.ascontiguousarray(np.roll(rgb, variant * 3, axis=1)))
    return out


def graph_for(registry: Registry, key: str, modality: str) -> ResolvedGraph:
    return resolve(Selection.of([key], modality=modality), registry)


# -- throughput ----------------------------------------------------------------------------


def model_feeds(executor: GraphExecutor, graph: ResolvedGraph, model_id: str,
                images: list[SourceImage], result: GraphResult) -> list[Feeds]:
    """The executor's batches of inputs for `model_id`, rebuilt with the executor's own
    functions (prepare_batch for images, the upstream's raw outputs otherwise)."""
    mine = result.models[model_id]
    entry = executor.registry.get(model_id, graph.models[model_id])
    by_uid = {i.sop_instance_uid: i for i in images}
    ran = [by_uid[u] for u in mine.run_images]
    batch = max(1, mine.batch_size)
    batches = []
    for start in range(0, len(ran), batch):
        chunk = ran[start:start + batch]
        feeds: Feeds = {}
        for spec in entry.manifest.inputs:
            if isinstance(spec, TensorInput):
                feeds[spec.name] = prepare_batch(chunk, spec)[0]
                continue
            source, _, output = graph.inputs[model_id][spec.name].partition(".")
            values = [result.models[source].raw[output][i.sop_instance_uid] for i in chunk]
            stacked: NDArray[Any] = np.stack(values).astype(np.float32)
            if spec.binarise:
                mask = executor.registry.get(source, graph.models[source]).manifest.output(
                    output)
                assert isinstance(mask, MaskOutput)
                stacked = binary_mask(stacked, mask)
            feeds[spec.name] = stacked.astype(spec.dtype)
        if len(chunk) < batch and entry.manifest.tensor_inputs and isinstance(
                entry.manifest.tensor_inputs[0].batch, int):
            feeds = {k: np.concatenate([v, np.zeros((batch - len(chunk), *v.shape[1:]),
                                                    v.dtype)]) for k, v in feeds.items()}
        batches.append(feeds)
    return batches


def warm_up(executor: GraphExecutor, graph: ResolvedGraph, images: list[SourceImage],
            warmed: set[str]) -> None:
    """Create each session of the graph and run it once at the executor's batch size, so
    neither side's timing includes loading a model or growing ONNX Runtime's arena."""
    result = None
    for model_id in graph.order:
        key = f"{model_id}@{graph.models[model_id]}"
        if key in warmed:
            continue
        if result is None:  # one image through the graph gives every model's input shapes
            result = executor.run(graph, images[:1])
        entry = executor.registry.get(model_id, graph.models[model_id])
        loaded = executor.sessions.get(entry)
        batch, _ = executor._batch_size(entry.manifest, loaded, len(images))
        feeds = model_feeds(executor, graph, model_id, images[:1], result)
        if feeds:
            loaded.session.run(None, {k: np.concatenate([v] * batch) if v.shape[0] == 1
                                      and batch > 1 else v for k, v in feeds[0].items()})
        warmed.add(key)


def raw_seconds_per_image(executor: GraphExecutor, graph: ResolvedGraph, model_id: str,
                          images: list[SourceImage], result: GraphResult,
                          repeats: int) -> float:
    batches = model_feeds(executor, graph, model_id, images, result)
    ran = len(result.models[model_id].run_images)
    if not ran:
        return 0.0
    session = executor.sessions.get(
        executor.registry.get(model_id, graph.models[model_id])).session
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for feeds in batches:
            session.run(None, feeds)
        best = min(best, time.perf_counter() - start)
    return best / ran


def fresh(images: list[NDArray[np.uint8]]) -> list[SourceImage]:
    """New SourceImages: nothing (field of view, PIL copy) carried over from a previous run."""
    return [SourceImage(f"bench.{i}", rgb, "R" if i % 2 == 0 else "L", modality="OP")
            for i, rgb in enumerate(images)]


def throughput(args: argparse.Namespace, registry: Registry) -> None:
    sessions = SessionPool(args.providers, intra_op_threads=args.intra_op,
                           spin_wait=args.spin_wait)
    executor = GraphExecutor(registry, sessions, max_batch=args.batch,
                             model_threads=args.model_threads)
    pixels = base_images(args.images, args.size)
    print(f"throughput: {args.images} images of {args.size}x{args.size}, max_batch "
          f"{args.batch}, batch_bytes {executor.batch_bytes >> 20} MiB, chunk_bytes "
          f"{executor.chunk_bytes >> 20} MiB, intra_op "
          f"{args.intra_op or 'default'}, spin_wait {args.spin_wait}, providers requested "
          f"{args.providers}")
    print(f"{'model':<24} {'graph':>5} {'provider':<22} {'images':>6} {'raw img/s':>10} "
          f"{'executor img/s':>15} {'ratio':>6}")
    warmed: set[str] = set()
    runs: list[tuple[str, ResolvedGraph, str]] = []  # (label, graph, model whose provider)
    for entry in registry.latest_entries():
        if args.models and entry.id not in args.models:
            continue
        runs.append((entry.key, graph_for(registry, entry.key, entry.manifest.modalities[0]),
                     entry.id))
    if args.together and runs:
        # One graph of all the models: a stage with several models runs them at once.
        together = resolve(Selection.of([label for label, _, _ in runs], modality="OP"),
                           registry)
        runs.append(("(all together)", together, runs[0][2]))
    for label, graph, provider_of in runs:
        warm_up(executor, graph, fresh(pixels), warmed)
        start = time.perf_counter()
        executor.run(graph, fresh(pixels[:1]))
        one = time.perf_counter() - start
        # Heavy graphs (seconds an image) get fewer images, so the whole run stays short;
        # light ones are repeated (best of 3), as the machine's load comes and goes.
        count = max(2, min(args.images, int(args.seconds / one)))
        repeats = args.repeats if one > 1.0 else max(args.repeats, 3)
        best, result = float("inf"), None
        for _ in range(repeats):
            images = fresh(pixels[:count])
            start = time.perf_counter()
            result = executor.run(graph, images)
            best = min(best, time.perf_counter() - start)
        assert result is not None
        if result.outcome != "done":
            raise SystemExit(f"{label}: the graph ended {result.outcome}: "
                             f"{result.problems()}")
        raw = 0.0
        for model_id in graph.order:  # measured right after the executor, on its tensors
            # A gated image costs a dependant nothing: scale by the share it ran on.
            share = len(result.models[model_id].run_images) / len(images)
            raw += share * raw_seconds_per_image(executor, graph, model_id, images, result,
                                                 repeats)
        raw_rate, exec_rate = 1.0 / raw, len(images) / best
        provider = result.models[provider_of].provider or "?"
        print(f"{label:<24} {len(graph.models):>5} {provider:<22} {count:>6} {raw_rate:>10.2f} "
              f"{exec_rate:>15.2f} {exec_rate / raw_rate:>6.2f}", flush=True)


# -- memory --------------------------------------------------------------------------------


def write_study_files(storage: Path, pixels: list[NDArray[np.uint8]]) -> list[dict[str, str]]:
    study_uid, series_uid = generate_uid(), generate_uid()
    files = []
    for index, rgb in enumerate(pixels):
        laterality: Literal["L", "R"] = "R" if index % 2 == 0 else "L"
        ds = op_dataset(rgb, laterality=laterality, study_uid=study_uid,
                        series_uid=series_uid, instance_number=index + 1)
        rel = relative_path(study_uid, series_uid, str(ds.SOPInstanceUID))
        (storage / rel).parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(storage / rel, enforce_file_format=True)
        files.append({"uid": str(ds.SOPInstanceUID), "sop_class": str(ds.SOPClassUID),
                      "syntax": str(ds.file_meta.TransferSyntaxUID), "laterality": laterality,
                      "path": rel.as_posix(), "study": study_uid, "series": series_uid})
    return files


def register_study(database: Database, storage: Path, files: list[dict[str, str]]) -> str:
    now = utcnow()
    study_uid = files[0]["study"]
    with database.transaction() as session:
        study = Study(study_uid=study_uid, state=StudyState.COMPLETE, created_at=now,
                      updated_at=now, last_instance_at=now, needs_reprocess=False)
        session.add(study)
        session.flush()
        series = Series(study_id=study.id, series_uid=files[0]["series"], modality="OP",
                        created_at=now)
        session.add(series)
        session.flush()
        for item in files:
            session.add(Instance(
                study_id=study.id, series_id=series.id, sop_instance_uid=item["uid"],
                sop_class_uid=item["sop_class"], transfer_syntax_uid=item["syntax"],
                modality="OP", laterality=item["laterality"], path=item["path"],
                size_bytes=(storage / item["path"]).stat().st_size, received_at=now,
                late=False))
    return study_uid


def memory_child(spec_path: Path) -> int:
    """One job in this (fresh) process; prints its figures as JSON."""
    spec = json.loads(spec_path.read_text())
    work, storage = Path(spec["work"]), Path(spec["storage"])
    registry = load_registry(Path(spec["registry"]))
    settings = Settings.model_validate({
        "storage": {"path": storage},
        "database": {"url": f"sqlite:///{work / 'memory.db'}"},
        "inference": {"workers": 0, "providers": spec["providers"]},
    })
    database = open_database(settings.database.url)
    service = ProcessingService(settings, database, registry, PresetSet(),
                                sessions=SessionPool(spec["providers"]))
    study_uid = register_study(database, storage, spec["files"])
    graph = resolve(Selection.of(spec["models"], modality="OP"), registry)
    job_id = queue.enqueue(database, Plan(study_uid, None, graph, "benchmark"), queue.COMPLETE)
    start = time.perf_counter()
    ran = service.run_once()
    seconds = time.perf_counter() - start
    state = queue.job_detail(database, job_id)["state"] if job_id is not None else "?"
    status = Path("/proc/self/status").read_text()
    peak = next(int(line.split()[1]) for line in status.splitlines()
                if line.startswith("VmHWM:"))
    print(json.dumps({"images": len(spec["files"]), "ran": ran == job_id, "state": state,
                      "seconds": seconds, "peak_kib": peak}))
    database.dispose()
    return 0


def memory(args: argparse.Namespace, registry_root: Path, work: Path) -> None:
    registry = load_registry(registry_root)
    models = args.memory_models or [m for m in ("fundus-quality", "optic-disc", "disc-metrics")
                                    if registry.has(m)] or [
        registry.latest_entries()[0].id]
    storage = work / "memory-storage"
    storage.mkdir()
    sizes = sorted(args.memory_sizes)
    files = write_study_files(storage, base_images(max(sizes), args.memory_size))
    print(f"\nmemory: one job per fresh process, graph {'+'.join(models)}, "
          f"{args.memory_size}x{args.memory_size} RGB images "
          f"({args.memory_size ** 2 * 3 / 1e6:.0f} MB decoded each), default settings")
    print(f"{'images':>6} {'peak RSS MB':>12} {'job s':>7} {'img/s':>6}")
    for count in sizes:
        child_work = work / f"memory-{count}"
        child_work.mkdir()
        spec = child_work / "spec.json"
        spec.write_text(json.dumps({
            "work": str(child_work), "storage": str(storage), "registry": str(registry_root),
            "providers": args.providers, "models": models, "files": files[:count]}))
        run = subprocess.run([sys.executable, __file__, "--memory-child", str(spec)],
                             capture_output=True, text=True, check=False)
        if run.returncode != 0:
            raise SystemExit(f"memory run for {count} images failed:\n{run.stderr[-2000:]}")
        figures = json.loads(run.stdout.strip().splitlines()[-1])
        if figures["state"] != "done":
            raise SystemExit(f"memory run for {count} images: job ended {figures['state']}")
        print(f"{count:>6} {figures['peak_kib'] / 1024:>12.0f} {figures['seconds']:>7.1f} "
              f"{count / figures['seconds']:>6.2f}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", type=Path, default=ROOT / "model_registry")
    parser.add_argument("--fixtures", action="store_true",
                        help="benchmark the tiny test fixture models instead of a registry")
    parser.add_argument("--images", type=int, default=4,
                        help="images per model (a graph slower than --seconds/image: fewer)")
    parser.add_argument("--seconds", type=float, default=4.0,
                        help="aim for about this long per model and side (at least 2 images)")
    parser.add_argument("--size", type=int, default=1024, help="synthetic image side, pixels")
    parser.add_argument("--batch", type=int, default=16, help="max_batch")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--intra-op", type=int, default=0,
                        help="ONNX Runtime intra-op threads per session (0: its default)")
    parser.add_argument("--spin-wait", action="store_true",
                        help="let ONNX Runtime's idle threads spin (inference.spin_wait)")
    parser.add_argument("--model-threads", type=int, default=4)
    parser.add_argument("--providers", nargs="+",
                        default=["CUDAExecutionProvider", "CPUExecutionProvider"])
    parser.add_argument("--models", nargs="*", help="only these model ids (throughput)")
    parser.add_argument("--together", action="store_true",
                        help="also time one graph of all the models (stages run at once)")
    parser.add_argument("--memory-sizes", type=int, nargs="*", default=[2, 8, 16, 32],
                        help="study sizes for the memory runs (none: skip them)")
    parser.add_argument("--memory-size", type=int, default=2000,
                        help="image side for the memory runs")
    parser.add_argument("--memory-models", nargs="*",
                        help="the memory runs' graph (default: the glaucoma-clinic models)")
    parser.add_argument("--memory-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.memory_child is not None:
        return memory_child(args.memory_child)

    began = time.perf_counter()
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}, "
          f"{os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        work = Path(tmp)
        registry_root = args.registry
        if args.fixtures:
            from tests.support.onnx_models import write_example_registry

            registry_root = work / "registry"
            write_example_registry(registry_root)
        throughput(args, load_registry(registry_root))
        print(f"(throughput: {time.perf_counter() - began:.0f} s)")
        if args.memory_sizes:
            memory(args, registry_root, work)
    print(f"\ntotal {time.perf_counter() - began:.0f} s; load average "
          f"{os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
