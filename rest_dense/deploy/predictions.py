"""Framework-neutral predictions: conversion from MMDetection / MMSegmentation / detectron2
outputs, the files ``rest-dense infer`` writes, and the comparison of two runtimes' outputs.

Detections are ``(N, 4)`` boxes ``x1, y1, x2, y2`` in pixels of the original image, scores,
0-based labels and optional ``(N, H, W)`` boolean masks; a segmentation is an ``(H, W)``
map of 0-based class indices.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np

from ..data.rle import coco_rle_to_mask, mask_to_coco_rle
from .runtime import ParityResult

__all__ = ["Detections", "SegMap", "Prediction", "from_det_sample", "from_seg_sample",
           "from_d2_instances", "from_d2_sem_seg", "mask_to_coco_rle", "coco_rle_to_mask",
           "detections_to_json",
           "detections_from_json", "write_label_png", "read_label_png", "Tolerances",
           "Comparison", "compare_predictions"]


@dataclass
class Detections:
    """Instances found in one image.

    Attributes:
        boxes: ``(N, 4)`` float32 ``x1, y1, x2, y2`` in original-image pixels.
        scores: ``(N,)`` float32.
        labels: ``(N,)`` int64, 0-based class indices.
        masks: ``(N, H, W)`` bool instance masks at the original image size, or None
            (box-only detectors).
        image_size: ``(H, W)`` of the original image.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    masks: Optional[np.ndarray]
    image_size: tuple

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def select(self, keep: np.ndarray) -> "Detections":
        """The detections where the boolean ``keep`` is True."""
        return Detections(self.boxes[keep], self.scores[keep], self.labels[keep],
                          None if self.masks is None else self.masks[keep], self.image_size)

    def above(self, score_thr: float) -> "Detections":
        """The detections scoring at least ``score_thr``."""
        return self.select(self.scores >= score_thr)


@dataclass
class SegMap:
    """A semantic segmentation: ``labels`` is an ``(H, W)`` int64 map of class indices;
    ``logits``, when kept, the ``(C, H, W)`` float scores it is the argmax of (compared by
    :func:`compare_predictions` as ``max_logit_diff``)."""

    labels: np.ndarray
    logits: Optional[np.ndarray] = None

    @property
    def image_size(self) -> tuple:
        return tuple(self.labels.shape)


Prediction = Union[Detections, SegMap]


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


# ------------------------------------------------------------------ conversions
def from_det_sample(sample: Any) -> Detections:
    """Convert an MMDetection ``DetDataSample`` (``pred_instances``) to :class:`Detections`."""
    pred = sample.pred_instances
    boxes = pred.bboxes
    boxes = _np(getattr(boxes, "tensor", boxes)).astype(np.float32).reshape(-1, 4)
    masks = None
    if "masks" in pred:
        m = pred.masks
        m = getattr(m, "masks", m)  # BitmapMasks
        masks = _np(m).astype(bool)
    h, w = sample.metainfo.get("ori_shape", masks.shape[1:] if masks is not None else (0, 0))[:2]
    return Detections(boxes, _np(pred.scores).astype(np.float32).reshape(-1),
                      _np(pred.labels).astype(np.int64).reshape(-1), masks, (int(h), int(w)))


def from_seg_sample(sample: Any, with_logits: bool = False) -> SegMap:
    """Convert an MMSegmentation ``SegDataSample`` (``pred_sem_seg``) to :class:`SegMap`;
    ``with_logits``: keep its ``seg_logits`` (image size) too."""
    labels = _np(sample.pred_sem_seg.data)
    logits = None
    if with_logits and "seg_logits" in sample:
        logits = _np(sample.seg_logits.data).astype(np.float32)
    return SegMap(labels.reshape(labels.shape[-2:]).astype(np.int64), logits)


