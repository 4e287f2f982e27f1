"""Inference throughput: raw ONNX Runtime against the executor, per model.

For each model (latest version) of a registry, on N synthetic fundus images:
- raw: a plain `session.run` loop over pre-made input tensors (batches of --batch), summed
  over the models of the model's graph (the model plus what it requires), so both sides do
  the same inference work;
- executor: the whole job path, from stored DICOM instances to stored outputs: claim, read
  and decode the files, find the field of view, pre-process, run the graph, post-process,
  write the .npz and index, record the job.
Prints both in images per second and their ratio (executor / raw).

    python scripts/bench_inference.py --fixtures              # tiny fixture models
    python scripts/bench_inference.py --fixtures --heavy      # + a convolutional segmenter
    python scripts/bench_inference.py --registry model_registry --images 32
    python scripts/bench_inference.py --fixtures --heavy --providers CPUExecutionProvider
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydicom.uid import generate_uid
from sqlalchemy import update

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dicomnode.db import open_database  # noqa: E402
from dicomnode.db.engine import Database  # noqa: E402
from dicomnode.db.models import Instance, Series, Study, StudyState, utcnow  # noqa: E402
from dicomnode.graph import Selection, resolve  # noqa: E402
from dicomnode.inference.executor import GraphExecutor  # noqa: E402
from dicomnode.inference.preprocess import SourceImage  # noqa: E402
from dicomnode.inference.sessions import SessionPool  # noqa: E402
from dicomnode.jobs import ProcessingService, queue  # noqa: E402
from dicomnode.jobs.planning import Plan  # noqa: E402
from dicomnode.receive.storage import relative_path  # noqa: E402
from dicomnode.registry import Registry, load_registry  # noqa: E402
from dicomnode.routing.loader import PresetSet  # noqa: E402
from dicomnode.settings import Settings  # noqa: E402
from dicomnode.synthetic import op_dataset, synthetic_fundus  # noqa: E402

logger = logging.getLogger("bench_inference")


def conv_segmenter(size: int = 256, width: int = 32, layers: int = 4) -> Any:
    """A fixture heavy enough for inference to dominate: 3x3 convolutions at `size`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, channels, name = [], [], 3, "image"
    for index in range(layers + 1):
        out_channels = 1 if index == layers else width
        weight = (rng.standard_normal((out_channels, channels, 3, 3)) * 0.1).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"w{index}"))
        nodes.append(helper.make_node("Conv", [name, f"w{index}"], [f"c{index}"],
                                      pads=[1, 1, 1, 1]))
        act = "Sigmoid" if index == layers else "Relu"
        nodes.append(helper.make_node(act, [f"c{index}"], [f"a{index}"]))
        channels, name = out_channels, f"a{index}"
    nodes.append(helper.make_node("Identity", [name], ["mask"]))
    graph = helper.make_graph(
        nodes, "conv_segmenter",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 1, size, size])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def store_study(database: Database, storage: Path, count: int, size: int) -> str:
    """N synthetic OP images as one stored, complete study."""
    study_uid, series_uid = generate_uid(), generate_uid()
    now = utcnow()
    with database.transaction() as session:
        study = Study(study_uid=study_uid, state=StudyState.COMPLETE, created_at=now,
                      updated_at=now, last_instance_at=now, needs_reprocess=False)
        session.add(study)
        session.flush()
        series = Series(study_id=study.id, series_uid=series_uid, modality="OP", created_at=now)
        session.add(series)
        session.flush()
        for index in range(count):
            laterality: Literal["L", "R"] = "R" if index % 2 == 0 else "L"
            ds = op_dataset(synthetic_fundus(size, laterality, index), laterality=laterality,
                            study_uid=study_uid, series_uid=series_uid,
                            instance_number=index + 1)
            rel = relative_path(study_uid, series_uid, str(ds.SOPInstanceUID))
            (storage / rel).parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(storage / rel, enforce_file_format=True)
            session.add(Instance(
                study_id=study.id, series_id=series.id, sop_instance_uid=ds.SOPInstanceUID,
                sop_class_uid=ds.SOPClassUID, transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                modality="OP", laterality=laterality, path=rel.as_posix(),
                size_bytes=(storage / rel).stat().st_size, received_at=now, late=False))
    return study_uid


