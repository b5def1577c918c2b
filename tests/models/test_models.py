"""Core backbone tests: golden parity with the authors' code, shapes, modes, freezing,
checkpointing, loading and input validation."""
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from rest_dense.models import (ATTN_MODES, CheckpointMismatchError, RESTV1_ARCHS, RESTV2_ARCHS,
                               ResTv1, ResTv2, load_checkpoint, window_partition,
                               window_unpartition)

from conftest import FIXTURES, SHARED, make_tiny_arch  # noqa: F401

TINY = make_tiny_arch(depths=(1, 2, 2, 1))
TINY_V1 = dict(TINY, qkv_bias=True, apply_transform=True)
MODELS = {"v2": (ResTv2, TINY), "v1": (ResTv1, TINY_V1)}


def _golden(name):
    path = FIXTURES / f"{name}_dense_golden.pt"
    if not path.exists():
        pytest.fail(f"golden fixture {path} is missing (../shared must sit beside the repo)")
    return torch.load(path, weights_only=False)


def _expected_hw(h, w):
    return [(math.ceil(h / 2 ** (i + 2)), math.ceil(w / 2 ** (i + 2))) for i in range(4)]


# --------------------------------------------------------------------------- golden parity
@pytest.mark.parametrize("attn_mode", ATTN_MODES)
@pytest.mark.parametrize("fast_paths", [True, False])
def test_restv2_golden(attn_mode, fast_paths):
    g = _golden("restv2")
    model = ResTv2(arch=g["arch"], out_indices=(0, 1, 2, 3), attn_mode=attn_mode,
                   fast_paths=fast_paths).eval()
    if attn_mode == "cwin":
        # the cross-window convs are the only extra parameters; they start at zero
        result = model.load_state_dict(g["state_dict"], strict=False)
        assert sorted(result.missing_keys) == sorted(
            f"cwin_convs.{i}.{p}" for i in range(4) for p in ("weight", "bias"))
        assert not result.unexpected_keys
    else:
        model.load_state_dict(g["state_dict"], strict=True)
    # the fixture's maps (32x40 .. 4x5) fit in one default window on every stage
    with torch.no_grad():
        outs = model(g["input"])
    assert len(outs) == len(g["outputs"]) == 4
    for out, ref in zip(outs, g["outputs"]):
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("fast_paths", [True, False])
def test_restv1_golden(fast_paths):
    g = _golden("restv1")
    model = ResTv1(arch=g["arch"], out_indices=(0, 1, 2, 3), fast_paths=fast_paths).eval()
    model.load_state_dict(g["state_dict"], strict=True)
    with torch.no_grad():
        outs = model(g["input"])
    for out, ref in zip(outs, g["outputs"]):
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_golden_loads_through_loader_in_every_wrapping(tmp_path):
    g = _golden("restv2")
    sd = g["state_dict"]
    wrappings = {
        "imagenet": {"model": {**sd, "head.weight": torch.zeros(10, 128), "head.bias": torch.zeros(10)}},
        "mmseg": {"state_dict": {"backbone." + k: v for k, v in sd.items()},
                  "meta": {}},
        "d2": {"model": {("backbone.bottom_up." + k).replace(".norm_1.", ".norm_1.0.")
                         .replace(".norm_4.", ".norm_4.0."): v for k, v in sd.items()}},
        "ddp": {"module." + k: v for k, v in sd.items()},
    }
    wrappings["d2"]["model"]["backbone.fpn_lateral2.weight"] = torch.zeros(1)
    for name, obj in wrappings.items():
        path = tmp_path / f"{name}.pth"
        torch.save(obj, path)
        model = ResTv2(arch=g["arch"]).eval()
        report = load_checkpoint(model, path)
        assert not report.missing_keys and not report.unexpected_keys, name
        with torch.no_grad():
            outs = model(g["input"])
        torch.testing.assert_close(outs[-1], g["outputs"][-1], atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- released keys
def _manifest():
    return json.loads((FIXTURES / "official_imagenet_checkpoint_keys.json").read_text())


@pytest.mark.parametrize("name", sorted(json.loads(
    (FIXTURES / "official_imagenet_checkpoint_keys.json").read_text())))
def test_released_imagenet_keys_load(name):
    keys = _manifest()[name]
    cls, variant = (ResTv2, name[len("restv2_"):]) if name.startswith("restv2_") else (
        ResTv1, name[len("rest_"):])
    # shapes only: build a zero checkpoint with the released layout (meta device: no memory)
    ckpt = {"model": {k: torch.zeros(shape) for k, shape in keys.items()}}
    model = cls(arch=variant)
    report = load_checkpoint(model, ckpt)
    own = set(model.state_dict())
    # everything of the released backbone lands; only the dense output norms are new
    assert set(report.loaded_keys) == {k for k in keys if k in own}
    assert all(k.startswith("head.") for k in report.dropped_keys) and report.dropped_keys
    if cls is ResTv2:
        assert sorted(report.missing_keys) == sorted(f"norm_{i}.{p}" for i in range(1, 5)
                                                     for p in ("weight", "bias"))
        assert sorted(report.unexpected_keys) == ["norm.bias", "norm.weight"]
    else:
        assert sorted(report.missing_keys) == sorted(f"norm{i}.{p}" for i in range(1, 4)
                                                     for p in ("weight", "bias"))
        assert report.unexpected_keys == []
    for k, shape in keys.items():
        if k in own:
            assert tuple(model.state_dict()[k].shape) == tuple(shape), k


def test_wrong_variant_checkpoint_raises():
    small = ResTv2(arch="tiny").state_dict()
    with pytest.raises(CheckpointMismatchError, match="shape mismatch"):
        load_checkpoint(ResTv2(arch="large"), {"model": small})
    with pytest.raises(CheckpointMismatchError, match="only"):
        load_checkpoint(ResTv2(arch=TINY), {"state_dict": {"conv1.weight": torch.zeros(3)}})
    v1 = ResTv1(arch=TINY_V1).state_dict()
    with pytest.raises(CheckpointMismatchError, match="lacks .* weights of ResTv2: stem.proj"):
        load_checkpoint(ResTv2(arch=TINY), v1)


def test_strict_loading_reports_missing():
    sd = ResTv2(arch=TINY).state_dict()
    sd.pop("stage1.0.attn.q.weight")
    with pytest.raises(CheckpointMismatchError, match="stage1.0.attn.q.weight"):
        load_checkpoint(ResTv2(arch=TINY), sd, strict=True)
    with pytest.raises(CheckpointMismatchError, match="lacks 1 weights.*stage1.0.attn.q.weight"):
        load_checkpoint(ResTv2(arch=TINY), sd)
    report = load_checkpoint(ResTv2(arch=TINY), sd, allow_partial=True)
    assert report.missing_keys == ["stage1.0.attn.q.weight"]


def test_loader_defaults_to_weights_only(tmp_path):
    import argparse

    path = tmp_path / "pickled.pth"  # an arbitrary pickled object, as in training checkpoints
    torch.save({"model": ResTv2(arch=TINY).state_dict(), "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_checkpoint(ResTv2(arch=TINY), path)
    load_checkpoint(ResTv2(arch=TINY), path, weights_only=False)


def test_variant_param_counts():
    # backbone-only counts measured with the authors' code (ENV.md), dense norms included
    expected = {"tiny": 29.667, "small": 40.438, "base": 55.198}
    for arch, m in expected.items():
        n = sum(p.numel() for p in ResTv2(arch=arch).parameters()) / 1e6
        assert round(n, 3) == m, arch


# --------------------------------------------------------------------------- shapes / modes
@pytest.mark.parametrize("kind", ["v2", "v1"])
@pytest.mark.parametrize("shape", [(1, 3, 511, 511), (2, 3, 112, 137), (1, 3, 33, 47)])
def test_odd_input_sizes(kind, shape):
    cls, arch = MODELS[kind]
    model = cls(arch=arch).eval()
    with torch.no_grad():
        outs = model(torch.randn(*shape))
    assert [tuple(o.shape[-2:]) for o in outs] == _expected_hw(*shape[-2:])
    assert [o.shape[1] for o in outs] == list(arch["embed_dims"])
    assert all(o.shape[0] == shape[0] and torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize("attn_mode", ATTN_MODES)
def test_modes_forward_backward_odd_size(attn_mode):
    # window 16/8/8/8 tokens: several padded windows on a 2x3x150x230 input
    model = ResTv2(arch=TINY, attn_mode=attn_mode, window_size=(16, 8, 8, 8), drop_path_rate=0.1)
    x = torch.randn(2, 3, 150, 230, requires_grad=True)
    outs = model(x)
    assert [tuple(o.shape[-2:]) for o in outs] == _expected_hw(150, 230)
    sum(o.square().mean() for o in outs).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []


def test_window_modes_differ_from_global_when_windows_split():
    torch.manual_seed(0)
    ref = ResTv2(arch=TINY).eval()
    x = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        g = ref(x)
        for mode in ("win", "hwin"):
            m = ResTv2(arch=TINY, attn_mode=mode, window_size=(8, 8, 4, 2)).eval()
            m.load_state_dict(ref.state_dict())
            out = m(x)
            # TINY's stage 1 has one block, which hwin keeps global; stage 2 has a window block
            assert torch.allclose(out[0], g[0], atol=1e-5) == (mode == "hwin"), mode
            assert not torch.allclose(out[1], g[1], atol=1e-3), mode


@pytest.mark.parametrize("attn_mode", ["win", "cwin", "hwin"])
def test_window_equals_global_when_one_window_covers_map(attn_mode):
    torch.manual_seed(0)
    ref = ResTv2(arch=TINY).eval()
    model = ResTv2(arch=TINY, attn_mode=attn_mode, window_size=(64, 32, 16, 8)).eval()
    model.load_state_dict(ref.state_dict(), strict=False)
    x = torch.randn(2, 3, 200, 120)  # stage maps 50x30 .. 7x4: all within one window
    with torch.no_grad():
        for a, b in zip(model(x), ref(x)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_window_blocks_see_only_their_window():
    """Win mode equals running the global model on each window separately."""
    torch.manual_seed(0)
    ws = 8
    model = ResTv2(arch=dict(TINY, depths=(2, 1, 1, 1)), attn_mode="win",
                   window_size=(ws, 8, 8, 8), out_indices=(0,)).eval()
    x = torch.randn(1, 16, 16, 16)  # channels-last stage-1 map of 2x2 windows
    with torch.no_grad():
        full = model._forward_stage(0, x)
        for r in range(2):
            for c in range(2):
                win = x[:, r * ws:(r + 1) * ws, c * ws:(c + 1) * ws]
                alone = win
                for blk in model.stage1:
                    alone = blk(alone)
                torch.testing.assert_close(full[:, r * ws:(r + 1) * ws, c * ws:(c + 1) * ws], alone,
                                           atol=1e-5, rtol=1e-5)


def test_cwin_adds_only_dwconvs():
    g = ResTv2(arch="tiny")
    c = ResTv2(arch="tiny", attn_mode="cwin")
    extra = sum(p.numel() for p in c.parameters()) - sum(p.numel() for p in g.parameters())
    assert extra == sum(d * 9 + d for d in (96, 192, 384, 768))
    for mode in ("win", "hwin"):
        assert ResTv2(arch="tiny", attn_mode=mode).state_dict().keys() == g.state_dict().keys()


def test_window_partition_roundtrip():
    x = torch.randn(2, 13, 21, 5)
    windows, pad_hw = window_partition(x, (4, 8))
    assert pad_hw == (16, 24) and windows.shape == (2 * 4 * 3, 4, 8, 5)
    torch.testing.assert_close(window_unpartition(windows, (4, 8), pad_hw, (13, 21)), x)
    torch.testing.assert_close(windows[1], x[0, 0:4, 8:16])


def test_fused_matches_math():
    torch.manual_seed(0)
    a = ResTv2(arch=TINY).eval()
    b = ResTv2(arch=TINY, fast_paths=False).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 97, 131)
    with torch.no_grad():
        for u, v in zip(a(x), b(x)):
            torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- training knobs
@pytest.mark.parametrize("kind", ["v2", "v1"])
@pytest.mark.parametrize("frozen_stages", [0, 1, 2, 4])
def test_frozen_stages_stay_frozen_after_train(kind, frozen_stages):
    cls, arch = MODELS[kind]
    model = cls(arch=arch, frozen_stages=frozen_stages)
    frozen_at_init = {n for n, p in model.named_parameters() if not p.requires_grad}
    model.train()
    assert frozen_at_init == {n for n, p in model.named_parameters() if not p.requires_grad}
    for i in range(5):
        for m in model.stage_modules(i):
            frozen = i <= frozen_stages
            assert all(p.requires_grad != frozen for p in m.parameters()), (i, m)
            assert all(sub.training != frozen for sub in m.modules()), (i, m)
    # a training step leaves frozen weights and BN statistics untouched
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert bool(trainable) == (frozen_stages < 4)
    out = model(torch.randn(2, 3, 64, 64))
    if trainable:
        opt = torch.optim.SGD(trainable, lr=0.1)
        sum(o.square().mean() for o in out).backward()  # (a plain mean of a LayerNorm output has ~0 gradient)
        opt.step()
    stem_keys = [k for k in before if k.startswith("stem.")]
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in stem_keys)
    frozen_names = {f"stage{i}." for i in range(1, frozen_stages + 1)}
    changed = [k for k in before if any(k.startswith(s) for s in frozen_names)
               and not torch.equal(before[k], model.state_dict()[k])]
    assert changed == []
    if frozen_stages < 4:
        k = f"stage4.0.mlp.fc1.weight"
        assert not torch.equal(before[k], model.state_dict()[k])


def test_norm_eval_keeps_bn_in_eval():
    model = ResTv2(arch=TINY, norm_eval=True).train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert model.stage1.training
    model = ResTv2(arch=TINY, norm_eval=False).train()
    assert all(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("kind,attn_mode", [("v2", "global"), ("v2", "hwin"), ("v1", "global")])
def test_with_cp_same_outputs_and_grads(kind, attn_mode):
    cls, arch = MODELS[kind]
    kw = {"attn_mode": attn_mode, "window_size": 8} if kind == "v2" else {}
    torch.manual_seed(0)
    plain = cls(arch=arch, **kw).train()
    ckpt = cls(arch=arch, with_cp=True, **kw).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 70, 90)
    outs = []
    for m in (plain, ckpt):
        xi = x.clone().requires_grad_()
        out = m(xi)
        sum((o * torch.linspace(0, 1, o.numel()).view_as(o)).sum() for o in out).backward()
        outs.append((out, xi.grad, {n: p.grad.clone() for n, p in m.named_parameters()}))
    for a, b in zip(outs[0][0], outs[1][0]):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(outs[0][1], outs[1][1])
    for n, g in outs[0][2].items():
        torch.testing.assert_close(g, outs[1][2][n], atol=1e-5, rtol=1e-4, msg=n)
    with torch.no_grad():  # no gradients: checkpointing is bypassed and still correct
        torch.testing.assert_close(ckpt(x)[0], plain(x)[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["v2", "v1"])
def test_autocast_no_nan(kind, dtype):
    cls, arch = MODELS[kind]
    model = cls(arch=arch).train()
    x = torch.randn(1, 3, 96, 112, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        outs = model(x)
        loss = sum(o.float().square().mean() for o in outs)
    loss.backward()
    assert all(torch.isfinite(o.float()).all() for o in outs)
    assert torch.isfinite(x.grad).all()


def test_drop_path_schedule():
    model = ResTv2(arch=TINY, drop_path_rate=0.3)
    rates = [blk.drop_path.drop_prob if hasattr(blk.drop_path, "drop_prob") else 0.0
             for s in range(1, 5) for blk in getattr(model, f"stage{s}")]
    assert rates[0] == 0.0 and math.isclose(rates[-1], 0.3, rel_tol=1e-6)
    assert rates == sorted(rates)


def test_out_indices_subset():
    model = ResTv2(arch=TINY, out_indices=(1, 3)).eval()
    outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [32, 128] and model.out_channels == (32, 128)
    assert not hasattr(model, "norm_1")


# --------------------------------------------------------------------------- bad input
def test_bad_input_errors():
    model = ResTv2(arch=TINY)
    with pytest.raises(ValueError, match="3 input channels.*1 channels"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="4-D"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="unknown ResTv2 arch 'huge'"):
        ResTv2(arch="huge")
    with pytest.raises(ValueError, match="unknown ResTv1 arch"):
        ResTv1(arch="tiny")
    # a model name of the family names its arch; one of the other family does not
    assert ResTv2(arch="RestV2_Small").arch == ResTv2(arch="small").arch
    assert ResTv1(arch="rest_base").arch == ResTv1(arch="base").arch
    with pytest.raises(ValueError, match=r"unknown ResTv2 arch 'rest_small'.*restv2_tiny"):
        ResTv2(arch="rest_small")
    with pytest.raises(ValueError, match="unknown attn_mode 'swin'"):
        ResTv2(arch=TINY, attn_mode="swin")
    with pytest.raises(ValueError, match=r"window_size\[1\]=6 .* sr_ratio 4"):
        ResTv2(arch=TINY, attn_mode="win", window_size=(64, 6, 16, 8))
    # a window size (Swin's 7, carried over) in global mode is said to do nothing
    with pytest.warns(UserWarning, match="window_size=7 has no effect with attn_mode='global'"):
        ResTv2(arch=TINY, window_size=7)
    with pytest.raises(ValueError, match="out_indices"):
        ResTv2(arch=TINY, out_indices=(0, 4))
    with pytest.raises(ValueError, match="missing"):
        ResTv2(arch={"embed_dims": (16, 32, 64, 128)})
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        ResTv2(arch=dict(TINY, embed_dims=(16, 32, 66, 128)))
    with pytest.raises(ValueError, match="frozen_stages"):
        ResTv2(arch=TINY, frozen_stages=5)


@pytest.mark.parametrize("cls", [ResTv2, ResTv1])
def test_fused_attn_is_a_deprecated_alias_of_fast_paths(cls):
    arch = TINY_V1 if cls is ResTv1 else TINY
    with pytest.warns(DeprecationWarning, match="fused_attn is deprecated; use fast_paths"):
        model = cls(arch=arch, fused_attn=False)
    assert not model.stage1[0].attn.fast_paths
    assert cls(arch=arch).stage1[0].attn.fast_paths


@pytest.mark.parametrize("name", ["restv2_tiny", "restv1_lite"])
def test_meta_device_shape_inference(name):
    """Built under torch.device('meta') (deferred initialisation, shape inference): the
    same output shapes as on the CPU, forward and backward, without data (autocast has no
    meta device, and the stochastic-depth rates were computed on the default device)."""
    from rest_dense.models import create_model

    x = torch.randn(2, 3, 61, 97)
    torch.manual_seed(0)
    with torch.no_grad():
        want = [tuple(o.shape) for o in create_model(name).eval()(x)]
    with torch.device("meta"):
        model = create_model(name, drop_path_rate=0.1)
    assert all(p.is_meta for p in model.parameters())
    outs = model.train()(x.to("meta"))
    assert [tuple(o.shape) for o in outs] == want
    sum(o.sum() for o in outs).backward()
    assert all(p.grad is not None and p.grad.is_meta for p in model.parameters() if p.requires_grad)