def from_d2_sem_seg(logits: Any) -> SegMap:
    """Convert detectron2 ``SemanticSegmentor`` output (``"sem_seg"``: ``(C, H, W)`` logits at
    the original image size) to :class:`SegMap` (labels: argmax over the classes)."""
    logits = _np(logits).astype(np.float32)
    return SegMap(logits.argmax(0).astype(np.int64), logits)


def from_d2_instances(instances: Any) -> Detections:
    """Convert detectron2 ``Instances`` (after ``detector_postprocess``) to :class:`Detections`."""
    boxes = _np(instances.pred_boxes.tensor).astype(np.float32).reshape(-1, 4)
    masks = None
    if instances.has("pred_masks"):
        masks = _np(instances.pred_masks).astype(bool)
        if masks.ndim == 4:
            masks = masks[:, 0]
    h, w = instances.image_size
    return Detections(boxes, _np(instances.scores).astype(np.float32).reshape(-1),
                      _np(instances.pred_classes).astype(np.int64).reshape(-1), masks,
                      (int(h), int(w)))


# ------------------------------------------------------------------ files
def detections_to_json(det: Detections, classes: Sequence[str], **extra: Any) -> Dict[str, Any]:
    """The JSON document ``rest-dense infer`` writes for one image.

    Args:
        det: the detections.
        classes: class names, indexed by label.
        **extra: more top-level entries (image path, framework, ...).

    Returns:
        ``{**extra, "height", "width", "classes", "instances": [{"bbox": [x1, y1, x2, y2],
        "score", "label", "category", "segmentation": COCO RLE}]}`` (masks:
        :func:`~rest_dense.data.rle.mask_to_coco_rle`).
    """
    instances = []
    for i in range(len(det)):
        label = int(det.labels[i])
        item = {"bbox": [round(float(v), 3) for v in det.boxes[i]],
                "score": round(float(det.scores[i]), 6),
                "label": label,
                "category": classes[label] if 0 <= label < len(classes) else str(label)}
        if det.masks is not None:
            item["segmentation"] = mask_to_coco_rle(det.masks[i])
        instances.append(item)
    return {**extra, "height": int(det.image_size[0]), "width": int(det.image_size[1]),
            "classes": list(classes), "instances": instances}


def detections_from_json(doc: Union[str, os.PathLike, Dict[str, Any]]) -> Detections:
    """Read back a document of :func:`detections_to_json` (a dict or a file path)."""
    if not isinstance(doc, dict):
        with open(doc, encoding="utf-8") as f:
            doc = json.load(f)
    inst = doc["instances"]
    h, w = int(doc["height"]), int(doc["width"])
    masks = None
    if inst and "segmentation" in inst[0]:
        masks = np.stack([coco_rle_to_mask(i["segmentation"]) for i in inst])
    elif not inst:
        masks = np.zeros((0, h, w), bool)
    return Detections(np.array([i["bbox"] for i in inst], np.float32).reshape(-1, 4),
                      np.array([i["score"] for i in inst], np.float32),
                      np.array([i["label"] for i in inst], np.int64), masks, (h, w))


def write_label_png(labels: np.ndarray, path: Union[str, os.PathLike]) -> None:
    """Save a label map as a PNG of class indices (8-bit up to 256 classes, else 16-bit)."""
    import cv2

    labels = np.asarray(labels)
    if labels.min(initial=0) < 0 or labels.max(initial=0) > 65535:
        raise ValueError(f"label values must lie in 0..65535, got {labels.min()}..{labels.max()}")
    dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
    if not cv2.imwrite(os.fspath(path), labels.astype(dtype)):
        raise OSError(f"could not write {path}")


def read_label_png(path: Union[str, os.PathLike]) -> np.ndarray:
    """Read a label PNG written by :func:`write_label_png` as int64."""
    import cv2

    labels = cv2.imread(os.fspath(path), cv2.IMREAD_UNCHANGED)
    if labels is None:
        raise OSError(f"could not read {path}")
    return labels.astype(np.int64)


