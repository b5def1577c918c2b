"""The configs shipped with the package: find, list and load them by name.

In an installed wheel they live in ``rest_dense/.mim/configs``; in a clone (or an editable
install) they are read from the repository's ``configs/`` folder. Names are paths relative
to that folder, e.g. ``'mask_rcnn/mask-rcnn_restv2-t_fpn_amp-ms-1x_coco.py'`` or
``'detectron2/mask_rcnn_restv2_tiny_3x.yaml'``.
"""
from __future__ import annotations

import difflib
import fnmatch
import os
from pathlib import Path
from typing import List, Optional

__all__ = ["configs_root", "get_config_path", "list_configs", "config_framework"]

_PACKAGE = Path(__file__).resolve().parent
_SUFFIXES = (".py", ".yaml")
#: folders of parts, not runnable configs: ``_base_`` files and the deployment (export) configs
_NOT_RUNNABLE = ("_base_", "deploy")


def configs_root() -> Path:
    """The folder holding the shipped configs (wheel copy first, then the checkout's)."""
    for root in (_PACKAGE / ".mim" / "configs", _PACKAGE.parent / "configs"):
        if (root / "_base_").is_dir():
            return root
    raise FileNotFoundError(
        f"no shipped configs found: neither {_PACKAGE / '.mim' / 'configs'} (installed wheel) "
        f"nor {_PACKAGE.parent / 'configs'} (checkout) exists")


def list_configs(pattern: str = "*", framework: Optional[str] = None) -> List[str]:
    """Names of the configs users train and test with (``_base_`` parts, ``Base-*.yaml`` and
    the deployment configs under ``deploy/`` left out).

    Args:
        pattern: shell-style filter on the name, e.g. ``'mask_rcnn/*'`` or ``'*toy*'``.
        framework: only ``'mmdet'``, ``'mmseg'`` or ``'detectron2'`` configs.
    """
    root = configs_root()
    names = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        parts = rel.split("/")
        if path.suffix not in _SUFFIXES or "__pycache__" in parts or parts[0] in _NOT_RUNNABLE \
                or "_base_" in parts:
            continue
        if path.name.startswith("Base-"):
            continue
        if not fnmatch.fnmatch(rel, pattern):
            continue
        if framework is not None and config_framework(rel) != framework:
            continue
        names.append(rel)
    return names


def config_framework(name: str) -> str:
    """``'detectron2'``, ``'mmseg'`` or ``'mmdet'`` for a shipped config name (by location)."""
    rel = Path(name).as_posix()
    if rel.startswith("detectron2/") or rel.endswith(".yaml"):
        return "detectron2"
    if rel.startswith("upernet/") or "upernet" in Path(rel).name:
        return "mmseg"
    return "mmdet"


def get_config_path(name: str) -> str:
    """Absolute path of a shipped config.

    ``mmengine.Config.fromfile`` loads the result with its whole ``_base_`` chain, and
    detectron2's ``merge_from_file`` / ``LazyConfig.load`` follow its ``_BASE_`` files.

    Args:
        name: path relative to the configs folder (see :func:`list_configs`); an existing
            file path is returned unchanged.

    Raises:
        FileNotFoundError: no such config; the message suggests close names.
    """
    if os.path.isfile(name):
        return os.path.abspath(name)
    root = configs_root()
    rel = Path(name).as_posix()
    if rel.startswith("configs/"):
        rel = rel[len("configs/"):]
    path = root / rel
    if path.is_file():
        return str(path)
    close = difflib.get_close_matches(rel, list_configs(), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `rest-dense configs` lists them"
    raise FileNotFoundError(f"no shipped config {name!r} under {root}{hint}")
