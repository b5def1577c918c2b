"""Inference on image files with a config and a checkpoint, through each framework's own
inference API, writing pictures and machine-readable results.

* MMDetection: ``mmdet.apis.DetInferencer``; MMSegmentation: ``mmseg.apis.MMSegInferencer``;
* detectron2: ``detectron2.engine.DefaultPredictor`` for yacs (``.yaml``) configs read with
  :func:`rest_dense.d2.engine.setup_yaml_config`; LazyConfig (``.py``) configs run the model
  with the config's test-time resize the same way.

Weights are read under :mod:`rest_dense.safe_load`'s policy and must fit the model: a checkpoint
of another model is an error (:func:`rest_dense.checkpoint_reader.check_checkpoint_fits`),
not a partly random network.

Output layout under ``out_dir``::

    vis/<name>.jpg        the image with the predictions drawn (score >= score_thr)
    preds/<name>.json     detection: boxes, scores, labels, categories, RLE masks
    preds/<name>.png      segmentation: map of class indices (8-bit, 16-bit above 256 classes)
    summary.json          config, checkpoint, classes, per-image files, skipped inputs

Example::

    from rest_dense.deploy import run_inference
    summary = run_inference("toy/mask_rcnn_restv2_toy.py", "work_dirs/toy/iter_600.pth",
                            ["data/toy/val"], "out/", score_thr=0.3)
    print(summary.processed, summary.skipped)
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..configs import building_from_config
from ..utils import check_output_path, error_text, path_inside, same_file
from .inputs import ImageReadError, collect_images, output_names, read_image
from .logs import quiet_logs
from .predictions import (Detections, Prediction, SegMap, detections_to_json, from_d2_instances,
                          from_d2_sem_seg, from_det_sample, from_seg_sample, write_label_png)

__all__ = ["FRAMEWORKS", "config_framework", "Predictor", "MMDetPredictor", "MMSegPredictor",
           "D2Predictor", "build_predictor", "InferenceSummary", "run_inference"]

#: the frameworks :func:`build_predictor` handles
FRAMEWORKS = ("mmdet", "mmseg", "detectron2")

PathLike = Union[str, "os.PathLike[str]"]


# ------------------------------------------------------------------ configs
def resolve_config(config: PathLike) -> str:
    """A config file path, or a shipped config name (:func:`rest_dense.configs.get_config_path`)."""
    from ..configs import get_config_path

    return get_config_path(os.fspath(config))


def config_framework(config: PathLike) -> str:
    """Deprecated: use :func:`rest_dense.configs.config_framework` (``'mmdet'``,
    ``'mmseg'``, ``'d2'``, ``'d2-lazy'``). Returns the toolbox that runs the config:
    ``'mmdet'``, ``'mmseg'`` or ``'detectron2'``."""
    from ..configs import DETECTRON2, config_framework as framework_of

    warnings.warn("rest_dense.deploy.infer.config_framework is deprecated; use "
                  "rest_dense.configs.config_framework", DeprecationWarning, stacklevel=2)
    framework = framework_of(config)
    return "detectron2" if framework in DETECTRON2 else framework


CfgOptions = Union[Dict[str, Any], Sequence[str], None]


def resolve_device(device: str) -> str:
    """The torch device to run on: ``device``, or ``'cpu'`` with a warning when it names
    CUDA on a machine without a usable GPU (every framework alike: detectron2 would end in
    "Found no NVIDIA driver").

    Raises:
        ValueError: not a torch device (``'gpu'``, ``'cuda:x'``), or a GPU index that does
            not exist.
    """
    import torch

    try:
        dev = torch.device(str(device))
    except RuntimeError as e:
        raise ValueError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:1, ...): "
                         f"{e}") from None
    if dev.type != "cuda":
        return str(dev)
    if not torch.cuda.is_available():
        import sys

        print(f"warning: --device {device}: no CUDA GPU is available here; running on the CPU",
              file=sys.stderr)
        return "cpu"
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} "
                         "CUDA device(s)")
    return str(dev)


def resolve_inputs(config: PathLike, checkpoint: PathLike,
                   device: str) -> Tuple[str, str, str, str]:
    """``(config file, checkpoint file, framework, device)`` of an inference / export run:
    the config resolved (:func:`resolve_config`), the checkpoint checked to exist, the
    framework by :func:`rest_dense.configs.config_framework` and the device by
    :func:`resolve_device`."""
    from ..configs import config_framework

    from ..safe_load import checkpoint_file

    path = resolve_config(config)
    checkpoint = checkpoint_file(checkpoint)
    return path, checkpoint, config_framework(path), resolve_device(device)


def _mm_config(path: str, cfg_options: CfgOptions = None):
    """The mmengine config for inference: ``cfg_options`` merged, ``LoadAnnotations`` dropped
    from the test dataloader's pipeline (images come without annotations), and that pipeline
    copied to ``test_pipeline`` (what MMDeploy reads)."""
    from ..mm.utils import load_config

    cfg = load_config(path, cfg_options)
    pipeline = [t for t in cfg.test_dataloader.dataset.pipeline if t.get("type") != "LoadAnnotations"]
    cfg.test_dataloader.dataset.pipeline = pipeline
    # MMDeploy reads the top-level `test_pipeline`: the dataloader's, overrides included
    cfg.test_pipeline = copy.deepcopy(pipeline)
    return cfg


def _mm_dataset_meta(cfg) -> Dict[str, Any]:
    """Classes / palette the config's test dataset declares (without reading annotations)."""
    ds = cfg.test_dataloader.dataset
    meta = dict(ds.get("metainfo") or {})
    return {k: list(v) for k, v in meta.items() if k in ("classes", "palette")}


