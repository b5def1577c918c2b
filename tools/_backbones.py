"""Backbone names shared by the analysis / deployment tools (``get_flops.py``,
``convert_checkpoint.py``, ``export_onnx.py``): ``restv2_<tiny|small|base|large>`` and
``restv1_<lite|small|base|large>`` (``rest_<...>`` is accepted for ResTv1)."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch import nn  # noqa: E402

from rest_dense.models import RESTV1_ARCHS, RESTV2_ARCHS, ResTv1, ResTv2  # noqa: E402

__all__ = ["BACKBONE_NAMES", "canonical_name", "build_backbone"]

BACKBONE_NAMES = tuple([f"restv2_{a}" for a in RESTV2_ARCHS] + [f"restv1_{a}" for a in RESTV1_ARCHS])


def canonical_name(name: str) -> str:
    """``rest_small`` -> ``restv1_small``; lower case."""
    name = name.lower()
    return "restv1_" + name[len("rest_"):] if name.startswith("rest_") else name


def build_backbone(name: str, attn_mode: str = "global", **kwargs) -> nn.Module:
    """Core model for a variant name; ``kwargs`` go to the constructor (``fused_attn``,
    ``window_size``, ``out_indices``, ...)."""
    key = canonical_name(name)
    family, _, arch = key.partition("_")
    if family == "restv2" and arch in RESTV2_ARCHS:
        return ResTv2(arch, attn_mode=attn_mode, **kwargs)
    if family == "restv1" and arch in RESTV1_ARCHS:
        if attn_mode != "global":
            raise ValueError(f"{name}: ResTv1 has global attention only (got attn_mode={attn_mode!r})")
        return ResTv1(arch, **kwargs)
    raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONE_NAMES)}")
