"""Fast, memory-lean paths of the ResT layers: custom autograd functions (pure PyTorch).

Each function here computes exactly what the plain modules compute (same parameters,
same math; only the floating-point summation order can differ, by about 1e-6), but keeps
fewer activations alive for the backward pass and avoids layout copies:

* :func:`mlp_branch` -- ``fc2(GELU(fc1(LayerNorm(x))))`` saving only ``x`` and the 4C-wide
  hidden map (the plain path keeps ``x``, the normalised ``x``, the hidden map and its
  GELU: 10C per token); the LayerNorm and the GELU are recomputed in backward. With
  ``recompute_hidden=True`` even the hidden map is recomputed (one extra ``fc1``): 1C.
* :func:`norm_q_sr` / :func:`norm_qkv` -- the block's first LayerNorm fused with the
  query projection and the spatial-reduction conv (``sr_ratio > 1``), or with one fused
  ``q``+``kv`` projection (``sr_ratio == 1``); the normalised tokens are recomputed.
* :func:`up_proj` -- the EMSAv2 upsample branch (depth-wise 3x3 conv to ``sr**2 * C``
  channels, PixelShuffle, LayerNorm), its sum with the attention output and the output
  projection; nothing full-resolution is saved but the attention output, which the
  attention kernel keeps anyway. The depth-wise conv runs as a plain depth-wise conv
  over channels replicated ``sr**2`` times in an output-position-major order, so that
  the pixel shuffle moves whole channel vectors (faster than a channel-multiplier conv).
* :func:`pa_norm` -- PA position encoding ``x * sigmoid(dwconv3x3(x))`` followed by the
  token LayerNorm, saving only ``x``.
* :func:`conv3x3_s2` -- the patch embeddings' strided 3x3 convs on channels-last tokens,
  forward by the library convolution, backward by :func:`conv3x3_s2_backward`: two GEMMs
  over recomputed patches or the library kernel, whichever
  :func:`strided_conv_backward_impl` finds faster for the CPU class, dtype and width.

* :func:`conv_stem` -- the conv stem; in inference with eval BatchNorms each
  conv-BatchNorm-ReLU is one convolution with the BatchNorm folded in
  (:func:`conv_bn_relu`), in training :func:`stem_tail` keeps two maps for backward.
* :func:`dw_conv` -- the key/value reduction's strided depth-wise conv with its backward
  in fp32 under reduced precision (ResTv1, and ResTv2's module-level attention).

Per transformer block the activations kept for backward drop from about 16C to 8C
floats per token (4C with ``recompute_hidden``).

Their projections go through :func:`linear`: on the CPU (fp32, and bf16 with native bf16
units) one oneDNN GEMM with the bias (and, in inference, the MLP's GELU) fused, instead
of ``F.linear``'s broadcast copy of the bias into the output and a second pass for GELU.

The one door: the models call these functions when built with ``fast_paths=True`` (the
default) and :func:`use_fast_path` allows it for the input, by :data:`FAST_PATH_RULE`
(device type and precision: the CPU in fp32 and in bf16; not CPU fp16, measured slower
there; not CUDA, where they were never measured). Under ``torch.autocast`` each function casts its inputs to the autocast
dtype once and runs forward and backward in it (as autocast would run the GEMMs),
except the strided depth-wise convolution backward, which the CPU runs an order of
magnitude faster in fp32. The attention kernel is chosen by :func:`attention_impl`
(in CPU bf16 by :data:`BF16_ATTENTION_RULE`, per CPU class from
:func:`rest_dense.hardware.cpu_class` and mode: explicit math, over blocks of queries
for large attention matrices, or the fused kernel where AMX makes it faster; PyTorch's
fused ``scaled_dot_product_attention`` elsewhere); docs/kernels.md has the measurements
behind the rules. :func:`fast_paths` switches the fast paths off, e.g. to
compare with the plain computation::

    from rest_dense.models.functional import fast_paths

    with fast_paths(False):
        reference = model(x)       # the plain module-by-module computation

The switch leaves the attention kernel to :func:`attention_impl`; a model built with
``fast_paths=False`` runs the plain modules and the released code's explicit attention
math (the exact reference).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import hardware

__all__ = [
    "attention",
    "linear",
    "attention_impl",
    "set_attention_impl",
    "forced_attention",
    "record_attention_choices",
    "compute_dtype",
    "FAST_PATH_RULE",
    "MATH_ATTENTION_MAX_ELEMENTS",
    "LARGE_ATTENTION_MIN_ELEMENTS",
    "BF16_ATTENTION_RULE",
    "ATTENTION_CHUNK_ELEMENTS",
    "fast_paths",
    "fast_paths_enabled",
    "set_fast_paths",
    "use_fast_path",
    "record_built",
    "as_built",
    "hook_free",
    "needs_grad",
    "mlp_branch",
    "norm_q_sr",
    "norm_qkv",
    "up_proj",
    "upsample_values",
    "pa_norm",
    "conv3x3_s2",
    "conv3x3_s2_backward",
    "strided_conv_backward_impl",
    "forced_conv_backward",
    "record_conv_backward_choices",
    "STRIDED_CONV_BACKWARD_RULE",
    "stem_tail",
    "dw_conv",
    "library_safe_conv",
    "conv_stem",
    "conv_bn_relu",
]


def _first_order_only(backward):
    """Decorator for the ``backward`` of the custom functions here, which have no second
    derivative: it runs without recording, and refuses ``create_graph=True`` with an error
    naming the way out. (``torch.autograd.function.once_differentiable`` lets it through
    silently whenever the incoming gradient does not itself require grad, e.g. the first
    backward of ``loss.sum()``, leaving the second derivatives silently wrong.)"""
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled() and any(ctx.needs_input_grad):
            name = type(ctx).__name__.removesuffix("Backward").lstrip("_")
            raise RuntimeError(f"{name}: rest_dense's fast paths have no second derivative "
                               f"(backward with create_graph=True); {_PLAIN_COMPUTATION}")
        with torch.no_grad():
            return backward(ctx, *grads)
    return wrapper


_PLAIN_COMPUTATION = (
    "run the plain computation for it: build the model with fast_paths=False, or wrap the "
    "forward in `with rest_dense.models.functional.fast_paths(False), "
    "rest_dense.models.functional.forced_attention('math'):`")


class _SecondDerivativeStop(torch.autograd.Function):
    """Identity on a first derivative computed by a kernel without a second one: a second
    derivative that reaches it stops with the way out named."""

    @staticmethod
    def forward(ctx, grad):
        return grad.clone()

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError("attention: PyTorch's fused CPU attention kernel "
                           "(F.scaled_dot_product_attention) has no second derivative "
                           f"(backward with create_graph=True); {_PLAIN_COMPUTATION}")


class _FusedAttentionInputs(torch.autograd.Function):
    """Identity on the inputs of PyTorch's fused CPU attention. In a ``create_graph=True``
    backward it hands on their gradients through :class:`_SecondDerivativeStop`, so that a
    second derivative through the attention names the plain computation (it would meet
    PyTorch's bare "derivative ... not implemented" first), while one that does not pass
    through it (a penalty on the heads' gradients) is left alone."""

    @staticmethod
    def forward(ctx, q, k, v):
        return q.view_as(q), k.view_as(k), v.view_as(v)

    @staticmethod
    def backward(ctx, *grads):
        if not torch.is_grad_enabled():
            return grads
        return tuple(g if g is None or not g.requires_grad else _SecondDerivativeStop.apply(g)
                     for g in grads)


_ENABLED = [True]


def fast_paths_enabled() -> bool:
    """Whether the models may use the fast paths of this module (default: True)."""
    return _ENABLED[0]


def set_fast_paths(enabled: bool) -> bool:
    """Switch the fast paths on or off for the whole process (all threads).

    Args:
        enabled: True to use them (the default), False to run the plain modules.

    Returns:
        The previous setting.

    Raises:
        TypeError: ``enabled`` is not a bool.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"set_fast_paths expects a bool, got {enabled!r}")
    previous = _ENABLED[0]
    _ENABLED[0] = enabled
    return previous


@contextlib.contextmanager
def _holding(slot: list, value):
    """Put ``value`` in a one-element process-wide ``slot`` for the block, then restore it."""
    previous = slot[0]
    slot[0] = value
    try:
        yield value
    finally:
        slot[0] = previous


@contextlib.contextmanager
def fast_paths(enabled: bool = True) -> Iterator[None]:
    """Context manager form of :func:`set_fast_paths`; restores the previous setting.

    Args:
        enabled: use the fast paths inside the ``with`` block.
    """
    previous = set_fast_paths(enabled)
    try:
        yield
    finally:
        _ENABLED[0] = previous


def tracing() -> bool:
    """Whether the forward is being traced, scripted or compiled: sizes may be symbolic,
    data-dependent checks must not run, and exporters must see the plain modules."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling")
                and compiler.is_compiling())


def use_fast_path(x: Tensor) -> bool:
    """True when the fast paths may process ``x``: enabled, not being traced/scripted
    (exporters see the plain modules), and on a device and in a compute dtype where they
    were measured to help (see :data:`FAST_PATH_RULE`)."""
    if not _ENABLED[0]:
        return False
    if tracing():
        return False
    if _in_functorch_transform(x):
        return False  # the custom autograd functions do not support torch.func transforms
    if x.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        return False
    dtype = compute_dtype(x)
    if dtype is None:
        return False
    return (x.device.type, _precision(dtype)) in FAST_PATH_RULE


