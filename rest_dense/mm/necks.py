"""OpenMMLab-facing VT-FPN neck: the core :class:`~rest_dense.models.VTFPN` plus mmengine's
``init_cfg`` contract.

Registered as ``'VTFPN'`` in MMDetection's and MMSegmentation's ``MODELS`` by
``import rest_dense.mm``. Every architectural argument goes straight to the core module
(one model for every toolbox); the adapter only adds ``init_cfg`` / ``init_weights`` and a
check, at build time, of the arguments that come from the rest of the config.

MMSegmentation (semantic FPN with the convolutions of its neck replaced by visual tokens)::

    neck=dict(type='VTFPN', in_channels=[96, 192, 384, 768], out_channels=256),
    decode_head=dict(type='FPNHead', in_channels=[256] * 4, in_index=[0, 1, 2, 3],
                     feature_strides=[4, 8, 16, 32], ...)

MMDetection (Mask R-CNN needs a fifth, coarser level: ``num_outs=5`` max-pools the last)::

    neck=dict(type='VTFPN', in_channels=[96, 192, 384, 768], out_channels=256, num_outs=5)
"""
from __future__ import annotations

import copy
import logging
from typing import Any, List, Mapping, Optional, Sequence, Tuple

from mmengine.logging import print_log
from mmengine.model import BaseModule, initialize

from ..models import VTFPN
from .backbones import InitCfg, init_cfg_entries

__all__ = ["MMVTFPN", "check_neck_levels"]


#: mmdet ``FPN`` arguments that VT-FPN has no equivalent for, with what to do instead
_FPN_ONLY = {
    "start_level": "give only the levels the neck should use in in_channels and the "
                   "backbone's out_indices",
    "end_level": "give only the levels the neck should use in in_channels and the "
                 "backbone's out_indices",
    "add_extra_convs": "VT-FPN adds coarser levels by stride-2 max pooling (num_outs); "
                       "use mmdet's FPN for strided-conv extra levels",
    "relu_before_extra_convs": "VT-FPN adds coarser levels by max pooling (num_outs)",
    "no_norm_on_lateral": "VT-FPN's lateral 1x1 convs are plain convs",
    "conv_cfg": "VT-FPN's convolutions are plain nn.Conv2d",
    "act_cfg": "VT-FPN has no activation option",
    "upsample_cfg": "VT-FPN has no top-down upsampling path (tokens carry information "
                    "between levels)",
}

#: ``norm_cfg['type']`` (mmengine spelling) -> the core's ``norm_layer``
_NORM_TYPES = {"BN": "bn", "BN1d": "bn", "SyncBN": "syncbn", "MMSyncBN": "syncbn", "LN": "ln"}


def _norm_layer_from_cfg(norm_cfg: Any) -> Optional[str]:
    if norm_cfg is None:
        return None
    norm_type = norm_cfg.get("type") if isinstance(norm_cfg, Mapping) else None
    if norm_type not in _NORM_TYPES:
        raise ValueError(f"VTFPN norm_cfg must be None or dict(type=...) with type one of "
                         f"{sorted(_NORM_TYPES)}, got {norm_cfg!r}")
    extra = sorted(set(norm_cfg) - {"type", "requires_grad"})
    if extra or norm_cfg.get("requires_grad", True) is not True:
        raise ValueError(f"VTFPN norm_cfg takes only 'type' (and requires_grad=True), got "
                         f"{norm_cfg!r}")
    return _NORM_TYPES[norm_type]


