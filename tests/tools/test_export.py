"""ONNX export and torch.compile parity of the backbones (rest_dense.deploy.backbone_onnx, ``rest-dense export``)."""
import math
import time

import numpy as np
import pytest
import torch

import rest_dense.deploy.backbone_onnx as ex
from rest_dense.cli import main
from rest_dense.models import ResTv1, ResTv2, create_model

from conftest import make_tiny_arch

#: two blocks in stages 2-3 so that ``hwin`` has windowed blocks there
TINY = make_tiny_arch(depths=(1, 2, 2, 1))
#: neither side a multiple of 32 (nor of the windows): crops and window padding all run
SIZES = [(257, 391), (131, 201)]


@pytest.fixture(scope="module")
def global_export(tmp_path_factory):
    """A tiny global-mode ResTv2 and its dynamic ONNX export."""
    torch.manual_seed(0)
    model = ResTv2(TINY).eval()
    path = tmp_path_factory.mktemp("onnx") / "global.onnx"
    exp = ex.export_onnx(model, path)
    return model, exp


def test_onnx_global_dynamic_sizes_match_eager(global_export, one_thread):
    model, exp = global_export
    assert exp.dynamic and exp.shape == ex.default_trace_shape(model)
    assert exp.output_names == ["stage1", "stage2", "stage3", "stage4"]
    results = ex.check_onnx(model, exp.path, SIZES, batch=2)
    assert [r.size for r in results] == SIZES
    for r in results:
        assert r.ok and set(r.max_abs_diff) == set(exp.output_names), r.describe()
        assert all(math.isfinite(d) and d < 1e-4 for d in r.max_abs_diff.values())


@pytest.fixture(scope="module")
def hwin_export(tmp_path_factory):
    """A tiny hwin-mode ResTv2 (windows in stages 2-3) and its dynamic ONNX export."""
    torch.manual_seed(0)
    model = ResTv2(TINY, attn_mode="hwin", window_size=(16, 8, 4, 2)).eval()
    path = tmp_path_factory.mktemp("onnx") / "hwin.onnx"
    return model, ex.export_onnx(model, path)


def test_onnx_window_mode_dynamic_sizes_match_eager(hwin_export, one_thread):
    model, exp = hwin_export
    assert not ex.trace_side_problems(model, exp.shape[0])
    assert not ex.trace_side_problems(model, exp.shape[1])
    results = ex.check_onnx(model, exp.path, SIZES, batch=2)
    assert all(r.ok for r in results), [r.describe() for r in results]
    assert max(r.worst for r in results) < 1e-4


def test_onnx_restv1_float64_head_mixing_runs_in_onnxruntime(tmp_path, one_thread):
    """ResTv1 mixes the heads' attention maps in float64; the graph keeps that in ops
    onnxruntime's CPU provider has (no float64 Conv / InstanceNormalization nodes)."""
    import onnx

    torch.manual_seed(0)
    model = ResTv1(dict(TINY, qkv_bias=True, apply_transform=True)).eval()
    assert model.stage2[0].attn.apply_transform
    exp = ex.export_onnx(model, tmp_path / "v1.onnx")
    graph = onnx.load(str(exp.path)).graph
    ops = {n.op_type for n in graph.node}
    assert "InstanceNormalization" not in ops and "MatMul" in ops
    doubles = [n for n in graph.node if n.op_type == "Cast"
               and any(a.name == "to" and a.i == onnx.TensorProto.DOUBLE for a in n.attribute)]
    assert doubles, "the head mixing should run in float64"
    # 32x32 gives stage 4 a 1x1 map (instance norm of one value: 0)
    results = ex.check_onnx(model, exp.path, SIZES + [(32, 32)], batch=2)
    assert all(r.ok for r in results), [r.describe() for r in results]
    assert all(math.isfinite(r.worst) and r.worst < 1e-4 for r in results)


def test_check_onnx_rejects_sizes_below_the_window_limit(hwin_export):
    model, exp = hwin_export
    # stage 2 (window 8, stride 8) needs 8 * 8 - 7 = 57 pixels, stage 3 49
    assert ex.min_valid_side(model) == 57
    with pytest.raises(ValueError, match="below 57"):
        ex.check_onnx(model, exp.path, [(56, 320)])
    with pytest.raises(ValueError, match="at least one size"):
        ex.check_onnx(model, exp.path, [])


