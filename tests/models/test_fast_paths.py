"""The memory-lean fast paths (rest_dense.models.functional) against the plain modules
and the released computation: outputs AND gradients, every attention mode, train and
eval, odd input sizes, stochastic depth; the with_cp memory levels."""
import pytest
import torch
from torch import nn

from rest_dense.models import ResTv1, ResTv2
from rest_dense import hardware
from rest_dense.models import functional as fast
from rest_dense.models.base import CP_LEVELS, check_cp_level
from rest_dense.models.layers import Block, Mlp, PixelAttention
from rest_dense.models.restv2 import EMSAv2
from rest_dense.reference import ReleasedLayoutResTv2

from conftest import TINY_ARCH

# two blocks in stages 2-3 so that window modes have windowed and global blocks (hwin)
ARCH = dict(TINY_ARCH, depths=(1, 2, 2, 1))
ARCH_V1 = dict(ARCH, qkv_bias=True, apply_transform=True)


def _weights(outs):
    """A fixed, non-uniform cotangent per output (a plain sum would hide layout bugs)."""
    return [torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o).flip(-1) for o in outs]


def _run(model, x, fast_on, seed=0, backward=True):
    """Outputs, input grad and parameter grads of one pass with fast paths on/off."""
    model.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(backward)
    torch.manual_seed(seed)  # same stochastic-depth masks on both paths
    with fast.fast_paths(fast_on):
        outs = model(xi)
    if not backward:
        return outs, None, None
    loss = sum((o * w).sum() for o, w in zip(outs, _weights(outs)))
    loss.backward()
    grads = {n.removeprefix("model."): (None if p.grad is None else p.grad.clone())
             for n, p in model.named_parameters()}
    return outs, xi.grad, grads


def _close(a, b, atol, rtol, msg=None):
    """assert_close with ``atol`` relative to the tensor's scale (gradients of the stem
    reach ~1e3, where float32 rounding alone exceeds a fixed atol)."""
    scale = max(1.0, float(b.detach().abs().max()))
    torch.testing.assert_close(a, b, atol=atol * scale, rtol=rtol, msg=msg)


def _assert_same(a, b, atol, rtol):
    outs_a, dx_a, g_a = a
    outs_b, dx_b, g_b = b
    assert len(outs_a) == len(outs_b) > 0
    for oa, ob in zip(outs_a, outs_b):
        assert torch.isfinite(oa).all()
        _close(oa, ob, atol, rtol)
    if dx_a is None:
        return
    assert torch.isfinite(dx_a).all() and dx_a.abs().sum() > 0
    _close(dx_a, dx_b, atol, rtol)
    assert g_a.keys() == g_b.keys()
    n_grads = 0
    for name in g_a:
        assert (g_a[name] is None) == (g_b[name] is None), name
        if g_a[name] is not None:
            n_grads += 1
            _close(g_a[name], g_b[name], atol, rtol, msg=name)
    assert n_grads > 0


def _randomise_cwin(model):
    """The cross-window convs start at zero; give them weights so that they matter."""
    if getattr(model, "attn_mode", None) == "cwin":
        torch.manual_seed(1)
        for conv in model.cwin_convs:
            nn.init.normal_(conv.weight, std=0.2)
            nn.init.normal_(conv.bias, std=0.2)


# ------------------------------------------------------------------ whole-model parity
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("attn_mode", ["global", "win", "cwin", "hwin"])
def test_restv2_fast_equals_plain(attn_mode, train):
    """float64, odd size 112x137 (every stage's map is cropped somewhere), windows that
    split the maps, stochastic depth on: outputs and all gradients agree."""
    torch.manual_seed(0)
    model = ResTv2(arch=ARCH, attn_mode=attn_mode, window_size=8,
                   drop_path_rate=0.3).double().train(train)
    _randomise_cwin(model)
    x = torch.randn(2, 3, 112, 137, dtype=torch.float64)
    _assert_same(_run(model, x, True), _run(model, x, False), atol=1e-9, rtol=1e-7)


def test_restv2_fast_equals_plain_float32_and_attention_dropout():
    torch.manual_seed(0)
    model = ResTv2(arch=ARCH, drop_path_rate=0.2, attn_drop_rate=0.1).train()
    x = torch.randn(1, 3, 97, 75)
    _assert_same(_run(model, x, True, seed=3), _run(model, x, False, seed=3), atol=2e-5, rtol=1e-4)


def test_restv2_fast_matches_math_reference_and_released():
    """fast_paths=False is the plain explicit-math path; the released layout wraps it."""
    torch.manual_seed(0)
    fused = ResTv2(arch=ARCH).train()
    math = ResTv2(arch=ARCH, fast_paths=False).train()
    math.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 96, 128)
    ours = _run(fused, x, True)
    ref = _run(math, x, True)  # fast paths on, but fast_paths=False keeps the plain path
    _assert_same(ours, ref, atol=2e-5, rtol=1e-4)
    released = ReleasedLayoutResTv2(math)
    _assert_same(ours, _run(released, x, True), atol=2e-5, rtol=1e-4)


def test_restv1_fast_mlp_equals_plain():
    torch.manual_seed(0)
    model = ResTv1(arch=ARCH_V1, drop_path_rate=0.2).double().train()
    x = torch.randn(2, 3, 75, 61, dtype=torch.float64)
    _assert_same(_run(model, x, True), _run(model, x, False), atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("shape", [(2, 4, 37, 5), (1, 2, 1, 1), (3, 8, 64, 16)])
def test_restv1_decomposed_head_mixing_equals_conv_and_instance_norm(shape):
    """The export form of ResTv1's head mixing (elementary ops) against conv2d + softmax +
    InstanceNorm2d, including a 1x1 map (where the norm of one value is 0)."""
    from rest_dense.models.restv1 import mix_heads_decomposed

    gen = torch.Generator().manual_seed(0)
    heads = shape[1]
    logits = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    weight = torch.randn(heads, heads, 1, 1, generator=gen, dtype=torch.float64)
    bias = torch.randn(heads, generator=gen, dtype=torch.float64)
    ref = nn.functional.conv2d(logits, weight, bias).softmax(-1)
    ref = (nn.functional.instance_norm(ref, eps=1e-5) if shape[2] * shape[3] > 1
           else torch.zeros_like(ref))
    out = mix_heads_decomposed(logits, weight, bias, 1e-5)
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)


