"""ResTv2 (EMSAv2) dense-prediction backbone, pure PyTorch.

Module names follow the authors' released checkpoints, so their ImageNet, detectron2 and
mmseg weights load without renaming (Zhang & Yang, ResT V2, NeurIPS 2022).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .base import (UNSET, ArchType, ConfigWarning, ResTBase, check_flag, check_int,
                   check_per_stage, check_rate, deprecated_alias, resolve_arch)
from . import functional as fast
from .registry import ModelEntry, register_model
from .layers import (Block, PixelAttention, ReducedKVAttention, multi_head_attention,
                     trunc_normal_init, window_partition, window_unpartition)

__all__ = ["ResTv2", "EMSAv2", "RESTV2_ARCHS", "ATTN_MODES"]

RESTV2_ARCHS = {
    "tiny": dict(embed_dims=(96, 192, 384, 768), num_heads=(1, 2, 4, 8), depths=(1, 2, 6, 2),
                 sr_ratios=(8, 4, 2, 1)),
    "small": dict(embed_dims=(96, 192, 384, 768), num_heads=(1, 2, 4, 8), depths=(1, 2, 12, 2),
                  sr_ratios=(8, 4, 2, 1)),
    "base": dict(embed_dims=(96, 192, 384, 768), num_heads=(1, 2, 4, 8), depths=(1, 3, 16, 3),
                 sr_ratios=(8, 4, 2, 1)),
    "large": dict(embed_dims=(128, 256, 512, 1024), num_heads=(2, 4, 8, 16), depths=(2, 3, 16, 2),
                  sr_ratios=(8, 4, 2, 1)),
}
_ARCH_DEFAULTS = dict(mlp_ratio=4.0)
ATTN_MODES = ("global", "win", "cwin", "hwin")
DEFAULT_WINDOW_SIZE = (64, 32, 16, 8)
_EPS = 1e-6


class EMSAv2(ReducedKVAttention):
    """Efficient multi-head self-attention with the upsample branch (ResTv2).

    Keys and values come from tokens downsampled by a strided depth-wise conv; the
    values are also upsampled back (depth-wise conv + PixelShuffle) and added to the
    attention output. Works on any ``(B, H, W, C)`` map: the upsampled branch is
    cropped to ``H x W`` when ``H`` or ``W`` is not a multiple of ``sr_ratio``.

    Args:
        dim (int): channels.
        num_heads (int): attention heads.
        sr_ratio (int): spatial reduction of keys/values. Default: 1.
        qkv_bias (bool): bias in ``q`` and ``kv``. Default: True.
        attn_drop (float): dropout on attention weights. Default: 0.
        fast_paths (bool): the dispatch's attention kernel and the fast paths; ``False``
            runs the plain modules with the explicit attention math. Default: True.
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, qkv_bias: bool = True,
                 attn_drop: float = 0.0, fast_paths: bool = True):
        super().__init__(dim, num_heads, sr_ratio, qkv_bias, _EPS, attn_drop, fast_paths)
        self.up = nn.Sequential(
            nn.Conv2d(dim, sr_ratio * sr_ratio * dim, kernel_size=3, padding=1, groups=dim),
            nn.PixelShuffle(sr_ratio),
        )
        self.up_norm = nn.LayerNorm(dim, eps=_EPS)

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        q, k, v_tokens, (hk, wk) = self.project_qkv(x)
        out = multi_head_attention(q, k, self.split_heads(v_tokens), self.scale,
                                   fused=self.fast_paths,
                                   dropout_p=self.attn_drop if self.training else 0.0)
        out = self.merge_heads(out, h, w)

        # v with heads merged (head-major channels) as a channels-last (B, C, hk, wk) view:
        # the depth-wise conv and PixelShuffle then stay channels-last, and the LayerNorm
        # needs no copy; the result covers at least h x w and is cropped to it
        up = self.up(v_tokens.reshape(b, hk, wk, c).permute(0, 3, 1, 2))
        up = up.permute(0, 2, 3, 1)
        if up.shape[1] != h or up.shape[2] != w:
            up = up[:, :h, :w]
        return self.proj(out + self.up_norm(up))

    def forward_fast(self, x: Tensor, norm: nn.LayerNorm) -> Tensor:
        """``self(norm(x))`` through :mod:`~rest_dense.models.functional`: the LayerNorm is
        fused with the input projections, the upsample branch with ``up_norm`` and ``proj``;
        a fused ``q``+``kv`` GEMM when ``sr_ratio == 1``. Same math as :meth:`forward`
        with ``fast_paths=True``, about half the activations kept for backward.

        Args:
            x: ``(B, H, W, C)`` block input (before ``norm``).
            norm: the block's ``norm1``.

        Returns:
            ``(B, H, W, C)``.
        """
        b, h, w, c = x.shape
        nh, hd = self.num_heads, self.head_dim
        if self.sr_ratio == 1:
            q, k, v = fast.norm_qkv(x, norm, self.q, self.kv).view(b, h * w, 3, nh, hd).unbind(2)
            hk, wk = h, w
        else:
            q, s = fast.norm_q_sr(x, norm, self.q, self.sr, self.sr_ratio)
            hk, wk = s.shape[1], s.shape[2]
            k, v = self.kv(self.sr_norm(s)).view(b, hk * wk, 2, nh, hd).unbind(2)
            q = q.view(b, h * w, nh, hd)
        out = fast.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                             self.scale, dropout_p=self.attn_drop if self.training else 0.0)
        return fast.up_proj(out, v.reshape(b, hk, wk, c), self.up[0], self.up_norm, self.proj,
                            self.sr_ratio, (h, w))


