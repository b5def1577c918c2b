"""Building blocks shared by ResTv1 and ResTv2 (pure PyTorch).

All token maps inside the backbones are kept channels-last, ``(B, H, W, C)``, so
that linear layers, LayerNorms and window partitioning need no permutes; the
convolutions see a permuted (channels-last strided) NCHW view.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import Tensor, nn

from . import functional as fast

__all__ = [
    "DropPath",
    "Mlp",
    "PixelAttention",
    "Block",
    "BLOCK_RECOMPUTE",
    "ReducedKVAttention",
    "multi_head_attention",
    "window_partition",
    "window_unpartition",
]


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode or when ``drop_prob`` is 0).

    Args:
        drop_prob (float): probability of dropping the residual branch. Default: 0.
    """

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class Mlp(nn.Module):
    """Two-layer feed-forward network ``fc1 -> GELU -> fc2``.

    Args:
        dim (int): input and output channels.
        hidden_dim (int): hidden channels.
    """

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.fc1(x)
        if self._activate_in_place(hidden):
            # inference: the 4C-wide hidden map is the largest tensor; activate it in place
            hidden = torch.ops.aten.gelu_(hidden)
        else:
            hidden = self.act(hidden)
        return self.fc2(hidden)

    def _activate_in_place(self, hidden: Tensor) -> bool:
        """In place only where it is the same computation and nobody sees the difference:
        nothing records, the activation is the exact GELU it was built with, no hook could
        hold ``fc1``'s output, and neither tracing (one graph whatever the grad mode) nor
        ``torch.func`` (no batching rule for in-place GELU) is under way."""
        return (not hidden.requires_grad and type(self.act) is nn.GELU
                and self.act.approximate == "none" and not torch.jit.is_tracing()
                and not fast._in_functorch_transform(hidden) and fast.hook_free(self.fc1, self.act))


class PixelAttention(nn.Module):
    """PA position encoding: ``x * sigmoid(dwconv3x3(x))`` on an NCHW map.

    Args:
        dim (int): channels.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.pa_conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.pa_conv(x))


#: what :meth:`Block.forward` may recompute in backward (see ``with_cp`` of the models)
BLOCK_RECOMPUTE = ("none", "mlp")


class Block(nn.Module):
    """Pre-norm transformer block over a channels-last map ``(B, H, W, C)``.

    When the attention allows it (``attn.fast_paths``),
    :func:`~rest_dense.models.functional.use_fast_path` allows it and the block is as built
    (:func:`~rest_dense.models.functional.as_built`: no submodule replaced, nothing hooked),
    the block runs the memory-lean functions of :mod:`rest_dense.models.functional` (same
    math, about half the saved activations); otherwise the plain module-by-module
    computation.

    Args:
        dim (int): channels.
        attn (nn.Module): attention module mapping ``(B, H, W, C)`` to the same shape;
            it may offer ``forward_fast(x, norm)`` computing ``attn(norm(x))``.
        mlp_ratio (float): hidden/input ratio of the MLP. Default: 4.
        drop_path (float): stochastic depth rate of both residual branches. Default: 0.
        norm_eps (float): LayerNorm epsilon. Default: 1e-6.
    """

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float = 4.0,
                 drop_path: float = 0.0, norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = attn
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        fast.record_built(self)

    def forward(self, x: Tensor, recompute: str = "none") -> Tensor:
        """Args:
            x: ``(B, H, W, C)`` tokens.
            recompute: ``'none'``, or ``'mlp'`` to recompute the MLP's 4C-wide hidden map
                in backward instead of keeping it (one more ``fc1`` GEMM; only while
                gradients are recorded).

        Returns:
            ``(B, H, W, C)`` tokens.
        """
        if recompute not in BLOCK_RECOMPUTE:
            raise ValueError(f"Block recompute must be one of {BLOCK_RECOMPUTE}, got {recompute!r}")
        if getattr(self.attn, "fast_paths", False) and fast.use_fast_path(x) and fast.as_built(self):
            return self.forward_fast(x, recompute)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self._mlp_half(x, recompute))

    def forward_fast(self, x: Tensor, recompute: str = "none") -> Tensor:
        """:meth:`forward` through :mod:`~rest_dense.models.functional` (same math): the
        attention's ``forward_fast`` when it has one, the memory-lean MLP half, and in
        inference the residual sums in place."""
        forward_fast = getattr(self.attn, "forward_fast", None)
        a = forward_fast(x, self.norm1) if forward_fast is not None else self.attn(self.norm1(x))
        if not torch.is_grad_enabled():
            x = self.drop_path(a).add_(x)
            return self.drop_path(fast.mlp_branch(x, self.norm2, self.mlp)).add_(x)
        x = x + self.drop_path(a)
        m = fast.mlp_branch(x, self.norm2, self.mlp, recompute_hidden=recompute == "mlp")
        return x + self.drop_path(m)

    def _mlp_half(self, x: Tensor, recompute: str = "none") -> Tensor:
        """``mlp(norm2(x))``; with ``recompute='mlp'`` (while gradients are recorded) its
        activations are recomputed in backward."""
        if recompute == "mlp" and fast.needs_grad(x, self.norm2, self.mlp.fc1, self.mlp.fc2):
            return cp.checkpoint(self._mlp_half, x, use_reentrant=False)
        return self.mlp(self.norm2(x))


class ReducedKVAttention(nn.Module):
    """Queries from every token, keys/values from tokens downsampled by a strided
    depth-wise conv (``sr``) and LayerNorm (``sr_norm``): the part EMSA and EMSAv2 share.

    Args:
        dim (int): channels.
        num_heads (int): attention heads.
        sr_ratio (int): spatial reduction of keys/values. Default: 1.
        qkv_bias (bool): bias in ``q`` and ``kv``. Default: True.
        norm_eps (float): epsilon of ``sr_norm``. Default: 1e-6.
        attn_drop (float): dropout on attention weights. Default: 0.
        fast_paths (bool): the attention kernel of the dispatch
            (:func:`~rest_dense.models.functional.attention_impl`) and the memory-lean fast
            paths; False: the plain modules with the explicit attention math. Default: True.
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, qkv_bias: bool = True,
                 norm_eps: float = 1e-6, attn_drop: float = 0.0, fast_paths: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.sr_ratio = sr_ratio
        self.attn_drop = attn_drop
        self.fast_paths = fast_paths
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio + 1, stride=sr_ratio,
                                padding=sr_ratio // 2, groups=dim)
            self.sr_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.proj = nn.Linear(dim, dim)

    def project_qkv(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tuple[int, int]]:
        """``(B, H, W, C)`` -> ``q (B, heads, H*W, d)``, ``k (B, heads, n, d)``, the value
        tokens ``(B, n, C)`` (heads merged, head-major) and the reduced size ``(h, w)``."""
        b, h, w, c = x.shape
        nh, hd = self.num_heads, self.head_dim
        q = self.q(x).reshape(b, h * w, nh, hd).transpose(1, 2)
        if self.sr_ratio > 1:
            xc = x.permute(0, 3, 1, 2)
            kv_map = fast.dw_conv(xc, self.sr) if self.fast_paths and fast.use_fast_path(x) \
                else fast.library_safe_conv(self.sr, xc)
            hk, wk = kv_map.shape[-2:]
            kv_in = self.sr_norm(kv_map.flatten(2).transpose(1, 2))
        else:
            hk, wk = h, w
            kv_in = x.reshape(b, h * w, c)
        kv = self.kv(kv_in)
        k = kv[..., :c].reshape(b, hk * wk, nh, hd).transpose(1, 2)
        return q, k, kv[..., c:], (hk, wk)

    def split_heads(self, tokens: Tensor) -> Tensor:
        b, n, _ = tokens.shape
        return tokens.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def merge_heads(self, out: Tensor, h: int, w: int) -> Tensor:
        """``(B, heads, H*W, d)`` -> ``(B, H, W, C)``."""
        return out.transpose(1, 2).reshape(out.shape[0], h, w, -1)


