"""Evaluate a checkpoint: an MMDetection / MMSegmentation config (mmengine's Runner) or a
detectron2 config (yacs .yaml or LazyConfig .py; detectron2's --eval-only).

CONFIG is a file or a shipped config name (`rest-dense configs`); the framework is read
from the config as in `rest-dense train`. CHECKPOINT is a file or URL. Overrides go after
the options: `key=value` (OpenMMLab, LazyConfig) or `KEY VALUE` (detectron2 yaml).

Examples:

  rest-dense test mask_rcnn/mask-rcnn_restv2-t_fpn_amp-ms-1x_coco.py \\
      work_dirs/mask-rcnn_restv2-t_fpn_amp-ms-1x_coco/epoch_12.pth
  rest-dense test upernet/upernet_restv2-t_8xb2-160k_ade20k-512x512.py CHECKPOINT --tta
  rest-dense test CONFIG CHECKPOINT --show-dir vis --save-metrics metrics.json
  rest-dense test CONFIG old_run.pth --trust-checkpoint old_run.pth   # your own odd file
  torchrun --nproc_per_node 8 -m rest_dense.cli test CONFIG CHECKPOINT --launcher pytorch
                                   # 8 GPUs (in a clone: bash tools/dist_test.sh CONFIG CHECKPOINT 8)
  rest-dense test detectron2/mask_rcnn_restv2_tiny_3x.yaml model_final.pth --num-gpus 8
  rest-dense test detectron2/toy/mask_rcnn_restv2_toy.yaml outputs/model_final.pth \\
      --threads 1 MODEL.DEVICE cpu

Checkpoints: CHECKPOINT is read with torch.load(weights_only=True) and rest_dense's
allow-list, which is enough for mmengine and detectron2 training checkpoints (and for
released weights). A file that needs more is refused with an error naming it; it is
unpickled in full only if you name it with --trust-checkpoint (unpickling runs code: only
for files you produced). --weights-only is accepted for older command lines: it is the
default and cannot be combined with --trust-checkpoint.
"""
from __future__ import annotations

import argparse
import os

from ..configs import ConfigBuildError
from ..run_files import CHECKPOINT_ERRORS
from ..utils import ImageReadError, error_text, reading_images
from .train import (add_common_arguments, add_overrides_argument,
                    add_trust_argument, allow_intermixed, check_config_not_overwritten,
                    d2_namespace, fail, overrides, prepare_run, print_metrics, toy_data_hint,
                    UsageError)

HELP = "evaluate a checkpoint (MMDetection, MMSegmentation or detectron2 config)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    allow_intermixed(parser)
    parser.add_argument("config", help="config file or shipped config name (rest-dense configs)")
    parser.add_argument("checkpoint", help="checkpoint file (or URL)")
    add_overrides_argument(parser)
    add_trust_argument(parser)
    parser.add_argument("--weights-only", action="store_true",
                        help="trust nothing (the default; kept for older command lines, not "
                        "to be combined with --trust-checkpoint)")
    parser.add_argument("--save-metrics", metavar="FILE", help="also write the metrics as JSON")
    add_common_arguments(parser)
    parser.add_argument("--tta", action="store_true", default=None,
                        help="OpenMMLab: test-time augmentation from the config's tta_model / "
                        "tta_pipeline (MMSegmentation: scales x0.5-1.75 with flip)")
    parser.add_argument("--show-dir", default=None,
                        help="OpenMMLab: save images painted with the predictions here (mmdet: "
                        "inside the run's folder in the work dir; mmseg: as given)")
    parser.add_argument("--show", action="store_true", default=None,
                        help="OpenMMLab: display the painted predictions")
    parser.add_argument("--wait-time", type=float, default=None,
                        help="OpenMMLab: seconds each image is shown with --show (default 2)")


def run(args: argparse.Namespace) -> int:
    try:
        prepare_run(args)
    except UsageError as err:
        return fail("test", error_text(err))

    if args.family == "detectron2":
        from ..d2.launch import check_args, launch_main, output_dir_of

        ns = d2_namespace(args, eval_only=True, weights=args.checkpoint)
        try:
            check_args(ns)
            check_config_not_overwritten(args.config_path, args.work_dir or output_dir_of(ns),
                                         "config.yaml", bases_only=True)
        except (FileNotFoundError, ValueError) as err:
            return fail("test", error_text(err))
        from ..distributed import LaunchError

        try:
            with reading_images():
                results = launch_main(ns)
        except CHECKPOINT_ERRORS + (ConfigBuildError, FileNotFoundError, LaunchError,
                                    ImageReadError) as err:
            return fail("test", toy_data_hint(args, error_text(err)))
        if results is not None:
            print_metrics(results, args.save_metrics)
        return 0

    from ..mm.runner import build_loops, build_runner, check_test_checkpoint, test_config

    try:
        cfg = test_config(args.config_path, args.checkpoint, work_dir=args.work_dir,
                          trust=args.trust_checkpoint, tta=bool(args.tta),
                          show_dir=args.show_dir, show=bool(args.show),
                          wait_time=2.0 if args.wait_time is None else args.wait_time,
                          cfg_options=overrides(args), launcher=args.launcher or "none",
                          toy_root=args.toy_root)
    except (FileNotFoundError, ValueError, KeyError) as err:
        return fail("test", error_text(err))
    try:  # mmengine writes the config as run to <work dir>/<its file name>
        check_config_not_overwritten(args.config_path, cfg.work_dir,
                                     os.path.basename(args.config_path), bases_only=True)
    except ValueError as err:
        return fail("test", error_text(err))
    from ..distributed import LaunchError, close_process_group

    try:
        runner = build_runner(cfg)
        check_test_checkpoint(runner.model, cfg.load_from)
        build_loops(runner, "test")  # a bad loader / evaluator value: one line
        with reading_images():
            metrics = runner.test()
        close_process_group()
    except CHECKPOINT_ERRORS as err:
        return fail("test", error_text(err))
    except (ConfigBuildError, FileNotFoundError, LaunchError, ImageReadError) as err:  # also the dataset's files
        return fail("test", toy_data_hint(args, error_text(err)))
    print_metrics(metrics, args.save_metrics)
    return 0
