"""Shared helpers of the detectron2 tests: shipped configs with a shrunken model, inputs."""
from __future__ import annotations

import os
from typing import List, Sequence

import pytest
import torch

import detectron2  # noqa: F401,E402  (installed by tools/setup_env.sh)

from detectron2.structures import BitMasks, Boxes, Instances  # noqa: E402

from rest_dense.d2.engine import setup_yaml_config  # noqa: E402

from conftest import REPO as _REPO, TINY_ARCH as _TINY  # noqa: E402

REPO = str(_REPO)
D2_CONFIGS = os.path.join(REPO, "configs", "detectron2")
LAZY_CONFIG = os.path.join(D2_CONFIGS, "lazy", "mask_rcnn_restv2_tiny_3x.py")

TINY_ARCH = {k: list(v) for k, v in _TINY.items()}


def config_path(name: str) -> str:
    return os.path.join(D2_CONFIGS, name)


def shipped_yaml_configs() -> List[str]:
    """All yaml configs users run (not the Base-* files), relative to configs/detectron2."""
    out = []
    for root, _, files in os.walk(D2_CONFIGS):
        for f in files:
            if f.endswith(".yaml") and not f.startswith("Base-"):
                out.append(os.path.relpath(os.path.join(root, f), D2_CONFIGS))
    return sorted(out)


def _arch_opts(key: str) -> List[str]:
    return [f"MODEL.{key}.ARCH.EMBED_DIMS", str(TINY_ARCH["embed_dims"]),
            f"MODEL.{key}.ARCH.DEPTHS", str(TINY_ARCH["depths"])]


def small_opts(cfg_name: str) -> List[str]:
    """Command-line overrides that shrink a shipped config to a CPU-test-sized model:
    tiny backbone arch, 32-channel FPN, light heads, few proposals; CPU; no weights."""
    key = "REST" if "_rest_" in os.path.basename(cfg_name) else "RESTV2"
    opts = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *_arch_opts(key),
            "MODEL.FPN.OUT_CHANNELS", "32"]
    if "retinanet" in cfg_name:
        opts += ["MODEL.RETINANET.NUM_CONVS", "1", "MODEL.RETINANET.NUM_CLASSES", "3"]
    else:
        opts += ["MODEL.ROI_HEADS.NUM_CLASSES", "3", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
                 "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "32", "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200",
                 "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50", "MODEL.RPN.PRE_NMS_TOPK_TEST", "200",
                 "MODEL.RPN.POST_NMS_TOPK_TEST", "50", "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
                 "MODEL.ROI_MASK_HEAD.CONV_DIM", "16"]
    return opts


def small_cfg(cfg_name: str, extra: Sequence[str] = ()):
    return setup_yaml_config(config_path(cfg_name), small_opts(cfg_name) + list(extra))


def make_inputs(n: int = 2, h: int = 128, w: int = 160, with_targets: bool = True,
                seed: int = 0) -> List[dict]:
    """detectron2 model inputs: random images with two boxes (and box-shaped masks) each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        d = {"image": torch.randint(0, 256, (3, h, w), generator=g).float(), "height": h, "width": w}
        if with_targets:
            boxes = torch.tensor([[10.0, 12.0, 70.0, 90.0], [60.0 + 8 * i, 30.0, 150.0, 120.0]])
            inst = Instances((h, w))
            inst.gt_boxes = Boxes(boxes)
            inst.gt_classes = torch.tensor([0, 2])
            masks = torch.zeros(2, h, w, dtype=torch.bool)
            for j, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
                masks[j, y0:y1, x0:x1] = True
            inst.gt_masks = BitMasks(masks)
            d["instances"] = inst
        out.append(d)
    return out
