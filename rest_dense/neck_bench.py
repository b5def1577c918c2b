"""Latency and peak memory of the feature-pyramid necks alone: the plain FPN vs VT-FPN.

The neck runs on random maps at strides 4, 8, 16, 32 of an ``H x W`` image with a
backbone's channels (:func:`rest_dense.neck_analysis.neck_feature_shapes`, the sizes a ResT
produces), at its default settings (256 output channels; VT-FPN: 8 tokens of 1024 channels
per level, 16 heads, one transformer layer -- :func:`rest_dense.neck_analysis.build_neck`).
The same weights for every row of a neck (seeded).

What is measured (as :mod:`rest_dense.benchmark` measures backbones):

* **time**: after ``warmup`` passes, the median over ``iters`` passes (at least ``min_time``
  seconds), CUDA synchronised. ``'infer'``: a forward pass under ``torch.inference_mode``
  in eval mode. ``'train'``: forward and backward in train mode of the sum of the outputs'
  means, with gradients of the parameters **and of the input maps** (in a whole model the
  neck's backward also computes what flows into the backbone);
* **peak memory**: CUDA: ``torch.cuda.max_memory_allocated`` over the timed passes minus what
  was allocated before (the maps and weights); CPU: the growth of the peak RSS over one pass
  after a first one, in a fresh interpreter per row (``python -m rest_dense.neck_bench``)
  whose allocator returns freed memory to the system -- the method of
  :func:`rest_dense.benchmark.cpu_peak_memory`;
* **GFLOPs** (optional): the project's counter on the same maps
  (:func:`rest_dense.neck_analysis.analyze_neck`, fvcore multiply-adds, batch 1 times
  ``batch``).

Example::

    from rest_dense.neck_bench import run_neck_benchmark
    rows = run_neck_benchmark(("fpn", "vt_fpn"), "restv2_tiny",
                              sizes=((512, 512), (800, 1216)), modes=("infer", "train"))

``rest-dense bench neck:fpn neck:vt_fpn`` runs it from the command line and prints the table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import _moved
from .benchmark import DTYPES as _DTYPES
from .benchmark import (_return_freed_memory_to_os, _step_fn, peak_in_subprocess,
                        step_peak_rss, time_step)

__all__ = ["NECK_BENCH_SIZES", "NECK_BENCH_MODES", "NeckCase", "NeckBenchRow", "neck_inputs",
           "time_neck", "neck_peak_memory", "neck_peak_memory_in_subprocess",
           "benchmark_neck", "run_neck_benchmark"]

#: the sizes of the issue's table: ADE20K crops and the VT paper's COCO-stuff size
NECK_BENCH_SIZES: Tuple[Tuple[int, int], ...] = ((512, 512), (800, 1216))
NECK_BENCH_MODES: Tuple[str, ...] = ("infer", "train")


@dataclass
class NeckCase:
    """One neck at one size.

    Attributes:
        neck: ``'fpn'`` or ``'vt_fpn'``.
        channels: backbone channels, finest first (``parse_neck_channels`` spells them).
        size: the image ``(H, W)`` whose stride-4..32 maps the neck gets.
        mode: ``'infer'`` or ``'train'``.
        dtype: ``'fp32'``, or ``'bf16'`` / ``'fp16'`` under ``torch.autocast``.
        batch: images per pass.
        channels_label: the name the channels were given by (``'restv2_tiny'``).
    """

    neck: str
    channels: Tuple[int, ...]
    size: Tuple[int, int]
    mode: str = "infer"
    dtype: str = "fp32"
    batch: int = 1
    channels_label: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "NeckCase":
        d = json.loads(text)
        d["channels"], d["size"] = tuple(d["channels"]), tuple(d["size"])
        return cls(**d)


@dataclass
class NeckBenchRow:
    """The measurement of one :class:`NeckCase`.

    Attributes:
        case: the case.
        ms: median time of a pass, milliseconds.
        peak_mb: peak memory growth of a pass, MiB (None: not measured).
        gflops: multiply-adds of the neck on these maps, G (None: not counted).
        runs: timed passes.
        times: every timed pass, ms.
    """

    case: NeckCase
    ms: float
    peak_mb: Optional[float]
    gflops: Optional[float] = None
    runs: int = 0
    times: List[float] = field(default_factory=list)


def _check_case(case: NeckCase) -> None:
    from .neck_analysis import neck_name

    neck_name(case.neck)
    if case.mode not in NECK_BENCH_MODES:
        raise ValueError(f"mode must be one of {NECK_BENCH_MODES}, got {case.mode!r}")
    if case.dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {case.dtype!r}")
    if case.batch < 1 or min(case.size) < 1:
        raise ValueError(f"batch and size must be positive, got {case.batch} and {case.size}")


def build_case_neck(case: NeckCase, seed: int = 0) -> nn.Module:
    """The neck of a case at its default settings, seeded weights."""
    from .neck_analysis import build_neck

    torch.manual_seed(seed)
    return build_neck(case.neck, case.channels)


def neck_inputs(case: NeckCase, device: str = "cpu") -> List[torch.Tensor]:
    """Random maps at strides 4..32 of ``case.size`` (seeded); leaves that require grad in
    ``'train'`` mode."""
    from .neck_analysis import neck_feature_shapes

    gen = torch.Generator().manual_seed(1)
    shapes = neck_feature_shapes(tuple(case.size), len(case.channels))
    feats = [torch.randn(case.batch, c, h, w, generator=gen).to(device)
             for c, (h, w) in zip(case.channels, shapes)]
    if case.mode == "train":
        feats = [f.requires_grad_() for f in feats]
    return feats


def time_neck(model: nn.Module, feats: List[torch.Tensor], mode: str = "infer",
              dtype: str = "fp32", device: str = "cpu", warmup: int = 2, iters: int = 5,
              min_time: float = 0.0) -> Tuple[List[float], Optional[float]]:
    """Time passes of a neck on its maps.

    Returns:
        The time of every timed pass in ms, and on CUDA the peak memory growth in MiB over
        the timed passes (None on the CPU).
    """
    step = _step_fn(model, feats, mode, dtype, device)
    return time_step(step, device, warmup, iters, min_time, [*model.parameters(), *feats])


def neck_peak_memory(case: NeckCase) -> Optional[float]:
    """Peak RSS growth (MiB) of one CPU pass of a case, after a first pass, in **this**
    process (meant for a fresh interpreter: :func:`neck_peak_memory_in_subprocess`).

    Returns:
        MiB, or None where the peak RSS cannot be reset (no ``/proc/self/clear_refs``).
    """
    _return_freed_memory_to_os()
    model = build_case_neck(case)
    return step_peak_rss(_step_fn(model, neck_inputs(case), case.mode, case.dtype, "cpu"))


def neck_peak_memory_in_subprocess(case: NeckCase, threads: Optional[int] = None,
                                   timeout: Optional[float] = None) -> Optional[float]:
    """:func:`neck_peak_memory` in a fresh interpreter (``python -m rest_dense.neck_bench``).

    Raises:
        RuntimeError: the child failed (its stderr is in the message).
    """
    return peak_in_subprocess("rest_dense.neck_bench", ["--peak", case.to_json()],
                              f"neck {case.neck}", threads, timeout)


def benchmark_neck(case: NeckCase, device: str = "cpu", warmup: int = 2, iters: int = 5,
                   min_time: float = 0.0, memory: bool = True, threads: Optional[int] = None,
                   flops: bool = True) -> NeckBenchRow:
    """Time one case, and measure its peak memory and FLOPs.

    Args:
        case: the case.
        device: ``'cpu'`` or ``'cuda[:i]'``.
        warmup / iters / min_time: see :func:`time_neck`.
        memory: measure peak memory (CPU: in a fresh interpreter; CUDA: during timing).
        threads: torch CPU threads of the memory-measuring child (default: this process's).
        flops: count the neck's multiply-adds on these maps.
    """
    _check_case(case)
    model = build_case_neck(case).to(device)
    times, peak = time_neck(model, neck_inputs(case, device), case.mode, case.dtype, device,
                            warmup, iters, min_time)
    if not memory:
        peak = None
    elif not device.startswith("cuda"):
        peak = neck_peak_memory_in_subprocess(case, threads or torch.get_num_threads())
    gflops = None
    if flops:
        from .neck_analysis import analyze_neck

        gflops = analyze_neck(case.neck, case.channels, tuple(case.size)).flops.total / 1e9
        gflops *= case.batch
    return NeckBenchRow(case, statistics.median(times), peak, gflops, len(times), times)


def run_neck_benchmark(necks: Sequence[str] = ("fpn", "vt_fpn"),
                       channels: Union[str, Sequence[int]] = "restv2_tiny",
                       sizes: Sequence[Tuple[int, int]] = NECK_BENCH_SIZES,
                       modes: Sequence[str] = NECK_BENCH_MODES, dtype: str = "fp32",
                       batch: int = 1, device: str = "cpu", warmup: int = 2, iters: int = 5,
                       min_time: float = 0.0, memory: bool = True,
                       threads: Optional[int] = None, flops: bool = True,
                       log: Optional[Callable[[str], None]] = None) -> List[NeckBenchRow]:
    """Every neck at every size in every mode: one :class:`NeckBenchRow` each, in the order
    size, mode, neck (so that the necks being compared sit side by side).

    Args:
        necks: ``'fpn'`` / ``'vt_fpn'`` (``'neck:'`` prefix allowed).
        channels: backbone channels (a model name such as ``'restv2_tiny'``, a preset such as
            ``'resnet50'``, or integers; :func:`rest_dense.neck_analysis.parse_neck_channels`).
        sizes: image sizes ``(H, W)``.
        modes: ``'infer'`` and / or ``'train'``.
        dtype, batch, device, warmup, iters, min_time, memory, threads, flops: see
            :func:`benchmark_neck`.
        log: called with one line per finished row.

    Raises:
        ValueError: an unknown neck, mode or dtype, or bad channels.
    """
    from .neck_analysis import neck_name, parse_neck_channels

    chans, label = parse_neck_channels(channels)
    keys = [neck_name(n) for n in necks]
    cases = [NeckCase(k, chans, (int(h), int(w)), m, dtype, batch, label)
             for (h, w) in sizes for m in modes for k in keys]
    for c in cases:
        _check_case(c)
    counted = {}
    rows = []
    for case in cases:
        key = (case.neck, case.size)
        row = benchmark_neck(case, device, warmup, iters, min_time, memory, threads,
                             flops=flops and key not in counted)
        if flops:
            row.gflops = counted.setdefault(key, row.gflops)
        rows.append(row)
        if log is not None:
            log(_line(row))
    return rows


def _line(row: NeckBenchRow) -> str:
    c = row.case
    peak = f"{row.peak_mb:.0f} MiB" if row.peak_mb is not None else "- MiB"
    flops = f", {row.gflops:.1f} GFLOPs" if row.gflops is not None else ""
    return (f"{c.neck} ({c.channels_label}) {c.size[0]}x{c.size[1]} {c.mode} {c.dtype} "
            f"batch {c.batch}: {row.ms:.1f} ms, peak {peak}{flops}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m rest_dense.neck_bench --peak CASE_JSON``: the memory child of
    :func:`neck_peak_memory_in_subprocess`."""
    p = argparse.ArgumentParser(prog="python -m rest_dense.neck_bench",
                                description="CPU peak memory of one neck case (internal)")
    p.add_argument("--peak", metavar="CASE_JSON", required=True,
                   help="measure one case's CPU peak memory")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps({"peak_mb": neck_peak_memory(NeckCase.from_json(args.peak))}))
    return 0


__getattr__ = _moved.module_getattr(__name__)  # the table writer moved to the command


if __name__ == "__main__":
    sys.exit(main())
