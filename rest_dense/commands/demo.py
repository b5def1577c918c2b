"""End-to-end demo: train and evaluate a small ResTv2 on synthetic toy-shapes data, on CPU.

Writes the toy dataset if it is missing (--data-root), evaluates the randomly initialised
model, trains it with mmengine's Runner (log lines show the progress), evaluates it again
and saves a picture of predictions next to the ground truth. Ends with a summary; every
task's folder under --work-dir holds the log, the checkpoint, metrics.json and the picture.

Examples:

  rest-dense demo                        # Mask R-CNN (MMDetection), a few minutes on 2 cores
  rest-dense demo --task seg             # UperNet (MMSegmentation)
  rest-dense demo --task vt_fpn          # VT-FPN (sem_fpn: semantic FPN), same backbone/data
  rest-dense demo --task all --threads 1 # both, one CPU thread
  rest-dense demo --max-iters 20         # quick smoke run
  rest-dense demo --max-iters 0          # evaluate the untrained model only
  bash tools/run_main.sh                 # in a clone: set up the environment, then the demo

On a CPU shared with other work, `--threads 1` (and OMP_WAIT_POLICY=PASSIVE in the
environment) keeps OpenMP workers from spinning.
"""
from __future__ import annotations

import argparse
import sys
import time

from ..utils import positive_int

HELP = "train and evaluate a small ResTv2 on synthetic toy data (end-to-end demo)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument("--task", choices=("det", "seg", "sem_fpn", "vt_fpn", "all"), default="det",
                   help="det: Mask R-CNN (default); seg: UperNet; sem_fpn: semantic FPN; "
                   "vt_fpn: VT-FPN (the three segmenters share backbone, data and schedule); "
                   "all: det and seg")
    p.add_argument("--work-dir", default="work_dirs/toy_demo",
                   help="output folder (default: work_dirs/toy_demo)")
    p.add_argument("--data-root", default="data/toy",
                   help="toy dataset root, written if missing (default: data/toy)")
    p.add_argument("--max-iters", type=int, default=None,
                   help="training iterations (default: the config's, 600); 0 evaluates the "
                   "untrained model only")
    p.add_argument("--batch", "--batch-size", dest="batch_size", type=int, default=None,
                   help="training batch size (default: the config's)")
    p.add_argument("--lr", type=float, default=None, help="base learning rate (default: the config's)")
    p.add_argument("--num-train", type=int, default=300, help="toy training images (default: 300)")
    p.add_argument("--num-val", type=int, default=50, help="toy validation images (default: 50)")
    p.add_argument("--size", default="128", metavar="S|SxS",
                   help="toy image size in pixels; the scenes are square (default: 128)")
    p.add_argument("--class-color-prob", type=float, default=0.75,
                   help="toy data: probability that a shape is coloured from its class's hue range")
    p.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: torch's choice, i.e. OMP_NUM_THREADS or all cores)")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip evaluating the randomly initialised model before training")
    p.add_argument("--num-vis", type=int, default=4, help="validation images in the picture (default: 4)")
    p.add_argument("--score-thr", type=float, default=0.5, help="score threshold for drawn detections")
    p.add_argument("--log-interval", type=int, default=None, help="iterations between log lines")
    p.add_argument("--quiet", action="store_true",
                   help="mmengine logs at WARNING level (progress and summary still printed)")
    p.add_argument("--cfg-options", nargs="+", default=None, metavar="KEY=VALUE",
                   help="override config entries, e.g. model.decode_head.channels=128 "
                   "(applied after the options above)")


def run(args: argparse.Namespace) -> int:
    from ..demo import DemoOptions, format_summary, run_demo
    from ..utils import parse_size

    try:
        height, width = parse_size(args.size)
        if height != width:
            raise ValueError(f"--size {args.size}: the toy scenes are square, give S or SxS")
    except ValueError as err:
        print(f"rest-dense demo: error: {err}", file=sys.stderr)
        return 2
    options = DemoOptions(
        task=args.task, work_dir=args.work_dir, data_root=args.data_root, max_iters=args.max_iters,
        batch_size=args.batch_size, lr=args.lr, num_train=args.num_train, num_val=args.num_val,
        size=height, class_color_prob=args.class_color_prob, seed=args.seed,
        threads=args.threads, baseline=not args.no_baseline, num_vis=args.num_vis,
        score_thr=args.score_thr, log_interval=args.log_interval, quiet=args.quiet,
        cfg_options=args.cfg_options)
    try:
        options.validate()
    except ValueError as err:
        print(f"rest-dense demo: error: {err}", file=sys.stderr)
        return 2
    t0 = time.time()
    from ..runlock import FolderBusyError

    try:
        summaries = run_demo(options)
    except (ValueError, FolderBusyError) as err:  # a bad override, path, or a busy folder
        print(f"rest-dense demo: error: {err}", file=sys.stderr)
        return 2
    for summary in summaries:
        print("\n" + format_summary(summary))
    print(f"\n[demo] done in {time.time() - t0:.0f} s")
    return 0