class PatchEmbedV2(nn.Module):
    """Stride-2 3x3 conv, PA position encoding and LayerNorm (``patch_{2,3,4}``).

    ``fast_paths=True`` lets the PA and the LayerNorm run as one memory-lean function
    (:func:`~rest_dense.models.functional.pa_norm`) where the fast paths apply and the
    module is as built (:func:`~rest_dense.models.functional.as_built`).
    """

    def __init__(self, in_dim: int, out_dim: int, fast_paths: bool = True):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, out_dim, kernel_size=3, stride=2, padding=1)
        self.pos = PixelAttention(out_dim)
        self.norm = nn.LayerNorm(out_dim, eps=_EPS)
        self.fast_paths = fast_paths
        fast.record_built(self)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` -> channels-last ``(B, H', W', C')``."""
        if self.fast_paths and fast.use_fast_path(x) and fast.as_built(self):
            # x is the channels-last view of the previous stage's tokens
            return fast.pa_norm(fast.conv3x3_s2(x.permute(0, 2, 3, 1), self.proj),
                                self.pos, self.norm)
        return self.norm(self.pos(fast.library_safe_conv(self.proj, x)).permute(0, 2, 3, 1))


class ConvStemV2(nn.Module):
    """Stride-4 convolutional stem (``stem``): two conv-BN-ReLU, a 1x1 conv, PA, LayerNorm."""

    def __init__(self, in_channels: int, dim: int, fast_paths: bool = True):
        super().__init__()
        self.fast_paths = fast_paths
        hidden = dim // 2
        self.proj = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, dim, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(dim, dim, 1),
        )
        self.pos = PixelAttention(dim)
        self.norm = nn.LayerNorm(dim, eps=_EPS)
        fast.record_built(self)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` images -> channels-last ``(B, H/4, W/4, C')`` tokens."""
        if self.fast_paths and fast.use_fast_path(x) and fast.as_built(self):
            # channels-last throughout; BatchNorm/ReLU maps recomputed in backward, folded
            # into the convolutions in inference
            return fast.pa_norm(fast.conv_stem(x, self.proj), self.pos, self.norm)
        if self.proj._forward_hooks or self.proj._forward_pre_hooks:
            x = self.proj(x)  # the Sequential as called, for its hooks
        else:
            for layer in self.proj:  # the convolutions past the library's tiny-map bug
                x = fast.library_safe_conv(layer, x) if isinstance(layer, nn.Conv2d) else layer(x)
        return self.norm(self.pos(x).permute(0, 2, 3, 1))


def _window_sizes(value, attn_mode: str, sr_ratios: Sequence[int]) -> Tuple[int, ...]:
    """``window_size`` (an int for every stage, 4 ints, or None for the default) as 4 ints.

    Every mode needs positive integers; only the window modes, which use them, need each
    to be a multiple of its stage's ``sr_ratio``.
    """
    if value is None:
        return tuple(DEFAULT_WINDOW_SIZE)
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) \
            or isinstance(value, Tensor) and value.dim() > 0 \
            or hasattr(value, "__array__") and getattr(value, "ndim", 0) > 0:
        sizes = check_per_stage(value, "window_size", low=1)
    else:
        sizes = (check_int(value, "window_size", low=1),) * 4
    if attn_mode != "global":
        for i, (ws, sr) in enumerate(zip(sizes, sr_ratios)):
            if ws % sr:
                raise ValueError(f"window_size[{i}]={ws} must be a positive multiple of stage "
                                 f"{i + 1}'s sr_ratio {sr} in attn_mode {attn_mode!r}")
    elif sizes != tuple(DEFAULT_WINDOW_SIZE):
        import warnings

        # e.g. Swin's window_size=7 carried over: global attention has no windows
        warnings.warn(f"window_size={value!r} has no effect with attn_mode='global' (it sizes "
                      "the windows of the 'win', 'cwin' and 'hwin' modes)", ConfigWarning,
                      stacklevel=4)
    return sizes


