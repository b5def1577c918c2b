"""Export a whole detector / segmenter to ONNX and check it with ONNX Runtime against PyTorch.

MMDetection and MMSegmentation configs are exported with MMDeploy 1.3.1 (deploy configs in
configs/deploy/, plus the fixes it needs on torch 2.13: rest_dense/deploy/mmdeploy_support.py);
detectron2 yaml configs (GeneralizedRCNN: Mask R-CNN / Faster R-CNN; RetinaNet;
SemanticSegmentor, e.g. semantic FPN / VT-FPN) with detectron2's TracingAdapter. Inside the
graph: backbone, neck and heads including box decoding, NMS and the mask head; outside,
identical for both runtimes: resize, normalisation, rescaling boxes and pasting masks
(segmentation: crop, resize, argmax). Height and width are dynamic.

After the export, ONNX Runtime (CPU) and PyTorch run on the same inputs: synthetic pictures of
--check-shapes and the files of --check-images. The command exits non-zero when they disagree
beyond the tolerances (matched boxes --box-atol px, scores --score-atol, mask IoU --mask-iou,
pixels --seg-agreement, segmentation logits --logit-atol if given), on NaN/inf, or when an
image's network input is a size the traced graph is not valid for.

--shape HxW is the network input the graph is traced at (after resize; a multiple of the
model's padding divisor); by default it is chosen so that the graph is valid at every check
image (in the window attention modes windows must fit the maps: see docs/deploy.md).
--benchmark then times both runtimes on the check images (same inputs, --threads threads).

Examples::

    rest-dense export-model configs/toy/mask_rcnn_restv2_toy.py iter_600.pth --out mrcnn.onnx
    rest-dense export-model toy/upernet_restv2_toy.py iter_600.pth --out upernet.onnx \\
        --check-shapes 120x152 136x200 --benchmark --threads 1
    rest-dense export-model configs/detectron2/toy/mask_rcnn_restv2_toy.yaml model_final.pth \\
        --out d2_mrcnn.onnx --check-images data/toy/val/toy_00000.png
    rest-dense export-model retinanet/retinanet_restv2-t_fpn_amp-ms-1x_coco.py retina_t.pth \\
        --out retina.onnx --check-shapes 480x640 --cfg-options model.backbone.attn_mode=hwin
"""
from __future__ import annotations

import argparse
import os
import sys

from ..utils import error_text, fraction, non_negative_float, size_arg
from .outputs import output_problem
from . import fail

HELP = "export a detector / segmenter to ONNX and check it with ONNX Runtime"