def _is_name_list(value: Any, n: int) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == n


def _rgb_list(value: Any, n: int) -> Optional[List[Tuple[int, int, int]]]:
    """``value`` as ``n`` RGB triples of ints in 0..255; None if it is not that."""
    if not isinstance(value, (list, tuple)) or len(value) != n:
        return None
    out = []
    for rgb in value:
        if not isinstance(rgb, (list, tuple)) or len(rgb) != 3:
            return None
        try:
            triple = tuple(int(c) for c in rgb)
        except (TypeError, ValueError):
            return None
        if any(c != float(x) or not 0 <= c <= 255 for c, x in zip(triple, rgb)):
            return None
        out.append(triple)
    return out


def _seg_palette(num_classes: int) -> List[Tuple[int, int, int]]:
    """A fixed colour per class for a model that names none."""
    rng = np.random.RandomState(0)
    return [tuple(int(c) for c in rgb) for rgb in rng.randint(0, 256, size=(num_classes, 3))]


# ------------------------------------------------------------------ predictors
class Predictor:
    """One framework's model behind a common interface.

    Attributes:
        framework: ``'mmdet'``, ``'mmseg'`` or ``'detectron2'``.
        task: ``'det'`` (instances) or ``'seg'`` (semantic map).
        classes: class names, indexed by label.
        config: the config file.
        checkpoint: the weights file.
    """

    framework = ""
    task = "det"

    def __init__(self, config: str, checkpoint: str):
        self.config = config
        self.checkpoint = checkpoint
        self.classes: List[str] = []

    def predict(self, image: np.ndarray) -> Prediction:
        """Predict on one ``(H, W, 3)`` uint8 BGR image (original size)."""
        raise NotImplementedError

    def draw(self, image: np.ndarray, pred: Prediction, score_thr: float) -> np.ndarray:
        """The BGR image with ``pred`` drawn (detections scoring at least ``score_thr``)."""
        raise NotImplementedError


def _check_fit(model, checkpoint: Any, path: str, config: str,
               rename_d2: bool = False) -> List[str]:
    from ..models import rename_d2_norm_keys
    from ..checkpoint_reader import check_checkpoint_fits, model_state_dict

    sd = model_state_dict(checkpoint)
    if rename_d2:
        sd = rename_d2_norm_keys(sd)
    _, unexpected = check_checkpoint_fits(model, sd, path, f"config {config}")
    if unexpected:
        warnings.warn(f"checkpoint {path} has {len(unexpected)} tensors the model does not use "
                      f"(e.g. {', '.join(unexpected[:3])})")
    return unexpected


def check_mm_model_builds(cfg) -> None:
    """Build an OpenMMLab config's model once, without weights, so that a bad value in the
    config is named as the config's (:class:`rest_dense.configs.ConfigBuildError`, one line)
    before the framework builds it again and loads the weights, whose errors are the
    checkpoint's."""
    from ..mm.utils import build_model

    with quiet_logs(), building_from_config(assertions=True):
        build_model(cfg)


class _MMPredictor(Predictor):
    """Shared set-up of the OpenMMLab inferencers."""

    def _prepare(self, config: str, checkpoint: str, cfg_options, trusted: bool):
        import rest_dense.mm  # noqa: F401  (backbones, checkpoint allow-list)
        from ..mm.safe_load import install_checkpoint_loader
        from ..checkpoint_reader import read_for_deployment

        install_checkpoint_loader()
        ckpt = read_for_deployment(checkpoint, trusted=trusted)
        cfg = _mm_config(config, cfg_options)
        check_mm_model_builds(cfg)
        return cfg, ckpt


