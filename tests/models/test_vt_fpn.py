"""VT-FPN neck and its token modules (rest_dense.models.vt_fpn), and the plain FPN baseline."""
import io
import math

import pytest
import torch
import torch.nn.functional as F

from rest_dense.models import (FPN, VTFPN, FilterTokenizer, Projector, RecurrentTokenizer,
                               TokenTransformer)
from rest_dense.models.vt_fpn import TokenNorm

#: small channel counts: 4 levels, 4 tokens of 32 channels, 4 heads
CH = (8, 12, 16, 24)
KW = dict(out_channels=16, num_tokens=4, token_channels=32, num_heads=4)
#: the maps of a 97x131 image at strides 4, 8, 16, 32, and a 1x1 top level
ODD_SIZES = ((25, 33), (13, 17), (7, 9), (4, 5), (1, 1))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    torch.manual_seed(0)


def feats(batch=2, channels=CH, sizes=ODD_SIZES, dtype=torch.float32):
    return [torch.randn(batch, c, h, w, dtype=dtype) for c, (h, w) in zip(channels, sizes)]


def test_attention_maps_are_per_image_softmaxes_on_the_right_axis():
    for tokenizer in ("filter", "recurrent"):
        neck = VTFPN(CH + (20,), tokenizer=tokenizer, transformer_depth=2, **KW)
        xs = feats(3, CH + (20,))
        outs, w = neck.attention_maps(xs)
        assert len(w["tokenizer"]) == len(w["projector"]) == 5 and len(w["transformer"]) == 2
        for x, a, p in zip(xs, w["tokenizer"], w["projector"]):
            hw = x.shape[2] * x.shape[3]
            assert a.shape == p.shape == (3, 4, hw)
            assert (a >= 0).all() and (p >= 0).all()
            torch.testing.assert_close(a.sum(2), torch.ones(3, 4))   # tokenizer: over pixels
            torch.testing.assert_close(p.sum(1), torch.ones(3, hw))  # projector: over tokens
        for t in w["transformer"]:
            assert t.shape == (3, 4, 20, 20)
            torch.testing.assert_close(t.sum(-1), torch.ones(3, 4, 20))
        for a, b in zip(outs, neck(xs)):
            torch.testing.assert_close(a, b)


def test_filter_tokenizer_weights_by_construction():
    tok = FilterTokenizer(8, num_tokens=3, token_channels=8, norm_layer=None).eval()
    with torch.no_grad():
        tok.proj.weight.copy_(torch.eye(8))
        tok.proj.bias.zero_()
    x = torch.randn(2, 8, 5, 7)
    tokens = tok(x)
    # permuting the pixels changes no token: the weights are a softmax over the pixels
    perm = torch.randperm(35)
    x_perm = x.flatten(2)[:, :, perm].reshape(x.shape)
    torch.testing.assert_close(tok(x_perm), tokens)
    # every pixel twice: the same weighted averages (a softmax over tokens would double them)
    torch.testing.assert_close(tok(torch.cat([x, x], dim=3)), tokens)
    # a constant map of image b: each token is exactly that image's vector
    v = torch.randn(2, 8)
    const = v[:, :, None, None].expand(2, 8, 4, 6).contiguous()
    torch.testing.assert_close(tok(const), v[:, None, :].expand(2, 3, 8))


def test_projector_weights_by_construction():
    proj = Projector(6, token_channels=5).eval()
    x = torch.randn(2, 6, 4, 3)
    tokens = torch.randn(2, 1, 5).expand(2, 7, 5)  # 7 identical tokens
    out, w = proj(x, tokens, return_weights=True)
    # a convex combination of identical value vectors is that vector at every pixel
    value = proj.v(tokens[:, :1])  # (2, 1, 6)
    torch.testing.assert_close(out, x + value.transpose(1, 2)[..., None])
    torch.testing.assert_close(w, torch.full((2, 7, 12), 1 / 7))
    # permuting pixels permutes the output the same way
    tokens = torch.randn(2, 7, 5)
    perm = torch.randperm(12)
    flat = proj(x, tokens).flatten(2)
    torch.testing.assert_close(proj(x.flatten(2)[:, :, perm].reshape(x.shape), tokens).flatten(2),
                               flat[:, :, perm])


