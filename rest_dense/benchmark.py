"""Latency, throughput and peak memory of ResT backbones, Swin-T and whole models.

One *case* (:class:`BenchCase`) is a model at an input size and batch, with an attention
mode, an attention implementation, a run mode and a dtype; :func:`run_benchmark` expands
lists of those into cases, times each and returns one :class:`BenchRow` per case, all
from one run (the same weights in every row of a model). The command-line front end
``rest-dense bench`` (:mod:`rest_dense.commands.bench`) turns the rows into a markdown table
and a plot.

What is measured:

* **time**: after ``warmup`` passes, the median over ``iters`` passes (at least
  ``min_time`` seconds), CUDA synchronised. ``mode='infer'``: a forward pass under
  ``torch.inference_mode`` in eval mode. ``mode='train'``: forward and backward in train
  mode, the loss being the sum of the outputs' means (backbones only);
* **dtype**: ``fp32``, or ``bf16`` / ``fp16`` under ``torch.autocast``;
* **peak memory**: on CUDA, ``torch.cuda.max_memory_allocated`` over the timed passes
  minus what was allocated before them; on the CPU, the growth of the peak RSS over one
  pass, measured in a fresh interpreter per row (``python -m rest_dense.benchmark``) whose
  allocator returns freed memory to the system (so the timed passes run with the normal
  allocator, and one row's memory does not depend on the rows before it).

Models: registry names (``restv2_tiny``, ``restv1_small``, see
:func:`rest_dense.models.list_models`); ``swin_tiny``: MMDetection's ``SwinTransformer``
built from MMDetection's own Mask R-CNN Swin-T config (window 7, stochastic depth off as
in our backbones); whole models from MMDetection / MMSegmentation configs (``predict`` on
a batch, inference only). Attention implementations of the ResT backbones: ``sdpa``
(``F.scaled_dot_product_attention``, our default), ``math`` (our model with the explicit
attention matrix) and ``released`` (the same weights run in the released code's layout,
:mod:`rest_dense.reference`; ResTv2, global attention).

Example, the scaling table (every attention mode and Swin-T, inference and training)::

    from rest_dense.benchmark import SCALING_SIZES, run_benchmark
    rows = run_benchmark(["restv2_tiny", "swin_tiny"], sizes=SCALING_SIZES,
                         attn_modes=("global", "win", "cwin", "hwin"), modes=("infer", "train"))
    for row in rows:
        print(row.case.label, row.case.size, row.case.mode, f"{row.ms:.1f} ms", row.peak_mb)
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from . import _moved, hardware
from .configs import get_config_path
from .models.functional import forced_attention

__all__ = [
    "DTYPES", "ATTN_IMPLS", "ATTN_MODES", "RUN_MODES", "SWIN_MODELS", "SCALING_SIZES", "CP_LEVELS",
    "autocast_difference", "autocast_notes",
    "BenchCase", "BenchRow", "ConfigModel", "build_bench_model", "make_inputs", "time_model",
    "cpu_peak_memory", "cpu_peak_memory_in_subprocess", "attention_choices", "attention_notes",
    "round_ratios",
    "cpu_description", "ForcedAttention", "KernelRow", "kernel_benchmark", "time_step",
    "step_peak_rss", "peak_in_subprocess", "benchmark_case", "benchmark_backbone",
    "plan_cases", "check_device", "run_benchmark", "describe_device",
]

#: dtype names of the ``--dtypes`` option (non-fp32 ones run under ``torch.autocast``)
DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16,
                                  "fp16": torch.float16}
#: attention implementations of the ResT backbones: ``auto`` (our default: the kernel
#: :func:`rest_dense.models.functional.attention_impl` picks per device, dtype and size),
#: ``sdpa`` / ``explicit`` / ``chunked`` (that kernel forced: fused SDPA, the explicit
#: attention on the whole matrix, or over query chunks; fast paths as by default), ``math`` (the
#: plain module computation, ``fast_paths=False``-like: explicit attention, no fast paths),
#: ``released`` (the released code's layout)
ATTN_IMPLS: Tuple[str, ...] = ("auto", "sdpa", "explicit", "chunked", "math", "released")
#: forced attention kernel of each implementation (None: the dispatch decides)
_FORCED_KERNEL: Dict[str, Optional[str]] = {"auto": None, "sdpa": "sdpa", "explicit": "math",
                                             "chunked": "chunked"}
#: attention modes (ResTv2; ResTv1 has global attention only)
ATTN_MODES: Tuple[str, ...] = ("global", "win", "cwin", "hwin")
#: what a timed pass does
RUN_MODES: Tuple[str, ...] = ("infer", "train")
#: ``with_cp`` memory levels a training row can use (:data:`rest_dense.models.base.CP_LEVELS`)
CP_LEVELS: Tuple[str, ...] = ("none", "mlp", "block")
#: the Swin Transformer models available for comparison: name -> MMDetection config
SWIN_MODELS: Dict[str, str] = {"swin_tiny": "mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py"}
#: input sizes (H, W) of the scaling table
SCALING_SIZES: Tuple[Tuple[int, int], ...] = ((512, 512), (800, 1216), (1024, 2048), (2048, 2048))


# ------------------------------------------------------------------ cases and rows
@dataclass
class BenchCase:
    """The setup of one row.

    Args:
        model (str): registry name (``'restv2_tiny'``), a key of :data:`SWIN_MODELS`, or
            an MMDetection / MMSegmentation config (file, shipped name, or
            ``'mmdet::path'`` / ``'mmseg::path'`` inside that package's configs).
        size (tuple[int, int]): input (H, W).
        batch (int): images per pass. Default: 1.
        attn_mode (str): one of :data:`ATTN_MODES` (ResT backbones and ResT configs).
        attn_impl (str): one of :data:`ATTN_IMPLS`, or ``'-'`` for non-ResT models.
        mode (str): ``'infer'`` or ``'train'``.
        dtype (str): a key of :data:`DTYPES`.
        arch (dict, optional): a custom arch for a registry family (the ``model`` name
            picks the family), e.g. a tiny one for tests.
        with_cp (str): memory level of a training row, one of :data:`CP_LEVELS`
            (``'none'``: nothing recomputed; ``'mlp'``: ResT's MLP hidden maps recomputed;
            ``'block'``: whole blocks recomputed, also for Swin-T). Default: ``'none'``.
    """

    model: str
    size: Tuple[int, int]
    batch: int = 1
    attn_mode: str = "global"
    attn_impl: str = "auto"
    mode: str = "infer"
    dtype: str = "fp32"
    arch: Optional[Dict[str, Any]] = None
    with_cp: str = "none"

    @property
    def kind(self) -> str:
        """``'backbone'`` (registry), ``'swin'`` or ``'config'``."""
        return _model_kind(self.model)

    @property
    def label(self) -> str:
        """How tables name the model (a config's file stem)."""
        if self.kind == "config":
            return Path(self.model.split("::")[-1]).stem
        return self.model + (" (custom arch)" if self.arch else "")

    @property
    def group_key(self) -> Tuple:
        """Rows with the same key compare with each other (speed-ups against the group's
        first row): input size, batch, mode and dtype."""
        return (self.size, self.batch, self.mode, self.dtype)

    @property
    def mode_label(self) -> str:
        """The attention mode as tables show it: ``'-'`` where none applies, ``'configured'``
        for a whole model left in its config's own mode (``attn_mode='global'``)."""
        if self.attn_impl == "-":
            return "-"
        return "configured" if self.kind == "config" and self.attn_mode == "global" \
            else self.attn_mode

    @property
    def note_name(self) -> str:
        """How notes name the row: model, attention mode and implementation (where they
        apply), memory level (when not ``'none'``), batch x size, mode and dtype."""
        parts = [self.label]
        if self.attn_impl != "-":
            parts += [self.mode_label, self.attn_impl]
        if self.with_cp != "none":
            parts.append(f"with_cp={self.with_cp}")
        parts += [f"{self.batch}x{self.size[0]}x{self.size[1]}", self.mode, self.dtype]
        return " ".join(parts)

    def to_json(self) -> str:
        """The case as JSON (for the memory-measuring child process)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "BenchCase":
        """The inverse of :meth:`to_json`."""
        data = json.loads(text)
        data["size"] = tuple(data["size"])
        return cls(**data)


@dataclass
class BenchRow:
    """The measurement of one :class:`BenchCase`.

    Args:
        case (BenchCase): what was measured.
        ms (float): median milliseconds per pass.
        imgs_per_s (float): images per second at that median.
        peak_mb (float | None): peak memory growth in MiB (None: not measured).
        iters (int): timed passes.
        times_ms (list[float]): every timed pass, in ms.
    """

    case: BenchCase
    ms: float
    imgs_per_s: float
    peak_mb: Optional[float]
    iters: int
    times_ms: List[float] = field(default_factory=list)


def _model_kind(model: str) -> str:
    from .models import canonical_name

    if model in SWIN_MODELS:
        return "swin"
    try:
        canonical_name(model)
        return "backbone"
    except (ValueError, TypeError):
        pass
    if "::" in model or model.endswith(".py"):
        return "config"
    from .models import list_models

    raise ValueError(f"unknown model {model!r}: use a registry name ({', '.join(list_models())}), "
                     f"{', '.join(SWIN_MODELS)}, or pass a config with --configs")


def _check_case(case: BenchCase, device: Optional[str] = None) -> None:
    """Raise ValueError, naming the problem, for a case that cannot run (on ``device``,
    when given)."""
    from .models import get_model_entry

    if case.mode not in RUN_MODES:
        raise ValueError(f"mode {case.mode!r}: choose one of {RUN_MODES}")
    if case.dtype not in DTYPES:
        raise ValueError(f"dtype {case.dtype!r}: choose one of {tuple(DTYPES)}")
    if case.batch < 1 or min(case.size) < 1:
        raise ValueError(f"batch {case.batch} and size {case.size} must be positive")
    if case.with_cp not in CP_LEVELS:
        raise ValueError(f"with_cp {case.with_cp!r}: choose one of {CP_LEVELS}")
    kind = case.kind
    if case.with_cp != "none":
        if case.mode != "train":
            raise ValueError(f"with_cp={case.with_cp} only changes training (nothing is "
                             "recomputed in inference)")
        if kind == "config" or case.attn_impl == "released":
            raise ValueError(f"with_cp={case.with_cp} applies to our backbones and Swin-T only")
        if kind == "swin" and case.with_cp != "block":
            raise ValueError(f"Swin-T has with_cp=block only, not {case.with_cp!r}")
    if kind == "backbone":
        entry = get_model_entry(case.model)
        if case.attn_mode not in entry.attn_modes:
            raise ValueError(f"{entry.name} has attn_mode {', '.join(entry.attn_modes)} only, "
                             f"not {case.attn_mode!r}")
        if case.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attention implementation {case.attn_impl!r}: choose one of {ATTN_IMPLS}")
        if case.attn_impl == "released":
            if entry.family != "restv2" or case.attn_mode != "global":
                raise ValueError("the released-layout baseline exists for ResTv2 with global "
                                 f"attention only, not {entry.name} / {case.attn_mode}")
            if case.size[0] % 32 or case.size[1] % 32:
                raise ValueError(f"the released-layout baseline needs sides divisible by 32, "
                                 f"got {case.size[0]}x{case.size[1]}")
    elif kind == "config":
        if case.mode != "infer" and not _config_is_segmenter(case.model):
            raise ValueError(f"{case.label}: whole detectors are timed in inference only "
                             "(segmenters also in training, on random label maps)")
        if case.mode == "train" and case.batch < 2:
            raise ValueError(f"{case.label}: a whole segmenter trains with --batch 2 or more "
                             "(its BatchNorm layers need more than one value per channel)")
        if case.attn_impl == "released":
            raise ValueError(f"{case.label}: the released-layout baseline is for backbones only")
        if device is not None and case.dtype != "fp32" and not device.startswith("cuda"):
            raise ValueError(f"{case.label}: whole models run in fp32 on the CPU (mmcv's CPU "
                             "ops, NMS for one, have no bf16 / fp16 kernels)")


# ------------------------------------------------------------------ models
class ConfigModel(nn.Module):
    """Whole-model inference (``predict``) of an MMDetection / MMSegmentation config on a
    fixed-size batch, randomly initialised (``init_cfg`` dropped: nothing is downloaded).

    Args:
        config (str): config file, shipped config name or ``'mmdet::path'``.
        attn_mode (str): attention mode set on a ResTv2 backbone (``'global'``: the
            config's own).
        attn_impl (str): one of :data:`ATTN_IMPLS` but ``'released'`` for a ResT backbone
            (``'-'``: as configured).
    """

    def __init__(self, config: str, attn_mode: str = "global", attn_impl: str = "auto"):
        super().__init__()
        import warnings

        from .mm.utils import build_model, is_tta_model, load_config

        cfg = load_config(get_config_path(config))
        if is_tta_model(cfg.model):
            cfg.model = cfg.model.module
        backbone = cfg.model.backbone
        backbone.pop("init_cfg", None)
        backbone.pop("pretrained", None)
        cfg.model.pop("pretrained", None)
        btype = str(backbone.get("type", "")).split(".")[-1]
        if btype in ("ResTv2", "ResTv1") and attn_impl != "-":
            backbone["fast_paths"] = attn_impl != "math"
            if attn_mode != "global":
                if btype != "ResTv2":
                    raise ValueError(f"{config}: ResTv1 has global attention only")
                backbone["attn_mode"] = attn_mode
        self.forced_kernel = _FORCED_KERNEL.get(attn_impl)
        from .configs import building_from_config
        from .models import ConfigWarning

        # one line for a config that does not build, worded as by every command
        with warnings.catch_warnings(), building_from_config(assertions=True):
            warnings.simplefilter("ignore")  # the frameworks' deprecation notices
            warnings.simplefilter("default", ConfigWarning)  # but not ours about the config
            self.model = build_model(cfg)
        if cfg.default_scope == "mmseg":
            from mmseg.structures import SegDataSample as Sample
        else:
            from mmdet.structures import DetDataSample as Sample
        self.sample_cls = Sample

    def forward(self, x: torch.Tensor):
        """``predict`` in eval mode; in train mode (segmenters) the losses against random
        label maps, a dict that the training step sums."""
        h, w = x.shape[-2:]
        meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w),
                    batch_input_shape=(h, w), scale_factor=(1.0, 1.0))
        samples = [self.sample_cls(metainfo=meta) for _ in range(x.shape[0])]
        with forced_attention(self.forced_kernel):
            if not self.training:
                return self.model.predict(x, samples)
            from mmengine.structures import PixelData

            gen = torch.Generator().manual_seed(0)
            classes = int(getattr(self.model.decode_head, "num_classes", 2))
            for sample in samples:
                labels = torch.randint(0, classes, (1, h, w), generator=gen).to(x.device)
                sample.gt_sem_seg = PixelData(data=labels)
            return self.model.loss(x, samples)


class ForcedAttention(nn.Module):
    """Runs ``model`` with one attention kernel forced (``'sdpa'`` / ``'math'``; None: the
    dispatch's choice), see :func:`rest_dense.models.functional.forced_attention`."""

    def __init__(self, model: nn.Module, kernel: Optional[str]):
        super().__init__()
        self.model = model
        self.kernel = kernel

    def forward(self, x: torch.Tensor):
        with forced_attention(self.kernel):
            return self.model(x)


def _config_is_segmenter(config: str) -> bool:
    """Whether a config builds an MMSegmentation model (timed in training too)."""
    from .configs import config_framework

    try:
        return config_framework(get_config_path(config)) == "mmseg"
    except (ValueError, FileNotFoundError):
        return False


def _config_has_rest_backbone(config: str) -> bool:
    """Whether a config's backbone is a ResT (so attention options apply to it)."""
    from .configs import read_mm_config

    cfg = read_mm_config(get_config_path(config))
    model = cfg.model.module if "module" in cfg.model else cfg.model  # TTA wrappers
    return str(model.get("backbone", {}).get("type", "")).split(".")[-1] in ("ResTv2", "ResTv1")


def _build_swin(name: str, with_cp: bool = False) -> nn.Module:
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    cfg = Config.fromfile(get_config_path(SWIN_MODELS[name]))
    backbone = cfg.model.backbone
    backbone.pop("init_cfg", None)
    backbone["drop_path_rate"] = 0.0  # as our backbones here: stochastic depth off
    backbone["with_cp"] = with_cp
    init_default_scope("mmdet")
    from mmdet.registry import MODELS

    model = MODELS.build(backbone)
    return _ReentrantCheckpointed(model) if with_cp else model


class _ReentrantCheckpointed(nn.Module):
    """A peer model whose ``with_cp`` calls ``torch.utils.checkpoint`` without
    ``use_reentrant`` (MMDetection's Swin): the bench times the reentrant checkpoint it
    runs, without PyTorch's warning about the missing argument on every block."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*use_reentrant parameter should be passed",
                                    category=UserWarning)
            return self.model(x)


def build_bench_model(case: BenchCase) -> nn.Module:
    """Build the (randomly initialised) model of a case.

    Args:
        case: the case.

    Returns:
        The module (on the CPU; mode not set).

    Raises:
        ValueError: the case cannot run (see the message).
    """
    from .models import create_model, get_model_entry

    _check_case(case)
    kind = case.kind
    if kind == "swin":
        return _build_swin(case.model, with_cp=case.with_cp == "block")
    if kind == "config":
        return ConfigModel(case.model, case.attn_mode, case.attn_impl)
    entry = get_model_entry(case.model)
    kwargs: Dict[str, Any] = dict(fast_paths=case.attn_impl not in ("math", "released"))
    if case.with_cp != "none":
        kwargs["with_cp"] = case.with_cp
    if case.attn_mode != "global":
        kwargs["attn_mode"] = case.attn_mode
    if case.arch is not None:
        model = entry.cls(arch=dict(case.arch), **kwargs)
    else:
        model = create_model(entry.name, **kwargs)
    if case.attn_impl == "released":
        from .reference import ReleasedLayoutResTv2

        model = ReleasedLayoutResTv2(model)
    elif _FORCED_KERNEL.get(case.attn_impl) is not None:
        model = ForcedAttention(model, _FORCED_KERNEL[case.attn_impl])
    return model


def _load_same_weights(model: nn.Module, reference: Mapping[str, torch.Tensor]) -> None:
    """Load a reference state dict (the released-layout wrapper nests keys under ``model.``;
    modes with extra layers keep their own for those)."""
    own = model.state_dict()
    if own.keys() != reference.keys():
        if all(k.startswith("model.") for k in own) and not all(k.startswith("model.") for k in reference):
            reference = {"model." + k: v for k, v in reference.items()}
        elif all(k.startswith("model.") for k in reference) and not all(k.startswith("model.") for k in own):
            reference = {k[len("model."):]: v for k, v in reference.items()}
    model.load_state_dict({k: v for k, v in reference.items() if k in own}, strict=False)


# ------------------------------------------------------------------ measuring
def make_inputs(case: BenchCase, device: str = "cpu") -> torch.Tensor:
    """A random ``(batch, 3, H, W)`` image batch for a case (fixed seed)."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(case.batch, 3, *case.size, generator=gen).to(device)


def _loss(out: Any) -> torch.Tensor:
    """Sum of the means of every tensor in a (nested) output."""
    if isinstance(out, torch.Tensor):
        return out.float().mean()
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        terms = [_loss(o) for o in out]
        terms = [t for t in terms if t is not None]
        return sum(terms[1:], terms[0]) if terms else None
    return None


def _step_fn(model: nn.Module, x: Any, mode: str, dtype: str,
             device: str) -> Callable[[], None]:
    """One pass of ``model(x)`` (``x`` a tensor or a list of maps): inference, or forward
    and backward of :func:`_loss`, clearing the gradients of the parameters and of the
    inputs that require them."""
    autocast = dict(device_type=device.split(":")[0], dtype=DTYPES[dtype],
                    enabled=dtype != "fp32")
    if mode == "infer":
        model.eval()

        def step():
            with torch.inference_mode(), torch.autocast(**autocast):
                model(x)
    else:
        model.train()
        inputs = x if isinstance(x, (list, tuple)) else [x]
        leaves = [t for t in (*model.parameters(), *inputs) if t.requires_grad]

        def step():
            for t in leaves:
                t.grad = None
            with torch.autocast(**autocast):
                loss = _loss(model(x))
            loss.backward()
    return step


def time_model(model: nn.Module, x: torch.Tensor, mode: str = "infer", dtype: str = "fp32",
               device: str = "cpu", warmup: int = 2, iters: int = 5,
               min_time: float = 0.0) -> Tuple[List[float], Optional[float]]:
    """Time passes of ``model`` on ``x``.

    Args:
        model: the model, already on ``device``.
        x: its input, on ``device``.
        mode: ``'infer'`` (eval mode, inference mode) or ``'train'`` (train mode, forward
            and backward of the sum of the outputs' means).
        dtype: ``'fp32'``, or ``'bf16'`` / ``'fp16'`` under ``torch.autocast``.
        device: ``'cpu'`` or ``'cuda[:i]'``.
        warmup: untimed passes first.
        iters: timed passes (at least).
        min_time: keep timing until this many seconds have passed.

    Returns:
        The time of every timed pass in ms, and on CUDA the peak memory growth in MiB
        over the timed passes (None on the CPU).
    """
    step = _step_fn(model, x, mode, dtype, device)
    return time_step(step, device, warmup, iters, min_time, list(model.parameters()))


def time_step(step: Callable[[], None], device: str = "cpu", warmup: int = 2, iters: int = 5,
              min_time: float = 0.0, leaves: Sequence[torch.Tensor] = ()
              ) -> Tuple[List[float], Optional[float]]:
    """Time ``step()`` (any pass: a backbone's, a neck's, a whole model's).

    Args:
        step: the pass.
        device: ``'cpu'`` or ``'cuda[:i]'`` (CUDA is synchronised around every pass).
        warmup: untimed passes first.
        iters: timed passes (at least).
        min_time: keep timing until this many seconds have passed.
        leaves: tensors whose ``.grad`` is dropped before the CUDA memory baseline.

    Returns:
        The time of every timed pass in ms, and on CUDA the peak memory growth in MiB
        over the timed passes (None on the CPU).
    """
    if iters < 1 or warmup < 0:
        raise ValueError(f"iters must be >= 1 and warmup >= 0, got {iters} and {warmup}")
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    if cuda:
        for t in leaves:
            t.grad = None
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < iters or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20 if cuda else None
    return times, peak


def _return_freed_memory_to_os() -> None:
    """Serve large CPU allocations with mmap (fixed threshold) so that freed tensors leave
    the RSS and the peak-RSS growth measures the pass's own peak."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD = 64 KiB
    except (OSError, AttributeError):
        pass


def _rss_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_peak_memory(case: BenchCase) -> Optional[float]:
    """Peak RSS growth (MiB) of one pass of a case, after a first pass, in **this** process.

    Meant for a fresh interpreter (see :func:`cpu_peak_memory_in_subprocess`): it changes
    the process's allocator settings, and earlier allocations would blur the figure.

    Args:
        case: the case (built here, on the CPU).

    Returns:
        MiB, or None where the peak RSS cannot be reset (no ``/proc/self/clear_refs``).
    """
    _return_freed_memory_to_os()
    model = build_bench_model(case)
    x = make_inputs(case)
    return step_peak_rss(_step_fn(model, x, case.mode, case.dtype, "cpu"))


def step_peak_rss(step: Callable[[], None]) -> Optional[float]:
    """Peak RSS growth (MiB) of ``step()`` after a first, unmeasured call, in this process
    (call :func:`_return_freed_memory_to_os` first, in a fresh interpreter).

    Returns:
        MiB, or None where the peak RSS cannot be reset (no ``/proc/self/clear_refs``).
    """
    # one untimed pass first: one-off allocations (gradient buffers, the math libraries'
    # caches and thread pools) are not part of a step's peak in a running job
    step()
    gc.collect()
    if not _reset_peak_rss():
        return None
    base = _rss_kb("VmRSS:")
    step()
    return (_rss_kb("VmHWM:") - base) / 1024


def cpu_peak_memory_in_subprocess(case: BenchCase, threads: Optional[int] = None,
                                  timeout: Optional[float] = None) -> Optional[float]:
    """Run :func:`cpu_peak_memory` in a fresh interpreter (``python -m rest_dense.benchmark``).

    Args:
        case: the case.
        threads: torch CPU threads in the child (default: torch's default).
        timeout: seconds before the child is stopped (default: none).

    Returns:
        MiB, or None where the system cannot measure it.

    Raises:
        RuntimeError: the child failed (its stderr is in the message).
    """
    return peak_in_subprocess("rest_dense.benchmark", [case.to_json()], case.label, threads,
                              timeout)


def peak_in_subprocess(module: str, args: Sequence[str], label: str,
                       threads: Optional[int] = None, timeout: Optional[float] = None
                       ) -> Optional[float]:
    """Run ``python -m module *args [--threads N]`` in a fresh interpreter and read the
    ``{"peak_mb": ...}`` JSON line it prints last.

    Raises:
        RuntimeError: the child failed (its stderr is in the message).
    """
    cmd = [sys.executable, "-m", module, *args]
    if threads:
        cmd += ["--threads", str(threads)]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"measuring the CPU memory of {label} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_mb"]


def benchmark_case(case: BenchCase, device: str = "cpu", warmup: int = 2, iters: int = 5,
                   min_time: float = 0.0, memory: bool = True, threads: Optional[int] = None,
                   weights: Optional[Mapping[str, torch.Tensor]] = None,
                   model: Optional[nn.Module] = None) -> BenchRow:
    """Time one case and measure its peak memory.

    Args:
        case: the case.
        device: ``'cpu'`` or ``'cuda[:i]'``.
        warmup: untimed passes.
        iters: timed passes (at least).
        min_time: time for at least this many seconds.
        memory: measure peak memory (CPU: in a fresh interpreter; CUDA: during timing).
        threads: torch CPU threads of the memory-measuring child.
        weights: a state dict to load first (same weights across rows).
        model: an already built model for the case (default: built here).

    Returns:
        The :class:`BenchRow`.
    """
    if model is None:
        model = build_bench_model(case)
    if weights is not None:
        _load_same_weights(model, weights)
    model.to(device)
    times, peak = time_model(model, make_inputs(case, device), case.mode, case.dtype, device,
                             warmup, iters, min_time)
    if not memory:
        peak = None
    elif not device.startswith("cuda"):
        peak = cpu_peak_memory_in_subprocess(case, threads)
    ms = statistics.median(times)
    return BenchRow(case, ms, case.batch / (ms / 1e3), peak, len(times), times)


def benchmark_backbone(model: str = "restv2_tiny", size: Tuple[int, int] = (224, 224),
                       batch: int = 1, mode: str = "infer", dtype: str = "fp32",
                       attn_mode: str = "global", attn_impl: str = "auto",
                       arch: Optional[Dict[str, Any]] = None, **kwargs: Any) -> BenchRow:
    """Time one backbone (registry name or ``swin_tiny``) at one size: a shortcut for
    :func:`benchmark_case`.

    Args:
        model: registry name or a key of :data:`SWIN_MODELS`.
        size: input (H, W).
        batch: images per pass.
        mode: ``'infer'`` or ``'train'``.
        dtype: ``'fp32'``, ``'bf16'`` or ``'fp16'``.
        attn_mode: attention mode (ResTv2).
        attn_impl: one of :data:`ATTN_IMPLS`.
        arch: custom arch dict for the model's family.
        **kwargs: :func:`benchmark_case` options (``device``, ``iters``, ``memory``, ...).

    Returns:
        The :class:`BenchRow`.
    """
    if model in SWIN_MODELS:
        attn_impl = "-"
    case = BenchCase(model, tuple(size), batch, attn_mode, attn_impl, mode, dtype, arch)
    return benchmark_case(case, **kwargs)


def plan_cases(models: Sequence[str] = ("restv2_tiny",),
               sizes: Sequence[Tuple[int, int]] = ((800, 1216),),
               batches: Sequence[int] = (1,), attn_modes: Sequence[str] = ("global",),
               attn_impls: Sequence[str] = ("auto",), modes: Sequence[str] = ("infer",),
               dtypes: Sequence[str] = ("fp32",), configs: Sequence[str] = (),
               arch: Optional[Dict[str, Any]] = None, device: str = "cpu",
               cp_levels: Sequence[str] = ("none",)) -> Tuple[List[BenchCase], List[str]]:
    """Expand option lists into cases, leaving out the combinations that do not apply.

    Order: model, then size, dtype, run mode, attention mode, attention implementation,
    memory level.
    Swin-T, and configs whose backbone is not a ResT, get one row per size / dtype / run
    mode (attention ``'-'``); configs run in inference only (and in fp32 on the CPU);
    ``released`` runs for ResTv2 with global attention only; ResTv1 has global attention.

    Args:
        models: registry names and :data:`SWIN_MODELS` keys.
        sizes: input sizes (H, W).
        batches: one batch for every size, or one per size.
        attn_modes: attention modes.
        attn_impls: attention implementations.
        modes: ``'infer'`` and/or ``'train'``.
        dtypes: keys of :data:`DTYPES`.
        configs: MMDetection / MMSegmentation configs (whole models).
        arch: custom arch dict for the registry models.
        device: where the cases will run (whole models run in fp32 only on the CPU).
        cp_levels: ``with_cp`` memory levels (:data:`CP_LEVELS`) of the training rows;
            inference rows run once, at ``'none'``.

    Returns:
        The cases, and a note for each left-out combination.

    Raises:
        ValueError: bad option values (the message names them).
    """
    sizes = [tuple(s) for s in sizes]
    batches = list(batches)
    if len(batches) == 1:
        batches = batches * len(sizes)
    if len(batches) != len(sizes):
        raise ValueError(f"give one batch for all sizes or one per size: {len(batches)} batches "
                         f"for {len(sizes)} sizes")
    for name, values, allowed in (("attention mode", attn_modes, ATTN_MODES),
                                  ("attention implementation", attn_impls, ATTN_IMPLS),
                                  ("mode", modes, RUN_MODES), ("dtype", dtypes, tuple(DTYPES)),
                                  ("with_cp level", cp_levels, CP_LEVELS)):
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise ValueError(f"{name} {bad or '(none)'}: choose from {', '.join(allowed)}")
    for m in models:
        if _model_kind(m) == "config":
            raise ValueError(f"{m!r} is a config: pass it with --configs (configs=...)")
    cases: List[BenchCase] = []
    skipped: List[str] = []
    seen = set()
    for model in [*models, *configs]:
        kind = "config" if model in configs else _model_kind(model)
        fixed_attention = kind == "swin" or (kind == "config" and not _config_has_rest_backbone(model))
        for (size, batch), dtype, mode, attn_mode, impl, cp_level in itertools.product(
                zip(sizes, batches), dtypes, modes, attn_modes, attn_impls, cp_levels):
            if fixed_attention:  # not a ResT: the attention options do not apply
                attn_mode, impl = "global", "-"
            if mode == "infer":
                cp_level = "none"
            case = BenchCase(model, size, batch, attn_mode, impl, mode, dtype,
                             arch if kind == "backbone" else None, with_cp=cp_level)
            key = case.to_json()
            if key in seen:
                continue
            seen.add(key)
            try:
                _check_case(case, device)
            except ValueError as e:
                skipped.append(f"skipped {case.label} {attn_mode}/{impl} {size[0]}x{size[1]} "
                               f"{mode} {dtype} with_cp={cp_level}: {e}")
                continue
            cases.append(case)
    return cases, skipped


def check_device(device: str) -> None:
    """Refuse a device the benchmarks cannot time: one that is not ``cpu`` or ``cuda[:i]``
    (timing, synchronisation and peak memory are measured for those two), or CUDA on a
    machine without it.

    Raises:
        ValueError: naming the device and why.
    """
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"device {device!r}: {' '.join(str(err).split())}") from None
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: the benchmarks time 'cpu' and 'cuda[:i]' devices")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")


def run_benchmark(models: Sequence[str] = ("restv2_tiny",),
                  sizes: Sequence[Tuple[int, int]] = ((800, 1216),),
                  batches: Sequence[int] = (1,), attn_modes: Sequence[str] = ("global",),
                  attn_impls: Sequence[str] = ("auto",), modes: Sequence[str] = ("infer",),
                  dtypes: Sequence[str] = ("fp32",), configs: Sequence[str] = (),
                  device: str = "cpu", threads: Optional[int] = None, warmup: int = 2,
                  iters: int = 5, min_time: float = 0.0, memory: bool = True,
                  progress: bool = True, arch: Optional[Dict[str, Any]] = None,
                  log: Optional[Callable[[str], None]] = None,
                  interleave: bool = False,
                  cp_levels: Sequence[str] = ("none",)) -> List[BenchRow]:
    """Benchmark every applicable combination of the options (see :func:`plan_cases`).

    Every row of one model uses the same weights (those of its first row).

    Args:
        models, sizes, batches, attn_modes, attn_impls, modes, dtypes, configs, arch,
        cp_levels: see :func:`plan_cases`.
        device: ``'cpu'`` or ``'cuda[:i]'``.
        threads: torch CPU threads (here and in the memory-measuring children).
        warmup: untimed passes per row.
        iters: timed passes per row (at least).
        min_time: time each row for at least this many seconds.
        memory: measure peak memory.
        progress: progress bar over the rows (stderr).
        log: called with a line per finished row and per skipped combination
            (default: print to stderr).
        interleave: time the rows of one size, batch, mode and dtype in turn, one pass
            each per round (``iters`` rounds), so that a machine whose speed drifts moves
            every row alike; each row's figure is then its fastest pass.

    Returns:
        One :class:`BenchRow` per case, in :func:`plan_cases` order.
    """
    from tqdm import tqdm

    check_device(device)
    if threads:
        torch.set_num_threads(threads)
    cases, skipped = plan_cases(models, sizes, batches, attn_modes, attn_impls, modes, dtypes,
                                configs, arch, device, cp_levels)
    if not cases:
        raise ValueError("no combination of the options applies:\n" + "\n".join(skipped))
    bar = tqdm(cases, desc="bench", unit="row", file=sys.stderr, disable=not progress)
    if log is None:
        def log(text: str) -> None:
            bar.write(text, file=sys.stderr)
    for note in skipped:
        log(note)
    torch.manual_seed(0)
    weights: Dict[Tuple[str, str], Dict[str, torch.Tensor]] = {}
    if interleave:
        return _run_interleaved(cases, weights, device, warmup, iters, memory, threads, log)
    rows = []
    for case in bar:
        bar.set_postfix_str(f"{case.label} {case.attn_mode}/{case.attn_impl} "
                            f"{case.size[0]}x{case.size[1]} {case.mode} {case.dtype} "
                            f"cp={case.with_cp}")
        model = build_bench_model(case)
        key = (case.model, json.dumps(case.arch, sort_keys=True))
        if key not in weights:
            weights[key] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        row = benchmark_case(case, device, warmup, iters, min_time, memory, threads,
                             weights=weights[key], model=model)
        del model
        rows.append(row)
        peak = f"{row.peak_mb:7.0f} MiB" if row.peak_mb is not None else "      - MiB"
        log(f"  {case.label} {case.attn_mode:6s} {case.attn_impl:8s} {case.batch}x"
            f"{case.size[0]}x{case.size[1]} {case.mode:5s} {case.dtype} cp={case.with_cp:5s}: "
            f"{row.ms:9.1f} ms  "
            f"peak {peak}")
    return rows


def _run_interleaved(cases: Sequence[BenchCase], weights: Dict, device: str, warmup: int,
                     iters: int, memory: bool, threads: Optional[int],
                     log: Callable[[str], None]) -> List[BenchRow]:
    """:func:`run_benchmark` with ``interleave``: the rows of a group take turns."""
    groups: Dict[Tuple, List[int]] = {}
    for i, c in enumerate(cases):
        groups.setdefault(c.group_key, []).append(i)
    times: Dict[int, List[float]] = {i: [] for i in range(len(cases))}
    for members in groups.values():
        steps = {}
        for i in members:
            case = cases[i]
            model = build_bench_model(case)
            key = (case.model, json.dumps(case.arch, sort_keys=True))
            if key not in weights:
                weights[key] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            _load_same_weights(model, weights[key])
            model.to(device)
            step = _step_fn(model, make_inputs(case, device), case.mode, case.dtype, device)
            time_step(step, device, warmup, 1)
            steps[i] = step
        for _ in range(iters):
            for i in members:
                times[i] += time_step(steps[i], device, 0, 1)[0]
        del steps
    rows = []
    for i, case in enumerate(cases):
        peak = cpu_peak_memory_in_subprocess(case, threads) if memory and \
            not device.startswith("cuda") else None
        ms = min(times[i])
        rows.append(BenchRow(case, ms, case.batch / (ms / 1e3), peak, len(times[i]), times[i]))
        log(f"  {case.label} {case.attn_mode:6s} {case.attn_impl:8s} {case.batch}x"
            f"{case.size[0]}x{case.size[1]} {case.mode:5s} {case.dtype}: {ms:9.1f} ms (best of "
            f"{len(times[i])}, interleaved)")
    return rows


def _flat_outputs(out: Any) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _flat_outputs(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flat_outputs(v)]
    return []


def autocast_difference(model: str, size: Tuple[int, int] = (224, 224), dtype: str = "bf16",
                        device: str = "cpu", batch: int = 1, attn_mode: str = "global",
                        arch: Optional[Dict[str, Any]] = None, seed: int = 0) -> Dict[str, float]:
    """How far a backbone's outputs under ``torch.autocast(dtype)`` are from fp32.

    Same weights and input (random, seeded) for both passes, in eval mode.

    Args:
        model: a registry name or a :data:`SWIN_MODELS` key.
        size: input (H, W).
        dtype: a key of :data:`DTYPES` other than ``'fp32'``.
        device: where to run.
        batch: images per pass.
        attn_mode: attention mode of ResT models.
        arch: custom arch for registry models.
        seed: seed of the weights and the input.

    Returns:
        ``{"max_rel_l2": ..., "max_abs": ..., "max_abs_ref": ...}``: the largest relative
        L2 error over the outputs (``||y_dtype - y_fp32|| / ||y_fp32||``), the largest
        absolute difference and the largest absolute fp32 value.

    Raises:
        ValueError: an unknown dtype, ``'fp32'``, a config, or non-finite outputs.
    """
    if dtype not in DTYPES or dtype == "fp32":
        raise ValueError(f"dtype {dtype!r}: choose one of {[d for d in DTYPES if d != 'fp32']}")
    case = BenchCase(model, tuple(size), batch, attn_mode if _model_kind(model) == "backbone"
                     else "global", "auto" if _model_kind(model) == "backbone" else "-",
                     arch=arch)
    if case.kind == "config":
        raise ValueError("autocast_difference compares backbones, not whole configs")
    torch.manual_seed(seed)
    net = build_bench_model(case).to(device)
    net.eval()  # not chained: mmdet's SwinTransformer.train() returns None
    x = make_inputs(case, device)
    with torch.inference_mode():
        ref = [t.float() for t in _flat_outputs(net(x))]
        with torch.autocast(device_type=device.split(":")[0], dtype=DTYPES[dtype]):
            low = [t.float() for t in _flat_outputs(net(x))]
    if not ref or len(ref) != len(low):
        raise ValueError(f"{model}: no comparable outputs")
    for t in (*ref, *low):
        if not torch.isfinite(t).all():
            raise ValueError(f"{model}: non-finite outputs under {dtype}")
    rel = [((a - b).norm() / a.norm().clamp_min(1e-12)).item() for a, b in zip(ref, low)]
    return {"max_rel_l2": max(rel), "max_abs": max((a - b).abs().max().item()
                                                    for a, b in zip(ref, low)),
            "max_abs_ref": max(a.abs().max().item() for a in ref)}


def autocast_notes(rows: Sequence[BenchRow], device: str = "cpu") -> List[str]:
    """A line per backbone, size and reduced dtype of ``rows``: its outputs' difference
    from fp32 (:func:`autocast_difference`, batch 1)."""
    notes, seen = [], set()
    for r in rows:
        c = r.case
        key = (c.model, c.size, c.dtype, c.attn_mode, json.dumps(c.arch, sort_keys=True))
        if c.dtype == "fp32" or c.kind == "config" or key in seen:
            continue
        seen.add(key)
        mode = f" {c.attn_mode}" if c.kind == "backbone" else ""
        try:
            d = autocast_difference(c.model, c.size, c.dtype, device, 1, c.attn_mode, c.arch)
        except Exception as err:  # noqa: BLE001 (a note must not discard the measured rows)
            notes.append(f"{c.label}{mode} {c.size[0]}x{c.size[1]}: {c.dtype} autocast vs fp32 "
                         f"difference not measured ({type(err).__name__}: {err})")
            continue
        notes.append(f"{c.label}{mode} {c.size[0]}x{c.size[1]}: {c.dtype} autocast vs fp32 "
                     f"outputs: relative L2 error {d['max_rel_l2']:.2e} (largest over the "
                     f"outputs), max |diff| {d['max_abs']:.3g} (max |fp32 output| "
                     f"{d['max_abs_ref']:.3g})")
    return notes


def attention_choices(case: BenchCase, device: str = "cpu") -> Dict[str, int]:
    """Which attention kernel each call of one pass of ``case`` ran (``auto`` rows show
    the dispatch's choice), which kernel ran its projections and, in training, the strided
    3x3 convolutions' backward: ``{'math': n, 'sdpa': m, 'fused_linear': p, 'linear': q,
    'conv_gemm': r, 'conv_library': s}``, counts of calls (``fused_linear``: the oneDNN call
    of :func:`rest_dense.models.functional.linear`; ``linear``: ``F.linear``)."""
    from torch.profiler import ProfilerActivity, profile

    from .models.functional import record_attention_choices, record_conv_backward_choices

    model = build_bench_model(case).to(device)
    step = _step_fn(model, make_inputs(case, device), case.mode, case.dtype, device)
    # the profiler's tracing library logs to stderr (e.g. an alarming "ERROR ...
    # gpuGetDeviceCount failed" on CUDA builds without a GPU) unless told otherwise
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with record_attention_choices() as log, record_conv_backward_choices() as conv_log, \
            profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    counts: Dict[str, int] = {}
    for impl, *_ in log:
        counts[impl] = counts.get(impl, 0) + 1
    for impl, *_ in conv_log:
        counts[f"conv_{impl}"] = counts.get(f"conv_{impl}", 0) + 1
    for event in prof.events():
        kind = {"mkldnn::_linear_pointwise": "fused_linear",
                "aten::linear": "linear"}.get(event.name)
        parent = getattr(event, "cpu_parent", None)
        if kind == "linear" and parent is not None and parent.name == "aten::linear":
            continue  # autocast's aten::linear calls the inner one: one call, two events
        if kind is not None:
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def round_ratios(rows: Sequence[BenchRow]) -> List[Tuple[BenchRow, BenchRow, List[float]]]:
    """Per-round speed-ups of interleaved rows (``run_benchmark(interleave=True)``): in each
    group of one size, batch, mode and dtype, pass ``j`` of every row ran in round ``j``, so
    ``baseline.times_ms[j] / row.times_ms[j]`` compares passes made under the same machine
    conditions (drift between rounds cancels).

    Args:
        rows: interleaved rows, in :func:`plan_cases` order.

    Returns:
        ``(row, baseline, ratios)`` for every row after the first of its group (the
        baseline, as for the speed-up column), ratios in round order.
    """
    out = []
    baselines: Dict[Tuple, BenchRow] = {}
    for r in rows:
        c = r.case
        base = baselines.setdefault(c.group_key, r)
        if base is r:
            continue
        rounds = min(len(base.times_ms), len(r.times_ms))
        out.append((r, base, [base.times_ms[j] / r.times_ms[j] for j in range(rounds)]))
    return out


def attention_notes(rows: Sequence[BenchRow], device: str = "cpu") -> List[str]:
    """A line per ``auto`` ResT row: the attention kernels its pass ran, its projections'
    kernel and (training rows) its strided convolutions' backward."""
    notes = []
    names = {"math": "explicit", "sdpa": "sdpa", "chunked": "chunked explicit"}
    for r in rows:
        c = r.case
        if c.kind != "backbone" or c.attn_impl != "auto":
            continue
        try:
            counts = attention_choices(c, device)
        except Exception as err:  # noqa: BLE001 (a note must not discard the measured rows)
            notes.append(f"{c.note_name}: attention choice not recorded "
                         f"({type(err).__name__}: {err})")
            continue
        ran = ", ".join(f"{names[k]} x{n}" for k, n in sorted(counts.items()) if k in names)
        projections = ", ".join(f"{label} x{counts[k]}" for k, label in (
            ("fused_linear", "fused oneDNN"), ("linear", "F.linear")) if counts.get(k))
        convs = ", ".join(f"{impl} x{counts[f'conv_{impl}']}" for impl in ("library", "gemm")
                          if counts.get(f"conv_{impl}"))
        notes.append(f"{c.note_name}: auto ran {ran or 'no attention'}"
                     + (f"; projections: {projections}" if projections else "")
                     + (f"; strided conv backward: {convs}" if convs else ""))
    return notes


# ------------------------------------------------------------------ kernel choices
@dataclass
class KernelRow:
    """One measurement behind the dispatch rules of :mod:`rest_dense.models.functional`.

    Args:
        op (str): ``'attention'``, ``'dw_conv_backward'`` or ``'mlp_fc1'`` (the MLP's first
            projection and its GELU, inference).
        stage (int): the ResT stage (1..4) whose shape it is.
        shape (str): the shapes, as text.
        dtype (str): ``'fp32'`` or ``'bf16'``.
        mode (str): ``'infer'`` (forward) or ``'train'`` (forward and backward).
        times (dict): ms per candidate (``'sdpa'`` / ``'explicit'`` / ``'chunked'``; ``'native'`` /
            ``'fp32'``; ``'F.linear'`` / ``'fused'``), best of the timed passes.
    """

    op: str
    stage: int
    shape: str
    dtype: str
    mode: str
    times: Dict[str, float]

    @property
    def winner(self) -> str:
        return min(self.times, key=self.times.get)


def _best_ms(fn: Callable[[], Any], warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        best = min(best, (time.perf_counter() - t0) * 1e3)
    return best


def kernel_benchmark(model: str = "restv2_tiny", size: Tuple[int, int] = (512, 512),
                     batch: int = 2, dtypes: Sequence[str] = ("fp32", "bf16"),
                     warmup: int = 1, iters: int = 5) -> List[KernelRow]:
    """Time the candidates of each dispatch rule on one model's stage shapes (CPU): the
    attention kernels (``sdpa`` vs ``explicit`` vs ``chunked``), the strided depth-wise convolution
    backward of the key/value reduction (``native`` in the dtype vs ``fp32``), the strided
    3x3 convolutions' backward (the stem's second conv and the patch embeddings: ``gemm``
    vs ``library``, :func:`rest_dense.models.functional.conv3x3_s2_backward`) and the MLP's
    first projection with its GELU (``F.linear`` then ``F.gelu`` vs the oneDNN call with
    both fused, :func:`rest_dense.models.functional.linear`).

    Args:
        model: a ResTv2 registry name (its widths, heads and ``sr_ratios``).
        size: the image (H, W); stage ``i`` maps are ``ceil(H / 2**(i+2))`` on each side.
        batch: images.
        dtypes: ``'fp32'`` and / or ``'bf16'``.
        warmup, iters: untimed and timed passes per candidate (the best is kept).

    Returns:
        One :class:`KernelRow` per op, stage, dtype and mode.
    """
    import math as _math

    import torch.nn.functional as F

    from .models import get_model_entry
    from .models.functional import (_dw_conv_backward, _onednn_linear_available, attention,
                                    conv3x3_s2_backward, forced_conv_backward)
    from .models.functional import linear as fused_linear

    entry = get_model_entry(model)
    spec = entry.cls.ARCHS[entry.arch]
    rows: List[KernelRow] = []
    gen = torch.Generator().manual_seed(0)
    for i, (dim, heads, sr) in enumerate(zip(spec["embed_dims"], spec["num_heads"],
                                             spec["sr_ratios"])):
        h, w = (_math.ceil(s / 2 ** (i + 2)) for s in size)
        hk, wk = (_math.ceil(h / sr), _math.ceil(w / sr)) if sr > 1 else (h, w)
        d = dim // heads
        for dtype in dtypes:
            dt = DTYPES[dtype]
            q = torch.randn(batch, heads, h * w, d, generator=gen).to(dt)
            k = torch.randn(batch, heads, hk * wk, d, generator=gen).to(dt)
            v = torch.randn(batch, heads, hk * wk, d, generator=gen).to(dt)
            cot = torch.randn(batch, heads, h * w, d, generator=gen).to(dt)
            shape = f"q {tuple(q.shape)}, k/v {tuple(k.shape)}"
            for mode in RUN_MODES:
                times = {}
                for name, impl in (("sdpa", "sdpa"), ("explicit", "math"),
                                   ("chunked", "chunked")):
                    if mode == "infer":
                        def fn(impl=impl):
                            with torch.inference_mode():
                                attention(q, k, v, d ** -0.5, impl=impl)
                    else:
                        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

                        def fn(impl=impl, qg=qg, kg=kg, vg=vg):
                            out = attention(qg, kg, vg, d ** -0.5, impl=impl)
                            torch.autograd.grad(out, (qg, kg, vg), cot)
                    times[name] = _best_ms(fn, warmup, iters)
                rows.append(KernelRow("attention", i + 1, shape, dtype, mode, times))
            if sr > 1:
                x = torch.randn(batch, dim, h, w, generator=gen).to(dt)
                x = x.contiguous(memory_format=torch.channels_last)
                weight = torch.randn(dim, 1, sr + 1, sr + 1, generator=gen).to(dt)
                g = F.conv2d(x, weight, None, sr, sr // 2, 1, dim)
                g = torch.randn(g.shape, generator=gen).to(dt).contiguous(
                    memory_format=torch.channels_last)
                mask = (True, True, True)
                args = (weight.shape[0],), [sr, sr], [sr // 2, sr // 2], [1, 1], False, [0, 0], dim

                def native(x=x, g=g, weight=weight):
                    torch.ops.aten.convolution_backward(g, x, weight, *args, list(mask))

                def upcast(x=x, g=g, weight=weight):
                    _dw_conv_backward(g, x, weight, True, sr, sr // 2, mask)

                times = {"native": _best_ms(native, warmup, iters)}
                if dtype != "fp32":
                    times["fp32"] = _best_ms(upcast, warmup, iters)
                rows.append(KernelRow("dw_conv_backward", i + 1,
                                      f"x {tuple(x.shape)}, kernel {sr + 1}, stride {sr}",
                                      dtype, "train", times))
            # the strided 3x3 conv that makes this stage: the stem's second conv (input
            # twice the stage's size, half its width) or the patch embedding
            cin = dim // 2 if i == 0 else spec["embed_dims"][i - 1]
            hi, wi = (_math.ceil(s / 2 ** (i + 1)) for s in size)
            tokens_in = torch.randn(batch, hi, wi, cin, generator=gen).to(dt)
            weight3 = (torch.randn(dim, cin, 3, 3, generator=gen) * 0.05).to(dt)
            grad3 = torch.randn(batch, h, w, dim, generator=gen).to(dt).permute(0, 3, 1, 2)
            times = {}
            for impl in ("gemm", "library"):
                def conv_bwd(impl=impl, x=tokens_in, wt=weight3, g=grad3):
                    with forced_conv_backward(impl):
                        conv3x3_s2_backward(g, x, wt, True, True)
                times[impl] = _best_ms(conv_bwd, warmup, iters)
            rows.append(KernelRow("conv3x3_s2_backward", i + 1,
                                  f"x {tuple(tokens_in.shape)} (tokens), weight {tuple(weight3.shape)}",
                                  dtype, "train", times))
            if _onednn_linear_available(dt):
                tokens = torch.randn(batch * h * w, dim, generator=gen).to(dt)
                w1 = torch.randn(int(spec.get("mlp_ratio", 4) * dim), dim, generator=gen).to(dt)
                b1 = torch.randn(w1.shape[0], generator=gen).to(dt)

                def unfused(tokens=tokens, w1=w1, b1=b1):
                    with torch.inference_mode():
                        F.gelu(F.linear(tokens, w1, b1))

                def fused(tokens=tokens, w1=w1, b1=b1):
                    with torch.inference_mode():
                        fused_linear(tokens, w1, b1, gelu=True)

                times = {"F.linear": _best_ms(unfused, warmup, iters),
                         "fused": _best_ms(fused, warmup, iters)}
                rows.append(KernelRow("mlp_fc1", i + 1,
                                      f"x {tuple(tokens.shape)}, weight {tuple(w1.shape)}",
                                      dtype, "infer", times))
    return rows


# ------------------------------------------------------------------ output
def cpu_description() -> str:
    """The CPU's model name, the flags that decide bf16 speed, torch's CPU capability and
    the kernel rules' CPU class, e.g.
    ``'AMD EPYC (avx2 avx512f avx512_bf16; torch AVX512; kernel rules for avx512)'``."""
    info = hardware.read_cpuinfo()
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in info.flags]
    return (f"{info.model} ({' '.join(wanted) or 'no AVX2'}; torch {hardware.cpu_capability()}; "
            f"kernel rules for {hardware.cpu_class()})")


def describe_device(device: str = "cpu") -> str:
    """``'NVIDIA H100 ...'`` or ``'CPU <model> (<flags>; torch <capability>; kernel rules for
    <class>), 2 threads'``."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    n = torch.get_num_threads()
    return f"CPU {cpu_description()}, {n} thread{'' if n == 1 else 's'}"


# ------------------------------------------------------------------ memory child
def _child_main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m rest_dense.benchmark CASE_JSON [--threads N]``: print the CPU peak
    memory of one case as JSON (used by :func:`cpu_peak_memory_in_subprocess`)."""
    p = argparse.ArgumentParser(prog="python -m rest_dense.benchmark",
                                description="CPU peak memory of one benchmark case (internal)")
    p.add_argument("case", help="BenchCase as JSON")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps({"peak_mb": cpu_peak_memory(BenchCase.from_json(args.case))}))
    return 0


__getattr__ = _moved.module_getattr(__name__)  # the markdown / plot writers moved


if __name__ == "__main__":
    sys.exit(_child_main())
