"""MMDetection / MMSegmentation integration (needs mmengine).

Importing this package (``import rest_dense`` does it) registers

- ``'ResTv2'`` and ``'ResTv1'`` in ``MODELS`` of MMDetection and of MMSegmentation,
- ``'ResTLayerDecayOptimizerConstructor'`` in ``OPTIM_WRAPPER_CONSTRUCTORS`` of mmengine,
  MMDetection and MMSegmentation,

for whichever of the two frameworks is installed, so configs can use
``custom_imports=dict(imports=['rest_dense'], allow_failed_imports=False)``.
"""
from __future__ import annotations

import importlib
from typing import Dict, List

from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS as _ENGINE_CONSTRUCTORS

from .backbones import MMResTv1, MMResTv2, load_pretrained_cfg
from .optim import ResTLayerDecayOptimizerConstructor, stage_lr_scales
from .trusted_checkpoints import trust_checkpoints

__all__ = ["MMResTv2", "MMResTv1", "ResTLayerDecayOptimizerConstructor", "stage_lr_scales",
           "load_pretrained_cfg", "trust_checkpoints", "REGISTERED", "UNAVAILABLE"]

_BACKBONES = {"ResTv2": MMResTv2, "ResTv1": MMResTv1}

#: frameworks the backbones were registered with, e.g. ``['mmdet', 'mmseg']``
REGISTERED: List[str] = []
#: frameworks that could not be imported, with the reason
UNAVAILABLE: Dict[str, str] = {}

_ENGINE_CONSTRUCTORS.register_module(module=ResTLayerDecayOptimizerConstructor, force=True)

for _framework in ("mmdet", "mmseg"):
    try:
        _registry = importlib.import_module(f"{_framework}.registry")
    except ImportError as _err:  # framework not installed (or unusable): skip it
        UNAVAILABLE[_framework] = f"{type(_err).__name__}: {_err}"
        continue
    for _name, _cls in _BACKBONES.items():
        _registry.MODELS.register_module(name=_name, module=_cls, force=True)
    _registry.OPTIM_WRAPPER_CONSTRUCTORS.register_module(
        module=ResTLayerDecayOptimizerConstructor, force=True)
    REGISTERED.append(_framework)
