"""Plan a completed study: read its headers, route it to a preset, resolve the preset's graph.

Reading and resolving happen outside any transaction (they touch files); the decision is then
committed by `queue.enqueue`, whose conditional update makes planning idempotent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import select

from dicomnode.db.engine import Database
from dicomnode.db.models import Instance, Study
from dicomnode.errors import PresetError, ResolutionError, StudyNotFoundError
from dicomnode.graph.model import ResolvedGraph
from dicomnode.graph.resolver import resolve
from dicomnode.graph.selection import Selection
from dicomnode.redact import safe_error
from dicomnode.registry.registry import Registry
from dicomnode.routing.facts import StudyFacts
from dicomnode.routing.loader import PresetSet
from dicomnode.routing.router import RoutingDecision, route

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """What to do with a study: run `graph`, or not (with `reason`)."""

    study_uid: str
    decision: RoutingDecision | None
    graph: ResolvedGraph | None
    reason: str  # routing reason, or why the graph could not be made

    @property
    def preset(self) -> str | None:
        return None if self.decision is None else self.decision.preset


def study_facts(database: Database, storage_root: Path, study_uid: str) -> StudyFacts:
    """Routing facts from the headers of a study's stored instances."""
    with database.transaction() as session:
        study = session.execute(
            select(Study).where(Study.study_uid == study_uid)
        ).scalar_one_or_none()
        if study is None:
            raise StudyNotFoundError(f"no study {study_uid}")
        calling, called = study.calling_ae, study.called_ae
        rows = session.execute(
            select(Instance.path, Instance.calling_ae)
            .where(Instance.study_id == study.id, Instance.purged_at.is_(None))  # retention
            .order_by(Instance.id)
        ).all()
    datasets: list[Dataset] = []
    callers = {calling} if calling else set()
    for path, caller in rows:
        if caller:
            callers.add(caller)
        try:
            datasets.append(dcmread(storage_root / path, stop_before_pixels=True))
        except (InvalidDicomError, OSError, ValueError) as exc:
            logger.warning("study %s: cannot read %s for routing: %s", study_uid, path,
                           safe_error(exc))
    return StudyFacts.from_datasets(datasets, calling_ae=callers, called_ae=called)


def plan_study(
    study_uid: str,
    facts: StudyFacts,
    registry: Registry,
    presets: PresetSet,
    modality_defaults: dict[str, str],
) -> Plan:
    decision = route(facts, presets.ordered(), modality_defaults)
    logger.info("study %s routing: %s", study_uid, decision.reason)
    if decision.preset is None:
        # The audit row should say why each preset did not match, not only that none did.
        notes = "; ".join(f"{e.preset}: {e.note}" for e in decision.explanations)
        reason = decision.reason + (f" [{notes}]" if notes else "")
        return Plan(study_uid, decision, None, reason)
    try:
        preset = presets.get(decision.preset)
        modalities = facts.modalities
        selection = Selection.of(
            preset.models,
            modality=modalities[0] if len(modalities) == 1 else None,
            preset=preset.id,
        )
        graph = resolve(selection, registry)
    except (PresetError, ResolutionError) as exc:
        return Plan(study_uid, decision, None, f"preset '{decision.preset}': {exc}")
    return Plan(study_uid, decision, graph, decision.reason)
