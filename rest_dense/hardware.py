"""What the CPU can do, read once: the facts behind the kernel rules and the bf16 warning.

Pure Python and PyTorch (the model core uses it). Three CPU classes key the kernel rules of
:mod:`rest_dense.models.functional` (docs/kernels.md has the measurements):

* ``'amx'``: AMX bf16 tiles (Intel Sapphire Rapids and later); oneDNN runs bf16 GEMMs on
  the tiles, several times faster than the AVX-512 BF16 dot products.
* ``'avx512'``: torch dispatches its CPU kernels for AVX-512 (e.g. AMD Zen 4, with
  AVX-512 BF16 but no AMX).
* ``'other'``: AVX2 and everything else.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import FrozenSet, Optional

import torch

__all__ = ["CpuInfo", "read_cpuinfo", "cpu_capability", "cpu_class", "CPU_CLASSES"]

CPU_CLASSES = ("amx", "avx512", "other")


@dataclass(frozen=True)
class CpuInfo:
    """The first processor of ``/proc/cpuinfo``.

    Args:
        model (str): its model name (``'unknown CPU'`` when not given).
        flags (frozenset[str]): x86 ``flags`` or Arm ``Features``.
        flags_key (str, optional): which of the two lines gave them; None when neither
            was there (no such file, another architecture).
    """

    model: str = "unknown CPU"
    flags: FrozenSet[str] = frozenset()
    flags_key: Optional[str] = None


@functools.lru_cache(maxsize=None)
def read_cpuinfo(path: str = "/proc/cpuinfo") -> CpuInfo:
    """Read the model name and the flags of the first processor in ``path`` (cached)."""
    model, flags, key_found = None, None, None
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key in ("flags", "Features") and flags is None:
                    flags, key_found = frozenset(value.split()), key
                if model is not None and flags is not None:
                    break
    except OSError:
        pass
    return CpuInfo(model or "unknown CPU", flags or frozenset(), key_found)


def cpu_capability() -> str:
    """torch's CPU kernel capability (``'AVX512'``, ``'AVX2'``, ...; ``'unknown'`` on a torch
    that does not say)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except AttributeError:  # older torch
        return "unknown"


@functools.lru_cache(maxsize=None)
def cpu_class() -> str:
    """The CPU class of the kernel rules: ``'amx'``, ``'avx512'`` or ``'other'`` (see the
    module docstring). torch reports AVX512 on AMX machines too, so AMX comes from the
    CPU's flags (``amx_bf16``) or a capability that names it."""
    capability = cpu_capability().upper()
    if capability.startswith("AMX") or "amx_bf16" in read_cpuinfo().flags:
        return "amx"
    return "avx512" if capability.startswith("AVX512") else "other"
