#!/usr/bin/env python
"""Train / evaluate detectron2 models with ResT backbones (yacs yaml or LazyConfig python configs).

Examples::

    # COCO, 8 GPUs, ResTv2-T Mask R-CNN 3x (ImageNet weights in checkpoints/)
    python tools/train_net.py --num-gpus 8 --config-file configs/detectron2/mask_rcnn_restv2_tiny_3x.yaml
    # the same as a LazyConfig
    python tools/train_net.py --num-gpus 8 --config-file configs/detectron2/lazy/mask_rcnn_restv2_tiny_3x.py
    # evaluate a trained model
    python tools/train_net.py --eval-only --config-file ... MODEL.WEIGHTS path/to/model_final.pth
    # toy dataset on CPU (generate it first with tools/make_toy_data.py)
    python tools/train_net.py --config-file configs/detectron2/toy/mask_rcnn_restv2_toy.yaml MODEL.DEVICE cpu

The config type is chosen by extension (``.py`` = LazyConfig) unless ``--lazy`` is given.
Overrides after the options are ``KEY VALUE`` pairs for yaml configs and ``key=value`` for
LazyConfigs. Datasets named ``toy_train`` / ``toy_val`` are registered from ``--toy-root``.
"""
import logging
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.engine import default_argument_parser, launch  # noqa: E402
from detectron2.evaluation import verify_results  # noqa: E402
from detectron2.utils import comm  # noqa: E402

from rest_dense.d2 import RestDetectionCheckpointer, register_toy_datasets  # noqa: E402
from rest_dense.d2.engine import (RestTrainer, default_setup, is_lazy_config,  # noqa: E402
                                  lazy_build_model, lazy_test,
                                  lazy_train, setup_lazy_config, setup_yaml_config)

logger = logging.getLogger("rest_dense.train_net")


def main_yaml(args):
    cfg = setup_yaml_config(args.config_file, args.opts)
    default_setup(cfg, args)
    if args.eval_only:
        model = RestTrainer.build_model(cfg)
        RestDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume)
        res = RestTrainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = RestTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def main_lazy(args):
    cfg = setup_lazy_config(args.config_file, args.opts)
    default_setup(cfg, args)
    if args.eval_only:
        model = lazy_build_model(cfg)
        RestDetectionCheckpointer(model, save_dir=cfg.train.output_dir).resume_or_load(
            cfg.train.init_checkpoint, resume=args.resume)
        return lazy_test(cfg, model)
    return lazy_train(cfg, resume=args.resume)


def main(args):
    if args.cpu_threads > 0:
        torch.set_num_threads(args.cpu_threads)
    register_toy_datasets(args.toy_root)
    lazy = args.lazy or is_lazy_config(args.config_file)
    return (main_lazy if lazy else main_yaml)(args)


def build_parser():
    parser = default_argument_parser()
    parser.add_argument("--lazy", action="store_true",
                        help="treat --config-file as a LazyConfig (default: by extension, .py)")
    parser.add_argument("--toy-root", default=os.environ.get("RESTDENSE_TOY_ROOT", "data/toy"),
                        help="root of the toy COCO dataset registered as toy_train / toy_val")
    parser.add_argument("--cpu-threads", type=int, default=0,
                        help="torch CPU threads (default: torch's choice); 1 is much faster than "
                        "several on a CPU shared with other jobs")
    return parser


if __name__ == "__main__":
    args = build_parser().parse_args()
    if not args.config_file:
        build_parser().error("--config-file is required")
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