def test_window_graph_answers_sizes_below_its_limit_with_nan(hwin_export, global_export,
                                                              one_thread):
    """Run directly (not through check_onnx), a dynamic window-mode graph at a size below
    its limit returns NaN maps rather than silently wrong ones; from the limit up it
    matches eager, and the file records the limit."""
    import onnx
    import onnxruntime as ort

    model, exp = hwin_export
    meta = {p.key: p.value for p in onnx.load(str(exp.path)).metadata_props}
    assert meta[ex.MIN_SIDE_METADATA] == "57"
    sess = ort.InferenceSession(str(exp.path), providers=["CPUExecutionProvider"])
    for size, valid in (((56, 320), False), ((320, 33), False), ((57, 61), True)):
        x = torch.randn(1, 3, *size)
        outs = sess.run(None, {"input": x.numpy()})
        if valid:
            with torch.no_grad():
                ref = model(x)
            assert all(np.allclose(o, r.numpy(), atol=1e-4) for o, r in zip(outs, ref))
        else:
            assert all(np.isnan(o).all() for o in outs), size
    # global mode has no limit: no guard, no metadata, small inputs are exact
    model, exp = global_export
    assert ex.MIN_SIDE_METADATA not in {p.key for p in onnx.load(str(exp.path)).metadata_props}
    outs = ort.InferenceSession(str(exp.path), providers=["CPUExecutionProvider"]).run(
        None, {"input": np.ones((1, 3, 9, 17), np.float32)})
    assert all(np.isfinite(o).all() for o in outs)


def test_check_onnx_fails_on_nan_output(global_export, monkeypatch):
    """onnxruntime returning NaN must fail, although a NaN difference compares as not > atol."""
    import onnxruntime as ort

    model, exp = global_export
    real_run = ort.InferenceSession.run

    def nan_run(self, names, feeds, *args, **kwargs):
        outs = real_run(self, names, feeds, *args, **kwargs)
        outs[1] = np.full_like(outs[1], np.nan)
        return outs

    monkeypatch.setattr(ort.InferenceSession, "run", nan_run)
    results = ex.check_onnx(model, exp.path, SIZES[1:], raise_on_failure=False)
    (res,) = results
    assert not res.ok and math.isnan(res.max_abs_diff["stage2"]) and math.isnan(res.worst)
    assert "non-finite" in res.describe() and "FAIL" in res.describe()
    assert res.max_abs_diff["stage1"] < 1e-4  # the other outputs are still reported
    with pytest.raises(ex.ParityError, match="stage2 nan") as info:
        ex.check_onnx(model, exp.path, SIZES[1:])
    assert len(info.value.results) == 1


def test_check_onnx_fails_for_nan_weights(tmp_path):
    """A model whose weights hold NaN: eager and ONNX are both NaN, which is no agreement."""
    torch.manual_seed(0)
    model = ResTv2(TINY).eval()
    with torch.no_grad():
        model.stage4[0].mlp.fc2.weight[0, 0] = float("nan")
    exp = ex.export_onnx(model, tmp_path / "nan.onnx", shape=(129, 161), dynamic=False)
    with pytest.raises(ex.ParityError, match="non-finite values in the eager and onnxruntime"):
        ex.check_onnx(model, exp.path, [(129, 161)])


def test_static_export_and_its_size_rule(tmp_path):
    torch.manual_seed(0)
    model = ResTv2(TINY, attn_mode="win").eval()
    assert ex.min_valid_side(model) == 253
    # a static graph is exact at its size, even below the dynamic graph's limit
    exp = ex.export_onnx(model, tmp_path / "static.onnx", shape=(97, 130), dynamic=False)
    (res,) = ex.check_onnx(model, exp.path, [(97, 130)])
    assert res.ok and res.worst < 1e-4, res.describe()
    with pytest.raises(ValueError, match="static graph"):
        ex.check_onnx(model, exp.path, [(130, 97)])
    with pytest.raises(ValueError, match="needs a shape"):
        ex.export_onnx(model, tmp_path / "x.onnx", dynamic=False)


def test_onnx_trace_shape_rules(tmp_path):
    model = ResTv2(TINY).eval()
    assert ex.trace_side_problems(model, 256)  # 64 tokens: multiple of sr 8, crop not traced
    assert not ex.trace_side_problems(model, 257)
    win = ResTv2(TINY, attn_mode="win").eval()
    assert ex.min_valid_side(win) == 253 and ex.min_valid_side(model) == 1
    # neither side crops (256x385 traces the crop through W=385: fine, tests/deploy/test_shapes.py)
    with pytest.raises(ValueError, match="shape-dependent branch"):
        ex.export_onnx(model, tmp_path / "unused.onnx", (256, 384))
    assert not (tmp_path / "unused.onnx").exists()


