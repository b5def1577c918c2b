"""Parameters and FLOPs of feature-pyramid necks alone: the plain FPN and VT-FPN.

A neck is counted on random maps at strides 4, 8, 16, 32 (one per entry of its input
channels, stride doubling per level) of an input image ``H x W``; the map at stride ``s``
is ``ceil(H/s) x ceil(W/s)``, the sizes a ResNet or ResT backbone produces. Counting uses
:func:`rest_dense.analysis.count_flops` (fvcore multiply-adds, the project's conventions)
and needs no detection / segmentation framework.

``rest-dense flops neck:fpn neck:vt_fpn --neck-channels resnet50 --shape 800x1216`` is the
command-line front end. Library use::

    from rest_dense.neck_analysis import analyze_neck
    r = analyze_neck("vt_fpn", "resnet50", (800, 1216))
    r.flops.total / 1e9        # 8.29; the paper (VT, Wu et al. 2020): 8.5
"""
from __future__ import annotations

import math
import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .analysis import AnalysisResult, count_flops, count_parameters

__all__ = ["NECKS", "NECK_PREFIX", "NECK_PRESETS", "NECK_DEFAULT_SHAPE", "PAPER_NECK",
           "is_neck_target", "neck_name", "parse_neck_channels", "neck_feature_shapes",
           "build_neck", "analyze_neck"]

#: the necks that can be counted alone (``neck:<name>`` on the command line)
NECKS: Tuple[str, ...] = ("fpn", "vt_fpn")
NECK_PREFIX = "neck:"
#: named input-channel sets besides the registry's models (whose ``embed_dims`` are used)
NECK_PRESETS: Dict[str, Tuple[int, ...]] = {
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
}
#: default input image size of a neck count: the VT paper's COCO-stuff size
NECK_DEFAULT_SHAPE: Tuple[int, int] = (800, 1216)
#: the VT paper's neck GFLOPs (Wu et al., arXiv 2006.03677, semantic segmentation table):
#: ``(neck, input channels, H, W) -> GFLOPs``
PAPER_NECK: Dict[Tuple[str, Tuple[int, ...], int, int], float] = {
    ("fpn", (256, 512, 1024, 2048), 800, 1216): 55.1,
    ("vt_fpn", (256, 512, 1024, 2048), 800, 1216): 8.5,
    ("fpn", (256, 512, 1024, 2048), 473, 473): 12.8,
    ("vt_fpn", (256, 512, 1024, 2048), 473, 473): 2.0,
}
_PAPER_SOURCE = {(800, 1216): "VT paper, COCO-stuff", (473, 473): "VT paper, LIP"}


def is_neck_target(item: str) -> bool:
    """Whether a command-line target names a neck (``'neck:...'``)."""
    return isinstance(item, str) and item.lower().startswith(NECK_PREFIX)


def neck_name(item: str) -> str:
    """``'neck:VT_FPN'`` or ``'vt_fpn'`` -> ``'vt_fpn'`` (``'vt-fpn'`` is accepted too).

    Raises:
        ValueError: not one of :data:`NECKS`.
    """
    name = item[len(NECK_PREFIX):] if is_neck_target(item) else item
    key = name.strip().lower().replace("-", "_")
    if key not in NECKS:
        raise ValueError(f"unknown neck {name!r}; choose one of "
                         f"{', '.join(NECK_PREFIX + n for n in NECKS)}")
    return key


