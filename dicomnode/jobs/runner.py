"""Run one claimed job: decode the study's images, execute the graph, store the outputs.

Outputs go to `<storage>/<jobs_folder>/<job id>/`, replaced whole on a re-run, so a job run
again after a crash leaves one set of outputs, not two.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import select

from dicomnode.db.engine import Database
from dicomnode.db.models import Instance, Job, JobState, Study
from dicomnode.errors import DecodeError
from dicomnode.graph.model import ResolvedGraph
from dicomnode.inference.decode import decode_rgb, pixel_spacing
from dicomnode.inference.executor import GraphExecutor, GraphResult
from dicomnode.inference.outputs import write_outputs
from dicomnode.inference.preprocess import SourceImage
from dicomnode.jobs.queue import ClaimedJob
from dicomnode.redact import safe_error, scrub

logger = logging.getLogger(__name__)

_DECODE_THREADS = 4


@dataclass
class LoadedStudy:
    images: list[SourceImage] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)  # uid -> reason


def load_study(database: Database, storage_root: Path, study_uid: str) -> LoadedStudy:
    """Decode every stored instance of a study (one unreadable image does not stop the rest)."""
    with database.transaction() as session:
        rows = session.execute(
            select(Instance.sop_instance_uid, Instance.path, Instance.laterality,
                   Instance.modality)
            .join(Study, Study.id == Instance.study_id)
            .where(Study.study_uid == study_uid, Instance.purged_at.is_(None))  # retention
            .order_by(Instance.id)
        ).all()
    def decode(path: str) -> tuple[NDArray[np.uint8], tuple[float, float] | None] | str:
        try:
            dataset = dcmread(storage_root / path)
            return decode_rgb(dataset), pixel_spacing(dataset)
        except (DecodeError, InvalidDicomError, OSError, ValueError) as exc:
            return scrub(str(exc))
        except Exception as exc:  # any decoder failure costs this image, not the study
            return safe_error(exc)

    # Reading and decoding (zlib, JPEG codecs, numpy copies) mostly release the GIL: a few
    # threads shorten the wait before the first model can start.
    with ThreadPoolExecutor(_DECODE_THREADS, thread_name_prefix="decode") as pool:
        decoded = list(pool.map(decode, [row.path for row in rows]))
    loaded = LoadedStudy()
    for (uid, _, laterality, modality), item in zip(rows, decoded, strict=True):
        if isinstance(item, str):
            logger.warning("study %s: image %s unreadable: %s", study_uid, uid, item)
            loaded.unreadable[uid] = item
            continue
        rgb, spacing = item
        loaded.images.append(SourceImage(uid, rgb, laterality, spacing, modality=modality))
    return loaded


def previous_job(database: Database, job: ClaimedJob) -> int | None:
    """The latest earlier finished job of the same study, if any."""
    with database.transaction() as session:
        found: int | None = session.scalar(
            select(Job.id).where(Job.study_uid == job.study_uid, Job.id < job.id,
                                 Job.state.in_(JobState.FINISHED))
            .order_by(Job.id.desc()).limit(1)
        )
    return found


def output_folder(storage_root: Path, jobs_folder: str, job_id: int) -> tuple[Path, str]:
    """(absolute folder, path relative to the storage root) for a job's outputs."""
    relative = Path(jobs_folder) / str(job_id)
    return storage_root / relative, relative.as_posix()


def run_job(
    job: ClaimedJob,
    database: Database,
    storage_root: Path,
    jobs_folder: str,
    executor: GraphExecutor,
) -> tuple[GraphResult | None, dict[str, Any], str | None]:
    """(result, outcome for the job row, output path) for a claimed job."""
    graph = ResolvedGraph.from_dict(job.graph)
    study = load_study(database, storage_root, job.study_uid)
    if not study.images:
        outcome: dict[str, Any] = {
            "outcome": "failed", "problems": {"(study)": "no readable images"},
            "unreadable": study.unreadable,
        }
        return None, outcome, None
    result = executor.run(graph, study.images)
    folder, relative = output_folder(storage_root, jobs_folder, job.id)
    meta: dict[str, Any] = {
        "job": job.id, "study_uid": job.study_uid, "preset": job.preset,
        "attempt": job.attempt, "unreadable": study.unreadable,
        # Late instances make a new job; its results replace this earlier job's.
        "supersedes": previous_job(database, job),
    }
    write_outputs(folder, result, executor.registry, meta)
    outcome = {
        "outcome": result.outcome,
        "problems": result.problems(),
        "unreadable": study.unreadable,
        "images": len(study.images),
        "attempt": job.attempt,
    }
    return result, outcome, relative
