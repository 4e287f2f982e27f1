"""An operator's re-run of a received study: the same preset again, another preset, or a
custom selection (models switched on or off within a preset).

The new job runs over every stored instance of the study. Its results supersede the earlier
ones as a late image's re-run does (results.encode): unchanged SEGs and overlays are kept, not
sent again, and the new SR names the previous one. Allowed once the study has finished
processing (done, partial, failed, not-routed), never while it is receiving or running.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select, update

from dicomnode.db import audit, wakeups
from dicomnode.db.engine import Database
from dicomnode.db.models import Job, JobState, Study, StudyState, utcnow
from dicomnode.errors import DicomNodeError, StudyNotFoundError
from dicomnode.graph.model import ResolvedGraph
from dicomnode.graph.resolver import resolve
from dicomnode.graph.selection import Selection
from dicomnode.jobs.planning import study_facts
from dicomnode.registry.registry import Registry
from dicomnode.routing.loader import PresetSet
from dicomnode.routing.router import route

logger = logging.getLogger(__name__)

RERUN = "rerun"
RERUNNABLE = (StudyState.DONE, StudyState.PARTIAL, StudyState.FAILED, StudyState.NOT_ROUTED)


class RerunRefused(DicomNodeError):
    """The study cannot be re-run now (still receiving or processing, or nothing to run)."""


@dataclass(frozen=True)
class Rerun:
    job_id: int
    study_uid: str
    preset: str
    graph: ResolvedGraph

    def as_json(self) -> dict[str, object]:
        return {"job_id": self.job_id, "study_uid": self.study_uid, "preset": self.preset,
                "graph": self.graph.to_dict()}


def describe(preset: str, with_models: Sequence[str], without: Sequence[str]) -> str:
    """What was asked for, as the audit row says it."""
    parts = [f"preset {preset}"]
    parts += [f"--with {m}" for m in with_models]
    parts += [f"--without {m}" for m in without]
    return " ".join(parts)


def _preset_for(database: Database, study_uid: str) -> str | None:
    """The preset of the study's latest job, if any."""
    with database.transaction() as session:
        return session.scalar(select(Job.preset).where(Job.study_uid == study_uid)
                              .order_by(Job.id.desc()).limit(1))


def rerun_study(
    database: Database,
    storage_root: Path,
    registry: Registry,
    presets: PresetSet,
    modality_defaults: dict[str, str],
    study_uid: str,
    *,
    actor: str,
    preset: str | None = None,
    with_models: Sequence[str] = (),
    without: Sequence[str] = (),
) -> Rerun:
    """Queue a new job for a finished study. Raises StudyNotFoundError, PresetError,
    ResolutionError (the selection does not resolve) or RerunRefused; nothing changes then."""
    facts = study_facts(database, storage_root, study_uid)  # StudyNotFoundError
    preset_id = preset or _preset_for(database, study_uid)
    if preset_id is None:
        decision = route(facts, presets.ordered(), modality_defaults)
        if decision.preset is None:
            raise RerunRefused(f"study {study_uid} is not routed to any preset "
                               f"({decision.reason}); name one with --preset")
        preset_id = decision.preset
    chosen = presets.get(preset_id)  # PresetError names the loaded ones
    modalities = facts.modalities
    selection = Selection.of(chosen.models, with_models=with_models, without=without,
                             modality=modalities[0] if len(modalities) == 1 else None,
                             preset=chosen.id)
    graph = resolve(selection, registry)  # ResolutionError
    asked = describe(chosen.id, with_models, without)
    with database.transaction() as session:
        now = utcnow()
        won = session.execute(
            update(Study).where(Study.study_uid == study_uid, Study.state.in_(RERUNNABLE))
            .values(state=StudyState.PROCESSING, needs_reprocess=False, updated_at=now),
            execution_options={"synchronize_session": False},
        )
        if int(getattr(won, "rowcount", 0) or 0) != 1:
            current = session.scalar(select(Study.state).where(Study.study_uid == study_uid))
            if current is None:
                raise StudyNotFoundError(f"no study {study_uid}")
            raise RerunRefused(
                f"study {study_uid} is {current}: it can be re-run once it has finished "
                f"({', '.join(RERUNNABLE)})")
        study_id = session.scalar(select(Study.id).where(Study.study_uid == study_uid))
        job = Job(study_id=study_id, study_uid=study_uid, preset=chosen.id,
                  graph_json=json.dumps(graph.to_dict(), sort_keys=True),
                  state=JobState.QUEUED, reason=RERUN, attempts=0, created_at=now)
        session.add(job)
        session.flush()
        wakeups.mark(session, wakeups.JOBS)
        models = ", ".join(f"{m}@{v}" for m, v in graph.models.items())
        audit.record(session, "study-rerun", actor=actor, study_uid=study_uid,
                     detail=f"job {job.id}: {asked}; {models}")
        job_id = job.id
    logger.info("study %s: re-run as job %d by %s (%s)", study_uid, job_id, actor, asked)
    return Rerun(job_id, study_uid, chosen.id, graph)