def _in_functorch_transform(x: Tensor) -> bool:
    """Inside ``torch.func.grad`` / ``vmap`` / ``jvp`` (parameters may be wrapped even when
    ``x`` is not) or a forward-mode AD level (``torch.autograd.forward_ad.dual_level``):
    places where only ATen ops with their own derivative formulas may run."""
    if torch.compiler.is_compiling():
        return False  # the compiler traces through transforms itself (and would break here)
    functorch = torch._C._functorch
    if functorch.is_functorch_wrapped_tensor(x):
        return True
    if getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0:
        return True
    peek = getattr(functorch, "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


# ------------------------------------------------------------------------ the dispatch
#: (device type, precision) pairs on which the memory-lean fast paths run; elsewhere the
#: plain modules do. Measured on CPUs (AVX2 for fp32; AVX-512 BF16 for bf16, see
#: docs/kernels.md); CPU fp16 is slower with them (its depth-wise convolutions fall back to
#: a per-group kernel); on CUDA they were never measured, so CUDA runs the plain modules
#: (whose convolutions and GEMMs are cuDNN/cuBLAS kernels).
FAST_PATH_RULE = frozenset({("cpu", "fp32"), ("cpu", "bf16")})

#: the largest attention matrix (elements, batch and heads included) that the explicit
#: attention materialises whole; larger ones go through ``'chunked'`` where it applies,
#: else through ``F.scaled_dot_product_attention``
MATH_ATTENTION_MAX_ELEMENTS = 1 << 26

#: CPU, bf16: attention matrices (elements, batch and heads included) up to this size are
#: "small" in :data:`BF16_ATTENTION_RULE`, larger ones "large"
LARGE_ATTENTION_MIN_ELEMENTS = 16 << 20
#: CPU, bf16: the attention kernel by (CPU class, mode) as (small matrices, large matrices);
#: mode ``'train'`` when autograd records q, k or v, else ``'infer'``; CPU classes are
#: :func:`rest_dense.hardware.cpu_class`'s. In training the explicit math, by query chunks
#: when large. In inference the same on AVX-512 BF16 without AMX (measured on AMD Zen 4);
#: with AMX (measured on a Sapphire Rapids class Xeon) PyTorch's fused kernel runs its
#: GEMMs on the tiles and wins from global attention down to the default windows (on tiny
#: windows of a few keys it loses per call, not in whole models). Other CPUs emulate bf16
#: (not measured for speed) and take the AVX-512 rule. docs/kernels.md has the measurements.
BF16_ATTENTION_RULE = {
    ("amx", "infer"): ("sdpa", "sdpa"),
    ("amx", "train"): ("math", "chunked"),
    ("avx512", "infer"): ("math", "chunked"),
    ("avx512", "train"): ("math", "chunked"),
    ("other", "infer"): ("math", "chunked"),
    ("other", "train"): ("math", "chunked"),
}

#: the size (elements, batch and heads included) of one chunk's attention matrix, by CPU
#: class, as measured on each (docs/kernels.md, "Chunk size on AMX")
ATTENTION_CHUNK_ELEMENTS = {"amx": 1 << 22, "avx512": 1 << 20, "other": 1 << 20}

ATTENTION_IMPLS = ("sdpa", "math", "chunked")


def _precision(dtype: torch.dtype) -> str:
    """The precision class of the rules: ``'bf16'``, ``'fp16'`` or ``'fp32'`` (float32 and
    float64)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def autocast_off(device_type: str):
    """``torch.autocast(device_type, enabled=False)``; nothing for a device type autocast
    does not know (``'meta'``, in shape inference), where it would raise."""
    try:
        torch.get_autocast_dtype(device_type)
    except RuntimeError:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def compute_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype the GEMMs of ``x``'s layer run in: the autocast dtype when autocast is on
    for ``x``'s device (float64 excepted: autocast leaves it alone), else ``x.dtype``; None
    for device types autocast does not know."""
    device = x.device.type
    try:
        if torch.is_autocast_enabled(device) and x.dtype != torch.float64:
            return torch.get_autocast_dtype(device)  # autocast never lowers float64
    except (TypeError, RuntimeError):
        return None
    return x.dtype


_FORCED_ATTENTION: list = [None]
_CHOICE_LOG: list = [None]


def set_attention_impl(impl: Optional[str]) -> Optional[str]:
    """Force one attention kernel (``'sdpa'`` / ``'math'`` / ``'chunked'``) for the whole process, or
    ``None`` for the rule of :func:`attention_impl`; returns the previous setting."""
    if impl is not None and impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be None or one of {ATTENTION_IMPLS}, got {impl!r}")
    previous = _FORCED_ATTENTION[0]
    _FORCED_ATTENTION[0] = impl
    return previous


@contextlib.contextmanager
def forced_attention(impl: Optional[str]) -> Iterator[None]:
    """Context manager form of :func:`set_attention_impl`."""
    previous = set_attention_impl(impl)
    try:
        yield
    finally:
        _FORCED_ATTENTION[0] = previous


@contextlib.contextmanager
def record_attention_choices() -> Iterator[list]:
    """Collect ``(impl, q shape, k shape, dtype)`` of every :func:`attention` call inside."""
    with _holding(_CHOICE_LOG, []) as log:
        yield log


def attention_impl(q: Tensor, k: Tensor, v: Optional[Tensor] = None) -> str:
    """Which attention kernel :func:`attention` runs for these queries and keys.

    The rule (measurements in docs/kernels.md):

    * CUDA and other accelerators: ``'sdpa'`` (PyTorch's fused flash / memory-efficient
      kernels).
    * CPU, fp32: ``'sdpa'`` (as fast or faster than the explicit math in inference and
      training, and it keeps no attention matrix for backward).
    * CPU, fp16: ``'sdpa'`` (on a CPU without fp16 units the explicit fp16 products run
      about ten times slower than the fused kernel).
    * CPU, bf16 (autocast or bf16 tensors): :data:`BF16_ATTENTION_RULE`, by the CPU class,
      the mode (``'train'`` when autograd records ``q``, ``k`` or ``v``, else ``'infer'``)
      and whether the matrix is larger than :data:`LARGE_ATTENTION_MIN_ELEMENTS`: the
      explicit ``q @ k^T``, softmax, ``@ v`` (``'math'``) where PyTorch's CPU flash kernel
      is slower than the bf16 GEMMs (EMSA's keys are short, spatially reduced), the same
      products over blocks of queries (``'chunked'``: each block's matrix kept in cache
      and recomputed in backward) for large ones, the fused kernel where it wins (AMX,
      inference).
    * A matrix larger than :data:`MATH_ATTENTION_MAX_ELEMENTS` that ``'chunked'`` cannot
      take goes through ``'sdpa'``.
    * Inside ``torch.func`` transforms and forward-mode AD: ``'math'`` (PyTorch's SDPA
      kernels and the chunked function have no forward-mode derivative); while compiling:
      never ``'chunked'``.

    Args:
        q: ``(..., N, d)`` queries.
        k: ``(..., n, d)`` keys.
        v: ``(..., n, d_v)`` values (only whether autograd records them matters).

    Returns:
        ``'sdpa'``, ``'math'`` or ``'chunked'``.
    """
    if _FORCED_ATTENTION[0] is not None:
        return _FORCED_ATTENTION[0]
    if _in_functorch_transform(q):
        return "math"  # ATen ops with every derivative formula (SDPA has no forward AD)
    if q.device.type != "cpu" or torch.jit.is_tracing() or torch.jit.is_scripting():
        return "sdpa"
    dtype = compute_dtype(q) or q.dtype
    if _precision(dtype) != "bf16":
        return "sdpa"
    elements = _score_count(q, k)
    records = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v))
    small, large = BF16_ATTENTION_RULE[(hardware.cpu_class(), "train" if records else "infer")]
    impl = large if elements > LARGE_ATTENTION_MIN_ELEMENTS else small
    if impl == "math" or (impl == "chunked" and not _chunkable(q, k, v)):
        return _whole_matrix_impl(elements)
    return impl


def _whole_matrix_impl(elements: int) -> str:
    """The kernel for an attention matrix of ``elements`` scores that is not chunked: the
    explicit math up to :data:`MATH_ATTENTION_MAX_ELEMENTS`, the fused kernel above."""
    return "sdpa" if elements > MATH_ATTENTION_MAX_ELEMENTS else "math"


def _score_count(q: Tensor, k: Tensor) -> int:
    """Elements of the attention matrix of ``q`` and ``k`` (batch and heads included)."""
    return q.numel() // max(q.shape[-1], 1) * k.shape[-2]


