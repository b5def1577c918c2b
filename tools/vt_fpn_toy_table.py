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

from typing import Optional, Sequence

from rest_dense.toy_compare import ToyCompareOptions, ToyRow, run_toy_comparison


def _g(n: Optional[int]) -> str:
    return "–" if n is None else f"{n / 1e9:.3f}"


def _m(n: Optional[int]) -> str:
    return "–" if n is None else f"{n / 1e6:.3f}"


def format_markdown(rows: Sequence[ToyRow], options: Optional[ToyCompareOptions] = None,
                    seconds: Optional[float] = None) -> str:
    """The table (and a line on how it was made) as markdown."""
    options = options or ToyCompareOptions()
    h, w = options.flops_shape
    lines = [
        f"| toolbox | model | config | mIoU untrained | mIoU trained | train s/iter | "
        f"params (M) | neck params (M) | neck GFLOPs | decoder GFLOPs | whole GFLOPs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        e = r.entry
        lines.append(
            f"| {e.toolbox} | {e.model} | `{e.config}` | {r.miou_untrained:.3f} | "
            f"**{r.miou:.3f}** | {r.sec_per_iter:.3f} | {_m(r.params)} | {_m(r.neck_params)} | "
            f"{_g(r.neck_flops)} | {_g(r.decoder_flops)} | {_g(r.flops)} |")
    its = sorted({r.max_iters for r in rows})
    note = (f"\n{', '.join(map(str, its))} iterations of batch 4 per model, seed {options.seed}, "
            f"{options.threads or 'default'} CPU thread(s); FLOPs: fvcore multiply-adds at "
            f"{h}x{w}, one image (decoder = all but the backbone; whole = without the UperNet "
            f"auxiliary head, logits at stride 4).")
    if seconds is not None:
        note += f" The whole run took {seconds / 60:.1f} min."
    return "\n".join(lines) + "\n" + note + "\n"


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
