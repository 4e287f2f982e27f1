"""scripts/train_idrid_lesion_context.py trains lesion-seg 1.1.0's context network on sampled
pixels; the exported graph runs it densely. These check that both give the same numbers and
that the quarter-turn / flip augmentation moves the pixel coordinates with the maps."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.peers import in_ci

try:
    import torch
except ImportError:  # training scripts only, never the package; .ci/run installs it
    if in_ci():
        raise
    pytest.skip("torch is not installed (pip install torch==2.13.0)", allow_module_level=True)
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import train_idrid_lesion_context

ctx: Any = train_idrid_lesion_context


@pytest.mark.parametrize("width", [1, 2])
def test_sampled_pixels_match_the_dense_network(width: int) -> None:
    from torch.nn import functional as F

    torch.manual_seed(3)
    net = ctx.build_context_net(ctx.FEATURES, 4, width).eval()
    assert ctx.width_of(net.state_dict()) == width  # what export rebuilds a member with
    size = 128
    feats = torch.randn(2, ctx.FEATURES, size, size)
    rows = torch.randint(0, size, (2, 40))
    cols = torch.randint(0, size, (2, 40))
    with torch.no_grad():
        dense = net(feats)
        at = torch.stack([feats[i][:, rows[i], cols[i]] for i in range(2)])
        where = torch.stack([(2 * cols + 1) / size - 1, (2 * rows + 1) / size - 1], dim=-1)
        sampled = net.points(F.avg_pool2d(feats, 4), at, where.float())
    expected = torch.stack([dense[i][:, rows[i], cols[i]] for i in range(2)])
    assert torch.allclose(sampled, expected, atol=1e-5)


def test_turned_and_flipped_coordinates_follow_the_maps() -> None:
    size = ctx.SIZE
    small = size // 4
    # pooled map whose value at (r, c) encodes the full-size block; points at block centres
    grid = np.arange(small * small, dtype=np.float32).reshape(1, small, small)
    rows = np.array([2, 100, 765]) // 4 * 4 + 1
    cols = np.array([7, 700, 3]) // 4 * 4 + 2
    ids = np.arange(3, dtype=np.float32)[None]  # as the pixel "responses": their order
    version = ctx.Version(grid, ids, np.zeros((4, 3), np.float32), rows, cols)
    for seed in range(8):
        pooled, picked, _, where = ctx.batch([version], 1, np.random.default_rng(seed))
        order = picked[0, 0].numpy().astype(int)  # the batch's own pixel order
        x = ((where[0, :, 0].numpy() + 1) * size - 1) / 2  # full-size pixel coordinates
        y = ((where[0, :, 1].numpy() + 1) * size - 1) / 2
        found = pooled[0, 0].numpy()[np.round(y).astype(int) // 4, np.round(x).astype(int) // 4]
        assert np.array_equal(found, grid[0, rows[order] // 4, cols[order] // 4])


def test_version_picks_the_export_folder_and_defaults_to_the_shipped_one() -> None:
    registry = ctx.base.REPO / "model_registry" / "lesion-seg"
    shipped = ctx.parse_args(["export", "--checkpoint", "a.pt"])
    assert (shipped.version, shipped.out) == ("1.1.0", registry / "1.1.0")
    newer = ctx.parse_args(["export", "--version", "1.2.0", "--checkpoint", "a.pt",
                            "--checkpoint", "b.pt"])
    assert (newer.out, newer.checkpoint) == (registry / "1.2.0", [Path("a.pt"), Path("b.pt")])
    elsewhere = ctx.parse_args(["export", "--version", "1.2.0", "--checkpoint", "a.pt",
                                "--out", "/tmp/x"])
    assert elsewhere.out == Path("/tmp/x")
    for wrong in (["export", "--version", "9.9.9", "--checkpoint", "a.pt"], ["export"]):
        with pytest.raises(SystemExit):
            ctx.parse_args(wrong)


def test_quarter_turns_are_rot90() -> None:
    maps = torch.randn(2, 3, 5, 5)
    for turns in range(-4, 5):
        assert torch.equal(ctx.quarter_turns(maps, turns), torch.rot90(maps, turns, dims=(-2, -1)))


def test_eight_transform_averaging_makes_the_network_turn_with_the_image() -> None:
    torch.manual_seed(5)
    net = ctx.build_context_net(ctx.FEATURES, 4).eval()
    feats = torch.randn(1, ctx.FEATURES, 64, 64)
    with torch.no_grad():
        plain = net.image(feats)
        net.tta = 8
        averaged = net.image(feats)
        for turns, flip in ctx.TTA_TRANSFORMS:
            seen = torch.rot90(feats.flip(-1) if flip else feats, turns, dims=(-2, -1))
            back = torch.rot90(net.image(seen), -turns, dims=(-2, -1))
            assert torch.allclose(back.flip(-1) if flip else back, averaged, atol=1e-5)
        net.tta = 1
        turned = torch.rot90(net.image(torch.rot90(feats, 1, dims=(-2, -1))), -1, dims=(-2, -1))
    assert not torch.allclose(turned, plain, atol=1e-3)  # without averaging it is not


def test_an_ensemble_outputs_the_mean_of_its_members_logits() -> None:
    """Members of different widths too (1.4.0's candidate b: one wide and 1.2.0's two)."""
    torch.manual_seed(7)
    first, second = (ctx.build_context_net(ctx.FEATURES, 4, w).eval() for w in (1, 2))
    feats = torch.randn(1, ctx.FEATURES, 32, 32)
    with torch.no_grad():
        both = ctx.build_ensemble([first, second]).image(feats)
        expected = (first.image(feats) + second.image(feats)) / 2
        assert torch.allclose(both, expected, atol=1e-6)
        assert not torch.allclose(both, first.image(feats), atol=1e-3)


def test_members_read_back_from_the_shipped_graph_rebuild_it() -> None:
    """`export --members-of` holds lesion-seg 1.2.0's two context networks again: read from
    its model.onnx and put back into a graph, they give its outputs."""
    import onnxruntime as ort
    import train_idrid_seg as base

    graph = Path(__file__).resolve().parents[2] / "model_registry/lesion-seg/1.2.0/model.onnx"
    states = ctx.members_of(graph)
    assert len(states) == 2
    assert not torch.equal(states[0]["q1.weight"], states[1]["q1.weight"])
    assert torch.equal(states[0]["mean"], states[1]["mean"])  # one stored copy, shared
    nets = []
    for state in states:
        net = ctx.build_context_net(ctx.FEATURES, len(ctx.CODES))
        net.load_state_dict(state)
        nets.append(net.eval())
    pre, _ = base.build_modules("lesions")
    module = base.exported_module("lesions", pre.eval(), ctx.build_ensemble(nets)).eval()
    image = np.random.default_rng(0).random((1, 3, ctx.SIZE, ctx.SIZE), dtype=np.float32)
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    shipped = session.run(None, {"image": image})
    with torch.no_grad():
        rebuilt = module(torch.from_numpy(image))
    assert len(rebuilt) == len(shipped) == 4
    for ours, theirs in zip(rebuilt, shipped, strict=True):
        assert np.abs(ours.numpy() - theirs).max() < 1e-5
