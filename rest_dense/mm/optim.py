"""Optimizer pieces for mmengine: stage-wise learning-rate decay and bf16 mixed precision.

* :class:`ResTLayerDecayOptimizerConstructor`: stage-wise lr decay for models with a ResT (or
  any ``stage_id``-aware) backbone. The backbone says which stage each of its parameters
  belongs to through its own ``stage_id(name)`` (0 = stem, 1..4 = stages,
  ``num_stages + 1`` = not in the backbone); nothing here depends on class or module names.
* :class:`BF16OptimWrapper` (registered in mmengine's ``OPTIM_WRAPPERS`` as
  ``'BF16OptimWrapper'`` when this module is imported): bf16 autocast without loss scaling,
  on the CPU as well as on GPUs; :func:`set_mixed_precision` switches a config to it (or to
  mmengine's fp16 ``AmpOptimWrapper``).
"""
from __future__ import annotations

import functools
import logging
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from mmengine.config import Config
from mmengine.dist import get_rank
from mmengine.logging import MMLogger, print_log
from mmengine.model import is_model_wrapper
from mmengine.optim import DefaultOptimWrapperConstructor, OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS
from torch import nn

from ..amp import parse_precision, resolve_amp, warn_if_bf16_emulated
from ..configs import config_framework
from .registration import register_once

__all__ = ["ResTLayerDecayOptimizerConstructor", "stage_lr_scales", "BF16OptimWrapper",
           "set_mixed_precision", "bf16_wrapper_defaults", "MMDET_AUTOCAST_MODULES",
           "amp_unavailable_fallback", "check_decay_rate", "check_num_layers"]

_PARAMWISE_EXAMPLE = ("paramwise_cfg=dict(decay_rate=0.9, num_layers=4, decay_type='stage_wise')")


def check_decay_rate(value: Any, key: str = "paramwise_cfg.decay_rate") -> float:
    """A per-stage lr decay as given: a real number in (0, 1].

    Raises:
        ValueError: a bool, a non-number, NaN, inf, or a value outside (0, 1], naming ``key``.
    """
    import math
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{key} must be a number in (0, 1], e.g. 0.9; got {value!r} "
                         f"({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise ValueError(f"{key} must be in (0, 1] (1 = no decay), got {value!r}: a rate <= 0 "
                         "or > 1 would give zero, negative or growing learning rates")
    return value


def check_num_layers(value: Any, key: str = "paramwise_cfg.num_layers") -> int:
    """A stage count as given: a whole number >= 1 (``4.7`` is refused, not truncated).

    Raises:
        ValueError: a bool, a float, a non-number or a value < 1, naming ``key``.
    """
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{key} must be a whole number of stages (e.g. 4), got {value!r} "
                         f"({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{key} must be at least 1, got {value}")
    return int(value)


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

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: Optional[dict] = None):
        super().__init__(optim_wrapper_cfg, paramwise_cfg)
        self._check_paramwise_cfg()

    def _check_paramwise_cfg(self) -> None:
        """Refuse settings that would train with a wrong schedule, naming the key."""
        name = type(self).__name__
        cfg = self.paramwise_cfg
        if not cfg:
            raise ValueError(f"{name} needs a paramwise_cfg in optim_wrapper (without one it "
                             f"would apply no decay at all): add {_PARAMWISE_EXAMPLE}")
        unknown = sorted(set(cfg) - self._KEYS)
        if unknown:
            raise ValueError(f"{name}: unsupported paramwise_cfg keys {unknown}; "
                             f"allowed: {sorted(self._KEYS)}")
        if "decay_rate" not in cfg:
            raise ValueError(f"{name} needs paramwise_cfg.decay_rate, e.g. {_PARAMWISE_EXAMPLE}")
        check_decay_rate(cfg["decay_rate"])
        if cfg.get("num_layers") is not None:
            check_num_layers(cfg["num_layers"])
        decay_type = cfg.get("decay_type", "stage_wise")
        if decay_type != "stage_wise":
            raise ValueError(f"{name} supports paramwise_cfg.decay_type='stage_wise' only, "
                             f"got {decay_type!r}")

    def add_params(self, params: List[dict], module: nn.Module, **kwargs) -> None:
        """Append one param group per (stage, decay / no-decay) pair to ``params``.

        Args:
            params: param groups being built; extended in place.
            module: the (unwrapped) model, with a ``backbone`` attribute.
        """
        self._check_paramwise_cfg()  # paramwise_cfg may have been changed since __init__
        cfg = dict(self.paramwise_cfg)
        decay_rate = check_decay_rate(cfg["decay_rate"])

        backbone = getattr(module, "backbone", None)
        if backbone is None or not callable(getattr(backbone, "stage_id", None)):
            raise TypeError(f"{type(self).__name__} needs a model whose `backbone` has a "
                            f"`stage_id(name)` method; got backbone "
                            f"{type(backbone).__name__ if backbone is not None else None}")
        num_stages = int(backbone.num_stages)
        num_layers = num_stages if cfg.get("num_layers") is None else \
            check_num_layers(cfg["num_layers"])
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


