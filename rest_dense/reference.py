"""The released code's computation layout: the speed baseline of ``rest-dense bench``.

:class:`ReleasedLayoutResTv2` wraps one of our :class:`~rest_dense.models.ResTv2` models
and runs **the same weights** the way the authors' released implementation lays out the
computation:

* tokens are kept as ``(B, N, C)`` sequences, and every convolution (spatial reduction of
  the keys/values, the upsample branch, the patch embeddings) goes through an NCHW round
  trip with ``permute(...).reshape``;
* attention is the explicit ``softmax(q @ k^T * scale) @ v`` with the full attention
  matrix materialised (no fused kernel);
* the output LayerNorms are built from element-wise mean / variance over the channel
  dimension of NCHW maps.

Its outputs equal ours (to float rounding, about 1e-6), so timing it against our model
isolates what our layout and the fused attention gain. It supports backward, for training
benchmarks. It covers what the released code covers: global attention and inputs whose
sides are multiples of 32. Stochastic depth and attention dropout are not applied, so the
wrapped model must be built with ``drop_path_rate=0`` and ``attn_drop_rate=0``.

Example::

    from rest_dense.models import create_model
    from rest_dense.reference import ReleasedLayoutResTv2

    ours = create_model("restv2_tiny").eval()
    released = ReleasedLayoutResTv2(ours)          # shares ours' parameters
    feats = released(torch.randn(1, 3, 224, 224))  # same four maps as ours(x)
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn

from .models import ResTv2

__all__ = ["ReleasedLayoutResTv2"]


def _attention(attn: nn.Module, x: Tensor, h: int, w: int) -> Tensor:
    """EMSAv2 on ``(B, N, C)`` tokens of an ``h x w`` map, released layout."""
    b, n, c = x.shape
    nh = attn.num_heads
    q = attn.q(x).reshape(b, n, nh, c // nh).permute(0, 2, 1, 3)
    if attn.sr_ratio > 1:
        x_ = x.permute(0, 2, 1).reshape(b, c, h, w)
        x_ = attn.sr(x_).reshape(b, c, -1).permute(0, 2, 1)
        x_ = attn.sr_norm(x_)
    else:
        x_ = x
    kv = attn.kv(x_).reshape(b, -1, 2, nh, c // nh).permute(2, 0, 3, 1, 4)
    k, v = kv[0], kv[1]
    weights = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, n, c)
    identity = v.transpose(-1, -2).reshape(b, c, h // attn.sr_ratio, w // attn.sr_ratio)
    identity = attn.up(identity).flatten(2).transpose(1, 2)
    return attn.proj(out + attn.up_norm(identity))


def _block(blk: nn.Module, x: Tensor, h: int, w: int) -> Tensor:
    x = x + _attention(blk.attn, blk.norm1(x), h, w)
    return x + blk.mlp(blk.norm2(x))


def _embed(embed: nn.Module, x: Tensor) -> Tuple[Tensor, int, int]:
    x = embed.pos(embed.proj(x))
    h, w = x.shape[-2:]
    return embed.norm(x.flatten(2).transpose(1, 2)), h, w


def _channels_first_layer_norm(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    """The released channels-first LayerNorm: explicit mean / variance over dim 1."""
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    y = (x - u) / torch.sqrt(s + norm.eps)
    return norm.weight[:, None, None] * y + norm.bias[:, None, None]


class ReleasedLayoutResTv2(nn.Module):
    """Runs a ResTv2 (global attention) in the released code's data layout.

    The wrapped model's parameters are used as they are (not copied): ``state_dict()``
    keys are the model's with a ``model.`` prefix.

    Args:
        model (ResTv2): our backbone, ``attn_mode='global'``, built without stochastic
            depth or attention dropout.

    Raises:
        TypeError: ``model`` is not a ResTv2.
        ValueError: a window attention mode, or drop path / attention dropout set.
    """

    def __init__(self, model: ResTv2):
        super().__init__()
        if not isinstance(model, ResTv2):
            raise TypeError(f"the released layout baseline wraps a ResTv2, got {type(model).__name__}")
        if model.attn_mode != "global":
            raise ValueError("the released layout baseline supports attn_mode='global' only, "
                             f"got {model.attn_mode!r}")
        for name, module in model.named_modules():
            if getattr(module, "drop_prob", 0.0) > 0 or getattr(module, "attn_drop", 0.0) > 0:
                raise ValueError(f"the released layout baseline applies no dropout; {name} has "
                                 "some (build the model with drop_path_rate=0, attn_drop_rate=0)")
        self.model = model

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        """Args: x: ``(N, 3, H, W)`` images, ``H`` and ``W`` multiples of 32.
        Returns: the NCHW maps of the model's ``out_indices``, as the model returns them."""
        m = self.model
        if x.shape[-1] % 32 or x.shape[-2] % 32:
            raise ValueError(f"the released code needs inputs divisible by 32, got "
                             f"{x.shape[-2]}x{x.shape[-1]}")
        b = x.shape[0]
        outs = {}
        for i in range(max(m.out_indices) + 1):
            embed = m.stem if i == 0 else getattr(m, f"patch_{i + 1}")
            x, h, w = _embed(embed, x)
            for blk in getattr(m, f"stage{i + 1}"):
                x = _block(blk, x, h, w)
            x = x.permute(0, 2, 1).reshape(b, -1, h, w)
            if i in m.out_indices:
                outs[i] = _channels_first_layer_norm(getattr(m, f"norm_{i + 1}"), x)
        return tuple(outs[i] for i in m.out_indices)
