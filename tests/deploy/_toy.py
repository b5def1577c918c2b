"""Small trained toy models for the deployment tests (mmengine Runner / detectron2 trainer)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional

from conftest import REPO

MM_CONFIGS = {
    "det": REPO / "configs/toy/mask_rcnn_restv2_toy.py",
    "seg": REPO / "configs/toy/upernet_restv2_toy.py",
}
D2_CONFIG = REPO / "configs/detectron2/toy/mask_rcnn_restv2_toy.yaml"


def make_toy_data(root: Path, num_train: int = 48, num_val: int = 4) -> Path:
    """The toy-shapes dataset (COCO and ADE layouts) under ``root``."""
    from rest_dense.data.toy import generate_toy_dataset

    generate_toy_dataset(root, num_train=num_train, num_val=num_val, size=128)
    return root


def mm_config(task: str, data_root: Path, work_dir: Path, iters: int, cfg_options: Optional[Dict] = None):
    """The toy config pointed at ``data_root`` with a short schedule."""
    from rest_dense.mm.utils import load_config

    cfg = load_config(str(MM_CONFIGS[task]), cfg_options)
    root = str(data_root).rstrip("/") + "/"
    for dl in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        dl.dataset.data_root = root
    for key in ("val_evaluator", "test_evaluator"):
        if "ann_file" in cfg[key]:
            cfg[key].ann_file = os.path.join(root, "annotations/instances_val.json")
    cfg.train_cfg.max_iters = iters
    cfg.train_cfg.val_interval = iters + 1
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None  # no validation while training
    cfg.param_scheduler = [dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0,
                                end=max(iters // 5, 1))]
    cfg.optim_wrapper.optimizer.lr = 2e-3
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=iters, by_epoch=False)
    cfg.default_hooks.logger.interval = max(iters, 1)
    cfg.default_hooks.visualization = dict(type=cfg.default_hooks.visualization.type)
    cfg.log_level = "WARNING"
    cfg.work_dir = str(work_dir)
    return cfg


def train_mm(task: str, data_root: Path, work_dir: Path, iters: int = 40,
             cfg_options: Optional[Dict] = None) -> Path:
    """Train a toy model briefly with mmengine's Runner; returns the checkpoint."""
    from mmengine.runner import Runner

    cfg = mm_config(task, data_root, work_dir, iters, cfg_options)
    Runner.from_cfg(cfg).train()
    ckpt = Path(work_dir) / f"iter_{iters}.pth"
    assert ckpt.is_file(), f"training wrote no {ckpt}"
    return ckpt


def train_d2(data_root: Path, out_dir: Path, iters: int = 40) -> Path:
    """Train the detectron2 toy Mask R-CNN briefly; returns the checkpoint."""
    from rest_dense.d2 import register_toy_datasets
    from rest_dense.d2.engine import RestTrainer, setup_yaml_config

    register_toy_datasets(data_root)
    cfg = setup_yaml_config(str(D2_CONFIG), [
        "MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", "()",
        "SOLVER.WARMUP_ITERS", str(max(iters // 5, 1)), "SOLVER.BASE_LR", "0.002",
        "SOLVER.CHECKPOINT_PERIOD", str(10 ** 6), "DATALOADER.NUM_WORKERS", "0",
        "OUTPUT_DIR", str(out_dir)])
    trainer = RestTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    ckpt = Path(out_dir) / "model_final.pth"
    assert ckpt.is_file(), f"training wrote no {ckpt}"
    return ckpt