_DEFAULT_CHECKS = ("427x640", "375x500")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..deploy.model_onnx import DEFAULT_OPSET, SUPPORTED_OPSETS

    parser.add_argument("config", metavar="CONFIG", help="config file or shipped config name")
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="whole-model checkpoint")
    parser.add_argument("--out", required=True, metavar="FILE.onnx", help="ONNX file to write")
    parser.add_argument("--shape", type=size_arg, metavar="HxW",
                        help="network input to trace at (default: chosen for the check images)")
    parser.add_argument("--check-shapes", type=size_arg, nargs="*", metavar="HxW",
                        help=f"synthetic check images (default: {' '.join(_DEFAULT_CHECKS)})")
    parser.add_argument("--check-images", nargs="*", default=[], metavar="IMAGE",
                        help="image files to check on as well")
    parser.add_argument("--device", default="cpu",
                        help="device for PyTorch and ONNX Runtime (default: cpu)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset: {' or '.join(map(str, SUPPORTED_OPSETS))} "
                             f"(default: {DEFAULT_OPSET})")
    parser.add_argument("--cfg-options", nargs="+", metavar="KEY=VALUE",
                        help="config overrides, e.g. model.backbone.attn_mode=win")
    parser.add_argument("--no-check", action="store_true", help="export only")
    parser.add_argument("--box-atol", type=non_negative_float, default=0.5,
                        help="largest difference of matched box coordinates, px (default: 0.5)")
    parser.add_argument("--score-atol", type=non_negative_float, default=0.005,
                        help="largest score difference of matched detections (default: 0.005)")
    parser.add_argument("--mask-iou", type=fraction, default=0.9,
                        help="smallest IoU of matched masks (default: 0.9)")
    parser.add_argument("--seg-agreement", type=fraction, default=0.999,
                        help="smallest fraction of equal pixels, segmentation (default: 0.999)")
    parser.add_argument("--logit-atol", type=non_negative_float, default=None,
                        help="largest difference of segmentation logits (default: measured as "
                             "max_logit_diff, not held to a bound)")
    parser.add_argument("--benchmark", action="store_true",
                        help="also time ONNX Runtime and PyTorch on the check images")
    from ..utils import positive_int

    parser.add_argument("--runs", type=positive_int, default=10,
                        help="timed runs per image (default: 10)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="CPU threads of both runtimes for checks and timing (default: 1)")
    from .train import add_trust_argument

    add_trust_argument(parser)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..safe_load import trust
    from ..utils import removed_if_left_empty

    sizes = list(args.check_shapes) if args.check_shapes is not None else \
        [size_arg(s) for s in _DEFAULT_CHECKS]
    if args.threads < 1 or args.runs < 1:
        return fail("export-model", "--threads and --runs must be at least 1")
    if not args.no_check and not sizes and not args.check_images:
        return fail("export-model", "nothing to check: give --check-shapes or --check-images, "
                    "or --no-check")
    torch.set_num_threads(args.threads)
    trust(*args.trust_checkpoint)
    # a --out folder this command creates is removed again if it fails
    with removed_if_left_empty(os.path.dirname(os.path.abspath(args.out))) as outcome:
        status = _export_and_check(args, sizes)
        outcome.append(status)
    return status


def _export_and_check(args: argparse.Namespace, sizes) -> int:
    import pickle

    from ..deploy.latency import format_table, measure_latency
    from ..deploy.model_onnx import load_deployment
    from ..deploy.predictions import Tolerances
    from ..run_files import StagedFile
    from ..utils import format_size

    # the one output rule (utils.check_output_path): missing folders are created on writing
    from ..configs import config_files

    problem = output_problem(args.out, "--out", "model.onnx", sources=[
        args.checkpoint, args.config, *config_files(args.config), *args.check_images],
        replaced=True)
    if problem:
        return fail("export-model", problem)
    # the graph gets its name only once it passed the checks (StagedFile); the temporary
    # name ends in .onnx, the one ending MMDeploy writes
    with StagedFile(args.out, ".onnx") as staged:
        try:
            dep = load_deployment(args.config, args.checkpoint, device=args.device,
                                  cfg_options=args.cfg_options, opset=args.opset)
            exp = dep.export(staged.path, shape=args.shape, check_sizes=sizes,
                             check_images=args.check_images)
        except (FileNotFoundError, ValueError, ImportError, OSError,
                pickle.UnpicklingError) as e:
            return fail("export-model", error_text(e))
        size_mb = os.path.getsize(exp.path) / 2 ** 20
        print(f"exported {args.out} ({size_mb:.1f} MiB) with {exp.tool}, opset {exp.opset}, "
              f"traced at network input {format_size(exp.trace_size)}, dynamic height/width, "
              f"{exp.seconds:.1f} s")
        print(f"  inputs {exp.inputs}, outputs {exp.outputs}")
        print(f"  inside the graph: {exp.inside}")
        if exp.min_side > 1:
            print(f"  note: in this attention mode the graph serves backbone inputs of at least "
                  f"{exp.min_side} px a side (each windowed map one window large; smaller ones "
                  f"differ from PyTorch); `rest_dense.min_side` in the graph's metadata says so")
        for p in exp.problems:
            print(f"  warning: the graph is not valid for a check image: {p}", file=sys.stderr)
        if args.no_check:
            _warn_unchecked(dep, exp.trace_size)
            staged.commit()
            return 0
        tol = Tolerances(args.box_atol, args.score_atol, args.mask_iou, args.seg_agreement,
                         score_thr=dep.score_thr(), logit_atol=args.logit_atol)
        results = dep.check(exp.path, sizes, args.check_images, trace_size=exp.trace_size,
                            tolerances=tol, threads=args.threads,
                            on_result=lambda r: print(f"onnxruntime vs pytorch: {r.describe()}",
                                                      flush=True))
        failed = [r for r in results if not r.ok]
        if failed:
            print(f"FAILED: ONNX Runtime disagrees with PyTorch on {len(failed)} of "
                  f"{len(results)} images (see above); {args.out} not written", file=sys.stderr)
            return 1
        staged.commit()
    print(f"ok: ONNX Runtime agrees with PyTorch on {len(results)} images")
    if args.benchmark:
        lat = measure_latency(dep, args.out, sizes, args.check_images, runs=args.runs,
                              threads=args.threads)
        print(format_table([(os.path.basename(args.out), r) for r in lat]))
    return 0


def _warn_unchecked(dep, trace_size) -> None:
    """What --no-check leaves unknown: the graph was compared with PyTorch at no size, and
    serves other sizes only where the backbone takes the branches traced."""
    from ..deploy.shapes import first_unserved_size
    from ..utils import format_size

    print("  warning: --no-check: ONNX Runtime was not compared with PyTorch", file=sys.stderr)
    if dep.backbone is None:
        return
    unserved = first_unserved_size(dep.backbone, trace_size, divisor=dep.divisor)
    if unserved is not None:
        print(f"  warning: the graph (traced at network input {format_size(trace_size)}) differs "
              f"from PyTorch at some network inputs, e.g. {format_size(unserved)} (shape branches "
              "the trace did not take, see docs/deploy.md); check the sizes you will serve with "
              "--check-shapes / --check-images", file=sys.stderr)
