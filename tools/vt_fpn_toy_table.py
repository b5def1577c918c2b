"""Semantic FPN, VT-FPN and UperNet side by side on the toy segmentation data, in
MMSegmentation and detectron2 (same backbone, data, schedule and iterations): mIoU untrained
and trained, training time per iteration, parameters and neck / decoder / whole-model FLOPs,
as one markdown table (rest_dense.toy_compare).

    python tools/vt_fpn_toy_table.py --max-iters 300 --threads 1
    python tools/vt_fpn_toy_table.py --max-iters 300 --markdown table.md
"""
import argparse
import sys
import time

from rest_dense.toy_compare import ToyCompareOptions, format_markdown, run_toy_comparison


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-iters", type=int, default=300, help="training iterations per model (300)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1)")
    p.add_argument("--data-root", default="data/toy", help="toy data, written if missing")
    p.add_argument("--work-dir", default="work_dirs/vt_fpn_toy", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", metavar="FILE", help="also write the table here")
    args = p.parse_args(argv)
    options = ToyCompareOptions(max_iters=args.max_iters, threads=args.threads,
                                data_root=args.data_root, work_dir=args.work_dir, seed=args.seed)
    try:
        options.validate()
    except ValueError as err:
        p.error(str(err))
    t = time.time()
    rows = run_toy_comparison(options)
    text = format_markdown(rows, options, seconds=time.time() - t)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