class MMVTFPN(VTFPN, BaseModule):
    """:class:`~rest_dense.models.VTFPN` for MMDetection / MMSegmentation configs
    (registered there as ``'VTFPN'``).

    Args:
        in_channels (Sequence[int]): channels of the backbone maps the neck reads, finest
            first (the backbone's ``out_channels`` for its ``out_indices``).
        init_cfg (dict | list[dict], optional): mmengine initialisers applied after the
            core's own initialisation, e.g. ``dict(type='Pretrained',
            checkpoint='vtfpn.pth', prefix='neck.')``. Default: None.
        norm_cfg (dict, optional): the token-path norm in mmengine's spelling, instead of
            ``norm_layer``: ``dict(type='BN' | 'SyncBN' | 'LN')`` or None (no norm). BN
            becomes SyncBN under mmengine's ``sync_bn`` setting, as any BatchNorm.
        **kwargs: every other argument of :class:`~rest_dense.models.VTFPN`
            (``out_channels``, ``num_tokens``, ``token_channels``, ``num_outs``,
            ``tokenizer``, ``transformer_depth``, ``num_heads``, ``pos_encoding``,
            ``norm_layer``), passed unchanged.

    Raises:
        TypeError: an argument of mmdet's / mmseg's ``FPN`` that VT-FPN does not have
            (``add_extra_convs``, ``start_level``, ``norm_cfg``, ...), with what to use instead.
    """

    def __init__(self, in_channels: Sequence[int], init_cfg: InitCfg = None, **kwargs: Any):
        if "norm_cfg" in kwargs:
            if "norm_layer" in kwargs:
                raise TypeError("VTFPN takes norm_cfg (mmengine spelling) or norm_layer (the "
                                "core's), not both")
            kwargs["norm_layer"] = _norm_layer_from_cfg(kwargs.pop("norm_cfg"))
        fpn_only = sorted(k for k in kwargs if k in _FPN_ONLY)
        if fpn_only:
            raise TypeError("VTFPN does not take " + "; ".join(
                f"{k!r} ({_FPN_ONLY[k]})" for k in fpn_only))
        init_cfg_entries(init_cfg, "VTFPN")
        super().__init__(in_channels=in_channels, **kwargs)  # the core initialises its weights
        self.init_cfg = copy.deepcopy(init_cfg)
        self._built = True

    def init_weights(self) -> None:
        """The core's initialisation, then the ``init_cfg`` initialisers (a ``Pretrained``
        entry therefore wins). Runs once: later calls only warn, so loaded weights are never
        overwritten by a parent module's ``init_weights``."""
        if not getattr(self, "_built", False):  # the core constructor's own call
            VTFPN.init_weights(self)
            return
        if self._is_init:
            print_log(f"init_weights of {type(self).__name__} has been called more than once; "
                      "ignored", logger="current", level=logging.WARNING)
            return
        VTFPN.init_weights(self)
        if self.init_cfg:
            initialize(self, copy.deepcopy(self.init_cfg))
        self._is_init = True


def _levels_read(model) -> List[Tuple[str, int]]:
    """``(what, number of neck levels it reads)`` for the heads of an mmdet / mmseg model."""
    found: List[Tuple[str, int]] = []
    for name in ("rpn_head", "bbox_head"):
        head = getattr(model, name, None)
        gen = getattr(head, "prior_generator", None)
        if gen is not None and hasattr(gen, "strides"):
            strides = [s[0] if isinstance(s, (tuple, list)) else s for s in gen.strides]
            found.append((f"{name}'s anchor generator (strides {strides})", len(gen.strides)))
    roi = getattr(model, "roi_head", None)
    for name in ("bbox_roi_extractor", "mask_roi_extractor"):
        ext = getattr(roi, name, None)
        strides = getattr(ext, "featmap_strides", None)
        if strides is not None:
            found.append((f"roi_head.{name} (featmap_strides {list(strides)})", -len(strides)))
    for name in ("decode_head", "auxiliary_head"):
        heads = getattr(model, name, None)
        for head in (heads if isinstance(heads, (list, tuple)) or
                     type(heads).__name__ == "ModuleList" else [heads]):
            index = getattr(head, "in_index", None)
            if index is not None:
                idx = list(index) if isinstance(index, (list, tuple)) else [index]
                found.append((f"{name}.in_index {idx}", -(max(idx) + 1)))
    return found


def check_neck_levels(model) -> None:
    """Refuse a model whose heads read another number of levels than its neck emits
    (``neck.num_outs``), naming both, instead of mmdet's bare ``AssertionError`` in the
    anchor head (or an ``IndexError``) at the first training step.

    Heads with an anchor generator (RPN, RetinaNet) need exactly ``num_outs`` levels; RoI
    extractors and mmseg heads need at least as many as they index.

    Raises:
        ValueError: the neck's ``num_outs`` does not fit a head.
    """
    model = getattr(model, "module", model)  # TTA / DDP wrappers
    neck = getattr(model, "neck", None)
    if type(neck).__name__ == "Sequential" and len(neck):
        neck = neck[-1]
    num_outs = getattr(neck, "num_outs", None)
    if not isinstance(num_outs, int):
        return
    for what, n in _levels_read(model):
        if (n > 0 and n != num_outs) or (n < 0 and -n > num_outs):
            need = n if n > 0 else f"at least {-n}"
            raise ValueError(
                f"model.neck ({type(neck).__name__}) emits num_outs={num_outs} levels, but "
                f"{what} needs {need}; set model.neck.num_outs={abs(n)}"
                + (" (VT-FPN adds the extra coarser levels by stride-2 max pooling)"
                   if isinstance(neck, VTFPN) else ""))