def test_restv1_traced_equals_eager():
    """Under tracing ResTv1 takes the decomposed head mixing; the traced model must compute
    what the eager one does (odd size; 32x32: stage 4 is a 1x1 map)."""
    torch.manual_seed(0)
    model = ResTv1(arch=ARCH_V1).eval()
    x = torch.randn(1, 3, 75, 61)
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
        for size in [(75, 61), (32, 32)]:
            xi = torch.randn(2, 3, *size)
            for a, b in zip(traced(xi), model(xi)):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_trace_with_grad_passes_the_tracers_own_check():
    """``torch.jit.trace(model, x)`` as users write it: grad enabled and the tracer's check
    (two traces compared) on; the traced model computes the eager one's outputs."""
    torch.manual_seed(0)
    model = ResTv2(arch=ARCH).eval()
    x = torch.randn(1, 3, 61, 45)
    traced = torch.jit.trace(model, x)
    for a, b in zip(traced(x), model(x)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grad_mode", ["no_grad", "inference_mode"])
def test_inference_fast_equals_plain(grad_mode):
    """Without autograd the blocks sum residuals in place; the results must not change."""
    torch.manual_seed(0)
    model = ResTv2(arch=ARCH, attn_mode="hwin", window_size=8).eval()
    x = torch.randn(2, 3, 85, 133)
    ctx = torch.no_grad if grad_mode == "no_grad" else torch.inference_mode
    with ctx():
        with fast.fast_paths(True):
            a = model(x)
        with fast.fast_paths(False):
            b = model(x)
    for oa, ob in zip(a, b):
        torch.testing.assert_close(oa, ob, atol=1e-5, rtol=1e-5)


def test_frozen_stages_fast_equals_plain():
    torch.manual_seed(0)
    model = ResTv2(arch=ARCH, frozen_stages=2).double().train()
    x = torch.randn(1, 3, 64, 80, dtype=torch.float64)
    a, b = _run(model, x, True), _run(model, x, False)
    _assert_same(a, b, atol=1e-9, rtol=1e-7)
    assert a[2]["stage1.0.mlp.fc1.weight"] is None and a[2]["patch_2.proj.weight"] is None
    assert a[2]["stage3.0.mlp.fc1.weight"] is not None


def test_fast_path_rule_per_device_and_dtype():
    x = torch.randn(1, 3, 8, 8)
    assert fast.use_fast_path(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast.use_fast_path(x)  # measured faster and leaner in CPU bf16 too
    assert ("cpu", "bf16") in fast.FAST_PATH_RULE
    with torch.autocast("cpu", dtype=torch.float16):
        assert not fast.use_fast_path(x)  # CPU fp16: measured slower with them
    assert not fast.use_fast_path(x.half())
    assert not any(dev == "cuda" for dev, _ in fast.FAST_PATH_RULE)  # never measured on CUDA
    assert not fast.use_fast_path(x.to(torch.int64))
    with fast.fast_paths(False):
        assert not fast.use_fast_path(x)
    assert fast.fast_paths_enabled()


@pytest.mark.parametrize("cpu", ["amx", "avx512", "other"])
def test_attention_dispatch_rule(cpu, monkeypatch):
    monkeypatch.setattr(hardware, "cpu_class", lambda: cpu)
    q = torch.randn(2, 1, 64, 8)
    k = torch.randn(2, 1, 16, 8)
    small_infer = fast.BF16_ATTENTION_RULE[(cpu, "infer")][0]
    assert small_infer == ("sdpa" if cpu == "amx" else "math")
    assert fast.attention_impl(q, k) == "sdpa"  # CPU fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast.attention_impl(q, k) == small_infer
    assert fast.attention_impl(q.bfloat16(), k.bfloat16()) == small_infer
    assert fast.attention_impl(q.half(), k.half()) == "sdpa"  # CPU fp16: the fused kernel
    with torch.autocast("cpu", dtype=torch.float16):
        assert fast.attention_impl(q, k) == "sdpa"
    # bf16: small and large matrices by the rule of the CPU class and mode
    kb = torch.empty(1, 1, 16, 8, dtype=torch.bfloat16)
    limit = fast.LARGE_ATTENTION_MIN_ELEMENTS
    for mode in ("infer", "train"):
        small, large = fast.BF16_ATTENTION_RULE[(cpu, mode)]
        at, over = (torch.empty(1, 1, limit // 16 + extra, 8, dtype=torch.bfloat16,
                                requires_grad=mode == "train") for extra in (0, 1))
        assert fast.attention_impl(at, kb) == small, mode
        assert fast.attention_impl(over, kb) == large, mode
        with torch.no_grad():  # nothing records: the inference rule
            assert fast.attention_impl(over, kb) == fast.BF16_ATTENTION_RULE[(cpu, "infer")][1]
    # training always chunks large matrices (memory: no matrix kept for backward)
    assert fast.BF16_ATTENTION_RULE[(cpu, "train")] == ("math", "chunked")
    big_q = torch.empty(1, 1, fast.MATH_ATTENTION_MAX_ELEMENTS // 16 + 1, 8, dtype=torch.bfloat16)
    large_infer = fast.BF16_ATTENTION_RULE[(cpu, "infer")][1]
    assert fast.attention_impl(big_q, kb) == large_infer
    assert fast.attention_impl(big_q, kb.expand(2, 1, 16, 8)) == "sdpa"  # not chunkable
    assert fast.attention_impl(big_q.float(), kb.float()) == "sdpa"  # fp32: always fused
    # a large matrix that cannot be chunked falls back to the whole-matrix math below the
    # explicit limit
    mid_q = torch.empty(1, 1, limit // 16 + 1, 8, dtype=torch.bfloat16)
    expected = "sdpa" if large_infer == "sdpa" else "math"
    assert fast.attention_impl(mid_q, kb.expand(2, 1, 16, 8)) == expected
    with fast.forced_attention("math"):
        assert fast.attention_impl(q, k) == "math"
        with fast.forced_attention(None):
            assert fast.attention_impl(q, k) == "sdpa"
    assert fast.attention_impl(q, k) == "sdpa"
    with pytest.raises(ValueError, match="attention impl"):
        fast.set_attention_impl("flash")
    with fast.record_attention_choices() as log:
        fast.attention(q, k, k, 0.5)
    assert [entry[0] for entry in log] == ["sdpa"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_attention_kernels_agree(dtype):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, dtype=dtype, requires_grad=True) for n in (37, 11, 11))
    cot = torch.randn(2, 3, 37, 8, dtype=dtype)
    outs = {impl: fast.attention(q, k, v, 0.3, impl=impl) for impl in fast.ATTENTION_IMPLS}
    grads = {impl: torch.autograd.grad(o, (q, k, v), cot) for impl, o in outs.items()}
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(outs["math"], outs["sdpa"], **tol)
    for a, b in zip(grads["math"], grads["sdpa"]):
        assert torch.isfinite(a).all() and a.abs().sum() > 0
        torch.testing.assert_close(a, b, **tol)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few hundred scores, so that small tensors take several (and a partial
    last) chunk."""
    for cpu in hardware.CPU_CLASSES:
        monkeypatch.setitem(fast.ATTENTION_CHUNK_ELEMENTS, cpu, 200)
    return 200


def _heads_view(b, n, heads, d, dtype, gen):
    """A ``(B, heads, n, d)`` view of a ``(B, n, heads, d)`` tensor (the models' layout)."""
    return torch.randn(b, n, heads, d, dtype=dtype, generator=gen).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 37, 11, 8), (1, 1, 1, 1, 4), (1, 2, 97, 13, 16)])
def test_chunked_attention_equals_explicit(shape, dtype, small_chunks):
    """Chunked attention (several chunks, a partial last one, the models' transposed head
    layout) gives the explicit attention's output and gradients; no_grad gives the same
    output; inputs are left untouched."""
    b, heads, n, nk, d = shape
    gen = torch.Generator().manual_seed(0)
    q, k, v = (_heads_view(b, m, heads, d, dtype, gen) for m in (n, nk, nk))
    cot = torch.randn(b, heads, n, d, dtype=dtype, generator=gen)
    copies = [t.clone() for t in (q, k, v)]
    outs, grads = {}, {}
    for impl in ("math", "chunked"):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        outs[impl] = fast.attention(*leaves, 0.3, impl=impl)
        grads[impl] = torch.autograd.grad(outs[impl], leaves, cot)
    assert fast._chunk_rows(q, k) < n or n == 1
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(outs["chunked"], outs["math"], **tol)
    for a, ref in zip(grads["chunked"], grads["math"]):
        assert a.dtype == ref.dtype and a.shape == ref.shape and torch.isfinite(a).all()
        torch.testing.assert_close(a, ref, **tol)
    with torch.no_grad():
        torch.testing.assert_close(fast.attention(q, k, v, 0.3, impl="chunked"),
                                   outs["chunked"].detach(), rtol=0, atol=0)
    assert all(torch.equal(a, c) for a, c in zip((q, k, v), copies))


def test_chunked_attention_gradcheck(small_chunks):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (_heads_view(2, m, 2, 4, torch.float64, gen).requires_grad_()
               for m in (23, 7, 7))
    assert torch.autograd.gradcheck(lambda a, b, c: fast.attention(a, b, c, 0.7, impl="chunked"),
                                    (q, k, v))


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False),
                                   (False, False, True), (False, True, True)])
def test_chunked_attention_grads_of_some_inputs(needs, small_chunks):
    gen = torch.Generator().manual_seed(1)
    base = [_heads_view(1, m, 2, 8, torch.float32, gen) for m in (40, 9, 9)]
    cot = torch.randn(1, 2, 40, 8, generator=gen)
    got = [t.detach().requires_grad_(need) for t, need in zip(base, needs)]
    ref = [t.detach().requires_grad_(need) for t, need in zip(base, needs)]
    wanted = [t for t in got if t.requires_grad]
    ga = torch.autograd.grad(fast.attention(*got, 0.5, impl="chunked"), wanted, cot)
    gb = torch.autograd.grad(fast.attention(*ref, 0.5, impl="math"),
                             [t for t in ref if t.requires_grad], cot)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)


def test_chunked_attention_under_autocast_and_with_dropout(small_chunks):
    """fp32 inputs under bf16 autocast run chunked in bf16; dropout (which the chunks do
    not apply) runs the explicit math instead, and the log says so."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 1, m, 8, generator=gen) for m in (50, 10, 10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast.attention(q, k, v, 0.4, impl="chunked")
        ref = fast.attention(q, k, v, 0.4, impl="math")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    with fast.record_attention_choices() as log:
        fast.attention(q, k, v, 0.4, dropout_p=0.5, impl="chunked")
        fast.attention(q, k, v, 0.4, impl="chunked")
    assert [entry[0] for entry in log] == ["math", "chunked"]


def test_chunked_attention_second_derivatives(small_chunks):
    """create_graph=True gets a recorded backward (the whole-matrix math differentiated):
    gradgradcheck, and a Hessian-vector product equal to the explicit attention's."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (_heads_view(1, m, 2, 4, torch.float64, gen).requires_grad_() for m in (30, 7, 7))
    chunked = lambda a, b, c: fast.attention(a, b, c, 0.7, impl="chunked")  # noqa: E731
    assert torch.autograd.gradgradcheck(chunked, (q, k, v))
    tangent = torch.ones_like(q)
    hvps = [torch.autograd.functional.hvp(lambda a: fn(a, k, v).square().sum(), q, tangent)[1]
            for fn in (chunked, lambda a, b, c: fast.attention(a, b, c, 0.7, impl="math"))]
    assert hvps[1].abs().sum() > 0
    torch.testing.assert_close(hvps[0], hvps[1])


