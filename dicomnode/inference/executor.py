"""Run a resolved graph over a study's images: stages in order, one stage's models at once.

- Data flows through `graph.inputs` (consumer -> input -> "source.output"): a downstream model
  gets the upstream model's raw output for the same image, in the upstream model's space (or,
  for an input that says `binarise`, that mask thresholded at the upstream's own threshold).
- Gating: an image a model skipped, or that one of its gates marked ineligible, is skipped by
  every model that depends on it (directly or through others), with the reason.
- Failure: a model that raises fails; what depends on it is not run ("skipped", naming the
  failed model); the rest of the graph carries on.
- Every image a model did not analyse gets a coded reason in `not_analysed` (reasons.py):
  skipped by a requirement, a gate or an upstream model, or lost to a failure.
ONNX Runtime releases the GIL in `run`, so a thread per model gives real parallelism.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from dicomnode.errors import InferenceUnavailableError
from dicomnode.graph.model import ResolvedGraph
from dicomnode.inference import reasons
from dicomnode.inference.postprocess import Finding, binary_mask, classify, gate_not_analysed
from dicomnode.inference.preprocess import Geometry, SourceImage, prepare
from dicomnode.inference.reasons import NotAnalysedReason
from dicomnode.inference.sessions import LoadedModel, SessionPool
from dicomnode.registry.manifest import (
    Manifest,
    MaskOutput,
    ProbabilitiesOutput,
    TensorInput,
    UpstreamInput,
)
from dicomnode.registry.registry import Registry

logger = logging.getLogger(__name__)

RunStatus = Literal["ok", "skipped", "failed"]
JobOutcome = Literal["done", "partial", "failed"]


@dataclass
class ModelResult:
    """What one model did in one job."""

    model_id: str
    version: str
    status: RunStatus = "ok"
    error: str | None = None
    provider: str | None = None
    batch_size: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_ms: float | None = None
    run_images: list[str] = field(default_factory=list)  # SOP Instance UIDs, in run order
    skipped: dict[str, str] = field(default_factory=dict)  # uid -> reason
    raw: dict[str, dict[str, NDArray[Any]]] = field(default_factory=dict)  # output -> uid -> array
    geometry: dict[str, Geometry] = field(default_factory=dict)
    findings: dict[str, dict[str, Finding]] = field(default_factory=dict)  # output -> uid -> ...
    gated: dict[str, str] = field(default_factory=dict)  # uid -> reason (from this model's gates)
    gate_reasons: dict[str, NotAnalysedReason] = field(default_factory=dict)  # coded `gated`
    # uid -> coded reason, for every image this model did not analyse (skipped or failed).
    not_analysed: dict[str, NotAnalysedReason] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.model_id}@{self.version}"


@dataclass
class GraphResult:
    graph: ResolvedGraph
    images: list[str]
    models: dict[str, ModelResult]

    @property
    def outcome(self) -> JobOutcome:
        if not self.problems():
            return "done"
        # Something ran and produced outputs worth keeping: partial, not failed.
        return "partial" if any(r.status == "ok" for r in self.models.values()) else "failed"

    @staticmethod
    def _blocked(result: ModelResult) -> bool:
        return result.status == "skipped" and result.error is not None

    def problems(self) -> dict[str, str]:
        """model -> why it failed or was not run."""
        return {
            m: r.error or "failed"
            for m, r in self.models.items()
            if r.status == "failed" or self._blocked(r)
        }


class GraphExecutor:
    """Runs graphs with shared sessions; one instance serves every job worker."""

    def __init__(
        self,
        registry: Registry,
        sessions: SessionPool,
        *,
        max_batch: int = 16,
        model_threads: int = 4,
    ) -> None:
        self.registry = registry
        self.sessions = sessions
        self.max_batch = max_batch
        self.model_threads = model_threads

    def run(self, graph: ResolvedGraph, images: Sequence[SourceImage]) -> GraphResult:
        results: dict[str, ModelResult] = {}
        cache = _TensorCache()
        for stage in graph.stages:
            workers = max(1, min(self.model_threads, len(stage)))
            with ThreadPoolExecutor(workers, thread_name_prefix="model") as pool:
                futures = {
                    m: pool.submit(self._run_model, graph, m, images, results, cache)
                    for m in stage
                }
                # Results are published after the whole stage: no model reads a peer's.
                stage_results = {m: f.result() for m, f in futures.items()}
            results.update(stage_results)
        return GraphResult(graph, [i.sop_instance_uid for i in images], results)

    # -- one model ---------------------------------------------------------------------------

    def _run_model(
        self,
        graph: ResolvedGraph,
        model_id: str,
        images: Sequence[SourceImage],
        done: dict[str, ModelResult],
        cache: _TensorCache,
    ) -> ModelResult:
        result = ModelResult(model_id, graph.models[model_id])
        dependencies = graph.dependencies(model_id)
        broken = [d for d in dependencies if done[d].status == "failed" or
                  GraphResult._blocked(done[d])]
        if broken:
            result.status = "skipped"
            result.error = f"not run: needs {', '.join(broken)}, which did not run"
            for image in images:
                uid = image.sop_instance_uid
                result.skipped[uid] = result.error
                result.not_analysed[uid] = reasons.UPSTREAM_FAILED.with_detail(result.error)
            return result
        try:
            manifest = self.registry.get(model_id, result.version).manifest
            for image in images:
                reason = _ineligible(image, manifest, dependencies, done)
                if reason is not None:
                    result.skipped[image.sop_instance_uid] = reason.detail
                    result.not_analysed[image.sop_instance_uid] = reason
            eligible = [i for i in images if i.sop_instance_uid not in result.skipped]
            if not eligible:
                result.status = "skipped"
                return result
            loaded = self.sessions.get(self.registry.get(model_id, result.version))
            result.provider = loaded.provider
            result.started_at = datetime.now(UTC)
            start = time.perf_counter()
            self._infer(graph, manifest, loaded, eligible, done, cache, result)
            result.duration_ms = (time.perf_counter() - start) * 1000.0
            result.finished_at = datetime.now(UTC)
            self._evaluate(manifest, result)
        except InferenceUnavailableError:  # the server, not the model: the job waits, retried
            raise
        except Exception as exc:  # one model's failure must not stop the graph
            result.status = "failed"
            result.error = f"{type(exc).__name__}: {_first_line(exc)}"
            result.finished_at = result.finished_at or datetime.now(UTC)
            logger.warning("model %s failed: %s", result.key, result.error)
            failed = reasons.MODEL_FAILED.with_detail(f"{model_id} failed: {result.error}")
            for image in images:
                result.not_analysed.setdefault(image.sop_instance_uid, failed)
        return result

    def _batch_size(self, manifest: Manifest, loaded: LoadedModel, count: int) -> tuple[int, bool]:
        """(batch size, fixed?) from the manifest and the session's real input shape."""
        for spec in manifest.tensor_inputs:
            if isinstance(spec.batch, int):
                return spec.batch, True
        for shape in loaded.input_shapes.values():
            if shape and isinstance(shape[0], int):
                return shape[0], True
        return max(1, min(self.max_batch, count)), False

    def _infer(
        self,
        graph: ResolvedGraph,
        manifest: Manifest,
        loaded: LoadedModel,
        eligible: list[SourceImage],
        done: dict[str, ModelResult],
        cache: _TensorCache,
        result: ModelResult,
    ) -> None:
        batch, fixed = self._batch_size(manifest, loaded, len(eligible))
        result.batch_size = batch
        names = [o.name for o in loaded.session.get_outputs()]
        collected: dict[str, list[NDArray[Any]]] = {n: [] for n in names}
        chunks = [eligible[i:i + batch] for i in range(0, len(eligible), batch)]

        def feeds_for(chunk: list[SourceImage]) -> dict[str, NDArray[Any]]:
            feeds = self._feeds(graph, manifest, chunk, done, cache, result)
            if fixed and len(chunk) < batch:  # a fixed batch dimension: pad, drop the pad later
                feeds = {
                    name: np.concatenate(
                        [value, np.zeros((batch - len(chunk), *value.shape[1:]), value.dtype)]
                    )
                    for name, value in feeds.items()
                }
            return feeds

        # Pre-process the next batch while this one runs (ORT releases the GIL in run), so a
        # fast accelerator is not left waiting for decoding and resizing.
        with ThreadPoolExecutor(1, thread_name_prefix="prep") as prep:
            pending = prep.submit(feeds_for, chunks[0])
            for index, chunk in enumerate(chunks):
                feeds = pending.result()
                if index + 1 < len(chunks):
                    pending = prep.submit(feeds_for, chunks[index + 1])
                outputs = loaded.session.run(None, feeds)
                for name, value in zip(names, outputs, strict=True):
                    collected[name].append(np.asarray(value)[:len(chunk)])
        uids = [i.sop_instance_uid for i in eligible]
        result.run_images = uids
        for name, parts in collected.items():
            stacked = np.concatenate(parts)
            if stacked.shape[0] != len(uids):
                raise ValueError(
                    f"output '{name}' has {stacked.shape[0]} rows for {len(uids)} images"
                )
            result.raw[name] = {uid: stacked[i] for i, uid in enumerate(uids)}

    def _feeds(
        self,
        graph: ResolvedGraph,
        manifest: Manifest,
        chunk: list[SourceImage],
        done: dict[str, ModelResult],
        cache: _TensorCache,
        result: ModelResult,
    ) -> dict[str, NDArray[Any]]:
        """The stacked inputs for a batch of images; records each image's geometry."""
        per_input: dict[str, list[NDArray[Any]]] = {spec.name: [] for spec in manifest.inputs}
        for image in chunk:
            uid = image.sop_instance_uid
            geometry: Geometry | None = None
            for spec in manifest.inputs:
                found: Geometry | None
                if isinstance(spec, TensorInput):
                    tensor, found = cache.get(image, spec)
                else:
                    tensor, found = _upstream(self.registry, graph, result.model_id, spec,
                                              uid, done)
                geometry = geometry or found
                per_input[spec.name].append(tensor)
            if geometry is not None:
                result.geometry[uid] = geometry
        return {name: np.stack(tensors) for name, tensors in per_input.items()}

    @staticmethod
    def _evaluate(manifest: Manifest, result: ModelResult) -> None:
        """Classify probabilities and apply gates (dependants read `gated`)."""
        for output in manifest.outputs:
            if not isinstance(output, ProbabilitiesOutput):
                continue
            values = result.raw.get(output.name)
            if values is None:
                raise ValueError(f"the model produced no output '{output.name}'")
            findings = {uid: classify(v, output) for uid, v in values.items()}
            result.findings[output.name] = findings
            for uid, finding in findings.items():
                reason = gate_not_analysed(finding, output, result.model_id)
                if reason is not None and uid not in result.gated:
                    result.gated[uid] = reason.detail
                    result.gate_reasons[uid] = reason


