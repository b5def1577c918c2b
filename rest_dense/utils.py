"""Small helpers shared by the package's tools (pure Python / PyTorch)."""
from __future__ import annotations

import re
from typing import Tuple

__all__ = ["parse_size", "format_size", "guess_config_framework"]

_SIZE = re.compile(r"^\s*(\d+)\s*(?:[xX×]\s*(\d+))?\s*$")


def parse_size(text: str) -> Tuple[int, int]:
    """An image size as every tool spells it: ``'HxW'`` (``'800x1216'``), or ``'S'`` for S x S.

    Raises:
        ValueError: anything else, naming the accepted form.
    """
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"image size {text!r} is not HxW (for example 800x1216) or a single side")
    h = int(m.group(1))
    w = int(m.group(2)) if m.group(2) else h
    if h <= 0 or w <= 0:
        raise ValueError(f"image size {text!r} must be positive")
    return h, w


def format_size(size: Tuple[int, int]) -> str:
    """``(800, 1216)`` -> ``'800x1216'``."""
    return f"{size[0]}x{size[1]}"


# names a detectron2 LazyConfig defines at top level, and names only mmengine configs use
_LAZY_CONFIG_NAMES = frozenset({"dataloader", "lr_multiplier"})
_MM_CONFIG_NAMES = frozenset({"_base_", "default_scope", "custom_imports", "train_dataloader",
                              "val_dataloader", "test_dataloader", "train_cfg", "optim_wrapper",
                              "default_hooks", "param_scheduler", "test_evaluator"})


def guess_config_framework(path: str) -> str:
    """Which family of frameworks a config file is written for, without running it.

    * ``.yaml`` / ``.yml``: detectron2 (yacs) when the top-level keys are detectron2's
      upper-case sections or ``_BASE_``; otherwise an mmengine YAML config.
    * ``.py``: read with :mod:`ast` (nothing is executed). mmengine names (``_base_``,
      ``default_scope``, ``train_dataloader``, ...) mean OpenMMLab; a top-level
      ``dataloader`` or ``lr_multiplier`` (LazyConfig), or an import of detectron2 without
      mmengine names, means detectron2.

    Args:
        path: the config file.

    Returns:
        ``'detectron2'`` or ``'openmmlab'`` (MMDetection / MMSegmentation).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a file of another type, or one that fits neither family.
    """
    import ast
    import os

    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    ext = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if ext in (".yaml", ".yml"):
        keys = re.findall(r"^([A-Za-z_][A-Za-z0-9_]*)\s*:", text, flags=re.MULTILINE)
        if not keys or any(k == "_BASE_" or k.isupper() for k in keys):
            return "detectron2"
        return "openmmlab"
    if ext != ".py":
        raise ValueError(f"config {path}: expected a .py or .yaml file")
    try:
        tree = ast.parse(text, filename=path)
    except SyntaxError as err:
        raise ValueError(f"config {path} is not valid Python: {err}") from err
    names, modules = set(), set()
    for node in tree.body:
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        elif isinstance(node, ast.With):  # mmengine's `with read_base(): from ... import *`
            for sub in node.body:
                if isinstance(sub, ast.ImportFrom):
                    modules.add(sub.module or "")
        if isinstance(node, ast.Import):
            modules.update(a.name for a in node.names)
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            modules.add(node.module or "")
            names.update(a.asname or a.name for a in node.names)
        for target in targets:
            for sub in ast.walk(target):
                if isinstance(sub, ast.Name):
                    names.add(sub.id)
    roots = {m.split(".")[0] for m in modules}
    if names & _MM_CONFIG_NAMES or roots & {"mmengine", "mmdet", "mmseg"}:
        return "openmmlab"
    if names & _LAZY_CONFIG_NAMES or "detectron2" in roots:
        return "detectron2"
    if "model" in names:
        return "openmmlab"  # a bare mmengine config (model = dict(type=...))
    raise ValueError(f"config {path} fits neither detectron2 (a LazyConfig defines `dataloader` "
                     "and `lr_multiplier`) nor MMDetection / MMSegmentation (`_base_`, "
                     "`default_scope`, `train_dataloader`, ...); pass --framework")
