"""From checkpoint to deployed model: inference on images, whole-model ONNX export checked with
ONNX Runtime, and latency of both runtimes.

* :mod:`~rest_dense.deploy.infer` -- :func:`run_inference` / :func:`build_predictor`:
  MMDetection (``DetInferencer``), MMSegmentation (``MMSegInferencer``) and detectron2
  (``DefaultPredictor``) on image files, folders and globs; pictures plus JSON (boxes, scores,
  labels, RLE masks) or label PNGs. ``rest-dense infer``.
* :mod:`~rest_dense.deploy.model_onnx` -- :func:`load_deployment`: export with MMDeploy
  (OpenMMLab) or detectron2's ``TracingAdapter`` and compare ONNX Runtime with PyTorch.
  ``rest-dense export-model``.
* :mod:`~rest_dense.deploy.latency` -- :func:`measure_latency`: ONNX Runtime vs PyTorch latency
  on the same inputs and threads (``rest-dense export-model --benchmark``).
* :mod:`~rest_dense.deploy.shapes` -- which input sizes a traced graph is valid for.

Importing this package imports no framework; each function imports what it needs.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["run_inference", "build_predictor", "load_deployment", "measure_latency",
           "Detections", "SegMap", "Tolerances", "compare_predictions", "collect_images",
           "read_image", "ImageReadError"]

_LAZY = {
    "run_inference": "infer", "build_predictor": "infer",
    "load_deployment": "model_onnx",
    "measure_latency": "latency",
    "Detections": "predictions", "SegMap": "predictions", "Tolerances": "predictions",
    "compare_predictions": "predictions",
    "collect_images": "inputs", "read_image": "inputs", "ImageReadError": "inputs",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    from .._moved import old_attribute

    return old_attribute(__name__, name)