class MMDetPredictor(_MMPredictor):
    """MMDetection through ``mmdet.apis.DetInferencer``."""

    framework = "mmdet"
    task = "det"

    def __init__(self, config: str, checkpoint: str, device: str = "cpu",
                 cfg_options: Optional[Dict[str, Any]] = None, trusted: bool = False):
        super().__init__(config, checkpoint)
        from mmdet.apis import DetInferencer

        cfg, ckpt = self._prepare(config, checkpoint, cfg_options, trusted)
        with quiet_logs():
            self.inferencer = DetInferencer(model=cfg, weights=checkpoint, device=device,
                                            show_progress=False)
        model = self.inferencer.model
        _check_fit(model, ckpt, checkpoint, config)
        meta = (ckpt.get("meta") or {}).get("dataset_meta") if isinstance(ckpt, dict) else None
        if not meta:  # the checkpoint names no classes: the config's, not COCO's
            cfg_meta = _mm_dataset_meta(cfg)
            if cfg_meta.get("classes"):
                model.dataset_meta = dict(model.dataset_meta, **cfg_meta)
                self.inferencer.visualizer.dataset_meta = model.dataset_meta
        self.classes = list(model.dataset_meta["classes"])
        self.has_masks = bool(getattr(model, "with_mask", False))

    def predict_sample(self, image: np.ndarray):
        """The ``DetDataSample`` for one BGR image."""
        with quiet_logs():
            out = self.inferencer(image, return_datasamples=True, no_save_vis=True,
                                  no_save_pred=True, out_dir="")
        return out["predictions"][0]

    def predict(self, image: np.ndarray) -> Detections:
        return from_det_sample(self.predict_sample(image))

    def draw(self, image: np.ndarray, pred: Detections, score_thr: float) -> np.ndarray:
        import torch
        from mmdet.structures import DetDataSample
        from mmengine.structures import InstanceData

        keep = pred.scores >= score_thr
        inst = InstanceData()
        inst.bboxes = torch.from_numpy(pred.boxes[keep])
        inst.scores = torch.from_numpy(pred.scores[keep])
        inst.labels = torch.from_numpy(pred.labels[keep])
        if pred.masks is not None:
            inst.masks = torch.from_numpy(pred.masks[keep])
        sample = DetDataSample(pred_instances=inst)
        vis = self.inferencer.visualizer
        vis.add_datasample("image", image[..., ::-1].copy(), sample, draw_gt=False, show=False,
                           pred_score_thr=score_thr)
        return np.ascontiguousarray(vis.get_image()[..., ::-1])


class MMSegPredictor(_MMPredictor):
    """MMSegmentation through ``mmseg.apis.MMSegInferencer``."""

    framework = "mmseg"
    task = "seg"

    def __init__(self, config: str, checkpoint: str, device: str = "cpu",
                 cfg_options: Optional[Dict[str, Any]] = None, trusted: bool = False):
        super().__init__(config, checkpoint)
        from mmseg.apis import MMSegInferencer

        cfg, ckpt = self._prepare(config, checkpoint, cfg_options, trusted)
        meta = (ckpt.get("meta") or {}).get("dataset_meta") if isinstance(ckpt, dict) else None
        meta = dict(meta) if isinstance(meta, Mapping) else {}
        cfg_meta = _mm_dataset_meta(cfg)
        with quiet_logs():
            self.inferencer = MMSegInferencer(model=cfg, weights=checkpoint, device=device)
        model = self.inferencer.model
        _check_fit(model, ckpt, checkpoint, config)
        n = model.decode_head.num_classes
        # names and colours: the checkpoint's, else the config's test set's, else numbers
        # and fixed colours (the inferencer's visualizer starts with Cityscapes' and takes
        # the model's only in its own drawing call, which draw() does not use)
        classes = next((list(m["classes"]) for m in (meta, cfg_meta)
                        if _is_name_list(m.get("classes"), n)), None)
        self.classes = [str(c) for c in classes] if classes else [str(i) for i in range(n)]
        palettes = (_rgb_list(m.get("palette"), n) for m in (meta, cfg_meta))
        palette = next((p for p in palettes if p), None) or _seg_palette(n)
        self.inferencer.visualizer.dataset_meta = {"classes": self.classes, "palette": palette}

    def predict_sample(self, image: np.ndarray):
        """The ``SegDataSample`` for one BGR image."""
        with quiet_logs():
            out = self.inferencer(image, return_datasamples=True)
        return out[0] if isinstance(out, list) else out

    def predict(self, image: np.ndarray) -> SegMap:
        return from_seg_sample(self.predict_sample(image))

    def draw(self, image: np.ndarray, pred: SegMap, score_thr: float) -> np.ndarray:
        import torch
        from mmengine.structures import PixelData
        from mmseg.structures import SegDataSample

        labels = pred.labels
        if labels.size == 1:
            # mmseg indexes the picture with the class mask, a one-element tensor, which
            # numpy reads as the index 1: draw two rows and keep the first
            image, labels = np.concatenate([image, image]), np.concatenate([labels, labels])
        sample = SegDataSample(pred_sem_seg=PixelData(data=torch.from_numpy(labels)[None]))
        vis = self.inferencer.visualizer
        vis.add_datasample("image", image[..., ::-1].copy(), sample, draw_gt=False, draw_pred=True,
                           show=False, with_labels=False)
        return np.ascontiguousarray(vis.get_image()[..., ::-1][:pred.labels.shape[0]])


