"""Stage-wise learning-rate decay for models with a ResT (or any ``stage_id``-aware) backbone.

The backbone says which stage each of its parameters belongs to through its own
``stage_id(name)`` (0 = stem, 1..4 = stages, ``num_stages + 1`` = not in the backbone);
nothing here depends on class or module names.
"""
from __future__ import annotations

import logging
from typing import Dict, List

from mmengine.dist import get_rank
from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor
from torch import nn

__all__ = ["ResTLayerDecayOptimizerConstructor", "stage_lr_scales"]


def stage_lr_scales(decay_rate: float, num_layers: int) -> Dict[int, float]:
    """Learning-rate multiplier of every stage id: ``decay_rate ** (num_layers + 1 - id)``.

    Args:
        decay_rate: per-stage decay (the ResTv2 paper uses 0.9 on ADE20K).
        num_layers: number of backbone stages (4 for ResT).

    Returns:
        ``{stage_id: scale}`` for ids ``0 .. num_layers + 1``; the last id (parameters
        outside the backbone) always gets 1.
    """
    return {i: decay_rate ** (num_layers + 1 - i) for i in range(num_layers + 2)}


class ResTLayerDecayOptimizerConstructor(DefaultOptimWrapperConstructor):
    """Optimizer-wrapper constructor with stage-wise learning-rate decay.

    A parameter of backbone stage ``s`` (0 = stem ... ``num_layers`` = last stage) gets
    ``lr = base_lr * decay_rate ** (num_layers + 1 - s)``; parameters outside the
    backbone (neck, heads) get ``base_lr``. One-dimensional parameters (norm weights,
    biases, ...) and every ``*.bias`` get no weight decay; the others get the
    optimizer's ``weight_decay``. Frozen parameters (``requires_grad=False``) are
    left out.

    The backbone is ``model.backbone`` and must provide ``stage_id(name)`` and
    ``num_stages`` (as :class:`~rest_dense.models.ResTv2` / ``ResTv1`` do).

    ``paramwise_cfg`` keys (same spelling as MMSegmentation's
    ``LearningRateDecayOptimizerConstructor``):

    - ``decay_rate`` (float, required): per-stage decay, e.g. 0.9.
    - ``decay_type`` (str): only ``'stage_wise'`` is supported. Default ``'stage_wise'``.
    - ``num_layers`` (int): stage count used in the exponent; defaults to the
      backbone's ``num_stages`` and may not be smaller.

    Example::

        optim_wrapper = dict(
            type='OptimWrapper',
            optimizer=dict(type='AdamW', lr=1.5e-4, weight_decay=0.05),
            constructor='ResTLayerDecayOptimizerConstructor',
            paramwise_cfg=dict(num_layers=4, decay_rate=0.9, decay_type='stage_wise'))
    """

    _KEYS = {"decay_rate", "decay_type", "num_layers"}

    def add_params(self, params: List[dict], module: nn.Module, **kwargs) -> None:
        """Append one param group per (stage, decay / no-decay) pair to ``params``.

        Args:
            params: param groups being built; extended in place.
            module: the (unwrapped) model, with a ``backbone`` attribute.
        """
        cfg = dict(self.paramwise_cfg)
        unknown = sorted(set(cfg) - self._KEYS)
        if unknown:
            raise ValueError(f"{type(self).__name__}: unsupported paramwise_cfg keys {unknown}; "
                             f"allowed: {sorted(self._KEYS)}")
        if "decay_rate" not in cfg:
            raise ValueError(f"{type(self).__name__} needs paramwise_cfg.decay_rate")
        decay_rate = float(cfg["decay_rate"])
        decay_type = cfg.get("decay_type", "stage_wise")
        if decay_type != "stage_wise":
            raise ValueError(f"{type(self).__name__} supports decay_type='stage_wise' only, "
                             f"got {decay_type!r}")

        backbone = getattr(module, "backbone", None)
        if backbone is None or not callable(getattr(backbone, "stage_id", None)):
            raise TypeError(f"{type(self).__name__} needs a model whose `backbone` has a "
                            f"`stage_id(name)` method; got backbone "
                            f"{type(backbone).__name__ if backbone is not None else None}")
        num_stages = int(backbone.num_stages)
        num_layers = int(cfg.get("num_layers") or num_stages)
        if num_layers < num_stages:
            raise ValueError(f"paramwise_cfg.num_layers={num_layers} is smaller than the "
                             f"backbone's {num_stages} stages")
        scales = stage_lr_scales(decay_rate, num_layers)
        outside = num_layers + 1
        base_wd = self.base_wd or 0.0

        groups: Dict[str, dict] = {}
        names: Dict[str, List[str]] = {}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            if name.startswith("backbone."):
                sid = int(backbone.stage_id(name[len("backbone."):]))
                sid = outside if sid > num_stages else sid
            else:
                sid = outside
            no_decay = param.ndim <= 1 or name.endswith(".bias")
            key = f"stage_{sid}_{'no_decay' if no_decay else 'decay'}"
            if key not in groups:
                groups[key] = dict(params=[], lr=self.base_lr * scales[sid],
                                   weight_decay=0.0 if no_decay else base_wd,
                                   lr_scale=scales[sid], group_name=key)
                names[key] = []
            groups[key]["params"].append(param)
            names[key].append(name)

        if get_rank() == 0:
            lines = [f"{type(self).__name__}: decay_rate={decay_rate}, num_layers={num_layers}"]
            for key, g in groups.items():
                lines.append(f"  {key}: {len(g['params'])} tensors, lr_scale={g['lr_scale']:.4f}, "
                             f"lr={g['lr']:.3e}, weight_decay={g['weight_decay']}")
            print_log("\n".join(lines), logger="current")
            for key, n in names.items():
                print_log(f"{key}: {', '.join(n)}", logger="current", level=logging.DEBUG)
        params.extend(groups.values())