def _chunkable(q: Tensor, k: Tensor, v: Optional[Tensor] = None, scale=1.0,
               dropout_p: float = 0.0) -> bool:
    """Whether the chunked attention can run these operands here: ``q``, ``k`` (and ``v``)
    with the same leading dims, a plain number as scale, no dropout, and neither tracing,
    scripting, compiling nor a ``torch.func`` transform / forward-mode AD (for which the
    custom function has no rule)."""
    if tracing() or _in_functorch_transform(q):
        return False
    return (q.dim() >= 2 and q.shape[:-2] == k.shape[:-2] and q.shape[-1] == k.shape[-1]
            and (v is None or v.shape[:-1] == k.shape[:-1])
            and not isinstance(scale, Tensor) and dropout_p == 0)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float, dropout_p: float = 0.0,
              impl: Optional[str] = None) -> Tensor:
    """``softmax(q @ k^T * scale) @ v`` over ``(..., N, d)`` tensors, by the kernel that
    :func:`attention_impl` picks (or ``impl``: ``'sdpa'`` / ``'math'`` / ``'chunked'``).

    Where ``'chunked'`` cannot run (see ``_chunkable``: dropout, operands whose leading
    dims differ or broadcast, a tensor scale, compiling, ``torch.func``) the whole-matrix
    math runs instead, or SDPA for a matrix over :data:`MATH_ATTENTION_MAX_ELEMENTS`;
    while tracing (ONNX export) SDPA, as the rule has it."""
    impl = attention_impl(q, k, v) if impl is None else impl
    if impl == "chunked" and not _chunkable(q, k, v, scale, dropout_p):
        if torch.jit.is_tracing() or torch.jit.is_scripting():
            impl = "sdpa"  # what the rule runs while tracing (ONNX export)
        elif _in_functorch_transform(q):
            impl = "math"
        else:
            impl = _whole_matrix_impl(_score_count(q, k))
    if _CHOICE_LOG[0] is not None:
        _CHOICE_LOG[0].append((impl, tuple(q.shape), tuple(k.shape), compute_dtype(q)))
    if impl == "sdpa":
        if (q.device.type == "cpu" and q.dtype != torch.float64  # float64: the math kernel
                and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
                and not tracing() and not _in_functorch_transform(q)):
            q, k, v = _FusedAttentionInputs.apply(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    if impl == "chunked":
        return _apply(_ChunkedAttention, q, k, v, float(scale), _chunk_rows(q, k))
    if impl != "math":
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    return _explicit_attention(q, k, v, scale, dropout_p)


def _explicit_attention(q: Tensor, k: Tensor, v: Tensor, scale, dropout_p: float = 0.0) -> Tensor:
    """The released code's explicit attention on the whole matrix."""
    scores = (q * scale) @ k.transpose(-2, -1)
    if (dropout_p == 0 and not scores.requires_grad and not torch.compiler.is_compiling()
            and not _in_functorch_transform(q)):
        # nothing records: normalise the scores in place instead of allocating a second
        # matrix as large (the softmax kernel reads each row before writing it)
        return torch.ops.aten._softmax.out(scores, -1, False, out=scores) @ v
    weights = scores.softmax(dim=-1)
    if dropout_p > 0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v


def _chunk_rows(q: Tensor, k: Tensor) -> int:
    """Queries per chunk: about :data:`ATTENTION_CHUNK_ELEMENTS` (this CPU class's) scores
    per chunk."""
    lead = q.numel() // max(q.shape[-1] * q.shape[-2], 1)
    elements = ATTENTION_CHUNK_ELEMENTS[hardware.cpu_class()]
    return max(16, elements // max(lead * k.shape[-2], 1))


def _softmax_rows(q_rows: Tensor, kt: Tensor) -> Tensor:
    """``softmax(q_rows @ kt)`` (the scale already in ``q_rows``), normalised in place."""
    p = q_rows @ kt
    return torch.ops.aten._softmax.out(p, -1, False, out=p)


class _ChunkedAttention(torch.autograd.Function):
    """Explicit attention over blocks of ``rows`` queries: each block's scores are formed,
    normalised and multiplied by ``v`` while they are in cache; backward recomputes them
    block by block from ``q``, ``k`` and ``v`` (the only tensors kept) and accumulates the
    key and value gradients in fp32 under reduced precision.

    The keys, values and incoming gradient are laid out once per call, not per block; the
    key and value gradients are accumulated transposed (``q^T ds``, ``dout^T p``), so
    that the block-sized matrices are never the transposed operand of a product (which
    the batched GEMM would copy).
    """

    @staticmethod
    def forward(ctx, q, k, v, scale, rows):
        qs = q * scale  # scaled once, as the explicit path does
        kt, vc = k.transpose(-2, -1).contiguous(), v.contiguous()
        out = qs.new_empty(qs.shape[:-1] + v.shape[-1:])
        for i in range(0, qs.shape[-2], rows):
            p = _softmax_rows(qs[..., i:i + rows, :], kt)
            torch.matmul(p, vc, out=out[..., i:i + rows, :])
        ctx.save_for_backward(q, k, v)
        ctx.scale, ctx.rows = scale, rows
        return out

    @staticmethod
    def backward(ctx, dout):
        if torch.is_grad_enabled():  # create_graph=True: differentiate the whole-matrix math
            return _ChunkedAttention._differentiable_backward(ctx, dout)
        q, k, v = ctx.saved_tensors
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        scale, rows = ctx.scale, ctx.rows
        acc = q.dtype if _precision(q.dtype) == "fp32" else torch.float32
        qs, dout = q * scale, dout.contiguous()
        kc, kt, vt = k.contiguous(), k.transpose(-2, -1).contiguous(), v.transpose(-2, -1).contiguous()
        dq = torch.empty_like(qs) if need_q else None
        dkt = qs.new_zeros(k.shape[:-2] + (k.shape[-1], k.shape[-2]), dtype=acc) if need_k else None
        dvt = qs.new_zeros(v.shape[:-2] + (v.shape[-1], v.shape[-2]), dtype=acc) if need_v else None
        for i in range(0, qs.shape[-2], rows):
            qc = qs[..., i:i + rows, :]
            p = _softmax_rows(qc, kt)
            do = dout[..., i:i + rows, :]
            if need_v:
                dvt += do.transpose(-2, -1) @ p
            if need_q or need_k:
                ds = torch.ops.aten._softmax_backward_data(do @ vt, p, -1, p.dtype)
                if need_q:
                    torch.matmul(ds, kc, out=dq[..., i:i + rows, :])
                if need_k:
                    dkt += qc.transpose(-2, -1) @ ds
        if need_q:
            dq.mul_(scale)
        return (dq, None if dkt is None else dkt.transpose(-2, -1).to(k.dtype),
                None if dvt is None else dvt.transpose(-2, -1).to(v.dtype), None, None)

    @staticmethod
    def _differentiable_backward(ctx, dout):
        """The gradients as a recorded graph (for second derivatives): the explicit
        attention recomputed on the saved operands and differentiated with
        ``create_graph=True``."""
        q, k, v = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        inputs = [t for t, n in zip((q, k, v), need) if n]
        grads = iter(torch.autograd.grad(_explicit_attention(q, k, v, ctx.scale), inputs, dout,
                                         create_graph=True, allow_unused=True))
        return tuple(next(grads) if n else None for n in need) + (None, None)


def _apply(function, *args, keep: Sequence[int] = ()):
    """``function.apply(*args)``; under autocast the floating-point tensors among ``args``
    (but those at the indices in ``keep``, and float64 ones, which autocast leaves alone)
    are first cast to the autocast dtype and the function runs with autocast off, so that
    its forward and backward run in one dtype. A float64 first tensor runs as is."""
    first = next(a for a in args if isinstance(a, Tensor))
    device = first.device.type
    dtype = compute_dtype(first)
    if dtype is None or dtype == torch.float64 or not torch.is_autocast_enabled(device):
        return function.apply(*args)
    cast = [a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point()
            and a.dtype != torch.float64 and i not in keep else a for i, a in enumerate(args)]
    with torch.autocast(device, enabled=False):
        return function.apply(*cast)


def needs_grad(x: Tensor, *modules: nn.Module) -> bool:
    """True when autograd will record: grad mode on and ``x`` or a parameter requires grad."""
    if not torch.is_grad_enabled():
        return False
    if x.requires_grad:
        return True
    return any(p.requires_grad for m in modules for p in m.parameters(recurse=False))


# ------------------------------------------------------------------------ projections
@functools.lru_cache(maxsize=None)
def _onednn_available(op: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.ops.mkldnn.<op>`` exists and runs ``dtype`` natively here (fp32, and
    bf16 where oneDNN has native bf16 units)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, op)):
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


def _onednn_linear_available(dtype: torch.dtype) -> bool:
    return _onednn_available("_linear_pointwise", dtype)


def _fused_linear_dtype(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Optional[torch.dtype]:
    """The dtype :func:`linear` runs oneDNN in, or None where ``F.linear`` must run."""
    if tracing():
        return None
    if (x.device.type != "cpu" or x.dim() < 2 or weight.dim() != 2 or x.shape[-1] == 0
            or x.shape[-1] != weight.shape[1] or (bias is not None and (
                bias.dim() != 1 or bias.shape[0] != weight.shape[0]))):
        return None  # F.linear handles these, or names the mistake
    if _in_functorch_transform(x) or torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad
            or (bias is not None and bias.requires_grad)):
        return None  # autograd (also forward-mode) must see F.linear
    auto = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    if auto is not None and all(t is None or t.dtype in (torch.float32, auto)
                                for t in (x, weight, bias)):
        dtype = auto  # autocast casts the fp32 operands (never float64)
    elif weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype):
        dtype = x.dtype
    else:
        return None  # F.linear names the mismatch (or autocast handles a reduced input)
    return dtype if _onednn_linear_available(dtype) else None


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
           gelu: bool = False) -> Tensor:
    """``F.linear(x, weight, bias)``, followed by the exact GELU when ``gelu``.

    On the CPU, in fp32 and (with native bf16 units) bf16, where autograd does not record
    (inference, or the forward of the custom functions below), this is one oneDNN call
    with the bias and the GELU fused into the GEMM: ``F.linear`` first writes the broadcast
    bias into the whole output, and the GELU is a second pass over it (see
    docs/kernels.md for the measurements). Under autocast fp32 operands are cast to the
    autocast dtype, as ``F.linear`` would. Elsewhere (CUDA, fp16, float64, tracing,
    recorded or forward-mode autograd, mismatched shapes or dtypes) it is ``F.linear``
    (and ``F.gelu``).
    """
    dtype = _fused_linear_dtype(x, weight, bias)
    if dtype is not None:
        rows = x.reshape(-1, x.shape[-1]).to(dtype).contiguous()
        out = torch.ops.mkldnn._linear_pointwise(
            rows, weight.to(dtype), None if bias is None else bias.to(dtype).contiguous(),
            "gelu" if gelu else "none", [], "none" if gelu else "")
        return out.view(*x.shape[:-1], out.shape[-1])
    out = F.linear(x, weight, bias)
    return F.gelu(out) if gelu else out


# ----------------------------------------------------------------------------- helpers
def _ln(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float):
    """``torch.native_layer_norm`` over the last dim: (y, mean, rstd)."""
    return torch.native_layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _ln_backward(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Optional[Tensor],
                 bias: Optional[Tensor], mask: Sequence[bool]):
    """Gradients of :func:`_ln` w.r.t. (x, weight, bias) where ``mask`` asks for them."""
    if not any(mask):
        return None, None, None
    return torch.ops.aten.native_layer_norm_backward(
        dy, x, (x.shape[-1],), mean, rstd, weight, bias,
        [bool(mask[0]), bool(mask[1]) and weight is not None, bool(mask[2]) and bias is not None])


