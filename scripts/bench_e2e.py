#!/usr/bin/env python3
"""End-to-end benchmark: camera (storescu) -> dicomnode -> results -> PACS (Orthanc).

    python scripts/bench_e2e.py                    # every shipped preset, then 50 studies
    python scripts/bench_e2e.py --quick            # 768 px, a batch of 10
    python scripts/bench_e2e.py --presets diabetic-screening --batch 20 --size 2000
    python scripts/bench_e2e.py --fixture-models --batch 2 --size 256   # the smoke test's run

For the demo study (two eyes) under each shipped preset (`presets/`, with the shipped
`model_registry/`, on a node whose OP default is that preset): the time from the last
image's C-STORE response (the node commits the instance row just before answering, so its
`received_at` is that moment) to the PACS acknowledging the last result object
(`deliveries.sent_at`, written after the C-STORE response), split into:
  completeness  last image -> study complete (both eyes present: at the association's end)
  queue         study complete -> a worker starts the job
  inference     job started -> job finished (decode, models, outputs stored)
  encoding      job finished -> the result set recorded (incl. pipeline pickup): its SR
                written and queued last; its SEGs and overlays are queued as each is built,
                so most of them are usually sent within this span already
  sending       result set recorded -> the PACS acknowledged the last object (what is left)
and the aim, total <= inference + 1 s. Each node first processes one study untimed (ONNX
sessions load on first use). Then, on the `--batch-preset` node, a batch of N studies, one
storescu association each, sent back to back: studies per minute from the first image
received to the last result acknowledged, the per-study split (median, max), and the node's
resident memory sampled every half second across the batch (first, last, max).
All timestamps come from the node's database.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import func, select

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the fixture models and peers live in tests/support

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

PARTS = ("completeness", "queue", "inference", "encoding", "sending")
AIM_SECONDS = 1.0  # total <= inference + this
FIXTURE_PRESET = "fixture"


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

    @property
    def overhead(self) -> float:
        """Everything that is not inference."""
        return self.total - self.inference


@dataclass
class Batch:
    preset: str
    splits: list[Split]
    span: float
    rss_mb: list[float] = field(default_factory=list)
    load: tuple[float, float] = (0.0, 0.0)


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
        time.sleep(0.05)


def send(port: int, files: list[Path]) -> None:
    storescu = system_tool("storescu") or "storescu"
    subprocess.run([storescu, "-aet", "CAM1", "-aec", "DICOMNODE", "127.0.0.1", str(port),
                    *map(str, files)], check=True, capture_output=True, timeout=300)


def study_uid_of(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)


class RssSampler:
    """The node process's resident set size (MB), every `interval` seconds, in a thread."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            try:
                status = Path(f"/proc/{self.pid}/status").read_text(encoding="ascii")
            except OSError:
                return
            for line in status.splitlines():
                if line.startswith("VmRSS:"):
                    self.samples.append(int(line.split()[1]) / 1024)
            if self._stop.wait(self.interval):
                return


def run_preset(args: argparse.Namespace, work: Path, pacs: Orthanc, preset: str,
               registry: Path, presets: Path, batch: int) -> tuple[Split, Batch | None]:
    """A node whose OP default is `preset`: a warm-up study, the timed demo study, a batch."""
    folder = work / preset
    folder.mkdir()
    url = f"sqlite:///{folder / 'node.db'}"
    results: dict[str, Any] = {} if args.encoders is None else {"encoders": args.encoders}
    config = write_config(
        folder, url,
        destinations={"pacs": {"ae_title": ORTHANC_AET, "host": "127.0.0.1",
                               "port": pacs.dicom_port}},
        registry={"path": str(registry)}, presets={"path": str(presets)},
        modality_defaults={"OP": preset},
        # The node's own defaults otherwise (polls included: the stages wake one another).
        inference={"workers": args.workers, "providers": ["CPUExecutionProvider"]},
        results=results,
    )
    database = Database(url)
    node = NodeProcess(config).start(timeout=120)
    try:
        send(node.port, demo_study(folder / "warm", size=args.size, seed=1, patient_id="WARM"))
        wait_for(database, 1, 600, node)
        files = demo_study(folder / "demo", size=args.size, seed=2, patient_id="DEMO")
        send(node.port, files)
        wait_for(database, 2, 600, node)
        single = split_for(database, study_uid_of(files[0]))
        if batch <= 0:
            return single, None
        studies = [demo_study(folder / f"b{i:03d}", size=args.size, seed=i,
                              patient_id=f"B{i:04d}") for i in range(batch)]
        assert node.proc is not None
        load_before = os.getloadavg()[0]
        with RssSampler(node.proc.pid) as rss:
            for files in studies:
                send(node.port, files)
            wait_for(database, 2 + batch, 120 + 60 * batch, node)
        load_after = os.getloadavg()[0]
        uids = [study_uid_of(f[0]) for f in studies]
        with database.transaction() as session:
            first = session.scalar(select(func.min(Instance.received_at))
                                   .join(Study, Study.id == Instance.study_id)
                                   .where(Study.study_uid.in_(uids)))
            last = session.scalar(select(func.max(Delivery.sent_at))
                                  .where(Delivery.study_uid.in_(uids)))
        assert first and last
        return single, Batch(preset, [split_for(database, u) for u in uids],
                             seconds(first, last), rss.samples, (load_before, load_after))
    finally:
        node.terminate(timeout=120)
        database.dispose()