class D2Predictor(Predictor):
    """detectron2: ``DefaultPredictor`` (yaml configs) or the same steps for a LazyConfig.

    Detection models (``task='det'``) give :class:`Detections`; a ``SemanticSegmentor``
    (e.g. the VT-FPN and semantic-FPN configs, ``task='seg'``) gives a :class:`SegMap`.
    """

    framework = "detectron2"
    task = "det"

    def __init__(self, config: str, checkpoint: str, device: str = "cpu",
                 opts: Sequence[str] = (), trusted: bool = False):
        super().__init__(config, checkpoint)
        import torch

        import rest_dense.d2  # noqa: F401  (backbones)
        from .. import safe_load
        from ..d2.checkpointer import RestDetectionCheckpointer

        if trusted:
            safe_load.trust(checkpoint)
        checkpoint = safe_load.checkpoint_file(checkpoint)
        if config.endswith(".py"):
            self._init_lazy(config, device, opts)
        else:
            self._init_yaml(config, device, opts)
        self.model.eval()
        checkpointer = RestDetectionCheckpointer(self.model)
        checkpointer.require_complete = True  # the completeness rules of `rest-dense test`
        try:
            loaded = checkpointer._load_file(checkpoint)
        except (FileNotFoundError, ValueError):
            raise
        except Exception as e:
            raise ValueError(f"checkpoint {checkpoint!r} cannot be read: {type(e).__name__}: {e}") from e
        if not loaded.get("matching_heuristics"):
            _check_fit(self.model, loaded, checkpoint, config, rename_d2=True)
        checkpointer.load(checkpoint)
        self._torch = torch

    def _init_yaml(self, config: str, device: str, opts: Sequence[str]) -> None:
        from detectron2.data import MetadataCatalog
        from detectron2.engine import DefaultPredictor

        from ..d2.engine import setup_yaml_config

        cfg = setup_yaml_config(config, ["MODEL.DEVICE", device, "MODEL.WEIGHTS", "",
                                         *list(opts)])
        with quiet_logs(), building_from_config(assertions=True):
            self.predictor = DefaultPredictor(cfg)
        self.model = self.predictor.model
        self.aug = self.predictor.aug
        self.input_format = self.predictor.input_format
        name = cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else "__unused"
        self.metadata = MetadataCatalog.get(name)
        arch = cfg.MODEL.META_ARCHITECTURE
        if arch == "SemanticSegmentor":
            self.task = "seg"
            n = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        else:
            n = cfg.MODEL.ROI_HEADS.NUM_CLASSES if arch != "RetinaNet" \
                else cfg.MODEL.RETINANET.NUM_CLASSES
        self._set_classes(n)

    def _init_lazy(self, config: str, device: str, opts: Sequence[str]) -> None:
        import detectron2.data.transforms as T
        from detectron2.config import instantiate
        from detectron2.data import MetadataCatalog

        from ..d2.engine import instantiate_model, setup_lazy_config

        cfg = setup_lazy_config(config, list(opts))
        with building_from_config(assertions=True):
            self.model = instantiate_model(cfg).to(device)
        mapper = cfg.dataloader.test.mapper
        augs = instantiate(mapper.augmentations) if "augmentations" in mapper else []
        self.aug = T.AugmentationList(list(augs))
        self.input_format = mapper.get("image_format", "BGR")
        self.predictor = None
        names = cfg.dataloader.test.dataset.get("names", "__unused")
        self.metadata = MetadataCatalog.get(names if isinstance(names, str) else names[0])
        heads = getattr(self.model, "roi_heads", None)
        seg_head = getattr(self.model, "sem_seg_head", None)
        if heads is None and seg_head is not None:
            self.task = "seg"
            n = getattr(seg_head, "num_classes", None) or \
                seg_head.predictor.out_channels
        else:
            n = getattr(getattr(heads, "box_predictor", None), "num_classes", None) or \
                getattr(self.model, "num_classes", 0)
        self._set_classes(int(n))

    def _set_classes(self, n: int) -> None:
        from ..d2.data import toy_class_names

        key = "stuff_classes" if self.task == "seg" else "thing_classes"
        names = list(getattr(self.metadata, key, None) or [])
        if not names and self.task != "seg":  # a toy config before its data is registered
            names = toy_class_names(getattr(self.metadata, "name", "")) or []
        json_file = getattr(self.metadata, "json_file", None)
        if not names and self.task != "seg" and json_file:
            # register_coco_instances: detectron2 sets the names when it reads the file,
            # in category-id order; read only the categories here
            import json

            try:
                with open(json_file) as f:
                    categories = json.load(f).get("categories") or []
                names = [c["name"] for c in sorted(categories, key=lambda c: c["id"])]
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                names = []
        self.classes = names if len(names) == n else [f"class_{i}" for i in range(n)]

    def model_inputs(self, image: np.ndarray) -> Dict[str, Any]:
        """The dict the model takes for one BGR image (resized, in the model's channel order)."""
        import detectron2.data.transforms as T

        h, w = image.shape[:2]
        if self.input_format == "RGB":
            image = image[:, :, ::-1]
        if isinstance(self.aug, T.AugmentationList):
            aug_in = T.AugInput(image)
            self.aug(aug_in)
            resized = aug_in.image
        else:
            resized = self.aug.get_transform(image).apply_image(image)
        tensor = self._torch.as_tensor(np.ascontiguousarray(resized).astype("float32").transpose(2, 0, 1))
        return {"image": tensor, "height": h, "width": w}

    def predict_instances(self, image: np.ndarray):
        """detectron2 ``Instances`` (original-image coordinates) for one BGR image."""
        with self._torch.no_grad():
            if self.predictor is not None:
                return self.predictor(image)["instances"].to("cpu")
            return self.model([self.model_inputs(image)])[0]["instances"].to("cpu")

    def predict_sem_seg(self, image: np.ndarray):
        """``SemanticSegmentor`` logits ``(C, H, W)`` at the original size for one BGR image."""
        with self._torch.no_grad():
            if self.predictor is not None:
                return self.predictor(image)["sem_seg"].to("cpu")
            return self.model([self.model_inputs(image)])[0]["sem_seg"].to("cpu")

    def predict(self, image: np.ndarray) -> Prediction:
        if self.task == "seg":
            return from_d2_sem_seg(self.predict_sem_seg(image))
        return from_d2_instances(self.predict_instances(image))

    def draw(self, image: np.ndarray, pred: Prediction, score_thr: float) -> np.ndarray:
        from detectron2.structures import Boxes, Instances
        from detectron2.utils.visualizer import Visualizer

        torch = self._torch
        if isinstance(pred, SegMap):
            meta = self.metadata
            if not getattr(meta, "stuff_classes", None):
                from types import SimpleNamespace

                meta = SimpleNamespace(stuff_classes=self.classes, get=lambda k, d=None: d)
            vis = Visualizer(image[:, :, ::-1], meta)
            out = vis.draw_sem_seg(torch.from_numpy(pred.labels), alpha=0.5)
            return np.ascontiguousarray(out.get_image()[:, :, ::-1])
        det = pred.above(score_thr)
        inst = Instances(det.image_size)
        inst.pred_boxes = Boxes(torch.from_numpy(det.boxes))
        inst.scores = torch.from_numpy(det.scores)
        inst.pred_classes = torch.from_numpy(det.labels)
        if det.masks is not None:
            inst.pred_masks = torch.from_numpy(det.masks)
        meta = self.metadata
        if not getattr(meta, "thing_classes", None):
            from types import SimpleNamespace

            meta = SimpleNamespace(thing_classes=self.classes, get=lambda k, d=None: d)
        vis = Visualizer(image[:, :, ::-1], meta)
        return np.ascontiguousarray(vis.draw_instance_predictions(inst).get_image()[:, :, ::-1])


