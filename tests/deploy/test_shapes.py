"""Traced-graph shape rules (rest_dense.deploy.shapes): the one home of the rules that
``rest-dense export`` (rest_dense.deploy.backbone_onnx) and ``rest-dense export-model`` both use.

Before, rest_dense.deploy.backbone_onnx judged a trace size side by side (each of H and W had to take every
branch by itself) while the whole-model rules judged the stage maps in 2-D (a branch taken on
one side is traced for both). The cases where the two differed are checked here against ONNX
Runtime."""
import itertools
import random

import pytest
import torch

import rest_dense.deploy.backbone_onnx as ex
from rest_dense.deploy import shapes
from rest_dense.models import ResTv1, ResTv2, create_model


def _old_side_problems(model, side):
    """The per-side rule rest_dense.deploy.backbone_onnx had (kept here to show where it differed)."""
    out = []
    wins = shapes.stage_windows(model)
    for i in range(max(model.out_indices) + 1):
        s = -(-side // 2 ** (i + 2))
        if isinstance(model, ResTv2) and model.sr_ratios[i] > 1 and s % model.sr_ratios[i] == 0:
            out.append(i)
        if wins[i] is not None and (s <= wins[i] or s % wins[i] == 0):
            out.append(i)
    return out


@pytest.mark.parametrize("mode", ["global", "win", "hwin"])
def test_square_traces_agree_with_the_old_per_side_rule(tiny_arch, mode):
    model = ResTv2(dict(tiny_arch, depths=(1, 2, 2, 1)), attn_mode=mode, window_size=8)
    for side in range(200, 700):
        assert bool(shapes.trace_side_problems(model, side)) == bool(_old_side_problems(model, side))
        assert shapes.trace_problems(model, (side, side)) == shapes.trace_side_problems(model, side)
    assert ex.trace_side_problems is shapes.trace_side_problems  # one home, re-exported


def test_default_trace_shape_and_min_valid_side():
    model = create_model("restv2_tiny", attn_mode="win")
    assert shapes.default_trace_shape(model) == (257, 385)
    low = shapes.min_valid_side(model)
    assert low == 253
    maps = [b.map_size[0] for b in shapes.stage_branches(model, (low, low))]
    assert all(m >= ws for m, ws in zip(maps, model.window_size))
    below = [b.map_size[0] for b in shapes.stage_branches(model, (low - 1, low - 1))]
    assert any(m < ws for m, ws in zip(below, model.window_size))
    assert shapes.min_valid_side(create_model("restv2_tiny")) == 1
    assert shapes.windowed_stages(model) == [1, 2, 3, 4]


def test_a_trace_that_serves_serves_every_valid_size(tiny_arch):
    """trace_problems (any size) and graph_problems (one size) agree: a trace without
    trace_problems is valid, by graph_problems, at every size of at least min_valid_side."""
    rng = random.Random(0)
    for mode in ("global", "win", "hwin"):
        model = ResTv2(dict(tiny_arch, depths=(1, 2, 2, 1)), attn_mode=mode, window_size=(8, 4, 2, 2))
        low = shapes.min_valid_side(model)
        traces = [t for t in itertools.product(range(200, 420, 7), repeat=2)
                  if not shapes.trace_problems(model, t)]
        assert traces
        for t in rng.sample(traces, 40):
            for _ in range(20):
                x = (rng.randrange(low, 900), rng.randrange(low, 900))
                assert not shapes.graph_problems(model, t, x), (mode, t, x)
    assert shapes.stage_branches(ResTv1(dict(tiny_arch)), (64, 64)) == []


@pytest.mark.parametrize("mode, trace", [("global", (257, 384)), ("win", (257, 512))])
def test_one_sided_traces_the_old_rule_refused_match_eager(tmp_path, tiny_arch, mode, trace,
                                                           one_thread):
    """A side that takes no branch (a multiple of every sr_ratio and window) is fine when the
    other side takes them all: the graph keeps the size arithmetic of both. The old per-side
    rule refused these traces; ONNX Runtime agrees with eager at sizes that need the crop and
    the window padding on either side, or on none."""
    torch.manual_seed(0)
    model = ResTv2(dict(tiny_arch), attn_mode=mode, window_size=8).eval()
    assert _old_side_problems(model, trace[1]) and not _old_side_problems(model, trace[0])
    assert shapes.trace_problems(model, trace) == []
    exp = ex.export_onnx(model, tmp_path / f"{mode}.onnx", shape=trace)
    assert exp.shape == trace
    results = ex.check_onnx(model, exp.path, [(320, 480), (257, 391), (391, 257), (256, 256)])
    assert all(r.ok for r in results), [r.describe() for r in results]


def test_a_trace_missing_a_branch_is_refused(tmp_path, tiny_arch):
    model = ResTv2(dict(tiny_arch), attn_mode="win", window_size=8).eval()
    problems = shapes.trace_problems(model, (256, 512))  # every map a multiple of 8
    assert problems[0] == ("stage 1: map 64x128 is a multiple of sr_ratio 8 on both sides (the "
                           "crop of the reduced attention is not traced)")
    assert len(problems) == 7  # crops in stages 1-3, window padding in stages 1-4
    assert "must exceed the window 8 on both sides" in shapes.trace_problems(model, (257, 200))[-1]
    with pytest.raises(ValueError, match="shape-dependent branch"):
        ex.export_onnx(model, tmp_path / "x.onnx", shape=(256, 512))
    assert not (tmp_path / "x.onnx").exists()


def test_checks_build_inputs_with_the_models_channels(tmp_path, tiny_arch, one_thread):
    """A one-channel backbone (depth maps, grey scans) exports and passes the ONNX Runtime
    check: the check images have the model's input channels, not three."""
    torch.manual_seed(0)
    model = ResTv2(dict(tiny_arch), in_channels=1).eval()
    exp = ex.export_onnx(model, tmp_path / "c1.onnx", shape=(257, 384))
    results = ex.check_onnx(model, exp.path, [(257, 391), (97, 131)])
    assert len(results) == 2 and all(r.ok for r in results), [r.describe() for r in results]


def test_first_unserved_size_finds_the_smallest_input_a_trace_misses(tiny_arch):
    model = ResTv2(dict(tiny_arch, depths=(1, 2, 2, 1)), attn_mode="win", window_size=8)
    serving = shapes.default_trace_shape(model)
    assert shapes.first_unserved_size(model, serving, divisor=32) is None
    assert shapes.first_unserved_size(model, serving, divisor=1) is None
    # every map a multiple of its window and sr_ratio: padding and crops untraced
    found = shapes.first_unserved_size(model, (256, 512), divisor=1)
    assert found is not None and shapes.graph_problems(model, (256, 512), found)
    low = shapes.min_valid_side(model)
    smaller = [(h, w) for h in range(low, found[0] + 1) for w in range(low, found[1] + 1)
               if h * w < found[0] * found[1]]
    assert not any(shapes.graph_problems(model, (256, 512), s) for s in smaller)
    # padded to 32: the crops are never needed; the window padding still is
    padded = shapes.first_unserved_size(model, (256, 512), divisor=32)
    assert padded is not None and padded[0] % 32 == 0 and padded[1] % 32 == 0
    glob = ResTv2(dict(tiny_arch), attn_mode="global")
    assert shapes.first_unserved_size(glob, (256, 256), divisor=32) is None
    assert shapes.first_unserved_size(glob, (256, 256), divisor=1) == (1, 1)  # needs the crop