def test_parity_result_never_passes_nan():
    res = ex.ParityResult((8, 8), 1, {"stage1": 0.0, "stage2": math.nan}, atol=1e-4)
    assert not res.ok and math.isnan(res.worst)
    assert ex.ParityResult((8, 8), 1, {"stage1": 2e-5}, atol=1e-4).ok
    assert not ex.ParityResult((8, 8), 1, {"stage1": 2e-3}, atol=1e-4).ok


@pytest.mark.slow
def test_torch_compile_matches_eager():
    torch._dynamo.reset()
    model = ResTv2(TINY, attn_mode="hwin", window_size=(8, 4, 2, 1)).eval()
    # aot_eager runs dynamo + AOTAutograd without codegen (inductor compiles for minutes on
    # 2 CPU cores); static sizes: symbolic ones take minutes to compile in the window modes.
    # An odd size: the upsample-branch crop, window padding and cropping are all exercised.
    try:
        (res,) = ex.check_compile(model, [(65, 97)], backend="aot_eager", dynamic=False)
    finally:
        torch._dynamo.reset()
    assert res.ok and res.worst < 1e-5, res.describe()
    assert set(res.max_abs_diff) == {"stage1", "stage2", "stage3", "stage4"}


def test_build_model_from_name_or_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="neither a registered model nor a checkpoint"):
        ex.build_model("restv9_tiny")
    with pytest.raises(ValueError, match="global attention only"):
        ex.build_model("restv1_lite", window_size=7)
    with pytest.raises(ValueError, match="attn_mode"):
        ex.build_model("restv1_lite", attn_mode="win")
    # a checkpoint file: variant inferred, weights loaded (the slow CLI test does restv2_tiny)
    src = create_model("restv1_lite")
    path = tmp_path / "restv1_lite_dense.pth"
    torch.save({"model": src.state_dict()}, path)
    model = ex.build_model(str(path))
    assert not model.training and type(model) is type(src) and model.depths == src.depths
    assert torch.equal(model.stage3[1].attn.q.weight, src.stage3[1].attn.q.weight)
    with pytest.raises(ValueError, match="do not pass another checkpoint"):
        ex.build_model(str(path), checkpoint=str(path))


# --------------------------------------------------------------------------- CLI
@pytest.fixture
def tiny_cli_model(monkeypatch):
    """``rest-dense export`` builds the tiny model instead of a registered variant."""
    built = []

    def fake_build(model, attn_mode="global", checkpoint=None, window_size=None, **kw):
        torch.manual_seed(0)
        built.append((model, attn_mode))
        return ResTv2(TINY, attn_mode=attn_mode).eval()

    monkeypatch.setattr(ex, "build_model", fake_build)
    return built