@pytest.mark.parametrize("tokenizer", ["filter", "recurrent"])
def test_batch_independent_in_eval(tokenizer):
    neck = VTFPN(CH, tokenizer=tokenizer, pos_encoding=True, **KW)
    # non-trivial running statistics, then eval
    neck.train()
    neck(feats(4, sizes=ODD_SIZES[:4]))
    neck.eval()
    xs = feats(3, sizes=ODD_SIZES[:4])
    with torch.no_grad():
        batched = neck(xs)
        for i in range(3):
            alone = neck([x[i:i + 1] for x in xs])
            for a, b in zip(alone, batched):
                torch.testing.assert_close(a[0], b[i], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batched[0][0], batched[0][1])


@pytest.mark.parametrize("tokenizer", ["filter", "recurrent"])
@pytest.mark.parametrize("pos_encoding", [False, True])
def test_odd_sizes_and_1x1_top_level(tokenizer, pos_encoding):
    channels = CH + (20,)
    neck = VTFPN(channels, tokenizer=tokenizer, pos_encoding=pos_encoding, **KW).eval()
    xs = feats(2, channels)
    with torch.no_grad():
        outs = neck(xs)
    assert isinstance(outs, tuple) and len(outs) == neck.num_outs == 5
    for x, out in zip(xs, outs):
        assert out.shape == (2, 16, *x.shape[2:])
        assert torch.isfinite(out).all()


def test_single_level_and_extra_outputs():
    neck = VTFPN([8], num_outs=3, **KW).eval()
    outs = neck([torch.randn(2, 8, 9, 7)])
    assert [o.shape[2:] for o in outs] == [(9, 7), (5, 4), (3, 2)]
    torch.testing.assert_close(outs[2], F.max_pool2d(outs[1], 1, stride=2))
    neck = VTFPN(CH, num_outs=5, **KW).eval()
    outs = neck(feats(1, sizes=((32, 48), (16, 24), (8, 12), (4, 6))))
    assert len(outs) == 5 and outs[4].shape == (1, 16, 2, 3)
    assert neck.out_channels == 16 and neck.num_outs == 5


def test_gradients_reach_every_parameter():
    neck = VTFPN(CH, tokenizer="recurrent", pos_encoding=True, transformer_depth=2, **KW).train()
    outs = neck(feats(2, sizes=ODD_SIZES[:4]))
    sum(((o * torch.randn_like(o)).sum() for o in outs)).backward()
    for name, p in neck.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_gradcheck_submodules():
    kw = dict(dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 4, 3, 2, **kw)
    tokens = torch.randn(2, 3, 6, **kw)
    tok = FilterTokenizer(4, num_tokens=3, token_channels=6, norm_layer="ln", pos_encoding=True,
                          pos_grid=2, pos_channels=2).double()
    assert torch.autograd.gradcheck(tok, (x,))
    rec = RecurrentTokenizer(4, token_channels=6, norm_layer="bn", pos_encoding=True, pos_grid=2,
                             pos_channels=2).double().train()
    assert torch.autograd.gradcheck(rec, (x, tokens))
    tf = TokenTransformer(6, num_heads=2, norm_layer="bn").double().train()
    assert torch.autograd.gradcheck(tf, (tokens,))
    proj = Projector(4, token_channels=6).double()
    assert torch.autograd.gradcheck(proj, (x, tokens))
    neck = VTFPN([3, 5], out_channels=4, num_tokens=2, token_channels=6, num_heads=3,
                 norm_layer="ln").double()
    x0 = torch.randn(1, 3, 3, 4, **kw)
    x1 = torch.randn(1, 5, 1, 2, **kw)
    assert torch.autograd.gradcheck(lambda a, b: neck([a, b]), (x0, x1))