class _TensorCache:
    """Pre-processed tensors by (image, spec): models sharing an input spec share the work."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[tuple[str, str], tuple[NDArray[Any], Geometry]] = {}

    def get(self, image: SourceImage, spec: TensorInput) -> tuple[NDArray[Any], Geometry]:
        key = (image.sop_instance_uid, spec.model_dump_json(exclude={"name"}))
        with self._lock:
            hit = self._items.get(key)
        if hit is None:
            hit = prepare(image, spec)
            with self._lock:
                self._items[key] = hit
        return hit


def _ineligible(
    image: SourceImage,
    manifest: Manifest,
    dependencies: list[str],
    done: dict[str, ModelResult],
) -> NotAnalysedReason | None:
    """Why `manifest`'s model must not analyse `image`, or None. An upstream model's reason
    comes first and keeps its code: the root cause (e.g. "monochrome image") is what matters."""
    uid = image.sop_instance_uid
    for dep in dependencies:
        previous = done[dep]
        if uid in previous.skipped:
            return previous.not_analysed.get(uid) or reasons.UPSTREAM_SKIPPED.with_detail(
                previous.skipped[uid])
        if uid in previous.gated:
            return previous.gate_reasons.get(uid) or reasons.GATED.with_detail(
                previous.gated[uid])
    modality = (image.modality or "").strip().upper()
    if modality and modality not in manifest.modalities:
        return reasons.MODALITY.with_detail(
            f"modality {modality} is not one {manifest.id} accepts "
            f"({', '.join(manifest.modalities)})")
    need = manifest.requirements
    height, width = image.shape
    if height < need.min_height or width < need.min_width:
        return reasons.TOO_SMALL.with_detail(
            f"image {width}x{height} is smaller than {need.min_width}x{need.min_height}")
    if need.colour == "colour" and _is_grey(image.rgb):
        return reasons.MONOCHROME.with_detail(
            "needs a colour image; this one is monochrome (e.g. red-free)")
    return None


def _is_grey(rgb: NDArray[np.uint8]) -> bool:
    sample = rgb[::8, ::8].astype(np.int16)
    return bool(np.abs(sample[..., 0] - sample[..., 1]).max() == 0
                and np.abs(sample[..., 1] - sample[..., 2]).max() == 0)


def _upstream(
    registry: Registry,
    graph: ResolvedGraph,
    model_id: str,
    spec: UpstreamInput,
    uid: str,
    done: dict[str, ModelResult],
) -> tuple[NDArray[Any], Geometry | None]:
    ref = graph.inputs.get(model_id, {}).get(spec.name)
    if ref is None:  # the resolver binds every input; fall back to the first alternative
        ref = str(spec.sources[0])
    source_id, _, output = ref.partition(".")
    source = done[source_id]
    values = source.raw.get(output)
    if values is None or uid not in values:
        raise ValueError(f"input '{spec.name}': {ref} has no value for an image")
    value = values[uid]
    if spec.binarise:
        mask = registry.get(source_id, source.version).manifest.output(output)
        if not isinstance(mask, MaskOutput):  # the registry and resolver refuse this earlier
            raise ValueError(f"input '{spec.name}' binarises {ref}, which is not a mask")
        value = binary_mask(np.asarray(value, dtype=np.float32), mask)
    return value.astype(spec.dtype, copy=False), source.geometry.get(uid)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:500]
