#!/usr/bin/env python
"""Export a ResT backbone to ONNX with dynamic batch / height / width and check it against
PyTorch with onnxruntime; optionally check ``torch.compile`` against eager too.

Examples::

    python tools/export_onnx.py restv2_tiny -o restv2_tiny.onnx
    python tools/export_onnx.py restv2_tiny --attn-mode hwin --checkpoint restv2_tiny_224.pth
    python tools/export_onnx.py restv2_tiny --check-shapes 320x480 257x391 800x1216 --batch 2
    python tools/export_onnx.py restv2_tiny --no-onnx --compile inductor   # torch.compile only

How the export stays valid for every input size: the legacy TorchScript exporter
(``dynamo=False``) records the model's shape arithmetic on the traced sizes, but Python
branches are fixed at trace time. So the tool traces at a size on which every branch that can
be taken is taken (``--trace-shape``, checked before exporting; default: the smallest such
size ≥ 256x384, 257x385 for the default windows):

* every stage's map is not a multiple of its ``sr_ratio``, so the upsample branch's crop is
  traced (it is a no-op slice at sizes that need none);
* window modes: every windowed stage's map is larger than its window and not a multiple of
  it, so window padding, partitioning and the final crop are traced.

Limit: in the window modes the eager model shrinks a window to the map when the map is
smaller (then the block equals global attention), which a traced graph cannot do; the ONNX
graph is therefore valid for inputs whose windowed stages are at least one window large
(H and W >= 4 * 2**i * window_size[i], 253 for the default windows 64/32/16/8); smaller
inputs are rejected by ``--check-shapes`` and give different results in onnxruntime. Global
mode has no such limit.

ResTv1 exports, but its multi-head interaction (head-mixing 1x1 conv, softmax and
InstanceNorm) runs in float64 for accuracy, and onnxruntime's CPU provider has no float64 Conv
/ InstanceNormalization kernels, so the checks fail for it; the tool targets ResTv2.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from _backbones import BACKBONE_NAMES, build_backbone  # noqa: E402
from rest_dense.models import ResTv2, load_checkpoint  # noqa: E402

DEFAULT_CHECK_SHAPES = ((320, 480), (257, 391))


# ------------------------------------------------------------------ shape rules
def _stage_sizes(n: int) -> List[int]:
    """Side of each stage's map for an input side ``n`` (stride-2 convs, padding 1)."""
    return [math.ceil(n / 2 ** (i + 2)) for i in range(4)]


def _windowed(model: nn.Module) -> List[Optional[int]]:
    """Window side per stage for the stages that run blocks in windows, else None."""
    if not isinstance(model, ResTv2):
        return [None] * 4
    return [ws if n else None for ws, n in zip(model.window_size, model.num_window_blocks)]


def traceable_side(model: nn.Module, n: int) -> List[str]:
    """Why an input side ``n`` cannot serve for tracing (empty list: it can)."""
    problems = []
    last = max(model.out_indices)
    for i, (s, sr, ws) in enumerate(zip(_stage_sizes(n), model.sr_ratios, _windowed(model))):
        if i > last:
            break
        if isinstance(model, ResTv2) and sr > 1 and s % sr == 0:
            problems.append(f"stage {i + 1}: map side {s} is a multiple of sr_ratio {sr}")
        if ws is not None and (s <= ws or s % ws == 0):
            problems.append(f"stage {i + 1}: map side {s} must exceed and not be a multiple of "
                            f"the window {ws}")
    return problems


def min_valid_side(model: nn.Module) -> int:
    """Smallest input side for which the exported graph matches eager (window modes)."""
    need = [ws * 2 ** (i + 2) - (2 ** (i + 2) - 1)
            for i, ws in enumerate(_windowed(model)) if ws is not None and i <= max(model.out_indices)]
    return max(need, default=1)


def default_trace_shape(model: nn.Module, start: Tuple[int, int] = (256, 384)) -> Tuple[int, int]:
    def first(n):
        while traceable_side(model, n):
            n += 1
        return n
    return first(start[0]), first(start[1])


# ------------------------------------------------------------------ export / checks
def export_onnx(model: nn.Module, path: str, trace_shape: Tuple[int, int],
                opset: int = 17) -> List[str]:
    """Export ``model`` (eval mode) with dynamic batch, height and width; returns output names."""
    bad = [f"H={trace_shape[0]}: {p}" for p in traceable_side(model, trace_shape[0])]
    bad += [f"W={trace_shape[1]}: {p}" for p in traceable_side(model, trace_shape[1])]
    if bad:
        raise ValueError("trace shape would fix a shape-dependent branch: " + "; ".join(bad))
    names = [f"stage{i + 1}" for i in model.out_indices]
    dynamic = {"input": {0: "batch", 2: "height", 3: "width"}}
    dynamic.update({n: {0: "batch", 2: f"{n}_h", 3: f"{n}_w"} for n in names})
    x = torch.randn(1, 3, *trace_shape)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        # TracerWarnings about Python ints are expected: the trace shape covers the branches
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=False, input_names=["input"],
                          output_names=names, dynamic_axes=dynamic, opset_version=opset,
                          do_constant_folding=True)
    import onnx

    onnx.checker.check_model(onnx.load(path))
    return names


def _max_diff(outs: Sequence, refs: Sequence[torch.Tensor]) -> float:
    diffs = []
    for o, r in zip(outs, refs):
        o = torch.as_tensor(np.asarray(o)) if not isinstance(o, torch.Tensor) else o
        if tuple(o.shape) != tuple(r.shape):
            raise AssertionError(f"shape {tuple(o.shape)} != eager {tuple(r.shape)}")
        diffs.append(float((o.float() - r.float()).abs().max()))
    return max(diffs)


