"""detectron2 ``Backbone`` adapters over the core ResT models, and registered builders.

The adapters *are* the core models (subclasses), so a Mask R-CNN built with
``build_restv2_fpn_backbone`` has the parameter names of the authors' detectron2
checkpoints: ``backbone.bottom_up.stem.proj.0.weight``, ``backbone.bottom_up.stage3.0...``.
"""
from __future__ import annotations

import functools
import warnings

from typing import Dict, List, Mapping, Sequence, Union

from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7
from torch import Tensor

from ..models import STAGE_STRIDES, ResTv1, ResTv2
from ..models.base import ConfigWarning, check_flag, check_int
from .config import rest_arch_from_cfg, restv2_arch_from_cfg

__all__ = [
    "D2ResTv2", "D2ResTv1", "build_restv2_backbone", "build_restv2_fpn_backbone",
    "build_retinanet_restv2_fpn_backbone", "build_rest_backbone", "build_rest_fpn_backbone",
    "build_retinanet_rest_fpn_backbone", "freeze_at_to_frozen_stages", "check_head_features",
    "checks_heads", "check_in_features", "HEAD_FEATURE_NODES",
]

_STAGE_NAMES = tuple(f"stage{i + 1}" for i in range(len(STAGE_STRIDES)))


def _out_indices(out_features: Sequence[str]) -> List[int]:
    if isinstance(out_features, str):
        out_features = [out_features]
    bad = [f for f in out_features if f not in _STAGE_NAMES]
    if bad or not out_features:
        raise ValueError(f"out_features must be a non-empty subset of {list(_STAGE_NAMES)}, "
                         f"got {list(out_features)}")
    return sorted({_STAGE_NAMES.index(f) for f in out_features})


class _D2BackboneMixin:
    """detectron2 ``Backbone`` interface on top of a :class:`~rest_dense.models.base.ResTBase`."""

    def _setup_d2(self, size_divisibility: int) -> None:
        # detectron2's Backbone attributes, read from the core's description of its outputs
        self._out_features = [f.name for f in self.feature_info]
        self._out_feature_strides = {f.name: f.stride for f in self.feature_info}
        self._out_feature_channels = {f.name: f.channels for f in self.feature_info}
        # 0: no padding (detectron2's meaning)
        self._size_divisibility = check_int(size_divisibility, "size_divisibility", low=0)

    @property
    def size_divisibility(self) -> int:
        """Inputs are padded to a multiple of this (32: an FPN on top needs maps that halve
        exactly; the backbone itself accepts any size)."""
        return self._size_divisibility

    @property
    def padding_constraints(self) -> Dict[str, int]:
        """Padding requirements in the form newer detectron2 versions query."""
        return {"size_divisibility": self._size_divisibility, "square_size": 0}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        """``{stageN: ShapeSpec(channels, stride)}`` for the emitted stages."""
        return {name: ShapeSpec(channels=self._out_feature_channels[name],
                                stride=self._out_feature_strides[name])
                for name in self._out_features}

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """Args: x: ``(N, C, H, W)`` images. Returns: ``{"stage1": ..., ...}`` NCHW maps."""
        outs = super().forward(x)
        return dict(zip(self._out_features, outs))


class D2ResTv2(_D2BackboneMixin, ResTv2, Backbone):
    """:class:`~rest_dense.models.ResTv2` as a detectron2 ``Backbone``.

    Emits ``stage1..stage4`` (strides 4, 8, 16, 32; channels = the arch's ``embed_dims``).

    Args:
        arch (str | dict): core variant name or arch dict (see :class:`ResTv2`).
        out_features (Sequence[str]): subset of ``stage1..stage4``. Default: all four.
        size_divisibility (int): padding the model's ``ImageList`` applies. Default: 32.
        **kwargs: any other :class:`ResTv2` argument (``drop_path_rate``, ``attn_mode``,
            ``window_size``, ``frozen_stages``, ``norm_eval``, ``with_cp``, ...).
    """

    def __init__(self, arch: Union[str, Mapping] = "tiny", out_features: Sequence[str] = _STAGE_NAMES,
                 size_divisibility: int = 32, **kwargs):
        super().__init__(arch=arch, out_indices=_out_indices(out_features), **kwargs)
        self._setup_d2(size_divisibility)