def test_cli_export_and_check(tiny_cli_model, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    rc = main(["export", "restv2_tiny", "--out", str(out), "--check-shapes", "131x201",
               "257x391", "--batch", "2"])
    captured = capsys.readouterr()
    text = captured.out
    assert rc == 0, text
    assert out.is_file() and tiny_cli_model == [("restv2_tiny", "global")]
    # a name without --checkpoint exports random weights: said, not silent
    assert "no --checkpoint" in captured.err and "randomly initialised" in captured.err
    assert "traced at 257x385" in text and "dynamic batch/height/width" in text
    assert text.count(" ok") == 2 and "2x3x131x201" in text and "FAIL" not in text


def test_cli_exits_nonzero_when_a_check_fails(tiny_cli_model, tmp_path, capsys, monkeypatch):
    import onnxruntime as ort

    real_run = ort.InferenceSession.run
    monkeypatch.setattr(ort.InferenceSession, "run", lambda self, *a, **k: [
        np.full_like(o, np.nan) for o in real_run(self, *a, **k)])
    (tmp_path / "s.onnx").write_bytes(b"previous")
    rc = main(["export", "restv2_tiny", "--static", "--shape", "97x130",
               "--out", str(tmp_path / "s.onnx")])
    out = capsys.readouterr()
    assert rc == 1 and "1x3x97x130" in out.out and "FAIL" in out.out
    assert "non-finite" in out.out and "FAILED" in out.err and "not written" in out.err
    # the failed graph never took the name; nothing half-done is left beside it
    assert (tmp_path / "s.onnx").read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.onnx"]


def test_cli_interrupted_check_leaves_no_file(tiny_cli_model, tmp_path, monkeypatch):
    import onnxruntime as ort

    def interrupt(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ort.InferenceSession, "run", interrupt)
    assert main(["export", "restv2_tiny", "--static", "--shape", "97x130",
                 "--out", str(tmp_path / "s.onnx")]) == 130  # one line, not a traceback
    assert list(tmp_path.iterdir()) == []


def test_cli_rejects_bad_input(tiny_cli_model, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["export", "restv2_tiny", "--check-shapes", "320by480"])
    assert info.value.code == 2 and "HxW" in capsys.readouterr().err
    assert main(["export", "restv2_tiny", "--static"]) == 2
    assert "--static needs --shape" in capsys.readouterr().err
    assert main(["export", "restv2_tiny", "--window-size", "8", "8"]) == 2
    assert "1 or 4 values" in capsys.readouterr().err
    # it printed nothing and exited 0, having checked and written nothing
    assert main(["export", "restv2_tiny", "--no-onnx", "--check-shapes", "64x64"]) == 2
    assert "--no-onnx leaves nothing to do" in capsys.readouterr().err
    assert tiny_cli_model == []


@pytest.mark.slow
def test_cli_exports_a_released_variant_from_its_checkpoint(tmp_path, capsys, one_thread):
    """The real restv2_tiny, named by a checkpoint file (variant inferred), through the CLI."""
    ckpt = tmp_path / "restv2_tiny_dense.pth"
    torch.save(create_model("restv2_tiny").state_dict(), ckpt)
    out = tmp_path / "restv2_tiny.onnx"
    rc = main(["export", str(ckpt), "--out", str(out), "--check-shapes", "129x161"])
    captured = capsys.readouterr()
    text = captured.out
    assert rc == 0, text
    assert "randomly initialised" not in captured.err
    assert out.stat().st_size > 50e6  # 28M float32 parameters
    assert "1x3x129x161" in text and " ok" in text


# --------------------------------------------------------------------------- dynamic shapes
WINDOW_MODES = ("win", "cwin", "hwin")


@pytest.fixture
def no_compiling(monkeypatch):
    """Fail the test if torch.compile or torch.export is reached."""
    def refuse(*args, **kwargs):
        raise AssertionError("compilation / tracing started")

    monkeypatch.setattr(torch, "compile", refuse)
    monkeypatch.setattr(torch.export, "export", refuse)


@pytest.mark.parametrize("mode", WINDOW_MODES)
def test_dynamic_shapes_refused_up_front_in_window_modes(mode, no_compiling):
    model = ResTv2(TINY, attn_mode=mode, window_size=(16, 8, 4, 2)).eval()
    assert ex.windowed_stages(model) == ([2, 3] if mode == "hwin" else [1, 2, 3, 4])
    t0 = time.perf_counter()
    with pytest.raises(ex.DynamicShapeError) as info:
        ex.compile_model(model, backend="aot_eager", dynamic=True)
    msg = str(info.value)
    assert f"attn_mode {mode!r}" in msg and "dynamic=False" in msg
    assert "attn_mode='global'" in msg and "ONNX" in msg
    assert f"H, W >= {ex.min_valid_side(model)}" in msg
    assert isinstance(info.value, ValueError) and isinstance(info.value, NotImplementedError)
    with pytest.raises(ex.DynamicShapeError, match="torch.export.*ONNX"):
        ex.export_program(model)
    with pytest.raises(ex.DynamicShapeError, match="dynamic=False"):
        ex.check_compile(model, [(65, 97)], backend="aot_eager", dynamic=True)
    assert time.perf_counter() - t0 < 2  # nothing was compiled or traced


def test_compile_model_settings(monkeypatch):
    """What compile_model hands to torch.compile, per mode and request."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append(kw) or model)
    glob = ResTv2(TINY).eval()
    win = ResTv2(TINY, attn_mode="win", window_size=(16, 8, 4, 2)).eval()
    # hwin with one block per stage: no block runs in windows, so it is global attention
    flat = ResTv2(dict(TINY, depths=(1, 1, 1, 1)), attn_mode="hwin").eval()
    assert ex.dynamic_shape_problem(glob) is None and ex.dynamic_shape_problem(flat) is None
    for model, dynamic, expected in [(glob, None, None), (glob, True, True), (flat, True, True),
                                     (win, None, False), (win, False, False),
                                     (glob, False, False)]:
        assert ex.compile_model(model, backend="aot_eager", dynamic=dynamic) is model
        assert calls.pop() == {"backend": "aot_eager", "dynamic": expected}
    # a model whose window code handles symbolic sizes declares it, and is not refused
    hooked = ResTv2(TINY, attn_mode="win", window_size=(16, 8, 4, 2)).eval()
    hooked.symbolic_window_shapes = True
    assert ex.dynamic_shape_problem(hooked) is None
    assert ex.compile_model(hooked, backend="aot_eager", dynamic=True) is hooked
    assert calls.pop() == {"backend": "aot_eager", "dynamic": True}
    with pytest.raises(ValueError, match="unknown torch.compile backend 'tensorrtx'"):
        ex.compile_model(glob, backend="tensorrtx")
    with pytest.raises(ValueError, match="dynamic must be None, True or False"):
        ex.compile_model(glob, dynamic="yes")
    with pytest.raises(ValueError, match="batch must be a positive int"):
        ex.export_program(glob, batch=0)
    with pytest.raises(ValueError, match="shape-dependent branch.*trace at 257x385"):
        ex.export_program(glob, shape=(256, 385))
    with pytest.raises(ValueError, match="needs a shape"):
        ex.export_program(win, dynamic=False)
    assert not calls


@pytest.mark.slow
def test_dynamic_compile_global_matches_eager(one_thread):
    """Global attention, symbolic sizes from the first call: one graph serves a second size
    (no recompile), and both equal eager."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = ResTv2(dict(TINY, depths=(1, 1, 1, 1))).eval()
    sizes = [(257, 391), (385, 263)]
    try:
        results = ex.check_compile(model, sizes, backend="aot_eager", dynamic=True)
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert [r.size for r in results] == sizes
    for r in results:
        assert r.ok and r.worst < 1e-5 and len(r.max_abs_diff) == 4, r.describe()
    assert graphs == 1  # the second size ran the symbolic graph of the first


@pytest.mark.slow
def test_export_program_global_dynamic(one_thread):
    """torch.export with dynamic H/W in global mode returns a program that matches eager at
    odd sizes, multiples of 32 and the smallest side -- or, while the model still branches on
    whether the upsample branch needs a crop, refuses with the guard and the alternatives
    (never a program that fails at ordinary sizes later)."""
    torch.manual_seed(0)
    model = ResTv2(dict(TINY, depths=(1, 1, 1, 1))).eval()
    assert ex.min_program_side(model) == 33
    try:
        program = ex.export_program(model)
    except ex.DynamicShapeError as e:
        msg = str(e)
        assert "guard" in msg and "dynamic=False" in msg and "ONNX" in msg, msg
        assert "refuses" in msg and "x" in msg.split("e.g.")[1], msg
        return
    sizes = [(257, 385), (256, 384), (33, 97), (131, 201)]
    results = ex.check_program(model, program, sizes)
    assert all(r.ok and r.worst < 1e-5 for r in results), [r.describe() for r in results]


@pytest.mark.slow
def test_static_program_in_window_mode(tmp_path, capsys, tiny_cli_model, one_thread):
    """The working alternative in the window modes: a static torch.export program, through
    the CLI (written, reloaded, equal to eager)."""
    path = tmp_path / "win.pt2"
    rc = main(["export", "restv2_tiny", "--attn-mode", "win", "--no-onnx", "--static",
               "--shape", "65x97", "--program", str(path)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert tiny_cli_model == [("restv2_tiny", "win")]
    assert "static 1x3x65x97" in text and "torch.export vs eager 1x3x65x97" in text
    assert " ok" in text and "FAIL" not in text
    program = torch.export.load(str(path))
    torch.manual_seed(0)
    model = ResTv2(TINY, attn_mode="win").eval()
    (res,) = ex.check_program(model, program, [(65, 97)])
    assert res.ok and res.worst < 1e-5, res.describe()


def test_onnx_export_under_a_callers_autocast_is_the_fp32_graph(tmp_path, one_thread):
    """Export runs with autocast off: a caller's bf16 autocast neither breaks the export
    nor puts casts into the graph."""
    torch.manual_seed(0)
    model = ResTv1(dict(TINY, qkv_bias=True, apply_transform=True)).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        exp = ex.export_onnx(model, tmp_path / "amp.onnx", shape=(64, 96), dynamic=False)
    results = ex.check_onnx(model, exp.path, [(64, 96)], batch=1)
    assert all(r.ok and r.worst < 1e-4 for r in results), [r.describe() for r in results]