def build_predictor(config: PathLike, checkpoint: PathLike, device: str = "cpu",
                    cfg_options: CfgOptions = None, trusted: bool = False) -> Predictor:
    """The predictor for a config of any of the three frameworks.

    Args:
        config: config file or shipped config name.
        checkpoint: whole-model checkpoint (ours, or a released one the loaders understand).
        device: ``'cpu'``, ``'cuda'``, ``'cuda:1'``...
        cfg_options: config overrides, as ``--cfg-options`` strings or a dict; OpenMMLab:
            ``['model.test_cfg.rcnn.score_thr=0.1']`` (values by
            :func:`rest_dense.configs.parse_cfg_options`); detectron2:
            ``['MODEL.ROI_HEADS.SCORE_THRESH_TEST=0.1']`` (yaml; read by yacs) or
            ``['model.roi_heads...=v']`` (LazyConfig; :func:`rest_dense.configs.d2_opts`).
        trusted: the checkpoint is the user's own file: allow full unpickling if the
            restricted loader refuses it.

    Raises:
        FileNotFoundError: no such config or checkpoint.
        ValueError: a config of an unknown framework; a checkpoint that cannot be read or
            belongs to another model (:class:`~rest_dense.models.CheckpointMismatchError`).
    """
    from ..configs import DETECTRON2, d2_opts, parse_cfg_options

    path, checkpoint, framework, device = resolve_inputs(config, checkpoint, device)
    if framework in DETECTRON2:
        predictor = D2Predictor(path, checkpoint, device, d2_opts(cfg_options, framework), trusted)
    else:
        options = parse_cfg_options(cfg_options)  # one parser: mmengine DictAction's rules
        cls = MMDetPredictor if framework == "mmdet" else MMSegPredictor
        predictor = cls(path, checkpoint, device, options, trusted)
    predictor.device = device  # where it runs (after any fallback, e.g. cuda -> cpu)
    return predictor


