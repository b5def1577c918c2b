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

Whole models with and without the neck (ResTv2-T + UperNet, + semantic FPN, + VT-FPN; the
shipped ADE20K configs), split into backbone / neck / head, with the neck counted alone beside
it::

    from rest_dense.neck_analysis import analyze_whole_models
    for row in analyze_whole_models([(512, 512)]):
        print(row.label, row.total / 1e9, row.neck / 1e9, row.neck_alone / 1e9)
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .analysis import AnalysisResult, count_flops, count_parameters

__all__ = ["NECKS", "NECK_PREFIX", "NECK_PRESETS", "NECK_DEFAULT_SHAPE", "PAPER_NECK",
           "is_neck_target", "neck_name", "parse_neck_channels", "neck_feature_shapes",
           "build_neck", "analyze_neck", "WHOLE_MODELS", "WHOLE_MODEL_SHAPES",
           "WholeModelFlops", "analyze_whole_model", "analyze_whole_models"]

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


# ------------------------------------------------------------------ whole models
#: the whole models of the VT-FPN comparison, ``(label, shipped config)``: the same ResTv2-T
#: backbone under UperNet, a semantic FPN (FPN neck + mmseg ``FPNHead``) and VT-FPN (the FPN
#: neck replaced, the same ``FPNHead``)
WHOLE_MODELS: Tuple[Tuple[str, str], ...] = (
    ("ResTv2-T + UperNet", "upernet/upernet_restv2-t_8xb2-160k_ade20k-512x512.py"),
    ("ResTv2-T + semantic FPN", "sem_fpn/fpn_restv2-t_8xb2-160k_ade20k-512x512.py"),
    ("ResTv2-T + VT-FPN", "sem_fpn/vt-fpn_restv2-t_8xb2-160k_ade20k-512x512.py"),
)
#: the sizes of the whole-model comparison: an ADE20K crop, and mmseg's "2048x512"
#: (the size of the ResTv2 paper's UperNet figures)
WHOLE_MODEL_SHAPES: Tuple[Tuple[int, int], ...] = ((512, 512), (512, 2048))
#: mmseg / mmdet neck types -> :data:`NECKS`
_MM_NECKS = {"FPN": "fpn", "VTFPN": "vt_fpn"}


@dataclass
class WholeModelFlops:
    """One whole model at one size, split into its parts (FLOPs are fvcore multiply-adds).

    Attributes:
        label: e.g. ``'ResTv2-T + VT-FPN'``.
        config: the shipped config name.
        shape: input (H, W).
        params: parameters of the model (without the auxiliary head's, as counted).
        backbone_params: parameters of the backbone.
        total: FLOPs of the whole model (inference, one image, no auxiliary head, logits at
            stride 4: mmseg's ``_forward``, as ``rest-dense flops`` counts it).
        backbone: FLOPs of the backbone module.
        neck: FLOPs of the neck module inside the model; None for a model without one
            (UperNet).
        head: FLOPs of the rest: the decode head, with the resizes mmseg calls as functions
            (fvcore attributes those to no module), so that backbone + neck + head = total.
        neck_name: ``'fpn'`` / ``'vt_fpn'``; None without a neck.
        neck_alone: FLOPs of the same neck counted alone
            (:func:`analyze_neck` with the config's input channels at ``shape``); None without.
        result: the full :class:`~rest_dense.analysis.AnalysisResult` of the model.
    """

    label: str
    config: str
    shape: Tuple[int, int]
    params: int
    backbone_params: int
    total: int
    backbone: int
    neck: Optional[int]
    head: int
    neck_name: Optional[str]
    neck_alone: Optional[int]
    result: AnalysisResult

    @property
    def decoder(self) -> int:
        """FLOPs of everything after the backbone (neck and head)."""
        return self.total - self.backbone


def _neck_defaults(key: str, levels: int) -> Dict[str, object]:
    """The keyword defaults of a neck class (``num_outs`` None read as ``levels``)."""
    import inspect

    from .models import FPN, VTFPN

    cls = {"fpn": FPN, "vt_fpn": VTFPN}[key]
    out = {name: p.default for name, p in inspect.signature(cls).parameters.items()
           if p.default is not inspect.Parameter.empty}
    if out.get("num_outs") is None:
        out["num_outs"] = levels
    return out


def analyze_whole_model(config: str, shape: Tuple[int, int], label: Optional[str] = None,
                        cache=None) -> WholeModelFlops:
    """Count an MMSegmentation encoder-decoder config and split it into backbone / neck / head.

    Args:
        config: config file or shipped config name.
        shape: input (H, W).
        label: name for tables (default: the config's name).
        cache: a :class:`~rest_dense.analysis.CountCache` shared between calls.

    Returns:
        The :class:`WholeModelFlops`, with the neck also counted alone (default settings of
        :func:`build_neck`, the config's ``in_channels``) when the model has an FPN or VT-FPN
        neck.

    Raises:
        ValueError: the config's neck is another type, or sets options the neck-alone count
            does not (its count would not be comparable).
    """
    from .analysis import analyze_config
    from .configs import get_config_path, read_mm_config

    path = get_config_path(config)
    res = analyze_config(path, tuple(shape), cache=cache)
    mods = res.flops.by_module
    neck_cfg = read_mm_config(path).model.get("neck")
    neck = mods.get("model.neck") if neck_cfg is not None else None
    backbone = mods["model.backbone"]
    key = alone = None
    if neck_cfg is not None:
        kind = str(neck_cfg.get("type", "")).split(".")[-1]
        if kind not in _MM_NECKS:
            raise ValueError(f"{res.target}: neck type {kind!r} has no neck-alone count "
                             f"(one of {', '.join(_MM_NECKS)})")
        key = _MM_NECKS[kind]
        chans = list(neck_cfg["in_channels"])
        for opt, value in _neck_defaults(key, len(chans)).items():
            if opt in neck_cfg and neck_cfg[opt] != value:
                raise ValueError(f"{res.target}: neck {opt}={neck_cfg[opt]!r} differs from the "
                                 f"neck-alone default {value!r}")
        alone = analyze_neck(key, chans, tuple(shape)).flops.total
    total = res.flops.total
    return WholeModelFlops(label or res.target, res.target, tuple(shape), res.params,
                           res.backbone_params, total, backbone, neck,
                           total - backbone - (neck or 0), key, alone, res)


def analyze_whole_models(shapes: Sequence[Tuple[int, int]] = WHOLE_MODEL_SHAPES,
                         models: Sequence[Tuple[str, str]] = WHOLE_MODELS
                         ) -> List[WholeModelFlops]:
    """:func:`analyze_whole_model` for every model at every size (size-major order).

    Args:
        shapes: input sizes (default :data:`WHOLE_MODEL_SHAPES`: 512x512, 512x2048).
        models: ``(label, config)`` pairs (default :data:`WHOLE_MODELS`).

    Returns:
        One :class:`WholeModelFlops` per size and model.
    """
    from .analysis import CountCache

    cache = CountCache()
    return [analyze_whole_model(cfg, shape, label, cache=cache)
            for shape in shapes for label, cfg in models]
