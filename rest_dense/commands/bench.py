"""Time ResT backbones (and Swin-T, and whole Mask R-CNN / UperNet models): latency,
throughput and peak memory, in inference or training, on the CPU or a GPU.

Every combination of the options is one row, all from one run, with the same weights in
every row of a model; speed-ups are relative to the first row of the same size, batch,
mode and dtype. Peak memory: on the CPU the peak-RSS growth of a second pass in a fresh
process per row, on CUDA torch.cuda.max_memory_allocated. Attention implementations:
auto (our default: the kernel the dispatch picks), sdpa (fused), explicit (the whole
attention matrix), chunked (explicit, by blocks of queries), math (plain modules, explicit
attention matrix), released (the same weights
in the released code's layout, rest_dense.reference; ResTv2 global only). swin_tiny is
MMDetection's SwinTransformer from its Mask R-CNN Swin-T config (window 7); configs
(--configs) time the whole model's predict. Combinations that do not apply (e.g.
released with window attention) are left out with a note.

Examples:

    rest-dense bench restv2_tiny --shape 800x1216 224x224 --batch 1 8 \\
        --attn-impls sdpa math released --threads 2
    rest-dense bench restv2_tiny --attn-modes global win cwin hwin --mode infer train
    rest-dense bench restv2_tiny swin_tiny --configs \\
        mask_rcnn/mask-rcnn_restv2-t_fpn_amp-ms-1x_coco.py \\
        mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py
    rest-dense bench restv2_tiny swin_tiny --shape 512x512 800x1216 1024x2048 2048x2048 \\
        --attn-modes global win cwin hwin --mode infer train --plot scaling.png
    rest-dense bench restv2_tiny --shape 512x512 --batch 2 --mode train \\
        --attn-impls sdpa released --with-cp none mlp block
    rest-dense bench restv2_tiny --device cuda --dtypes fp32 bf16 fp16
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

from ..utils import error_text, make_parent_folder
from .outputs import output_problem, write_document

if TYPE_CHECKING:
    from ..benchmark import BenchRow
    from ..neck_bench import NeckBenchRow

HELP = "latency, throughput and peak memory of backbones and whole models (CPU or CUDA)"



def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..utils import non_negative_float, positive_int

    # rest_dense.benchmark imports torch only (frameworks are imported when a row needs them)
    from ..benchmark import ATTN_IMPLS, ATTN_MODES, CP_LEVELS, DTYPES, RUN_MODES, SWIN_MODELS
    from ..models import list_models

    parser.add_argument("models", nargs="*", metavar="MODEL",
                        help="backbones: " + ", ".join([*list_models(), *SWIN_MODELS]) + "; "
                             "or the necks alone: neck:fpn, neck:vt_fpn (see --neck-channels) "
                             "(default: restv2_tiny unless --configs is given)")
    parser.add_argument("--neck-channels", default="restv2_tiny", metavar="CHANNELS",
                        help="neck:fpn / neck:vt_fpn targets: the backbone maps' channels, a "
                             "model name (restv2_tiny), a preset (resnet50) or a list "
                             "(96,192,384,768) (default: restv2_tiny)")
    parser.add_argument("--configs", nargs="+", default=[], metavar="CONFIG",
                        help="whole MMDetection / MMSegmentation models (inference): config "
                             "files, shipped config names or mmdet::/mmseg:: package configs")
    parser.add_argument("--shape", nargs="+", default=["800x1216"], metavar="HxW",
                        help="input sizes (default: 800x1216)")
    parser.add_argument("--batch", nargs="+", type=int, default=[1], metavar="N",
                        help="batch size: one for every size, or one per size (default: 1)")
    parser.add_argument("--attn-modes", nargs="+", default=["global"], choices=ATTN_MODES,
                        help="attention modes of the ResT models (default: global)")
    parser.add_argument("--attn-impls", nargs="+", default=["auto"], choices=ATTN_IMPLS,
                        help="attention implementations: auto (the kernel the model picks per "
                             "device, dtype and size; a note says which), sdpa / explicit / "
                             "chunked (that kernel forced), math (plain modules, explicit attention), released "
                             "(the released code's layout) (default: auto)")
    parser.add_argument("--mode", nargs="+", default=["infer"], choices=RUN_MODES,
                        help="infer: forward in inference mode; train: forward + backward in "
                             "train mode (backbones; loss = sum of the outputs' means)")
    parser.add_argument("--dtypes", nargs="+", default=["fp32"], choices=tuple(DTYPES),
                        help="fp32, or bf16 / fp16 under torch.autocast (default: fp32)")
    parser.add_argument("--with-cp", nargs="+", default=["none"], choices=CP_LEVELS,
                        dest="with_cp",
                        help="memory levels of training rows: none (keep activations), mlp "
                             "(recompute ResT's MLP hidden maps), block (recompute whole "
                             "blocks) (default: none)")
    parser.add_argument("--device", default=None,
                        help="cpu or cuda[:i] (default: cuda when available, else cpu)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    parser.add_argument("--warmup", type=int, default=2, help="untimed passes per row (default: 2)")
    parser.add_argument("--iters", type=int, default=5, help="timed passes per row (default: 5)")
    parser.add_argument("--interleave", action="store_true",
                        help="time the rows of each size / batch / mode / dtype in turn, one "
                             "pass each per round (--iters rounds), and report each row's "
                             "fastest pass: ratios that a drifting machine cannot skew")
    parser.add_argument("--min-time", type=non_negative_float, default=0.0,
                        help="time each row for at least this many seconds")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--markdown", metavar="FILE", help="also write the table here")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="plot time and memory against input size (matplotlib)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import benchmark as bm
    from ..utils import parse_size

    try:
        sizes = [parse_size(s) for s in args.shape]
    except ValueError as e:
        print(f"rest-dense bench: error: --shape: {e}", file=sys.stderr)
        return 2
    from ..configs import DETECTRON2, config_framework

    for config in args.configs:  # the same rule (and pkg::path names) as every command
        try:
            framework = config_framework(config)
        except (ValueError, FileNotFoundError) as e:
            print(f"rest-dense bench: error: --configs: {error_text(e)}", file=sys.stderr)
            return 2
        if framework in DETECTRON2:
            print(f"rest-dense bench: error: --configs: {config} is a detectron2 config ({framework}); "
                  "bench times MMDetection / MMSegmentation models only (detectron2 models: "
                  "`rest-dense flops` counts them, `rest-dense export-model --benchmark` "
                  "times them)", file=sys.stderr)
            return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        bm.check_device(device)
    except ValueError as err:
        print(f"rest-dense bench: error: --device: {err}", file=sys.stderr)
        return 2
    necks = [m for m in args.models if m.startswith("neck:")]
    models = [m for m in args.models if not m.startswith("neck:")]
    # what can be refused is refused before any timing: a long run must not end in an error
    if necks and (len(set(args.batch)) != 1 or len(args.dtypes) != 1):
        print(_NECK_OPTIONS_ERROR, file=sys.stderr)
        return 2
    from ..configs import config_files
    from ..utils import same_file

    read = [f for config in args.configs for f in config_files(config)]
    for opt, path, example in (("--markdown", args.markdown, "bench.md"),
                               ("--plot", args.plot, "bench.png")):
        problem = output_problem(path, opt, example, sources=read)
        if problem:
            print(f"rest-dense bench: error: {problem}", file=sys.stderr)
            return 2
    if args.markdown and args.plot and (same_file(args.markdown, args.plot) or os.path.realpath(
            args.markdown) == os.path.realpath(args.plot)):
        print(f"rest-dense bench: error: --markdown and --plot name the same file "
              f"{args.plot!r}", file=sys.stderr)
        return 2
    if args.plot:  # before any timing, not after
        from ..utils import require_package

        require_package("matplotlib", "--plot draws with it")
        from matplotlib.figure import Figure

        formats = sorted(Figure().canvas.get_supported_filetypes())
        if os.path.splitext(args.plot)[1].lower().lstrip(".") not in formats:
            print(f"rest-dense bench: error: --plot {args.plot!r}: give a file ending in one of "
                  f".{', .'.join(formats)} (the ending picks the image format)", file=sys.stderr)
            return 2
    if necks and not models and not args.configs:
        if args.plot:
            print("rest-dense bench: error: --plot draws backbone and whole-model rows; the neck "
                  "rows (neck:NAME) are a table only", file=sys.stderr)
            return 2
        return _run_necks(args, necks, sizes, device)
    models = models or ([] if args.configs else ["restv2_tiny"])
    try:
        rows = bm.run_benchmark(models, sizes, args.batch, args.attn_modes, args.attn_impls,
                                args.mode, args.dtypes, args.configs, device=device,
                                threads=args.threads, warmup=args.warmup, iters=args.iters,
                                min_time=args.min_time, memory=not args.no_memory,
                                progress=not args.no_progress, cp_levels=args.with_cp,
                                interleave=args.interleave)
    except (ValueError, FileNotFoundError) as e:
        print(f"rest-dense bench: error: {error_text(e)}", file=sys.stderr)
        return 2
    try:
        notes = bm.autocast_notes(rows, device)
    except ValueError as e:  # non-finite reduced-precision outputs: say so, keep the table
        notes = [f"autocast check failed: {e}"]
    notes += bm.attention_notes(rows, device)
    if args.interleave:
        notes += round_ratio_notes(rows)
    text = markdown_document(rows, device, "rest-dense " + _command_line(args), notes)
    print(text, end="")
    if necks:  # the necks alone, in the same run, as a second table
        neck_text = _neck_table(args, necks, sizes, device)
        if neck_text is None:
            return 2
        text += "\n## Necks alone\n\n" + neck_text
        print("\n" + neck_text, end="")
    status = write_document("bench", args.markdown, text)
    if args.plot:
        try:
            plot_rows(rows, args.plot, device)
            print(f"wrote {args.plot}")
        except OSError as e:
            print(f"rest-dense bench: error: --plot: cannot write {args.plot!r}: {e}",
                  file=sys.stderr)
            status = 2
    return status


_NECK_OPTIONS_ERROR = "rest-dense bench: error: neck rows take one --batch and one --dtypes value"


def _command_line(args: argparse.Namespace) -> str:
    """The bench command line of ``args`` (quoted in the markdown)."""
    parts = ["bench", *args.models]
    if args.configs:
        parts += ["--configs", *args.configs]
    parts += ["--shape", *args.shape, "--batch", *map(str, args.batch)]
    for opt in ("attn_modes", "attn_impls", "mode", "dtypes", "with_cp"):
        parts += ["--" + opt.replace("_", "-"), *getattr(args, opt)]
    for opt in ("device", "threads"):
        if getattr(args, opt):
            parts += ["--" + opt, str(getattr(args, opt))]
    parts += ["--warmup", str(args.warmup), "--iters", str(args.iters)]
    if args.min_time:
        parts += ["--min-time", str(args.min_time)]
    if getattr(args, "interleave", False):
        parts.append("--interleave")
    if args.no_memory:
        parts.append("--no-memory")
    return shlex.join(parts)


def _neck_table(args: argparse.Namespace, necks, sizes, device: str):
    """The markdown table of ``neck:fpn`` / ``neck:vt_fpn`` rows (the necks alone on a
    backbone's maps), or None after printing an error."""
    import torch

    from .. import benchmark as bm
    from ..neck_bench import run_neck_benchmark

    try:  # one --batch and one --dtypes value: run() checked that before any timing
        rows = run_neck_benchmark(necks, args.neck_channels, sizes, args.mode, args.dtypes[0],
                                  args.batch[0], device=device, warmup=args.warmup,
                                  iters=args.iters, min_time=args.min_time,
                                  memory=not args.no_memory, threads=args.threads,
                                  log=None if args.no_progress else print)
    except (ValueError, FileNotFoundError) as e:
        print(f"rest-dense bench: error: {error_text(e)}", file=sys.stderr)
        return None
    if args.threads:
        torch.set_num_threads(args.threads)
    return (f"On {bm.describe_device(device)}, torch {torch.__version__}; necks on "
            f"{args.neck_channels} maps.\n\n" + format_neck_table(rows) + "\n")


def _run_necks(args: argparse.Namespace, necks, sizes, device: str) -> int:
    """Only ``neck:NAME`` targets: their table."""
    table = _neck_table(args, necks, sizes, device)
    if table is None:
        return 2
    text = f"Generated by `rest-dense {_command_line(args)}`.\n\n" + table
    print(text, end="" if text.endswith("\n") else "\n")
    return write_document("bench", args.markdown, text)


# ------------------------------------------------------------------ output
def format_markdown(rows: Sequence["BenchRow"]) -> str:
    """A markdown table of rows; the speed-up is relative to the first row with the same
    input size, batch, run mode and dtype.

    Args:
        rows: from :func:`rest_dense.benchmark.run_benchmark`.

    Returns:
        The table, without a trailing newline.
    """
    with_cp = any(r.case.with_cp != "none" for r in rows)
    head = ("| model | attn_mode | attention | input (HxW) | batch | mode | dtype | "
            + ("with_cp | " if with_cp else "")
            + "ms/iter | img/s | peak mem (MiB) | speed-up |")
    lines = [head, "|---|---|---|---|---:|---|---|" + ("---|" if with_cp else "")
             + "---:|---:|---:|---:|"]
    baseline: Dict[Tuple, float] = {}
    for r in rows:
        c = r.case
        base = baseline.setdefault(c.group_key, r.ms)
        peak = f"{r.peak_mb:.0f}" if r.peak_mb is not None else "-"
        lines.append(f"| {c.label} | {c.mode_label} | {c.attn_impl} | {c.size[0]}x{c.size[1]} | "
                     f"{c.batch} | {c.mode} | {c.dtype} | "
                     + (f"{c.with_cp} | " if with_cp else "")
                     + f"{r.ms:.1f} | {r.imgs_per_s:.2f} | "
                     f"{peak} | {base / r.ms:.2f}x |")
    return "\n".join(lines)


def round_ratio_notes(rows: Sequence["BenchRow"]) -> List[str]:
    """A line per interleaved row after its group's first: the median and range of its
    per-round speed-ups (:func:`rest_dense.benchmark.round_ratios`)."""
    from .. import benchmark as bm

    notes = []
    for row, base, ratios in bm.round_ratios(rows):
        if not ratios:
            continue
        notes.append(f"{row.case.note_name}: per-round speed-up against "
                     f"{base.case.note_name} median {statistics.median(ratios):.2f}x "
                     f"(range {min(ratios):.2f}-{max(ratios):.2f} over {len(ratios)} rounds)")
    return notes


def markdown_document(rows: Sequence["BenchRow"], device: str = "cpu",
                      command: Optional[str] = None, notes: Sequence[str] = ()) -> str:
    """The text ``rest-dense bench --markdown`` writes: a line on the setup, then the table.

    Args:
        rows: from :func:`rest_dense.benchmark.run_benchmark`.
        device: the device they ran on.
        command: the command line (quoted when given).
        notes: lines listed under the table (e.g. :func:`rest_dense.benchmark.autocast_notes`).

    Returns:
        The document, ending with a newline.
    """
    import torch

    from .. import benchmark as bm

    iters = min((r.iters for r in rows), default=0)
    how = (f"fastest of {iters} interleaved passes" if command and "--interleave" in command
           else f"median of >= {iters} timed passes")
    if all(r.peak_mb is None for r in rows):
        memory = "not measured"
    elif device.startswith("cuda"):
        memory = "torch.cuda.max_memory_allocated growth"
    else:
        memory = "peak-RSS growth over the second pass in a fresh process"
    text = (f"On {bm.describe_device(device)}, torch {torch.__version__}, {how}; peak memory: "
            f"{memory}.\n")
    if command:
        text += f"Generated by `{command}`.\n"
    text += "\n" + format_markdown(rows) + "\n"
    if notes:
        text += "\n" + "".join(f"- {n}\n" for n in notes)
    return text


def plot_rows(rows: Sequence["BenchRow"], path: str, device: str = "cpu",
              title: Optional[str] = None) -> str:
    """Plot time and peak memory against input pixels, one line per model / attention
    mode / implementation / run mode / dtype (matplotlib, log-log axes).

    Args:
        rows: from :func:`rest_dense.benchmark.run_benchmark` (several sizes make lines; one size, points).
        path: the PNG to write.
        device: the device they ran on (for the default title).
        title: figure title (default: the device and torch version).

    Returns:
        ``path``.
    """
    import matplotlib
    import torch

    from .. import benchmark as bm

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: Dict[str, List["BenchRow"]] = {}
    for r in rows:
        c = r.case
        name = c.label
        if c.attn_impl != "-":
            name += f" {c.mode_label}" + ("" if c.attn_impl == "auto" else f" ({c.attn_impl})")
        name += f" {c.mode}" + ("" if c.dtype == "fp32" else f" {c.dtype}")
        name += "" if c.with_cp == "none" else f" with_cp={c.with_cp}"
        series.setdefault(name, []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for name, rs in series.items():
        rs = sorted(rs, key=lambda r: r.case.batch * r.case.size[0] * r.case.size[1])
        px = [r.case.batch * r.case.size[0] * r.case.size[1] / 1e6 for r in rs]
        style = "--" if rs[0].case.mode == "train" else "-"
        axes[0].plot(px, [r.ms for r in rs], style, marker="o", label=name)
        mem = [(p, r.peak_mb) for p, r in zip(px, rs) if r.peak_mb is not None]
        if mem:
            axes[1].plot(*zip(*mem), style, marker="o", label=name)
    for ax, ylabel in zip(axes, ("ms per pass", "peak memory (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("input megapixels (batch x H x W)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title or f"{bm.describe_device(device)}, torch {torch.__version__}")
    fig.tight_layout()
    fig.savefig(make_parent_folder(path), dpi=120)
    plt.close(fig)
    return path


def format_neck_table(rows: Sequence["NeckBenchRow"]) -> str:
    """A markdown table: one line per size and mode with each neck's time, peak memory and
    GFLOPs, and VT-FPN's time relative to the FPN's where both were measured."""
    groups: dict = {}
    necks: List[str] = []
    for r in rows:
        key = (r.case.size, r.case.mode, r.case.dtype, r.case.batch)
        groups.setdefault(key, {})[r.case.neck] = r
        if r.case.neck not in necks:
            necks.append(r.case.neck)
    head = ["input", "mode"]
    for n in necks:
        head += [f"{n} GFLOPs", f"{n} ms", f"{n} peak MiB"]
    both = {"fpn", "vt_fpn"} <= set(necks)
    if both:
        head += ["vt_fpn / fpn time", "vt_fpn / fpn FLOPs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (size, mode, dtype, batch), by in groups.items():
        cells = [f"{size[0]}x{size[1]}" + (f" x{batch}" if batch > 1 else ""),
                 mode + ("" if dtype == "fp32" else f" {dtype}")]
        for n in necks:
            r = by.get(n)
            cells += ["-" if r is None or r.gflops is None else f"{r.gflops:.1f}",
                      "-" if r is None else f"{r.ms:.1f}",
                      "-" if r is None or r.peak_mb is None else f"{r.peak_mb:.0f}"]
        if both:
            f, v = by.get("fpn"), by.get("vt_fpn")
            cells.append(f"{v.ms / f.ms:.2f}" if f and v else "-")
            cells.append(f"{v.gflops / f.gflops:.2f}" if f and v and f.gflops and v.gflops
                         else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
