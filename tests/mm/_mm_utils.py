"""Helpers for the MMDetection / MMSegmentation tests (tests/mm/test_mm_*.py): configs shrunk to
:data:`conftest.TINY_ARCH`, the shipped configs of a family, building models and checking
which backbone parameters get gradients."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import List

import torch
from mmengine.config import Config

import rest_dense.mm  # noqa: F401  (registers the backbones)
from rest_dense.mm.utils import build_model, is_tta_model

from conftest import CONFIG_DIR, REPO, TINY_ARCH  # noqa: F401
# configs owned by other parts of the project
FOREIGN_CONFIG_DIRS = ("toy", "detectron2", "_base_", "deploy")



def shipped_configs(family: str = "") -> List[Path]:
    """Every shipped mmdet/mmseg config (optionally of one folder), sorted."""
    found = []
    for path in sorted(CONFIG_DIR.rglob("*.py")):
        rel = path.relative_to(CONFIG_DIR)
        if rel.parts[0] in FOREIGN_CONFIG_DIRS or "__pycache__" in rel.parts:
            continue
        if family and rel.parts[0] != family:
            continue
        found.append(path)
    return found


def load(rel: str) -> Config:
    """Load ``configs/<rel>``."""
    return Config.fromfile(str(CONFIG_DIR / rel))


def model_cfg(cfg: Config):
    """The detector / segmentor config, looking through test-time-augmentation wrappers."""
    return cfg.model.module if is_tta_model(cfg.model) else cfg.model


def shrink(cfg: Config, arch=TINY_ARCH, keep_init_cfg: bool = False) -> Config:
    """Swap the backbone for a tiny arch and fit the neck / heads' input channels.

    The rest of the model (necks, heads, losses) stays as shipped; only the number of
    regions the two-stage detectors sample and keep is cut, to keep CPU steps short.
    """
    cfg = copy.deepcopy(cfg)
    model = model_cfg(cfg)
    backbone = model.backbone
    backbone.arch = dict(arch)
    if not keep_init_cfg:
        backbone.pop("init_cfg", None)
    dims = arch["embed_dims"]
    outs = list(backbone.get("out_indices", (0, 1, 2, 3)))
    if "neck" in model:
        model.neck.in_channels = [dims[i] for i in outs]
    if "decode_head" in model and not model.get("neck"):  # behind a neck: the neck's channels
        model.decode_head.in_channels = [dims[i] for i in outs]
    if model.get("auxiliary_head"):
        model.auxiliary_head.in_channels = dims[outs[model.auxiliary_head.in_index]]
    if "roi_head" in model:
        model.train_cfg.rpn_proposal.max_per_img = 200
        model.train_cfg.rcnn.sampler.num = 64
        model.test_cfg.rpn.max_per_img = 100
    return cfg


def build(cfg: Config) -> torch.nn.Module:
    """Build the config's model with its framework's registry."""
    return build_model(cfg)


def backbone_grads_reach(model: torch.nn.Module) -> List[str]:
    """Names of trainable backbone parameters that received a finite, non-zero gradient."""
    return [n for n, p in model.backbone.named_parameters()
            if p.requires_grad and p.grad is not None and torch.isfinite(p.grad).all()
            and p.grad.abs().sum() > 0]