def test_chunked_attention_steps_aside_where_it_cannot_run(small_chunks):
    """Forced or picked, the chunks give way to the whole-matrix math for operands they do
    not take (values with other leading dims, broadcast values, a tensor scale, dropout,
    tracing, torch.func): same results as the explicit attention, gradients included."""
    gen = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 50, 8, generator=gen), torch.randn(2, 7, 8, generator=gen)
    cases = {"more value dims": torch.randn(3, 2, 7, 8, generator=gen),
             "broadcast values": torch.randn(1, 7, 8, generator=gen)}
    for name, v in cases.items():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with fast.record_attention_choices() as log:
            out = fast.attention(*leaves, 0.3, impl="chunked")
        ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = torch.softmax(ref_leaves[0] * 0.3 @ ref_leaves[1].transpose(-2, -1), -1) @ ref_leaves[2]
        assert [e[0] for e in log] == ["math"] and out.shape == ref.shape, name
        torch.testing.assert_close(out, ref)
        for a, b in zip(torch.autograd.grad(out.sum(), leaves),
                        torch.autograd.grad(ref.sum(), ref_leaves)):
            torch.testing.assert_close(a, b)
    v = torch.randn(2, 7, 8, generator=gen)
    scale = torch.tensor(0.3, requires_grad=True)
    fast.attention(q, k, v, scale, impl="chunked").sum().backward()
    assert scale.grad is not None and scale.grad != 0
    with fast.forced_attention("chunked"):
        with fast.record_attention_choices() as log:
            traced = torch.jit.trace(lambda a, b, c: fast.attention(a, b, c, 0.3), (q, k, v),
                                     check_trace=False)
        grad = torch.func.grad(lambda a: fast.attention(a, k, v, 0.3).square().sum())(q)
    assert [e[0] for e in log] == ["sdpa"]  # as the rule while tracing (ONNX export)
    q2 = torch.randn(2, 33, 8, generator=gen)  # the trace holds no constant result
    torch.testing.assert_close(traced(q2, k, v), fast.attention(q2, k, v, 0.3, impl="math"))
    qg = q.clone().requires_grad_()
    ref_grad, = torch.autograd.grad(fast.attention(qg, k, v, 0.3, impl="math").square().sum(), qg)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("fast_on", [True, False], ids=["fast", "plain"])
def test_vmap_over_the_model_equals_the_loop(fast_on):
    """torch.func.vmap over single images (the input check steps aside: no data-dependent
    check runs under transforms) gives the per-image outputs."""
    torch.manual_seed(0)
    model = ResTv2(arch=ARCH, fast_paths=fast_on).eval()
    x = torch.randn(3, 1, 3, 29, 35)
    outs = torch.func.vmap(lambda xi: model(xi))(x)
    for i in range(3):
        for got, ref in zip(outs, model(x[i])):
            torch.testing.assert_close(got[i], ref)


def test_fast_paths_refuse_second_derivatives_clearly():
    """The memory-lean functions have no second derivative: create_graph=True fails with
    an error naming the way out (not a silently disconnected graph), and that way works."""
    torch.manual_seed(0)
    model = ResTv2(arch=ARCH).double()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="no second derivative.*fast_paths=False"):
        torch.autograd.grad(sum(o.sum() for o in model(x)), x, create_graph=True)
    with fast.fast_paths(False), fast.forced_attention("math"):
        g, = torch.autograd.grad(sum(o.square().sum() for o in model(x)), x, create_graph=True)
        assert torch.autograd.grad(g.sum(), x)[0].abs().sum() > 0


@pytest.mark.parametrize("setting", ["fp16 autocast", "fp32, fast paths off only"])
def test_fused_attention_refuses_second_derivatives_clearly(setting):
    """Where only PyTorch's fused CPU attention stands between the user and a second
    derivative (fp16 autocast, where the fast paths step aside; the fast paths switched off
    without forcing the math attention), create_graph=True names the way out too."""
    torch.manual_seed(0)
    model = ResTv2(arch=ARCH)
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    fp16 = setting.startswith("fp16")
    with torch.autocast("cpu", torch.float16, enabled=fp16), fast.fast_paths(fp16):
        loss = sum(o.float().square().sum() for o in model(x))
    g, = torch.autograd.grad(loss, x, create_graph=True)  # the first derivative is fine
    with pytest.raises(RuntimeError, match="fused CPU attention.*no second derivative.*math"):
        torch.autograd.grad(g.square().sum(), x)
    # a second derivative that does not pass through the attention is left alone, and
    # torch.func's first derivative (create_graph inside) too
    with torch.autocast("cpu", torch.float16, enabled=fp16), fast.fast_paths(fp16):
        feat = model(x)[-1].float().mean((2, 3))
    head = nn.Linear(feat.shape[1], 1)
    dw, = torch.autograd.grad(head(feat).sum(), head.weight, create_graph=True)
    assert torch.autograd.grad((dw * head.weight).sum(), head.weight)[0].abs().sum() > 0
    with fast.forced_attention("sdpa"):
        gx = torch.func.grad(lambda t: model.eval()(t)[-1].square().sum())(x.detach())
    assert torch.isfinite(gx).all() and gx.abs().sum() > 0
    model.train()
    # the way out, in fp32 (fp16 second derivatives of this model overflow to NaN, in the
    # plain computation too)
    with fast.fast_paths(False), fast.forced_attention("math"):
        loss = sum(o.square().mean() for o in model(x))
    g, = torch.autograd.grad(loss, x, create_graph=True)
    assert torch.isfinite(g).all() and torch.autograd.grad(g.sum(), x)[0].abs().sum() > 0


@pytest.mark.parametrize("train", [True, False])
def test_model_with_chunked_attention_matches_explicit(train, monkeypatch):
    """A bf16 ResTv2 with every attention chunked (the limits lowered) matches the same
    model with the explicit attention forced: outputs and gradients."""
    monkeypatch.setitem(fast.ATTENTION_CHUNK_ELEMENTS, "avx512", 512)
    monkeypatch.setattr(fast, "LARGE_ATTENTION_MIN_ELEMENTS", 0)
    monkeypatch.setattr(hardware, "cpu_class", lambda: "avx512")
    torch.manual_seed(0)
    model = ResTv2(arch=ARCH).train(train)
    x = torch.randn(2, 3, 61, 79)

    def run(impl):
        with torch.autocast("cpu", dtype=torch.bfloat16), fast.forced_attention(impl), \
                fast.record_attention_choices() as log:
            result = _run(model, x, True, backward=train)
        assert {entry[0] for entry in log} == {impl}
        return result

    chunked, explicit = run("chunked"), run("math")
    for a, b in zip(chunked[0], explicit[0]):
        assert torch.isfinite(a).all() and _rel(a, b) < 0.02
    if train:
        assert _rel(chunked[1], explicit[1]) < 0.02
        for name, g in explicit[2].items():
            if g is not None and float(g.norm()) > 0:
                assert _rel(chunked[2][name], g) < 0.05, name


def _onednn_linear_used(fn):
    """Whether ``fn()`` went through oneDNN's fused linear (the fast projection)."""
    with torch.profiler.profile() as prof:
        fn()
    return any("_linear_pointwise" in e.name for e in prof.events())


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("shape", [(97, 131, 24), (1, 1, 24), (5, 24)])
def test_fused_linear_equals_f_linear(shape, gelu):
    """The projection fast path (bias and GELU fused into the GEMM) against F.linear
    (+ F.gelu): fp32 to GEMM rounding, bf16 to bf16 rounding, under autocast too."""
    torch.manual_seed(0)
    x, w, b = torch.randn(*shape), torch.randn(40, 24), torch.randn(40)

    def plain(x, w, b):
        out = torch.nn.functional.linear(x, w, b)
        return torch.nn.functional.gelu(out) if gelu else out

    with torch.no_grad():
        out = fast.linear(x, w, b, gelu=gelu)
        assert out.shape == (*shape[:-1], 40) and out.dtype == torch.float32
        torch.testing.assert_close(out, plain(x, w, b), atol=1e-5, rtol=1e-5)
        assert torch.isfinite(out).all()
        if fast._onednn_linear_available(torch.bfloat16):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                auto = fast.linear(x, w, b, gelu=gelu)
                ref = plain(x, w, b)
            assert auto.dtype == torch.bfloat16
            torch.testing.assert_close(auto.float(), ref.float(), atol=0.1, rtol=2e-2)
        torch.testing.assert_close(fast.linear(x, w, None, gelu=gelu), plain(x, w, None),
                                   atol=1e-5, rtol=1e-5)
    if fast._onednn_linear_available(torch.float32):
        with torch.no_grad():
            assert _onednn_linear_used(lambda: fast.linear(x, w, b, gelu=gelu))