def _rows(t: Tensor) -> Tensor:
    """A ``(-1, C)`` contiguous view (or copy) of a channels-last tensor."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.is_contiguous() else t.contiguous()


def _dw_conv_backward(grad_out: Tensor, inp: Tensor, weight: Tensor, has_bias: bool,
                      stride: int, padding: int, mask: Sequence[bool]):
    """Backward of a depth-wise ``F.conv2d`` (groups = input channels)."""
    if not any(mask):
        return None, None, None
    dtype = inp.dtype
    # the CPU's bf16/fp16 strided depth-wise convolution backward is an order of magnitude
    # slower than its fp32 one (docs/kernels.md): run it in fp32
    upcast = stride > 1 and dtype in (torch.bfloat16, torch.float16) and inp.device.type == "cpu"
    if upcast:
        grad_out, inp, weight = grad_out.float(), inp.float(), weight.float()
    grads = torch.ops.aten.convolution_backward(
        grad_out, inp, weight, [weight.shape[0]] if has_bias else None, [stride, stride],
        [padding, padding], [1, 1], False, [0, 0], inp.shape[1],
        [bool(mask[0]), bool(mask[1]), bool(mask[2]) and has_bias])
    if upcast:
        grads = tuple(None if g is None else g.to(dtype) for g in grads)
    return grads


class _DwConv(torch.autograd.Function):
    """A depth-wise ``F.conv2d`` whose backward is :func:`_dw_conv_backward` (fp32 for
    strided reduced-precision convs on the CPU)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.cfg = (bias is not None, stride, padding)
        return F.conv2d(x, weight, bias, stride, padding, 1, x.shape[1])

    @staticmethod
    @_first_order_only
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        has_bias, stride, padding = ctx.cfg
        dx, dw, db = _dw_conv_backward(grad, x, weight, has_bias, stride, padding,
                                       ctx.needs_input_grad[:3])
        return dx, dw, db, None, None


