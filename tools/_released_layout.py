"""Benchmark baseline: a ResTv2 forward pass in the released code's data layout.

Runs the weights of a :class:`rest_dense.models.ResTv2` the way the authors' code
computes it: tokens as ``(B, N, C)``, NCHW round trips through ``permute(...).reshape``
for every convolution, explicit ``softmax(q k^T) v`` attention matrices and an NCHW
upsample branch. Global attention and inputs divisible by 32 only (as in the released
code). Used by ``tools/benchmark.py --attn-impls released``; not part of the package.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn


def _attention(attn, x: Tensor, h: int, w: int) -> Tensor:
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


def _block(blk, x: Tensor, h: int, w: int) -> Tensor:
    x = x + _attention(blk.attn, blk.norm1(x), h, w)
    return x + blk.mlp(blk.norm2(x))


def _embed(embed, x: Tensor) -> Tuple[Tensor, int, int]:
    x = embed.pos(embed.proj(x))
    h, w = x.shape[-2:]
    return embed.norm(x.flatten(2).transpose(1, 2)), h, w


class ReleasedLayoutResTv2(nn.Module):
    """Wraps a core ResTv2 (global mode) and runs it in the released code's layout."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if model.attn_mode != "global":
            raise ValueError("the released layout baseline supports global attention only")
        self.model = model

    def forward(self, x: Tensor):
        m = self.model
        if x.shape[-1] % 32 or x.shape[-2] % 32:
            raise ValueError("the released code needs inputs divisible by 32")
        b = x.shape[0]
        outs = []
        for i in range(4):
            embed = m.stem if i == 0 else getattr(m, f"patch_{i + 1}")
            x, h, w = _embed(embed, x)
            for blk in getattr(m, f"stage{i + 1}"):
                x = _block(blk, x, h, w)
            x = x.permute(0, 2, 1).reshape(b, -1, h, w)
            if hasattr(m, f"norm_{i + 1}"):
                # the released channels-first LayerNorm: explicit mean/variance over dim 1
                norm = getattr(m, f"norm_{i + 1}")
                u = x.mean(1, keepdim=True)
                s = (x - u).pow(2).mean(1, keepdim=True)
                y = (x - u) / torch.sqrt(s + norm.eps)
                outs.append(norm.weight[:, None, None] * y + norm.bias[:, None, None])
        return tuple(outs)
