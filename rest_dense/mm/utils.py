"""Helpers shared by the MMDetection / MMSegmentation command-line tools."""
from __future__ import annotations

import importlib
import logging
import os
from collections import OrderedDict
from typing import Any, Iterator, List, Mapping, Optional, Tuple, Union

from mmengine.config import Config, ConfigDict
from mmengine.logging import print_log
from mmengine.registry import init_default_scope
from torch import nn

from ..configs import OPENMMLAB, config_framework, parse_cfg_options
from ..utils import require_package
from .registration import register_once
from .schedule import SCALE_SCHEDULE_KEY

__all__ = ["FRAMEWORKS", "detect_framework", "build_model", "count_parameters", "load_config",
           "default_work_dir", "is_tta_model", "wrap_for_tta", "register_once",
           "check_neck_channels", "install_config_format_cache"]

#: the OpenMMLab frameworks the tools handle, by their registry scope
FRAMEWORKS: Tuple[str, ...] = OPENMMLAB


def detect_framework(cfg: Config) -> str:
    """``'mmdet'`` or ``'mmseg'`` for a loaded OpenMMLab config: the rule of
    :func:`rest_dense.configs.config_framework` (kept under this name for callers).

    Raises:
        ValueError: the config names neither framework (or is a detectron2 one).
    """
    framework = config_framework(cfg)
    if framework not in FRAMEWORKS:
        raise ValueError(f"{getattr(cfg, 'filename', None) or 'this config'} is a detectron2 "
                         f"config ({framework}), not an MMDetection / MMSegmentation one")
    return framework


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
    model = registry.MODELS.build(cfg.model)
    check_neck_channels(model)
    from .necks import check_neck_levels

    check_neck_levels(model)  # num_outs that the heads cannot use
    return model


#: necks whose ``in_channels`` list the backbone's maps deepest first (MMDetection's YOLOv3
#: neck); every other neck lists them in the order the backbone emits them
DEEPEST_FIRST_NECKS = ("YOLOV3Neck",)


def check_neck_channels(model: nn.Module) -> None:
    """Refuse a model whose neck (or, without a neck, MMSegmentation decode head) expects
    other channels than its backbone emits, naming both, instead of a convolution shape
    error at the first forward pass. Backbones that do not declare ``out_channels`` (a
    tuple, as the ResT backbones do) are not checked.

    Raises:
        ValueError: ``neck.in_channels`` != the backbone's ``out_channels`` (or the decode
            head's ``in_channels`` != the backbone's channels at its ``in_index``).
    """
    model = getattr(model, "module", model)  # TTA / DDP wrappers
    backbone = getattr(model, "backbone", None)
    emitted = getattr(backbone, "out_channels", None)
    if not isinstance(emitted, tuple) or not all(isinstance(c, int) for c in emitted):
        return
    emitted = list(emitted)
    neck = getattr(model, "neck", None)
    if isinstance(neck, nn.Sequential) and len(neck):
        neck = neck[0]
    wanted = getattr(neck, "in_channels", None) if neck is not None else None
    if isinstance(wanted, (list, tuple)):
        expected = emitted[::-1] if type(neck).__name__ in DEEPEST_FIRST_NECKS else emitted
        if [int(c) for c in wanted] != expected:
            order = ", deepest first for this neck" if expected is not emitted else ""
            raise ValueError(
                f"neck.in_channels={list(wanted)} does not fit the backbone: "
                f"{type(backbone).__name__} emits out_channels={emitted} (out_indices "
                f"{list(getattr(backbone, 'out_indices', []))}); set model.neck.in_channels="
                f"{expected}{order} or change the backbone's out_indices")
        return
    head = getattr(model, "decode_head", None)
    wanted, index = getattr(head, "in_channels", None), getattr(head, "in_index", None)
    if neck is None and isinstance(wanted, (list, tuple)) and isinstance(index, (list, tuple)):
        try:
            fed = [emitted[i] for i in index]
        except IndexError:
            raise ValueError(f"decode_head.in_index={list(index)} points past the "
                             f"{len(emitted)} maps the backbone emits (out_channels="
                             f"{emitted})") from None
        if [int(c) for c in wanted] != fed:
            raise ValueError(f"decode_head.in_channels={list(wanted)} does not fit the backbone: "
                             f"{type(backbone).__name__} emits out_channels={emitted}, of which "
                             f"in_index={list(index)} gives {fed}")


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def load_config(path: str, cfg_options: Optional[dict] = None) -> Config:
    """Read a config, apply ``--cfg-options`` and make sure ``default_scope`` is set.

    Imports ``rest_dense`` first, so configs without ``custom_imports`` work too.

    Args:
        path: config file.
        cfg_options: overrides: ``key=value`` strings (:func:`rest_dense.configs.
            parse_cfg_options`) or a dict.

    Returns:
        The config, with ``default_scope`` set to ``'mmdet'`` or ``'mmseg'``.
    """
    import rest_dense.mm  # noqa: F401  (registers the backbones)

    from ..configs import read_mm_config

    cfg = read_mm_config(path)
    if cfg_options:
        options = parse_cfg_options(cfg_options)
        for key in options:
            _warn_if_variable(cfg, key)
        cfg.merge_from_dict(options)
    cfg.default_scope = detect_framework(cfg)
    # without the toolbox, the config's types fail one by one as "not in the registry"
    require_package(cfg.default_scope, f"{path} is a config of {cfg.default_scope}")
    return cfg