def test_bf16_autocast_finite():
    neck = VTFPN(CH, tokenizer="recurrent", **KW).eval()
    xs = feats(2, sizes=ODD_SIZES[:4])
    with torch.no_grad():
        ref = neck(xs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs, w = neck.attention_maps(xs)
    for a, b in zip(outs, ref):
        assert a.shape == b.shape and torch.isfinite(a).all()
        assert (a.float() - b).abs().max() < 0.1 * b.abs().max()
    for a in w["tokenizer"]:
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.float().sum(2), torch.ones(2, 4), atol=2e-2, rtol=0)


class _ListInput(torch.nn.Module):
    """The neck with one argument per map, as tracing and ONNX export need."""

    def __init__(self, neck):
        super().__init__()
        self.neck = neck

    def forward(self, *xs):
        return self.neck(list(xs))


def test_traced_and_onnx_graphs_follow_the_input_size():
    neck = VTFPN(CH[:3], tokenizer="recurrent", pos_encoding=True, **KW).eval()
    model = _ListInput(neck).eval()
    small = tuple(feats(1, CH[:3], ODD_SIZES[:3]))
    large = tuple(feats(2, CH[:3], ((16, 20), (8, 10), (4, 5))))
    with torch.no_grad():
        expected = neck(large)
        traced = torch.jit.trace(model, small, check_trace=False)
        for a, b in zip(traced(*large), expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    ort = pytest.importorskip("onnxruntime")
    buf = io.BytesIO()
    names = ["x0", "x1", "x2"]
    axes = {n: {0: "b", 2: f"h{i}", 3: f"w{i}"} for i, n in enumerate(names)}
    torch.onnx.export(model, small, buf, dynamo=False, input_names=names,
                      dynamic_axes=axes, opset_version=17)
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {n: t.numpy() for n, t in zip(names, large)})
    assert len(got) == 3
    for a, b in zip(got, expected):
        torch.testing.assert_close(torch.from_numpy(a), b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(in_channels=[]), ValueError, "no levels"),
    (dict(in_channels=256), TypeError, "in_channels must be a sequence"),
    (dict(in_channels=[8, 0]), ValueError, r"in_channels\[1\] must be >= 1"),
    (dict(num_tokens=0), ValueError, "num_tokens must be >= 1"),
    (dict(num_tokens=2.5), TypeError, "num_tokens must be an integer"),
    (dict(num_tokens=True), TypeError, "num_tokens must be an integer"),
    (dict(token_channels=30), ValueError, r"token_channels \(30\) must be divisible by num_heads \(4\)"),
    (dict(out_channels=0), ValueError, "out_channels must be >= 1"),
    (dict(tokenizer="cluster"), ValueError, "unknown tokenizer 'cluster'"),
    (dict(num_outs=3), ValueError, r"num_outs \(3\) must be at least the number of levels"),
    (dict(norm_layer="gn"), ValueError, "norm_layer must be 'bn', 'syncbn', 'ln' or None"),
    (dict(pos_encoding="yes"), TypeError, "pos_encoding must be True or False"),
    (dict(transformer_depth=-1), ValueError, "transformer_depth must be >= 0"),
])
def test_bad_arguments_are_named(kwargs, error, match):
    args = dict(KW, in_channels=CH)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        VTFPN(**args)


