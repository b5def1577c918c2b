"""Helpers shared by the MMDetection / MMSegmentation command-line tools."""
from __future__ import annotations

import importlib
import os
from typing import Mapping, Optional, Tuple

from mmengine.config import Config, ConfigDict
from mmengine.registry import init_default_scope
from torch import nn

__all__ = ["FRAMEWORKS", "detect_framework", "build_model", "count_parameters", "load_config",
           "default_work_dir", "is_tta_model", "wrap_for_tta", "amp_unavailable_fallback"]

#: the OpenMMLab frameworks the tools handle, by their registry scope
FRAMEWORKS: Tuple[str, ...] = ("mmdet", "mmseg")


def detect_framework(cfg: Config) -> str:
    """Tell whether a config belongs to MMDetection or MMSegmentation.

    Uses ``cfg.default_scope`` when it names one of them; otherwise looks the model
    type (``cfg.model.type``) up in both frameworks' ``MODELS`` registries.

    Args:
        cfg: a loaded config.

    Returns:
        ``'mmdet'`` or ``'mmseg'``.

    Raises:
        ValueError: the config names neither framework, or the model type is ambiguous.
    """
    scope = cfg.get("default_scope")
    if scope in FRAMEWORKS:
        return scope
    model = cfg.get("model") or {}
    model_type = model.get("type") if hasattr(model, "get") else None
    if isinstance(model_type, str) and "." in model_type:
        prefix = model_type.split(".", 1)[0]
        if prefix in FRAMEWORKS:
            return prefix
    found = []
    for framework in FRAMEWORKS:
        try:
            registry = importlib.import_module(f"{framework}.registry")
        except ImportError:
            continue
        if isinstance(model_type, str) and registry.MODELS.get(model_type) is not None:
            found.append(framework)
    if len(found) == 1:
        return found[0]
    raise ValueError(
        f"cannot tell whether this config is for MMDetection or MMSegmentation "
        f"(default_scope={scope!r}, model.type={model_type!r}, "
        f"registered in {found or 'neither'}); "
        "set default_scope = 'mmdet' or 'mmseg' in the config")


def build_model(cfg: Config) -> nn.Module:
    """Build ``cfg.model`` with the registry of the config's framework (after importing
    ``rest_dense`` so that the ResT backbones are registered).

    Args:
        cfg: a loaded config.

    Returns:
        The model (weights freshly initialised; ``init_weights`` is not called).
    """
    import rest_dense.mm  # noqa: F401  (registers the backbones)

    framework = detect_framework(cfg)
    init_default_scope(framework)
    registry = importlib.import_module(f"{framework}.registry")
    return registry.MODELS.build(cfg.model)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def load_config(path: str, cfg_options: Optional[dict] = None) -> Config:
    """Read a config, apply ``--cfg-options`` and make sure ``default_scope`` is set.

    Imports ``rest_dense`` first, so configs without ``custom_imports`` work too.

    Args:
        path: config file.
        cfg_options: ``key=value`` overrides (``mmengine.config.DictAction`` output).

    Returns:
        The config, with ``default_scope`` set to ``'mmdet'`` or ``'mmseg'``.
    """
    import rest_dense.mm  # noqa: F401  (registers the backbones)

    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    cfg.default_scope = detect_framework(cfg)
    return cfg


def default_work_dir(config_path: str) -> str:
    """``./work_dirs/<config name>``, the OpenMMLab convention."""
    return os.path.join("work_dirs", os.path.splitext(os.path.basename(config_path))[0])


def is_tta_model(model_cfg: Mapping) -> bool:
    """Whether a model config is already a test-time-augmentation wrapper."""
    return str(model_cfg.get("type", "")).endswith("TTAModel") and "module" in model_cfg


def wrap_for_tta(cfg: Config) -> Config:
    """Switch a config to multi-scale / flip testing with its ``tta_model`` and
    ``tta_pipeline`` (both provided by the shipped MMSegmentation configs).

    Args:
        cfg: a loaded config; modified in place.

    Returns:
        ``cfg``.

    Raises:
        KeyError: the config defines no ``tta_model`` or no ``tta_pipeline``.
    """
    if is_tta_model(cfg.model):
        return cfg  # a *_ms-flip config: already wrapped
    missing = [k for k in ("tta_model", "tta_pipeline") if k not in cfg]
    if missing:
        raise KeyError(f"--tta needs {' and '.join(missing)} in the config")
    cfg.model = ConfigDict(**cfg.tta_model, module=cfg.model)
    cfg.test_dataloader.dataset.pipeline = cfg.tta_pipeline
    return cfg


def amp_unavailable_fallback(cfg: Config) -> bool:
    """Switch an ``AmpOptimWrapper`` to the fp32 ``OptimWrapper`` when no accelerator is
    present (mmengine's AMP wrapper refuses to run on CPU); the decision is
    :func:`rest_dense.amp.resolve_amp`'s, shared with the detectron2 adapter. An
    ``AmpOptimWrapper`` with ``dtype='bfloat16'`` becomes
    :class:`~rest_dense.mm.optim.BF16OptimWrapper` instead, which runs bf16 on the CPU.

    Args:
        cfg: a loaded config; modified in place.

    Returns:
        Whether the config was changed.
    """
    from mmengine.logging import MMLogger

    from ..amp import resolve_amp

    optim = cfg.get("optim_wrapper")
    if not optim or optim.get("type") != "AmpOptimWrapper":
        return False
    if resolve_amp(True, device=None, log=MMLogger.get_current_instance()):
        return False
    if str(optim.get("dtype", "")).replace("torch.", "").lower() in ("bfloat16", "bf16"):
        # bf16 autocast runs on the CPU: keep it, through the wrapper that allows that
        from .optim import set_mixed_precision

        set_mixed_precision(cfg, "bf16")
        return True
    optim.type = "OptimWrapper"
    for key in ("loss_scale", "dtype", "use_fsdp"):
        optim.pop(key, None)
    return True


def register_once(registry, name: str, cls: type) -> None:
    """Register ``cls`` as ``name`` in an mmengine registry unless it is there already
    (re-imports, reloads); refuse to replace another package's module of the same name.

    Raises:
        KeyError: ``name`` is registered there by another module.
    """
    present = registry.module_dict.get(name)
    if present is not None:
        if present.__module__ == cls.__module__ and present.__qualname__ == cls.__qualname__:
            if present is not cls:  # the module was reloaded: keep the registry current
                registry.register_module(name=name, module=cls, force=True)
            return
        raise KeyError(f"{registry.name} registry of {registry.scope!r} already holds {name!r} "
                       f"from {present.__module__}; rest_dense will not replace it")
    registry.register_module(name=name, module=cls)
