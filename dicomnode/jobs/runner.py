"""Run one claimed job: decode the study's images, execute the graph, store the outputs.

Outputs go to `<storage>/<jobs_folder>/<job id>/`, replaced whole on a re-run, so a job run
again after a crash leaves one set of outputs, not two.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
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
    """A study's stored instances, decoded a chunk at a time as the executor asks for them."""

    study_uid: str
    storage_root: Path
    rows: list[tuple[str, str, str | None, str | None]]  # uid, path, laterality, modality
    decoded: int = 0  # images decoded so far
    unreadable: dict[str, str] = field(default_factory=dict)  # uid -> reason

    def chunks(self, chunk_bytes: int) -> Iterator[list[SourceImage]]:
        """The readable images in order, in chunks of about `chunk_bytes` of decoded pixels
        (at least one image each), so a large study never sits in memory whole."""
        chunk: list[SourceImage] = []
        size = 0
        # Reading and decoding (zlib, JPEG codecs, numpy copies) mostly release the GIL: a
        # few threads at a time shorten the wait before the first model can start.
        with ThreadPoolExecutor(_DECODE_THREADS, thread_name_prefix="decode") as pool:
            for start in range(0, len(self.rows), _DECODE_THREADS):
                group = self.rows[start:start + _DECODE_THREADS]
                for row, item in zip(group, pool.map(self._decode, group), strict=True):
                    uid, _, laterality, modality = row
                    if isinstance(item, str):
                        logger.warning("study %s: image %s unreadable: %s", self.study_uid,
                                       uid, item)
                        self.unreadable[uid] = item
                        continue
                    rgb, spacing = item
                    chunk.append(SourceImage(uid, rgb, laterality, spacing, modality=modality))
                    self.decoded += 1
                    size += rgb.nbytes
                    if size >= chunk_bytes:
                        yield chunk
                        chunk, size = [], 0
        if chunk:
            yield chunk

    def _decode(self, row: tuple[str, str, str | None, str | None]
                ) -> tuple[NDArray[np.uint8], tuple[float, float] | None] | str:
        try:
            dataset = dcmread(self.storage_root / row[1])
            return decode_rgb(dataset), pixel_spacing(dataset)
        except (DecodeError, InvalidDicomError, OSError, ValueError) as exc:
            return scrub(str(exc))
        except Exception as exc:  # any decoder failure costs this image, not the study
            return safe_error(exc)


def load_study(database: Database, storage_root: Path, study_uid: str) -> LoadedStudy:
    """A study's stored instances (one unreadable image does not stop the rest)."""
    with database.transaction() as session:
        rows = session.execute(
            select(Instance.sop_instance_uid, Instance.path, Instance.laterality,
                   Instance.modality)
            .join(Study, Study.id == Instance.study_id)
            .where(Study.study_uid == study_uid, Instance.purged_at.is_(None))  # retention
            .order_by(Instance.id)
        ).all()
    return LoadedStudy(study_uid, storage_root, [(r[0], r[1], r[2], r[3]) for r in rows])


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
    result = executor.run_chunks(graph, study.chunks(executor.chunk_bytes))
    if not study.decoded:
        outcome: dict[str, Any] = {
            "outcome": "failed", "problems": {"(study)": "no readable images"},
            "unreadable": study.unreadable,
        }
        return None, outcome, None
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
        "images": study.decoded,
        "attempt": job.attempt,
    }
    return result, outcome, relative