def shipped_presets() -> list[str]:
    return sorted(str(yaml.safe_load(p.read_text(encoding="utf-8"))["id"])
                  for p in (ROOT / "presets").glob("*.yaml"))


def fixture_presets(work: Path) -> Path:
    presets = work / "fixture-presets"
    presets.mkdir()
    (presets / "fixture.yaml").write_text(yaml.safe_dump({
        "id": FIXTURE_PRESET, "name": "Benchmark", "audience": "benchmark",
        "description": "fixture models", "models": fixture_registry(work / "registry"),
        "outputs": {"sr": True, "seg": True, "overlay": True},
        "destinations": ["pacs"], "routing": {"modality": ["OP"]},
    }), encoding="utf-8")
    return presets


def report(args: argparse.Namespace, singles: dict[str, Split], batch: Batch | None) -> bool:
    """Print the figures; True when every preset met the aim."""
    print(f"machine: {os.cpu_count()} CPUs; load average at the start "
          f"{args.load_start[0]:.2f} / {args.load_start[1]:.2f} / {args.load_start[2]:.2f} "
          f"(1/5/15 min)")
    print(f"demo study (2 OP images of {args.size}x{args.size}), last C-STORE response -> PACS "
          f"acknowledged the last result; aim: total <= inference + {AIM_SECONDS:.0f} s")
    header = "  ".join(f"{p:>12}" for p in (*PARTS, "total", "overhead"))
    print(f"  {'preset':<28}{header}  aim")
    met = True
    for preset, s in singles.items():
        values = "  ".join(f"{getattr(s, p):11.2f}s" for p in (*PARTS, "total", "overhead"))
        ok = s.overhead <= AIM_SECONDS
        met &= ok
        print(f"  {preset:<28}{values}  {'met' if ok else 'MISSED'}")
    if batch is not None:
        n = len(batch.splits)
        print(f"batch of {n} studies ({batch.preset}), sent back to back: {batch.span:.1f} s "
              f"from the first image received to the last result acknowledged = "
              f"{60 * n / batch.span:.1f} studies/min; load average {batch.load[0]:.2f} "
              f"before, {batch.load[1]:.2f} after")
        for name in (*PARTS, "total"):
            column: list[float] = [getattr(x, name) for x in batch.splits]
            print(f"  {name:<13}median {statistics.median(column):7.2f} s, "
                  f"max {max(column):7.2f} s")
        if batch.rss_mb:
            rss = batch.rss_mb
            print(f"  node RSS over the batch ({len(rss)} samples): first {rss[0]:.0f} MB, "
                  f"last {rss[-1]:.0f} MB, max {max(rss):.0f} MB")
            # Flat or growing: the largest value seen in each quarter of the batch.
            quarters = [max(rss[len(rss) * q // 4:len(rss) * (q + 1) // 4] or rss)
                        for q in range(4)]
            print("  node RSS, max per quarter of the batch: "
                  + ", ".join(f"{v:.0f} MB" for v in quarters))
    return met


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", metavar="ID",
                        help="shipped presets to time (default: all in presets/)")
    parser.add_argument("--batch", type=int, default=50, help="studies in the batch (50)")
    parser.add_argument("--batch-preset", default="diabetic-screening",
                        help="the preset the batch runs under (diabetic-screening)")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (1024)")
    parser.add_argument("--workers", type=int, default=1, help="job workers (1)")
    parser.add_argument("--encoders", type=int,
                        help="results.encoders (default: the node's default)")
    parser.add_argument("--quick", action="store_true",
                        help="768 px images and a batch of 10 (overrides --size/--batch)")
    parser.add_argument("--fixture-models", action="store_true",
                        help="the tests' tiny fixture models instead of the shipped presets "
                             "(the node's own overhead; inference is nearly free)")
    args = parser.parse_args()
    if args.quick:
        args.size, args.batch = 768, 10
    args.load_start = os.getloadavg()
    singles: dict[str, Split] = {}
    batch: Batch | None = None
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        work = Path(tmp)
        if args.fixture_models:
            presets_dir, registry = fixture_presets(work), work / "registry"
            chosen, batch_preset = [FIXTURE_PRESET], FIXTURE_PRESET
        else:
            presets_dir, registry = ROOT / "presets", ROOT / "model_registry"
            chosen, batch_preset = args.presets or shipped_presets(), args.batch_preset
            if args.batch > 0 and batch_preset not in chosen:
                chosen.append(batch_preset)
        pacs = Orthanc(work / "pacs", free_port(), free_port())
        pacs.start()
        try:
            for preset in chosen:
                single, ran = run_preset(args, work, pacs, preset, registry, presets_dir,
                                         args.batch if preset == batch_preset else 0)
                singles[preset] = single
                batch = ran or batch
        finally:
            pacs.stop()
    met = report(args, singles, batch)
    print(f"aim (total <= inference + {AIM_SECONDS:.0f} s): "
          f"{'met by every preset' if met else 'MISSED by at least one preset'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
