"""The graph executor on tiny ONNX models: order, concurrency, data flow, gating, failure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from dicomnode.graph import Selection, resolve
from dicomnode.inference.executor import GraphExecutor
from dicomnode.inference.outputs import read_index, source_mask, write_outputs
from dicomnode.inference.preprocess import SourceImage
from dicomnode.inference.sessions import SessionPool
from dicomnode.inference.working_memory import activation_bytes_per_image
from dicomnode.registry import Registry, load_registry
from tests.support.executor_fixtures import write_diamond


def disc_image(size: int = 96, green: int = 200, square: tuple[int, int, int] | None = None
               ) -> NDArray[np.uint8]:
    """A red disc (the field of view) on black; `green` fills it; `square` = (top, left, side)
    of a bright-green patch (what the fixture segmenter finds)."""
    rgb = np.zeros((size, size + 32, 3), dtype=np.uint8)  # wider than tall: crop is square
    yy, xx = np.mgrid[0:size, 0:size + 32]
    inside = (yy - size / 2) ** 2 + (xx - (size + 32) / 2) ** 2 < (size / 2 - 2) ** 2
    rgb[inside] = (200, green, 0)
    if square is not None:
        top, left, side = square
        rgb[top:top + side, left:left + side] = (200, 255, 0)
    return rgb


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    root = tmp_path_factory.mktemp("registry")
    write_diamond(root)
    reg = load_registry(root)
    assert not reg.left_out, reg.left_out
    return reg


@pytest.fixture(scope="module")
def executor(registry: Registry) -> GraphExecutor:
    # One intra-op thread per session: the two middle models can only overlap if they
    # really run at the same time on separate threads.
    sessions = SessionPool(["CUDAExecutionProvider", "CPUExecutionProvider"],
                           intra_op_threads=1)
    return GraphExecutor(registry, sessions, max_batch=4, model_threads=4)


def images(count: int, **kwargs: object) -> list[SourceImage]:
    return [SourceImage(f"1.2.3.{i}", disc_image(**kwargs)) for i in range(count)]  # type: ignore[arg-type]


def test_diamond_runs_in_order_with_middle_models_overlapping(
    executor: GraphExecutor, registry: Registry
) -> None:
    graph = resolve(Selection.of(["total"], modality="OP"), registry)
    assert graph.stages == (("seg",), ("slow-b", "slow-c"), ("total",))
    result = executor.run(graph, images(6, square=(30, 50, 16)))
    assert result.outcome == "done", result.problems()
    runs = result.models
    for model in ("seg", "slow-b", "slow-c", "total"):
        assert runs[model].status == "ok"
        assert runs[model].started_at is not None and runs[model].finished_at is not None
    start = {m: r.started_at for m, r in runs.items() if r.started_at is not None}
    end = {m: r.finished_at for m, r in runs.items() if r.finished_at is not None}
    assert end["seg"] <= min(start["slow-b"], start["slow-c"])
    assert max(end["slow-b"], end["slow-c"]) <= start["total"]
    # Overlap: each of the middle models started before the other finished.
    assert start["slow-b"] < end["slow-c"] and start["slow-c"] < end["slow-b"]
    # Data flowed: total = b + c = 2 * the mask fraction the segmenter produced.
    for uid in result.images:
        fraction = float(runs["seg"].raw["mask"][uid].mean())
        assert fraction > 0
        assert runs["slow-b"].raw["fraction"][uid][0] == pytest.approx(fraction, rel=1e-4)
        assert runs["total"].raw["total"][uid][0] == pytest.approx(2 * fraction, rel=1e-4)
    assert runs["seg"].batch_size == 4  # max_batch: 6 images in batches of 4 and 2


def test_provider_in_use_is_recorded(executor: GraphExecutor, registry: Registry) -> None:
    graph = resolve(Selection.of(["seg"], modality="OP"), registry)
    result = executor.run(graph, images(1))
    loaded = executor.sessions.get(registry.get("seg"))
    assert result.models["seg"].provider == loaded.session.get_providers()[0]
    assert result.models["seg"].provider in loaded.session.get_providers()


def test_gate_skips_exactly_the_ineligible_images(
    executor: GraphExecutor, registry: Registry
) -> None:
    graph = resolve(Selection.of(["gated-fraction"], modality="OP"), registry)
    good = [SourceImage(f"good.{i}", disc_image(green=200)) for i in range(3)]
    bad = [SourceImage(f"bad.{i}", disc_image(green=0)) for i in range(2)]
    mixed = [good[0], bad[0], good[1], bad[1], good[2]]
    result = executor.run(graph, mixed)
    assert result.outcome == "done"
    quality = result.models["quality"]
    assert quality.run_images == [i.sop_instance_uid for i in mixed]
    assert set(quality.gated) == {"bad.0", "bad.1"}
    for model in ("gated-seg", "gated-fraction"):
        run = result.models[model]
        assert run.run_images == ["good.0", "good.1", "good.2"]
        assert set(run.skipped) == {"bad.0", "bad.1"}
        assert all("ungradable" in reason for reason in run.skipped.values())


def test_failure_fails_only_dependants_and_job_is_partial(
    executor: GraphExecutor, registry: Registry
) -> None:
    graph = resolve(Selection.of(["after-broken", "total"], modality="OP"), registry)
    result = executor.run(graph, images(2))
    runs = result.models
    assert runs["broken"].status == "failed"
    # It loaded (a provider was chosen) and failed when run on the wrong shape.
    assert runs["broken"].provider is not None
    assert "invalid dimensions" in (runs["broken"].error or "").lower()
    assert runs["after-broken"].status == "skipped"
    assert "broken" in (runs["after-broken"].error or "")
    for model in ("seg", "slow-b", "slow-c", "total"):
        assert runs[model].status == "ok", runs[model].error
    assert result.outcome == "partial"
    assert set(result.problems()) == {"broken", "after-broken"}


def test_outputs_written_and_replaced(
    executor: GraphExecutor, registry: Registry, tmp_path: Path
) -> None:
    graph = resolve(Selection.of(["total"], modality="OP"), registry)
    source = images(2, green=60, square=(30, 50, 16))
    result = executor.run(graph, source)
    target = tmp_path / "jobs" / "7"
    write_outputs(target, result, registry, {"job": 7})
    (target / "stale.txt").write_text("from a crashed attempt")
    index = write_outputs(target, result, registry, {"job": 7})
    assert not (target / "stale.txt").exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["7"]
    assert read_index(target) == index
    mask = index["models"]["seg"]["outputs"]["mask"]["per_image"]["1.2.3.0"]
    with np.load(target / "seg.npz") as npz:
        placed = source_mask(npz, mask)
        assert npz["raw__mask"].shape == (2, 1, 32, 32)  # the probability, model space
    # The green patch at rows 30..45, columns 50..65 comes back there, within one model
    # pixel (the 96-pixel crop ran at 32 x 32, so one model pixel is 3 source pixels).
    tolerance = 96 / 32
    rows, cols = np.nonzero(placed)
    assert abs(rows.min() - 30) <= tolerance and abs(rows.max() - 45) <= tolerance
    assert abs(cols.min() - 50) <= tolerance and abs(cols.max() - 65) <= tolerance
    assert placed.shape == (96, 128) and int(placed.sum()) == mask["area_pixels"]
    assert index["models"]["total"]["outputs"]["total"]["per_image"]["1.2.3.0"]["value"] > 0


def test_one_session_per_model_shared_across_threads(registry: Registry) -> None:
    import threading

    pool = SessionPool(["CPUExecutionProvider"])
    entry = registry.get("seg")
    got: list[object] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        got.append(pool.get(entry).session)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(got) == 8 and all(s is got[0] for s in got)
    assert [loaded.key for loaded in pool.loaded()] == ["seg@1.0.0"]
    assert pool.loaded()[0].provider == "CPUExecutionProvider"


def test_fixed_batch_is_padded_and_the_pad_dropped(tmp_path: Path) -> None:
    from tests.support.onnx_models import (
        RegistryWriter,
        green_threshold_segmenter,
        segmenter_manifest,
    )

    manifest = segmenter_manifest("pair-seg", modalities=("OP",))
    manifest["inputs"][0]["batch"] = 2
    RegistryWriter(tmp_path).add(manifest, green_threshold_segmenter(batch=2))
    registry = load_registry(tmp_path)
    assert not registry.left_out, registry.left_out
    executor = GraphExecutor(registry, SessionPool(["CPUExecutionProvider"]), max_batch=16)
    graph = resolve(Selection.of(["pair-seg"], modality="OP"), registry)
    source = [SourceImage(f"i.{k}", disc_image(green=60 if k != 1 else 200)) for k in range(3)]
    result = executor.run(graph, source)
    run = result.models["pair-seg"]
    assert run.status == "ok" and run.batch_size == 2
    assert run.run_images == ["i.0", "i.1", "i.2"]
    fractions = [float(run.raw["mask"][uid].mean()) for uid in run.run_images]
    assert fractions[1] > 0.5 > fractions[0] and fractions[0] == pytest.approx(fractions[2])


def test_a_study_in_chunks_gives_the_result_of_one_run(
    executor: GraphExecutor, registry: Registry
) -> None:
    graph = resolve(Selection.of(["gated-fraction"], modality="OP"), registry)
    good = [SourceImage(f"good.{i}", disc_image(green=200)) for i in range(3)]
    bad = [SourceImage(f"bad.{i}", disc_image(green=0)) for i in range(2)]
    whole = executor.run(graph, [good[0], bad[0], good[1], bad[1], good[2]])
    chunked = executor.run_chunks(graph, [[good[0], bad[0]], [], [good[1], bad[1], good[2]]])
    assert chunked.images == whole.images
    assert chunked.outcome == whole.outcome == "done"
    for model, mine in chunked.models.items():
        theirs = whole.models[model]
        assert (mine.status, mine.run_images, mine.skipped, mine.gated) == (
            theirs.status, theirs.run_images, theirs.skipped, theirs.gated), model
        assert set(mine.not_analysed) == set(theirs.not_analysed)
        assert mine.geometry == theirs.geometry
        for name, values in theirs.raw.items():
            for uid, value in values.items():
                np.testing.assert_allclose(mine.raw[name][uid], value, rtol=1e-5, atol=1e-6)


def test_a_model_failing_in_a_later_chunk_fails_and_blocks_its_dependants_everywhere(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    executor = GraphExecutor(registry, SessionPool(["CPUExecutionProvider"]), max_batch=4)
    graph = resolve(Selection.of(["total"], modality="OP"), registry)
    real = executor._infer
    calls: list[int] = []

    def only_seg(*args: Any) -> None:  # _infer(graph, manifest, loaded, eligible, ...)
        manifest, eligible = args[1], args[3]
        if manifest.id == "seg" and any(i.sop_instance_uid.endswith(".9") for i in eligible):
            calls.append(1)
            raise RuntimeError("the segmenter broke on this chunk")
        real(*args)

    monkeypatch.setattr(executor, "_infer", only_seg)
    first = images(2, square=(30, 50, 16))
    second = [SourceImage("1.2.3.9", disc_image(square=(30, 50, 16)))]
    third = [SourceImage("1.2.3.10", disc_image(square=(30, 50, 16)))]
    result = executor.run_chunks(graph, [first, second, third])
    runs = result.models
    assert calls == [1]  # not tried again on the third chunk
    assert runs["seg"].status == "failed"
    assert "broke on this chunk" in (runs["seg"].error or "")
    everyone = {i.sop_instance_uid for i in [*first, *second, *third]}
    assert set(runs["seg"].not_analysed) == everyone
    for model, needs in (("slow-b", "seg"), ("slow-c", "seg"), ("total", "slow-b")):
        assert runs[model].status == "skipped", model
        assert f"needs {needs}" in (runs[model].error or "")
        assert set(runs[model].not_analysed) == everyone
        assert not runs[model].raw  # what ran on the first chunk is not reported
    assert result.outcome == "failed"


def test_a_batch_is_bounded_by_its_estimated_memory(registry: Registry) -> None:
    entry = registry.get("seg")
    assert entry.onnx_path is not None
    per_image = activation_bytes_per_image(Path(entry.onnx_path))
    assert per_image > 0  # the segmenter's intermediate tensors at batch 1
    graph = resolve(Selection.of(["seg"], modality="OP"), registry)
    sessions = SessionPool(["CPUExecutionProvider"])
    tight = GraphExecutor(registry, sessions, max_batch=4, batch_bytes=per_image)
    roomy = GraphExecutor(registry, sessions, max_batch=4, batch_bytes=1 << 30)
    assert tight.run(graph, images(3)).models["seg"].batch_size == 1
    assert roomy.run(graph, images(3)).models["seg"].batch_size == 3
