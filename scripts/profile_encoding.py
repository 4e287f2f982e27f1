#!/usr/bin/env python3
"""Profile building a job's result objects (SEG, SR, overlay) with cProfile.

    python scripts/profile_encoding.py                        # diabetic-screening, 1024 px
    python scripts/profile_encoding.py --preset glaucoma-clinic --size 2000 --repeat 5
    python scripts/profile_encoding.py --save /tmp/objects    # also write the objects

The demo study (two eyes) is stored, planned and run in-process with the shipped registry
and presets; then the job's objects are built `--repeat` times (after one warm-up build)
under cProfile, and the time per kind and the top functions by cumulative time are printed.
`--save DIR` writes each object as DIR/<kind>-<n>.dcm, to compare two versions of the code
byte for byte (the SR's content date and time are the job's, so they repeat).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dicomnode.db import open_database  # noqa: E402
from dicomnode.db.engine import Database  # noqa: E402
from dicomnode.db.models import Instance, Series, Study, utcnow  # noqa: E402
from dicomnode.jobs import ProcessingService  # noqa: E402
from dicomnode.receive.storage import relative_path  # noqa: E402
from dicomnode.results.pipeline import ResultsPipeline, _JobInfo  # noqa: E402
from dicomnode.routing import load_catalog  # noqa: E402
from dicomnode.settings import Settings  # noqa: E402
from dicomnode.synthetic import demo_study  # noqa: E402


def store(database: Database, storage: Path, files: list[Path]) -> str:
    """Rows and files for the demo study, as the receiver would leave them (complete)."""
    from pydicom import dcmread

    now = utcnow()
    datasets = [dcmread(f) for f in files]
    study_uid = str(datasets[0].StudyInstanceUID)
    with database.transaction() as session:
        study = Study(study_uid=study_uid, state="complete", created_at=now, updated_at=now,
                      last_instance_at=now, needs_reprocess=False, completed_at=now,
                      calling_ae="CAM1", called_ae="DICOMNODE")
        session.add(study)
        session.flush()
        for ds, path in zip(datasets, files, strict=True):
            series = Series(study_id=study.id, series_uid=str(ds.SeriesInstanceUID),
                            modality="OP", created_at=now)
            session.add(series)
            session.flush()
            rel = relative_path(study_uid, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
            (storage / rel).parent.mkdir(parents=True, exist_ok=True)
            (storage / rel).write_bytes(path.read_bytes())
            session.add(Instance(
                study_id=study.id, series_id=series.id, sop_instance_uid=ds.SOPInstanceUID,
                sop_class_uid=ds.SOPClassUID, transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                modality="OP", laterality=ds.ImageLaterality, path=rel.as_posix(),
                size_bytes=(storage / rel).stat().st_size, calling_ae="CAM1", received_at=now,
                late=False))
    return study_uid


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="diabetic-screening")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (1024)")
    parser.add_argument("--repeat", type=int, default=3, help="profiled builds (3)")
    parser.add_argument("--top", type=int, default=30, help="functions listed (30)")
    parser.add_argument("--save", type=Path, help="write the objects into this folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="profile-encoding-") as tmp:
        work = Path(tmp)
        settings = Settings.model_validate({
            "storage": {"path": work / "storage"},
            "database": {"url": f"sqlite:///{work / 'node.db'}"},
            "registry": {"path": ROOT / "model_registry"},
            "presets": {"path": ROOT / "presets"},
            "modality_defaults": {"OP": args.preset},
            "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 4242}},
            "inference": {"workers": 0, "providers": ["CPUExecutionProvider"]},
        })
        database = open_database(settings.database.url)
        catalog = load_catalog(settings)
        files = demo_study(work / "demo", size=args.size, seed=2, patient_id="PROFILE")
        study_uid = store(database, settings.storage.path, files)
        service = ProcessingService(settings, database, catalog.registry, catalog.presets)
        service.on_study_complete(study_uid)
        job_id = service.run_once()
        assert job_id is not None, "the study was not planned"
        pipeline = ResultsPipeline(settings, database, catalog.registry, catalog.presets)
        info: _JobInfo = pipeline._job(job_id)
        outputs, _ = pipeline._preset_options(info)
        objects = pipeline._build(info, outputs)  # warm-up (imports, code paths)
        profiler = cProfile.Profile()
        started = time.perf_counter()
        profiler.enable()
        for _ in range(args.repeat):
            objects = pipeline._build(info, outputs)
        profiler.disable()
        per_build = (time.perf_counter() - started) / args.repeat
        database.dispose()
    kinds = ", ".join(f"{sum(o.kind == k for o in objects)} {k}" for k in ("seg", "sr", "overlay"))
    print(f"preset {args.preset}, demo study 2 x {args.size}x{args.size}: {kinds}; "
          f"{per_build:.3f} s per build (mean of {args.repeat}, under cProfile)")
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream).strip_dirs().sort_stats("cumulative")
    stats.print_stats(args.top)
    print(stream.getvalue())
    if args.save is not None:
        args.save.mkdir(parents=True, exist_ok=True)
        for index, obj in enumerate(objects):
            obj.dataset.save_as(args.save / f"{obj.kind}-{index}.dcm", enforce_file_format=True)
        print(f"objects written to {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
