"""MMDetection / MMSegmentation integration (needs mmengine).

Importing this package registers

- ``'ResTv2'`` and ``'ResTv1'`` (backbones) and ``'VTFPN'`` (the visual-token FPN neck,
  :class:`~rest_dense.mm.necks.MMVTFPN`) in ``MODELS`` of MMDetection and of MMSegmentation,
- ``'ResTLayerDecayOptimizerConstructor'`` in ``OPTIM_WRAPPER_CONSTRUCTORS`` of mmengine,
  MMDetection and MMSegmentation,
- ``'BF16OptimWrapper'`` (bf16 mixed precision without loss scaling, CPU too) in
  mmengine's ``OPTIM_WRAPPERS``, which both frameworks' registries search,

for whichever of the two frameworks is installed, so configs can use
``custom_imports=dict(imports=['rest_dense.mm'], allow_failed_imports=False)``.
A name already registered there by another package is an error, not a silent
replacement.
"""
from __future__ import annotations

import importlib
from typing import Dict, List

from mmengine.registry import HOOKS as _ENGINE_HOOKS
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS as _ENGINE_CONSTRUCTORS

from .backbones import MMResTv1, MMResTv2, load_pretrained_cfg
from .hooks import BroadcastBuffersHook
from .necks import MMVTFPN
from .optim import ResTLayerDecayOptimizerConstructor, stage_lr_scales
from ..configs import install_config_scope
from .utils import register_once
from .safe_load import install_checkpoint_loader, trust_checkpoints

__all__ = ["MMResTv2", "MMResTv1", "MMVTFPN", "ResTLayerDecayOptimizerConstructor", "stage_lr_scales",
           "load_pretrained_cfg", "trust_checkpoints", "install_checkpoint_loader", "train", "test",
           "REGISTERED", "UNAVAILABLE"]

_BACKBONES = {"ResTv2": MMResTv2, "ResTv1": MMResTv1}
_NECKS = {"VTFPN": MMVTFPN}

#: frameworks the backbones were registered with, e.g. ``['mmdet', 'mmseg']``
REGISTERED: List[str] = []
#: frameworks that could not be imported, with the reason
UNAVAILABLE: Dict[str, str] = {}





install_config_scope()  # _base_ = 'rest_dense::NAME'
register_once(_ENGINE_HOOKS, "RestBroadcastBuffersHook", BroadcastBuffersHook)
register_once(_ENGINE_CONSTRUCTORS, "ResTLayerDecayOptimizerConstructor",
          ResTLayerDecayOptimizerConstructor)

for _framework in ("mmdet", "mmseg"):
    try:
        _registry = importlib.import_module(f"{_framework}.registry")
    except ImportError as _err:  # framework not installed (or unusable): skip it
        UNAVAILABLE[_framework] = f"{type(_err).__name__}: {_err}"
        continue
    for _name, _cls in {**_BACKBONES, **_NECKS}.items():
        register_once(_registry.MODELS, _name, _cls)
    register_once(_registry.OPTIM_WRAPPER_CONSTRUCTORS, "ResTLayerDecayOptimizerConstructor",
              ResTLayerDecayOptimizerConstructor)
    REGISTERED.append(_framework)

from .runner import test, train  # noqa: E402  (after registration: the runner builds models)
from .._moved import module_getattr as _module_getattr  # noqa: E402

__getattr__ = _module_getattr(__name__)  # old submodule names (rest_dense._moved)