class D2ResTv1(_D2BackboneMixin, ResTv1, Backbone):
    """:class:`~rest_dense.models.ResTv1` as a detectron2 ``Backbone``.

    Args:
        arch (str | dict): core variant name or arch dict (see :class:`ResTv1`).
        out_features (Sequence[str]): subset of ``stage1..stage4``. Default: all four.
        size_divisibility (int): padding the model's ``ImageList`` applies. Default: 32.
        **kwargs: any other :class:`ResTv1` argument.
    """

    def __init__(self, arch: Union[str, Mapping] = "small", out_features: Sequence[str] = _STAGE_NAMES,
                 size_divisibility: int = 32, **kwargs):
        super().__init__(arch=arch, out_indices=_out_indices(out_features), **kwargs)
        self._setup_d2(size_divisibility)


def freeze_at_to_frozen_stages(freeze_at: int) -> int:
    """detectron2's ``MODEL.BACKBONE.FREEZE_AT`` (0 nothing, 1 stem, 2 stem + stage1, ...,
    5 everything) as the core models' ``frozen_stages`` (-1 nothing, 0 stem, k stem + 1..k)."""
    return check_int(freeze_at, "MODEL.BACKBONE.FREEZE_AT (0..5 for ResT backbones)", 0, 5) - 1


# ------------------------------------------------------------------ the maps the heads read
#: META_ARCHITECTURE -> the config nodes whose ``IN_FEATURES`` name backbone maps
HEAD_FEATURE_NODES: Dict[str, tuple] = {
    "GeneralizedRCNN": ("RPN", "ROI_HEADS"),
    "ProposalNetwork": ("RPN",),
    "RetinaNet": ("RETINANET",),
    "SemanticSegmentor": ("SEM_SEG_HEAD",),
    "PanopticFPN": ("RPN", "ROI_HEADS", "SEM_SEG_HEAD"),
}
#: attributes of a built model that hold the names of the maps its heads read
_MODEL_HEAD_READS = ("proposal_generator.in_features", "roi_heads.in_features",
                     "sem_seg_head.in_features", "head_in_features")


def _cfg_head_reads(cfg: CfgNode) -> Dict[str, List[str]]:
    nodes = HEAD_FEATURE_NODES.get(cfg.MODEL.META_ARCHITECTURE, ())
    proposals = cfg.MODEL.get("PROPOSAL_GENERATOR", {}).get("NAME", "RPN")
    return {f"MODEL.{n}.IN_FEATURES": list(cfg.MODEL[n].IN_FEATURES)
            for n in nodes if n in cfg.MODEL and "IN_FEATURES" in cfg.MODEL[n]
            and (n != "RPN" or proposals in ("RPN", "RRPN"))}  # precomputed: reads nothing


def _model_head_reads(model) -> Dict[str, List[str]]:
    reads = {}
    for path in _MODEL_HEAD_READS:
        value = model
        for part in path.split("."):
            value = getattr(value, part, None)
        if isinstance(value, Sequence) and not isinstance(value, str):  # also ListConfig
            reads[f"model.{path}"] = list(value)
    return reads


def check_head_features(backbone: Backbone, reads, hint: str = "") -> None:
    """Refuse, when the model is built, heads that read maps the backbone does not give
    (detectron2 would fail at the first forward with a bare ``KeyError: 'p6'``). The yacs
    builders call it when they are ``MODEL.BACKBONE.NAME``: their config describes the
    whole model, heads included (:func:`checks_heads`).

    Args:
        backbone: the built backbone (its ``output_shape()`` names what it gives).
        reads: a yacs ``CfgNode`` (the heads' ``IN_FEATURES`` of its ``META_ARCHITECTURE``),
            a built model (its heads' ``in_features``), or ``{owner: [names]}``.
        hint: the setting that changes what the backbone gives, added to the message.

    Raises:
        ValueError: naming the head's setting, the missing maps and those given.
    """
    if isinstance(reads, CfgNode):
        reads = _cfg_head_reads(reads)
    elif not isinstance(reads, Mapping):
        reads = _model_head_reads(reads)
    given = list(backbone.output_shape())
    for owner, names in reads.items():
        missing = [n for n in names if n not in given]
        if missing:
            raise ValueError(f"{owner} {list(names)} reads {missing}, which the backbone does "
                             f"not give (it gives {given})" + (f"; {hint}" if hint else ""))


