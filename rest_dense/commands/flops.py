"""Count the parameters and FLOPs (fvcore) of ResT backbones and of whole MMDetection /
MMSegmentation / detectron2 models, with a per-operator breakdown
(conv / linear / matmul / layer_norm / other) next to the ResT papers' figures.

TARGET is a model name (listed below), a config file, a
shipped config name (`rest-dense configs` lists them), a folder of configs, or a neck alone:
`neck:fpn` (plain FPN) or `neck:vt_fpn` (VT-FPN), counted on maps at strides 4..32 of the
input with the channels of --neck-channels. Default input sizes: backbones 224x224,
detection 800x1280, segmentation 512x2048, necks 800x1216; --shape sets one size
(HxW) for every target. Attention products are counted (fused SDPA like the explicit
matmuls); conventions: rest_dense.analysis.CONVENTIONS. --markdown writes the table with the
conventions; docs/flops.md of the repository is that document plus notes on the papers'
figures.

Examples:

    rest-dense flops restv2_tiny                            # 224x224, readable table
    rest-dense flops restv2_tiny --shape 800x1280 --attn-mode win
    rest-dense flops mask_rcnn/mask-rcnn_restv2-t_fpn_amp-ms-1x_coco.py
    rest-dense flops configs/upernet --params-only           # parameters of every config below
    rest-dense flops --all --markdown table.md               # every shipped config
    rest-dense flops neck:fpn neck:vt_fpn --neck-channels resnet50 --shape 473x473
"""
from __future__ import annotations

import argparse
import shlex
import sys