def check_onnx(model: nn.Module, path: str, shapes: Sequence[Tuple[int, int]],
               batch: int = 1, seed: int = 0) -> Dict[Tuple[int, int], float]:
    """Max abs difference between onnxruntime and eager PyTorch per input shape."""
    import onnxruntime as ort

    low = min_valid_side(model)
    outside = [s for s in shapes if min(s) < low]
    if outside:
        raise ValueError(f"shapes {outside} are below {low} pixels, the smallest size for which "
                         "the window-mode graph matches eager (see --help)")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    try:
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 (onnxruntime raises its own exception types)
        raise RuntimeError(f"onnxruntime cannot run {path}: {e}. ResTv1's multi-head interaction "
                           "runs in float64, for which onnxruntime's CPU provider has no Conv / "
                           "InstanceNormalization kernels; only ResTv2 is supported") from e
    gen = torch.Generator().manual_seed(seed)
    result = {}
    for shape in shapes:
        x = torch.randn(batch, 3, *shape, generator=gen)
        with torch.no_grad():
            ref = model(x)
        outs = sess.run(None, {"input": x.numpy()})
        result[tuple(shape)] = _max_diff(outs, ref)
    return result


def check_compile(model: nn.Module, shapes: Sequence[Tuple[int, int]], backend: str = "inductor",
                  batch: int = 1, seed: int = 0, dynamic: Optional[bool] = None
                  ) -> Dict[Tuple[int, int], Tuple[float, float]]:
    """``torch.compile`` vs eager: ``{shape: (max abs diff, seconds of the compiled call)}``
    (the first call of a shape includes compilation). ``dynamic`` goes to ``torch.compile``:
    None (PyTorch's default) recompiles with symbolic sizes when a second size comes,
    False compiles every size separately."""
    compiled = torch.compile(model, backend=backend, dynamic=dynamic)
    gen = torch.Generator().manual_seed(seed)
    result = {}
    for shape in shapes:
        x = torch.randn(batch, 3, *shape, generator=gen)
        with torch.no_grad():
            ref = model(x)
            t0 = time.perf_counter()
            out = compiled(x)
            dt = time.perf_counter() - t0
        result[tuple(shape)] = (_max_diff(out, ref), dt)
    return result


# ------------------------------------------------------------------ CLI
def _shape(text: str) -> Tuple[int, int]:
    h, _, w = text.lower().partition("x")
    return int(h), int(w)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("backbone", help=f"one of {', '.join(BACKBONE_NAMES)}")
    p.add_argument("-o", "--output", help="ONNX file (default: <backbone>[_<mode>].onnx)")
    p.add_argument("--attn-mode", default="global", choices=("global", "win", "cwin", "hwin"))
    p.add_argument("--window-size", type=int, nargs="+", help="window side per stage (1 or 4 values)")
    p.add_argument("--checkpoint", help="weights to load (any released layout); default: random")
    p.add_argument("--trace-shape", type=_shape, metavar="HxW",
                   help="input size used for tracing (default: chosen automatically)")
    p.add_argument("--check-shapes", type=_shape, nargs="*", metavar="HxW",
                   default=list(DEFAULT_CHECK_SHAPES), help="sizes to compare at (default: "
                   + " ".join(f"{h}x{w}" for h, w in DEFAULT_CHECK_SHAPES) + ")")
    p.add_argument("--batch", type=int, default=1, help="batch size of the checks")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--atol", type=float, default=1e-4, help="fail above this max abs difference")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    p.add_argument("--compile", metavar="BACKEND", nargs="?", const="inductor",
                   help="also check torch.compile (default backend: inductor)")
    p.add_argument("--static", action="store_true",
                   help="torch.compile(dynamic=False): compile each size separately (much "
                   "faster to compile than symbolic sizes in the window modes)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    kwargs = {}
    if args.window_size:
        kwargs["window_size"] = args.window_size[0] if len(args.window_size) == 1 else args.window_size
    model = build_backbone(args.backbone, args.attn_mode, **kwargs).eval()
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint)
    failed = False
    if not args.no_onnx:
        out = args.output or (args.backbone + ("" if args.attn_mode == "global" else
                                               f"_{args.attn_mode}") + ".onnx")
        trace = args.trace_shape or default_trace_shape(model)
        t0 = time.perf_counter()
        export_onnx(model, out, trace, args.opset)
        print(f"exported {out} (traced at {trace[0]}x{trace[1]}, opset {args.opset}, dynamic "
              f"batch/height/width) in {time.perf_counter() - t0:.1f} s")
        if min_valid_side(model) > 1:
            print(f"note: {args.attn_mode} mode graph is valid for H, W >= {min_valid_side(model)}")
        for shape, diff in check_onnx(model, out, args.check_shapes, args.batch).items():
            ok = diff <= args.atol
            failed |= not ok
            print(f"onnxruntime vs eager {args.batch}x3x{shape[0]}x{shape[1]}: max abs diff "
                  f"{diff:.3g} {'ok' if ok else 'FAIL'}")
    if args.compile:
        for shape, (diff, dt) in check_compile(model, args.check_shapes, args.compile,
                                               args.batch, dynamic=False if args.static else None
                                               ).items():
            ok = diff <= args.atol
            failed |= not ok
            print(f"torch.compile({args.compile}) vs eager {args.batch}x3x{shape[0]}x{shape[1]}: "
                  f"max abs diff {diff:.3g} {'ok' if ok else 'FAIL'} (call {dt:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
