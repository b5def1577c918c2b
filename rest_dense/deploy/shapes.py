"""Which input sizes a traced (dynamic-shape) graph of a ResTv2 backbone is valid for.

An ONNX graph recorded by tracing keeps the shape arithmetic of the traced input but fixes
every Python branch the trace took. ResTv2 has three shape-dependent branches per stage
(``rest_dense/models/restv2.py`` and ``layers.py``):

* **crop** -- the up-sampled value map of the reduced attention (``sr_ratio > 1``) covers
  ``ceil(side / sr) * sr`` and is cropped when that exceeds the map;
* **windows** -- in the window modes a stage with window blocks runs them in windows of
  ``(min(ws, h), min(ws, w))``; the window is a constant of the graph, and when it equals the
  whole map the stage runs globally;
* **window padding** -- the map is padded to a multiple of the window (and cropped back).

A graph traced at backbone input ``T`` gives the eager result at input ``X`` when, for every
stage, a crop / padding needed at ``X`` was traced at ``T`` (a traced crop or pad is a no-op
where none is needed), and the window is the same constant (a graph traced without windows is
valid only where the eager model runs without windows too).

The sizes here are those of the *backbone input*: the image after the framework's resize and
padding (``pad_size_divisor`` / ``SIZE_DIVISIBILITY``). Padding to a multiple of 32 makes
every stage's map a multiple of the power-of-two ``sr_ratio`` of the released variants, so
the crop branch never runs for such inputs.

ResTv1 has no shape-dependent branches of this kind (an explicit 1x1-map case aside).

This module is the one home of these rules. :func:`graph_problems` answers "is a graph traced
at ``T`` valid at ``X``" (``rest-dense export-model``); :func:`trace_problems` answers "does a
graph traced at ``T`` serve every input of at least :func:`min_valid_side` pixels", i.e. does
``T`` take every optional branch (``rest-dense export``, :func:`rest_dense.deploy.backbone_onnx.export_onnx`).
Both read the same per-stage decisions, :func:`stage_branches`; a branch taken on one side
(height or width) is traced for both, since the graph keeps the size arithmetic.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

from torch import nn

__all__ = ["StageBranches", "find_backbone", "stage_windows", "windowed_stages", "stage_branches",
           "graph_problems", "trace_problems", "trace_side_problems", "min_valid_side",
           "default_trace_shape", "coverage", "choose_trace_size", "first_unserved_size"]

Size = Tuple[int, int]


@dataclass(frozen=True)
class StageBranches:
    """The shape-dependent decisions of one stage at one input size.

    Attributes:
        map_size: ``(h, w)`` of the stage's map.
        crop: the reduced-attention up-sampling is cropped (either side).
        window: window ``(wh, ww)`` when the stage runs blocks in windows, else None.
        pad: the map is padded to a multiple of the window (only with ``window``).
    """

    map_size: Size
    crop: bool
    window: Optional[Size]
    pad: bool


def find_backbone(model: nn.Module) -> Optional[nn.Module]:
    """The first ResT backbone (core class or an adapter subclass) inside ``model``: the
    module of :func:`rest_dense.models.find_backbone`."""
    from ..models.pretrained import find_backbone as find_prefix_and_backbone

    found = find_prefix_and_backbone(model)
    return None if found is None else found[1]


def _side(n: int, stage: int) -> int:
    # stem: two stride-2 3x3 convs with padding 1; each later stage: one more
    return -(-n // 2 ** (stage + 2))


def stage_windows(backbone: nn.Module) -> List[Optional[int]]:
    """Window side per stage for the stages that run (some) blocks in windows, else None
    (every stage of ResTv1 and of global attention)."""
    from ..models import ResTv2

    if not isinstance(backbone, ResTv2):
        return [None] * len(backbone.sr_ratios)
    return [ws if n else None for ws, n in zip(backbone.window_size, backbone.num_window_blocks)]


def windowed_stages(backbone: nn.Module) -> List[int]:
    """1-based stages of ``backbone`` whose blocks (some or all) run in windows, among the
    stages it computes; empty for global attention and for ResTv1."""
    last = max(backbone.out_indices)
    return [i + 1 for i, ws in enumerate(stage_windows(backbone)) if ws is not None and i <= last]


def _reduced(n: int, sr: int) -> int:
    # the reduction conv: kernel sr + 1, stride sr, padding sr // 2
    return (n + 2 * (sr // 2) - (sr + 1)) // sr + 1


def stage_branches(backbone: nn.Module, size: Size) -> List[StageBranches]:
    """The decisions each stage of ``backbone`` takes for a ``size = (H, W)`` input.

    Args:
        backbone: a ResT backbone (see :func:`find_backbone`).
        size: backbone input ``(H, W)``.

    Returns:
        One :class:`StageBranches` per stage the backbone runs (empty for ResTv1, which has
        none of these branches).
    """
    from ..models import ResTv2

    if not isinstance(backbone, ResTv2):
        return []
    windows = stage_windows(backbone)
    out = []
    for i in range(max(backbone.out_indices) + 1):
        h, w = _side(size[0], i), _side(size[1], i)
        sr, ws = backbone.sr_ratios[i], windows[i]
        crop = sr > 1 and (_reduced(h, sr) * sr != h or _reduced(w, sr) * sr != w)
        window, pad = None, False
        if ws is not None:
            win = (min(ws, h), min(ws, w))
            if win != (h, w):
                window = win
                pad = bool(h % win[0] or w % win[1])
        out.append(StageBranches((h, w), crop, window, pad))
    return out


def graph_problems(backbone: nn.Module, traced: Size, size: Size) -> List[str]:
    """Why a graph of ``backbone`` traced at input ``traced`` would differ from eager at ``size``.

    Args:
        backbone: a ResT backbone.
        traced: backbone input ``(H, W)`` the graph was traced at.
        size: backbone input ``(H, W)`` to run the graph at.

    Returns:
        One message per stage whose traced decisions do not hold at ``size``; empty when the
        graph is valid there.
    """
    problems = []
    for i, (t, x) in enumerate(zip(stage_branches(backbone, traced), stage_branches(backbone, size))):
        where = (f"stage {i + 1} (map {x.map_size[0]}x{x.map_size[1]} at input "
                 f"{size[0]}x{size[1]}, {t.map_size[0]}x{t.map_size[1]} when traced at "
                 f"{traced[0]}x{traced[1]})")
        if x.crop and not t.crop:
            problems.append(f"{where}: needs the crop of the reduced attention, which the trace "
                            "did not take")
        if t.window is None:
            if x.window is not None:
                problems.append(f"{where}: eager runs windows {x.window[0]}x{x.window[1]}, "
                                "the graph global attention")
            continue
        # a map that fits in one window runs globally, which equals one window of its size
        eager = x.window if x.window is not None else x.map_size
        if eager != t.window:
            problems.append(f"{where}: eager runs windows {eager[0]}x{eager[1]}, the graph "
                            f"{t.window[0]}x{t.window[1]}")
        elif x.pad and not t.pad:
            problems.append(f"{where}: needs window padding, which the trace did not take")
    return problems


def trace_problems(backbone: nn.Module, size: Size) -> List[str]:
    """Why a dynamic graph traced at ``size`` would not serve every input whose sides are at
    least :func:`min_valid_side`: each optional branch must be traced.

    That is, at every stage the backbone computes: the crop of the reduced attention
    (``sr_ratio > 1``: the map is not a multiple of ``sr_ratio`` on at least one side) and,
    in windowed stages, whole windows (the map exceeds the window on both sides) with window
    padding (not a multiple of the window on at least one side).

    Args:
        backbone: a ResT backbone.
        size: backbone input ``(H, W)`` to trace at.

    Returns:
        One message per untraced branch; empty when ``size`` serves.
    """
    problems = []
    for i, (b, ws) in enumerate(zip(stage_branches(backbone, size), stage_windows(backbone))):
        h, w = b.map_size
        sr = backbone.sr_ratios[i]
        if sr > 1 and not b.crop:
            problems.append(f"stage {i + 1}: map {h}x{w} is a multiple of sr_ratio {sr} on both "
                            "sides (the crop of the reduced attention is not traced)")
        if ws is None:
            continue
        if b.window != (ws, ws):
            problems.append(f"stage {i + 1}: map {h}x{w} must exceed the window {ws} on both sides")
        elif not b.pad:
            problems.append(f"stage {i + 1}: map {h}x{w} is a multiple of the window {ws} on both "
                            "sides (window padding is not traced)")
    return problems


def trace_side_problems(backbone: nn.Module, side: int) -> List[str]:
    """:func:`trace_problems` of a square ``side`` x ``side`` trace: a side for which this is
    empty serves as height or width of a trace whatever the other side is.

    ``torch.export`` (:func:`rest_dense.deploy.backbone_onnx.export_program`) needs this of both sides:
    it guards the branch conditions side by side, where a TorchScript trace (ONNX) records
    one branch for both.
    """
    return trace_problems(backbone, (side, side))


def min_valid_side(backbone: nn.Module) -> int:
    """Smallest input side at which a dynamic graph of ``backbone`` matches eager.

    Window modes need every windowed stage's map to be at least one window large (a smaller
    map runs in one window of its own size in eager, which a traced graph cannot do); other
    modes have no limit (1 is returned).
    """
    last = max(backbone.out_indices)
    need = [(ws - 1) * 2 ** (i + 2) + 1 for i, ws in enumerate(stage_windows(backbone))
            if ws is not None and i <= last]
    return max(need, default=1)


def default_trace_shape(backbone: nn.Module, start: Size = (256, 384)) -> Size:
    """The smallest ``(H, W)`` at or above ``start`` whose sides each pass
    :func:`trace_side_problems` (257x385 for the default windows)."""
    def first(n: int) -> int:
        while trace_side_problems(backbone, n):
            n += 1
        return n

    return first(start[0]), first(start[1])


def coverage(backbone: nn.Module, size: Size) -> int:
    """How many optional branches (crops, window paddings) an input ``size`` traces."""
    return sum(int(b.crop) + int(b.pad) for b in stage_branches(backbone, size))


def choose_trace_size(backbone: nn.Module, sizes: Sequence[Size], divisor: int = 1,
                      candidates: Optional[Iterable[int]] = None) -> Tuple[Size, List[str]]:
    """A trace input valid for every one of ``sizes``; among those, one that serves every size
    (no :func:`trace_problems`) where there is one, taking as many branches as possible.

    Args:
        backbone: a ResT backbone.
        sizes: backbone inputs ``(H, W)`` the graph must serve (e.g. those of the check images).
        divisor: inputs are padded to a multiple of this; candidates are its multiples.
        candidates: sides to try (default: multiples of ``divisor`` from ``divisor`` up to twice
            the largest side in ``sizes``, at least 512).

    Returns:
        ``(size, problems)``: the chosen ``(H, W)`` and, when no candidate serves every size,
        the problems of the best one (empty otherwise).
    """
    if candidates is None:
        if divisor >= 8:
            top = max([512] + [2 * max(s) for s in sizes])
            candidates = range(divisor, top + 1, divisor)
        else:  # unpadded inputs: sides near the ones to serve
            candidates = {c for s in sizes for side in s
                          for c in range(max(divisor, side - 32), side + 33) if c % divisor == 0}
    cands = sorted(set(int(c) for c in candidates))
    if not stage_branches(backbone, (cands[0], cands[0])):
        # nothing shape-dependent: any size serves; prefer the first of the given sizes
        return (tuple(sizes[0]) if sizes else (cands[0], cands[0])), []
    best, best_key, best_problems = None, None, None
    for h, w in itertools.product(cands, cands):
        problems = [p for s in sizes for p in graph_problems(backbone, (h, w), s)]
        # fewest problems, then fewest branches left untraced (a trace that serves every
        # size first), most traced, then closest to the sizes served
        dist = min((abs(math.log(h / s[0])) + abs(math.log(w / s[1])) for s in sizes), default=0.0)
        key = (len(problems), len(trace_problems(backbone, (h, w))), -coverage(backbone, (h, w)),
               dist, h * w)
        if best_key is None or key < best_key:
            best, best_key, best_problems = (h, w), key, problems
    return best, best_problems


def first_unserved_size(backbone: nn.Module, traced: Size, divisor: int = 1,
                        max_side: int = 1344) -> Optional[Size]:
    """The smallest backbone input (sides multiples of ``divisor``, at least
    :func:`min_valid_side`, at most ``max_side``) at which a graph traced at ``traced`` would
    differ from eager (:func:`graph_problems`), or None when it serves all of them.

    Args:
        backbone: a ResT backbone.
        traced: backbone input ``(H, W)`` the graph was traced at.
        divisor: inputs are padded to a multiple of this.
        max_side: the largest side tried.
    """
    step = max(int(divisor), 1)
    first = -(-max(min_valid_side(backbone), step) // step) * step
    sides = list(range(first, max_side + 1, step))
    if len(sides) > 160:  # unpadded inputs: every side to 160, then a spread of the others
        sides = sorted(set(sides[:160] + sides[160::len(sides) // 160 + 1]))
    for h, w in sorted(itertools.product(sides, sides), key=lambda s: (s[0] * s[1], s)):
        if graph_problems(backbone, traced, (h, w)):
            return h, w
    return None