def test_fused_linear_falls_back_where_it_must():
    """Recorded autograd, float64, fp16, tracing and mixed dtypes run F.linear: gradients
    flow, exporters see aten::linear, and a dtype mismatch is F.linear's own error."""
    torch.manual_seed(0)
    x = torch.randn(6, 8, requires_grad=True)
    w, b = torch.randn(4, 8, requires_grad=True), torch.randn(4, requires_grad=True)
    assert not _onednn_linear_used(lambda: fast.linear(x, w, b))
    fast.linear(x, w, b, gelu=True).sum().backward()
    assert x.grad is not None and w.grad is not None and b.grad is not None
    with torch.no_grad():
        for dtype in (torch.float64, torch.float16):
            xd, wd = x.detach().to(dtype), w.detach().to(dtype)
            assert not _onednn_linear_used(lambda: fast.linear(xd, wd))
            torch.testing.assert_close(fast.linear(xd, wd), xd @ wd.t())
        with pytest.raises(RuntimeError, match="dtype"):
            fast.linear(x.detach().bfloat16(), w.detach())
    wc, bc = w.detach().clone(), b.detach().clone()
    traced = torch.jit.trace(lambda t: fast.linear(t, wc, bc), x.detach())
    assert "aten::linear" in str(traced.graph) and "_linear_pointwise" not in str(traced.graph)


def test_fused_linear_odd_operands():
    """Strided / expanded biases, float64 under autocast, forward-mode AD, zero features and
    wrong shapes: the same results or the same errors as F.linear."""
    F = torch.nn.functional
    torch.manual_seed(0)
    x, w = torch.randn(3, 5), torch.randn(8, 5)
    with torch.no_grad():
        for bias in (torch.randn(16)[::2], torch.randn(1).expand(8), torch.randn(8, 2)[:, 1]):
            torch.testing.assert_close(fast.linear(x, w, bias), F.linear(x, w, bias))
        wt = torch.randn(5, 8).t()  # a transposed weight
        torch.testing.assert_close(fast.linear(x, wt, None, gelu=True), F.gelu(F.linear(x, wt)))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast never casts float64
            out = fast.linear(x.double(), w.double(), None)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, F.linear(x.double(), w.double()))
        torch.testing.assert_close(fast.linear(torch.randn(3, 0), torch.randn(8, 0), torch.ones(8)),
                                   torch.ones(3, 8))
        for args in ((torch.randn(3, 6), w, None), (x, w, torch.randn(2, 4)),
                     (x, w, torch.randn(8).bfloat16())):
            with pytest.raises(RuntimeError) as ours:
                fast.linear(*args)
            with pytest.raises(RuntimeError) as theirs:
                F.linear(*args)
            assert str(ours.value) == str(theirs.value)
    v = torch.randn(3, 5)
    tangent = torch.func.jvp(lambda a: fast.linear(a, w, None, gelu=True), (x,), (v,))[1]
    expected = torch.func.jvp(lambda a: F.gelu(F.linear(a, w)), (x,), (v,))[1]
    torch.testing.assert_close(tangent, expected)
    assert tangent.abs().sum() > 0


@pytest.mark.parametrize("kind", ["v2", "v1"])
@pytest.mark.parametrize("train", [False, True])
def test_float64_model_under_autocast_stays_float64(kind, train):
    """Autocast leaves float64 alone: a float64 model computes exactly as without autocast,
    through the fast paths too (none of them may cast it down), in training as well."""
    torch.manual_seed(0)
    cls, arch = (ResTv2, ARCH) if kind == "v2" else (ResTv1, ARCH_V1)
    model = cls(arch=arch).double().train(train)
    x = torch.randn(1, 3, 37, 45, dtype=torch.float64)
    ref = _run(model, x, True, backward=train)
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            got = _run(model, x, True, backward=train)
        for o, r in zip(got[0], ref[0]):
            assert o.dtype == torch.float64
            torch.testing.assert_close(o, r, atol=1e-12, rtol=1e-10)
        if train:
            for name, g in ref[2].items():
                torch.testing.assert_close(got[2][name], g, atol=1e-12, rtol=1e-10, msg=name)


def test_restv1_head_mixing_stays_wide_under_autocast():
    """ResTv1's head mixing, softmax and instance norm run outside autocast in fp32 for
    bf16 logits, so its error under bf16 autocast stays that of bf16 weights."""
    torch.manual_seed(0)
    model = ResTv1(arch=ARCH_V1).eval()
    low = ResTv1(arch=ARCH_V1).eval().bfloat16()
    low.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        pure = low(x.bfloat16())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(x)
    for m, p, r in zip(mixed, pure, ref):
        assert _rel(m, r) < max(2 * _rel(p, r), 0.02)


