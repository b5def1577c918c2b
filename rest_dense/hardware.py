"""What the CPU can do, read once: the facts behind the kernel rules and the bf16 warning.

Pure Python and PyTorch (the model core uses it). Three CPU classes key the kernel rules of
:mod:`rest_dense.models.functional` (docs/kernels.md has the measurements):

* ``'amx'``: AMX bf16 tiles (Intel Sapphire Rapids and later); oneDNN runs bf16 GEMMs on
  the tiles, several times faster than the AVX-512 BF16 dot products.
* ``'avx512'``: torch dispatches its CPU kernels for AVX-512 (e.g. AMD Zen 4, with
  AVX-512 BF16 but no AMX).
* ``'other'``: AVX2 and everything else (bf16 emulated on x86; Arm CPUs, also those with
  the BF16 extension, were not measured and land here).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import FrozenSet, Optional

import torch

__all__ = ["CpuInfo", "read_cpuinfo", "cpu_capability", "detect_cpu_class", "cpu_class",
           "CPU_CLASSES"]

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
        with open(path, errors="replace") as f:
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


def detect_cpu_class(info: Optional[CpuInfo] = None, capability: Optional[str] = None) -> str:
    """The CPU class of ``info`` (default: this machine's ``/proc/cpuinfo``) with torch's
    kernel ``capability`` (default: this process's): ``'amx'`` needs both the ``amx_bf16``
    flag and AVX-512 kernels (torch reports AVX512 on AMX CPUs; a process capped below
    that, e.g. ``ATEN_CPU_CAPABILITY=avx2``, has kernels that cannot use the tiles), or a
    capability that names AMX; ``'avx512'`` any other AVX-512 capability; else ``'other'``."""
    info = read_cpuinfo() if info is None else info
    capability = (cpu_capability() if capability is None else capability).upper()
    if capability.startswith("AMX") or (capability.startswith("AVX512")
                                        and "amx_bf16" in info.flags):
        return "amx"
    return "avx512" if capability.startswith("AVX512") else "other"


# computed once, at import: the rules read it inside traced and compiled code, where a
# call into torch.backends or a file read would break the graph
_CPU_CLASS = detect_cpu_class()


def cpu_class() -> str:
    """This machine's CPU class for the kernel rules: ``'amx'``, ``'avx512'`` or
    ``'other'`` (see :func:`detect_cpu_class`; decided once per process)."""
    return _CPU_CLASS