def set_toy_root(cfg: Config, root: Union[str, "os.PathLike[str]"]) -> List[str]:
    """Point a config's paths under ``data/toy/`` (where the shipped toy configs read the
    toy dataset, relative to the working directory) at ``root`` instead, in place.

    Returns:
        The keys changed (``'train_dataloader.dataset.data_root'``, ...).

    Raises:
        ValueError: the config has no path under ``data/toy/`` (it reads no toy data).
    """
    from ..data.toy import DEFAULT_TOY_ROOT

    old = DEFAULT_TOY_ROOT.rstrip("/") + "/"
    new = os.fspath(root).rstrip("/") + "/"
    changed: List[str] = []

    def walk(node: Any, where: str) -> None:
        items = (node.items() if isinstance(node, Mapping) else
                 enumerate(node) if isinstance(node, list) else ())
        for key, value in list(items):
            name = f"{where}.{key}" if where else str(key)
            if isinstance(value, str) and (value.startswith(old) or value == old.rstrip("/")):
                node[key] = new + value[len(old):]
                changed.append(name)
            else:
                walk(value, name)

    for key in list(cfg.keys()):
        if key in RUNNER_KEYS:  # not the config's variables: they were used already
            walk(cfg[key], key)
    if not changed:
        raise ValueError(f"--toy-root: the config reads nothing under {old} (only the toy "
                         "configs do); set its data paths with overrides instead")
    return changed


#: the top-level names mmengine's Runner and the OpenMMLab tools read from a config; any
#: other top-level name is a variable of the config, resolved where the config used it
RUNNER_KEYS = frozenset({
    "model", "work_dir", "train_dataloader", "val_dataloader", "test_dataloader", "train_cfg",
    "val_cfg", "test_cfg", "auto_scale_lr", "optim_wrapper", "param_scheduler",
    "val_evaluator", "test_evaluator", "default_hooks", "custom_hooks", "data_preprocessor",
    "load_from", "resume", "launcher", "env_cfg", "log_processor", "log_level", "visualizer",
    "default_scope", "randomness", "experiment_name", "custom_imports", "tta_model",
    "tta_pipeline", "vis_backends", "model_wrapper_cfg", "compile", "strategy",
    SCALE_SCHEDULE_KEY})


def _paths_with_value(node: Any, value: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, Mapping):
        for k, v in node.items():
            yield from _paths_with_value(v, value, f"{prefix}{k}.")
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _paths_with_value(v, value, f"{prefix}{i}.")
    elif type(node) is type(value) and node == value and prefix:
        yield prefix[:-1]


def _warn_if_variable(cfg: Config, key: str) -> None:
    """An override of a config variable (``max_iters=3`` where the config wrote
    ``train_cfg = dict(max_iters=max_iters)``) changes the variable only: the config used its
    value when it was read. Say so, naming where the old value went."""
    if "." in key or key not in cfg or key in RUNNER_KEYS:
        return
    old = cfg[key]
    used = [p for p in _paths_with_value({k: v for k, v in cfg.items() if k != key}, old)
            if p.rsplit(".", 1)[-1] == key or isinstance(old, str)][:3]
    where = f" (e.g. {', '.join(used)})" if used else ""
    print_log(f"rest_dense: override {key}=...: {key} is a variable of the config, whose value "
              f"was already used where the config refers to it{where}; override that "
              "field itself", logger="current", level=logging.WARNING)


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


def install_config_format_cache(max_entries: int = 8) -> None:
    """Format each config text with yapf once per process (idempotent).

    mmengine's ``Config.pretty_text`` runs yapf over the whole config for the log, for the
    dumped config and again for the meta data of *every* checkpoint it saves -- seconds per
    save on a small CPU, for the same text each time. This memoizes mmengine's
    ``FormatCode`` on its arguments (a pure function), so the output is unchanged.

    Args:
        max_entries: how many distinct texts to remember.
    """
    import mmengine.config.config as mm_config

    original = mm_config.FormatCode
    if getattr(original, "rest_dense_memoized", False):
        return
    cache: "OrderedDict[Tuple[str, str], Any]" = OrderedDict()

    def format_code(text: str, *args: Any, **kwargs: Any) -> Any:
        key = (text, repr((args, sorted(kwargs.items()))))
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        result = original(text, *args, **kwargs)
        cache[key] = result
        while len(cache) > max_entries:
            cache.popitem(last=False)
        return result

    format_code.rest_dense_memoized = True  # type: ignore[attr-defined]
    mm_config.FormatCode = format_code