# ------------------------------------------------------------------ running
@dataclass
class InferenceSummary:
    """What :func:`run_inference` did.

    Attributes:
        out_dir: the output folder.
        framework: ``'mmdet'``, ``'mmseg'`` or ``'detectron2'``.
        task: ``'det'`` or ``'seg'``.
        processed: per processed image: ``input``, ``vis``, ``pred`` paths and ``instances``
            (detections >= score_thr) or ``classes_present`` (segmentation).
        skipped: per input that could not be read as an image: ``input`` and ``error``.
        failed: per image the model failed on (an extreme aspect ratio; or, when it is every
            image with one error, a bad config): ``input`` and ``error``.
        not_images: files of the input folders left out for their suffix (not in
            :data:`~rest_dense.deploy.inputs.IMAGE_SUFFIXES`).
        seconds: wall time of the predictions (model set-up excluded).
    """

    out_dir: str
    framework: str
    task: str
    processed: List[Dict[str, Any]] = field(default_factory=list)
    skipped: List[Dict[str, str]] = field(default_factory=list)
    failed: List[Dict[str, str]] = field(default_factory=list)
    not_images: List[str] = field(default_factory=list)
    seconds: float = 0.0


def _write_outputs(predictor: Predictor, image: np.ndarray, pred: Prediction, path: str,
                   stem: str, out_dir: str, score_thr: float, draw: bool) -> Dict[str, Any]:
    import cv2

    entry: Dict[str, Any] = {"input": path}
    if isinstance(pred, Detections):
        kept = pred.above(score_thr)
        doc = detections_to_json(kept, predictor.classes, image=os.path.abspath(path),
                                 framework=predictor.framework, score_thr=score_thr)
        pred_path = os.path.join(out_dir, "preds", stem + ".json")
        with open(pred_path, "w", encoding="utf-8") as f:
            json.dump(doc, f)
        entry["instances"] = len(kept)
    else:
        pred_path = os.path.join(out_dir, "preds", stem + ".png")
        write_label_png(pred.labels, pred_path)
        entry["classes_present"] = [int(c) for c in np.unique(pred.labels)]
    entry["pred"] = pred_path
    if draw:
        vis_path = os.path.join(out_dir, "vis", stem + ".jpg")
        if not cv2.imwrite(vis_path, predictor.draw(image, pred, score_thr)):
            raise OSError(f"could not write {vis_path}")
        entry["vis"] = vis_path
    return entry


def _remove_outputs(out_dir: str, stem: str) -> None:
    """Remove what :func:`_write_outputs` may have written of one image (best effort), so
    that no file of a failed image stays behind unlisted."""
    for sub, suffix in (("preds", ".json"), ("preds", ".png"), ("vis", ".jpg")):
        with contextlib.suppress(OSError):
            os.remove(os.path.join(out_dir, sub, stem + suffix))


class OutputFolderInUseError(ValueError):
    """``--out`` holds the results of another run and ``overwrite`` was not given."""


class InferenceInterrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM during :func:`run_inference`; ``summary.json`` says what was done."""

    def __init__(self, summary_path: str, done: int, left: int, signame: str):
        super().__init__(f"{signame}: interrupted after {done} image(s), {left} not processed; "
                         f"see {summary_path}")
        self.summary_path, self.done, self.left, self.signame = summary_path, done, left, signame


#: what a run writes into --out (removed by overwrite=True, nothing else is touched)
OUTPUT_ENTRIES = ("summary.json", "preds", "vis")


_SUMMARY_KEYS = {"status", "config", "checkpoint"}


def _read_summary(path: str) -> Optional[Dict[str, Any]]:
    """A run's ``summary.json`` (a JSON object with its status, config and checkpoint), or
    None for any other file of that name."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and _SUMMARY_KEYS <= set(doc) else None


def _previous_results(out_dir: str) -> List[str]:
    """The files of ``out_dir`` that another run of :func:`run_inference` wrote (what
    ``overwrite`` removes), ``summary.json`` last.

    A run writes ``summary.json`` before its first result and lists every file it wrote
    in it; a run killed before its end (``"status": "running"``) wrote all of its
    ``preds/`` and ``vis/``. Anything else is someone else's: ``preds/`` or ``vis/``
    without a run's summary, a ``summary.json`` that is not a run's, links, or files the
    summary does not list are refused (:class:`OutputFolderInUseError`), ``overwrite`` or
    not, since removing them would delete files no run wrote."""
    folders = [n for n in OUTPUT_ENTRIES[1:] if os.path.lexists(os.path.join(out_dir, n))]
    summary_path = os.path.join(out_dir, OUTPUT_ENTRIES[0])
    if not os.path.lexists(summary_path):
        found = [n for n in folders if not os.path.isdir(os.path.join(out_dir, n))
                 or os.listdir(os.path.join(out_dir, n))]
        if found:
            raise OutputFolderInUseError(
                f"--out {out_dir} holds {', '.join(n + '/' for n in found)} but no "
                "summary.json: not the results of a rest-dense infer run, so they are neither "
                "mixed with nor replaced by this run's; choose another folder")
        return []
    doc = _read_summary(summary_path) if not os.path.islink(summary_path) else None
    if doc is None:
        raise OutputFolderInUseError(
            f"--out {out_dir} holds a summary.json that no rest-dense infer run wrote; "
            "choose another folder")
    listed = {os.path.basename(str(entry.get(key, ""))) for entry in doc.get("images") or []
              if isinstance(entry, dict) for key in ("pred", "vis")}
    files, foreign = [], []
    for name in folders:
        folder = os.path.join(out_dir, name)
        if os.path.islink(folder) or not os.path.isdir(folder):
            raise OutputFolderInUseError(f"--out {out_dir}: {name} is not a folder this tool "
                                         "wrote (a link or a file); choose another folder")
        for entry in sorted(os.listdir(folder)):
            if entry.startswith("."):  # .DS_Store and the like: left alone, not in the way
                continue
            path = os.path.join(folder, entry)
            # a run that did not finish (killed, interrupted, failed while writing) wrote
            # files its summary could not list yet
            ours = doc.get("status") in ("running", "interrupted") or entry in listed
            (files if ours and os.path.isfile(path) and not os.path.islink(path)
             else foreign).append(path)
    if foreign:
        raise OutputFolderInUseError(
            f"--out {out_dir} holds files its previous run did not write ({foreign[0]}"
            f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}); move them, or "
            "choose another folder")
    return files + [summary_path]