def parse_neck_channels(spec: Union[str, Sequence[int]]) -> Tuple[Tuple[int, ...], str]:
    """Input channels of a neck from a preset, a model name or a list.

    Args:
        spec: ``'resnet50'`` / ``'resnet101'`` (256, 512, 1024, 2048), a registry model
            name (its ``embed_dims``, e.g. ``'restv2_tiny'`` -> 96, 192, 384, 768),
            comma-separated integers (``'256,512,1024,2048'``) or a sequence of ints.

    Returns:
        The channels, finest level first, and a label for tables (the preset or model
        name, or the channels joined by commas).

    Raises:
        ValueError: an unknown name, an empty list or a channel count below 1.
    """
    if isinstance(spec, str):
        text = spec.strip()
        key = text.lower()
        if key in NECK_PRESETS:
            return NECK_PRESETS[key], key
        if re.fullmatch(r"[\d\s,]*", text):
            parts = [p for p in text.split(",") if p.strip()]
            channels = tuple(int(p) for p in parts)
        else:
            from .models import canonical_name, get_model_entry

            try:
                name = canonical_name(text)
            except ValueError:
                raise ValueError(
                    f"neck channels {spec!r} are neither comma-separated integers nor a preset "
                    f"({', '.join(NECK_PRESETS)}) or model name") from None
            return tuple(get_model_entry(name).arch_spec["embed_dims"]), name
    else:
        channels = tuple(spec)
    if not channels:
        raise ValueError(f"neck channels {spec!r}: no levels")
    for c in channels:
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"neck channels {spec!r}: every entry must be an integer >= 1")
    return channels, ",".join(str(c) for c in channels)


def neck_feature_shapes(shape: Tuple[int, int], levels: int = 4) -> List[Tuple[int, int]]:
    """Map sizes at strides ``4, 8, 16, ...`` of an input image.

    Args:
        shape: image (H, W).
        levels: number of maps.

    Returns:
        ``[(ceil(H/4), ceil(W/4)), (ceil(H/8), ceil(W/8)), ...]``.
    """
    h, w = shape
    return [(math.ceil(h / 2 ** (i + 2)), math.ceil(w / 2 ** (i + 2))) for i in range(levels)]


def build_neck(name: str, channels: Sequence[int], **kwargs) -> nn.Module:
    """A neck with its default settings (256 output channels; VT-FPN: 8 tokens of 1024
    channels per level, 16 heads, one transformer layer).

    Args:
        name: one of :data:`NECKS`.
        channels: input channels, finest first.
        **kwargs: further arguments of :class:`~rest_dense.models.FPN` /
            :class:`~rest_dense.models.VTFPN`.

    Returns:
        The module, in eval mode.
    """
    from .models import FPN, VTFPN

    cls = {"fpn": FPN, "vt_fpn": VTFPN}[neck_name(name)]
    return cls(list(channels), **kwargs).eval()


def analyze_neck(name: str, channels: Union[str, Sequence[int]] = "resnet50",
                 shape: Optional[Tuple[int, int]] = None, params_only: bool = False,
                 **kwargs) -> AnalysisResult:
    """Parameters and FLOPs of a neck alone, on the maps of one ``H x W`` image.

    Args:
        name: ``'fpn'`` or ``'vt_fpn'`` (``'neck:'`` prefix allowed).
        channels: input channels (see :func:`parse_neck_channels`). Default: ResNet-50's.
        shape: input image (H, W). Default: :data:`NECK_DEFAULT_SHAPE` (800x1216).
        params_only: skip the FLOP count.
        **kwargs: neck arguments (see :func:`build_neck`); a count with any is labelled
            with them and gets no paper figure.

    Returns:
        The :class:`~rest_dense.analysis.AnalysisResult` (``framework='neck'``, target
        ``'neck:<name> (<channels label>)'``), with the VT paper's figure where it reports
        this neck with these channels at this size.
    """
    key = neck_name(name)
    chans, label = parse_neck_channels(channels)
    shape = tuple(shape or NECK_DEFAULT_SHAPE)
    model = build_neck(key, chans, **kwargs)
    target = f"{NECK_PREFIX}{key} ({label})"
    if kwargs:
        target += " " + ", ".join(f"{k}={v!r}" for k, v in sorted(kwargs.items()))
    res = AnalysisResult(target, "neck", shape, count_parameters(model))
    ref = None if kwargs else PAPER_NECK.get((key, chans, *shape))
    if ref is not None:
        res.paper_flops = f"{ref} ({_PAPER_SOURCE[shape]})"
    if params_only:
        return res
    torch.manual_seed(0)
    feats = [torch.randn(1, c, h, w) for c, (h, w) in zip(chans, neck_feature_shapes(shape, len(chans)))]
    res.flops = count_flops(model, (feats,), module_depth=1)
    res.notes.append("maps " + ", ".join(f"{h}x{w}" for _, h, w in
                                         (f.shape[1:] for f in feats)))
    return res
