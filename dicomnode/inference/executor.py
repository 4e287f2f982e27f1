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
- Memory: `run_chunks` takes the study a chunk of images at a time (decoded lazily by the
  caller) and merges the chunks' results, so decoded pixels and tensors never exceed a chunk;
  a dynamic batch's run holds at most `batch_bytes` (inputs and intermediate tensors, as
  working_memory.py estimates them), which bounds ONNX Runtime's arena.
- Pre-processing is done once per image and input spec (models sharing a spec share the
  tensors), batched, and dropped once no later stage needs it.
ONNX Runtime releases the GIL in `run`, so a thread per model gives real parallelism; at most
as many models run at once as the cores allow for their sessions' intra-op threads.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
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
from dicomnode.inference.preprocess import Geometry, SourceImage, prepare_batch
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
        batch_bytes: int = 256 << 20,
        chunk_bytes: int = 64 << 20,
        cores: int | None = None,
    ) -> None:
        self.registry = registry
        self.sessions = sessions
        self.max_batch = max_batch
        self.model_threads = model_threads
        self.batch_bytes = batch_bytes
        self.chunk_bytes = chunk_bytes  # what a job's loader puts in one chunk (run_chunks)
        self.cores = cores or os.cpu_count() or 1

    def concurrent_models(self, stage_size: int) -> int:
        """Models of a stage run at once: no more than the cores hold for their sessions'
        intra-op threads (0 = ONNX Runtime's default, every core), so none oversubscribe."""
        per_session = self.sessions.intra_op_threads or self.cores
        return max(1, min(self.model_threads, stage_size, self.cores // per_session))

    def run(self, graph: ResolvedGraph, images: Sequence[SourceImage]) -> GraphResult:
        """The graph over `images`, all in one chunk."""
        return self.run_chunks(graph, [images])

    def run_chunks(
        self, graph: ResolvedGraph, chunks: Iterable[Sequence[SourceImage]]
    ) -> GraphResult:
        """The graph over a study given chunk by chunk; one result, as if run at once.

        A model that fails in one chunk is not run again in later ones (it fails there with
        the same error); what depends on a failed model is not run for any image.
        """
        merged: dict[str, ModelResult] = {}
        uids: list[str] = []
        for chunk in chunks:
            if not chunk:
                continue
            failed = {m: r.error or "failed" for m, r in merged.items() if r.status == "failed"}
            part = self._run_graph(graph, chunk, failed)
            uids.extend(i.sop_instance_uid for i in chunk)
            for model_id, result in part.items():
                merged[model_id] = (result if model_id not in merged
                                    else _merge(merged[model_id], result))
            # Let this chunk's pixels go before the loader decodes the next one.
            del chunk, part
        _block_dependants(graph, merged, uids)
        return GraphResult(graph, uids, merged)

    def _run_graph(
        self, graph: ResolvedGraph, images: Sequence[SourceImage], failed: dict[str, str]
    ) -> dict[str, ModelResult]:
        results: dict[str, ModelResult] = {}
        cache = _TensorCache()
        needed = self._specs_by_stage(graph)
        for index, stage in enumerate(graph.stages):
            workers = self.concurrent_models(len(stage))
            with ThreadPoolExecutor(workers, thread_name_prefix="model") as pool:
                futures = {
                    m: pool.submit(self._run_model, graph, m, images, results, cache,
                                   failed.get(m))
                    for m in stage
                }
                # Results are published after the whole stage: no model reads a peer's.
                stage_results = {m: f.result() for m, f in futures.items()}
            results.update(stage_results)
            later = set().union(*needed[index + 1:]) if index + 1 < len(needed) else set()
            cache.keep(later)
            if not later:  # no later model resizes these images: drop the PIL copies
                for image in images:
                    image.release()
        return results

    def _specs_by_stage(self, graph: ResolvedGraph) -> list[set[str]]:
        """Per stage, the tensor-input specs (cache keys) its models read."""
        keys: list[set[str]] = []
        for stage in graph.stages:
            found: set[str] = set()
            for model_id in stage:
                try:
                    manifest = self.registry.get(model_id, graph.models[model_id]).manifest
                except Exception:  # an unknown model fails in _run_model, with its reason
                    continue
                found.update(_spec_key(s) for s in manifest.tensor_inputs)
            keys.append(found)
        return keys

    # -- one model ---------------------------------------------------------------------------

    def _run_model(
        self,
        graph: ResolvedGraph,
        model_id: str,
        images: Sequence[SourceImage],
        done: dict[str, ModelResult],
        cache: _TensorCache,
        failed_before: str | None = None,
    ) -> ModelResult:
        result = ModelResult(model_id, graph.models[model_id])
        if failed_before is not None:  # it failed on an earlier chunk: it would again
            result.status = "failed"
            result.error = failed_before
            _fail_all(result, images)
            return result
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
            _fail_all(result, images)
        return result

    def _batch_size(self, manifest: Manifest, loaded: LoadedModel, count: int) -> tuple[int, bool]:
        """(batch size, fixed?) from the manifest and the session's real input shape."""
        for spec in manifest.tensor_inputs:
            if isinstance(spec.batch, int):
                return spec.batch, True
        for shape in loaded.input_shapes.values():
            if shape and isinstance(shape[0], int):
                return shape[0], True
        # A dynamic batch's run holds at most `batch_bytes` (inputs and intermediate
        # tensors): ONNX Runtime's arena grows to the largest run and keeps it (a 768 x 768
        # segmenter: 100-730 MB per image of batch).
        per_image = _input_bytes(manifest, loaded) + loaded.activation_bytes
        by_bytes = max(1, self.batch_bytes // per_image) if per_image else self.max_batch
        return max(1, min(self.max_batch, count, by_bytes)), False

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
        feeds: dict[str, NDArray[Any]] = {}
        geometries: dict[str, Geometry] = {}
        for spec in manifest.inputs:
            if isinstance(spec, TensorInput):
                tensor, found = cache.batch(chunk, spec)
                for image, geometry in zip(chunk, found, strict=True):
                    geometries.setdefault(image.sop_instance_uid, geometry)
                feeds[spec.name] = tensor
                continue
            values = []
            for image in chunk:
                uid = image.sop_instance_uid
                value, upstream = _upstream(self.registry, graph, result.model_id, spec, uid,
                                            done)
                values.append(value)
                if upstream is not None:
                    geometries.setdefault(uid, upstream)
            feeds[spec.name] = np.stack(values)
        result.geometry.update(geometries)
        return feeds

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
    """Pre-processed tensors by input spec and image: models sharing a spec share the work."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spec_locks: dict[str, threading.Lock] = {}
        self._items: dict[str, dict[str, tuple[NDArray[Any], Geometry]]] = {}

    def batch(
        self, images: Sequence[SourceImage], spec: TensorInput
    ) -> tuple[NDArray[Any], list[Geometry]]:
        """The stacked tensors of `images` for `spec`, prepared once per image."""
        key = _spec_key(spec)
        with self._lock:
            spec_lock = self._spec_locks.setdefault(key, threading.Lock())
            items = self._items.setdefault(key, {})
        # Two models of a stage with the same spec: the second waits and reuses the tensors.
        with spec_lock:
            missing = [i for i in images if i.sop_instance_uid not in items]
            if missing:
                tensors, geometries = prepare_batch(missing, spec)
                for index, image in enumerate(missing):
                    items[image.sop_instance_uid] = (tensors[index], geometries[index])
                if len(missing) == len(images):  # freshly made, in order: no copy
                    return tensors, geometries
            hits = [items[i.sop_instance_uid] for i in images]
        return np.stack([h[0] for h in hits]), [h[1] for h in hits]

    def keep(self, keys: set[str]) -> None:
        """Forget every spec not in `keys` (no later model reads it)."""
        with self._lock:
            for key in [k for k in self._items if k not in keys]:
                del self._items[key]


def _spec_key(spec: TensorInput) -> str:
    return spec.model_dump_json(exclude={"name"})


def _input_bytes(manifest: Manifest, loaded: LoadedModel) -> int:
    """Bytes of one image's inputs (the session's shape, else the manifest's size)."""
    total = 0
    for spec in manifest.inputs:
        shape = loaded.input_shapes.get(spec.name, ())
        dims: list[int | str | None] = list(shape[1:])
        if not shape or not all(isinstance(d, int) for d in dims):
            if not isinstance(spec, TensorInput):
                continue
            dims = [spec.size[0], spec.size[1], 1 if spec.colour in ("green", "grey") else 3]
        count = int(np.prod([d for d in dims if isinstance(d, int)]))
        total += count * np.dtype(spec.dtype).itemsize
    return total


def _fail_all(result: ModelResult, images: Sequence[SourceImage]) -> None:
    failed = reasons.MODEL_FAILED.with_detail(f"{result.model_id} failed: {result.error}")
    for image in images:
        result.not_analysed.setdefault(image.sop_instance_uid, failed)


def _merge(first: ModelResult, second: ModelResult) -> ModelResult:
    """One model's results on two chunks of a study, as one result."""
    merged = ModelResult(first.model_id, first.version)
    statuses = {first.status, second.status}
    if "failed" in statuses:
        merged.status = "failed"
        merged.error = first.error if first.status == "failed" else second.error
    elif "ok" in statuses:
        merged.status = "ok"
    else:
        merged.status = "skipped"
        merged.error = first.error or second.error
    merged.provider = first.provider or second.provider
    merged.batch_size = max(first.batch_size, second.batch_size)
    starts = [t for t in (first.started_at, second.started_at) if t is not None]
    ends = [t for t in (first.finished_at, second.finished_at) if t is not None]
    merged.started_at = min(starts) if starts else None
    merged.finished_at = max(ends) if ends else None
    durations = [d for d in (first.duration_ms, second.duration_ms) if d is not None]
    merged.duration_ms = sum(durations) if durations else None
    merged.run_images = [*first.run_images, *second.run_images]
    for name in ("skipped", "geometry", "gated", "gate_reasons", "not_analysed"):
        getattr(merged, name).update(getattr(first, name))
        getattr(merged, name).update(getattr(second, name))
    for name in ("raw", "findings"):
        target = getattr(merged, name)
        for part in (getattr(first, name), getattr(second, name)):
            for output, per_image in part.items():
                target.setdefault(output, {}).update(per_image)
    if merged.status == "failed":
        # As when the study runs in one chunk: a failed model reports no image, and each
        # image it ran on in another chunk is "not analysed: failed" too.
        failed = reasons.MODEL_FAILED.with_detail(f"{merged.model_id} failed: {merged.error}")
        for uid in merged.run_images:
            merged.not_analysed.setdefault(uid, failed)
        merged.run_images, merged.raw, merged.findings = [], {}, {}
    return merged


def _block_dependants(graph: ResolvedGraph, results: dict[str, ModelResult],
                      uids: list[str]) -> None:
    """A model whose dependency failed (on any chunk) is not run for any image, as when the
    study runs in one chunk."""
    for model_id in graph.order:
        result = results.get(model_id)
        if result is None or result.status == "failed":
            continue
        broken = [d for d in graph.dependencies(model_id) if d in results and (
            results[d].status == "failed" or GraphResult._blocked(results[d]))]
        if not broken or GraphResult._blocked(result):
            continue
        error = f"not run: needs {', '.join(broken)}, which did not run"
        blocked = ModelResult(model_id, result.version, status="skipped", error=error)
        for uid in uids:
            blocked.skipped[uid] = error
            blocked.not_analysed[uid] = reasons.UPSTREAM_FAILED.with_detail(error)
        results[model_id] = blocked


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