def _write_summary(out_dir: str, doc: Dict[str, Any]) -> str:
    path = os.path.join(out_dir, "summary.json")
    tmp = path + f".tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)
    return path


#: OpenCV's assertions when a resize would give an image a side of 0 pixels
_ZERO_SIZE_RESIZE = ("inv_scale_x > 0", "inv_scale_y > 0", "dsize.area() > 0")


def _too_thin(error: BaseException) -> bool:
    """Whether a prediction failed for the image's size (OpenCV's zero-size resize)."""
    return any(a in str(error) for a in _ZERO_SIZE_RESIZE)


def _prediction_error(error: BaseException, image: Any) -> str:
    """What the summary says of one image's failed prediction: the error in one line, and
    for an image too thin for the test pipeline's resize (one side scaled to 0 pixels,
    OpenCV's assertion) its size and why."""
    text = " ".join(error_text(error).split())
    shape = getattr(image, "shape", None)
    if _too_thin(error) and shape is not None and len(shape) >= 2:
        return (f"the {shape[0]}x{shape[1]} (height x width) image is too thin for the test pipeline: its "
                f"resize keeps the aspect ratio and scales the short side to 0 pixels "
                f"(OpenCV: {type(error).__name__}: {text})")
    return f"{type(error).__name__}: {text}"


def run_inference(config: PathLike, checkpoint: PathLike, inputs: Sequence[PathLike],
                  out_dir: PathLike, device: str = "cpu", score_thr: float = 0.3,
                  cfg_options: CfgOptions = None, draw: bool = True,
                  progress: bool = True, trusted: bool = False,
                  predictor: Optional[Predictor] = None,
                  overwrite: bool = False) -> InferenceSummary:
    """Predict on images and write pictures and results (see the module docstring).

    Args:
        config: config file or shipped config name.
        checkpoint: whole-model checkpoint.
        inputs: image files, folders (searched recursively) and glob patterns.
        out_dir: output folder (created).
        device: torch device.
        score_thr: detections below this score are neither drawn nor written.
        cfg_options: config overrides (see :func:`build_predictor`).
        draw: write the pictures (``vis/``).
        progress: show a tqdm progress bar.
        trusted: the checkpoint is the user's own (see :func:`build_predictor`).
        predictor: an already built predictor (``config``/``checkpoint`` then only label the
            summary).
        overwrite: ``out_dir`` may hold another run's results (``summary.json``, ``preds/``,
            ``vis/``): they are removed first, so results of two runs never mix. Without it
            such a folder is refused (:class:`OutputFolderInUseError`). A folder a live run is
            writing into is always refused (:class:`rest_dense.runlock.FolderBusyError`).

    SIGINT / SIGTERM stop the run between images: ``summary.json`` is written with
    ``"status": "interrupted"``, the images done and the inputs ``not_processed``, and
    :class:`InferenceInterrupted` is raised. A complete run has ``"status": "complete"``;
    one where no input could be read, ``"nothing processed"``.

    Returns:
        :class:`InferenceSummary`; images that cannot be decoded are skipped and listed.

    Raises:
        FileNotFoundError: a missing config, checkpoint or input.
        ValueError: bad config / checkpoint (see :func:`build_predictor`), or a negative
            ``score_thr``.
    """
    if not 0.0 <= float(score_thr) <= 1.0:
        raise ValueError(f"score_thr must lie in [0, 1], got {score_thr}")
    out_dir = os.fspath(out_dir)
    not_images: List[str] = []
    paths = collect_images(inputs, left_out=not_images)
    not_images = [p for p in not_images if not path_inside(p, out_dir)]  # not our own files
    # a re-run with --out inside an input folder must not read its own results as images
    # (files named one by one are kept: the user chose them)
    named = {os.path.abspath(os.fspath(i)) for i in inputs if os.path.isfile(os.fspath(i))}
    kept = [p for p in paths if os.path.abspath(p) in named or not path_inside(p, out_dir)]
    if paths and not kept:
        raise FileNotFoundError(f"every input image lies in --out {out_dir}; give the images "
                                "or an output folder outside them")
    paths = kept
    try:  # a file, below a file, not writable
        check_output_path(out_dir, "--out", folder=True)
    except ValueError as e:
        raise OutputFolderInUseError(str(e)) from None
    previous = _previous_results(out_dir) if os.path.isdir(out_dir) else []
    if previous and not overwrite:
        raise OutputFolderInUseError(
            f"--out {out_dir} holds the results of another run ({len(previous) - 1} files "
            "and summary.json); pass --overwrite to replace them, or choose another folder")
    inside = [p for p in paths if any(same_file(p, d) for d in previous)]
    if inside:
        raise OutputFolderInUseError(
            f"input {inside[0]!r} is among the previous results in --out {out_dir} that "
            "--overwrite would remove first; copy it elsewhere or choose another --out")
    from ..runlock import hold_folder

    from ..utils import removed_if_left_empty

    # refused before anything is written (bad config, checkpoint, device): the folder this
    # call made for the run is not left behind empty
    with removed_if_left_empty(out_dir), hold_folder(out_dir, "infer"):
        if predictor is None:
            predictor = build_predictor(config, checkpoint, device, cfg_options, trusted)
        for path in _previous_results(out_dir):  # overwrite: the old run's files, no others
            os.remove(path)
        for name in OUTPUT_ENTRIES[1:]:  # its folders too, once empty
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(out_dir, name))
        return _run_inference(predictor, paths, out_dir, device, score_thr, draw, progress,
                              not_images)