class ResTv2(ResTBase):
    """ResTv2 backbone for dense prediction: four maps at strides 4/8/16/32.

    Accepts any input size; stage ``i`` (0-based) of an ``H x W`` input is
    ``ceil(H / 2**(i+2)) x ceil(W / 2**(i+2))``.

    Args:
        arch (str | dict): ``'tiny' | 'small' | 'base' | 'large'`` or a dict with
            ``embed_dims``, ``num_heads``, ``depths``, ``sr_ratios`` (each ratio 1 or
            even; and optionally ``mlp_ratio``). Default: ``'tiny'``.
        in_channels (int): input channels. Default: 3.
        out_indices (Sequence[int]): stages to emit (0..3). Default: (0, 1, 2, 3).
        drop_path_rate (float): stochastic depth, linearly increasing over blocks. Default: 0.
        attn_mode (str): ``'global'``, ``'win'`` (all blocks in windows), ``'cwin'``
            (``win`` plus a residual 3x3 depth-wise conv after each stage), or ``'hwin'``
            (windows except the last block of each stage). Default: ``'global'``.
        window_size (int | Sequence[int]): window side in tokens per stage (one int for all
            stages, or 4); in the window modes each must be a multiple of the stage's
            ``sr_ratio``; ``global`` ignores it. Default: (64, 32, 16, 8).
        frozen_stages (int): freeze the stem (0) and stages ``1..frozen_stages``, keeping
            them in eval mode; -1 freezes nothing. Default: -1.
        norm_eval (bool): keep BatchNorm layers in eval mode while training. Default: False.
        with_cp (bool | str): the memory level of training (recomputation in backward,
            only while gradients are recorded; outputs and gradients do not change):
            ``False`` / ``'none'`` keeps what the memory-lean blocks save (about 8C floats
            per token and block); ``'mlp'`` also recomputes each block's 4C-wide MLP
            hidden map (one more ``fc1`` GEMM per block; about 4C); ``True`` /
            ``'block'`` recomputes whole blocks (gradient checkpointing; 1C).
            Default: False.
        fast_paths (bool): compute by the fast dispatch: the attention kernel that
            :func:`~rest_dense.models.functional.attention_impl` picks per device, dtype and
            size, and the memory-lean fast paths of :mod:`rest_dense.models.functional`
            where :data:`~rest_dense.models.functional.FAST_PATH_RULE` allows them
            (LayerNorms, GELU, the PA gate and the upsample branch recomputed in backward
            instead of kept; switch them off process-wide with
            :func:`~rest_dense.models.functional.fast_paths`). ``False`` selects the plain
            module-by-module computation with the explicit attention math of the released
            code (the exact reference; the one with second derivatives, for
            ``create_graph=True``). Default: True.
        fused_attn (bool, deprecated): the former name of ``fast_paths``.
        attn_drop_rate (float): dropout on attention weights. Default: 0.
        pretrained (str, optional): checkpoint path loaded with
            :func:`rest_dense.models.load_checkpoint`. Default: None.

    Every argument is checked here: integers must be integers (``2.5`` and ``True`` are
    refused, never truncated), rates must lie in ``[0, 1)``, flags must be bools;
    a bad value raises ``TypeError`` / ``ValueError`` naming the argument. ``forward``
    checks its input (see :meth:`ResTBase._check_input`): a 4-D floating-point batch with
    ``N >= 1``, of the weights' dtype and device (any float16/bfloat16/float32 inside
    ``torch.autocast``), without NaN/inf while ``check_finite_inputs`` is True (default).
    """

    def __init__(self, arch: ArchType = "tiny", in_channels: int = 3,
                 out_indices: Sequence[int] = (0, 1, 2, 3), drop_path_rate: float = 0.0,
                 attn_mode: str = "global", window_size: Union[int, Sequence[int]] = DEFAULT_WINDOW_SIZE,
                 frozen_stages: int = -1, norm_eval: bool = False, with_cp: Union[bool, str] = False,
                 fast_paths: bool = True, attn_drop_rate: float = 0.0,
                 pretrained: Optional[str] = None, fused_attn: Optional[bool] = UNSET):
        super().__init__()
        spec = resolve_arch(arch, RESTV2_ARCHS, _ARCH_DEFAULTS, "ResTv2")
        for i, sr in enumerate(spec["sr_ratios"]):
            if sr > 1 and sr % 2:
                # kernel sr + 1, padding sr // 2: an odd ratio reduces H to (H - 2) // sr + 1,
                # which the upsample branch (x sr) does not bring back to H for most sizes
                raise ValueError(f"ResTv2 arch field 'sr_ratios'[{i}] is {sr}: EMSAv2's upsample "
                                 "branch needs 1 or an even ratio to cover the stage's map")
        self._setup_common(spec, in_channels, out_indices, frozen_stages, norm_eval, with_cp)

        if not isinstance(attn_mode, str):
            raise TypeError(f"attn_mode must be one of {ATTN_MODES}, got {attn_mode!r} "
                            f"({type(attn_mode).__name__})")
        if attn_mode not in ATTN_MODES:
            raise ValueError(f"unknown attn_mode {attn_mode!r}; choose one of {ATTN_MODES}")
        self.attn_mode = attn_mode
        self.window_size = _window_sizes(window_size, attn_mode, self.sr_ratios)
        drop_path_rate = check_rate(drop_path_rate, "drop_path_rate")
        attn_drop_rate = check_rate(attn_drop_rate, "attn_drop_rate")
        fast_paths = deprecated_alias(fast_paths, fused_attn, "fast_paths", "fused_attn")
        fast_paths = check_flag(fast_paths, "fast_paths")

        dims = self.embed_dims
        self.stem = ConvStemV2(self.in_channels, dims[0], fast_paths=fast_paths)
        dpr = torch.linspace(0, drop_path_rate, sum(self.depths), device="cpu").tolist()
        cur = 0
        for i in range(4):
            if i > 0:
                setattr(self, f"patch_{i + 1}",
                        PatchEmbedV2(dims[i - 1], dims[i], fast_paths=fast_paths))
            blocks = nn.ModuleList([
                Block(dims[i],
                      EMSAv2(dims[i], spec["num_heads"][i], self.sr_ratios[i],
                             attn_drop=attn_drop_rate, fast_paths=fast_paths),
                      mlp_ratio=spec["mlp_ratio"], drop_path=dpr[cur + j], norm_eps=_EPS)
                for j in range(self.depths[i])])
            setattr(self, f"stage{i + 1}", blocks)
            cur += self.depths[i]
        for i in self.out_indices:
            setattr(self, f"norm_{i + 1}", nn.LayerNorm(dims[i], eps=_EPS))
        if attn_mode == "cwin":
            self.cwin_convs = nn.ModuleList(
                nn.Conv2d(d, d, kernel_size=3, padding=1, groups=d) for d in dims)
        self._finish_init(pretrained)

    #: the named variants (registered as ``restv2_<key>``)
    ARCHS = RESTV2_ARCHS
    #: layers that only the dense model has (absent from ImageNet checkpoints)
    dense_only_prefixes = ("norm_", "cwin_convs.")
    #: checkpoint entries the model may leave unused: the classifier's final norm of the
    #: ImageNet checkpoints, output norms of stages that out_indices does not emit
    unused_checkpoint_prefixes = ("norm.", "norm_")

    def reset_parameters(self) -> None:
        """Released-code initialisation; cross-window convs start at zero so that a
        checkpoint loaded into ``cwin`` mode initially behaves exactly like ``win``."""
        trunc_normal_init(self)
        if self.attn_mode == "cwin":
            for conv in self.cwin_convs:
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)

    @property
    def num_window_blocks(self) -> Tuple[int, ...]:
        """How many leading blocks of each stage run in windows (the rest are global)."""
        if self.attn_mode == "global":
            return (0,) * 4
        if self.attn_mode == "hwin":
            return tuple(max(d - 1, 0) for d in self.depths)
        return tuple(self.depths)

    def stage_modules(self, i: int) -> List[nn.Module]:
        if i == 0:
            return [self.stem]
        mods = [getattr(self, f"stage{i}")]
        if i > 1:
            mods.append(getattr(self, f"patch_{i}"))
        if hasattr(self, f"norm_{i}"):
            mods.append(getattr(self, f"norm_{i}"))
        if self.attn_mode == "cwin":
            mods.append(self.cwin_convs[i - 1])
        return mods

    def _forward_stage(self, i: int, x: Tensor) -> Tensor:
        blocks = getattr(self, f"stage{i + 1}")
        n_win = self.num_window_blocks[i]
        h, w = x.shape[1:3]
        win = (min(self.window_size[i], h), min(self.window_size[i], w))
        if n_win and win != (h, w):
            # pad and partition once for all windowed blocks of the stage
            xw, pad_hw = window_partition(x, win)
            for blk in blocks[:n_win]:
                xw = self._run_block(blk, xw)
            x = window_unpartition(xw, win, pad_hw, (h, w))
            blocks = blocks[n_win:]
        for blk in blocks:
            x = self._run_block(blk, x)
        if self.attn_mode == "cwin":
            x = x + self.cwin_convs[i](x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x

    def patch_embed(self, i: int) -> nn.Module:
        return getattr(self, f"patch_{i + 1}")

    def _stage_output(self, i: int, x: Tensor) -> Tensor:
        return getattr(self, f"norm_{i + 1}")(x)


for _arch in RESTV2_ARCHS:
    register_model(ModelEntry(f"restv2_{_arch}", "restv2", _arch, ResTv2, attn_modes=ATTN_MODES))
