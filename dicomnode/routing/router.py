"""Choose the preset for a study, and explain the choice condition by condition.

The enabled preset of highest priority whose conditions all hold wins (ties: lowest id, and
the reason says so); else the modality default from the settings; else "not routed" with the
reason (the study is stored, not processed).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from dicomnode.routing.facts import StudyFacts
from dicomnode.routing.preset import Preset, RoutingConditions
from dicomnode.routing.tags import describe_tag

# Condition name -> the tags it reads (first present wins per instance for laterality).
FIELD_TAGS: dict[str, tuple[str, ...]] = {
    "modality": ("00080060",),
    "station_name": ("00081010",),
    "institution": ("00080080",),
    "manufacturer": ("00080070",),
    "manufacturer_model": ("00081090",),
    "body_part": ("00180015",),
    "laterality": ("00200062", "00200060"),  # Image Laterality, else Laterality
}
Via = Literal["preset", "modality_default", "none"]


@dataclass(frozen=True)
class ConditionResult:
    condition: str
    held: bool
    expected: tuple[str, ...]
    seen: tuple[str, ...]

    @property
    def text(self) -> str:
        seen = ", ".join(self.seen) if self.seen else "nothing (absent)"
        verdict = "held" if self.held else "failed"
        return f"{self.condition}: expected {' or '.join(self.expected)}; saw {seen} -> {verdict}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "condition": self.condition,
            "held": self.held,
            "expected": list(self.expected),
            "seen": list(self.seen),
        }


@dataclass(frozen=True)
class PresetExplanation:
    preset: str
    enabled: bool
    priority: int
    matched: bool
    conditions: tuple[ConditionResult, ...]
    note: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "enabled": self.enabled,
            "priority": self.priority,
            "matched": self.matched,
            "note": self.note,
            "conditions": [c.to_dict() for c in self.conditions],
        }


@dataclass(frozen=True)
class RoutingDecision:
    preset: str | None
    via: Via
    reason: str
    explanations: tuple[PresetExplanation, ...]

    @property
    def routed(self) -> bool:
        return self.preset is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "via": self.via,
            "reason": self.reason,
            "explanations": [e.to_dict() for e in self.explanations],
        }


def _norm(value: str) -> str:
    return value.strip().casefold()


def _seen(facts: StudyFacts, condition: str) -> list[str]:
    if condition == "calling_ae":
        return list(facts.calling_ae_titles)
    if condition == "called_ae":
        return list(facts.called_ae_titles)
    seen = set()
    for instance in facts.instances:
        for tag in FIELD_TAGS[condition]:
            if instance.get(tag):
                seen.add(instance[tag])
                break
    return sorted(seen)


def evaluate_conditions(conditions: RoutingConditions, facts: StudyFacts) -> list[ConditionResult]:
    results = []
    for name in ("modality", "calling_ae", "called_ae", *list(FIELD_TAGS)[1:]):
        expected: list[str] = getattr(conditions, name)
        if not expected:
            continue
        seen = _seen(facts, name)
        wanted = {_norm(v) for v in expected}
        held = any(_norm(v) in wanted for v in seen)
        results.append(ConditionResult(name, held, tuple(expected), tuple(seen)))
    for tag_condition in conditions.tags:
        pattern = tag_condition.pattern()
        seen = facts.values(tag_condition.tag_key)
        held = any(pattern.search(v) for v in seen)
        flags = " (ignoring case)" if tag_condition.ignore_case else ""
        results.append(
            ConditionResult(
                f"tag {describe_tag(tag_condition.tag_key)}",
                held,
                (f"/{tag_condition.regex}/{flags}",),
                tuple(seen),
            )
        )
    return results


def explain_preset(preset: Preset, facts: StudyFacts) -> PresetExplanation:
    results = tuple(evaluate_conditions(preset.routing, facts))
    failed = [r.condition for r in results if not r.held]
    if not results:
        note, matched = "no routing conditions: chosen only as a modality default", False
    elif failed:
        note, matched = f"failed: {', '.join(failed)}", False
    elif not preset.enabled:
        note, matched = "conditions held, but the preset is disabled", False
    else:
        note, matched = f"all {len(results)} conditions held", True
    if not preset.enabled and (failed or not results):
        note = "disabled; " + note
    return PresetExplanation(preset.id, preset.enabled, preset.priority, matched, results, note)


def route(
    facts: StudyFacts,
    presets: Iterable[Preset],
    modality_defaults: Mapping[str, str],
) -> RoutingDecision:
    by_id = {p.id: p for p in presets}
    explanations = tuple(
        explain_preset(p, facts)
        for p in sorted(by_id.values(), key=lambda p: (-p.priority, p.id))
    )
    matched = [e for e in explanations if e.matched]  # already in (priority desc, id) order
    if matched:
        best = matched[0]
        reason = f"preset '{best.preset}' (priority {best.priority}): {best.note}"
        tied = [e.preset for e in matched[1:] if e.priority == best.priority]
        if tied:
            reason += (
                f"; tie at priority {best.priority} with {', '.join(tied)}: "
                f"'{best.preset}' chosen as first by id"
            )
        lower = [e.preset for e in matched[1:] if e.priority < best.priority]
        if lower:
            reason += f"; also matched at lower priority: {', '.join(lower)}"
        return RoutingDecision(best.preset, "preset", reason, explanations)

    why_not = "no enabled preset's routing conditions all held"
    modalities = facts.modalities
    notes = []
    for modality in modalities:
        default = modality_defaults.get(modality)
        if default is None:
            continue
        preset = by_id.get(default)
        if preset is None:
            notes.append(f"the default for {modality}, '{default}', is not a loaded preset")
        elif not preset.enabled:
            notes.append(f"the default for {modality}, '{default}', is disabled")
        else:
            reason = f"{why_not}; modality default for {modality}: '{default}'"
            return RoutingDecision(default, "modality_default", reason, explanations)
    if not notes:
        listed = ", ".join(sorted(modality_defaults)) or "none"
        seen = ", ".join(modalities) or "no modality"
        notes.append(f"no modality default for {seen} (defaults exist for: {listed})")
    reason = f"not routed (stored, not processed): {why_not}; {'; '.join(notes)}"
    return RoutingDecision(None, "none", reason, explanations)