def checks_heads(hint: str):
    """Decorator for a registered backbone builder: when it is the model's own
    (``MODEL.BACKBONE.NAME``, so its config describes the whole model), the heads' maps are
    checked against what it built (:func:`check_head_features`, ``hint`` naming the setting
    that changes them). Called as a part of another builder, which may add maps of its
    own, it checks nothing."""
    def wrap(builder):
        @functools.wraps(builder)
        def build(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
            backbone = builder(cfg, input_shape)
            if cfg.MODEL.BACKBONE.NAME == builder.__name__:
                check_head_features(backbone, cfg, hint)
            return backbone
        return build
    return wrap


_FPN_HINT = ("MODEL.FPN.IN_FEATURES picks the levels; the build_*_fpn_backbone builders add "
             "p6 by max-pooling, the build_retinanet_*_fpn_backbone builders p6 and p7")


#: the inputs the ResT ImageNet weights were trained on (configs/detectron2/Base-ResT-Recipe.yaml)
IMAGENET_INPUT = dict(FORMAT="RGB", PIXEL_MEAN=[123.675, 116.28, 103.53],
                      PIXEL_STD=[58.395, 57.12, 57.375])


def warn_on_caffe_inputs(cfg: CfgNode) -> None:
    """Warn when pretrained weights meet detectron2's caffe-style ResNet inputs (BGR, std 1),
    which a config built on a ResNet one keeps unless it sets them: the ResT weights were
    trained on RGB images normalised with ImageNet's mean and std."""
    if not str(cfg.MODEL.get("WEIGHTS", "") or ""):
        return
    fmt, std = cfg.INPUT.get("FORMAT", "BGR"), list(cfg.MODEL.get("PIXEL_STD", []))
    if fmt != "RGB" or (std and max(std) <= 2.0):
        warnings.warn(
            f"MODEL.WEIGHTS is given and the inputs are INPUT.FORMAT {fmt}, MODEL.PIXEL_STD "
            f"{std} (detectron2's caffe-style ResNet settings?); the ResT weights were trained "
            f"on {IMAGENET_INPUT['FORMAT']} images with PIXEL_MEAN {IMAGENET_INPUT['PIXEL_MEAN']}"
            f" and PIXEL_STD {IMAGENET_INPUT['PIXEL_STD']} (_BASE_: Base-ResT-Recipe.yaml sets "
            "them)", ConfigWarning, stacklevel=2)


# --------------------------------------------------------------------------------- builders
@BACKBONE_REGISTRY.register()
@checks_heads("MODEL.RESTV2.OUT_FEATURES picks the stages")
def build_restv2_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> D2ResTv2:
    """ResTv2 from ``MODEL.RESTV2`` and ``MODEL.BACKBONE.FREEZE_AT``."""
    warn_on_caffe_inputs(cfg)
    c = cfg.MODEL.RESTV2
    window = list(c.WINDOW_SIZE)
    return D2ResTv2(
        arch=restv2_arch_from_cfg(cfg),
        in_channels=input_shape.channels,
        out_features=c.OUT_FEATURES,
        drop_path_rate=c.DROP_PATH_RATE,
        attn_mode=c.ATTN_MODE,
        window_size=window[0] if len(window) == 1 else window,
        frozen_stages=freeze_at_to_frozen_stages(cfg.MODEL.BACKBONE.FREEZE_AT),
        norm_eval=c.NORM_EVAL,
        with_cp=c.CP_LEVEL or c.WITH_CP,
        fast_paths=_fast_paths(c),
    )


@BACKBONE_REGISTRY.register()
@checks_heads("MODEL.REST.OUT_FEATURES picks the stages")
def build_rest_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> D2ResTv1:
    """ResTv1 from ``MODEL.REST`` and ``MODEL.BACKBONE.FREEZE_AT``."""
    warn_on_caffe_inputs(cfg)
    c = cfg.MODEL.REST
    return D2ResTv1(
        arch=rest_arch_from_cfg(cfg),
        in_channels=input_shape.channels,
        out_features=c.OUT_FEATURES,
        drop_path_rate=c.DROP_PATH_RATE,
        frozen_stages=freeze_at_to_frozen_stages(cfg.MODEL.BACKBONE.FREEZE_AT),
        norm_eval=c.NORM_EVAL,
        with_cp=c.CP_LEVEL or c.WITH_CP,
        fast_paths=_fast_paths(c),
    )


def _fast_paths(node: CfgNode) -> bool:
    """``FAST_PATHS``, switched off by the deprecated ``FUSED_ATTN: False`` too."""
    if not check_flag(node.FUSED_ATTN, "MODEL.*.FUSED_ATTN"):
        warnings.warn("MODEL.*.FUSED_ATTN is deprecated; use FAST_PATHS", DeprecationWarning,
                      stacklevel=2)
        return False
    return check_flag(node.FAST_PATHS, "MODEL.*.FAST_PATHS")


def check_in_features(cfg: CfgNode, neck: str, key: str) -> None:
    """``MODEL.<neck>.IN_FEATURES`` must name maps that ``MODEL.<key>.OUT_FEATURES`` emits
    (checked before anything is built, under both keys).

    Raises:
        TypeError: not a list.
        ValueError: an empty list, or names of maps the backbone does not emit.
    """
    wanted = cfg.MODEL[neck].IN_FEATURES
    if isinstance(wanted, str) or not isinstance(wanted, (list, tuple)):
        raise TypeError(f"MODEL.{neck}.IN_FEATURES must be a list of backbone maps, got "
                        f"{wanted!r}")
    wanted = list(wanted)
    emitted = list(cfg.MODEL[key].OUT_FEATURES)
    if not wanted:
        raise ValueError(f"MODEL.{neck}.IN_FEATURES is empty; name maps of "
                         f"MODEL.{key}.OUT_FEATURES {emitted}")
    missing = [f for f in wanted if f not in emitted]
    if missing:
        raise ValueError(f"MODEL.{neck}.IN_FEATURES {wanted} reads {missing}, which "
                         f"MODEL.{key}.OUT_FEATURES {emitted} does not emit")
    if neck == "FPN":  # detectron2's FPN: strides from fine to coarse, each twice the last
        stages = [_STAGE_NAMES.index(f) for f in wanted]
        if stages != list(range(stages[0], stages[0] + len(stages))):
            raise ValueError(f"MODEL.FPN.IN_FEATURES {wanted} must be consecutive stages from "
                             "fine to coarse, e.g. ['stage2', 'stage3', 'stage4']")


def _fpn(cfg: CfgNode, bottom_up: Backbone, top_block) -> FPN:
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


def _max_pool(cfg: CfgNode, bottom_up: Backbone) -> LastLevelMaxPool:
    # P6 by max-pooling the FPN's coarsest level; detectron2's default reads 'p5', which
    # only exists when the FPN takes stage4 (e.g. not with IN_FEATURES stage1..stage3)
    top = LastLevelMaxPool()
    stride = max(bottom_up.output_shape()[f].stride for f in cfg.MODEL.FPN.IN_FEATURES)
    top.in_feature = f"p{stride.bit_length() - 1}"
    return top


def _p6p7(cfg: CfgNode, bottom_up: Backbone) -> LastLevelP6P7:
    # P6/P7 from the last backbone map the FPN uses (C5), as detectron2's RetinaNet ResNet builder
    last = cfg.MODEL.FPN.IN_FEATURES[-1]
    return LastLevelP6P7(bottom_up.output_shape()[last].channels, cfg.MODEL.FPN.OUT_CHANNELS,
                         in_feature=last)


@BACKBONE_REGISTRY.register()
@checks_heads(_FPN_HINT)
def build_restv2_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """ResTv2 + FPN (``MODEL.FPN``) + ``LastLevelMaxPool`` (P2-P6), as for Mask R-CNN."""
    check_in_features(cfg, "FPN", "RESTV2")
    bottom_up = build_restv2_backbone(cfg, input_shape)
    return _fpn(cfg, bottom_up, _max_pool(cfg, bottom_up))


@BACKBONE_REGISTRY.register()
@checks_heads(_FPN_HINT)
def build_retinanet_restv2_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """ResTv2 + FPN + ``LastLevelP6P7`` on the last input map (P3-P7 with
    ``FPN.IN_FEATURES = [stage2, stage3, stage4]``), as for RetinaNet."""
    check_in_features(cfg, "FPN", "RESTV2")
    bottom_up = build_restv2_backbone(cfg, input_shape)
    return _fpn(cfg, bottom_up, _p6p7(cfg, bottom_up))


@BACKBONE_REGISTRY.register()
@checks_heads(_FPN_HINT)
def build_rest_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """ResTv1 + FPN + ``LastLevelMaxPool``."""
    check_in_features(cfg, "FPN", "REST")
    bottom_up = build_rest_backbone(cfg, input_shape)
    return _fpn(cfg, bottom_up, _max_pool(cfg, bottom_up))


@BACKBONE_REGISTRY.register()
@checks_heads(_FPN_HINT)
def build_retinanet_rest_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """ResTv1 + FPN + ``LastLevelP6P7``, as for RetinaNet."""
    check_in_features(cfg, "FPN", "REST")
    bottom_up = build_rest_backbone(cfg, input_shape)
    return _fpn(cfg, bottom_up, _p6p7(cfg, bottom_up))