HELP = "parameters and FLOPs of backbones and whole models (fvcore, per-operator breakdown)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..models import ATTN_MODES, list_models

    parser.add_argument("targets", nargs="*", metavar="TARGET",
                        help="model name (" + ", ".join(list_models()) + "), config file, "
                             "shipped config name or folder of configs")
    parser.add_argument("--all", action="store_true",
                        help="every shipped config (skipping frameworks that are not installed and "
                             "configs without a model)")
    parser.add_argument("--shape", metavar="HxW",
                        help="input size for every target, e.g. 800x1280 (default: backbones "
                             "224x224, detection 800x1280, segmentation 512x2048)")
    parser.add_argument("--attn-mode", default="global", choices=ATTN_MODES,
                        help="attention mode of models given by name (configs set their own)")
    parser.add_argument("--params-only", action="store_true",
                        help="only build the models and print their parameter counts")
    parser.add_argument("--math-attn", action="store_true",
                        help="models given by name: count the explicit matmul attention "
                             "instead of the fused SDPA (same FLOPs)")
    parser.add_argument("--check-math", action="store_true",
                        help="models given by name: count both attention paths and fail "
                             "unless the totals are equal")
    parser.add_argument("--cfg-options", nargs="+", metavar="KEY=VALUE", default=None,
                        help="config overrides applied to every config; with neck:... "
                             "targets, the neck's arguments (e.g. num_tokens=4)")
    parser.add_argument("--neck-channels", default="resnet50", metavar="CHANNELS",
                        help="input channels of neck:... targets, finest first: comma-separated "
                             "integers (256,512,1024,2048), resnet50 / resnet101, or a model "
                             "name such as restv2_tiny (its stage widths); default resnet50")
    parser.add_argument("--markdown", metavar="FILE",
                        help="also write the table, with the conventions, as markdown here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from .. import analysis as an
    from ..utils import error_text, format_size, parse_size

    shape = None
    if args.shape:
        try:
            shape = parse_size(args.shape)
        except ValueError as e:
            print(f"rest-dense flops: --shape: {e}", file=sys.stderr)
            return 2
    from ..configs import parse_cfg_options

    try:
        parse_cfg_options(args.cfg_options)  # the same rules every command uses
    except ValueError as e:
        print(f"rest-dense flops: --cfg-options: {e} (put TARGETs before --cfg-options)",
              file=sys.stderr)
        return 2
    from .outputs import output_problem, write_document

    if not args.targets and not args.all:
        print("rest-dense flops: nothing to count: give TARGETs or --all "
              "(e.g. `rest-dense flops restv2_tiny`)", file=sys.stderr)
        return 2
    from .. import neck_analysis as na

    items = [t for t in args.targets if not na.is_neck_target(t)]
    try:
        necks = list(dict.fromkeys(na.neck_name(t) for t in args.targets
                                   if na.is_neck_target(t)))
        if necks:
            na.parse_neck_channels(args.neck_channels)
    except ValueError as e:
        print(f"rest-dense flops: {e}", file=sys.stderr)
        return 2
    try:
        targets = an.resolve_targets(items, all_configs=args.all) if items or args.all else []
    except (ValueError, FileNotFoundError) as e:  # also a config whose _base_ is missing
        print(f"rest-dense flops: {error_text(e)}", file=sys.stderr)
        return 2
    from ..configs import config_files

    read = [f for t in targets if t.kind != "backbone" for f in config_files(t.name)]
    problem = output_problem(args.markdown, "--markdown", "flops.md", sources=read)
    if problem:  # before counting, which can take minutes
        print(f"rest-dense flops: error: {problem}", file=sys.stderr)
        return 2
    neck_kwargs = {}
    if args.cfg_options:
        # configs take them as overrides, neck:... targets as the neck's arguments; model
        # names have no config to override (a count that ignored them would mislead)
        by_name = [t.label for t in targets if t.kind == "backbone"]
        if by_name or (necks and targets):
            print("rest-dense flops: --cfg-options overrides configs, or gives neck:... "
                  "targets their arguments (e.g. num_tokens=4), one kind per run; "
                  + (f"model names ({', '.join(by_name)}) take --attn-mode only: count a "
                     "modified backbone through a config" if by_name else
                     "count the necks and the configs in two runs"), file=sys.stderr)
            return 2
        if necks:
            neck_kwargs = parse_cfg_options(args.cfg_options)

    from tqdm import tqdm

    def show(r: "an.AnalysisResult") -> None:
        # tqdm.write keeps the progress bar below the printed results
        tqdm.write(an.format_params(r) if args.params_only else an.format_breakdown(r))

    results = []
    for name in necks:
        try:
            results.append(na.analyze_neck(name, args.neck_channels, shape,
                                           params_only=args.params_only, **neck_kwargs))
        except (TypeError, ValueError) as e:  # a neck argument it does not take, or refuses
            print(f"rest-dense flops: neck:{name}: {error_text(e)}", file=sys.stderr)
            return 2
        show(results[-1])
    try:
        results += an.analyze(targets, shape, args.attn_mode, fused_attn=not args.math_attn,
                              params_only=args.params_only, cfg_options=args.cfg_options,
                              progress=not args.no_progress, skip_unsupported=args.all,
                              on_result=show)
    except (ValueError, FileNotFoundError) as e:
        print(f"rest-dense flops: {error_text(e)}", file=sys.stderr)
        return 2
    if not results:  # --all with every target skipped (their toolboxes missing)
        print("rest-dense flops: no target could be counted (see the skipped ones above)",
              file=sys.stderr)
        return 1
    if args.check_math and not args.params_only:
        for target, r in zip([t for t in targets if t.kind == "backbone"],
                             [r for r in results if r.framework == "backbone"]):
            other = an.analyze_backbone(target.name, r.shape, args.attn_mode,
                                        fused_attn=args.math_attn)
            if other.flops.total != r.flops.total:
                print(f"rest-dense flops: {target.name}: fused attention {r.flops.total} FLOPs "
                      f"!= math path {other.flops.total}", file=sys.stderr)
                return 1
            r.notes.append("fused == math path")
            print(f"{target.name} {format_size(r.shape)}: fused == math path "
                  f"({r.flops.total / 1e9:.2f} GFLOPs)")
    if not args.params_only:
        print()
        print(an.format_table(results))
    if args.markdown:
        print()
        return write_document("flops", args.markdown,
                              markdown_document(results, "rest-dense " + _reconstruct(args)))
    return 0


def _reconstruct(args: argparse.Namespace) -> str:
    """The command line of ``args``, quoted in the markdown document."""
    parts = ["flops", *args.targets]
    if args.all:
        parts.append("--all")
    if args.shape:
        parts += ["--shape", args.shape]
    if args.attn_mode != "global":
        parts += ["--attn-mode", args.attn_mode]
    if any(t.lower().startswith("neck:") for t in args.targets):
        parts += ["--neck-channels", args.neck_channels]
    for flag in ("params_only", "math_attn", "check_math"):
        if getattr(args, flag):
            parts.append("--" + flag.replace("_", "-"))
    if args.cfg_options:
        parts += ["--cfg-options", *args.cfg_options]
    parts += ["--markdown", args.markdown]
    return shlex.join(parts)


def markdown_table(results) -> str:
    """A markdown table of ``rest_dense.analysis.AnalysisResult`` s: parameters, GFLOPs
    (total, without the attention products, per group), the papers' figures and notes.
    Parameters-only results leave the FLOP columns empty. No trailing newline."""
    from ..analysis import GROUPS

    def g(n: float) -> str:
        return f"{n / 1e9:.2f}"

    head = ("| target | framework | input (H×W) | params (M) | backbone params (M) | "
            "paper params (M) | GFLOPs | GFLOPs excl. matmul | paper GFLOPs | conv | linear | "
            "matmul | layer_norm | other | notes |")
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        pp = "" if r.paper_params is None else f"{r.paper_params:g}"
        bp = "" if r.backbone_params is None else f"{r.backbone_params / 1e6:.3f}"
        if r.flops is not None:
            groups = r.flops.groups
            flops = [g(r.flops.total), g(r.flops.total - groups["matmul"])]
            cells = [g(groups[k]) for k in GROUPS]
        else:
            flops, cells = ["", ""], [""] * len(GROUPS)
        lines.append(
            f"| {r.target} | {r.framework} | {r.shape[0]}×{r.shape[1]} | {r.params / 1e6:.3f} | "
            f"{bp} | {pp} | {' | '.join(flops)} | {r.paper_flops or ''} | "
            + " | ".join(cells) + f" | {'; '.join(r.notes)} |")
    return "\n".join(lines)


def markdown_document(results, command: str) -> str:
    """The markdown document ``--markdown`` writes: title, the command line that produced
    it (``command``), the counting conventions and :func:`markdown_table`; ends with a
    newline."""
    from importlib import metadata

    import torch

    from ..analysis import CONVENTIONS

    try:
        fvcore = metadata.version("fvcore")
    except metadata.PackageNotFoundError:
        fvcore = "?"
    return (
        "# Parameters and FLOPs\n\n"
        f"Generated by `{command}` (fvcore {fvcore}, torch {torch.__version__}).\n"
        "GFLOPs are 10^9 multiply-accumulates; the columns conv … other split them by operator "
        "(matmul = attention products, explicit or fused). \"paper\" columns: the ResTv2 / ResTv1 "
        "papers (detection: detectron2 Mask R-CNN, \"1280×800\"; segmentation: UperNet, "
        "\"2048×512\"; backbones at 224: the ImageNet classifiers) and, for the dense "
        "ResTv2-T backbone at 800×1280, the authors' released code measured with fvcore.\n\n"
        "Conventions:\n\n" + CONVENTIONS + "\n\n" + markdown_table(results) + "\n")
