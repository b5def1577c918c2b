#!/usr/bin/env python
"""Evaluate a checkpoint on an MMDetection or an MMSegmentation config (mmengine Runner).

The framework is taken from the config's ``default_scope`` (or from the registry that
knows ``model.type``). ``rest_dense`` is imported before anything is built.

Examples::

    python tools/test.py configs/mask_rcnn/mask-rcnn_restv2-t_fpn_amp-ms-1x_coco.py \\
        work_dirs/mask-rcnn_restv2-t_fpn_amp-ms-1x_coco/epoch_12.pth
    python tools/test.py configs/upernet/upernet_restv2-t_8xb2-160k_ade20k-512x512.py \\
        CHECKPOINT --tta                      # multi-scale + flip (same as the *_ms-flip configs)
    python tools/test.py CONFIG CHECKPOINT --show-dir vis   # also save painted predictions
    bash tools/dist_test.sh CONFIG CHECKPOINT 8

Checkpoints and torch >= 2.6: mmengine's training checkpoints cannot be read with
``torch.load(weights_only=True)`` (mmengine issue #1655), so the CHECKPOINT named on the
command line is taken to be one you trained and is unpickled in full. For a file of
unknown origin pass ``--weights-only``: it is then read with ``weights_only=True`` (which
works for files that hold only tensors and plain containers). Other files (e.g. the
backbones' ImageNet weights) always keep ``weights_only=True``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmengine.config import DictAction  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Test a ResT detector or segmentor "
                                     "(MMDetection or MMSegmentation config).")
    parser.add_argument("config", help="config file")
    parser.add_argument("checkpoint", help="checkpoint file (or URL)")
    parser.add_argument("--work-dir", help="where logs and metrics go "
                        "(default: ./work_dirs/<config name>)")
    parser.add_argument("--weights-only", action="store_true",
                        help="read CHECKPOINT with torch.load(weights_only=True): for files "
                        "you did not produce")
    parser.add_argument("--show-dir", help="save images painted with the predictions here "
                        "(mmdet: inside the run's folder in the work dir; mmseg: as given)")
    parser.add_argument("--show", action="store_true", help="display the painted predictions")
    parser.add_argument("--wait-time", type=float, default=2.0,
                        help="seconds each image is shown with --show")
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation from the config's tta_model / "
                        "tta_pipeline (MMSegmentation: scales x0.5-1.75 with flip)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction,
                        help="override config entries, key=value")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none",
                        help="job launcher for distributed testing")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0,
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return args


def enable_visualization(cfg, framework: str, show_dir: Optional[str], show: bool,
                         wait_time: float) -> None:
    """Turn on the config's visualization hook for ``--show`` / ``--show-dir``."""
    hooks = cfg.get("default_hooks") or {}
    if "visualization" not in hooks:
        raise KeyError("--show/--show-dir need a `visualization` entry in default_hooks")
    hook = hooks["visualization"]
    hook["draw"] = True
    if show:
        hook["show"] = True
        hook["wait_time"] = wait_time
    if show_dir:
        if framework == "mmdet":
            hook["test_out_dir"] = show_dir  # mmdet paints every test image there
        else:
            cfg.visualizer["save_dir"] = show_dir
            hook["interval"] = 1  # mmseg paints every `interval`-th image only


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Parse ``argv``, build the runner and test. Returns the metrics."""
    args = parse_args(argv)
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    from rest_dense.mm.trusted_checkpoints import trust_checkpoints
    from rest_dense.mm.utils import default_work_dir, load_config, wrap_for_tta

    cfg = load_config(args.config, args.cfg_options)
    cfg.launcher = args.launcher
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = default_work_dir(args.config)
    cfg.load_from = args.checkpoint
    if not args.weights_only:
        trust_checkpoints(args.checkpoint)

    if args.show or args.show_dir:
        enable_visualization(cfg, cfg.default_scope, args.show_dir, args.show, args.wait_time)
    if args.tta:
        wrap_for_tta(cfg)

    runner = Runner.from_cfg(cfg) if "runner_type" not in cfg else RUNNERS.build(cfg)
    return runner.test()


if __name__ == "__main__":
    main()
