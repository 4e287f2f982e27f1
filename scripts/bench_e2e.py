#!/usr/bin/env python3
"""End-to-end benchmark: camera (storescu) -> dicomnode -> results -> PACS (Orthanc).

    python scripts/bench_e2e.py                      # demo study, then a batch of 50
    python scripts/bench_e2e.py --batch 20 --size 2000
    python scripts/bench_e2e.py --registry model_registry --models vessel-seg

For one demo study (two eyes): the time from the last image's C-STORE response (the node
commits the instance row just before answering, so its `received_at` is that moment) to the
PACS acknowledging the last result object (`deliveries.sent_at`, written after the C-STORE
response), split into:
  completeness  last image -> study complete (both eyes present: at the association's end)
  queue         study complete -> a worker starts the job
  inference     job started -> job finished (decode, models, outputs stored)
  encoding      job finished -> SR, SEG, overlays written and queued (incl. pipeline pickup)
  sending       queued -> the PACS acknowledged the last object
Then a batch of N studies, one storescu association each, sent back to back: studies per
minute from the first image received to the last result acknowledged.

By default the models are the tests' tiny fixture models (segmentation, classifier,
measurement: inference is nearly free, so the figures show the node's own overhead); pass
`--registry`/`--models` for real ones. All timestamps come from the node's database.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import func, select

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the fixture models live in tests/support

from dicomnode.db.engine import Database  # noqa: E402
from dicomnode.db.models import (  # noqa: E402
    Delivery,
    DeliveryState,
    Instance,
    Job,
    ResultSet,
    Study,
    as_utc,
)
from dicomnode.synthetic import demo_study  # noqa: E402
from tests.support.node import NodeProcess, write_config  # noqa: E402
from tests.support.orthanc import ORTHANC_AET, Orthanc  # noqa: E402
from tests.support.peers import free_port, system_tool  # noqa: E402


@dataclass(frozen=True)
class Split:
    completeness: float
    queue: float
    inference: float
    encoding: float
    sending: float

    @property
    def total(self) -> float:
        return self.completeness + self.queue + self.inference + self.encoding + self.sending


def fixture_registry(root: Path) -> list[str]:
    from tests.support.onnx_models import (
        RegistryWriter,
        classifier_manifest,
        green_threshold_segmenter,
        measurement_manifest,
        segmenter_manifest,
    )

    writer = RegistryWriter(root)
    writer.add(segmenter_manifest("vessel-seg", modalities=("OP",)),
               green_threshold_segmenter(threshold=0.3))
    writer.add(classifier_manifest("image-quality", gate=False, modalities=("OP",)))
    writer.add(measurement_manifest("vessel-fraction", source="vessel-seg.mask",
                                    modalities=("OP",)))
    return ["vessel-seg", "image-quality", "vessel-fraction"]


def seconds(a: datetime, b: datetime) -> float:
    return (as_utc(b) - as_utc(a)).total_seconds()


def split_for(database: Database, study_uid: str) -> Split:
    with database.transaction() as session:
        study = session.scalars(select(Study).where(Study.study_uid == study_uid)).one()
        last = session.scalar(select(func.max(Instance.received_at))
                              .where(Instance.study_id == study.id))
        job = session.scalars(select(Job).where(Job.study_uid == study_uid)).one()
        result_set = session.scalars(select(ResultSet).where(ResultSet.job_id == job.id)).one()
        sent = session.scalar(select(func.max(Delivery.sent_at))
                              .where(Delivery.study_uid == study_uid))
    assert last and study.completed_at and job.started_at and job.finished_at and sent
    assert result_set.finished_at is not None
    return Split(
        completeness=seconds(last, study.completed_at),
        queue=seconds(study.completed_at, job.started_at),
        inference=seconds(job.started_at, job.finished_at),
        encoding=seconds(job.finished_at, result_set.finished_at),
        sending=seconds(result_set.finished_at, sent),
    )


def delivered_studies(database: Database) -> int:
    """Studies whose every result object was acknowledged by the PACS."""
    with database.transaction() as session:
        encoded = set(session.scalars(select(ResultSet.study_uid)
                                      .where(ResultSet.state == "encoded")))
        unsent = set(session.scalars(select(Delivery.study_uid)
                                     .where(Delivery.state != DeliveryState.SENT)))
    return len(encoded - unsent)


def wait_for(database: Database, count: int, timeout: float, node: NodeProcess) -> None:
    deadline = time.monotonic() + timeout
    while delivered_studies(database) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out: {delivered_studies(database)} of {count} studies "
                             f"delivered\n{node.log()[-4000:]}")
        time.sleep(0.2)


def send(port: int, files: list[Path]) -> None:
    storescu = system_tool("storescu") or "storescu"
    subprocess.run([storescu, "-aet", "CAM1", "-aec", "DICOMNODE", "127.0.0.1", str(port),
                    *map(str, files)], check=True, capture_output=True, timeout=300)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    if args.registry:
        registry, models = Path(args.registry).resolve(), args.models
    else:
        registry, models = work / "registry", fixture_registry(work / "registry")
    presets = work / "presets"
    presets.mkdir()
    (presets / "bench.yaml").write_text(yaml.safe_dump({
        "id": "bench", "name": "Benchmark", "audience": "benchmark", "description": "bench",
        "models": models, "outputs": {"sr": True, "seg": True, "overlay": args.overlay},
        "destinations": ["pacs"], "routing": {"modality": ["OP"]},
    }), encoding="utf-8")
    pacs = Orthanc(work / "pacs", free_port(), free_port())
    pacs.start()
    url = f"sqlite:///{work / 'node.db'}"
    config = write_config(
        work, url,
        destinations={"pacs": {"ae_title": ORTHANC_AET, "host": "127.0.0.1",
                               "port": pacs.dicom_port}},
        registry={"path": str(registry)}, presets={"path": str(presets)},
        inference={"workers": args.workers, "poll_seconds": 0.5},
        dispatch={"poll_seconds": 0.5},
    )
    database = Database(url)
    node = NodeProcess(config).start()
    try:
        # One study first (also warms the ONNX sessions up), then the one that is timed.
        warm = demo_study(work / "warm", size=args.size, seed=1, patient_id="WARM")
        send(node.port, warm)
        wait_for(database, 1, 300, node)
        files = demo_study(work / "demo", size=args.size, seed=2, patient_id="DEMO")
        send(node.port, files)
        wait_for(database, 2, 300, node)
        from pydicom import dcmread

        demo_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        single = split_for(database, demo_uid)

        batch = [demo_study(work / f"b{i:03d}", size=args.size, seed=i,
                            patient_id=f"B{i:04d}") for i in range(args.batch)]
        load_before = os.getloadavg()
        for files in batch:
            send(node.port, files)
        wait_for(database, 2 + args.batch, 60 + 30 * args.batch, node)
        load_after = os.getloadavg()
        uids = [str(dcmread(f[0], stop_before_pixels=True).StudyInstanceUID) for f in batch]
        splits = [split_for(database, u) for u in uids]
        with database.transaction() as session:
            first = session.scalar(select(func.min(Instance.received_at))
                                   .join(Study, Study.id == Instance.study_id)
                                   .where(Study.study_uid.in_(uids)))
            last = session.scalar(select(func.max(Delivery.sent_at))
                                  .where(Delivery.study_uid.in_(uids)))
        assert first and last
        span = seconds(first, last)
    finally:
        node.terminate(timeout=120)
        database.dispose()
        pacs.stop()
    return {
        "single": single, "splits": splits, "span": span, "batch": args.batch,
        "load": (load_before, load_after),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=50, help="studies in the batch (50)")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (1024)")
    parser.add_argument("--workers", type=int, default=1, help="job workers (1)")
    parser.add_argument("--no-overlay", dest="overlay", action="store_false",
                        help="skip the overlay images")
    parser.add_argument("--registry", help="a model registry instead of the fixture models")
    parser.add_argument("--models", nargs="+", default=[], help="model ids (with --registry)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        out = run(args, Path(tmp))
    s: Split = out["single"]
    print(f"machine: {os.cpu_count()} CPUs; load average before/after the batch: "
          f"{out['load'][0][0]:.2f} / {out['load'][1][0]:.2f}")
    print(f"demo study (2 images of {args.size}x{args.size}), last C-STORE response -> "
          f"PACS acknowledged last result: {s.total:.2f} s")
    for name in ("completeness", "queue", "inference", "encoding", "sending"):
        print(f"  {name:<13}{getattr(s, name):7.2f} s")
    splits: list[Split] = out["splits"]
    print(f"batch of {out['batch']} studies: {out['span']:.1f} s from the first image received "
          f"to the last result acknowledged = {60 * out['batch'] / out['span']:.1f} studies/min")
    for name in ("completeness", "queue", "inference", "encoding", "sending", "total"):
        values = [getattr(x, name) for x in splits]
        print(f"  {name:<13}median {statistics.median(values):7.2f} s, "
              f"max {max(values):7.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
