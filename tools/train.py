#!/usr/bin/env python
"""Train an MMDetection or an MMSegmentation config with mmengine's Runner.

The framework is taken from the config's ``default_scope`` (or, failing that, from the
registry that knows ``model.type``). ``rest_dense`` is imported before anything is built.

Examples::

    python tools/train.py configs/mask_rcnn/mask-rcnn_restv2-t_fpn_amp-ms-1x_coco.py
    python tools/train.py configs/upernet/upernet_restv2-t_8xb2-160k_ade20k-512x512.py \\
        --work-dir work_dirs/upernet_t --cfg-options train_dataloader.batch_size=4
    python tools/train.py CONFIG --resume            # continue the latest run in --work-dir
    bash tools/dist_train.sh CONFIG 8                # 8 GPUs through torchrun

Checkpoints and torch >= 2.6: ``torch.load`` there defaults to ``weights_only=True``,
which cannot read mmengine's training checkpoints (mmengine issue #1655). This tool
therefore treats the run's ``--work-dir``, the file given to ``--resume`` and any file
given to ``--trust-checkpoint`` as your own checkpoints and unpickles exactly those in full
(see ``rest_dense/mm/trusted_checkpoints.py``). Every other file keeps
``weights_only=True``, including the backbones' ImageNet weights (``init_cfg``). Do not
point ``--resume`` / ``--trust-checkpoint`` at files you did not produce.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmengine.config import DictAction  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a ResT detector or segmentor "
                                     "(MMDetection or MMSegmentation config).")
    parser.add_argument("config", help="config file")
    parser.add_argument("--work-dir", help="where logs and checkpoints go "
                        "(default: ./work_dirs/<config name>)")
    parser.add_argument("--amp", action="store_true", help="mixed-precision training "
                        "(AmpOptimWrapper with dynamic loss scaling); the COCO configs use it "
                        "already. Without a GPU, AMP configs fall back to fp32")
    parser.add_argument("--auto-scale-lr", action="store_true",
                        help="scale the lr by (total batch size / auto_scale_lr.base_batch_size)")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                        help="resume from CHECKPOINT, or, without a value, from the latest "
                        "checkpoint in the work dir")
    parser.add_argument("--trust-checkpoint", nargs="+", default=[], metavar="PATH",
                        help="further checkpoints (or folders) of your own to unpickle in full, "
                        "e.g. a `load_from` file from an earlier run")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction,
                        help="override config entries, key=value (e.g. "
                        "train_dataloader.batch_size=4 'model.backbone.frozen_stages=1')")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none",
                        help="job launcher for distributed training")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0,
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return args


def main(argv: Optional[Sequence[str]] = None):
    """Parse ``argv``, build the runner and train. Returns the trained model."""
    args = parse_args(argv)
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    from rest_dense.mm.trusted_checkpoints import trust_checkpoints
    from rest_dense.mm.utils import amp_unavailable_fallback, default_work_dir, load_config

    cfg = load_config(args.config, args.cfg_options)
    cfg.launcher = args.launcher
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = default_work_dir(args.config)

    if args.amp:
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.setdefault("loss_scale", "dynamic")
    if amp_unavailable_fallback(cfg):
        print("tools/train.py: no GPU found; mixed precision (AmpOptimWrapper) needs one, "
              "training in fp32 with OptimWrapper instead", flush=True)

    if args.auto_scale_lr:
        scale = cfg.get("auto_scale_lr") or {}
        if "base_batch_size" not in scale:
            raise KeyError("--auto-scale-lr needs auto_scale_lr.base_batch_size in the config")
        cfg.auto_scale_lr.enable = True

    if args.resume == "auto":
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume

    # the user's own checkpoints: this run's work dir, --resume and --trust-checkpoint
    trust_checkpoints(cfg.work_dir, args.resume if args.resume != "auto" else None,
                      *args.trust_checkpoint)

    runner = Runner.from_cfg(cfg) if "runner_type" not in cfg else RUNNERS.build(cfg)
    return runner.train()


if __name__ == "__main__":
    main()