def dw_conv(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``conv(x)`` for a depth-wise conv with square kernel, stride and padding (the
    key/value reduction ``sr``); while autograd records, its backward runs by
    :func:`_dw_conv_backward`: in fp32 for strided bf16/fp16 convs on the CPU, whose
    library kernel is an order of magnitude slower and, on maps where a kernel tap sees
    only padding, leaves that tap's weight gradient unset (docs/kernels.md). A module with
    hooks (pruning, fake quantisation), a subclass or another padding mode runs as called."""
    if not needs_grad(x, conv) or not _plain_module(conv) or conv.padding_mode != "zeros":
        return conv(x)
    return _apply(_DwConv, x, conv.weight, conv.bias, conv.stride[0], conv.padding[0])


#: the plain modules' CPU convolutions in reduced precision whose output has a side this
#: small or smaller run in fp32 while autograd records (see :func:`library_safe_conv`)
LIBRARY_CONV_BUG_MAX_SIDE = 2


def _conv_output_sides(conv: nn.Conv2d, x: Tensor) -> Optional[Tuple[int, int]]:
    if isinstance(conv.padding, str) or x.dim() != 4:
        return None
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in zip(
        x.shape[-2:], conv.padding, conv.dilation, conv.kernel_size, conv.stride))


def library_safe_conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv(x)`` for the plain modules, stepping around a bug of the CPU library.

    oneDNN's bf16 weight gradient (oneDNN 3.12, torch 2.13; fp16 treated alike) leaves the
    kernel taps that see only padding unset: garbage up to inf, intermittently, on outputs
    with a side of 1 (docs/kernels.md). While autograd records such a convolution on the
    CPU (output side at most :data:`LIBRARY_CONV_BUG_MAX_SIDE`, padded, kernel wider than
    1), it runs in fp32 and its output is cast back to the compute dtype: differentiable
    casts, so second derivatives are kept, and the maps are tiny. Elsewhere, and for a
    module with hooks, a subclass or another padding mode, it is ``conv(x)``; so is a call
    traced by ``torch.jit`` (a graph for inference or export; the checks here also upset
    the tracer's own comparison of two traces with grad enabled). ``torch.compile`` keeps
    the workaround.
    """
    if (x.device.type != "cpu" or torch.jit.is_tracing() or torch.jit.is_scripting()
            or not needs_grad(x, conv) or not _plain_module(conv)
            or conv.padding_mode != "zeros" or not any(conv.padding)
            or max(conv.kernel_size) == 1):
        return conv(x)
    dtype = compute_dtype(x)
    sides = _conv_output_sides(conv, x)
    if (dtype is None or _precision(dtype) == "fp32" or sides is None
            or min(sides) > LIBRARY_CONV_BUG_MAX_SIDE):
        return conv(x)
    bias = None if conv.bias is None else conv.bias.float()
    with torch.autocast("cpu", enabled=False):
        out = F.conv2d(x.float(), conv.weight.float(), bias, conv.stride, conv.padding,
                       conv.dilation, conv.groups)
    return out.to(dtype)


def _plain_module(module: nn.Module) -> bool:
    """Exactly its class's computation: no hooks (pruning, fake quantisation, user hooks),
    on it or global, and not a subclass of ``nn.Conv2d``."""
    return type(module) is nn.Conv2d and hook_free(module)


def _global_hooks() -> bool:
    from torch.nn.modules import module as module_mod

    return any(getattr(module_mod, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks"))


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


def hook_free(*modules: nn.Module) -> bool:
    """True when none of ``modules`` carries a forward / backward hook or pre-hook and no
    global module hook is registered: a computation that skips calling them changes
    nothing anyone observes."""
    return not _global_hooks() and not any(_hooked(m) for m in modules)


#: the attribute :func:`record_built` keeps a module's classes in
_BUILT_TYPES = "_rest_dense_built_types"


def _built_signature(module: nn.Module):
    """What the fast paths assume of a layer: its class, for a convolution or a pixel
    shuffle the geometry they read from the constructor (a conv set to another padding
    mode, dilation or stride computes another function from the same weights), for a GELU
    its approximation."""
    if isinstance(module, nn.Conv2d):
        return (type(module), module.kernel_size, module.stride, module.padding,
                module.dilation, module.groups, module.padding_mode)
    if isinstance(module, nn.PixelShuffle):
        return type(module), module.upscale_factor
    if isinstance(module, nn.GELU):  # the fast paths run the exact GELU
        return type(module), module.approximate
    return type(module)


def record_built(module: nn.Module) -> None:
    """Remember the classes (and convolution geometry) of ``module`` and its submodules, in
    order, as its constructor built them (for :func:`as_built`)."""
    module.__dict__[_BUILT_TYPES] = tuple(_built_signature(m) for m in module.modules())


def as_built(module: nn.Module) -> bool:
    """Whether the fast paths may compute ``module`` from its parameters instead of calling
    its submodules: every submodule still has the class (and a convolution the geometry)
    its constructor gave it (:func:`record_built`; a replaced activation, norm or conv, a
    parametrization, SyncBatchNorm, another padding mode or GELU approximation make it
    differ) and nothing is hooked (:func:`hook_free`, on it or below it). Otherwise the
    plain modules run, called as usual, so that hooks fire and replacements count."""
    built = module.__dict__.get(_BUILT_TYPES)
    if built is None or _global_hooks():
        return False
    n = 0
    for m in module.modules():
        if n >= len(built) or _hooked(m) or _built_signature(m) != built[n]:
            return False
        n += 1
    return n == len(built)


def _param(module: nn.Module, name: str) -> Optional[Tensor]:
    return getattr(module, name, None)


# ------------------------------------------------------------------------------ the MLP
class _MlpBranch(torch.autograd.Function):
    """``fc2(GELU(fc1(LayerNorm(x))))`` saving ``x`` (+ the hidden map unless recomputed)."""

    @staticmethod
    def forward(ctx, x, ln_w, ln_b, w1, b1, w2, b2, eps, recompute_hidden):
        x2 = _rows(x)
        y, mean, rstd = _ln(x2, ln_w, ln_b, eps)
        h = linear(y, w1, b1)
        out = linear(F.gelu(h), w2, b2)
        ctx.save_for_backward(x2, mean, rstd, ln_w, ln_b, w1, b1, w2,
                              None if recompute_hidden else h)
        ctx.eps = eps
        ctx.shape = x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @_first_order_only
    def backward(ctx, dout):
        x2, mean, rstd, ln_w, ln_b, w1, b1, w2, h = ctx.saved_tensors
        need = ctx.needs_input_grad
        d = _rows(dout)
        y = _ln(x2, ln_w, ln_b, ctx.eps)[0]
        if h is None:
            h = linear(y, w1, b1)
        g = F.gelu(h)
        dw2 = d.t().mm(g) if need[5] else None
        db2 = d.sum(0) if need[6] else None
        # the 4C-wide GELU output is done with: dh takes its memory (a fresh map that
        # large costs page faults on the CPU), as dy takes y's below
        dh = torch.mm(d, w2, out=g) if g.dtype == torch.result_type(d, w2) else d.mm(w2)
        torch.ops.aten.gelu_backward.grad_input(dh, h, grad_input=dh)
        del h, g
        dw1 = dh.t().mm(y) if need[3] else None
        db1 = dh.sum(0) if need[4] and b1 is not None else None
        dx = dlw = dlb = None
        if need[0] or need[1] or need[2]:
            dy = torch.mm(dh, w1, out=y) if y.dtype == torch.result_type(dh, w1) else dh.mm(w1)
            del dh
            dx, dlw, dlb = _ln_backward(dy, x2, mean, rstd, ln_w, ln_b, need[:3])
            if dx is not None:
                dx = dx.view(ctx.shape)
        return dx, dlw, dlb, dw1, db1, dw2, db2, None, None


def mlp_branch(x: Tensor, norm: nn.LayerNorm, mlp: nn.Module,
               recompute_hidden: bool = False) -> Tensor:
    """The MLP half of a pre-norm block, ``mlp(norm(x))``, without the residual.

    Args:
        x: channels-last tokens ``(..., C)``.
        norm: the block's second LayerNorm (``norm2``).
        mlp: a module with ``fc1`` (C -> hidden), ``fc2`` (hidden -> C); exact GELU between.
        recompute_hidden: also recompute the hidden map in backward (one more ``fc1``
            GEMM, 4C fewer floats per token kept); the ``with_cp='mlp'`` memory level.

    Returns:
        ``(..., C)`` tensor, ``mlp(norm(x))``.
    """
    if not needs_grad(x, norm, mlp.fc1, mlp.fc2):
        y = F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        return linear(linear(y, mlp.fc1.weight, mlp.fc1.bias, gelu=True),
                      mlp.fc2.weight, mlp.fc2.bias)
    if not x.is_contiguous():
        x = x.contiguous()
    return _apply(_MlpBranch, x, norm.weight, norm.bias, mlp.fc1.weight, mlp.fc1.bias,
                  mlp.fc2.weight, mlp.fc2.bias, norm.eps, bool(recompute_hidden))


# ------------------------------------------------------------------ attention: inputs
class _NormQSr(torch.autograd.Function):
    """``y = LayerNorm(x)``; returns ``q = Linear(y)`` and ``s = dwconv_sr(y)`` (channels-last),
    saving only ``x`` (``y`` is recomputed)."""

    @staticmethod
    def forward(ctx, x, ln_w, ln_b, wq, bq, wsr, bsr, eps, sr):
        c = x.shape[-1]
        y, mean, rstd = _ln(x, ln_w, ln_b, eps)
        q = linear(y, wq, bq)
        s = F.conv2d(y.permute(0, 3, 1, 2), wsr, bsr, stride=sr, padding=sr // 2, groups=c)
        s = s.permute(0, 2, 3, 1)
        if not s.is_contiguous():
            s = s.contiguous()
        ctx.save_for_backward(x, mean, rstd, ln_w, ln_b, wq, wsr)
        ctx.eps, ctx.sr, ctx.has_bq, ctx.has_bsr = eps, sr, bq is not None, bsr is not None
        return q, s

    @staticmethod
    @_first_order_only
    def backward(ctx, dq, ds):
        x, mean, rstd, ln_w, ln_b, wq, wsr = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_y = need[0] or need[1] or need[2]
        y = _ln(x, ln_w, ln_b, ctx.eps)[0]
        dwq = dbq = dwsr = dbsr = dy = None
        if dq is not None:
            d = _rows(dq)
            y2 = y.view(-1, y.shape[-1])
            dwq = d.t().mm(y2) if need[3] else None
            dbq = d.sum(0) if need[4] and ctx.has_bq else None
            if need_y:
                dy = d.mm(wq).view(y.shape)
        if ds is not None:
            dys, dwsr, dbsr = _dw_conv_backward(
                ds.permute(0, 3, 1, 2), y.permute(0, 3, 1, 2), wsr, ctx.has_bsr, ctx.sr,
                ctx.sr // 2, (need_y, need[5], need[6]))
            if dys is not None:
                dys = dys.permute(0, 2, 3, 1)
                dy = dys if dy is None else dy.add_(dys)
        dx = dlw = dlb = None
        if dy is not None:
            dx, dlw, dlb = _ln_backward(dy, x, mean, rstd, ln_w, ln_b, need[:3])
        return dx, dlw, dlb, dwq, dbq, dwsr, dbsr, None, None


def norm_q_sr(x: Tensor, norm: nn.LayerNorm, q: nn.Linear, sr: nn.Conv2d,
              sr_ratio: int) -> Tuple[Tensor, Tensor]:
    """``y = norm(x)``; the queries ``q(y)`` and the reduced map ``sr(y)`` (``sr_ratio > 1``).

    Args:
        x: ``(B, H, W, C)`` contiguous block input.
        norm, q, sr: the block's ``norm1`` and the attention's ``q`` and ``sr`` layers.
        sr_ratio: stride of ``sr``.

    Returns:
        ``q`` as ``(B, H, W, C)`` and the reduced map as ``(B, h, w, C)``.
    """
    if not x.is_contiguous():
        x = x.contiguous()
    if not needs_grad(x, norm, q, sr):
        y = F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        s = F.conv2d(y.permute(0, 3, 1, 2), sr.weight, sr.bias, stride=sr_ratio,
                     padding=sr_ratio // 2, groups=x.shape[-1])
        return linear(y, q.weight, q.bias), s.permute(0, 2, 3, 1)
    return _apply(_NormQSr, x, norm.weight, norm.bias, q.weight, q.bias, sr.weight, sr.bias,
                  norm.eps, sr_ratio)


def _cat_bias(wq: Tensor, bq: Optional[Tensor], wkv: Tensor,
              bkv: Optional[Tensor]) -> Optional[Tensor]:
    """The bias of the fused ``[q | kv]`` projection (zeros stand in for a missing one)."""
    if bq is None and bkv is None:
        return None
    return torch.cat([bq if bq is not None else wq.new_zeros(wq.shape[0]),
                      bkv if bkv is not None else wkv.new_zeros(wkv.shape[0])])


class _NormQKV(torch.autograd.Function):
    """``y = LayerNorm(x)``; one GEMM for ``[q | kv](y)``; saves only ``x``."""

    @staticmethod
    def forward(ctx, x, ln_w, ln_b, wq, bq, wkv, bkv, eps):
        y, mean, rstd = _ln(x, ln_w, ln_b, eps)
        w = torch.cat([wq, wkv])
        out = linear(y, w, _cat_bias(wq, bq, wkv, bkv))
        ctx.save_for_backward(x, mean, rstd, ln_w, ln_b, w)
        ctx.eps, ctx.has_bq, ctx.has_bkv = eps, bq is not None, bkv is not None
        return out

    @staticmethod
    @_first_order_only
    def backward(ctx, dout):
        x, mean, rstd, ln_w, ln_b, w = ctx.saved_tensors
        need = ctx.needs_input_grad
        c = w.shape[0] // 3
        d = _rows(dout)
        dwq = dbq = dwkv = dbkv = None
        if need[3] or need[5]:
            y = _ln(x, ln_w, ln_b, ctx.eps)[0]
            dw = d.t().mm(y.view(-1, y.shape[-1]))
            dwq, dwkv = (dw[:c] if need[3] else None), (dw[c:] if need[5] else None)
        if (need[4] and ctx.has_bq) or (need[6] and ctx.has_bkv):
            db = d.sum(0)
            dbq = db[:c] if need[4] and ctx.has_bq else None
            dbkv = db[c:] if need[6] and ctx.has_bkv else None
        dx = dlw = dlb = None
        if need[0] or need[1] or need[2]:
            dy = d.mm(w).view(x.shape)
            dx, dlw, dlb = _ln_backward(dy, x, mean, rstd, ln_w, ln_b, need[:3])
        return dx, dlw, dlb, dwq, dbq, dwkv, dbkv, None


def norm_qkv(x: Tensor, norm: nn.LayerNorm, q: nn.Linear, kv: nn.Linear) -> Tensor:
    """``y = norm(x)``; ``cat([q(y), kv(y)], -1)`` as one GEMM (``sr_ratio == 1``).

    Args:
        x: ``(B, H, W, C)`` block input.
        norm, q, kv: the block's ``norm1`` and the attention's ``q`` and ``kv`` layers.

    Returns:
        ``(B, H, W, 3C)``: queries, keys, values (each head-major).
    """
    if not x.is_contiguous():
        x = x.contiguous()
    if not needs_grad(x, norm, q, kv):
        y = F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        return linear(y, torch.cat([q.weight, kv.weight]),
                      _cat_bias(q.weight, q.bias, kv.weight, kv.bias))
    return _apply(_NormQKV, x, norm.weight, norm.bias, q.weight, q.bias, kv.weight, kv.bias, norm.eps)


# ------------------------------------------------------------- attention: upsample branch
def _replicated_weights(weight: Tensor, bias: Optional[Tensor], sr: int):
    """Reorder the up conv's ``(C * sr**2, 1, 3, 3)`` weights from channel-major
    (``c * sr**2 + s``) to position-major (``s * C + c``)."""
    s2 = sr * sr
    c = weight.shape[0] // s2
    w = weight.view(c, s2, *weight.shape[1:]).transpose(0, 1).reshape(weight.shape)
    b = None if bias is None else bias.view(c, s2).t().reshape(-1)
    return w, b


def _replicate(v: Tensor, sr: int) -> Tensor:
    """``(B, h, w, C)`` -> ``(B, h, w, sr**2 * C)``: ``v`` repeated sr**2 times (contiguous)."""
    b, h, w, c = v.shape
    return v.unsqueeze(3).expand(b, h, w, sr * sr, c).reshape(b, h, w, sr * sr * c)


def upsample_values(v: Tensor, weight: Tensor, bias: Optional[Tensor], sr: int) -> Tensor:
    """The upsample branch before its LayerNorm: ``PixelShuffle(sr)(dwconv3x3(v))``.

    Same result as ``nn.Sequential(nn.Conv2d(C, sr*sr*C, 3, padding=1, groups=C),
    nn.PixelShuffle(sr))`` on the NCHW view of ``v``, computed channels-last: ``v`` is
    replicated ``sr**2`` times position-major, convolved by a plain depth-wise conv and
    its output positions interleaved.

    Args:
        v: ``(B, h, w, C)`` values (heads merged).
        weight, bias: the ``(C * sr**2, 1, 3, 3)`` conv weight (released order) and bias.
        sr: the spatial reduction ratio.

    Returns:
        ``(B, h * sr, w * sr, C)`` contiguous.
    """
    b, h, w, c = v.shape
    if sr == 1:
        vc = v if v.is_contiguous() else v.contiguous()
        out = F.conv2d(vc.permute(0, 3, 1, 2), weight, bias, padding=1, groups=c)
        out = out.permute(0, 2, 3, 1)
        return out if out.is_contiguous() else out.contiguous()
    wr, br = _replicated_weights(weight, bias, sr)
    out = F.conv2d(_replicate(v, sr).permute(0, 3, 1, 2), wr, br, padding=1, groups=sr * sr * c)
    out = out.permute(0, 2, 3, 1).reshape(b, h, w, sr, sr, c)
    return out.permute(0, 1, 3, 2, 4, 5).reshape(b, h * sr, w * sr, c)


#: reduced maps with a side up to this many pixels run the upsample branch's backward as
#: the modules' channel-multiplier convolution instead of the replicated depth-wise one
UPSAMPLE_BACKWARD_TINY_SIDE = 2


def _upsample_values_backward(du: Tensor, v: Tensor, weight: Tensor, has_bias: bool, sr: int,
                              mask: Sequence[bool]):
    """Gradients of :func:`upsample_values` w.r.t. (v, weight, bias); ``du`` full size."""
    b, h, w, c = v.shape
    if sr == 1:
        vc = v if v.is_contiguous() else v.contiguous()
        gi, gw, gb = _dw_conv_backward(du.permute(0, 3, 1, 2), vc.permute(0, 3, 1, 2), weight,
                                       has_bias, 1, 1, mask)
        return (None if gi is None else gi.permute(0, 2, 3, 1)), gw, gb
    s2 = sr * sr
    if min(h, w) <= UPSAMPLE_BACKWARD_TINY_SIDE:
        # oneDNN's depth-wise backward over the replicated channels takes ~100x longer on
        # maps this small (docs/kernels.md); the modules' channel-multiplier form does not.
        # Its output gradient is PixelUnshuffle(du): channel c * sr**2 + i * sr + j
        gout = du.reshape(b, h, sr, w, sr, c).permute(0, 5, 2, 4, 1, 3).reshape(b, c * s2, h, w)
        gi, gw, gb = _dw_conv_backward(gout, v.permute(0, 3, 1, 2), weight, has_bias, 1, 1, mask)
        return (None if gi is None else gi.permute(0, 2, 3, 1)), gw, gb
    wr, _ = _replicated_weights(weight, None, sr)
    dur = du.view(b, h, sr, w, sr, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, s2 * c)
    gi, gw, gb = _dw_conv_backward(dur.permute(0, 3, 1, 2), _replicate(v, sr).permute(0, 3, 1, 2),
                                   wr, has_bias, 1, 1, mask)
    dv = None if gi is None else gi.permute(0, 2, 3, 1).reshape(b, h, w, s2, c).sum(3)
    if gw is not None:
        gw = gw.view(s2, c, *gw.shape[1:]).transpose(0, 1).reshape(gw.shape)
    if gb is not None:
        gb = gb.view(s2, c).t().reshape(-1)
    return dv, gw, gb


def _up_norm_sum(out: Tensor, v: Tensor, wu, bu, wn, bn, sr: int, hw: Tuple[int, int], eps: float):
    """``s = merge_heads(out) + LayerNorm(crop(upsample_values(v)))``; returns (s, u, mean, rstd)
    with ``u`` the cropped upsampled map (LayerNorm input)."""
    bsz, nh, n, hd = out.shape
    h, w = hw
    u = upsample_values(v, wu, bu, sr)
    if u.shape[1] != h or u.shape[2] != w:
        u = u[:, :h, :w].contiguous()
    s, mean, rstd = _ln(u, wn, bn, eps)
    s.view(bsz, h * w, nh, hd).add_(out.transpose(1, 2))  # heads merged without a copy
    return s, u, mean, rstd


class _UpProj(torch.autograd.Function):
    """``proj(merge_heads(out) + up_norm(upsample(v)))`` saving only ``out`` and ``v``."""

    @staticmethod
    def forward(ctx, out, v, wu, bu, wn, bn, wp, bp, sr, hw, eps):
        s, _, mean, rstd = _up_norm_sum(out, v, wu, bu, wn, bn, sr, hw, eps)
        y = linear(s, wp, bp)
        ctx.save_for_backward(out, v, mean, rstd, wu, bu, wn, bn, wp)
        ctx.sr, ctx.hw, ctx.eps, ctx.has_bp = sr, hw, eps, bp is not None
        return y

    @staticmethod
    @_first_order_only
    def backward(ctx, dy):
        out, v, mean, rstd, wu, bu, wn, bn, wp = ctx.saved_tensors
        need = ctx.needs_input_grad
        sr, (h, w) = ctx.sr, ctx.hw
        bsz, nh, n, hd = out.shape
        c = nh * hd
        s, u, _, _ = _up_norm_sum(out, v, wu, bu, wn, bn, sr, ctx.hw, ctx.eps)
        d = _rows(dy)
        dwp = d.t().mm(s.view(-1, c)) if need[6] else None
        dbp = d.sum(0) if need[7] and ctx.has_bp else None
        del s
        ds = d.mm(wp).view(bsz, h, w, c)
        dout = ds.view(bsz, n, nh, hd).transpose(1, 2) if need[0] else None
        dv = dwu = dbu = dwn = dbn = None
        if any(need[1:6]):
            need_u = need[1] or need[2] or need[3]
            du, dwn, dbn = _ln_backward(ds, u, mean, rstd, wn, bn, (need_u, need[4], need[5]))
            if need_u:
                hu, wu_ = v.shape[1] * sr, v.shape[2] * sr
                if (hu, wu_) != (h, w):
                    full = du.new_zeros(bsz, hu, wu_, c)
                    full[:, :h, :w] = du
                    du = full
                dv, dwu, dbu = _upsample_values_backward(du, v, wu, bu is not None, sr, need[1:4])
        return dout, dv, dwu, dbu, dwn, dbn, dwp, dbp, None, None, None


def up_proj(out: Tensor, v: Tensor, up_conv: nn.Conv2d, up_norm: nn.LayerNorm, proj: nn.Linear,
            sr: int, hw: Tuple[int, int]) -> Tensor:
    """EMSAv2's output: ``proj(merge_heads(out) + up_norm(PixelShuffle(up_conv(v))))``.

    Args:
        out: ``(B, heads, H*W, d)`` attention output.
        v: ``(B, h, w, C)`` values, heads merged (head-major channels).
        up_conv, up_norm, proj: the attention's ``up[0]``, ``up_norm`` and ``proj``.
        sr: spatial reduction ratio (``h * sr >= H``, ``w * sr >= W``; cropped to H x W).
        hw: ``(H, W)``.

    Returns:
        ``(B, H, W, C)``.
    """
    args = (out, v, up_conv.weight, up_conv.bias, up_norm.weight, up_norm.bias, proj.weight,
            proj.bias, sr, tuple(hw), up_norm.eps)
    if not needs_grad(out, up_conv, up_norm, proj) and not v.requires_grad:
        s = _up_norm_sum(*args[:6], sr, tuple(hw), up_norm.eps)[0]
        return linear(s, proj.weight, proj.bias)
    return _apply(_UpProj, *args)


# ------------------------------------------------------ strided 3x3 convs as GEMMs
def _im2col_3x3s2(x: Tensor) -> Tensor:
    """``(B, H, W, C)`` -> ``(B * Ho * Wo, 9 * C)`` patches of a 3x3 / stride 2 / pad 1 conv,
    in ``(ky, kx, c)`` order (``Ho, Wo = ceil(H / 2), ceil(W / 2)``)."""
    b, h, w, c = x.shape
    ho, wo = (h + 1) // 2, (w + 1) // 2
    xp = F.pad(x, (0, 0, 1, 2 * wo - w, 1, 2 * ho - h))
    s0, s1, s2, s3 = xp.stride()
    cols = xp.as_strided((b, ho, wo, 3, 3, c), (s0, 2 * s1, 2 * s2, s1, s2, s3))
    return cols.reshape(b * ho * wo, 9 * c)


def _col2im_3x3s2(cols: Tensor, shape: Sequence[int]) -> Tensor:
    """Adjoint of :func:`_im2col_3x3s2`: sum ``(B * Ho * Wo, 9 * C)`` patch gradients back
    onto a ``(B, H, W, C)`` map."""
    b, h, w, c = shape
    ho, wo = (h + 1) // 2, (w + 1) // 2
    out = cols.new_zeros(b, 2 * ho + 1, 2 * wo + 1, c)
    cols = cols.view(b, ho, wo, 3, 3, c)
    for ky in range(3):
        for kx in range(3):
            out[:, ky:ky + 2 * ho:2, kx:kx + 2 * wo:2].add_(cols[:, :, :, ky, kx])
    return out[:, 1:h + 1, 1:w + 1]


#: the strided 3x3 convolutions' backward on the CPU: ``'gemm'`` (two GEMMs over
#: recomputed patches), ``'library'`` (``aten.convolution_backward``, oneDNN), or the widest
#: input (channels) that goes to the library (the GEMMs above it), by CPU class
#: (:func:`rest_dense.hardware.cpu_class`) and precision (:func:`_precision`). Measured
#: with ``tools/bench_kernels.py`` (docs/kernels.md): on AVX2 the GEMMs win in fp32; on
#: AVX-512 without AMX the library wins in fp32 at every stage and in bf16 on the wide
#: early maps (the stem and ``patch_2``); on AMX the library wins up to 96 input channels
#: in fp32 and up to 192 in bf16, the GEMMs on the later maps with more channels.
STRIDED_CONV_BACKWARD_RULE = {
    ("amx", "fp32"): 96,
    ("amx", "bf16"): 192,
    ("amx", "fp16"): 192,  # as bf16, not measured: CPU fp16 runs the plain modules
    ("avx512", "fp32"): "library",
    ("avx512", "bf16"): 96,
    ("avx512", "fp16"): 96,  # as bf16, not measured
    ("other", "fp32"): "gemm",
    ("other", "bf16"): "gemm",
    ("other", "fp16"): "gemm",
}
STRIDED_CONV_BACKWARD_IMPLS = ("gemm", "library")
_FORCED_CONV_BACKWARD: list = [None]
_CONV_CHOICE_LOG: list = [None]


@contextlib.contextmanager
def record_conv_backward_choices() -> Iterator[list]:
    """Collect ``(impl, input shape, dtype)`` of every :func:`conv3x3_s2_backward` call inside."""
    with _holding(_CONV_CHOICE_LOG, []) as log:
        yield log


@contextlib.contextmanager
def forced_conv_backward(impl: Optional[str]) -> Iterator[None]:
    """Run the strided 3x3 convolutions' backward by one implementation (``'gemm'`` /
    ``'library'``) inside the block, or by :data:`STRIDED_CONV_BACKWARD_RULE` (``None``)."""
    if impl is not None and impl not in STRIDED_CONV_BACKWARD_IMPLS:
        raise ValueError(f"conv backward impl must be None or one of "
                         f"{STRIDED_CONV_BACKWARD_IMPLS}, got {impl!r}")
    with _holding(_FORCED_CONV_BACKWARD, impl):
        yield


def strided_conv_backward_impl(x: Tensor) -> str:
    """Which implementation :func:`conv3x3_s2_backward` runs for the input ``x``
    (``(B, H, W, C)`` tokens): ``'gemm'`` or ``'library'`` (see
    :data:`STRIDED_CONV_BACKWARD_RULE`; the library everywhere but the CPU). A
    reduced-precision CPU map with a side of 1 or 2 always takes the GEMMs: there the
    library kernel returns unset values for the weight taps that see only padding."""
    if (x.device.type == "cpu" and _precision(x.dtype) != "fp32"
            and min(x.shape[1], x.shape[2]) <= 2):
        # oneDNN's bf16 weight gradient leaves the taps that see only padding (a side of
        # 1 or 2 at stride 2) unset: garbage or NaN (oneDNN 3.12, torch 2.13); forced too
        return "gemm"
    if _FORCED_CONV_BACKWARD[0] is not None:
        return _FORCED_CONV_BACKWARD[0]
    if x.device.type != "cpu":
        return "library"
    rule = STRIDED_CONV_BACKWARD_RULE[(hardware.cpu_class(), _precision(x.dtype))]
    if isinstance(rule, int):
        return "library" if x.shape[-1] <= rule else "gemm"
    return rule


def conv3x3_s2_backward(grad: Tensor, x: Tensor, weight: Tensor, need_input: bool,
                        need_weight: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Gradients of ``F.conv2d(x.permute(0, 3, 1, 2), weight, stride=2, padding=1)``
    with respect to the tokens ``x`` and the weight (the bias gradient is the caller's sum).

    Args:
        grad: ``(B, C', Ho, Wo)`` output gradient (any memory format).
        x: ``(B, H, W, C)`` contiguous tokens.
        weight: ``(C', C, 3, 3)``.
        need_input, need_weight: which gradients to compute.

    Returns:
        ``(dx (B, H, W, C) or None, dweight or None)``.
    """
    cout, cin = weight.shape[:2]
    impl = strided_conv_backward_impl(x)
    if _CONV_CHOICE_LOG[0] is not None:
        _CONV_CHOICE_LOG[0].append((impl, tuple(x.shape), x.dtype))
    if impl == "library":
        dx, dw, _ = torch.ops.aten.convolution_backward(
            grad, x.permute(0, 3, 1, 2), weight, None, [2, 2], [1, 1], [1, 1], False, [0, 0],
            1, [need_input, need_weight, False])
        return (None if dx is None else dx.permute(0, 2, 3, 1),
                None if dw is None else dw.contiguous())
    g = _rows(grad.permute(0, 2, 3, 1))
    dx = dw = None
    if need_weight:
        dw = g.t().mm(_im2col_3x3s2(x)).view(cout, 3, 3, cin).permute(0, 3, 1, 2).contiguous()
    if need_input:
        dx = _col2im_3x3s2(g.mm(weight.permute(0, 2, 3, 1).reshape(cout, 9 * cin)), x.shape)
    return dx, dw


class _Conv3x3S2(torch.autograd.Function):
    """``F.conv2d(x, weight, bias, stride=2, padding=1)`` on channels-last tokens; the
    backward by :func:`conv3x3_s2_backward` (GEMMs over recomputed patches where they beat
    the library kernel)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv2d(x.permute(0, 3, 1, 2), weight, bias, stride=2, padding=1)

    @staticmethod
    @_first_order_only
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw = conv3x3_s2_backward(grad, x, weight, need[0], need[1])
        db = grad.sum((0, 2, 3)) if need[2] and ctx.has_bias else None
        return dx, dw, db


def conv3x3_s2(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """A 3x3, stride 2, padding 1 ``conv`` (groups 1) applied to channels-last tokens.

    Args:
        x: ``(B, H, W, C)`` tokens.
        conv: the ``nn.Conv2d`` (its weight and bias are used).

    Returns:
        ``(B, C', ceil(H/2), ceil(W/2))`` NCHW map (channels-last memory).
    """
    if not needs_grad(x, conv):
        return F.conv2d(x.permute(0, 3, 1, 2), conv.weight, conv.bias, stride=2, padding=1)
    if not x.is_contiguous():
        x = x.contiguous()
    return _apply(_Conv3x3S2, x, conv.weight, conv.bias)


# ------------------------------------------------------------------- the conv stem
def _check_batch_statistics(bn: nn.Module, shape: Sequence[int], owner: str) -> None:
    """Refuse, naming the layer, a BatchNorm that would normalise by batch statistics over
    one value per channel (batch 1 and a 1x1 map in training)."""
    if (bn.training or getattr(bn, "running_mean", None) is None) and \
            shape[0] * shape[2] * shape[3] == 1:
        raise ValueError("Expected more than 1 value per channel when training, got input "
                         f"size {torch.Size(shape)} ({owner} BatchNorm needs a larger image "
                         "or batch)")


def _bn_mode(bn: nn.modules.batchnorm._BatchNorm):
    """What ``nn.BatchNorm2d.forward`` passes to the kernel (and its ``num_batches_tracked``
    update): ``(use_batch_stats, momentum, running_mean, running_var)``."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep = not bn.training or bn.track_running_stats
    return (use_batch, momentum, bn.running_mean if keep else None,
            bn.running_var if keep else None)


def _bn_relu(x: Tensor, w, b, use_batch: bool, rm, rv, eps: float) -> Tensor:
    """``relu(batch_norm(x))`` as the forward computed it, without updating running stats."""
    if use_batch:
        rm = rv = None
    return torch.native_batch_norm(x, w, b, rm, rv, use_batch, 0.0, eps)[0].relu_()


class _StemTail(torch.autograd.Function):
    """``conv3(relu(bn2(conv2(relu(bn1(c1))))))`` of the conv stem (conv2 3x3/s2, conv3
    1x1), channels-last, saving only ``c1`` and ``conv2``'s output; the BatchNorm/ReLU
    outputs are recomputed in backward."""

    @staticmethod
    def forward(ctx, c1, w1, b1, w2, w3, b3, wn2, bn2_b, cfg1, cfg2):
        use1, mom1, rm1, rv1, eps1 = cfg1
        use2, mom2, rm2, rv2, eps2 = cfg2
        r1, mean1, invstd1 = torch.native_batch_norm(c1, w1, b1, rm1, rv1, use1, mom1, eps1)
        r1 = r1.relu_()
        c2 = F.conv2d(r1, w2, None, stride=2, padding=1)
        r2, mean2, invstd2 = torch.native_batch_norm(c2, wn2, bn2_b, rm2, rv2, use2, mom2, eps2)
        r2 = r2.relu_().permute(0, 2, 3, 1)
        out = linear(r2 if r2.is_contiguous() else r2.contiguous(),
                     w3.view(w3.shape[0], w3.shape[1]), b3).permute(0, 3, 1, 2)
        ctx.save_for_backward(c1, c2, w1, b1, w2, w3, wn2, bn2_b, mean1, invstd1, mean2, invstd2)
        ctx.cfg = (cfg1, cfg2)
        ctx.has_b3 = b3 is not None
        return out

    @staticmethod
    @_first_order_only
    def backward(ctx, grad):
        c1, c2, w1, b1, w2, w3, wn2, bn2_b, mean1, invstd1, mean2, invstd2 = ctx.saved_tensors
        (use1, _, rm1, rv1, eps1), (use2, _, rm2, rv2, eps2) = ctx.cfg
        need = ctx.needs_input_grad
        cout, cmid = w3.shape[:2]
        # 1x1 conv: a GEMM over channels-last rows
        r2 = _bn_relu(c2, wn2, bn2_b, use2, rm2, rv2, eps2)
        g = _rows(grad.permute(0, 2, 3, 1))
        r2_rows = _rows(r2.permute(0, 2, 3, 1))
        dw3 = g.t().mm(r2_rows).view(w3.shape) if need[4] else None
        db3 = g.sum(0) if need[5] and ctx.has_b3 else None
        dw2 = dwn2 = dbn2 = dc1 = dw1 = db1 = None
        if any(need[:4]) or need[6] or need[7]:
            dr2 = g.mm(w3.view(cout, cmid)).view(r2_rows.shape)
            dr2 = torch.ops.aten.threshold_backward(dr2, r2_rows, 0)
            dr2 = dr2.view(r2.shape[0], r2.shape[2], r2.shape[3], cmid).permute(0, 3, 1, 2)
            del r2, r2_rows
            dc2, dwn2, dbn2 = torch.ops.aten.native_batch_norm_backward(
                dr2, c2, wn2, rm2, rv2, mean2, invstd2, use2, eps2,
                [any(need[:4]), need[6], need[7]])
            if any(need[:4]):
                # 3x3 / stride 2 conv: two GEMMs over recomputed patches
                r1 = _bn_relu(c1, w1, b1, use1, rm1, rv1, eps1)
                r1_t = r1.permute(0, 2, 3, 1)
                r1_t = r1_t if r1_t.is_contiguous() else r1_t.contiguous()
                need_r1 = need[0] or need[1] or need[2]
                dr1, dw2 = conv3x3_s2_backward(dc2, r1_t, w2, need_r1, need[3])
                if need_r1:
                    dr1 = torch.ops.aten.threshold_backward(dr1, r1_t, 0).permute(0, 3, 1, 2)
                    del r1, r1_t
                    dc1, dw1, db1 = torch.ops.aten.native_batch_norm_backward(
                        dr1, c1, w1, rm1, rv1, mean1, invstd1, use1, eps1,
                        [need[0], need[1], need[2]])
        return dc1, dw1, db1, dw2, dw3, db3, dwn2, dbn2, None, None


def stem_tail(c1: Tensor, bn1: nn.BatchNorm2d, conv2: nn.Conv2d, bn2: nn.BatchNorm2d,
              conv3: nn.Conv2d) -> Tensor:
    """The conv stem after its first conv: ``conv3(relu(bn2(conv2(relu(bn1(c1))))))``.

    ``conv2`` is a 3x3 / stride 2 / padding 1 conv without bias, ``conv3`` a 1x1 conv.
    Keeps only ``c1`` and ``conv2``'s output for backward (not the four BatchNorm / ReLU
    maps). BatchNorm behaves exactly as the modules do (batch statistics and running
    averages in training mode, running statistics in eval mode).

    Args:
        c1: ``(B, C/2, H, W)`` output of the first conv (channels-last preferred).
        bn1, conv2, bn2, conv3: the stem's modules.

    Returns:
        ``(B, C, ceil(H/2), ceil(W/2))`` map, channels-last memory.
    """
    if not needs_grad(c1, bn1, conv2, bn2, conv3):
        x = F.relu(bn1(c1), inplace=True)
        return conv3(F.relu(bn2(conv2(x)), inplace=True))
    n, _, h, w = c1.shape
    _check_batch_statistics(bn1, (n, bn1.num_features, h, w), "the stem's")
    _check_batch_statistics(bn2, (n, bn2.num_features, (h + 1) // 2, (w + 1) // 2), "the stem's")
    use1, mom1, rm1, rv1 = _bn_mode(bn1)
    use2, mom2, rm2, rv2 = _bn_mode(bn2)
    # the BatchNorm parameters stay fp32 under autocast (as in the plain modules)
    return _apply(_StemTail, c1, bn1.weight, bn1.bias, conv2.weight, conv3.weight, conv3.bias,
                  bn2.weight, bn2.bias, (use1, mom1, rm1, rv1, bn1.eps),
                  (use2, mom2, rm2, rv2, bn2.eps), keep=(1, 2, 6, 7))


def _folds(bn: nn.Module) -> bool:
    """Whether ``bn`` normalises by its running statistics (so it can fold into a conv)."""
    return (isinstance(bn, nn.modules.batchnorm._BatchNorm) and not bn.training
            and bn.running_mean is not None and bn.running_var is not None)


def conv_bn_relu(x: Tensor, conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> Tensor:
    """``relu(bn(conv(x)))`` for inference with ``bn`` in eval mode: the BatchNorm folded into
    the convolution's weight and bias (one oneDNN convolution on the CPU, fp32 and bf16
    with native units), then an in-place ReLU. Under autocast it runs in the autocast dtype.

    Args:
        x: ``(B, C, H, W)`` input (channels-last memory preferred).
        conv: a ``nn.Conv2d`` with numeric padding.
        bn: a BatchNorm with running statistics, in eval mode.

    Returns:
        ``(B, C', H', W')``.
    """
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    return _conv_activation(x, weight, shift, conv.stride, conv.padding, conv.dilation,
                            conv.groups, "relu")


def _conv_activation(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding,
                     dilation, groups: int, activation: str) -> Tensor:
    """``activation(F.conv2d(x, weight, bias, ...))`` (``'relu'`` / ``'sigmoid'``) where
    nothing records: on the CPU (fp32, and bf16 with native units) one oneDNN call (the
    sigmoid fused; the ReLU in place after it, since the fused one turns NaN into 0), in
    the autocast dtype under autocast; elsewhere the two ops."""
    dtype = compute_dtype(x) or x.dtype
    if (x.device.type == "cpu" and not isinstance(padding, str)
            and all(t is None or t.dtype in (torch.float32, dtype) for t in (x, weight, bias))
            and _onednn_available("_convolution_pointwise", dtype) and not tracing()):
        # oneDNN's fused ReLU maps NaN to 0; ATen's relu_ keeps it (as the modules do)
        out = torch.ops.mkldnn._convolution_pointwise(
            x.to(dtype), weight.to(dtype).contiguous(memory_format=torch.channels_last),
            None if bias is None else bias.to(dtype), list(padding), list(stride),
            list(dilation), groups, "none" if activation == "relu" else activation, [], "")
        return out.relu_() if activation == "relu" else out
    # one dtype for all three (a folded BatchNorm may have left fp32 weights for an fp16 conv)
    out = F.conv2d(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype),
                   stride, padding, dilation, groups)
    return out.relu_() if activation == "relu" else out.sigmoid_()


def conv_stem(x: Tensor, proj: nn.Sequential) -> Tensor:
    """The conv stem's layers ``proj`` = (conv 3x3/s2, BN, ReLU, conv 3x3/s2, BN, ReLU,
    conv 1x1) on NCHW images, channels-last.

    In inference with both BatchNorms in eval mode each conv-BN-ReLU is one call
    (:func:`conv_bn_relu`); otherwise the first conv and :func:`stem_tail`, which keeps
    only two maps for backward.

    Args:
        x: ``(B, C, H, W)`` images.
        proj: the stem's ``nn.Sequential``.

    Returns:
        ``(B, C', ceil(H/4), ceil(W/4))`` map, channels-last memory.
    """
    conv1, bn1, _, conv2, bn2, _, conv3 = proj
    if (_folds(bn1) and _folds(bn2) and conv1.padding_mode == conv2.padding_mode == "zeros"
            and not needs_grad(x, *proj)):
        dtype = compute_dtype(x)
        if x.dtype == torch.float32 and dtype in (torch.bfloat16, torch.float16):
            x = x.to(dtype, memory_format=torch.channels_last)  # cast and layout in one copy
        else:
            x = x.contiguous(memory_format=torch.channels_last)
        r2 = conv_bn_relu(conv_bn_relu(x, conv1, bn1), conv2, bn2).permute(0, 2, 3, 1)
        w3 = conv3.weight
        out = linear(r2 if r2.is_contiguous() else r2.contiguous(),
                     w3.view(w3.shape[0], w3.shape[1]), conv3.bias)
        return out.permute(0, 3, 1, 2)
    return stem_tail(conv1(x.contiguous(memory_format=torch.channels_last)), bn1, conv2, bn2,
                     conv3)


# -------------------------------------------------------------- PA position encoding
class _PaNorm(torch.autograd.Function):
    """``LayerNorm(x * sigmoid(dwconv3x3(x)))`` (channels-last out), saving only ``x``."""

    @staticmethod
    def _gate(x, wpa, bpa):
        gate = F.conv2d(x, wpa, bpa, padding=1, groups=x.shape[1]).sigmoid_()
        return gate, x * gate

    @staticmethod
    def forward(ctx, x, wpa, bpa, ln_w, ln_b, eps):
        _, z = _PaNorm._gate(x, wpa, bpa)
        y, mean, rstd = _ln(z.permute(0, 2, 3, 1), ln_w, ln_b, eps)
        ctx.save_for_backward(x, mean, rstd, wpa, bpa, ln_w, ln_b)
        ctx.eps = eps
        return y

    @staticmethod
    @_first_order_only
    def backward(ctx, dy):
        x, mean, rstd, wpa, bpa, ln_w, ln_b = ctx.saved_tensors
        need = ctx.needs_input_grad
        gate, z = _PaNorm._gate(x, wpa, bpa)
        need_z = need[0] or need[1] or need[2]
        dz, dlw, dlb = _ln_backward(dy, z.permute(0, 2, 3, 1), mean, rstd, ln_w, ln_b,
                                    (need_z, need[3], need[4]))
        del z
        dx = dwpa = dbpa = None
        if need_z:
            dz = dz.permute(0, 3, 1, 2)
            da = torch.ops.aten.sigmoid_backward(dz * x, gate)
            dxc, dwpa, dbpa = _dw_conv_backward(da, x, wpa, bpa is not None, 1, 1,
                                                (need[0], need[1], need[2]))
            if need[0]:
                dx = dz * gate
                dx = dx.add_(dxc) if dxc is not None else dx
        return dx, dwpa, dbpa, dlw, dlb, None


def pa_norm(x: Tensor, pa: nn.Module, norm: nn.LayerNorm) -> Tensor:
    """PA position encoding then the token LayerNorm: ``norm(pa(x).permute(0, 2, 3, 1))``.

    Args:
        x: ``(B, C, H, W)`` map (channels-last memory format preferred).
        pa: a :class:`~rest_dense.models.layers.PixelAttention` (its ``pa_conv``).
        norm: the LayerNorm over channels.

    Returns:
        ``(B, H, W, C)`` tokens.
    """
    conv = pa.pa_conv
    if not needs_grad(x, conv, norm):
        gate = _conv_activation(x, conv.weight, conv.bias, (1, 1), (1, 1), (1, 1), x.shape[1],
                                "sigmoid")
        z = gate.mul_(x) if gate.dtype == torch.result_type(gate, x) else x * gate
        return F.layer_norm(z.permute(0, 2, 3, 1), norm.normalized_shape, norm.weight, norm.bias,
                            norm.eps)
    return _apply(_PaNorm, x, conv.weight, conv.bias, norm.weight, norm.bias, norm.eps)
