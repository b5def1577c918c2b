"""Reliability of the core models: constructor arguments are checked where they enter,
inputs are checked where they enter ``forward``, small inputs work.

One parametrised case per row; each checks the exception type and that the message names
the argument / the problem, or checks the correct result.
"""
from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch

from rest_dense.models import DEFAULT_WINDOW_SIZE, ResTv1, ResTv2

from conftest import TINY_ARCH

CLASSES = {"v2": ResTv2, "v1": ResTv1}


def _arch(**changes):
    return dict(TINY_ARCH, **changes)


def _build(family="v2", **kw):
    kw.setdefault("arch", _arch())
    return CLASSES[family](**kw)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {f: _build(f).eval() for f in CLASSES}


# --------------------------------------------------------------------------- constructor
# id -> (family, kwargs, exception, message pattern)
BAD_ARGS = {
    "drop_path_rate-1.0": ("v2", dict(drop_path_rate=1.0),
        ValueError, r"drop_path_rate must be in \[0, 1\), got 1\.0"),
    "drop_path_rate-negative": ("v1", dict(drop_path_rate=-0.1),
        ValueError, r"drop_path_rate must be in \[0, 1\)"),
    "drop_path_rate-nan": ("v2", dict(drop_path_rate=float("nan")), ValueError, r"drop_path_rate .*nan"),
    "drop_path_rate-string": ("v2", dict(drop_path_rate="0.1"),
        TypeError, r"drop_path_rate must be a number"),
    "drop_path_rate-bool": ("v1", dict(drop_path_rate=True),
        TypeError, r"drop_path_rate must be a number"),
    "attn_drop_rate-1.5": ("v2", dict(attn_drop_rate=1.5),
        ValueError, r"attn_drop_rate must be in \[0, 1\)"),
    "attn_drop_rate-v1-negative": ("v1", dict(attn_drop_rate=-1e-3), ValueError, r"attn_drop_rate"),
    "in_channels-0": ("v2", dict(in_channels=0), ValueError, r"in_channels must be >= 1, got 0"),
    "in_channels-float": ("v1", dict(in_channels=2.5),
        TypeError, r"in_channels must be an integer, got 2\.5"),
    "in_channels-bool": ("v2", dict(in_channels=True),
        TypeError, r"in_channels must be an integer, got the bool"),
    "frozen_stages-5": ("v2", dict(frozen_stages=5),
        ValueError, r"frozen_stages must be in -1\.\.4, got 5"),
    "frozen_stages--2": ("v1", dict(frozen_stages=-2), ValueError, r"frozen_stages must be in -1\.\.4"),
    "frozen_stages-float": ("v2", dict(frozen_stages=1.0),
        TypeError, r"frozen_stages must be an integer"),
    "frozen_stages-bool": ("v2", dict(frozen_stages=False), TypeError, r"frozen_stages .*bool"),
    "out_indices-4": ("v2", dict(out_indices=(0, 4)),
        ValueError, r"out_indices\[1\] must be in 0\.\.3, got 4"),
    "out_indices-negative": ("v1", dict(out_indices=(-1,)),
        ValueError, r"out_indices\[0\] must be in 0\.\.3"),
    "out_indices-empty": ("v2", dict(out_indices=()), ValueError, r"out_indices must be a non-empty"),
    "out_indices-duplicate": ("v1", dict(out_indices=(1, 2, 1)),
        ValueError, r"out_indices has duplicates"),
    "out_indices-float": ("v2", dict(out_indices=(0.0, 1)),
        TypeError, r"out_indices\[0\] must be an integer"),
    "out_indices-bool": ("v2", dict(out_indices=(True, 2)), TypeError, r"out_indices\[0\] .*bool"),
    "out_indices-string": ("v2", dict(out_indices="0123"), TypeError, r"out_indices must be a sequence"),
    "out_indices-set": ("v2", dict(out_indices={0, 1}),
        TypeError, r"out_indices must be a sequence .*order"),
    "norm_eval-string": ("v2", dict(norm_eval="False"), TypeError, r"norm_eval must be True or False"),
    "with_cp-int": ("v1", dict(with_cp=1), TypeError,
                    r"^(?=.*with_cp must be True)(?=.*got 1 \(int\))(?=.*'mlp')"),
    "fast_paths-none": ("v2", dict(fast_paths=None), TypeError, r"fast_paths must be True or False"),
    "fused_attn-none": ("v2", dict(fused_attn=None), TypeError, r"fast_paths must be True or False"),
    "fused_attn-disagrees": ("v1", dict(fast_paths=False, fused_attn=True), ValueError,
                             r"fast_paths=False and the deprecated fused_attn=True disagree"),
    "attn_mode-unknown": ("v2", dict(attn_mode="swin"),
        ValueError, r"unknown attn_mode 'swin'; choose one of"),
    "attn_mode-not-str": ("v2", dict(attn_mode=None), TypeError, r"attn_mode must be one of .*None"),
    "window_size-not-multiple-in-win": ("v2", dict(attn_mode="win", window_size=7), ValueError,
                                        r"window_size\[0\]=7 must be a positive multiple of "
                                        r"stage 1's sr_ratio 8"),
    "window_size-not-multiple-in-hwin": ("v2", dict(attn_mode="hwin", window_size=(64, 30, 16, 8)),
                                         ValueError,
                                         r"window_size\[1\]=30 .*sr_ratio 4 in attn_mode 'hwin'"),
    "window_size-3-values": ("v2", dict(attn_mode="cwin", window_size=(64, 32, 16)), ValueError,
                             r"window_size needs 4 integers \(one per stage\), got 3"),
    "window_size-float": ("v2", dict(attn_mode="win", window_size=16.0),
        TypeError, r"window_size must be an integer"),
    "window_size-zero": ("v2", dict(window_size=0), ValueError, r"window_size must be >= 1, got 0"),
    "arch-depths-float": ("v2", dict(arch=_arch(depths=(1, 2.5, 2, 2))), TypeError,
                          r"arch field 'depths'\[1\] must be an integer, got 2\.5"),
    "arch-depths-zero": ("v1", dict(arch=_arch(depths=(1, 0, 2, 2))), ValueError,
                         r"arch field 'depths'\[1\] must be >= 1, got 0"),
    "arch-depths-scalar": ("v2", dict(arch=_arch(depths=2)), TypeError, r"'depths' needs 4 integers"),
    "arch-heads-zero": ("v2", dict(arch=_arch(num_heads=(0, 2, 4, 8))), ValueError,
                        r"'num_heads'\[0\] must be >= 1"),
    "arch-heads-bool": ("v1", dict(arch=_arch(num_heads=(True, 2, 4, 8))), TypeError,
                        r"'num_heads'\[0\] .*bool"),
    "arch-dims-not-divisible": ("v2", dict(arch=_arch(embed_dims=(16, 32, 66, 128))), ValueError,
                                r"stage 3: embed_dims 66 is not divisible by num_heads 4"),
    "arch-dims-3-values": ("v2", dict(arch=_arch(embed_dims=(16, 32, 64))), ValueError,
                           r"'embed_dims' needs 4 integers \(one per stage\), got 3"),
    "arch-dims-first-1": ("v2", dict(arch=_arch(embed_dims=(1, 32, 64, 128), num_heads=(1, 2, 4, 8))),
                          ValueError, r"'embed_dims'\[0\] must be at least 2"),
    "arch-sr-zero": ("v1", dict(arch=_arch(sr_ratios=(8, 4, 2, 0))),
        ValueError, r"'sr_ratios'\[3\] must be >= 1"),
    "arch-mlp_ratio-zero": ("v2", dict(arch=_arch(mlp_ratio=0)),
        ValueError, r"'mlp_ratio' must be a positive number"),
    "arch-mlp_ratio-no-hidden": ("v2", dict(arch=_arch(mlp_ratio=0.01)), ValueError,
                                 r"'mlp_ratio' 0\.01 leaves stage 1's MLP \(embed_dims 16\) without "
                                 r"hidden channels"),
    "arch-v2-odd-sr": ("v2", dict(arch=_arch(sr_ratios=(8, 3, 2, 1))), ValueError,
                       r"'sr_ratios'\[1\] is 3: .*1 or an even ratio"),
    "arch-unknown-field": ("v2", dict(arch=_arch(qkv_bias=False)),
        ValueError, r"unknown fields \['qkv_bias'\]"),
    "arch-missing-field": ("v1", dict(arch={"embed_dims": (16, 32, 64, 128)}),
        ValueError, r"missing \["),
    "arch-v1-flag-string": ("v1", dict(arch=_arch(apply_transform="yes")), TypeError,
                            r"'apply_transform' must be True or False"),
    "arch-unknown-name": ("v2", dict(arch="huge"),
        ValueError, r"unknown ResTv2 arch 'huge'; choose one of"),
    "arch-wrong-type": ("v1", dict(arch=5),
        TypeError, r"ResTv1 arch must be a variant name or a dict, got int"),
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_bad_constructor_argument(case):
    family, kwargs, exc, pattern = BAD_ARGS[case]
    with pytest.raises(exc, match=pattern):
        _build(family, **kwargs)


def test_global_mode_ignores_window_multiples():
    """window sizes are checked against sr_ratios only where a window mode uses them."""
    model = _build("v2", window_size=7).eval()
    assert model.window_size == (7,) * 4
    outs = model(torch.randn(1, 3, 40, 56))
    assert [o.shape[-2:] for o in outs] == [(10, 14), (5, 7), (3, 4), (2, 2)]
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize("family", list(CLASSES))
def test_out_indices_any_order(family):
    torch.manual_seed(0)
    model = _build(family, out_indices=[3, 0, 2]).eval()
    assert [f.stage for f in model.feature_info] == [3, 0, 2]
    outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [128, 16, 64] == list(model.out_channels)
    # the same maps as the default order
    torch.manual_seed(0)
    full = _build(family).eval()
    full.load_state_dict(model.state_dict(), strict=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref, got = full(x), model(x)
    for g, r in zip(got, (ref[3], ref[0], ref[2])):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("value,expected", [(np.int64(2), (2,)), (torch.tensor(1), (1,)),
                                            (np.array([2, 0]), (2, 0)), (range(3), (0, 1, 2))],
                         ids=["numpy-int", "0d-tensor", "numpy-array", "range"])
def test_integer_like_out_indices_accepted(value, expected):
    model = _build("v2", out_indices=value)
    assert model.out_indices == expected and all(type(i) is int for i in model.out_indices)


def test_numpy_integers_accepted_in_arch_and_window():
    model = _build("v2", arch=_arch(depths=np.array([1, 1, 2, 1])), attn_mode="win",
                   window_size=np.int64(16), in_channels=np.int32(3))
    assert model.depths == (1, 1, 2, 1) and model.window_size == (16,) * 4
    assert model.in_channels == 3 and type(model.in_channels) is int


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_numpy_bools_accepted_as_flags(family):
    model = _build(family, norm_eval=np.True_, fast_paths=np.False_, with_cp=np.bool_(True))
    assert model.norm_eval is True and model.cp_level == "block"
    assert model.stage1[0].attn.fast_paths is False


def test_zero_d_tensor_window_size():
    assert _build("v2", attn_mode="win", window_size=torch.tensor(16)).window_size == (16,) * 4


def test_restv1_takes_odd_sr_ratios():  # EMSA has no upsample branch: any ratio covers the map
    model = _build("v1", arch=_arch(sr_ratios=(3, 3, 3, 1))).eval()
    with torch.no_grad():
        assert [tuple(o.shape[-2:]) for o in model(torch.randn(1, 3, 64, 64))] == \
            [(16, 16), (8, 8), (4, 4), (2, 2)]


def test_window_size_none_means_default():
    assert _build("v2", attn_mode="win", window_size=None).window_size == DEFAULT_WINDOW_SIZE


# --------------------------------------------------------------------------- inputs
def _nan(shape=(1, 3, 32, 32)):
    x = torch.randn(shape)
    x[0, 1, 3, 4] = float("nan")
    return x


def _inf(shape=(1, 3, 32, 32)):
    x = torch.randn(shape)
    x[0, 0, 0, 0] = float("inf")
    x[0, 2, 5, 5] = float("-inf")
    return x


# id -> (input maker, exception, pattern)
BAD_INPUTS = {
    "empty-batch": (lambda: torch.randn(0, 3, 32, 32), ValueError, r"empty batch \(N=0"),
    "empty-height": (lambda: torch.randn(1, 3, 0, 32), ValueError, r"empty image \(H x W = 0 x 32\)"),
    "empty-width": (lambda: torch.randn(2, 3, 32, 0), ValueError, r"empty image \(H x W = 32 x 0\)"),
    "uint8": (lambda: torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8), TypeError,
              r"expects a floating-point input, got torch\.uint8"),
    "int64": (lambda: torch.ones(1, 3, 32, 32, dtype=torch.int64),
        TypeError, r"floating-point input, got torch\.int64"),
    "bool": (lambda: torch.ones(1, 3, 32, 32, dtype=torch.bool),
        TypeError, r"floating-point input, got torch\.bool"),
    "float64-into-float32": (lambda: torch.randn(1, 3, 32, 32, dtype=torch.float64), TypeError,
                             r"torch\.float32 weights but the input is torch\.float64"),
    "float16-outside-autocast": (lambda: torch.randn(1, 3, 32, 32).half(), TypeError,
                                 r"input is torch\.float16.*torch\.autocast"),
    "nan": (_nan, ValueError, r"non-finite values \(1 NaN, 0 inf"),
    "inf": (_inf, ValueError, r"non-finite values \(0 NaN, 2 inf"),
    "list": (lambda: [[0.0] * 3], TypeError, r"expects a Tensor, got list"),
    "3d": (lambda: torch.randn(3, 32, 32),
        ValueError, r"4-D \(N, C, H, W\) input, got shape \(3, 32, 32\)"),
    "wrong-channels": (lambda: torch.randn(1, 1, 32, 32), ValueError, r"3 input channels.*1 channels"),
    "meta-device": (lambda: torch.empty(1, 3, 32, 32, device="meta"), ValueError,
                    r"weights on cpu but the input is on meta"),
}


@pytest.mark.parametrize("family", list(CLASSES))
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(models, family, case):
    make, exc, pattern = BAD_INPUTS[case]
    with pytest.raises(exc, match=pattern) as info:
        models[family](make())
    assert CLASSES[family].__name__ in str(info.value)


def test_float64_under_autocast_is_refused(models):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match="autocast does not cast float64"):
            models["v2"](torch.randn(1, 3, 32, 32, dtype=torch.float64))
        # float64 weights stay float64 under autocast: only float64 inputs fit them
        model64 = copy.deepcopy(models["v2"]).double()
        for dtype in (torch.float32, torch.bfloat16):
            with pytest.raises(TypeError, match="float64 weights but the input is"):
                model64(torch.randn(1, 3, 32, 32, dtype=dtype))
        assert model64(torch.randn(1, 3, 32, 32, dtype=torch.float64))[0].dtype == torch.float64


