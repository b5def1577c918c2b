"""ResTv1 (EMSA) dense-prediction backbone, pure PyTorch, in the released detection layout.

Stages 1-3 are followed by token LayerNorms ``norm1..norm3`` applied *in the stream*
(the next stage consumes the normalised tokens); stage 4 uses the classifier's final
``norm``. Module names follow the released checkpoints.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import UNSET, ArchType, ResTBase, check_flag, check_rate, deprecated_alias, resolve_arch
from .functional import _check_batch_statistics, autocast_off, library_safe_conv
from .registry import ModelEntry, register_model
from .layers import (Block, PixelAttention, ReducedKVAttention, multi_head_attention,
                     trunc_normal_init)

__all__ = ["ResTv1", "EMSA", "RESTV1_ARCHS"]

_COMMON = dict(num_heads=(1, 2, 4, 8), sr_ratios=(8, 4, 2, 1))
RESTV1_ARCHS = {
    "lite": dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 2, 2), **_COMMON),
    "small": dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 6, 2), **_COMMON),
    "base": dict(embed_dims=(96, 192, 384, 768), depths=(2, 2, 6, 2), **_COMMON),
    "large": dict(embed_dims=(96, 192, 384, 768), depths=(2, 2, 18, 2), **_COMMON),
}
_ARCH_DEFAULTS = dict(mlp_ratio=4.0, qkv_bias=True, apply_transform=True)
_EPS = 1e-5


def mix_heads_decomposed(logits: Tensor, weight: Tensor, bias: Tensor, eps: float = _EPS) -> Tensor:
    """ResTv1's multi-head interaction in elementary ops: a 1x1 conv over the heads, softmax
    over the keys, then an instance norm (no affine) over each head's attention map.

    Equals ``InstanceNorm2d(softmax(conv2d(logits, weight, bias)))`` (and 0 for a map of
    one element, where the norm of a single value is 0), without Conv or
    InstanceNormalization nodes, so a traced graph keeps the wide dtype of ``logits`` in
    runtimes that have those kernels only for float32.

    Args:
        logits: ``(B, heads, queries, keys)`` attention logits.
        weight: ``(heads, heads, 1, 1)`` conv weight.
        bias: ``(heads,)`` conv bias.
        eps: the norm's epsilon. Default: 1e-5.
    """
    heads = logits.shape[1]
    flat = logits.flatten(2)
    attn = torch.matmul(weight.reshape(heads, heads), flat) + bias.reshape(heads, 1)
    attn = attn.reshape(logits.shape).softmax(dim=-1)
    centred = attn - attn.mean(dim=(-2, -1), keepdim=True)
    var = (centred * centred).mean(dim=(-2, -1), keepdim=True)
    return centred / torch.sqrt(var + eps)


class EMSA(ReducedKVAttention):
    """Efficient multi-head self-attention of ResTv1.

    With ``apply_transform`` and more than one head, a 1x1 conv mixes the heads'
    attention logits before softmax and an InstanceNorm follows it; that needs the
    explicit attention matrix, so only the single-head / no-transform case can use the
    fused kernel.

    Args:
        dim (int): channels.
        num_heads (int): attention heads.
        sr_ratio (int): spatial reduction of keys/values. Default: 1.
        qkv_bias (bool): bias in ``q`` and ``kv``. Default: True.
        apply_transform (bool): multi-head interaction (ignored for one head). Default: True.
        attn_drop (float): dropout on attention weights. Default: 0.
        fast_paths (bool): the dispatch's attention kernel where the math allows it, and
            the fast paths; False: plain modules, explicit attention. Default: True.
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, qkv_bias: bool = True,
                 apply_transform: bool = True, attn_drop: float = 0.0, fast_paths: bool = True):
        super().__init__(dim, num_heads, sr_ratio, qkv_bias, _EPS, attn_drop, fast_paths)
        self.apply_transform = bool(apply_transform) and num_heads > 1
        if self.apply_transform:
            self.transform_conv = nn.Conv2d(num_heads, num_heads, kernel_size=1)
            self.transform_norm = nn.InstanceNorm2d(num_heads)

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        q, k, v_tokens, _ = self.project_qkv(x)
        v = self.split_heads(v_tokens)
        drop = self.attn_drop if self.training else 0.0
        if self.apply_transform:
            logits = (q @ k.transpose(-2, -1)) * self.scale
            # InstanceNorm over a near-uniform softmax amplifies rounding errors ~20x, so the
            # head mixing, softmax and norm run in a wider type (fp64 for fp32 and fp64
            # logits, fp32 for reduced ones), with autocast off (it would cast back down)
            wide = torch.float64 if logits.dtype in (torch.float32, torch.float64) \
                else torch.float32
            with autocast_off(logits.device.type):
                attn = self._mix_heads(logits.to(wide))
            attn = attn.to(v.dtype)
            if drop:
                attn = F.dropout(attn, p=drop)
            out = attn @ v
        else:
            out = multi_head_attention(q, k, v, self.scale, fused=self.fast_paths, dropout_p=drop)
        return self.proj(self.merge_heads(out, h, w))

    def _mix_heads(self, logits: Tensor) -> Tensor:
        """1x1 conv over the heads, softmax over the keys, instance norm, in ``logits``'s dtype."""
        tc = self.transform_conv
        weight, bias = tc.weight.to(logits.dtype), tc.bias.to(logits.dtype)
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            # graph exports: ONNX Runtime's CPU provider has no float64 Conv or
            # InstanceNormalization, so the same math is written in ops it has
            return mix_heads_decomposed(logits, weight, bias, self.transform_norm.eps)
        attn = F.conv2d(logits, weight, bias).softmax(dim=-1)
        if attn.shape[-2] * attn.shape[-1] > 1:
            return self.transform_norm(attn)
        # one query and one key (a 1x1 map, e.g. stage 4 of a 32x32 input): the instance
        # norm of a single value is exactly 0, which InstanceNorm2d refuses to compute
        # ("more than 1 spatial element")
        return torch.zeros_like(attn)


