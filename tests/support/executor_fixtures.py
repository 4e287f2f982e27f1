"""Extra tiny ONNX models for executor tests (a diamond graph, a slow model, a broken one).

Diamond: seg (image -> mask) -> slow-b, slow-c (mask -> fraction, made slow by a MatMul chain
that depends on the input so it cannot be constant-folded) -> total (b + c).
`broken` expects a 16 x 16 mask but is fed 32 x 32: it passes the registry checks, loads,
and fails at run time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.support.onnx_models import (
    BATCH,
    RegistryWriter,
    _base,
    _model,
    classifier_manifest,
    green_threshold_segmenter,
    mask_fraction_measurement,
    mean_colour_classifier,
    private_code,
    segmenter_manifest,
)


def slow_fraction(*, size: tuple[int, int] = (32, 32), side: int = 384, repeats: int = 12
                  ) -> onnx.ModelProto:
    """[N,1,H,W] mask -> [N,1] mask fraction, after `repeats` side x side MatMuls per image."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((side, side)) / np.sqrt(side)).astype(np.float32)
    base = rng.standard_normal((side, side)).astype(np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["mask"], ["t"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Reshape", ["t", "shape3"], ["t3"]),
        helper.make_node("Mul", ["t3", "base"], ["x0"]),
    ]
    for i in range(repeats):
        nodes.append(helper.make_node("MatMul", [f"x{i}", "W"], [f"x{i + 1}"]))
    nodes += [
        helper.make_node("ReduceMean", [f"x{repeats}"], ["m"], axes=[1, 2], keepdims=0),
        helper.make_node("Mul", ["m", "zero"], ["m0"]),
        helper.make_node("Add", ["t", "m0"], ["tt"]),
        helper.make_node("Unsqueeze", ["tt", "one"], ["fraction"]),
    ]
    inits = [
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(base, "base"),
        numpy_helper.from_array(np.array([-1, 1, 1], dtype=np.int64), "shape3"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "one"),
    ]
    graph = helper.make_graph(
        nodes, "slow_fraction",
        [helper.make_tensor_value_info("mask", TensorProto.FLOAT, [BATCH, 1, *size])],
        [helper.make_tensor_value_info("fraction", TensorProto.FLOAT, [BATCH, 1])],
        inits,
    )
    return _model(graph)


def sum_of_two() -> onnx.ModelProto:
    """[N,1] + [N,1] -> [N,1]."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["total"])], "sum_of_two",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [BATCH, 1]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [BATCH, 1])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, [BATCH, 1])],
    )
    return _model(graph)


def broken_fraction() -> onnx.ModelProto:
    """Declares a [N,1,16,16] mask input, but its upstream segmenter makes 32 x 32 masks:
    the session loads, and every run fails with ORT's invalid-dimensions error."""
    return mask_fraction_measurement(size=(16, 16))


def measurement_from(model_id: str, sources: dict[str, str], *, output: str = "fraction",
                     requires: tuple[str, ...] = ()) -> dict[str, Any]:
    """A measurement manifest whose inputs (name -> 'model.output') come from upstream."""
    m = _base(model_id, "1.0.0", "measurement", modalities=("OP",), requires=requires,
              conflicts=())
    m["inputs"] = [{"name": name, "from": src} for name, src in sources.items()]
    m["outputs"] = [{"kind": "measurement", "name": output,
                     "code": private_code(model_id.upper()[:16], model_id),
                     "unit": {"code": "1", "meaning": "no units"}}]
    return m


def write_diamond(root: Path, *, slow_repeats: int = 12) -> RegistryWriter:
    """seg -> (slow-b, slow-c) -> total, plus a gate and a broken model for other tests.

    quality (gate: no green = ungradable) <- gated-seg <- gated-fraction;
    seg -> broken -> after-broken.
    """
    writer = RegistryWriter(root)
    writer.add(segmenter_manifest("seg", modalities=("OP",)))
    slow = slow_fraction(repeats=slow_repeats)
    writer.add(measurement_from("slow-b", {"mask": "seg.mask"}), slow)
    writer.add(measurement_from("slow-c", {"mask": "seg.mask"}), slow)
    writer.add(measurement_from("total", {"a": "slow-b.fraction", "b": "slow-c.fraction"},
                                output="total"), sum_of_two())
    # A bias towards "ungradable" so that an image with no green at all is ungradable.
    writer.add(classifier_manifest("quality", modalities=("OP",)),
               mean_colour_classifier(bias=[1.0, 0.0]))
    writer.add(segmenter_manifest("gated-seg", modalities=("OP",), requires=("quality",)))
    writer.add(measurement_from("gated-fraction", {"mask": "gated-seg.mask"}), slow_fraction(
        repeats=1))
    writer.add(measurement_from("broken", {"mask": "seg.mask"}), broken_fraction())
    writer.add(measurement_from("after-broken", {"mask": "seg.mask"},
                                requires=("broken",)), slow_fraction(repeats=1))
    return writer


# --- studies in a database, presets ------------------------------------------------------------


def disc_rgb(size: int = 96, green: int = 200) -> np.ndarray[Any, Any]:
    """A red disc (the field of view) on black, filled with `green`."""
    rgb = np.zeros((size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    inside = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 2 - 2) ** 2
    rgb[inside] = (200, green, 0)
    return rgb


def write_preset(folder: Path, preset_id: str, models: list[str],
                 routing: dict[str, Any] | None = None, **extra: Any) -> Path:
    """A preset file; `extra` adds top-level keys (e.g. completeness={"quiet_seconds": 30})."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{preset_id}.yaml"
    path.write_text(yaml.safe_dump({
        "id": preset_id, "name": preset_id, "audience": "tests",
        "description": "test preset", "models": models,
        "routing": routing or {"modality": ["OP"]}, **extra,
    }), encoding="utf-8")
    return path


def write_fuzz_screening(root: Path, audience: str) -> tuple[Path, Path]:
    """A registry with one cheap OP segmenter and a preset "screening" running it (SR + SEG,
    no overlay, to `pacs`), under `root`: what the fuzz test and the soak feed mutants to."""
    import yaml

    registry = root / "registry"
    RegistryWriter(registry).add(segmenter_manifest("vessel-seg", modalities=("OP",)),
                                 green_threshold_segmenter(threshold=0.3))
    presets = root / "presets"
    presets.mkdir()
    (presets / "screening.yaml").write_text(yaml.safe_dump({
        "id": "screening", "name": "Screening", "audience": audience,
        "description": f"{audience} preset", "models": ["vessel-seg"],
        "outputs": {"sr": True, "seg": True, "overlay": False},
        "destinations": ["pacs"], "routing": {"modality": ["OP"]},
    }), encoding="utf-8")
    return registry, presets


def add_study(database: Any, storage: Path, greens: list[int], *, state: str = "complete",
              study_uid: str | None = None) -> tuple[str, list[str]]:
    """Store OP instances (one per green value) and their rows; return (study uid, sop uids)."""
    from pydicom.uid import generate_uid

    from dicomnode.db.models import Instance, Series, Study, utcnow
    from dicomnode.receive.storage import relative_path
    from dicomnode.synthetic import op_dataset

    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    sops = []
    now = utcnow()
    with database.transaction() as session:
        study = Study(study_uid=study_uid, state=state, created_at=now, updated_at=now,
                      last_instance_at=now, needs_reprocess=False, completed_at=now,
                      calling_ae="CAM1", called_ae="DICOMNODE")
        session.add(study)
        session.flush()
        series = Series(study_id=study.id, series_uid=series_uid, modality="OP", created_at=now)
        session.add(series)
        session.flush()
        for index, green in enumerate(greens):
            laterality: Literal["L", "R"] = "R" if index % 2 == 0 else "L"
            ds = op_dataset(disc_rgb(green=green), laterality=laterality, study_uid=study_uid,
                            series_uid=series_uid, instance_number=index + 1)
            rel = relative_path(study_uid, series_uid, str(ds.SOPInstanceUID))
            (storage / rel).parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(storage / rel, enforce_file_format=True)
            session.add(Instance(
                study_id=study.id, series_id=series.id, sop_instance_uid=ds.SOPInstanceUID,
                sop_class_uid=ds.SOPClassUID, transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                modality="OP", laterality=laterality, path=rel.as_posix(),
                size_bytes=(storage / rel).stat().st_size, calling_ae="CAM1", received_at=now,
                late=False,
            ))
            sops.append(str(ds.SOPInstanceUID))
    return study_uid, sops


def mark_late(database: Any, study_uid: str, *, seconds_ago: float = 60.0) -> None:
    """Flag a finished study for re-processing as the receiver does for a late instance, the
    last one `seconds_ago` (the late re-run waits for the quiet period after it)."""
    from datetime import timedelta

    from sqlalchemy import update

    from dicomnode.db.models import Study, utcnow

    with database.transaction() as session:
        session.execute(update(Study).where(Study.study_uid == study_uid).values(
            needs_reprocess=True, last_instance_at=utcnow() - timedelta(seconds=seconds_ago)))
