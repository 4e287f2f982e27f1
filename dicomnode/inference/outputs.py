"""Raw outputs stored with the job: one `.npz` per model plus `index.json`.

Encoding results (SR, SEG) is a separate, re-runnable step that reads only this folder.
The folder is written under a temporary name and swapped into place, so a re-run after a
crash replaces the outputs whole: a reader never sees half of one attempt and half of another.

npz keys: `raw__<output>` stacks the model-space output of the images the model ran on (in
`images` order): for masks that is the probability map, which `postprocess.mask_to_source`
maps onto the source frame with the geometry in the index. `source__<output>__<k>` is the
thresholded mask over the k-th image's source frame, bit-packed (`np.unpackbits(a,
count=h*w).reshape(h, w)` with `shape` from the index): 1 bit a pixel keeps 4000 x 4000
frames small without compression, which was slower than inference.

A measurement's entry holds `values`: what it reports, each `{value, unit}` (a pixel measure:
source pixels, then mm / mm2 where the image has Pixel Spacing); `value`/`unit` repeat the first.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from dicomnode.durable import fsync_path
from dicomnode.inference.executor import GraphResult, ModelResult
from dicomnode.inference.postprocess import (
    binary_mask_to_source,
    box_to_source,
    measured_values,
    point_to_source,
)
from dicomnode.registry.manifest import (
    BoxOutput,
    MaskOutput,
    MeasurementOutput,
    PointOutput,
    ProbabilitiesOutput,
)
from dicomnode.registry.registry import Registry

logger = logging.getLogger(__name__)

INDEX_NAME = "index.json"
_POST_THREADS = 4


def _code(code: Any) -> dict[str, str]:
    return {"scheme": code.scheme, "value": code.value, "meaning": code.meaning}


def _model_entry(
    result: ModelResult, registry: Registry, folder: Path
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "version": result.version,
        "status": result.status,
        "error": result.error,
        "provider": result.provider,
        "batch_size": result.batch_size,
        "images": list(result.run_images),
        "skipped": dict(result.skipped),
        "gated": dict(result.gated),
        "not_analysed": {uid: r.to_dict() for uid, r in result.not_analysed.items()},
        "outputs": {},
    }
    if result.status != "ok":
        return entry
    manifest = registry.get(result.model_id, result.version).manifest
    arrays: dict[str, np.ndarray[Any, Any]] = {}
    for name, per_image in result.raw.items():
        arrays[f"raw__{name}"] = np.stack([per_image[uid] for uid in result.run_images])
    # Mapping masks back to full-resolution source frames is the costly part; PIL's resize
    # releases the GIL, so the images are done in parallel.
    masks = {
        spec.name: _masks_to_source(result, spec) for spec in manifest.outputs
        if isinstance(spec, MaskOutput)
    }
    for spec in manifest.outputs:
        values = result.raw.get(spec.name, {})
        per: dict[str, Any] = {}
        for k, uid in enumerate(result.run_images):
            if uid not in values:
                continue
            value = values[uid]
            geometry = result.geometry.get(uid)
            if isinstance(spec, ProbabilitiesOutput):
                per[uid] = result.findings[spec.name][uid].to_dict()
            elif isinstance(spec, MeasurementOutput):
                reported = measured_values(value, spec, geometry)
                per[uid] = {"value": reported[0].value, "unit": reported[0].unit.code,
                            "values": [m.to_dict() for m in reported]}
            elif isinstance(spec, MaskOutput) and uid in masks[spec.name]:
                packed, shape, area = masks[spec.name][uid]
                key = f"source__{spec.name}__{k}"
                arrays[key] = packed
                per[uid] = {
                    "key": key,
                    "shape": list(shape),
                    "threshold": spec.threshold,
                    "area_pixels": area,
                    "geometry": result.geometry[uid].to_dict(),
                }
            elif isinstance(spec, PointOutput) and geometry is not None:
                per[uid] = {"xy": point_to_source(value, spec, geometry)}
            elif isinstance(spec, BoxOutput) and geometry is not None:
                per[uid] = {"box": box_to_source(value, spec, geometry)}
        description: dict[str, Any] = {"kind": spec.kind, "key": f"raw__{spec.name}",
                                       "per_image": per}
        if isinstance(spec, MeasurementOutput | PointOutput | BoxOutput):
            description["code"] = _code(spec.code)
        entry["outputs"][spec.name] = description
    file_name = f"{result.model_id}.npz"
    # Uncompressed: zlib took longer than inference itself (measured with the bench script).
    np.savez(folder / file_name, **arrays)  # type: ignore[arg-type]
    entry["file"] = file_name
    return entry


def _masks_to_source(
    result: ModelResult, spec: MaskOutput
) -> dict[str, tuple[NDArray[np.uint8], tuple[int, int], int]]:
    """uid -> (bit-packed source-frame mask, its shape, its area): packed as each is made, so
    the full-size masks of a study are never all in memory at once."""
    values = result.raw.get(spec.name, {})
    uids = [u for u in result.run_images if u in values and u in result.geometry]

    def one(uid: str) -> tuple[NDArray[np.uint8], tuple[int, int], int]:
        binary = binary_mask_to_source(values[uid], result.geometry[uid], spec)
        return (np.packbits(binary, axis=None), (binary.shape[0], binary.shape[1]),
                int(np.count_nonzero(binary)))

    with ThreadPoolExecutor(_POST_THREADS, thread_name_prefix="post") as pool:
        return dict(zip(uids, pool.map(one, uids), strict=True))


def write_outputs(
    target: Path, result: GraphResult, registry: Registry, meta: dict[str, Any]
) -> dict[str, Any]:
    """Write the job's outputs to `target` (replacing any earlier attempt); return the index."""
    target.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    staging = target.with_name(f"{target.name}.staging-{token}")
    staging.mkdir()
    try:
        index: dict[str, Any] = {
            **meta,
            "outcome": result.outcome,
            "problems": result.problems(),
            "graph": result.graph.to_dict(),
            "images": list(result.images),
            "models": {
                m: _model_entry(result.models[m], registry, staging)
                for m in result.graph.order if m in result.models
            },
        }
        (staging / INDEX_NAME).write_text(json.dumps(index, indent=2), encoding="utf-8")
        _fsync_tree(staging)
        _swap(staging, target, token)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return index


def _swap(staging: Path, target: Path, token: str) -> None:
    """Put `staging` at `target`; an earlier attempt's folder is moved aside, then removed."""
    old = target.with_name(f"{target.name}.old-{token}")
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    # Leftovers of attempts that crashed half-way are someone else's staging only if a
    # second worker holds the job, which the lease rules out; clear them.
    for leftover in target.parent.glob(f"{target.name}.*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        fsync_path(path)
    fsync_path(folder)


def read_index(folder: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8"))
    return data


def source_mask(npz: Any, entry: dict[str, Any]) -> np.ndarray[Any, np.dtype[np.bool_]]:
    """The binary source-frame mask described by an index entry (`key`, `shape`)."""
    height, width = entry["shape"]
    bits = np.unpackbits(npz[entry["key"]], count=height * width)
    return bits.reshape(height, width).astype(bool)