class PatchEmbedV1(nn.Module):
    """Stride-2 3x3 conv, BatchNorm, PA (``patch_embed_{2,3,4}``); NCHW -> channels-last."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size=3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(out_dim)
        self.pos = PixelAttention(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = library_safe_conv(self.conv, x)
        _check_batch_statistics(self.norm, x.shape, "the patch embedding's")
        return self.pos(self.norm(x)).permute(0, 2, 3, 1)


class BasicStemV1(nn.Module):
    """Stride-4 stem of ResTv1 (``stem``): conv-BN-ReLU x2, strided conv, PA."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        hidden = dim // 2
        self.conv1 = nn.Conv2d(in_channels, hidden, 3, stride=2, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, stride=1, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(hidden)
        self.conv3 = nn.Conv2d(hidden, dim, 3, stride=2, padding=1, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.pos = PixelAttention(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = library_safe_conv(self.conv1, x)
        _check_batch_statistics(self.norm1, x.shape, "the stem's")
        x = self.act(self.norm1(x))
        x = self.act(self.norm2(library_safe_conv(self.conv2, x)))
        return self.pos(library_safe_conv(self.conv3, x)).permute(0, 2, 3, 1)


class ResTv1(ResTBase):
    """ResTv1 backbone for dense prediction: four maps at strides 4/8/16/32, any input size.

    Args:
        arch (str | dict): ``'lite' | 'small' | 'base' | 'large'`` or a dict with
            ``embed_dims``, ``num_heads``, ``depths``, ``sr_ratios`` and optionally
            ``qkv_bias`` (True), ``apply_transform`` (True), ``mlp_ratio`` (4).
            Default: ``'small'``.
        in_channels (int): input channels. Default: 3.
        out_indices (Sequence[int]): stages to emit (0..3). Default: (0, 1, 2, 3).
        drop_path_rate (float): stochastic depth, linearly increasing over blocks. Default: 0.
        frozen_stages (int): freeze the stem (0) and stages ``1..frozen_stages``. Default: -1.
        norm_eval (bool): keep BatchNorm layers in eval mode while training. Default: False.
        with_cp (bool | str): memory level: ``False`` / ``'none'``, ``'mlp'`` (recompute
            each block's MLP hidden map in backward) or ``True`` / ``'block'`` (gradient
            checkpointing per block); see :class:`ResTv2`. Default: False.
        fast_paths (bool): the dispatch's attention kernel where the math allows it, and
            the memory-lean MLP of :mod:`rest_dense.models.functional`; False: the plain
            modules with the explicit attention math (the exact reference; the one with
            second derivatives, for ``create_graph=True``). Default: True.
        fused_attn (bool, deprecated): the former name of ``fast_paths``.
        attn_drop_rate (float): dropout on attention weights. Default: 0.
        pretrained (str, optional): checkpoint path to load. Default: None.

    Arguments and inputs are checked as in :class:`ResTv2` (see its docstring). Any input
    size works, in training and eval mode: where a stage's attention map has a single
    query and key (a 1x1 map), the multi-head interaction's instance norm yields its exact
    value, 0.
    """

    def __init__(self, arch: ArchType = "small", in_channels: int = 3,
                 out_indices: Sequence[int] = (0, 1, 2, 3), drop_path_rate: float = 0.0,
                 frozen_stages: int = -1, norm_eval: bool = False, with_cp: Union[bool, str] = False,
                 fast_paths: bool = True, attn_drop_rate: float = 0.0,
                 pretrained: Optional[str] = None, fused_attn: Optional[bool] = UNSET):
        super().__init__()
        spec = resolve_arch(arch, RESTV1_ARCHS, _ARCH_DEFAULTS, "ResTv1")
        self._setup_common(spec, in_channels, out_indices, frozen_stages, norm_eval, with_cp)
        drop_path_rate = check_rate(drop_path_rate, "drop_path_rate")
        attn_drop_rate = check_rate(attn_drop_rate, "attn_drop_rate")
        fast_paths = deprecated_alias(fast_paths, fused_attn, "fast_paths", "fused_attn")
        fast_paths = check_flag(fast_paths, "fast_paths")

        dims = self.embed_dims
        self.stem = BasicStemV1(self.in_channels, dims[0])
        dpr = torch.linspace(0, drop_path_rate, sum(self.depths), device="cpu").tolist()
        cur = 0
        for i in range(4):
            if i > 0:
                setattr(self, f"patch_embed_{i + 1}", PatchEmbedV1(dims[i - 1], dims[i]))
            blocks = nn.ModuleList([
                Block(dims[i],
                      EMSA(dims[i], spec["num_heads"][i], self.sr_ratios[i], qkv_bias=spec["qkv_bias"],
                           apply_transform=spec["apply_transform"], attn_drop=attn_drop_rate,
                           fast_paths=fast_paths),
                      mlp_ratio=spec["mlp_ratio"], drop_path=dpr[cur + j], norm_eps=_EPS)
                for j in range(self.depths[i])])
            setattr(self, f"stage{i + 1}", blocks)
            cur += self.depths[i]
        # in-stream norms: every stage up to the last emitted one needs its norm
        for i in range(3):
            setattr(self, f"norm{i + 1}", nn.LayerNorm(dims[i], eps=_EPS))
        self.norm = nn.LayerNorm(dims[3], eps=_EPS)
        self._finish_init(pretrained)

    #: the named variants (registered as ``restv1_<key>``, alias ``rest_<key>``)
    ARCHS = RESTV1_ARCHS
    #: in-stream norms of the detection layout (absent from ImageNet checkpoints)
    dense_only_prefixes = ("norm1.", "norm2.", "norm3.")
    #: checkpoint entries the model may leave unused (none: the final norm is stage 4's)
    unused_checkpoint_prefixes: Tuple[str, ...] = ()

    def reset_parameters(self) -> None:
        trunc_normal_init(self)

    def _stage_norm(self, i: int) -> nn.LayerNorm:
        return self.norm if i == 3 else getattr(self, f"norm{i + 1}")

    def stage_modules(self, i: int) -> List[nn.Module]:
        if i == 0:
            return [self.stem]
        mods = [getattr(self, f"stage{i}"), self._stage_norm(i - 1)]
        if i > 1:
            mods.append(getattr(self, f"patch_embed_{i}"))
        return mods

    def patch_embed(self, i: int) -> nn.Module:
        return getattr(self, f"patch_embed_{i + 1}")

    def _forward_stage(self, i: int, x: Tensor) -> Tensor:
        for blk in getattr(self, f"stage{i + 1}"):
            x = self._run_block(blk, x)
        return self._stage_norm(i)(x)  # ResTv1 normalises in the stream

    def _stage_output(self, i: int, x: Tensor) -> Tensor:
        return x


for _arch in RESTV1_ARCHS:
    register_model(ModelEntry(f"restv1_{_arch}", "restv1", _arch, ResTv1, aliases=(f"rest_{_arch}",)))
