#!/usr/bin/env python
"""Latency, throughput and peak memory of ResT backbones (CPU or GPU).

Each row builds the backbone with the same weights, warms up, then times
``--iters`` forward passes (``torch.inference_mode``; CUDA synchronised). Peak
memory is ``torch.cuda.max_memory_allocated`` on GPU; on CPU, the growth of the peak
RSS over one forward pass, measured in a fresh process that returns freed memory to the
system (so the timed passes run with the normal allocator).

Examples::

    # fused (SDPA) vs the released code's math attention, and every attention mode
    python tools/benchmark.py restv2_tiny --shapes 1x3x800x1216 8x3x224x224 \
        --attn-impls sdpa math --modes global win cwin hwin --threads 2
    python tools/benchmark.py restv2_tiny --device cuda --dtypes fp32 fp16 bf16
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Row:
    model: str
    mode: str
    attn: str
    shape: str
    dtype: str
    ms: float
    imgs_per_s: float
    peak_mb: Optional[float]


def parse_shape(text: str) -> tuple:
    parts = tuple(int(v) for v in text.lower().split("x"))
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"shape must look like 1x3x800x1216, got {text!r}")
    return parts


def build_backbone(name: str, attn_mode: str, impl: str) -> torch.nn.Module:
    """``restv2_tiny`` / ``restv1_small`` / ``swin_tiny`` style names -> backbone."""
    from rest_dense.models import ResTv1, ResTv2

    fused = impl == "sdpa"
    family, _, variant = name.partition("_")
    if impl == "released":
        if family != "restv2":
            raise SystemExit("--attn-impls released is available for restv2_* backbones")
        from _released_layout import ReleasedLayoutResTv2

        return ReleasedLayoutResTv2(ResTv2(arch=variant, attn_mode=attn_mode, fused_attn=False))
    if family == "swin":
        if variant != "tiny" or attn_mode != "global":
            raise SystemExit("only swin_tiny (mmdet's SwinTransformer, window 7) is available")
        from mmdet.models.backbones import SwinTransformer

        return SwinTransformer(embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                               window_size=7, out_indices=(0, 1, 2, 3))
    if family == "restv2":
        return ResTv2(arch=variant, attn_mode=attn_mode, fused_attn=fused)
    if family in ("restv1", "rest"):
        if attn_mode != "global":
            raise SystemExit("ResTv1 has global attention only")
        return ResTv1(arch=variant, fused_attn=fused)
    raise SystemExit(f"unknown backbone {name!r}; use restv2_<tiny|small|base|large> or "
                     f"restv1_<lite|small|base|large>")


class DetectorForward(torch.nn.Module):
    """Whole-model inference (``predict``) of an mmdet/mmseg config on a fixed-size batch."""

    def __init__(self, config: str, attn_mode: str, fused: bool):
        super().__init__()
        from mmengine.config import Config

        import rest_dense  # noqa: F401  (registers the backbones)

        cfg = Config.fromfile(config)
        backbone = cfg.model.backbone
        backbone.pop("init_cfg", None)
        backbone.pop("pretrained", None)
        if backbone.get("type") in ("ResTv2", "ResTv1"):
            backbone["fused_attn"] = fused
            if backbone["type"] == "ResTv2" and attn_mode != "global":
                backbone["attn_mode"] = attn_mode
        scope = cfg.get("default_scope", "mmdet")
        if scope == "mmseg":
            from mmseg.registry import MODELS
            from mmseg.structures import SegDataSample as Sample
        else:
            from mmdet.registry import MODELS
            from mmdet.structures import DetDataSample as Sample
        from mmengine.registry import init_default_scope

        init_default_scope(scope)
        self.model = MODELS.build(cfg.model)
        self.sample_cls = Sample

    def forward(self, x: torch.Tensor):
        h, w = x.shape[-2:]
        meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w), batch_input_shape=(h, w),
                    scale_factor=(1.0, 1.0))
        samples = [self.sample_cls(metainfo=meta) for _ in range(x.shape[0])]
        return self.model.predict(x, samples)


def _load_same_weights(model: torch.nn.Module, reference: Dict[str, torch.Tensor]) -> None:
    """Load the first row's weights (the released-layout wrapper nests them under ``model.``)."""
    own = model.state_dict()
    if own.keys() != reference.keys():
        if all(k.startswith("model.") for k in own):
            reference = {"model." + k: v for k, v in reference.items()}
        elif all(k.startswith("model.") for k in reference):
            reference = {k[len("model."):]: v for k, v in reference.items()}
    model.load_state_dict(reference, strict=False)


