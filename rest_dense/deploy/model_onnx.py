"""Whole-model ONNX export of the MMDetection / MMSegmentation / detectron2 models, checked
with ONNX Runtime against PyTorch on the same inputs.

Export paths (the ecosystems' own deployment tools):

* **MMDetection / MMSegmentation**: MMDeploy 1.3.1's ``torch2onnx`` with the deploy configs
  shipped in ``configs/deploy/`` and the fixes of :mod:`rest_dense.deploy.mmdeploy_support`.
  Inside the graph: backbone, neck and heads including box decoding and NMS (Mask R-CNN:
  RPN, RoIAlign, box and mask heads; RetinaNet: head, decoding, NMS; UperNet: decode head and
  the resize of the logits to the input). Outside, in PyTorch, for both runtimes alike: the
  config's test pipeline (resize), normalisation and padding; boxes rescaled and masks pasted
  into the original image (MMDeploy's ``End2EndModel``); for segmentation, MMSegmentation's
  ``postprocess_result`` (crop of the padding, resize, argmax).
* **detectron2** (``GeneralizedRCNN``: Mask R-CNN / Faster R-CNN): ``TracingAdapter``
  (``detectron2.export.flatten``) around the model's inference without post-processing,
  exported with ``torch.onnx.export(dynamo=False)``. Inside: normalisation, padding,
  backbone, FPN, RPN, RoI heads with NMS, mask head (28x28 probabilities); outside, for both
  runtimes: the test-time resize and ``detector_postprocess`` (rescale, mask pasting).
  ``RetinaNet``: the same, with head, anchors, per-level decoding and NMS inside; its
  decoding is traced in the constant-top-k form of :mod:`rest_dense.deploy.d2_support`.
  ``SemanticSegmentor`` (e.g. ResT + VT-FPN or FPN + ``SemSegFPNHead``): normalisation,
  padding, backbone, neck and head inside (logits of the padded input); outside, for both
  runtimes: ``sem_seg_postprocess`` (crop of the padding, resize to the image) and argmax.

Dynamic height and width: the graph is traced once, so it keeps the backbone's shape
branches as taken at the trace size (:mod:`rest_dense.deploy.shapes`). The trace size is
chosen so that the graph is valid for every check image (and as many branches as possible are
traced); :func:`check_export` states, per image, whether the graph is valid there.

Example::

    from rest_dense.deploy import load_deployment
    dep = load_deployment("toy/mask_rcnn_restv2_toy.py", "iter_600.pth")
    exp = dep.export("mask_rcnn.onnx", check_sizes=[(120, 152), (136, 200)])
    for r in dep.check(exp.path, [(120, 152), (136, 200)]):
        print(r.describe())
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..amp import autocast_off
from .inputs import read_image, synthetic_image
from .logs import quiet_logs
from .predictions import (Detections, Prediction, Tolerances, compare_predictions,
                          from_d2_instances, from_d2_sem_seg, from_det_sample, from_seg_sample)
from .runtime import ParityResult, make_session
from .shapes import choose_trace_size, find_backbone, graph_problems, min_valid_side

__all__ = ["DEFAULT_OPSET", "SUPPORTED_OPSETS", "check_opset", "ExportResult", "CheckResult", "Deployment", "MMDeployment",
           "D2Deployment", "load_deployment", "make_session", "quiet_logs"]

DEFAULT_OPSET = 16
#: opsets whole models export at and were checked at: RoIAlign's half-pixel mode needs 16
#: (below, detectron2's boxes come out shifted); MMDeploy's graphs fail to validate from 18
SUPPORTED_OPSETS = (16, 17)


def check_opset(opset: int) -> int:
    """``opset`` as an int if whole models export at it.

    Raises:
        ValueError: another opset, naming the supported ones.
    """
    if isinstance(opset, bool) or int(opset) != opset or int(opset) not in SUPPORTED_OPSETS:
        raise ValueError(f"--opset {opset} is not supported for whole models; choose "
                         f"{' or '.join(map(str, SUPPORTED_OPSETS))} (RoIAlign's half-pixel "
                         "mode needs 16; MMDeploy's graphs do not validate from 18)")
    return int(opset)
Size = Tuple[int, int]
PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class ExportResult:
    """What :meth:`Deployment.export` wrote.

    Attributes:
        path: the ONNX file.
        framework: ``'mmdet'``, ``'mmseg'`` or ``'detectron2'``.
        tool: the exporter (``'mmdeploy 1.3.1'`` / ``'detectron2 TracingAdapter'``).
        trace_size: backbone input ``(H, W)`` the graph was traced at.
        opset: ONNX opset.
        inputs / outputs: graph input and output names.
        inside: one line on what runs inside the graph.
        problems: sizes the trace cannot serve (see :func:`shapes.graph_problems`); empty
            when the trace serves every check size.
        seconds: export time.
        min_side: the smallest backbone input side the graph serves (window modes: each
            windowed map at least one window large, :func:`shapes.min_valid_side`; 1 in
            the other modes), also in the graph's metadata as ``rest_dense.min_side``.
    """

    path: str
    framework: str
    tool: str
    trace_size: Size
    opset: int
    inputs: List[str]
    outputs: List[str]
    inside: str
    problems: List[str] = field(default_factory=list)
    seconds: float = 0.0
    min_side: int = 1


#: a whole-model check result is a :class:`~rest_dense.deploy.runtime.ParityResult` (``image``,
#: ``image_size``, prediction ``metrics``, ``graph_problems``); the old name stays an alias
CheckResult = ParityResult


def _graph_io(path: str) -> Tuple[List[str], List[str]]:
    import onnx

    m = onnx.load(path, load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    return [i.name for i in m.graph.input if i.name not in inits], [o.name for o in m.graph.output]


def _check_images(sizes: Sequence[Size], images: Sequence[str]) -> List[Tuple[str, np.ndarray]]:
    out = [(f"synthetic {h}x{w}", synthetic_image(h, w, seed=i)) for i, (h, w) in enumerate(sizes)]
    out += [(p, read_image(p)) for p in images]
    return out


# ------------------------------------------------------------------ common interface
class Deployment:
    """A model built from a config and a checkpoint, with its PyTorch and ONNX Runtime runs.

    Subclasses implement :meth:`prepare` (image -> the framework's input),
    :meth:`input_size`, :meth:`run_torch`, :meth:`export_traced`, :meth:`load_onnx` and
    :meth:`run_onnx`; :meth:`export`, :meth:`check` and
    :func:`rest_dense.deploy.latency.measure_latency` build on them.
    """

    framework = ""
    tool = ""
    inside = ""
    divisor = 1

    def __init__(self, config: str, checkpoint: str, device: str = "cpu"):
        self.config = config
        self.checkpoint = checkpoint
        self.device = device
        self.model: Any = None
        self.backbone: Any = None
        self.opset = DEFAULT_OPSET

    # -- framework specific
    def prepare(self, image: np.ndarray) -> Any:
        raise NotImplementedError

    def input_size(self, prepared: Any) -> Size:
        raise NotImplementedError

    def run_torch(self, prepared: Any) -> Prediction:
        raise NotImplementedError

    def export_traced(self, path: str, trace_size: Size) -> None:
        raise NotImplementedError

    def load_onnx(self, path: PathLike, threads: Optional[int] = None) -> None:
        raise NotImplementedError

    def run_onnx(self, prepared: Any) -> Prediction:
        raise NotImplementedError

    # -- shared
    def _check_backbone(self) -> None:
        if self.backbone is None:
            raise ValueError(f"the model of {self.config} has no ResT backbone")

    def choose_trace_size(self, check_inputs: Sequence[Size], shape: Optional[Size] = None) -> Tuple[Size, List[str]]:
        """The backbone input size to trace at (``shape`` if given) and the check sizes it
        cannot serve."""
        if shape is not None:
            shape = (int(shape[0]), int(shape[1]))
            if self.divisor > 1 and (shape[0] % self.divisor or shape[1] % self.divisor):
                up = tuple(int(math.ceil(s / self.divisor) * self.divisor) for s in shape)
                raise ValueError(f"--shape {shape[0]}x{shape[1]} is not a multiple of the "
                                 f"model's padding divisor {self.divisor}; use {up[0]}x{up[1]}")
            problems = [p for s in check_inputs for p in graph_problems(self.backbone, shape, s)]
            return shape, problems
        sizes = list(check_inputs) or [(320, 480)]
        return choose_trace_size(self.backbone, sizes, divisor=self.divisor)

    def export(self, path: PathLike, shape: Optional[Size] = None,
               check_sizes: Sequence[Size] = (), check_images: Sequence[str] = ()) -> ExportResult:
        """Export the model to ONNX.

        Args:
            path: the ONNX file to write (folders are created).
            shape: backbone input ``(H, W)`` to trace at (a multiple of the padding divisor);
                default: chosen to serve the check images (:func:`shapes.choose_trace_size`).
            check_sizes: sizes of the synthetic check images the graph must serve.
            check_images: image files the graph must serve.

        Returns:
            :class:`ExportResult`.
        """
        from ..utils import check_output_path, make_parent_folder

        path = make_parent_folder(check_output_path(path, "the ONNX file", example="model.onnx"))
        inputs = [self.input_size(self.prepare(img)) for _, img in _check_images(check_sizes, check_images)]
        trace, problems = self.choose_trace_size(inputs, shape)
        t0 = time.perf_counter()
        with autocast_off():  # the graph of the model's own dtype, whatever the caller runs in
            self.export_traced(path, trace)
        seconds = time.perf_counter() - t0
        import onnx

        onnx.checker.check_model(path)
        low = min_valid_side(self.backbone) if self.backbone is not None else 1
        if low > 1:  # what the graph serves, for whoever deploys it (as `rest-dense export`)
            from .backbone_onnx import MIN_SIDE_METADATA

            graph = onnx.load(path)
            entry = graph.metadata_props.add()
            entry.key, entry.value = MIN_SIDE_METADATA, str(low)
            onnx.save(graph, path)
        names_in, names_out = _graph_io(path)
        return ExportResult(path, self.framework, self.tool, trace, self.opset, names_in,
                            names_out, self.inside, problems, seconds, low)

    def check(self, onnx_path: PathLike, check_sizes: Sequence[Size] = (),
              check_images: Sequence[str] = (), trace_size: Optional[Size] = None,
              tolerances: Optional[Tolerances] = None, threads: Optional[int] = None,
              on_result=None) -> List[ParityResult]:
        """Compare ONNX Runtime with PyTorch on synthetic images of ``check_sizes`` and on
        ``check_images``.

        Args:
            onnx_path: the exported file.
            check_sizes: ``(H, W)`` of synthetic test pictures (toy shapes).
            check_images: image files.
            trace_size: backbone input the graph was traced at; when given, each result also
                says whether the graph is valid at that image's input size.
            tolerances: see :class:`Tolerances` (``score_thr`` defaults to the model's).
            threads: ONNX Runtime intra-op threads.
            on_result: called with each result as it is made.

        Returns:
            One :class:`~rest_dense.deploy.runtime.ParityResult` per image.
        """
        self.load_onnx(onnx_path, threads)
        tol = tolerances or Tolerances(score_thr=self.score_thr())
        results, empty = [], []
        for name, image in _check_images(check_sizes, check_images):
            prepared = self.prepare(image)
            size = self.input_size(prepared)
            invalid = graph_problems(self.backbone, trace_size, size) if trace_size else []
            if invalid:  # ONNX Runtime may not even run the graph there: nothing to compare
                res = ParityResult(size, problems=["not run: the graph is not valid at this "
                                                   "input size"], graph_problems=invalid)
                res.image, res.image_size = name, tuple(image.shape[:2])
                results.append(res)
                empty.append(False)
                continue
            ref = self.run_torch(prepared)
            out = self.run_onnx(prepared)
            res = compare_predictions(ref, out, tol)
            res.size, res.image, res.image_size = size, name, tuple(image.shape[:2])
            results.append(res)
            empty.append(isinstance(ref, Detections) and len(ref) == 0 and len(out) == 0)
        if results and all(empty):
            for r in results:  # nothing was compared: a NaN model, or images without objects
                r.problems.append(
                    "no detections on either side for any check image: nothing was compared "
                    "(non-finite outputs, or images without objects: try --check-images)")
        for r in results:
            if on_result is not None:
                on_result(r)
        return results

    def score_thr(self) -> float:
        """The model's own test-time score threshold (0 for segmentation)."""
        return 0.0


# ------------------------------------------------------------------ MMDetection / MMSegmentation
class MMDeployment(Deployment):
    """An MMDetection / MMSegmentation model exported with MMDeploy."""

    tool = "mmdeploy 1.3.1"

    def __init__(self, config: str, checkpoint: str, device: str = "cpu",
                 cfg_options: Optional[Dict[str, Any]] = None, trusted: bool = False,
                 opset: int = DEFAULT_OPSET):
        super().__init__(config, checkpoint, device)
        from .mmdeploy_support import mmdeploy_available

        ok, why = mmdeploy_available()
        if not ok:
            raise ImportError(f"exporting MMDetection / MMSegmentation models needs MMDeploy: {why}")
        import rest_dense.mm  # noqa: F401  (backbones, checkpoint allow-list)
        from mmdeploy.apis.utils import build_task_processor

        from ..mm.safe_load import install_checkpoint_loader
        from ..checkpoint_reader import check_checkpoint_fits, model_state_dict, read_for_deployment
        from .infer import _mm_config, check_mm_model_builds
        from .mmdeploy_support import deploy_config

        install_checkpoint_loader()
        ckpt = read_for_deployment(checkpoint, trusted=trusted)
        self.cfg = _mm_config(config, cfg_options)
        self.framework = self.cfg.default_scope
        if self.framework == "mmseg":
            self.task = "segmentation"
            self.inside = ("backbone, decode head, logits resized to the input (argmax, crop and "
                           "resize to the image outside)")
        elif self.cfg.model.get("roi_head", {}).get("mask_head") is not None:
            self.task = "instance-seg"
            self.inside = ("backbone, FPN, RPN + NMS, RoIAlign, box head + NMS, mask head "
                           "(28x28 masks pasted outside)")
        else:
            self.task = "detection"
            self.inside = "backbone, neck, head, box decoding + NMS"
        self.opset = int(opset)
        self.deploy_cfg = deploy_config(self.task, opset=self.opset)
        check_mm_model_builds(self.cfg)  # a bad value in the config: one line, as such
        with quiet_logs():
            self.processor = build_task_processor(self.cfg, self.deploy_cfg, device)
            self.model = self.processor.build_pytorch_model(checkpoint)
        self.model.eval()
        check_checkpoint_fits(self.model, model_state_dict(ckpt), checkpoint, f"config {config}")
        self.backbone = find_backbone(self.model)
        self._check_backbone()
        pre = self.model.data_preprocessor
        self.divisor = int(getattr(pre, "pad_size_divisor", None) or getattr(pre, "size_divisor", None) or 1)
        self.pad_value = float(getattr(pre, "pad_value", 0) or 0)
        if self.framework == "mmdet":
            # detectors: the graph takes the unpadded image and pads it itself (so that boxes are
            # clipped to the image, not to the padding; mmdeploy_support._pad_inside)
            self.graph_cfg = copy.deepcopy(self.cfg)
            self.graph_cfg.model.data_preprocessor.pad_size_divisor = 1
            self.deploy_cfg = deploy_config(self.task, opset=self.opset,
                                            pad_size_divisor=self.divisor, pad_value=self.pad_value)
        else:
            self.graph_cfg = self.cfg
        self._backend = None
        self._session = None

    def score_thr(self) -> float:
        test_cfg = self.cfg.model.get("test_cfg") or {}
        rcnn = test_cfg.get("rcnn", test_cfg)
        return float(rcnn.get("score_thr", 0.0) or 0.0)

    def prepare(self, image: np.ndarray) -> Any:
        with quiet_logs():
            data, _ = self.processor.create_input(image, input_shape=None)
        return data

    def _preprocessed(self, data: Any) -> Dict[str, Any]:
        import torch

        with torch.no_grad():
            return self.model.data_preprocessor(copy.deepcopy(data), False)

    def input_size(self, prepared: Any) -> Size:
        shape = self._preprocessed(prepared)["inputs"].shape
        return int(shape[-2]), int(shape[-1])

    def run_torch(self, prepared: Any) -> Prediction:
        import torch

        with torch.no_grad():
            sample = self.model.test_step(copy.deepcopy(prepared))[0]
        if self.framework == "mmseg":
            return from_seg_sample(sample, with_logits=True)
        return from_det_sample(sample)

    def export_traced(self, path: str, trace_size: Size) -> None:
        from mmdeploy.apis import torch2onnx

        from .mmdeploy_support import deploy_config, mmdeploy_compat

        dcfg = deploy_config(self.task, opset=self.opset, input_shape=trace_size,
                             pad_size_divisor=self.divisor, pad_value=self.pad_value)
        image = synthetic_image(*trace_size)
        with mmdeploy_compat(), quiet_logs():
            # MMDeploy rewrites the test pipeline of the config it gets (fixed resize): a copy
            torch2onnx(image, os.path.dirname(os.path.abspath(path)), os.path.basename(path), dcfg,
                       copy.deepcopy(self.graph_cfg), self.checkpoint, self.device)
        if not os.path.isfile(path):
            raise RuntimeError(f"MMDeploy's torch2onnx finished without writing {path}")

    def load_onnx(self, path: PathLike, threads: Optional[int] = None) -> None:
        path = os.fspath(path)
        session = make_session(path, threads, self.device)
        if self.framework == "mmseg":
            self._session = session
            return
        from mmdeploy.apis.utils import build_task_processor
        from mmdeploy.backend.onnxruntime import wrapper as ort_wrapper

        # MMDeploy's wrapper would load its bundled ONNX Runtime 1.15 and custom-op library; the
        # graph needs neither: build the wrapper without them and give it our session
        original = ort_wrapper.get_ops_path
        ort_wrapper.get_ops_path = lambda: os.path.join(os.path.dirname(path), "__no_custom_ops__")
        try:
            with quiet_logs():
                processor = build_task_processor(copy.deepcopy(self.graph_cfg), self.deploy_cfg,
                                                 self.device)
                self._backend = processor.build_backend_model([path])
        finally:
            ort_wrapper.get_ops_path = original
        wrapper = self._backend.wrapper
        wrapper.sess = session
        wrapper.io_binding = session.io_binding()
        wrapper._input_metas = {i.name: i for i in session.get_inputs()}

    def run_onnx(self, prepared: Any) -> Prediction:
        import torch

        if self.framework == "mmseg":
            data = self._preprocessed(prepared)
            logits = self._session.run(None, {"input": data["inputs"].cpu().numpy()})[0]
            with torch.no_grad():
                sample = self.model.postprocess_result(torch.from_numpy(logits), data["data_samples"])[0]
            return from_seg_sample(sample, with_logits=True)
        with torch.no_grad():
            sample = self._backend.test_step(copy.deepcopy(prepared))[0]
        det = from_det_sample(sample)
        return det


# ------------------------------------------------------------------ detectron2
def _d2_inference(model, inputs):
    """GeneralizedRCNN inference without post-processing, as a tuple of tensors:
    boxes, scores, classes (and 28x28 mask probabilities of the predicted class)."""
    import torch

    images = model.preprocess_image(inputs)
    features = model.backbone(images.tensor)
    proposals, _ = model.proposal_generator(images, features, None)
    heads = model.roi_heads
    instances = heads._forward_box(features, proposals)[0]
    boxes = instances.pred_boxes.tensor
    scores = instances.scores
    classes = instances.pred_classes
    if not getattr(heads, "mask_on", False):
        return boxes, scores, classes
    feats = [features[f] for f in heads.mask_in_features]
    mask_feats = heads.mask_pooler(feats, [instances.pred_boxes])
    logits = heads.mask_head.layers(mask_feats)
    if logits.shape[1] == 1:  # class-agnostic masks
        probs = logits.sigmoid()
    else:
        index = torch.arange(logits.shape[0], device=logits.device)
        probs = logits[index, classes][:, None].sigmoid()
    return boxes, scores, classes, probs


class D2Deployment(Deployment):
    """A detectron2 ``GeneralizedRCNN``, ``RetinaNet`` or ``SemanticSegmentor`` exported with
    ``TracingAdapter`` (RetinaNet with the traceable decoding, SemanticSegmentor with the
    inference without post-processing of :mod:`rest_dense.deploy.d2_support`)."""

    framework = "detectron2"
    tool = "detectron2 TracingAdapter + torch.onnx.export(dynamo=False)"

    def __init__(self, config: str, checkpoint: str, device: str = "cpu",
                 cfg_options: Optional[Dict[str, Any]] = None, trusted: bool = False,
                 opset: int = DEFAULT_OPSET):
        super().__init__(config, checkpoint, device)
        from detectron2.modeling import GeneralizedRCNN, RetinaNet, SemanticSegmentor

        from .infer import D2Predictor

        from ..configs import config_framework, d2_opts

        opts = d2_opts(cfg_options, config_framework(config))
        with quiet_logs():
            self.predictor = D2Predictor(config, checkpoint, device, opts, trusted)
        self.model = self.predictor.model.eval()
        self.retinanet = isinstance(self.model, RetinaNet)
        self.semantic = isinstance(self.model, SemanticSegmentor)
        if not (self.retinanet or self.semantic) and (
                not isinstance(self.model, GeneralizedRCNN) or self.model.proposal_generator is None):
            raise ValueError(f"export-model handles detectron2's GeneralizedRCNN (Mask R-CNN / "
                             f"Faster R-CNN), RetinaNet and SemanticSegmentor; {config} builds "
                             f"{type(self.model).__name__}")
        self.backbone = find_backbone(self.model)
        self._check_backbone()
        self.divisor = int(getattr(self.model.backbone, "size_divisibility", 1) or 1)
        if self.semantic:
            self.has_masks = False
            self.inside = (f"normalisation, padding, backbone, "
                           f"{type(self.model.backbone).__name__} neck, "
                           f"{type(self.model.sem_seg_head).__name__} (logits of the padded input; "
                           "crop, resize to the image and argmax outside)")
        elif self.retinanet:
            self.has_masks = False
            self.inside = ("normalisation, padding, backbone, FPN, head, anchors, per-level top-k "
                           "decoding, NMS")
        else:
            self.has_masks = bool(getattr(self.model.roi_heads, "mask_on", False))
            self.inside = ("normalisation, padding, backbone, FPN, RPN + NMS, RoIAlign, box head "
                           "+ NMS" + (", mask head (28x28 masks pasted outside)" if self.has_masks
                                      else ""))
        self.opset = int(opset)
        self._session = None

    def score_thr(self) -> float:
        if self.semantic:
            return 0.0
        if self.retinanet:
            return float(self.model.test_score_thresh)
        return float(getattr(self.model.roi_heads, "test_score_thresh", 0.0))

    def prepare(self, image: np.ndarray) -> Dict[str, Any]:
        return self.predictor.model_inputs(image)

    def input_size(self, prepared: Dict[str, Any]) -> Size:
        h, w = prepared["image"].shape[-2:]
        d = self.divisor
        return int(math.ceil(h / d) * d), int(math.ceil(w / d) * d)

    def run_torch(self, prepared: Dict[str, Any]) -> Prediction:
        import torch

        with torch.no_grad():
            out = self.model([prepared])[0]
        if self.semantic:
            return from_d2_sem_seg(out["sem_seg"])
        return from_d2_instances(out["instances"].to("cpu"))

    def export_traced(self, path: str, trace_size: Size) -> None:
        import torch
        from detectron2.export.flatten import TracingAdapter

        image = synthetic_image(*trace_size)
        if self.predictor.input_format == "RGB":
            image = image[:, :, ::-1]
        tensor = torch.as_tensor(np.ascontiguousarray(image).astype("float32").transpose(2, 0, 1))
        from .d2_support import retinanet_inference, semantic_inference, traceable_retinanet

        inference = (semantic_inference if self.semantic else
                     retinanet_inference if self.retinanet else _d2_inference)
        adapter = TracingAdapter(self.model, [{"image": tensor.to(self.device)}], inference)
        adapter.eval()
        axes = {"image": {1: "height", 2: "width"}}
        if self.semantic:
            outputs = ["logits"]
            axes["logits"] = {2: "padded_height", 3: "padded_width"}
        else:
            outputs = ["boxes", "scores", "labels"] + (["masks"] if self.has_masks else [])
            axes.update({n: {0: "num_dets"} for n in outputs})
        # RetinaNet: detectron2's decoding bakes the trace image's candidate count into the
        # graph; a decoding with a constant top-k replaces it while tracing (d2_support)
        patch = traceable_retinanet(self.model) if self.retinanet else contextlib.nullcontext()
        try:
            with patch, torch.no_grad(), quiet_logs():
                torch.onnx.export(adapter, adapter.flattened_inputs, path, dynamo=False,
                                  opset_version=self.opset, input_names=["image"],
                                  output_names=outputs, dynamic_axes=axes, do_constant_folding=True)
        finally:
            self.model.eval()  # the exporter restores the adapter's (training) mode on the model

    def load_onnx(self, path: PathLike, threads: Optional[int] = None) -> None:
        self._session = make_session(path, threads, self.device)

    def run_onnx(self, prepared: Dict[str, Any]) -> Prediction:
        import torch
        from detectron2.modeling.postprocessing import detector_postprocess
        from detectron2.structures import Boxes, Instances

        image = prepared["image"]
        outs = self._session.run(None, {"image": image.cpu().numpy()})
        if self.semantic:
            from .d2_support import semantic_postprocess

            with torch.no_grad():
                logits = semantic_postprocess(torch.from_numpy(outs[0]),
                                              tuple(int(s) for s in image.shape[-2:]),
                                              prepared["height"], prepared["width"])
            return from_d2_sem_seg(logits)
        inst = Instances(tuple(int(s) for s in image.shape[-2:]))
        inst.pred_boxes = Boxes(torch.from_numpy(outs[0]))
        inst.scores = torch.from_numpy(outs[1])
        inst.pred_classes = torch.from_numpy(outs[2]).long()
        if self.has_masks:
            inst.pred_masks = torch.from_numpy(outs[3])
        return from_d2_instances(detector_postprocess(inst, prepared["height"], prepared["width"]))


def load_deployment(config: PathLike, checkpoint: PathLike, device: str = "cpu",
                    cfg_options: Optional[Dict[str, Any]] = None, trusted: bool = False,
                    opset: int = DEFAULT_OPSET) -> Deployment:
    """Build the :class:`Deployment` of a config (file or shipped name) and checkpoint.

    Raises:
        FileNotFoundError: no such config / checkpoint.
        ValueError: a config of an unknown framework, a checkpoint of another model, a model
            the exporter does not handle (detectron2 models other than GeneralizedRCNN,
            RetinaNet and SemanticSegmentor), an opset outside :data:`SUPPORTED_OPSETS`.
        ImportError: MMDeploy missing (OpenMMLab configs).
    """
    from ..configs import DETECTRON2
    from .infer import resolve_inputs

    opset = check_opset(opset)
    path, checkpoint, framework, device = resolve_inputs(config, checkpoint, device)
    cls = D2Deployment if framework in DETECTRON2 else MMDeployment
    return cls(path, checkpoint, device, cfg_options, trusted, opset)
