"""Whether mixed-precision training can run, for both framework adapters (PyTorch only).

The released COCO recipes train with AMP. mmengine's ``AmpOptimWrapper`` refuses to start
without an accelerator (CUDA, NPU, MLU or MUSA) and detectron2's ``AMPTrainer`` needs CUDA;
on a CPU-only machine both adapters fall back to fp32 training through :func:`resolve_amp`,
with a warning, instead of failing.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence, Union

import torch

__all__ = ["ACCELERATORS", "accelerator_available", "amp_supported", "resolve_amp"]

logger = logging.getLogger("rest_dense.amp")

#: device types on which mixed-precision training can run (mmengine's list)
ACCELERATORS = ("cuda", "npu", "mlu", "musa")


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
    # the type from the string: torch.device('npu') fails unless the NPU plug-in is loaded
    device_type = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    return device_type in backends and accelerator_available(device_type)


def resolve_amp(requested: bool, device: Union[str, torch.device, None] = None,
                backends: Sequence[str] = ACCELERATORS,
                log: Optional[logging.Logger] = None) -> bool:
    """The AMP setting to train with: ``requested`` unless the device cannot run it, in
    which case a warning is logged and ``False`` returned (fp32 training).

    Args:
        requested: whether the config / command line asks for mixed precision.
        device: the training device, see :func:`amp_supported`.
        backends: the device types the caller's AMP implementation supports.
        log: logger for the warning (default: ``rest_dense.amp``).

    Returns:
        Whether to train with mixed precision.
    """
    if not requested:
        return False
    if amp_supported(device, backends):
        return True
    where = f"device {device}" if device is not None else "no " + "/".join(backends).upper() + " device"
    (log or logger).warning("mixed precision (AMP) was requested but cannot run here (%s): "
                            "training in fp32 instead", where)
    return False
