"""Helpers for detectron2 LazyConfig (python) configs."""
from __future__ import annotations

import importlib.util
import os

from detectron2.config import LazyConfig
from omegaconf import DictConfig

__all__ = ["d2_config_path", "get_d2_config"]


def d2_config_path(rel_path: str) -> str:
    """Absolute path of a config shipped in detectron2's model zoo
    (e.g. ``"common/models/mask_rcnn_fpn.py"``).

    Found from the installed package's location, without importing
    ``detectron2.model_zoo`` (which needs ``pkg_resources`` in detectron2 0.5).
    """
    spec = importlib.util.find_spec("detectron2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("detectron2 is not installed")
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "model_zoo", "configs", rel_path)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{rel_path} is not among detectron2's model-zoo configs "
                            f"({list(spec.submodule_search_locations)})")


def get_d2_config(rel_path: str) -> DictConfig:
    """Load one of detectron2's model-zoo LazyConfig files (``common/...``) as a DictConfig."""
    return LazyConfig.load(d2_config_path(rel_path))
