"""Small helpers shared by the package's tools (pure Python / PyTorch)."""
from __future__ import annotations

import re
from typing import Tuple

__all__ = ["parse_size", "format_size"]

_SIZE = re.compile(r"^\s*(\d+)\s*(?:[xX×]\s*(\d+))?\s*$")


def parse_size(text: str) -> Tuple[int, int]:
    """An image size as every tool spells it: ``'HxW'`` (``'800x1216'``), or ``'S'`` for S x S.

    Raises:
        ValueError: anything else, naming the accepted form.
    """
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"image size {text!r} is not HxW (for example 800x1216) or a single side")
    h = int(m.group(1))
    w = int(m.group(2)) if m.group(2) else h
    if h <= 0 or w <= 0:
        raise ValueError(f"image size {text!r} must be positive")
    return h, w


def format_size(size: Tuple[int, int]) -> str:
    """``(800, 1216)`` -> ``'800x1216'``."""
    return f"{size[0]}x{size[1]}"