def test_fast_paths_step_aside_for_torch_func():
    """torch.func transforms (grad over functional_call) see the plain computation: the
    custom autograd functions do not support them."""
    from torch.func import functional_call, grad

    torch.manual_seed(0)
    model = ResTv2(arch=ARCH).eval()
    params = dict(model.named_parameters())
    x = torch.randn(1, 3, 33, 29)

    def loss(p):
        return functional_call(model, p, (x,))[0].sum()

    got = grad(loss)(params)
    with fast.fast_paths(False):
        ref = grad(loss)(params)
    for name, g in ref.items():
        assert torch.isfinite(got[name]).all()
        torch.testing.assert_close(got[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_restv1_sr_module_hooks_and_pruning_still_apply_in_training():
    """The key/value reduction runs as its module call when the module has hooks (pruning,
    user hooks): they fire, and pruned training steps run."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    model = ResTv1(arch=ARCH_V1).train()
    prune.l1_unstructured(model.get_submodule("stage1.0.attn.sr"), "weight", amount=0.5)
    calls = []
    model.get_submodule("stage2.0.attn.sr").register_forward_hook(lambda *a: calls.append(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(1, 3, 64, 64)
    for _ in range(2):
        loss = sum(o.square().mean() for o in model(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert len(calls) == 2
    sr = model.get_submodule("stage1.0.attn.sr")
    assert (sr.weight == 0).float().mean() >= 0.5  # the mask still applies


def test_forward_mode_ad_runs_the_plain_computation():
    """Under torch.autograd.forward_ad the model runs ATen ops with forward derivatives
    (no custom functions, no SDPA, no in-place softmax): the tangent matches finite
    differences."""
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    model = ResTv2(arch=ARCH).double().eval()
    x = torch.randn(1, 3, 45, 37, dtype=torch.float64)
    t = torch.randn_like(x)
    with fwAD.dual_level():
        assert fast.attention_impl(fwAD.make_dual(x, t), x) == "math"
        tangents = [fwAD.unpack_dual(o).tangent for o in model(fwAD.make_dual(x, t))]
    with torch.no_grad():
        plus, minus = model(x + 1e-6 * t), model(x - 1e-6 * t)
    for tan, p, m in zip(tangents, plus, minus):
        assert tan is not None
        torch.testing.assert_close(tan, (p - m) / 2e-6, atol=1e-5, rtol=1e-4)


def test_restv1_sr_conv_gradients_right_on_tiny_maps_in_bf16():
    """The key/value reduction's strided depth-wise backward runs in fp32 under bf16
    autocast (the library's bf16 kernel leaves pad-only weight taps unset on small maps)."""
    torch.manual_seed(0)
    model = ResTv1(arch=ARCH_V1).train()
    x = torch.randn(2, 3, 36, 20)
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs = model(x)
        sum(o.float().sum() for o in outs).backward()
        for name, p in model.named_parameters():
            if ".sr." in name:
                assert torch.isfinite(p.grad).all() and p.grad.abs().max() < 1e4, name


@pytest.mark.parametrize("stride,k", [(2, 3), (4, 5), (8, 9), (1, 3)])
def test_dw_conv_backward_bf16_matches_fp32(stride, k):
    """The strided depth-wise backward runs in fp32 for bf16 tensors on the CPU: its
    result is the fp32 result rounded to bf16 (the stride-1 one stays a bf16 kernel)."""
    torch.manual_seed(0)
    c = 6
    x = torch.randn(2, c, 19, 23).bfloat16()
    w = torch.randn(c, 1, k, k).bfloat16()
    y = torch.nn.functional.conv2d(x, w, None, stride, k // 2, 1, c)
    g = torch.randn_like(y)
    got = fast._dw_conv_backward(g, x, w, True, stride, k // 2, (True, True, True))
    ref = fast._dw_conv_backward(g.float(), x.float(), w.float(), True, stride, k // 2,
                                 (True, True, True))
    for a, b in zip(got, ref):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, atol=0.05 * float(b.abs().max()), rtol=2e-2)


def _rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("attn_mode", ["global", "win", "cwin", "hwin"])
@pytest.mark.parametrize("train", [True, False])
def test_fast_paths_under_bf16_autocast(attn_mode, train):
    """Under CPU bf16 autocast the fast paths (and the explicit attention) run: outputs
    and gradients match the plain modules' within bf16 tolerance, and neither is further
    from the fp32 computation than the plain path's own bf16 error allows."""
    torch.manual_seed(0)
    model = ResTv2(arch=ARCH, attn_mode=attn_mode, window_size=(8, 4, 2, 2)).train(train)
    if attn_mode == "cwin":
        for conv in model.cwin_convs:
            nn.init.normal_(conv.weight, 0, 0.1)
    x = torch.randn(2, 3, 61, 79)

    def run(fast_on, amp):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            return _run(model, x, fast_on, backward=train)

    fast_bf16, plain_bf16, ref = run(True, True), run(False, True), run(False, False)
    for of, op, o32 in zip(fast_bf16[0], plain_bf16[0], ref[0]):
        assert of.dtype == op.dtype and torch.isfinite(of).all()
        assert _rel(of, op) < 0.05
        assert _rel(of, o32) < 2 * _rel(op, o32) + 1e-2
    if not train:
        return
    assert _rel(fast_bf16[1], plain_bf16[1]) < 0.05
    for name, g32 in ref[2].items():
        gf, gp = fast_bf16[2][name], plain_bf16[2][name]
        assert (gf is None) == (g32 is None), name
        if g32 is None or float(g32.norm()) == 0:
            continue
        assert torch.isfinite(gf).all(), name
        assert _rel(gf, g32) < 2 * _rel(gp, g32) + 0.05, name


@pytest.mark.parametrize("hw", [(5, 7), (8, 8), (32, 32), (33, 9)])
def test_bf16_training_on_tiny_inputs_has_finite_gradients(hw):
    """Tiny inputs make maps of side 1-2, where the library's bf16 strided-conv weight
    gradient is unset: the fast paths' gradients stay finite and close to fp32's."""
    torch.manual_seed(0)
    model = ResTv2(arch=ARCH).train()
    x = torch.randn(2, 3, *hw)
    ref = _run(model, x, True)
    for _ in range(3):  # the library's failure is intermittent
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs, dx, grads = _run(model, x, True)
        assert torch.isfinite(dx).all()
        for name, g in grads.items():
            assert g is not None and torch.isfinite(g).all(), name
            if name.startswith(("stem.proj.3", "patch_")) and name.endswith("weight"):
                assert _rel(g, ref[2][name]) < 0.3, name  # unset taps are ~1e19 or NaN


@pytest.mark.parametrize("level", ["mlp", "block"])
def test_with_cp_levels_under_bf16_autocast(level):
    """The memory dial works the same under autocast: same outputs and gradients."""
    torch.manual_seed(0)
    base = ResTv2(arch=ARCH).train()
    other = ResTv2(arch=ARCH, with_cp=level).train()
    other.load_state_dict(base.state_dict())
    x = torch.randn(1, 3, 45, 67)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = _run(base, x, True), _run(other, x, True)
    for oa, ob in zip(a[0], b[0]):
        torch.testing.assert_close(oa, ob, atol=1e-2, rtol=1e-2)
    for name, ga in a[2].items():
        assert ga is not None and torch.isfinite(b[2][name]).all()
        torch.testing.assert_close(b[2][name], ga, atol=2e-2 * float(ga.abs().max()) + 1e-6,
                                   rtol=2e-2)


class _NoHostSync(torch.overrides.TorchFunctionMode):
    """Fails on the calls that copy a device value to the host."""

    SYNCING = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.tolist,
               torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.cpu,
               torch.Tensor.numpy, torch.is_nonzero}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCING:
            raise AssertionError(f"host synchronisation: {func}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("train", [True, False])
def test_forward_has_no_host_sync_with_async_input_check(train):
    """With the input check in its accelerator form ('async', the default off the CPU) the
    forward pass makes no device-to-host copy; the CPU form does (and says so)."""
    model = ResTv2(arch=ARCH).train(train)
    x = torch.randn(1, 3, 45, 67)
    model.check_finite_inputs = "async"
    with _NoHostSync():
        outs = model(x)
    assert all(torch.isfinite(o).all() for o in outs)
    model.check_finite_inputs = True
    with pytest.raises(AssertionError, match="host synchronisation"):
        with _NoHostSync():
            model(x)
    model.check_finite_inputs = "async"
    with pytest.raises(RuntimeError):  # the device-side assertion still catches NaN
        model(torch.full((1, 3, 16, 16), float("nan")))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (issue 19's GPU check)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_training_step_has_no_host_sync(dtype):
    """On a GPU, under torch.cuda.set_sync_debug_mode('error'), a training step (forward and
    backward, autocast for fp16 / bf16) makes no device-to-host synchronisation."""
    torch.manual_seed(0)
    model = ResTv2(arch=ARCH).cuda().train()
    x = torch.randn(2, 3, 61, 79, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            outs = model(x)
        sum(o.float().mean() for o in outs).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(o).all() for o in outs)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_fast_paths_switch_restores_and_checks_type():
    assert fast.fast_paths_enabled()
    with pytest.raises(RuntimeError):
        with fast.fast_paths(False):
            assert not fast.fast_paths_enabled()
            raise RuntimeError
    assert fast.fast_paths_enabled()
    with pytest.raises(TypeError, match="bool"):
        fast.set_fast_paths("no")


# ------------------------------------------------------------------ the pieces
def _tiny_block_modules(c=8, hidden=16, bias=True):
    torch.manual_seed(0)
    norm = nn.LayerNorm(c, eps=1e-6).double()
    nn.init.normal_(norm.weight, 1.0, 0.3)
    nn.init.normal_(norm.bias, 0.0, 0.3)
    return norm, Mlp(c, hidden).double()


@pytest.mark.parametrize("recompute_hidden", [False, True])
def test_mlp_branch_gradcheck(recompute_hidden):
    norm, mlp = _tiny_block_modules()
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True)
    expected = mlp(norm(x))
    got = fast.mlp_branch(x, norm, mlp, recompute_hidden=recompute_hidden)
    torch.testing.assert_close(got, expected)
    params = [norm.weight, norm.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias]
    assert torch.autograd.gradcheck(
        lambda x, *p: fast.mlp_branch(x, norm, mlp, recompute_hidden=recompute_hidden),
        (x, *params))


@pytest.mark.parametrize("hw", [(3, 5), (1, 1), (2, 7), (9, 2)])  # side <= 2: the tiny-map backward
@pytest.mark.parametrize("sr", [1, 2, 3, 4, 8])
def test_upsample_values_matches_conv_pixelshuffle(sr, hw):
    torch.manual_seed(sr)
    c, (h, w) = 6, hw
    up = nn.Sequential(nn.Conv2d(c, sr * sr * c, 3, padding=1, groups=c),
                       nn.PixelShuffle(sr)).double()
    v = torch.randn(2, h, w, c, dtype=torch.float64, requires_grad=True)
    expected = up(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    got = fast.upsample_values(v, up[0].weight, up[0].bias, sr)
    assert got.shape == (2, h * sr, w * sr, c) and got.is_contiguous()
    torch.testing.assert_close(got, expected)
    cot = torch.randn_like(got)
    g_exp = torch.autograd.grad(expected, [v, up[0].weight, up[0].bias], cot)
    du, dw, db = fast._upsample_values_backward(cot, v.detach(), up[0].weight.detach(), True, sr,
                                                (True, True, True))
    for a, b in zip((du, dw, db), g_exp):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("sr,hw", [(1, (5, 4)), (2, (5, 7)), (4, (6, 9)), (8, (9, 17))])
def test_attention_fast_equals_module(sr, hw):
    """EMSAv2.forward_fast (norm_q_sr / norm_qkv, attention, up_proj) against
    attn(norm(x)): output and the gradients of the input and of every parameter."""
    torch.manual_seed(0)
    c, nh = 8, 2
    attn = EMSAv2(c, nh, sr_ratio=sr).double()
    norm, _ = _tiny_block_modules(c)
    for p in attn.parameters():
        nn.init.normal_(p, 0.0, 0.3)
    x = torch.randn(2, *hw, c, dtype=torch.float64, requires_grad=True)
    params = [x] + list(attn.parameters()) + list(norm.parameters())
    got, expected = attn.forward_fast(x, norm), attn(norm(x))
    torch.testing.assert_close(got, expected)
    cot = torch.randn_like(got)
    for g_got, g_exp in zip(torch.autograd.grad(got, params, cot),
                            torch.autograd.grad(expected, params, cot)):
        assert g_exp.abs().sum() > 0
        torch.testing.assert_close(g_got, g_exp)


def test_attention_fast_gradcheck():
    """Numerical gradients of the custom functions (sr=2: norm_q_sr; sr=1: norm_qkv)."""
    norm, _ = _tiny_block_modules(4)
    for sr, hw in ((2, (3, 5)), (1, (2, 3))):
        torch.manual_seed(sr)
        attn = EMSAv2(4, 2, sr_ratio=sr).double()
        x = torch.randn(1, *hw, 4, dtype=torch.float64, requires_grad=True)
        params = [attn.q.weight, attn.up[0].weight, attn.proj.bias, norm.weight]
        assert torch.autograd.gradcheck(lambda x, *p: attn.forward_fast(x, norm), (x, *params))


@pytest.mark.parametrize("impl", fast.STRIDED_CONV_BACKWARD_IMPLS)
@pytest.mark.parametrize("hw", [(6, 8), (7, 5), (1, 1)])
def test_conv3x3_s2_gradcheck(hw, impl):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1).double()
    x = torch.randn(2, *hw, 3, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(fast.conv3x3_s2(x, conv), conv(x.permute(0, 3, 1, 2)))
    with fast.forced_conv_backward(impl):
        assert torch.autograd.gradcheck(lambda x, w, b: fast.conv3x3_s2(x, conv),
                                        (x, conv.weight, conv.bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 13, 17, 8), (1, 97, 131, 6), (3, 1, 1, 4), (2, 5, 2, 8)])
def test_conv3x3_s2_backward_impls_agree(shape, dtype):
    """The GEMM and library backward of the strided 3x3 convs give the same gradients
    (fp32 to rounding, bf16 within its precision), whichever the rule picks here."""
    torch.manual_seed(0)
    x = torch.randn(*shape).to(dtype)
    weight = (torch.randn(5, shape[-1], 3, 3) * 0.3).to(dtype)
    out = torch.nn.functional.conv2d(x.permute(0, 3, 1, 2), weight, stride=2, padding=1)
    grad = torch.randn(out.shape).to(dtype).contiguous(memory_format=torch.channels_last)
    results = {}
    for impl in fast.STRIDED_CONV_BACKWARD_IMPLS:
        with fast.forced_conv_backward(impl):
            tiny_reduced = dtype == torch.bfloat16 and min(shape[1:3]) <= 2
            assert fast.strided_conv_backward_impl(x) == ("gemm" if tiny_reduced else impl)
            for _ in range(3):  # the library's failure on such maps is intermittent
                results[impl] = fast.conv3x3_s2_backward(grad, x, weight, True, True)
                assert all(torch.isfinite(t).all() for t in results[impl])
    (dx_g, dw_g), (dx_l, dw_l) = results["gemm"], results["library"]
    assert dx_g.shape == dx_l.shape == x.shape and dw_g.shape == dw_l.shape == weight.shape
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=3e-2)
    for a, b in ((dx_g, dx_l), (dw_g, dw_l)):
        assert torch.isfinite(a).all() and a.abs().sum() > 0
        torch.testing.assert_close(a.float(), b.float(), **tol)
    with fast.forced_conv_backward("library"):
        dx_only, none = fast.conv3x3_s2_backward(grad, x, weight, True, False)
    assert none is None and torch.equal(dx_only, dx_l)


@pytest.mark.parametrize("train", [False, True])
def test_bf16_forward_traces_as_one_graph(train):
    """The kernel rules are constants to torch.compile: a bf16 forward is one graph (a
    rule that asked torch.backends or /proc/cpuinfo at trace time broke it at every
    attention call). This machine's real CPU class, not a patched one."""
    torch.manual_seed(0)
    model = ResTv2(arch=ARCH).train(train)
    x = torch.randn(1, 3, 64, 64)

    def forward(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x)[-1]

    torch._dynamo.reset()
    with torch.set_grad_enabled(train):
        explained = torch._dynamo.explain(forward)(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, \
        [str(b.reason)[:200] for b in explained.break_reasons]


@pytest.mark.parametrize("cpu", ["amx", "avx512", "other"])
def test_strided_conv_backward_rule(cpu, monkeypatch):
    monkeypatch.setattr(hardware, "cpu_class", lambda: cpu)
    tokens = torch.empty(1, 4, 4, 48)
    rule = fast.STRIDED_CONV_BACKWARD_RULE
    for dtype, precision in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"),
                             (torch.float16, "fp16")):
        choice = rule[(cpu, precision)]
        expected = ("library" if 48 <= choice else "gemm") if isinstance(choice, int) else choice
        assert fast.strided_conv_backward_impl(tokens.to(dtype)) == expected
    # bf16 on AVX-512 and AMX: the library for the wide early maps, GEMMs for the narrow
    # late ones (the stages' inputs have 48, 96, 192 and 384 channels)
    assert rule[("avx512", "bf16")] == 96 and rule[("other", "fp32")] == "gemm"
    assert rule[("amx", "bf16")] == 192 and rule[("amx", "fp32")] == 96
    if cpu == "amx":
        for width, expected in ((96, "library"), (192, "library"), (384, "gemm")):
            assert fast.strided_conv_backward_impl(
                torch.empty(1, 4, 4, width).bfloat16()) == expected
        assert fast.strided_conv_backward_impl(torch.empty(1, 4, 4, 192)) == "gemm"
    assert fast.strided_conv_backward_impl(torch.empty(1, 4, 4, 48, device="meta")) == "library"
    # reduced precision with a side of 1 or 2: the library's weight gradient is wrong there
    for hw in ((1, 9), (9, 2), (2, 2)):
        with fast.forced_conv_backward("library"):
            assert fast.strided_conv_backward_impl(torch.empty(1, *hw, 8).bfloat16()) == "gemm"
            assert fast.strided_conv_backward_impl(torch.empty(1, *hw, 8)) == "library"
    with fast.forced_conv_backward("gemm"):
        assert fast.strided_conv_backward_impl(tokens) == "gemm"
        with fast.forced_conv_backward(None):
            assert fast.strided_conv_backward_impl(tokens) == \
                fast.strided_conv_backward_impl(tokens.clone())
    with pytest.raises(ValueError, match="conv backward impl"):
        with fast.forced_conv_backward("cudnn"):
            pass


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_explicit_attention_inference_softmax_in_place(dtype):
    """Without autograd the explicit attention normalises its scores in place: the same
    result as the recorded path, inputs untouched."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8).to(dtype) for n in (37, 11, 11))
    copies = [t.clone() for t in (q, k, v)]
    with torch.no_grad():
        out = fast.attention(q, k, v, 0.3, impl="math")
    ref = torch.softmax((q * 0.3) @ k.transpose(-2, -1), dim=-1) @ v
    assert torch.equal(out, ref)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), copies))
    qg = q.clone().requires_grad_()
    recorded = fast.attention(qg, k, v, 0.3, impl="math")
    assert recorded.requires_grad and torch.equal(recorded.detach(), ref)


@pytest.mark.parametrize("channels_last", [True, False])
def test_pa_norm_gradcheck(channels_last):
    torch.manual_seed(0)
    c = 4
    pa = PixelAttention(c).double()
    norm, _ = _tiny_block_modules(c)
    x = torch.randn(2, c, 5, 6, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    ref = norm(pa(x).permute(0, 2, 3, 1))
    torch.testing.assert_close(fast.pa_norm(x, pa, norm), ref)
    # inference: the gate's conv and sigmoid are one call, the product in place
    for dtype in (torch.float32, torch.bfloat16):
        x_in = x.detach().float().to(dtype)
        pa_d, norm_d = PixelAttention(c).to(dtype), nn.LayerNorm(c).to(dtype)
        pa_d.load_state_dict(pa.state_dict()), norm_d.load_state_dict(norm.state_dict())
        before = x_in.clone()
        with torch.no_grad():
            out, ref_d = fast.pa_norm(x_in, pa_d, norm_d), norm_d(pa_d(x_in).permute(0, 2, 3, 1))
        assert torch.equal(x_in, before) and out.dtype == ref_d.dtype == dtype
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
        torch.testing.assert_close(out, ref_d, **tol)
    params = [pa.pa_conv.weight, pa.pa_conv.bias, norm.weight, norm.bias]
    assert torch.autograd.gradcheck(lambda x, *p: fast.pa_norm(x, pa, norm), (x, *params))


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("norm_eval", [False, True])
def test_stem_tail_matches_modules_and_batchnorm_state(norm_eval, momentum):
    """stem_tail: output, gradients, running statistics and num_batches_tracked as the
    modules give them (training: batch statistics; norm_eval: running statistics)."""
    torch.manual_seed(0)
    ref = ResTv2(arch=ARCH, norm_eval=norm_eval).double()
    for m in ref.stem.proj:
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
            nn.init.normal_(m.weight, 1.0, 0.3)
            nn.init.normal_(m.bias, 0.0, 0.3)
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    p = ref.stem.proj
    states = {}
    for fast_on in (True, False):
        torch.manual_seed(0)
        model = ResTv2(arch=ARCH, norm_eval=norm_eval).double().train()
        model.load_state_dict(ref.state_dict())
        for m in model.stem.proj:
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = momentum
        x = torch.randn(2, 3, 45, 38, dtype=torch.float64)
        states[fast_on] = _run(model, x, fast_on) + (
            {k: v.clone() for k, v in model.stem.state_dict().items() if "running" in k
             or "num_batches" in k},)
    _assert_same(states[True][:3], states[False][:3], atol=1e-9, rtol=1e-7)
    for k, v in states[False][3].items():
        torch.testing.assert_close(states[True][3][k], v, msg=k)
        if not norm_eval and "running" in k:
            assert not torch.equal(v, ref.stem.state_dict()[k]), k  # stats were updated
    # numerical gradients of the custom function itself
    c1 = torch.randn(2, p[1].num_features, 7, 6, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    params = [p[1].weight, p[3].weight, p[4].bias, p[6].weight, p[6].bias]
    ref.train(not norm_eval)
    for impl in fast.STRIDED_CONV_BACKWARD_IMPLS:
        with fast.forced_conv_backward(impl):
            assert torch.autograd.gradcheck(
                lambda c, *w: fast.stem_tail(c, p[1], p[3], p[4], p[6]), (c1, *params))


def _stem_with_stats(seed=0):
    torch.manual_seed(seed)
    stem = ResTv2(arch=ARCH).stem
    for m in stem.proj:
        if isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.3)
            nn.init.normal_(m.bias, 0.0, 0.3)
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return stem


@pytest.mark.parametrize("hw", [(97, 131), (5, 7), (1, 1)])
def test_conv_stem_inference_folds_batchnorm(hw):
    """In inference with eval BatchNorms the stem's conv-BN-ReLU pairs run folded: the
    modules' result (fp32 to rounding, bf16 within its precision), channels-last."""
    stem = _stem_with_stats().eval()
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        ref = stem.proj(x)
        out = fast.conv_stem(x, stem.proj)
        assert out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = fast.conv_stem(x, stem.proj)
        assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
        assert _rel(low, ref) < 2e-2
        with torch.inference_mode():
            torch.testing.assert_close(fast.conv_stem(x, stem.proj), ref, atol=1e-5, rtol=1e-5)
    # a batchnorm without affine parameters or conv bias still folds exactly
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=True)
    bn = nn.BatchNorm2d(4, affine=False).eval()
    bn.running_mean.normal_()
    with torch.no_grad():
        torch.testing.assert_close(fast.conv_bn_relu(x, conv, bn), torch.relu(bn(conv(x))),
                                   atol=1e-5, rtol=1e-5)


def test_conv_stem_inference_keeps_nan():
    """The fused convolution's ReLU would turn NaN into 0; the stem keeps NaN as the
    modules do."""
    stem = _stem_with_stats().eval()
    x = torch.randn(1, 3, 21, 19)
    x[0, 0, 5, 5] = float("nan")
    with torch.no_grad():
        for amp in (False, True):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                got, ref = fast.conv_stem(x, stem.proj), stem.proj(x)
            assert torch.isnan(ref).any()
            assert torch.equal(torch.isnan(got), torch.isnan(ref))


def test_conv_stem_training_refuses_one_value_per_channel():
    """Like nn.BatchNorm2d in training: a 1x1 map of one image is refused, and the running
    statistics are left untouched."""
    stem = _stem_with_stats().train()
    before = {k: v.clone() for k, v in stem.state_dict().items()}
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fast.conv_stem(torch.randn(1, 3, 2, 2), stem.proj)
    for k, v in stem.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        stem.proj(torch.randn(1, 3, 2, 2))


def test_restv1_training_names_the_batchnorm_that_needs_a_larger_input():
    """ResTv1's patch embeddings and stem normalise by batch statistics in training: a
    1x1 map of one image is refused naming the layer; with two images it trains."""
    model = ResTv1(arch=ARCH_V1).train()
    with pytest.raises(ValueError, match="patch embedding's BatchNorm needs a larger image"):
        model(torch.randn(1, 3, 17, 9))  # stage 4 is 1x1
    assert all(torch.isfinite(o).all() for o in model(torch.randn(2, 3, 17, 9)))
    with pytest.raises(ValueError, match="stem's BatchNorm needs a larger image"):
        model(torch.randn(1, 3, 1, 1))
    model.eval()
    assert len(model(torch.randn(1, 3, 17, 9))) == 4  # running statistics: any size


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_model_with_fp32_batchnorms_runs_inference(dtype):
    """A half model whose BatchNorms stay fp32 (apex O2, mmcv's wrap_fp16_model): the
    folded stem computes in the model's dtype, as the modules do."""
    torch.manual_seed(0)
    model = ResTv2(arch=ARCH).eval().to(dtype)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.float()
    x = torch.randn(1, 3, 45, 37).to(dtype)
    with torch.no_grad():
        got = model(x)
        with fast.fast_paths(False):
            ref = model(x)
    for g, r in zip(got, ref):
        assert g.dtype == r.dtype == dtype and torch.isfinite(g).all()
        assert _rel(g, r) < 3e-2


def test_conv_stem_keeps_batchnorm_semantics_where_it_cannot_fold():
    """Training-mode BatchNorm (batch statistics, running-average updates), BatchNorm
    without running statistics, and recorded autograd do not fold."""
    x = torch.randn(2, 3, 33, 29)
    for prepare in ("train", "no_running_stats", "grad"):
        a, b = _stem_with_stats(), _stem_with_stats()
        a.train(prepare == "train"), b.train(prepare == "train")
        if prepare == "no_running_stats":
            for stem in (a, b):
                for m in stem.proj:
                    if isinstance(m, nn.BatchNorm2d):
                        m.track_running_stats = False
                        m.running_mean = m.running_var = None
        with torch.set_grad_enabled(prepare == "grad"):
            out = fast.conv_stem(x, a.proj)
            ref = b.proj(x)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, msg=prepare)
        assert out.requires_grad == (prepare == "grad")
        for ma, mb in zip(a.proj, b.proj):
            if isinstance(ma, nn.BatchNorm2d) and ma.running_mean is not None:
                torch.testing.assert_close(ma.running_mean, mb.running_mean)


# ------------------------------------------------------------------ the memory dial
@pytest.mark.parametrize("kind", ["v2", "v1"])
@pytest.mark.parametrize("fast_on", [True, False], ids=["fast", "plain"])
def test_with_cp_levels_same_outputs_and_grads(kind, fast_on):
    torch.manual_seed(0)
    cls, arch = (ResTv2, ARCH) if kind == "v2" else (ResTv1, ARCH_V1)
    base = cls(arch=arch, drop_path_rate=0.2).double().train()
    x = torch.randn(1, 3, 70, 90, dtype=torch.float64)
    ref = _run(base, x, fast_on)
    for level in ("mlp", "block", True):
        model = cls(arch=arch, drop_path_rate=0.2, with_cp=level).double().train()
        model.load_state_dict(base.state_dict())
        _assert_same(_run(model, x, fast_on), ref, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("kind", ["v2", "v1"])
def test_with_cp_block_recomputes_behind_a_frozen_stem(kind):
    """``frozen_stages=0`` (detectron2's FREEZE_AT 1): stage 1's input records nothing, its
    blocks' weights do; the blocks are still recomputed (they used to keep everything)."""
    torch.manual_seed(0)
    cls, arch = (ResTv2, ARCH) if kind == "v2" else (ResTv1, ARCH_V1)
    x = torch.randn(1, 3, 64, 64)
    grads, runs = [], []
    for level in (False, True):
        model = cls(arch=arch, frozen_stages=0, with_cp=level).train()
        if grads:
            model.load_state_dict(ref_state)
        else:
            ref_state = model.state_dict()
        calls = []
        block = getattr(model, "stage1")[0]
        block.register_forward_pre_hook(lambda *a: calls.append(1))
        sum(o.sum() for o in model(x)).backward()
        runs.append(len(calls))
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert runs == [1, 2]  # once, then forward + recomputation in backward
    assert grads[0].keys() == grads[1].keys() and any(k.startswith("stage1.") for k in grads[0])
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-6)


def test_with_cp_level_names_and_errors():
    assert CP_LEVELS == ("none", "mlp", "block")
    assert check_cp_level(False) == (False, "none")
    assert check_cp_level(True) == (True, "block")
    assert check_cp_level("MLP") == ("mlp", "mlp")
    assert check_cp_level("none") == (False, "none")
    assert check_cp_level("block") == (True, "block")
    model = ResTv2(arch=ARCH, with_cp="mlp")
    assert model.with_cp == "mlp" and model.cp_level == "mlp"
    model.with_cp = True  # may be switched after construction
    assert model.cp_level == "block"
    with pytest.raises(ValueError, match="with_cp must be True, False or one of"):
        ResTv2(arch=ARCH, with_cp="attn")
    with pytest.raises(TypeError, match="with_cp"):
        ResTv1(arch=ARCH_V1, with_cp=1.5)
    with pytest.raises(ValueError, match="recompute"):
        Block(8, nn.Identity())(torch.randn(1, 2, 2, 8), recompute="all")


def test_d2_config_memory_level_reaches_the_backbone():
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec

    from rest_dense.d2 import add_restv2_config
    from rest_dense.d2.backbone import build_restv2_backbone

    cfg = get_cfg()
    add_restv2_config(cfg)
    assert cfg.MODEL.RESTV2.CP_LEVEL == ""
    cfg.MODEL.RESTV2.ARCH.EMBED_DIMS = list(TINY_ARCH["embed_dims"])
    cfg.MODEL.RESTV2.ARCH.DEPTHS = [1, 1, 1, 1]
    cfg.merge_from_list(["MODEL.RESTV2.CP_LEVEL", "mlp"])
    backbone = build_restv2_backbone(cfg, ShapeSpec(channels=3))
    core = next(m for m in backbone.modules() if isinstance(m, ResTv2))
    assert core.cp_level == "mlp"
    cfg.merge_from_list(["MODEL.RESTV2.CP_LEVEL", "", "MODEL.RESTV2.WITH_CP", True])
    core = next(m for m in build_restv2_backbone(cfg, ShapeSpec(channels=3)).modules()
                if isinstance(m, ResTv2))
    assert core.cp_level == "block"


# ------------------------------------------------- the library's bf16 weight-gradient bug
@pytest.mark.parametrize("family,fast_paths,size", [
    ("v1", True, (16, 16)), ("v1", False, (16, 16)), ("v1", True, (33, 17)),
    ("v2", False, (16, 16)), ("v2", False, (33, 17)), ("v2", True, (33, 17)),
    ("v2", False, (2, 2)), ("v2", True, (2, 2)), ("v1", False, (2, 2)),  # the stems' convs
])
def test_bf16_conv_weight_gradients_on_tiny_maps(one_thread, family, fast_paths, size):
    """CPU bf16 training where a convolution's output has a side of 1 (patch embeddings,
    key/value reductions): oneDNN's weight gradient would come back as garbage or inf,
    intermittently, for the plain modules (and ResTv1's patch embeddings on every path).
    Every conv weight gradient must stay finite and within 100x the fp32 gradient's largest
    value, pass after pass (bf16 rounding through a random tiny net moves the early layers'
    gradients by up to a few times; the garbage is 1e30 or inf)."""
    torch.manual_seed(0)
    cls = ResTv1 if family == "v1" else ResTv2
    model = cls(arch=dict(TINY_ARCH), fast_paths=fast_paths).train()
    x = torch.randn(2, 3, *size)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}

    def conv_grads(autocast):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            outs = model(x)
        sum((o.float() * torch.linspace(-1, 1, o.numel()).view_as(o)).sum()
            for o in outs).backward()
        return {n: m.weight.grad.clone() for n, m in convs.items() if m.weight.grad is not None}

    ref = conv_grads(False)
    assert ref
    for _ in range(4):
        got = conv_grads(True)
        assert got.keys() == ref.keys()
        for name, g in got.items():
            assert torch.isfinite(g).all(), name
            assert g.abs().max().item() <= 100 * ref[name].abs().max().item() + 1e-3, name


