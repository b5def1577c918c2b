"""VT-FPN (the visual-token FPN neck) as a detectron2 ``Backbone``, and its registered builders.

:class:`D2VTFPN` is a ResT backbone (``bottom_up``) followed by the core
:class:`~rest_dense.models.VTFPN` (``neck``); it emits ``p2..p5`` (named by stride, as
detectron2's ``FPN``; ``p6`` too with one more output), so ``SemanticSegmentor`` +
``SemSegFPNHead`` -- and the FPN heads of ``GeneralizedRCNN`` -- consume it unchanged.

Builders (``MODEL.BACKBONE.NAME``): ``build_restv2_vt_fpn_backbone`` (``MODEL.RESTV2``) and
``build_restv1_vt_fpn_backbone`` (ResTv1, ``MODEL.REST``; also registered as
``build_rest_vt_fpn_backbone``, the spelling of the other ResTv1 builders), both configured by ``MODEL.VT_FPN``
(:func:`rest_dense.d2.config.add_vt_fpn_config`)::

    MODEL:
      META_ARCHITECTURE: "SemanticSegmentor"
      BACKBONE: {NAME: "build_restv2_vt_fpn_backbone"}
      VT_FPN: {IN_FEATURES: ["stage1", "stage2", "stage3", "stage4"], OUT_CHANNELS: 256}
      SEM_SEG_HEAD: {NAME: "SemSegFPNHead", IN_FEATURES: ["p2", "p3", "p4", "p5"]}
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, Backbone
from torch import Tensor

from ..models import VTFPN
from ..models.base import check_flag, check_int
from .backbone import build_rest_backbone, build_restv2_backbone, check_in_features, checks_heads

__all__ = ["D2VTFPN", "vt_fpn_kwargs_from_cfg", "build_restv2_vt_fpn_backbone",
           "build_rest_vt_fpn_backbone", "build_restv1_vt_fpn_backbone"]


def _level_name(stride: int) -> str:
    if stride < 1 or stride & (stride - 1):
        raise ValueError(f"VT-FPN outputs are named p<log2(stride)>, so strides must be powers "
                         f"of 2; got {stride}")
    return f"p{stride.bit_length() - 1}"


class D2VTFPN(Backbone):
    """A detectron2 ``Backbone``: ``bottom_up`` (any backbone, e.g. a ResT) + the core
    :class:`~rest_dense.models.VTFPN` over some of its maps.

    Args:
        bottom_up (Backbone): emits the maps named by ``in_features``.
        in_features (Sequence[str]): maps the neck reads, e.g. ``stage1..stage4``; ordered
            finest first (by stride) whatever the order given.
        out_channels (int): channels of every output. Default: 256.
        num_outs (int, optional): number of outputs; ``None`` = one per input. Each output
            beyond the inputs is a stride-2 max pool of the previous one (``p6`` for Mask
            R-CNN). Default: None.
        **kwargs: the other arguments of :class:`~rest_dense.models.VTFPN`
            (``num_tokens``, ``token_channels``, ``tokenizer``, ``transformer_depth``,
            ``num_heads``, ``pos_encoding``, ``norm_layer``).

    Outputs ``{"p2": ..., "p3": ..., ...}``, named by stride (``p<log2 stride>``), each of
    ``out_channels`` channels; inputs are padded to ``bottom_up.size_divisibility``.

    Raises:
        ValueError: ``in_features`` empty, repeated or not emitted by ``bottom_up``.
    """

    def __init__(self, bottom_up: Backbone, in_features: Sequence[str], out_channels: int = 256,
                 num_outs: Optional[int] = None, **kwargs: Any):
        super().__init__()
        shapes = bottom_up.output_shape()
        if isinstance(in_features, str):
            in_features = [in_features]
        in_features = list(in_features)
        missing = [f for f in in_features if f not in shapes]
        if not in_features or missing or len(set(in_features)) != len(in_features):
            raise ValueError(f"in_features (MODEL.VT_FPN.IN_FEATURES) must be distinct maps of "
                             f"the backbone, which emits {sorted(shapes)}; got {in_features}")
        in_features = sorted(in_features, key=lambda f: shapes[f].stride)
        self.bottom_up = bottom_up
        self.in_features = in_features
        self.neck = VTFPN([shapes[f].channels for f in in_features], out_channels=out_channels,
                          num_outs=num_outs, **kwargs)
        strides = [int(shapes[f].stride) for f in in_features]
        while len(strides) < self.neck.num_outs:
            strides.append(strides[-1] * 2)
        self._out_features = [_level_name(s) for s in strides]
        self._out_feature_strides = dict(zip(self._out_features, strides))
        self._out_feature_channels = {f: int(self.neck.out_channels) for f in self._out_features}

    @property
    def size_divisibility(self) -> int:
        """That of ``bottom_up`` (32 for ResT): the semantic head upsamples every level by
        exact factors of 2 and sums them, so the maps must halve exactly."""
        return self.bottom_up.size_divisibility

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return {"size_divisibility": self.size_divisibility, "square_size": 0}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {f: ShapeSpec(channels=self._out_feature_channels[f],
                             stride=self._out_feature_strides[f]) for f in self._out_features}

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """Args: x: ``(N, C, H, W)`` images. Returns: ``{"p2": ..., ...}`` NCHW maps."""
        feats = self.bottom_up(x)
        outs = self.neck([feats[f] for f in self.in_features])
        return dict(zip(self._out_features, outs))


#: ``MODEL.VT_FPN.NORM`` (detectron2 spellings) -> the core's ``norm_layer``
_D2_NORMS = {"BN": "bn", "bn": "bn", "SyncBN": "syncbn", "syncbn": "syncbn", "LN": "ln",
             "ln": "ln", "none": None}


def vt_fpn_kwargs_from_cfg(cfg: CfgNode) -> Dict[str, Any]:
    """``MODEL.VT_FPN`` as :class:`D2VTFPN` / :class:`~rest_dense.models.VTFPN` arguments
    (everything but ``bottom_up``), each value checked under its key: yacs checks the types
    of merged values only, and a config built in Python could hold ``8.7`` or ``'False'``.

    Raises:
        TypeError / ValueError: naming the key.
    """
    c = cfg.MODEL.VT_FPN

    def count(key: str, low: int = 1) -> int:
        return check_int(c[key], f"MODEL.VT_FPN.{key}", low=low)

    features = c.IN_FEATURES
    if isinstance(features, str) or not isinstance(features, (list, tuple)):
        raise TypeError(f"MODEL.VT_FPN.IN_FEATURES must be a list of backbone maps, got "
                        f"{features!r}")
    if not isinstance(c.TOKENIZER, str):
        raise TypeError(f"MODEL.VT_FPN.TOKENIZER must be a string, got {c.TOKENIZER!r}")
    kwargs: Dict[str, Any] = dict(
        in_features=list(features),
        out_channels=count("OUT_CHANNELS"),
        num_outs=count("NUM_OUTS", low=0) or None,
        num_tokens=count("NUM_TOKENS"),
        token_channels=count("TOKEN_CHANNELS"),
        tokenizer=c.TOKENIZER,
        transformer_depth=count("DEPTH", low=0),
        num_heads=count("NUM_HEADS"),
        pos_encoding=check_flag(c.POS_ENCODING, "MODEL.VT_FPN.POS_ENCODING"),
    )
    if c.NORM != "":
        if not isinstance(c.NORM, str) or c.NORM not in _D2_NORMS:
            raise ValueError(f"MODEL.VT_FPN.NORM must be one of {sorted(_D2_NORMS)} (or \"\": "
                             f"the module's default, BatchNorm), got {c.NORM!r}")
        kwargs["norm_layer"] = _D2_NORMS[c.NORM]
    return kwargs


def _build(cfg: CfgNode, bottom_up: Backbone) -> D2VTFPN:
    kwargs = vt_fpn_kwargs_from_cfg(cfg)
    try:
        return D2VTFPN(bottom_up, **kwargs)
    except (TypeError, ValueError) as err:  # the core names its argument; add the config node
        raise type(err)(f"MODEL.VT_FPN: {err}") from err


_HINT = "MODEL.VT_FPN.IN_FEATURES picks the levels, and MODEL.VT_FPN.NUM_OUTS 5 adds p6"


@BACKBONE_REGISTRY.register()
@checks_heads(_HINT)
def build_restv2_vt_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> D2VTFPN:
    """ResTv2 (``MODEL.RESTV2``) + VT-FPN (``MODEL.VT_FPN``): ``p2..p5`` (+ ``p6`` with
    ``NUM_OUTS: 5``)."""
    check_in_features(cfg, "VT_FPN", "RESTV2")
    return _build(cfg, build_restv2_backbone(cfg, input_shape))


@BACKBONE_REGISTRY.register()
@checks_heads(_HINT)
def build_rest_vt_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> D2VTFPN:
    """ResTv1 (``MODEL.REST``) + VT-FPN (``MODEL.VT_FPN``)."""
    check_in_features(cfg, "VT_FPN", "REST")
    return _build(cfg, build_rest_backbone(cfg, input_shape))


@BACKBONE_REGISTRY.register()
@checks_heads(_HINT)
def build_restv1_vt_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> D2VTFPN:
    """:func:`build_rest_vt_fpn_backbone` under the name that matches the ResTv2 builder."""
    return build_rest_vt_fpn_backbone(cfg, input_shape)