def test_bad_inputs_are_named():
    neck = VTFPN(CH, **KW).eval()
    good = feats(2, sizes=ODD_SIZES[:4])
    cases = [
        (good[:3], ValueError, "got 3 feature maps, expected 4"),
        (good[0], TypeError, "list or tuple of 4 feature maps, got Tensor"),
        (good[:2] + [torch.randn(2, 20, 7, 9)] + good[3:], ValueError,
         r"input 2 has 20 channels, in_channels\[2\] is 16"),
        (good[:3] + [torch.randn(24, 4, 5)], ValueError, "input 3 must be 4-D"),
        (good[:1] + [torch.randn(2, 12, 0, 17)] + good[2:], ValueError, "input 1 is an empty map"),
        (good[:3] + [torch.randn(3, 24, 4, 5)], ValueError, "input 3 has batch size 3, input 0 has 2"),
        (good[:3] + [torch.ones(2, 24, 4, 5, dtype=torch.long)], TypeError, "input 3 must be floating"),
        (good[:3] + [None], TypeError, "input 3 is a NoneType"),
    ]
    for xs, error, match in cases:
        with pytest.raises(error, match=match):
            neck(xs)
    with pytest.raises(TypeError, match=r"input 0\) has torch.float32 weights but the input is "
                                         r"torch.float64"):
        neck([x.double() for x in good])
    with torch.autocast("cpu", torch.bfloat16):  # autocast casts reduced and fp32 maps
        assert all(torch.isfinite(o).all() for o in neck([x.bfloat16() for x in good]))
    for unordered in ({8, 12, 16, 24}, {8: 0, 12: 1}):
        with pytest.raises(TypeError, match="in_channels must be ordered"):
            VTFPN(unordered)
    with pytest.raises(ValueError, match="norm_layer='bn' needs more than one token"):
        VTFPN([8], num_tokens=1, token_channels=32, num_heads=4).train()([torch.randn(1, 8, 3, 3)])


def test_submodules_refuse_maps_and_tokens_that_do_not_belong_together():
    """The public token modules name a mismatch instead of broadcasting one image's tokens
    over a batch or failing in a matmul."""
    x = torch.randn(2, 32, 8, 8)
    cases = [
        (lambda: Projector(32, 64)(x, torch.randn(1, 4, 64)), "tokens of 1 images for a map of 2"),
        (lambda: Projector(32, 64)(x[:, :16], torch.randn(2, 4, 64)), "built for 32 map channels"),
        (lambda: Projector(32, 64)(x, torch.randn(2, 4, 16)), "tokens of 64 channels, got 16"),
        (lambda: FilterTokenizer(32, 4, 64)(x[0]), r"\(B, C, H, W\) map, got \(32, 8, 8\)"),
        (lambda: RecurrentTokenizer(32, 64)(x, torch.randn(3, 4, 64)), "tokens of 3 images"),
        (lambda: RecurrentTokenizer(32, 64)(x, torch.randn(4, 64)), r"\(B, L, C\) tokens"),
        # a softmax over no tokens returned the map unchanged
        (lambda: Projector(32, 64)(x, torch.randn(2, 0, 64)), r"got no tokens \(L = 0\)"),
        (lambda: RecurrentTokenizer(32, 64)(x, torch.randn(2, 0, 64)), "got no tokens"),
        # the transformer failed in a matmul
        (lambda: TokenTransformer(16, 4)(torch.randn(2, 5, 12)), "tokens of 16 channels, got 12"),
        (lambda: TokenTransformer(16, 4)(torch.randn(5, 16)), r"\(B, L, C\) tokens"),
    ]
    for call, named in cases:
        with pytest.raises(ValueError, match=named):
            call()
    assert Projector(32, 64)(x, torch.randn(2, 4, 64)).shape == x.shape


def test_hostile_but_valid_inputs():
    neck = VTFPN(CH, **KW).eval()
    xs = feats(2, sizes=ODD_SIZES[:4])
    with torch.no_grad():
        ref = neck(xs)
        for other in (tuple(xs), [x.to(memory_format=torch.channels_last) for x in xs]):
            for a, b in zip(neck(other), ref):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        outs64 = neck.double()([x.double() for x in xs])
        assert neck([x[:0].double() for x in xs])[0].shape == (0, 16, 25, 33)  # empty batch
        expanded = neck([x[:1].double().expand(3, -1, -1, -1) for x in xs])  # stride-0 views
        torch.testing.assert_close(expanded[0][2], outs64[0][0])
    neck = VTFPN(torch.tensor(CH), num_tokens=torch.tensor(4), out_channels=16,
                 token_channels=32, num_heads=4)  # integer tensors are integers too
    assert neck.in_channels == CH and neck.num_tokens == 4
    for a, b in zip(outs64, ref):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a.float(), b, rtol=1e-4, atol=1e-4)