# ----------------------------------------------------------------------------- bf16
def _module_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (the CPU for an empty model)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _to_float(value: Any) -> Any:
    """``value`` with its bf16 / fp16 tensors (also inside tuples, lists, dicts) cast to fp32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in (torch.bfloat16, torch.float16) else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(_to_float(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_to_float(v) for v in value)
    if isinstance(value, dict):
        return type(value)((k, _to_float(v)) for k, v in value.items())
    return value


class BF16OptimWrapper(OptimWrapper):
    """``OptimWrapper`` that runs the forward pass under
    ``torch.autocast(<the model's device type>, dtype=torch.bfloat16)``.

    bf16 keeps fp32's exponent range, so there is no loss scaling: backward, gradient
    clipping (``clip_grad``), gradient accumulation and the optimizer step are the plain
    ``OptimWrapper``'s, and parameters, gradients and optimizer state stay fp32. Unlike
    mmengine's ``AmpOptimWrapper`` (which needs a CUDA / NPU / MLU / MUSA device) it runs on
    the CPU too. On a device without bf16 autocast (an old GPU) it warns once and trains in
    fp32 (:func:`rest_dense.amp.resolve_amp`).

    What runs in bf16 (``autocast_modules``):

    - ``None`` (default): the whole forward pass (data preprocessor, model, losses), as
      ``AmpOptimWrapper`` does. Right for MMSegmentation models, whose ops all have bf16
      kernels. On an MMDetection detector: :data:`MMDET_AUTOCAST_MODULES` instead.
    - submodule names, e.g. ``('backbone', 'neck')``: only these submodules' forward; their
      outputs are cast back to fp32, so the rest (heads, losses) trains in fp32. Needed for
      MMDetection's detectors: mmcv's ``nms`` and ``RoIAlign`` have no bf16 kernels (CPU or
      CUDA). :func:`bf16_wrapper_defaults` writes it into MMDetection configs. A repeated
      name counts once; an empty list is refused (it would run nothing in bf16).

    The optimizer, ``paramwise_cfg`` and ``constructor`` (e.g.
    ``'ResTLayerDecayOptimizerConstructor'``) of the config apply as for any optimizer
    wrapper. ``loss_scale`` and ``dtype`` are accepted so that an ``AmpOptimWrapper`` config
    can switch by its ``type`` alone; ``loss_scale`` is ignored.

    Example::

        optim_wrapper = dict(
            type='BF16OptimWrapper',
            autocast_modules=['backbone', 'neck'],  # MMDetection; leave out for MMSegmentation
            optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.05),
            constructor='ResTLayerDecayOptimizerConstructor',
            paramwise_cfg=dict(num_layers=4, decay_rate=0.9, decay_type='stage_wise'),
            clip_grad=dict(max_norm=1.0))

    Args:
        optimizer: the optimizer (built by the wrapper constructor).
        autocast_modules: names of the submodules (``model.get_submodule`` paths) whose
            forward runs in bf16; ``None``: the whole forward pass.
        dtype: must be bf16 (``'bfloat16'``, ``'bf16'`` or ``torch.bfloat16``).
        loss_scale: ignored (an ``AmpOptimWrapper`` setting; bf16 needs no scaling).
        cache_enabled: ``torch.autocast``'s weight-cast cache (default: torch's setting).
        **kwargs: ``accumulative_counts``, ``clip_grad``, as for ``OptimWrapper``.

    Raises:
        ValueError: ``dtype`` is not bf16.
    """

    def __init__(self, optimizer: torch.optim.Optimizer,
                 autocast_modules: Optional[Sequence[str]] = None,
                 dtype: Union[str, torch.dtype] = "bfloat16", loss_scale: Any = None,
                 cache_enabled: Optional[bool] = None, **kwargs: Any) -> None:
        if parse_precision(dtype) != "bfloat16":
            raise ValueError(f"BF16OptimWrapper runs bf16 only, got dtype={dtype!r}; fp16 needs "
                             "a loss scaler: use AmpOptimWrapper")
        super().__init__(optimizer, **kwargs)
        self.cast_dtype = torch.bfloat16
        if isinstance(autocast_modules, str):
            autocast_modules = [autocast_modules]
        if autocast_modules is not None:
            autocast_modules = tuple(dict.fromkeys(autocast_modules))  # each once, in order
            if not autocast_modules:
                raise ValueError("BF16OptimWrapper autocast_modules is empty, which would run "
                                 "nothing in bf16: name submodules (e.g. ['backbone', 'neck']), "
                                 "or leave it None for the whole forward pass")
            bad = [m for m in autocast_modules if not isinstance(m, str) or not m]
            if bad:
                raise TypeError(f"BF16OptimWrapper autocast_modules must be submodule names, "
                                f"got {bad!r}")
        self.autocast_modules = autocast_modules
        self.cache_enabled = cache_enabled
        if loss_scale is not None:
            print_log(f"BF16OptimWrapper: loss_scale={loss_scale!r} ignored (bf16 needs no loss "
                      "scaling)", logger="current")
        self._enabled_on: Dict[str, bool] = {}  # device type -> bf16 autocast runs there

    def autocast_enabled(self, device_type: str) -> bool:
        """Whether the forward on ``device_type`` runs in bf16 (decided, and if not warned
        about, once per device type)."""
        if device_type not in self._enabled_on:
            log = MMLogger.get_current_instance()
            enabled = resolve_amp(True, device_type, precision="bfloat16", log=log)
            if enabled:
                warn_if_bf16_emulated(device_type, log)
            self._enabled_on[device_type] = enabled
        return self._enabled_on[device_type]

    def _autocast(self, device_type: str) -> torch.autocast:
        cache = (torch.is_autocast_cache_enabled() if self.cache_enabled is None
                 else self.cache_enabled)
        return torch.autocast(device_type, dtype=self.cast_dtype,
                              enabled=self.autocast_enabled(device_type), cache_enabled=cache)

    @contextmanager
    def optim_context(self, model: nn.Module) -> Iterator[None]:
        """Gradient-accumulation context of ``OptimWrapper`` plus bf16 autocast on the
        model's device, for the whole forward or for the ``autocast_modules``.

        Args:
            model: the training model (possibly wrapped for distributed training).

        Raises:
            AttributeError: an ``autocast_modules`` name that the model does not have.
        """
        device_type = _module_device(model).type
        core = model.module if is_model_wrapper(model) else model
        modules = self._modules_of(core)
        if device_type not in self._enabled_on and self.autocast_enabled(device_type):
            print_log(f"BF16OptimWrapper: bf16 autocast on {device_type} for "
                      f"{', '.join(modules or ['the whole forward pass'])}, "
                      "no loss scaling", logger="current")
        if modules is None:
            with super().optim_context(model), self._autocast(device_type):
                yield
            return
        patched = []  # (module, the forward its instance had, or None)
        try:
            for name in modules:
                sub = core.get_submodule(name)
                patched.append((sub, sub.__dict__.get("forward")))
                sub.forward = self._bf16_forward(sub.forward, device_type)
            with super().optim_context(model):
                yield
        finally:
            for sub, own in reversed(patched):
                if own is None:
                    del sub.forward  # the class's forward again
                else:
                    sub.forward = own  # an instance's own forward (a wrapper of the user's)

    def _modules_of(self, core: nn.Module) -> Optional[Tuple[str, ...]]:
        """``autocast_modules``; unset on an MMDetection detector (a config that did not go
        through :func:`bf16_wrapper_defaults`, e.g. MMDetection's own ``tools/train.py``):
        :data:`MMDET_AUTOCAST_MODULES`, those it has."""
        if self.autocast_modules is not None:
            return self.autocast_modules
        try:
            from mmdet.models.detectors import BaseDetector
        except ImportError:
            return None
        if not isinstance(core, BaseDetector):
            return None
        present = tuple(m for m in MMDET_AUTOCAST_MODULES
                        if isinstance(getattr(core, m, None), nn.Module))
        return present or None  # none at the top (a student / teacher pair): the whole forward

    def _bf16_forward(self, forward: Callable, device_type: str) -> Callable:
        """``forward`` run under bf16 autocast, its outputs cast back to fp32."""
        @functools.wraps(forward)
        def bf16_forward(*args: Any, **kwargs: Any) -> Any:
            with self._autocast(device_type):
                out = forward(*args, **kwargs)
            return _to_float(out)
        return bf16_forward

    def load_state_dict(self, state_dict: dict) -> None:
        """Load the optimizer state; a grad scaler's state (a checkpoint of an fp16
        ``AmpOptimWrapper`` run) is dropped, so such runs can resume in bf16."""
        state_dict = dict(state_dict)
        state_dict.pop("loss_scaler", None)
        super().load_state_dict(state_dict)


# mmdet's and mmseg's registries find it in mmengine's through their parent
register_once(OPTIM_WRAPPERS, "BF16OptimWrapper", BF16OptimWrapper)


#: optimizer-wrapper keys only mmengine's ``AmpOptimWrapper`` takes, and keys only
#: :class:`BF16OptimWrapper` takes: dropped when a config switches to the other wrapper
_AMP_ONLY_KEYS = ("loss_scale", "dtype", "use_fsdp")
_BF16_ONLY_KEYS = ("autocast_modules", "cache_enabled")


def _drop(optim: Any, keys: Sequence[str]) -> None:
    for key in keys:
        optim.pop(key, None)


def _is_mmdet(cfg: Config) -> bool:
    """Whether ``cfg`` is an MMDetection config (:func:`rest_dense.configs.config_framework`)."""
    try:
        return config_framework(cfg) == "mmdet"
    except ValueError:
        return False


def amp_unavailable_fallback(cfg: Config) -> bool:
    """Switch an ``AmpOptimWrapper`` to the fp32 ``OptimWrapper`` when no accelerator is
    present (mmengine's AMP wrapper refuses to run on CPU); the decision is
    :func:`rest_dense.amp.resolve_amp`'s, shared with the detectron2 adapter. An
    ``AmpOptimWrapper`` with ``dtype='bfloat16'`` becomes :class:`BF16OptimWrapper`
    instead, which runs bf16 on the CPU.

    Args:
        cfg: a loaded config; modified in place.

    Returns:
        Whether the config was changed.
    """
    optim = cfg.get("optim_wrapper")
    if not optim or optim.get("type") != "AmpOptimWrapper":
        return False
    if resolve_amp(True, device=None, log=MMLogger.get_current_instance()):
        return False
    if str(optim.get("dtype", "")).replace("torch.", "").lower() in ("bfloat16", "bf16"):
        # bf16 autocast runs on the CPU: keep it, through the wrapper that allows that
        set_mixed_precision(cfg, "bf16")
        return True
    optim.type = "OptimWrapper"
    _drop(optim, _AMP_ONLY_KEYS + _BF16_ONLY_KEYS)
    return True


#: what a :class:`BF16OptimWrapper` runs in bf16 in an MMDetection model by default: mmcv's
#: nms / RoIAlign in the heads have no bf16 kernels (CPU or CUDA)
MMDET_AUTOCAST_MODULES = ("backbone", "neck")


def bf16_wrapper_defaults(cfg: Config) -> Config:
    """The settings a :class:`BF16OptimWrapper` of ``cfg`` takes from the config's model, as
    the config reached it (``--amp-dtype bf16``, ``--cfg-options optim_wrapper.type=...``,
    the config itself): for MMDetection configs ``autocast_modules=['backbone', 'neck']``
    (those the model has) unless the config sets it, since mmcv's nms / RoIAlign in the
    heads have no bf16 kernels. Other wrappers are left alone.

    Args:
        cfg: a loaded config; modified in place.

    Returns:
        ``cfg``.
    """
    optim = cfg.get("optim_wrapper")
    if not optim or optim.get("type") != "BF16OptimWrapper":
        return cfg
    if "autocast_modules" not in optim and _is_mmdet(cfg):
        model = cfg.get("model") or {}
        present = [m for m in MMDET_AUTOCAST_MODULES if model.get(m)]
        if present:  # a detector without them at the top (SoftTeacher): left as it is
            optim.autocast_modules = present
    return cfg


def set_mixed_precision(cfg: Config, amp: Union[bool, str, torch.dtype] = True) -> Config:
    """Switch a config's optimizer wrapper to mixed precision, keeping its optimizer,
    ``constructor``, ``paramwise_cfg``, ``clip_grad`` and ``accumulative_counts``.

    Args:
        cfg: a loaded config with an ``optim_wrapper``; modified in place.
        amp: ``True``: mixed precision in the config's precision: a
            :class:`BF16OptimWrapper` stays, anything else becomes mmengine's
            ``AmpOptimWrapper`` (dynamic loss scale unless the config sets one);
            ``'float16'`` / ``'fp16'``: ``AmpOptimWrapper`` with fp16 (needs an
            accelerator: without one the runner falls back to fp32); ``'bfloat16'`` /
            ``'bf16'``: :class:`BF16OptimWrapper` (any device, no loss scaling; for
            MMDetection configs with ``autocast_modules=['backbone', 'neck']`` unless the
            config sets it); ``False`` / ``None``: leave the config as it is.

    Returns:
        ``cfg``.

    Raises:
        ValueError: an unknown precision name.
        KeyError: the config has no ``optim_wrapper``.
    """
    if amp is False or amp is None:
        return cfg
    precision = None if amp is True else parse_precision(amp)
    if not cfg.get("optim_wrapper"):
        raise KeyError("mixed precision needs an `optim_wrapper` in the config")
    optim = cfg.optim_wrapper
    if precision is None and optim.get("type") == "BF16OptimWrapper":
        return bf16_wrapper_defaults(cfg)
    if precision == "bfloat16":
        optim.type = "BF16OptimWrapper"
        _drop(optim, _AMP_ONLY_KEYS)
        return bf16_wrapper_defaults(cfg)
    optim.type = "AmpOptimWrapper"
    _drop(optim, _BF16_ONLY_KEYS)  # fp16 autocasts the whole forward
    optim.setdefault("loss_scale", "dynamic")
    if precision == "float16" and optim.get("dtype") is not None:
        optim.dtype = "float16"
    return cfg
