"""Whether mixed-precision training can run, for both framework adapters (PyTorch only).

Two precisions:

* ``float16`` (the released COCO recipes): autocast plus a grad scaler. mmengine's
  ``AmpOptimWrapper`` refuses to start without an accelerator (CUDA, NPU, MLU or MUSA) and
  detectron2's ``AMPTrainer`` needs CUDA; on a CPU-only machine both adapters fall back to
  fp32 training through :func:`resolve_amp`, with a warning, instead of failing.
* ``bfloat16``: autocast only (bf16 has fp32's exponent range, so no loss scaling). It runs
  wherever ``torch.autocast`` has bf16 kernels: any CPU (fast with AVX-512 BF16 / AMX) and
  CUDA GPUs that support it (:func:`bf16_supported`). The adapters run it through
  :class:`rest_dense.mm.optim.BF16OptimWrapper` and :class:`rest_dense.d2.engine.BF16Trainer`.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Optional, Sequence, Union

import torch

from . import hardware

__all__ = ["ACCELERATORS", "PRECISIONS", "accelerator_available", "amp_supported",
           "bf16_supported", "cpu_has_native_bf16", "warn_if_bf16_emulated", "parse_precision",
           "resolve_amp", "autocast_off"]

logger = logging.getLogger("rest_dense.amp")

#: device types on which mixed-precision training can run (mmengine's list)
ACCELERATORS = ("cuda", "npu", "mlu", "musa")

#: mixed-precision dtypes by their canonical names (detectron2's later ``SOLVER.AMP.PRECISION``
#: and mmengine's ``AmpOptimWrapper(dtype=...)`` spell them so)
PRECISIONS = ("float16", "bfloat16")

_PRECISION_ALIASES = {"float16": "float16", "fp16": "float16", "half": "float16",
                      "bfloat16": "bfloat16", "bf16": "bfloat16"}


def parse_precision(value: Union[str, torch.dtype, None]) -> str:
    """The canonical name (``'float16'`` or ``'bfloat16'``) of a mixed-precision dtype.

    Args:
        value: ``'float16'`` / ``'fp16'`` / ``'half'`` / ``torch.float16``,
            ``'bfloat16'`` / ``'bf16'`` / ``torch.bfloat16`` (case-insensitive), or
            ``None`` / ``''`` for the default, ``'float16'``.

    Returns:
        One of :data:`PRECISIONS`.

    Raises:
        ValueError: any other value.
    """
    if value is None or value == "":
        return "float16"
    if isinstance(value, torch.dtype):
        value = str(value).replace("torch.", "")
    name = _PRECISION_ALIASES.get(str(value).strip().lower())
    if name is None:
        raise ValueError(f"unknown mixed-precision dtype {value!r}; use one of "
                         f"{', '.join(sorted(_PRECISION_ALIASES))}")
    return name


def _device_type(device: Union[str, torch.device]) -> str:
    # the type from the string: torch.device('npu') fails unless the NPU plug-in is loaded
    return device.type if isinstance(device, torch.device) else str(device).split(":")[0]


def accelerator_available(device_type: str) -> bool:
    """Whether a device of type ``device_type`` (``'cuda'``, ``'npu'``, ...) is usable here."""
    if device_type == "cuda":
        return torch.cuda.is_available()
    backend = getattr(torch, device_type, None)  # torch.npu / torch.mlu / torch.musa, if plugged in
    is_available = getattr(backend, "is_available", None)
    try:
        return bool(is_available()) if callable(is_available) else False
    except Exception:  # a half-installed device plug-in counts as absent
        return False


def amp_supported(device: Union[str, torch.device, None] = None,
                  backends: Sequence[str] = ACCELERATORS) -> bool:
    """Whether mixed-precision training can run on ``device``.

    Args:
        device: the training device (``'cuda'``, ``'cuda:1'``, ``'cpu'``, ...); ``None``
            means "whichever accelerator the framework picks", i.e. any of ``backends``.
        backends: the device types the caller's AMP implementation supports (detectron2's
            ``AMPTrainer``: only ``('cuda',)``).

    Returns:
        ``True`` if ``device`` is of one of ``backends`` and such a device is present.
    """
    if device is None:
        return any(accelerator_available(b) for b in backends)
    device_type = _device_type(device)
    return device_type in backends and accelerator_available(device_type)


def bf16_supported(device: Union[str, torch.device, None] = None) -> bool:
    """Whether bf16 autocast (no grad scaler) can run on ``device``.

    Args:
        device: the training device; ``None`` means the CPU, where bf16 autocast always
            runs (with native kernels on CPUs with AVX-512 BF16 or AMX, emulated and slower
            elsewhere).

    Returns:
        ``True`` for the CPU, for a CUDA GPU that supports bf16, and for another present
        accelerator type that ``torch.autocast`` supports.
    """
    device_type = "cpu" if device is None else _device_type(device)
    if device_type == "cpu":
        return True
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        autocast_ok = torch.amp.is_autocast_available(device_type)
    except (AttributeError, RuntimeError):  # older torch, unknown device type
        return False
    return autocast_ok and accelerator_available(device_type)


def resolve_amp(requested: bool, device: Union[str, torch.device, None] = None,
                backends: Sequence[str] = ACCELERATORS,
                log: Optional[logging.Logger] = None,
                precision: Union[str, torch.dtype, None] = "float16") -> bool:
    """The AMP setting to train with: ``requested`` unless the device cannot run it, in
    which case a warning is logged and ``False`` returned (fp32 training).

    Args:
        requested: whether the config / command line asks for mixed precision.
        device: the training device, see :func:`amp_supported` (fp16) and
            :func:`bf16_supported` (bf16).
        backends: the device types the caller's fp16 AMP implementation supports (bf16
            runs through ``torch.autocast`` and ignores them).
        log: logger for the warning (default: ``rest_dense.amp``).
        precision: ``'float16'`` (autocast + grad scaler) or ``'bfloat16'`` (autocast
            only), see :func:`parse_precision`.

    Returns:
        Whether to train with mixed precision.

    Raises:
        ValueError: an unknown ``precision``.
    """
    precision = parse_precision(precision)
    if not requested:
        return False
    if precision == "bfloat16":
        if bf16_supported(device):
            return True
        where = f"device {device} has no bf16 autocast"
    elif amp_supported(device, backends):
        return True
    else:
        where = (f"device {device}" if device is not None
                 else "no " + "/".join(backends).upper() + " device")
    (log or logger).warning("mixed precision (AMP, %s) was requested but cannot run here (%s): "
                            "training in fp32 instead", precision, where)
    return False


#: CPU flags of native bf16 arithmetic: x86 ``flags`` (AVX-512 BF16 dot products, AMX
#: tiles) and Arm ``Features`` (the BF16 extension), as ``/proc/cpuinfo`` spells them
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
NATIVE_BF16_FEATURES = ("bf16",)
_WARNED_BF16: list = []


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> Optional[bool]:
    """Whether this CPU computes bf16 in hardware, from ``/proc/cpuinfo``: an x86 ``flags``
    line with AVX-512 BF16 or AMX, an Arm ``Features`` line with BF16; torch's
    ``get_cpu_capability()`` (``'AMX'``) is a second witness. None when neither tells (no
    such file or line, e.g. another architecture, and a capability that says nothing)."""
    if hardware.cpu_capability().upper().startswith("AMX"):
        return True
    info = hardware.read_cpuinfo(cpuinfo)
    if info.flags_key is None:
        return None
    wanted = NATIVE_BF16_FLAGS if info.flags_key == "flags" else NATIVE_BF16_FEATURES
    return any(flag in info.flags for flag in wanted)


def warn_if_bf16_emulated(device: Union[str, torch.device, None] = "cpu",
                          log: Optional[logging.Logger] = None) -> bool:
    """Warn (once per process) when bf16 autocast is asked for on a CPU without native
    bf16: there every bf16 matrix product is emulated. Called where bf16 training starts
    (:class:`~rest_dense.mm.optim.BF16OptimWrapper`'s first forward,
    :class:`~rest_dense.d2.engine.BF16Trainer`), not where a config is read: evaluation
    runs in fp32.

    Args:
        device: the training device; only the CPU is checked.
        log: logger for the warning (default: ``rest_dense.amp``).

    Returns:
        True if the warning applies (whether or not it was already printed).
    """
    if _device_type(device or "cpu") != "cpu" or cpu_has_native_bf16() is not False:
        return False
    if not _WARNED_BF16:
        _WARNED_BF16.append(True)
        capability = hardware.cpu_capability()
        (log or logger).warning(
            "bf16 autocast on a CPU without native bf16 (no avx512_bf16 / amx_bf16 flag, "
            "or Arm bf16 feature; torch CPU capability %s): bf16 matrix products are "
            "emulated, measured 6-18x slower than fp32 for ResTv2-T and Swin-T on an AVX2 "
            "CPU (rest_dense's docs/bench_peers.md). "
            "Train in fp32 here, or in bf16 on a GPU or a CPU with AVX-512 BF16 / AMX.",
            capability)
    return True


@contextlib.contextmanager
def autocast_off() -> Iterator[None]:
    """Autocast switched off on the CPU and CUDA inside the block (graph exports trace the
    model in its own dtype: a caller's autocast would mix casts into the trace)."""
    with contextlib.ExitStack() as stack:
        for device in ("cpu", "cuda"):
            stack.enter_context(torch.autocast(device, enabled=False))
        yield
