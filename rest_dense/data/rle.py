"""COCO run-length encoding of binary masks, in pycocotools' compressed format.

One encoding for the whole package: the toy dataset's annotations
(:mod:`rest_dense.data.toy`) and the masks ``rest-dense infer`` writes
(:mod:`rest_dense.deploy.predictions`) are ``{"size": [h, w], "counts": str}``, the JSON form
of ``pycocotools.mask.encode`` (its ``counts`` bytes as ASCII text), which pycocotools,
MMDetection and detectron2 read directly. Written in numpy, so that the toy dataset needs no
pycocotools.

The format: the mask is read column-major (Fortran order); ``counts`` alternate runs of 0s
and 1s, starting with 0s (a zero-length run when the first pixel is set). Each run from the
third on is stored as its difference to the run two before, then written as 5-bit groups,
least significant first, each as the character ``chr(48 + group)`` with bit 0x20 marking
"more groups follow" (pycocotools' ``rleToString``).
"""
from __future__ import annotations

from typing import Any, Dict, List

import numpy as np

__all__ = ["mask_to_coco_rle", "coco_rle_to_mask"]


def _runs(mask: np.ndarray) -> List[int]:
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return [int(c) for c in counts]


def _to_string(counts: List[int]) -> str:
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr(c + 48 + (0x20 if more else 0)))
    return "".join(out)


def _from_string(text: str) -> List[int]:
    counts: List[int] = []
    p = 0
    while p < len(text):
        x, k, more = 0, 0, True
        while more:
            c = ord(text[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def mask_to_coco_rle(mask: np.ndarray) -> Dict[str, Any]:
    """Compressed COCO RLE of a binary ``(H, W)`` mask, JSON-ready.

    Returns:
        ``{"size": [H, W], "counts": str}``, equal to ``pycocotools.mask.encode`` of the mask
        with ``counts`` decoded as ASCII.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask is (H, W), got shape {mask.shape}")
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": _to_string(_runs(mask))}


def coco_rle_to_mask(rle: Dict[str, Any]) -> np.ndarray:
    """The bool ``(H, W)`` mask of a COCO RLE: compressed (``counts`` a string or bytes, as
    :func:`mask_to_coco_rle` and pycocotools write) or uncompressed (a list of run lengths,
    as toy datasets of format version 2 hold)."""
    h, w = (int(s) for s in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    if isinstance(counts, str):
        counts = _from_string(counts)
    counts = np.asarray(counts, dtype=np.int64)
    if counts.sum() != h * w:
        raise ValueError(f"RLE runs cover {int(counts.sum())} pixels, not {h}x{w}")
    values = (np.arange(len(counts)) % 2).astype(bool)
    return np.repeat(values, counts).reshape((w, h)).T