# ------------------------------------------------------------------ comparison
@dataclass
class Tolerances:
    """How far two runtimes' predictions may differ.

    Attributes:
        box_atol: largest coordinate difference of matched boxes, in pixels.
        score_atol: largest score difference of matched detections; a detection without a
            partner is tolerated only if its score lies within this of the other side's lowest
            kept score (a ``max_per_img`` cut) or of ``score_thr``: a borderline case.
        mask_iou: smallest IoU of matched masks (masks empty on both sides count as equal).
        seg_agreement: smallest fraction of pixels with the same class.
        score_thr: the score threshold both sides applied.
        logit_atol: largest difference of segmentation logits where both sides kept them
            (``None``: measured as ``max_logit_diff``, not held to a bound).
    """

    box_atol: float = 0.5
    score_atol: float = 0.005
    mask_iou: float = 0.9
    seg_agreement: float = 0.999
    score_thr: float = 0.0
    logit_atol: Optional[float] = None


#: the outcome of :func:`compare_predictions`: a :class:`~rest_dense.deploy.runtime.ParityResult`
#: with ``metrics`` and ``problems`` (the old name stays an alias)
Comparison = ParityResult


def _iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), np.float64)
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    same = (np.abs(a[:, None] - b[None]).max(-1) == 0).astype(np.float64)  # zero-area boxes
    return np.where(union > 0, inter / np.maximum(union, 1e-12), same)


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)


def _compare_detections(ref: Detections, out: Detections, tol: Tolerances) -> ParityResult:
    res = ParityResult(tuple(ref.image_size))
    for name, det in (("reference", ref), ("exported", out)):
        for what, arr in (("boxes", det.boxes), ("scores", det.scores)):
            if not np.isfinite(arr).all():
                res.problems.append(f"non-finite {what} in the {name} output")
    if res.problems:
        return res
    if tuple(ref.image_size) != tuple(out.image_size):
        res.problems.append(f"image size {out.image_size} != reference {ref.image_size}")
    iou = _iou_matrix(ref.boxes, out.boxes)
    iou = np.where(ref.labels[:, None] == out.labels[None, :], iou, 0.0)
    # closest pairs first (an exact partner is never taken by a near-duplicate)
    cand = np.argwhere(iou >= 0.5)
    order = np.lexsort((-ref.scores[cand[:, 0]] if len(cand) else [], -iou[tuple(cand.T)] if len(cand) else []))
    used = np.zeros(len(out), bool)
    matched_ref = set()
    pairs = []
    for i, j in cand[order]:
        if i in matched_ref or used[j]:
            continue
        used[j] = True
        matched_ref.add(int(i))
        pairs.append((int(i), int(j)))
    box_diff = max((float(np.abs(ref.boxes[i] - out.boxes[j]).max()) for i, j in pairs), default=0.0)
    score_diff = max((abs(float(ref.scores[i]) - float(out.scores[j])) for i, j in pairs), default=0.0)
    res.metrics.update(reference=len(ref), exported=len(out), matched=len(pairs),
                       max_box_diff=box_diff, max_score_diff=score_diff)
    if len(ref):  # the reference's score range: near-equal scores make a weak comparison
        res.metrics.update(min_score=float(ref.scores.min()), max_score=float(ref.scores.max()))
    if box_diff > tol.box_atol:
        res.problems.append(f"matched boxes differ by up to {box_diff:.3g} px > {tol.box_atol:g}")
    if score_diff > tol.score_atol:
        res.problems.append(f"matched scores differ by up to {score_diff:.3g} > {tol.score_atol:g}")

    def cut(det: Detections) -> float:
        # the lowest score a side kept: anything below it may have been cut off there
        return max(float(det.scores.min()) if len(det) else tol.score_thr, tol.score_thr)

    border = []
    for name, det, unmatched, other in (
            ("reference", ref, [i for i in range(len(ref)) if i not in matched_ref], out),
            ("exported", out, list(np.where(~used)[0]), ref)):
        for k in unmatched:
            s = float(det.scores[k])
            if abs(s - cut(other)) <= tol.score_atol or s <= tol.score_thr + tol.score_atol:
                border.append(s)
            else:
                res.problems.append(f"{name} detection (label {int(det.labels[k])}, score {s:.3f}, "
                                    f"box {np.round(det.boxes[k], 1).tolist()}) has no match")
    res.metrics["unmatched_borderline"] = len(border)
    if ref.masks is not None or out.masks is not None:
        if ref.masks is None or out.masks is None:
            res.problems.append("only one side has masks")
        else:
            ious = [_mask_iou(ref.masks[i], out.masks[j]) for i, j in pairs]
            worst = min(ious, default=1.0)
            res.metrics["min_mask_iou"] = worst
            if worst < tol.mask_iou:
                res.problems.append(f"matched masks overlap with IoU down to {worst:.3f} < {tol.mask_iou:g}")
    return res