@pytest.mark.parametrize("family", list(CLASSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32-input", "bf16-input", "fp16-input"])
def test_mixed_precision_under_autocast(models, family, dtype):
    x = torch.randn(1, 3, 64, 64).to(dtype)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outs = models[family](x)
    assert all(o.dtype == torch.bfloat16 and torch.isfinite(o.float()).all() for o in outs)


@pytest.mark.parametrize("weights,autocast", [(torch.bfloat16, torch.float16),
                                              (torch.float16, torch.bfloat16)])
def test_reduced_weights_under_the_other_autocast_are_refused(weights, autocast):
    model = _build("v2").to(weights).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=autocast):
        with pytest.raises(TypeError, match=f"{weights} weights but runs under {autocast}"):
            model(torch.randn(1, 3, 32, 32))


def test_float64_model_takes_float64_input():
    torch.manual_seed(0)
    model = _build("v2").double().eval()
    outs = model(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    assert all(o.dtype == torch.float64 and torch.isfinite(o).all() for o in outs)


def test_finite_check_can_be_turned_off(models):
    model = models["v2"]
    model.check_finite_inputs = False
    try:
        outs = model(_nan())
    finally:
        model.check_finite_inputs = True
    assert torch.isnan(outs[0]).any()


def test_finite_check_skipped_while_tracing(models):
    """No data-dependent Python branch ends up in a trace (e.g. for FLOP counting / ONNX)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(models["v2"], torch.randn(1, 3, 32, 32), check_trace=False)
    assert not [w for w in caught if "base.py" in str(w.filename)]
    assert len(traced(torch.randn(1, 3, 32, 32))) == 4


def test_huge_but_finite_values_pass(models):
    """The fast check sums the input; an overflowing sum alone is no reason to refuse."""
    x = torch.full((1, 3, 32, 32), 3e38)
    with torch.no_grad():
        models["v2"](x)


# --------------------------------------------------------------------------- small inputs
SMALL = [("v1", "eval", 1, 32), ("v1", "eval", 2, 1), ("v1", "eval", 1, 17), ("v1", "train", 2, 32),
         ("v2", "eval", 1, 1), ("v2", "eval", 1, 32), ("v2", "train", 2, 8)]


@pytest.mark.parametrize("family,mode,n,size", SMALL,
                         ids=[f"{f}-{m}-{n}x3x{s}x{s}" for f, m, n, s in SMALL])
def test_small_inputs_work(family, mode, n, size):
    torch.manual_seed(0)
    model = _build(family).train(mode == "train")
    outs = model(torch.randn(n, 3, size, size))
    expected = [math.ceil(size / 2 ** (i + 2)) for i in range(4)]
    dims = TINY_ARCH["embed_dims"]
    assert [tuple(o.shape) for o in outs] == [(n, c, e, e) for c, e in zip(dims, expected)]
    assert all(torch.isfinite(o).all() for o in outs)


def test_restv1_single_token_attention_is_the_exact_instance_norm_value():
    """On a 1x1 map the head-mixing instance norm of one value is 0, so the attention output
    is 0 and the block is the identity plus its MLP; compare with an explicit computation."""
    from rest_dense.models.restv1 import EMSA

    torch.manual_seed(0)
    attn = EMSA(32, num_heads=4, sr_ratio=1).eval()
    x = torch.randn(2, 1, 1, 32)
    out = attn(x)
    expected = attn.proj(torch.zeros(2, 1, 1, 32))  # zero attention weights -> proj of zeros
    torch.testing.assert_close(out, expected)


def test_bool_tensor_is_not_a_window_size():
    with pytest.raises(TypeError, match="window_size must be an integer, got the bool"):
        _build("v2", attn_mode="win", window_size=torch.tensor(True))


@pytest.mark.parametrize("neck", ["fpn", "vt_fpn"])
def test_neck_inputs_named(neck):
    from rest_dense.models.fpn import FPN
    from rest_dense.models.vt_fpn import VTFPN

    cls = FPN if neck == "fpn" else VTFPN
    with pytest.raises(TypeError, match="in_channels must be a sequence .*single value"):
        cls(np.array(16))
    model = cls([8, 16])
    with pytest.raises(TypeError, match=r"input 0\) has torch.float32 weights but the input is "
                                        r"torch.float64"):
        model([torch.randn(1, 8, 8, 8).double(), torch.randn(1, 16, 4, 4).double()])