def multi_head_attention(q: Tensor, k: Tensor, v: Tensor, scale: float,
                         fused: bool = True, dropout_p: float = 0.0) -> Tensor:
    """``softmax(q @ k^T * scale) @ v`` over ``(..., N, d)`` tensors.

    ``fused=True`` runs the kernel that :func:`rest_dense.models.functional.attention_impl`
    picks for the device, dtype and size (``F.scaled_dot_product_attention``, or the
    explicit math where that is faster); ``fused=False`` is always the explicit math of
    the released code, kept as an exact reference.
    """
    if fused:
        return fast.attention(q, k, v, scale, dropout_p=dropout_p)
    attn = (q @ k.transpose(-2, -1)) * scale
    attn = attn.softmax(dim=-1)
    if dropout_p > 0:
        attn = F.dropout(attn, p=dropout_p)
    return attn @ v


def window_partition(x: Tensor, window_size: Tuple[int, int]) -> Tuple[Tensor, Tuple[int, int]]:
    """Split a channels-last map into non-overlapping windows, zero-padding the bottom/right.

    Args:
        x: ``(B, H, W, C)`` map.
        window_size: ``(wh, ww)``.

    Returns:
        windows of shape ``(B * num_windows, wh, ww, C)`` and the padded size ``(Hp, Wp)``.
    """
    b, h, w, c = x.shape
    wh, ww = window_size
    pad_h = (wh - h % wh) % wh
    pad_w = (ww - w % ww) % ww
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // wh, wh, wp // ww, ww, c)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, wh, ww, c)
    return windows, (hp, wp)


def window_unpartition(windows: Tensor, window_size: Tuple[int, int],
                       pad_hw: Tuple[int, int], hw: Tuple[int, int]) -> Tensor:
    """Inverse of :func:`window_partition`: reassemble windows and crop the padding.

    Args:
        windows: ``(B * num_windows, wh, ww, C)``.
        window_size: ``(wh, ww)``.
        pad_hw: padded size ``(Hp, Wp)`` returned by :func:`window_partition`.
        hw: original size ``(H, W)``.

    Returns:
        ``(B, H, W, C)`` map.
    """
    wh, ww = window_size
    hp, wp = pad_hw
    h, w = hw
    nh, nw = hp // wh, wp // ww
    b = windows.shape[0] // (nh * nw)
    x = windows.view(b, nh, nw, wh, ww, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    if hp > h or wp > w:
        x = x[:, :h, :w, :].contiguous()
    return x


#: the normalisation layers :func:`reset_norm` resets (BatchNorm of any rank, SyncBatchNorm)
NORM_TYPES = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)


def reset_norm(m: nn.Module) -> None:
    """A normalisation layer as newly built: unit weight, zero bias, and (BatchNorm) the
    running statistics and step counter of a new layer."""
    if getattr(m, "weight", None) is not None:
        nn.init.ones_(m.weight)
    if getattr(m, "bias", None) is not None:
        nn.init.zeros_(m.bias)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        m.reset_running_stats()


def trunc_normal_init(module: nn.Module, std: float = 0.02) -> None:
    """The released code's initialisation: truncated normal for conv/linear, unit norms;
    BatchNorm statistics (also of SyncBatchNorm) back to those of a new model."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, NORM_TYPES):
            reset_norm(m)