def _return_freed_memory_to_os() -> None:
    """Serve large CPU allocations with mmap (fixed threshold) so that freed tensors leave
    the RSS and the peak-RSS delta measures the forward pass's own peak."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD = 64 KiB
    except (OSError, AttributeError):
        pass


def cpu_peak_memory(args) -> Optional[float]:
    """Peak RSS growth (MB) of one forward pass, in this (fresh) process."""
    _return_freed_memory_to_os()
    kind, target = ("config", args.configs[0]) if args.configs else ("backbone", args.backbones[0])
    mode, impl, dtype, shape = args.modes[0], args.attn_impls[0], DTYPES[args.dtypes[0]], args.shapes[0]
    model = (DetectorForward(target, mode, fused=impl == "sdpa") if kind == "config"
             else build_backbone(target, mode, impl))
    model.eval()
    x = torch.randn(*shape)
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        if not _reset_peak_rss():
            return None
        base = _rss_kb("VmRSS:")
        model(x)
        return (_rss_kb("VmHWM:") - base) / 1024


def measure_cpu_memory_in_subprocess(kind: str, target: str, shape: tuple, dtype: str, mode: str,
                                     impl: str, threads: Optional[int]) -> Optional[float]:
    """Run :func:`cpu_peak_memory` in a fresh interpreter: allocations served by mmap there
    are returned on free, so the peak is the pass's own, and timing runs stay unaffected."""
    cmd = [sys.executable, str(Path(__file__).resolve())]
    cmd += ["--configs", target] if kind == "config" else [target]
    cmd += ["--measure-cpu-memory", "--shapes", "x".join(map(str, shape)), "--dtypes", dtype, "--modes", mode,
           "--attn-impls", impl]
    if threads:
        cmd += ["--threads", str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        print(res.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_mb"]


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def time_model(model: torch.nn.Module, shape: tuple, device: str, dtype: torch.dtype,
               warmup: int, iters: int, min_time: float, progress: bool) -> tuple:
    x = torch.randn(*shape, device=device)
    autocast = dtype != torch.float32
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step():
        with torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=autocast):
            model(x)

    with torch.inference_mode():
        for _ in range(warmup):
            step()
        sync()
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        times: List[float] = []
        start = time.perf_counter()
        bar = _progress(iters, progress)
        while len(times) < iters or time.perf_counter() - start < min_time:
            t0 = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t0)
            bar.update(1)
        bar.close()
        peak = ((torch.cuda.max_memory_allocated() - base) / 2 ** 20
                if device.startswith("cuda") else None)
    times.sort()
    median = times[len(times) // 2]
    return median * 1e3, shape[0] / median, peak


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm

        return tqdm(total=total, leave=False, file=sys.stderr)
    except ImportError:
        return _NoBar()


def format_table(rows: Sequence[Row], baseline: Dict[tuple, float]) -> str:
    head = "| model | attn_mode | attention | input | dtype | ms/iter | img/s | peak mem (MB) | speed-up |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        base = baseline.get((r.shape, r.dtype))
        speed = f"{base / r.ms:.2f}x" if base else "-"
        peak = f"{r.peak_mb:.0f}" if r.peak_mb is not None else "-"
        lines.append(f"| {r.model} | {r.mode} | {r.attn} | {r.shape} | {r.dtype} | {r.ms:.1f} | "
                     f"{r.imgs_per_s:.2f} | {peak} | {speed} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("backbones", nargs="*", default=[],
                   help="restv2_<tiny|small|base|large>, restv1_<lite|small|base|large>, swin_tiny "
                        "(default: restv2_tiny when no --configs)")
    p.add_argument("--configs", nargs="+", default=[],
                   help="time whole shipped mmdet/mmseg models (predict) too")
    p.add_argument("--shapes", nargs="+", type=parse_shape, default=[parse_shape("1x3x800x1216")])
    p.add_argument("--modes", nargs="+", default=["global"], choices=["global", "win", "cwin", "hwin"])
    p.add_argument("--attn-impls", nargs="+", default=["sdpa"], choices=["sdpa", "math", "released"],
                   help="sdpa = F.scaled_dot_product_attention; math = explicit attention matrix; "
                        "released = the released code's layout and math attention (baseline)")
    p.add_argument("--dtypes", nargs="+", default=["fp32"], choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--min-time", type=float, default=0.0, help="keep timing for at least this many s")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-memory", action="store_true", help="skip the CPU peak-memory pass")
    p.add_argument("--measure-cpu-memory", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure_cpu_memory:
        print(json.dumps({"peak_mb": cpu_peak_memory(args)}))
        return ""
    torch.manual_seed(0)
    targets = [("backbone", b) for b in args.backbones] + [("config", c) for c in args.configs]
    if not targets:
        targets = [("backbone", "restv2_tiny")]
    rows: List[Row] = []
    baseline: Dict[tuple, float] = {}
    for kind, target in targets:
        name = Path(target).stem if kind == "config" else target
        reference = None
        for shape, dtype, mode, impl in itertools.product(args.shapes, args.dtypes, args.modes,
                                                          args.attn_impls):
            if kind == "config":
                model = DetectorForward(target, mode, fused=impl == "sdpa")
            else:
                model = build_backbone(target, mode, impl)
            if reference is None:
                reference = model.state_dict()
            else:
                _load_same_weights(model, reference)
            model.eval()
            model.to(args.device)
            ms, ips, peak = time_model(model, shape, args.device, DTYPES[dtype], args.warmup,
                                       args.iters, args.min_time, not args.no_progress)
            if args.device == "cpu" and not args.no_memory:
                peak = measure_cpu_memory_in_subprocess(kind, target, shape, dtype, mode, impl,
                                                        args.threads)
            shape_s = "x".join(map(str, shape))
            rows.append(Row(name, mode, impl if "rest" in name else "-", shape_s, dtype, ms, ips, peak))
            # speed-ups are relative to the first row of the same input size and dtype
            baseline.setdefault((shape_s, dtype), ms)
            print(f"  {name} {mode:6s} {impl:4s} {shape_s:14s} {dtype}: {ms:8.1f} ms  "
                  f"peak {peak or 0:7.0f} MB", file=sys.stderr, flush=True)
            del model
    device_desc = (torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else f"CPU, {torch.get_num_threads()} threads")
    table = format_table(rows, baseline)
    text = f"On {device_desc}, torch {torch.__version__}, median of >= {args.iters} iters\n\n{table}"
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
