"""Export a ResT backbone to ONNX (dynamic batch / height / width) and check it against eager
PyTorch with onnxruntime; optionally check torch.compile against eager too.

MODEL is a registered name (restv2_tiny, ...) or a checkpoint file (variant inferred, weights
loaded). The command exits non-zero when a check fails: an output differs by more than --atol,
or either side has non-finite values.

A dynamic graph is traced at --shape (default: chosen automatically) which must make every
shape-dependent branch run: each stage's map not a multiple of its sr_ratio and, in the window
modes, larger than and not a multiple of its window. In the window modes a dynamic graph is
valid only for H, W >= 4 * 2**i * window_size[i] - (4 * 2**i - 1) for every windowed stage i
(253 for the default windows 64/32/16/8): the eager model shrinks windows larger than the map,
which a traced graph cannot. Global mode has no limit. With --static the graph is fixed to
--batch x --shape and is exact there. ResTv1 graphs keep its float64 head mixing in ops that
onnxruntime's CPU provider runs (MatMul, Softmax, mean/variance).

--compile checks torch.compile against eager at the check sizes: one static compile per size
by default in the window modes, symbolic sizes after the first in global mode; --dynamic
compiles with symbolic height/width from the start. --program FILE.pt2 writes a torch.export
program (dynamic height/width; with --static the one --batch x --shape) and checks it; a
dynamic program whose shape guards would refuse ordinary sizes (the model branches on the
input size) is refused rather than written. Dynamic height/width with torch.compile /
torch.export works in global mode only: in the window modes PyTorch's shape solver does not
finish (tens of seconds to minutes per operator), so --dynamic and a dynamic --program are
refused there before anything runs; the ONNX graph is dynamic in every mode.

Examples::

    rest-dense export restv2_tiny --out restv2_tiny.onnx
    rest-dense export restv2_tiny --attn-mode hwin --checkpoint restv2_tiny_224.pth
    rest-dense export restv2_tiny_224.pth --check-shapes 320x480 257x391 800x1216 --batch 2
    rest-dense export restv2_tiny --static --shape 800x1216 --out restv2_tiny_800.onnx
    rest-dense export restv2_tiny --no-onnx --compile inductor --check-shapes 800x1216
    rest-dense export restv2_tiny --no-onnx --compile aot_eager --dynamic
    rest-dense export restv2_tiny --attn-mode win --static --shape 800x1216 --program win.pt2
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from typing import Optional

# light: torch and the core models (which the package imports); onnx is imported when used
from ..deploy.backbone_onnx import DEFAULT_CHECK_SIZES, DEFAULT_OPSET
from ..models import ATTN_MODES
from ..utils import check_output_path, error_text, format_size, size_arg
from . import fail

HELP = "export a backbone to ONNX and check ONNX / torch.compile against eager PyTorch"

_DEFAULT_CHECKS = " ".join(format_size(s) for s in DEFAULT_CHECK_SIZES)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="registered name (restv2_tiny, restv2_small, ...) or a checkpoint file")
    parser.add_argument("--attn-mode", default="global", choices=ATTN_MODES,
                        help="ResTv2 attention mode (default: global)")
    parser.add_argument("--window-size", type=int, nargs="+", metavar="N",
                        help="window side per stage (1 or 4 values; default: the model's)")
    parser.add_argument("--checkpoint", metavar="FILE",
                        help="weights for a named MODEL (any released layout); default: random")
    parser.add_argument("--out", metavar="FILE.onnx",
                        help="ONNX file (default: <model>[_<attn-mode>].onnx)")
    parser.add_argument("--shape", type=size_arg, metavar="HxW",
                        help="input size to trace at (dynamic: default chosen automatically; "
                             "--static: required)")
    parser.add_argument("--static", action="store_true",
                        help="no dynamic sizes: the ONNX graph is fixed to --batch x --shape and "
                             "checked there; torch.compile(dynamic=False)")
    parser.add_argument("--check-shapes", type=size_arg, nargs="*", metavar="HxW",
                        help=f"sizes to compare at (default: {_DEFAULT_CHECKS}; with "
                             "--static: --shape); give none to skip the checks")
    parser.add_argument("--batch", type=int, default=1, help="batch size of the checks (default: 1)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset (default: {DEFAULT_OPSET})")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="fail above this max abs difference (default: 1e-4)")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX export and its checks")
    parser.add_argument("--compile", metavar="BACKEND", nargs="?", const="inductor",
                        help="also check torch.compile (default backend: inductor)")
    parser.add_argument("--dynamic", action="store_true",
                        help="torch.compile with dynamic=True (symbolic height/width from the "
                             "first size); global attention only")
    parser.add_argument("--program", metavar="FILE.pt2",
                        help="also write a torch.export program (dynamic height/width, global "
                             "attention only; --static: the one --shape, every mode) and check it")


def _fail(message: str, code: int = 2) -> int:
    return fail("export", message, code)


def _check_arguments(args: argparse.Namespace) -> Optional[str]:
    """What is wrong with the options alone (before a model is built), or None."""
    from torch.onnx import _constants

    if args.batch < 1:
        return f"--batch must be at least 1, got {args.batch}"
    if not (math.isfinite(args.atol) and args.atol >= 0):
        return f"--atol must be a finite number >= 0, got {args.atol}"
    from ..deploy.backbone_onnx import MIN_OPSET

    low = max(_constants.ONNX_MIN_OPSET, MIN_OPSET)
    high = _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
    if not args.no_onnx and not low <= args.opset <= high:
        return (f"--opset {args.opset} is not supported; choose {low}..{high} (the attention "
                f"exports from opset {MIN_OPSET})")
    if args.no_onnx and not args.compile and args.program is None:
        return ("--no-onnx leaves nothing to do: add --compile [BACKEND] (check torch.compile) "
                "or --program FILE (a torch.export program), or drop --no-onnx")
    if args.static and args.dynamic:
        return "--static and --dynamic contradict each other"
    if args.dynamic and not args.compile:
        return "--dynamic applies to --compile; add --compile [BACKEND]"
    if args.static and args.shape is None and not (args.no_onnx and args.program is None):
        return "--static needs --shape HxW (the one size of the graph)"
    if args.window_size and len(args.window_size) not in (1, 4):
        return f"--window-size takes 1 or 4 values, got {len(args.window_size)}"
    return None


def run(args: argparse.Namespace) -> int:
    import pickle

    from ..deploy import backbone_onnx as ex
    from ..run_files import StagedFile

    problem = _check_arguments(args)
    if problem:
        return _fail(problem)
    if args.check_shapes is not None:
        sizes = list(args.check_shapes)
    elif args.static and args.shape is not None:
        sizes = [args.shape]
    else:
        sizes = list(DEFAULT_CHECK_SIZES)
    window = None
    if args.window_size:
        window = args.window_size[0] if len(args.window_size) == 1 else tuple(args.window_size)
    out = None
    if not args.no_onnx:
        if args.out is not None:
            out = args.out
        else:
            stem = args.model if not os.path.isfile(args.model) else \
                os.path.splitext(os.path.basename(args.model))[0]
            out = stem + ("" if args.attn_mode == "global" else f"_{args.attn_mode}") + ".onnx"
    try:
        sources = [args.model if os.path.isfile(args.model) else None, args.checkpoint]
        for option, path, example in (("--out", out, "backbone.onnx"),
                                      ("--program", args.program, "backbone.pt2")):
            if path is not None:
                check_output_path(path, option, sources, example=example, replaced=True)
        if out is not None and args.program is not None and \
                os.path.realpath(out) == os.path.realpath(args.program):
            raise ValueError(f"--out and --program name the same file {out!r}")
        model = ex.build_model(args.model, attn_mode=args.attn_mode, checkpoint=args.checkpoint,
                               window_size=window)
    except (ValueError, TypeError, OSError, pickle.UnpicklingError) as e:
        # includes the checkpoint errors (wrong variant, not a checkpoint, bad values)
        return _fail(error_text(e), 1)

    if not os.path.isfile(args.model) and not args.checkpoint:
        # a name alone builds the architecture with random weights: useful to test a
        # deployment, not to deploy
        print(f"rest-dense export: warning: no --checkpoint: {args.model} is exported with "
              "randomly initialised weights", file=sys.stderr)
    # everything that can be refused is refused before exporting or compiling
    if out is not None:
        from ..utils import require_package

        for needed in ("onnx", "onnxruntime"):  # the export, then its checks
            require_package(needed)
    if args.compile:
        try:
            ex.compile_model(model, backend=args.compile, dynamic=True if args.dynamic else None)
        except ValueError as e:  # includes DynamicShapeError; nothing was compiled yet
            return _fail(str(e))
    if args.program and not args.static:
        problem = ex.dynamic_shape_problem(model)
        if problem:
            return _fail(f"--program without --static: {problem}")
    low = ex.min_valid_side(model)
    if out is not None and not args.static and low > 1:
        small = [s for s in sizes if min(s) < low]
        if small:
            return _fail(f"check sizes {' '.join(format_size(s) for s in small)} are below "
                         f"{low} pixels, the smallest side at which a dynamic {args.attn_mode} "
                         "graph matches eager (the eager model shrinks windows larger than the "
                         "map); check larger sizes or export with --static --shape HxW")
    if args.program and not args.static:
        low_program = ex.min_program_side(model)
        small = [s for s in sizes if min(s) < low_program]
        if small:
            return _fail(f"check sizes {' '.join(format_size(s) for s in small)} are below "
                         f"{low_program} pixels, the smallest side of a dynamic torch.export "
                         "program")

    failed = False

    def report(prefix: str):
        def show(res: "ex.ParityResult") -> None:
            print(f"{prefix} {res.describe()}", flush=True)
        return show

    # the files get their names only once every check passed (StagedFile)
    with contextlib.ExitStack() as stack:
        onnx_file = stack.enter_context(StagedFile(out, ".onnx")) if out else None
        program_file = stack.enter_context(StagedFile(args.program, ".pt2")) \
            if args.program else None
        staged = [f for f in (onnx_file, program_file) if f is not None]
        if onnx_file is not None:
            try:
                exp = ex.export_onnx(model, onnx_file.path, shape=args.shape,
                                     dynamic=not args.static, opset=args.opset, batch=args.batch)
            except ValueError as e:
                return _fail(str(e), 1)
            kind = ("dynamic batch/height/width" if exp.dynamic
                    else f"static {args.batch}x3x{format_size(exp.shape)}")
            print(f"exported {out} (traced at {format_size(exp.shape)}, opset {exp.opset}, "
                  f"{kind}) in {exp.seconds:.1f} s")
            if exp.dynamic and low > 1:
                print(f"note: the {args.attn_mode} graph is valid for H, W >= {low}")
            if sizes:
                try:
                    results = ex.check_onnx(model, onnx_file.path, sizes, batch=args.batch,
                                            atol=args.atol, raise_on_failure=False,
                                            on_result=report("onnxruntime vs eager"))
                except (ValueError, RuntimeError) as e:
                    return _fail(f"{e}; {out} not written", 1)
                failed |= not all(r.ok for r in results)
        if args.program:
            import time

            import torch

            t0 = time.perf_counter()
            try:
                program = ex.export_program(model, shape=args.shape, dynamic=not args.static,
                                            batch=args.batch)
            except ValueError as e:  # includes DynamicShapeError
                return _fail(str(e), 1)
            torch.export.save(program, program_file.path)
            kind = ("dynamic height/width" if not args.static
                    else f"static {args.batch}x3x{format_size(args.shape)}")
            print(f"exported {args.program} (torch.export, {kind}, batch {args.batch}) in "
                  f"{time.perf_counter() - t0:.1f} s")
            program_sizes = [args.shape] if args.static else sizes
            if program_sizes:
                results = ex.check_program(model, program, program_sizes, batch=args.batch,
                                           atol=args.atol, raise_on_failure=False,
                                           on_result=report("torch.export vs eager"))
                failed |= not all(r.ok for r in results)
        if failed:
            names = " and ".join(f.dst for f in staged)
            print(f"FAILED: some outputs differ from eager PyTorch (see above); {names} not "
                  "written", file=sys.stderr)
            return 1
        for f in staged:
            f.commit()
    if args.compile:
        compile_sizes = sizes or ([args.shape] if args.shape else list(DEFAULT_CHECK_SIZES))
        dynamic = False if args.static else (True if args.dynamic else None)
        if dynamic is None and ex.dynamic_shape_problem(model) is not None:
            print(f"note: {args.attn_mode} mode compiles each size separately (dynamic=False); "
                  "symbolic sizes do not finish compiling in the window modes")
        results = ex.check_compile(model, compile_sizes, backend=args.compile,
                                   dynamic=dynamic, batch=args.batch,
                                   atol=args.atol, raise_on_failure=False,
                                   on_result=report(f"torch.compile({args.compile}) vs eager"))
        failed |= not all(r.ok for r in results)
    if failed:
        print("FAILED: torch.compile's outputs differ from eager PyTorch (see above)",
              file=sys.stderr)
    return 1 if failed else 0
