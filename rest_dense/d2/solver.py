"""Optimizers for the papers' detection recipe: AdamW with per-parameter weight decay
(none on normalisation layers and biases) and gradient clipping, for yacs and LazyConfig."""
from __future__ import annotations

import itertools
from typing import Any, Dict, Iterable, List, Sequence, Type, Union

import torch
from detectron2.config import CfgNode
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

__all__ = ["build_optimizer", "build_adamw", "with_full_model_gradient_clipping"]


def with_full_model_gradient_clipping(optimizer_cls: Type[torch.optim.Optimizer], max_norm: float,
                                      norm_type: float = 2.0) -> Type[torch.optim.Optimizer]:
    """A subclass of ``optimizer_cls`` whose ``step`` first clips the norm of *all* its
    parameters' gradients together to ``max_norm`` (detectron2 0.5 only clips per parameter).

    With AMP, detectron2's ``AMPTrainer`` steps through ``GradScaler.step``, which unscales the
    gradients before calling ``step``, so the clipping sees true gradient values.
    """
    if max_norm <= 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")

    class _FullModelClipped(optimizer_cls):
        def step(self, closure=None):
            params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
            torch.nn.utils.clip_grad_norm_(list(params), max_norm, norm_type)
            return super().step(closure=closure)

    _FullModelClipped.__name__ = optimizer_cls.__name__ + "FullModelClipped"
    _FullModelClipped.__qualname__ = _FullModelClipped.__name__
    return _FullModelClipped


def build_adamw(params: Union[Iterable, List[Dict[str, Any]]], lr: float = 1e-4,
                weight_decay: float = 0.05, betas: Sequence[float] = (0.9, 0.999),
                eps: float = 1e-8, clip_grad_norm: float = 0.0) -> torch.optim.Optimizer:
    """``torch.optim.AdamW``, with whole-model gradient-norm clipping when ``clip_grad_norm > 0``.

    For LazyConfig: ``L(build_adamw)(params=L(get_default_optimizer_params)(...), lr=...)``.
    """
    cls = torch.optim.AdamW
    if clip_grad_norm and clip_grad_norm > 0:
        cls = with_full_model_gradient_clipping(cls, clip_grad_norm)
    return cls(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps)


def build_optimizer(cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Optimizer from a yacs config: ``SOLVER.OPTIMIZER`` ``"ADAMW"`` or ``"SGD"``.

    Parameter groups come from detectron2's ``get_default_optimizer_params``:
    ``SOLVER.WEIGHT_DECAY_NORM`` applies to normalisation layers (BatchNorm, LayerNorm, ...)
    and ``SOLVER.WEIGHT_DECAY_BIAS`` to biases (the ResT configs set both to 0).
    ``SOLVER.CLIP_GRADIENTS`` supports detectron2's ``"value"`` / ``"norm"`` (per parameter)
    and ``"full_model"`` (norm of all gradients together).
    """
    s = cfg.SOLVER
    name = str(s.get("OPTIMIZER", "SGD")).upper()
    params = get_default_optimizer_params(
        model,
        base_lr=s.BASE_LR,
        weight_decay=s.WEIGHT_DECAY,
        weight_decay_norm=s.WEIGHT_DECAY_NORM,
        bias_lr_factor=s.BIAS_LR_FACTOR,
        weight_decay_bias=s.WEIGHT_DECAY_BIAS,
    )
    if name == "SGD":
        cls: Type[torch.optim.Optimizer] = torch.optim.SGD
        kwargs: Dict[str, Any] = dict(momentum=s.MOMENTUM, nesterov=s.NESTEROV)
    elif name == "ADAMW":
        cls = torch.optim.AdamW
        kwargs = dict(betas=tuple(s.get("BETAS", (0.9, 0.999))))
    else:
        raise ValueError(f"SOLVER.OPTIMIZER={s.OPTIMIZER!r}: expected 'SGD' or 'ADAMW'")

    clip = s.CLIP_GRADIENTS
    if clip.ENABLED and str(clip.CLIP_TYPE).lower() == "full_model":
        cls = with_full_model_gradient_clipping(cls, clip.CLIP_VALUE, clip.NORM_TYPE)
    else:
        cls = maybe_add_gradient_clipping(cfg, cls)
    return cls(params, lr=s.BASE_LR, weight_decay=s.WEIGHT_DECAY, **kwargs)