def _compare_seg(ref: SegMap, out: SegMap, tol: Tolerances) -> ParityResult:
    res = ParityResult(tuple(ref.labels.shape))
    if ref.labels.shape != out.labels.shape:
        res.problems.append(f"label map shape {out.labels.shape} != reference {ref.labels.shape}")
        return res
    agree = float((ref.labels == out.labels).mean()) if ref.labels.size else 1.0
    res.metrics.update(pixel_agreement=agree, classes=int(len(np.unique(ref.labels))))
    if agree < tol.seg_agreement or math.isnan(agree):
        res.problems.append(f"only {agree:.4%} of the pixels agree (< {tol.seg_agreement:.2%})")
    if ref.logits is not None and out.logits is not None:
        if ref.logits.shape != out.logits.shape:
            res.problems.append(f"logits shape {out.logits.shape} != reference {ref.logits.shape}")
            return res
        finite = bool(np.isfinite(ref.logits).all() and np.isfinite(out.logits).all())
        diff = float(np.abs(ref.logits - out.logits).max()) if finite and ref.logits.size else \
            (0.0 if finite else math.nan)
        res.metrics["max_logit_diff"] = diff
        if not finite:
            res.problems.append("non-finite logits")
        elif tol.logit_atol is not None and diff > tol.logit_atol:
            res.problems.append(f"logits differ by up to {diff:.3g} > {tol.logit_atol:g}")
    return res


def compare_predictions(ref: Prediction, out: Prediction, tol: Optional[Tolerances] = None
                        ) -> ParityResult:
    """Compare the exported runtime's prediction ``out`` with the reference ``ref``.

    Detections are matched greedily, closest pairs first, to a same-label detection with box
    IoU >= 0.5; then box coordinates, scores and mask IoU of the pairs are held to
    ``tol``, and unmatched detections are allowed only near the score cut-off. Segmentations
    must agree on ``tol.seg_agreement`` of the pixels. Non-finite values always fail.

    Args:
        ref: the reference (PyTorch) prediction.
        out: the exported model's prediction.
        tol: tolerances (default: :class:`Tolerances()`).

    Returns:
        A :class:`~rest_dense.deploy.runtime.ParityResult` with ``metrics`` (``max_box_diff``,
        ``max_score_diff``, ``min_mask_iou``, ``matched``, ``unmatched_borderline``,
        ``min_score`` / ``max_score`` of the reference, ``pixel_agreement``, ``max_logit_diff``
        where both segmentations kept logits, ...) and
        ``problems`` (what exceeded the tolerances or is invalid).
    """
    tol = tol or Tolerances()
    if isinstance(ref, Detections) and isinstance(out, Detections):
        return _compare_detections(ref, out, tol)
    if isinstance(ref, SegMap) and isinstance(out, SegMap):
        return _compare_seg(ref, out, tol)
    raise TypeError(f"cannot compare {type(ref).__name__} with {type(out).__name__}")