def _run_inference(predictor: Predictor, paths: List[str], out_dir: str, device: str,
                   score_thr: float, draw: bool, progress: bool,
                   not_images: Sequence[str] = ()) -> InferenceSummary:
    import signal
    import threading

    from tqdm import tqdm

    os.makedirs(os.path.join(out_dir, "preds"), exist_ok=True)
    if draw:
        os.makedirs(os.path.join(out_dir, "vis"), exist_ok=True)
    summary = InferenceSummary(out_dir, predictor.framework, predictor.task,
                               not_images=list(not_images))
    stems = output_names(paths)
    # written first, so that preds/ and vis/ always come with the summary of their run
    _write_summary(out_dir, {"status": "running", "config": str(predictor.config),
                             "checkpoint": str(predictor.checkpoint), "inputs": len(paths)})
    t0 = time.perf_counter()
    stop: List[str] = []  # the signal's name, set by the handler; checked between images

    def _on_signal(signum, frame):
        stop.append(signal.Signals(signum).name)

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, _on_signal)
    done_inputs = set()
    try:
        bar = tqdm(paths, desc="infer", unit="img", disable=not progress, dynamic_ncols=True)
        for path in bar:
            if stop:
                break
            try:
                image = read_image(path)
            except ImageReadError as e:
                summary.skipped.append({"input": path, "error": str(e)})
                done_inputs.add(path)
                continue
            try:
                pred = predictor.predict(image)
            except Exception as e:  # one image (extreme aspect ratio, ...) stops no run
                error = f"prediction failed: {_prediction_error(e, image)}"
                summary.failed.append({"input": path, "error": error,
                                       **({"cause": "image"} if _too_thin(e) else {})})
                done_inputs.add(path)
                continue
            try:
                entry = _write_outputs(predictor, image, pred, path, stems[path], out_dir,
                                       score_thr, draw)
            except OSError as e:  # this image's files (a full disk fails the next ones too)
                _remove_outputs(out_dir, stems[path])
                error = f"writing its outputs failed: {' '.join(error_text(e).split())}"
                summary.failed.append({"input": path, "error": error})
                done_inputs.add(path)
                continue
            summary.processed.append(entry)
            done_inputs.add(path)
    finally:
        for sig, old in handlers.items():
            signal.signal(sig, old)
        summary.seconds = time.perf_counter() - t0
        left = [p for p in paths if p not in done_inputs]
        interrupted = bool(stop) or bool(left)
        status = ("interrupted" if interrupted
                  else "errors" if summary.failed
                  else "complete" if summary.processed or not paths else "nothing processed")
        doc = {"status": status,
               "config": str(predictor.config), "checkpoint": str(predictor.checkpoint),
               "framework": predictor.framework, "task": predictor.task,
               "device": getattr(predictor, "device", device),
               "score_thr": score_thr, "classes": predictor.classes,
               "images": summary.processed, "skipped": summary.skipped,
               "failed": summary.failed, "not_images": summary.not_images,
               "not_processed": left, "seconds": round(summary.seconds, 3)}
        if interrupted:
            doc["interrupted_by"] = stop[0] if stop else "an error"
        summary_path = _write_summary(out_dir, doc)
    if stop:
        raise InferenceInterrupted(summary_path, len(done_inputs), len(left), stop[0])
    return summary