@pytest.mark.parametrize("cin,groups,kernel,stride,side", [
    (16, 1, 3, 2, 1),   # a patch embedding on a 1-pixel map
    (32, 32, 5, 4, 2),  # a key/value reduction (sr=4) of a 2-pixel map
    (32, 32, 5, 4, 3),
    (32, 32, 9, 8, 5),
])
def test_library_safe_conv_weight_gradient_equals_fp32(one_thread, cin, groups, kernel, stride,
                                                       side):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cin, kernel, stride=stride, padding=kernel // 2, groups=groups)
    for _ in range(10):
        x = torch.randn(2, cin, side, side + 1).to(memory_format=torch.channels_last)
        conv.zero_grad()
        with torch.autocast("cpu", torch.bfloat16):
            y = fast.library_safe_conv(conv, x)
        g = torch.randn(y.shape).to(y.dtype)
        y.backward(g)
        got = conv.weight.grad.clone()
        conv.zero_grad()
        # the reference: the same convolution in fp32 (the detour skips autocast's rounding)
        ref_conv = nn.Conv2d(cin, cin, kernel, stride=stride, padding=kernel // 2, groups=groups)
        ref_conv.load_state_dict(conv.state_dict())
        ref_conv(x).backward(g.float())
        torch.testing.assert_close(got, ref_conv.weight.grad, rtol=1e-4, atol=1e-4)


def test_library_safe_conv_keeps_second_derivatives_and_steps_aside():
    conv = nn.Conv2d(4, 4, 3, stride=2, padding=1)
    x = torch.randn(2, 4, 1, 3, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        y = fast.library_safe_conv(conv, x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 4, 1, 2)
    g, = torch.autograd.grad((y.float() ** 2).sum(), x, create_graph=True)
    (g ** 2).sum().backward()  # a second derivative through the fp32 detour
    assert torch.isfinite(conv.weight.grad).all() and conv.weight.grad.abs().sum() > 0
    # larger outputs, fp32, no autograd, hooked modules: conv(x) as called
    big = torch.randn(2, 4, 9, 9)
    with torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(fast.library_safe_conv(conv, big), conv(big))
        with torch.no_grad():
            assert torch.equal(fast.library_safe_conv(conv, x), conv(x))
    calls = []
    handle = conv.register_forward_hook(lambda *a: calls.append(1))
    with torch.autocast("cpu", torch.bfloat16):
        fast.library_safe_conv(conv, x)
    handle.remove()
    assert calls == [1]


# ------------------------------------------------- hooks and replaced modules: plain path
HOOKED = ["stem.proj.1", "patch_2.norm", "stage2.0.norm1", "stage2.0.attn", "stage2.0.attn.q",
          "stage2.0.mlp", "stage2.0.mlp.fc1", "stage2.0.mlp.act"]


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_hooks_on_submodules_fire(grad):
    """A hooked submodule (feature extraction, observers) makes its block / stem / patch
    embedding run the plain modules, so that the hook sees the call; outputs unchanged."""
    torch.manual_seed(0)
    model = ResTv2(arch=ARCH).train(grad)
    x = torch.randn(1, 3, 64, 64)
    with torch.set_grad_enabled(grad):
        ref = model(x)
    seen = []
    handles = [model.get_submodule(name).register_forward_hook(
        lambda mod, inp, out, name=name: seen.append(name)) for name in HOOKED]
    with torch.set_grad_enabled(grad):
        outs = model(x)
    assert sorted(set(seen)) == sorted(HOOKED)
    for a, b in zip(outs, ref):
        _close(a, b, 1e-5, 1e-4)
    for h in handles:
        h.remove()
    assert fast.as_built(model.stage2[0]) and fast.as_built(model.stem)


def test_hooked_hidden_map_is_not_overwritten():
    """In inference the MLP activates its hidden map in place, but not under a hook on
    ``fc1``: the hook keeps ``fc1``'s output, not GELU of it."""
    model = ResTv2(arch=ARCH, fast_paths=False).eval()
    kept = {}
    model.stage1[0].mlp.fc1.register_forward_hook(
        lambda mod, inp, out: kept.update(out=out, copy=out.clone()))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert (kept["copy"] < 0).any()  # pre-activation values, not GELU outputs
    torch.testing.assert_close(kept["out"], kept["copy"], rtol=0, atol=0)


@pytest.mark.parametrize("fast_on", [True, False], ids=["fast_paths", "plain"])
def test_replaced_submodules_count_in_every_grad_mode(fast_on):
    """A replaced activation or norm is used, whatever the grad mode and fast_paths say:
    same outputs with and without autograd, equal to the plain computation."""
    torch.manual_seed(0)
    model = ResTv2(arch=ARCH, fast_paths=fast_on).eval()
    plain = ResTv2(arch=ARCH, fast_paths=False).eval()
    state = model.state_dict()
    plain.load_state_dict(state)
    for m in (model, plain):
        for blk in [*m.stage1, *m.stage2, *m.stage3, *m.stage4]:
            blk.mlp.act = nn.ReLU()
        m.stage2[0].norm1 = nn.Identity()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        no_grad, ref = model(x), plain(x)
    with_grad = model(x)
    original = ResTv2(arch=ARCH).eval()
    original.load_state_dict(state)
    with torch.no_grad():
        assert (original(x)[3] - ref[3]).abs().max() > 1e-2  # the replacement matters
    for a, b, r in zip(no_grad, with_grad, ref):
        _close(a, b.detach(), 1e-5, 1e-4)
        _close(a, r, 1e-5, 1e-4)


def test_sync_batchnorm_and_parametrizations_leave_the_fast_path():
    """Converting the stem's BatchNorms (SyncBatchNorm under DDP) or parametrizing a weight
    changes a submodule's class: those modules then run as called."""
    model = ResTv2(arch=ARCH)
    assert fast.as_built(model.stem) and fast.as_built(model.stage1[0])
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert not fast.as_built(model.stem) and fast.as_built(model.stage1[0])
    torch.nn.utils.parametrizations.weight_norm(model.stage1[0].mlp.fc1)
    assert not fast.as_built(model.stage1[0])
    # a GELU switched to its tanh approximation keeps its class: the block checks it
    model = ResTv2(arch=ARCH).eval()
    ref = ResTv2(arch=ARCH, fast_paths=False).eval()
    ref.load_state_dict(model.state_dict())
    for m in (model, ref):
        m.stage3[0].mlp.act.approximate = "tanh"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(model(x), ref(x)):
            _close(a, b, 1e-5, 1e-4)


def test_conv_geometry_changes_leave_the_fast_path():
    """A conv of the same class with another padding mode, dilation or kernel (set on the
    layer or swapped in) computes another function: the module runs its layers as called,
    and the result equals the plain computation."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    changes = [
        lambda m: setattr(m.patch_2.proj, "padding_mode", "reflect"),
        lambda m: setattr(m.stage1[0].attn.sr, "padding_mode", "reflect"),
        lambda m: setattr(m.patch_2, "proj", nn.Conv2d(m.patch_2.proj.in_channels,
                                                       m.patch_2.proj.out_channels, 2, 2)),
        lambda m: setattr(m.stem.proj[6], "padding_mode", "reflect"),
    ]
    for change in changes:
        model = ResTv2(arch=ARCH).eval()
        change(model)
        with torch.no_grad():
            fast_out = model(x)
            with fast.fast_paths(False):
                plain_out = model(x)
        for a, b in zip(fast_out, plain_out):
            _close(a, b, 1e-5, 1e-4)
