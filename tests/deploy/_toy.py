"""Toy data and non-trivial toy-model checkpoints for the deployment tests.

The checkpoints are randomly initialised models with every weight perturbed (seeded), so
that detections, masks and label maps are non-trivial without a training run; for RetinaNet
the classification prior is raised so that boxes score above the threshold.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

import pytest
import torch

from conftest import REPO, TINY_ARCH

MM_DET = REPO / "configs/toy/mask_rcnn_restv2_toy.py"
MM_SEG = REPO / "configs/toy/upernet_restv2_toy.py"
MM_RETINA = REPO / "configs/retinanet/retinanet_restv2-t_fpn_amp-ms-1x_coco.py"
D2_DET = REPO / "configs/detectron2/toy/mask_rcnn_restv2_toy.yaml"



def retina_options() -> Dict[str, object]:
    """The shipped RetinaNet config made small: tiny backbone, images resized to <= 256x160."""
    return {
        "model.backbone.arch": dict(TINY_ARCH, _delete_=True),
        "model.backbone.init_cfg": None,
        "model.neck.in_channels": list(TINY_ARCH["embed_dims"])[1:],
        "model.bbox_head.num_classes": 3,
        "model.bbox_head.feat_channels": 64,
        "test_dataloader.dataset.pipeline.1.scale": (256, 160),
    }

def toy_data(root: Path) -> Path:
    """A small toy-shapes dataset (COCO and ADE layouts, 3 validation images)."""
    from rest_dense.data.toy import generate_toy_dataset

    generate_toy_dataset(root, num_train=2, num_val=3, size=128)
    return root


def _perturb(model: torch.nn.Module, seed: int, scale: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def mm_config(config: Path, cfg_options: Optional[Dict] = None, data_root: Optional[Path] = None):
    """An OpenMMLab config with overrides, its datasets pointed at ``data_root``."""
    from rest_dense.mm.utils import load_config

    cfg = load_config(str(config), cfg_options)
    if data_root is not None:
        root = str(data_root).rstrip("/") + "/"
        for dl in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
            dl.dataset.data_root = root
        for key in ("val_evaluator", "test_evaluator"):
            if "ann_file" in cfg[key]:
                cfg[key].ann_file = root + "annotations/instances_val.json"
    return cfg


def mm_checkpoint(path: Path, config: Path, cfg_options: Optional[Dict] = None, seed: int = 0,
                  scale: float = 0.02) -> Path:
    """Save a perturbed randomly initialised model of an OpenMMLab config (mmengine layout)."""
    from rest_dense.mm.utils import build_model

    cfg = mm_config(config, cfg_options)
    torch.manual_seed(seed)
    model = build_model(cfg)
    model.init_weights()
    _perturb(model, seed, scale)
    head = getattr(model, "bbox_head", None)
    if head is not None and hasattr(head, "retina_cls"):
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():  # spread scores around ~0.1 (prior 0.01): no near-ties at the cuts
            head.retina_cls.bias.fill_(-2.5)
            w = head.retina_cls.weight
            w.copy_(torch.randn(w.shape, generator=gen) * 0.2)
    meta = {}
    classes = (cfg.test_dataloader.dataset.get("metainfo") or {}).get("classes")
    if classes:
        meta = {"dataset_meta": {"classes": list(classes)}}
    torch.save({"state_dict": model.state_dict(), "meta": meta}, path)
    return path


def d2_opts(options: Optional[Dict] = None) -> list:
    out = ["MODEL.DEVICE", "cpu"]
    for k, v in (options or {}).items():
        out += [k, str(v)]
    return out


def d2_checkpoint(path: Path, options: Optional[Dict] = None, seed: int = 0,
                  scale: float = 0.02) -> Path:
    """Save a perturbed randomly initialised detectron2 toy Mask R-CNN (``{'model': sd}``)."""
    from detectron2.modeling import build_model

    import rest_dense.d2  # noqa: F401
    from rest_dense.d2.engine import setup_yaml_config

    cfg = setup_yaml_config(str(D2_DET), d2_opts(options))
    torch.manual_seed(seed)
    model = build_model(cfg)
    _perturb(model, seed, scale)
    torch.save({"model": model.state_dict()}, path)
    return path


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory) -> Path:
    return toy_data(tmp_path_factory.mktemp("toy") / "data")


@pytest.fixture(scope="session")
def det_ckpt(tmp_path_factory) -> Path:
    return mm_checkpoint(tmp_path_factory.mktemp("ckpt") / "mrcnn.pth", MM_DET)


@pytest.fixture(scope="session")
def seg_ckpt(tmp_path_factory) -> Path:
    return mm_checkpoint(tmp_path_factory.mktemp("ckpt") / "upernet.pth", MM_SEG, scale=0.05)


@pytest.fixture(scope="session")
def d2_ckpt(tmp_path_factory) -> Path:
    return d2_checkpoint(tmp_path_factory.mktemp("ckpt") / "d2_mrcnn.pth")


def val_images(root: Path, layout: str = "coco") -> Sequence[Path]:
    folder = root / ("val" if layout == "coco" else "images/validation")
    images = sorted(folder.glob("*.png"))
    assert images, f"no toy images under {folder}"
    return images