def raw_throughput(
    executor: GraphExecutor, graph: Any, images: list[SourceImage], batch: int, repeats: int
) -> tuple[float, dict[str, str]]:
    """Images per second of plain session.run loops over the graph's models."""
    # One executor run captures each model's real input tensors (pre-made, outside the timing).
    result = executor.run(graph, images[:batch])
    total = 0.0
    providers = {}
    for model_id in graph.order:
        entry = executor.registry.get(model_id, graph.models[model_id])
        loaded = executor.sessions.get(entry)
        providers[model_id] = loaded.provider
        feeds_one = _feeds(executor, graph, model_id, images[:batch], result)
        session = loaded.session
        session.run(None, feeds_one)  # warm-up
        runs = max(1, len(images) // batch)
        best = float("inf")
        for _ in range(repeats):  # best of `repeats`, as for the executor
            start = time.perf_counter()
            for _ in range(runs):
                session.run(None, feeds_one)
            best = min(best, time.perf_counter() - start)
        total += best / (runs * batch)  # seconds per image
    return 1.0 / total, providers


def _feeds(executor: GraphExecutor, graph: Any, model_id: str, images: list[SourceImage],
           result: Any) -> dict[str, np.ndarray[Any, Any]]:
    from dicomnode.inference.preprocess import prepare
    from dicomnode.registry.manifest import TensorInput

    manifest = executor.registry.get(model_id, graph.models[model_id]).manifest
    feeds = {}
    for spec in manifest.inputs:
        if isinstance(spec, TensorInput):
            feeds[spec.name] = np.stack([prepare(i, spec)[0] for i in images])
        else:
            ref = graph.inputs[model_id][spec.name]
            source, _, output = ref.partition(".")
            values = result.models[source].raw[output]
            feeds[spec.name] = np.stack(
                [values[i.sop_instance_uid] for i in images]).astype(spec.dtype)
    return feeds


def executor_throughput(
    service: ProcessingService, database: Database, study_uid: str, graph: Any, count: int,
    repeats: int,
) -> float:
    """Images per second from stored instances to stored outputs (the whole job path)."""
    best = float("inf")
    for _ in range(repeats):
        with database.transaction() as session:
            session.execute(update(Study).where(Study.study_uid == study_uid)
                            .values(state=StudyState.COMPLETE))
        plan = Plan(study_uid, None, graph, "benchmark")
        job_id = queue.enqueue(database, plan, queue.COMPLETE)
        assert job_id is not None
        start = time.perf_counter()
        ran = service.run_once()
        best = min(best, time.perf_counter() - start)
        assert ran == job_id
        state = queue.job_detail(database, job_id)["state"]
        if state != "done":
            raise SystemExit(f"job {job_id} ended {state}: "
                             f"{queue.job_detail(database, job_id)['outcome']}")
    return count / best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", type=Path, default=ROOT / "model_registry")
    parser.add_argument("--fixtures", action="store_true",
                        help="benchmark the tiny test fixture models instead of a registry")
    parser.add_argument("--heavy", action="store_true",
                        help="with --fixtures: add a convolutional segmenter (256 x 256)")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=512, help="synthetic image side, pixels")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--providers", nargs="+",
                        default=["CUDAExecutionProvider", "CPUExecutionProvider"])
    parser.add_argument("--models", nargs="*", help="only these model ids")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        work = Path(tmp)
        registry_root = args.registry
        if args.fixtures:
            from tests.support.onnx_models import segmenter_manifest, write_example_registry

            registry_root = work / "registry"
            writer = write_example_registry(registry_root)
            if args.heavy:
                writer.add(segmenter_manifest("conv-seg", modalities=["OP"], size=(256, 256)),
                           conv_segmenter())
        registry: Registry = load_registry(registry_root)
        storage = work / "storage"
        storage.mkdir()
        settings = Settings.model_validate({
            "storage": {"path": storage},
            "database": {"url": f"sqlite:///{work / 'bench.db'}"},
            "inference": {"workers": 0, "providers": args.providers, "max_batch": args.batch},
        })
        database = open_database(settings.database.url)
        sessions = SessionPool(args.providers)
        service = ProcessingService(settings, database, registry, PresetSet(), sessions=sessions)
        study_uid = store_study(database, storage, args.images, args.size)
        images = [SourceImage(f"bench.{i}", synthetic_fundus(args.size, "R", i))
                  for i in range(args.images)]
        print(f"{args.images} images of {args.size}x{args.size}, batch {args.batch}, "
              f"providers requested {args.providers}")
        print(f"{'model':<22} {'graph':>5} {'provider':<26} {'raw img/s':>10} "
              f"{'executor img/s':>15} {'ratio':>6}")
        for entry in registry.latest_entries():
            if args.models and entry.id not in args.models:
                continue
            modality = entry.manifest.modalities[0]
            graph = resolve(Selection.of([entry.key], modality=modality), registry)
            raw, providers = raw_throughput(service.executor, graph, images, args.batch,
                                            args.repeats)
            end_to_end = executor_throughput(service, database, study_uid, graph, args.images,
                                             args.repeats)
            print(f"{entry.key:<22} {len(graph.models):>5} {providers[entry.id]:<26} "
                  f"{raw:>10.1f} {end_to_end:>15.1f} {end_to_end / raw:>6.2f}")
        database.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