def test_init_weights_and_norm_options():
    neck = VTFPN(CH, pos_encoding=True, norm_layer="ln", **KW)
    for p in neck.parameters():
        torch.nn.init.constant_(p, 0.0)
    neck.init_weights()
    assert neck.tokenizers[0].pos_embed.abs().sum() > 0
    assert neck.lateral_convs[0].weight.abs().sum() > 0 and neck.lateral_convs[0].bias.abs().sum() == 0
    assert isinstance(neck.transformer[0].norm.norm, torch.nn.LayerNorm)
    # 'syncbn' builds SyncBatchNorm: in one process the same numbers as 'bn', trained or
    # not, and back to BatchNorm where a framework reverts SyncBN
    torch.manual_seed(0)
    bn = VTFPN(CH, **KW)
    sbn = VTFPN(CH, norm_layer="syncbn", **KW)
    sbn.load_state_dict(bn.state_dict())
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in sbn.modules()) == \
        sum(isinstance(m, torch.nn.BatchNorm1d) for m in bn.modules()) > 0
    x = feats(2, sizes=ODD_SIZES[:4])
    for mode in (True, False):
        for a, b in zip(bn.train(mode)(x), sbn.train(mode)(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="norm_layer='syncbn' needs more than one token"):
        VTFPN(CH, **{**KW, "num_tokens": 1}, norm_layer="syncbn").train()(feats(1, sizes=ODD_SIZES[:4]))
    # 'bn' converts to SyncBN; None leaves the token path without norms
    sync = torch.nn.SyncBatchNorm.convert_sync_batchnorm(VTFPN(CH, **KW))
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in sync.modules())
    plain = VTFPN(CH, norm_layer=None, **KW)
    assert not any(isinstance(m, (torch.nn.BatchNorm1d, torch.nn.LayerNorm)) for m in plain.modules())
    assert isinstance(TokenNorm(4, "none").norm, torch.nn.Identity)
    assert VTFPN(CH, transformer_depth=0, **KW).eval()(feats(1, sizes=ODD_SIZES[:4]))[0].shape == (1, 16, 25, 33)
    # BatchNorm statistics of a trained neck go back to a new layer's (SyncBatchNorm too)
    for neck in (VTFPN(CH, **KW), torch.nn.SyncBatchNorm.convert_sync_batchnorm(VTFPN(CH, **KW))):
        bns = [m for m in neck.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert bns
        for m in bns:
            m.running_mean.add_(1.0)
            m.num_batches_tracked.add_(2)
            torch.nn.init.constant_(m.weight, 3.0)
        neck.init_weights()
        for m in bns:
            assert torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
            assert torch.equal(m.running_var, torch.ones_like(m.running_var))
            assert int(m.num_batches_tracked) == 0 and torch.equal(m.weight, torch.ones_like(m.weight))


def test_fpn_baseline():
    fpn = FPN(CH, out_channels=16, num_outs=5).eval()
    xs = feats(2, sizes=ODD_SIZES[:4])
    outs = fpn(xs)
    assert [o.shape[2:] for o in outs] == [(25, 33), (13, 17), (7, 9), (4, 5), (2, 3)]
    assert all(torch.isfinite(o).all() for o in outs)
    # top level: no top-down input, just lateral then 3x3 conv
    torch.testing.assert_close(outs[3], fpn.fpn_convs[3](fpn.lateral_convs[3](xs[3])))
    with pytest.raises(ValueError, match="no levels"):
        FPN([])
    with pytest.raises(ValueError, match="FPN input 1 has shape"):
        fpn([xs[0], xs[0], xs[2], xs[3]])
    assert math.isclose(sum(p.numel() for p in fpn.parameters()),
                        sum(c * 16 + 16 for c in CH) + 4 * (16 * 16 * 9 + 16))
