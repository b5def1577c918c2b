"""MMDeploy 1.3.1 on the pinned stack (torch 2.13): the fixes it needs and our deploy configs.

MMDeploy 1.3.1 (December 2023) predates torch 2.9. Exporting with it as released fails here
in two places, and several of its rewrites give results that differ from MMDetection /
MMSegmentation in PyTorch:

1. ``torch.onnx.export`` defaults to ``dynamo=True`` since torch 2.9; MMDeploy calls it
   without ``dynamo=`` and relies on the TorchScript exporter (its rewriters patch
   TorchScript symbolics), so the export fails with
   ``ModuleNotFoundError: No module named 'onnxscript'`` (and would ignore the rewrites if
   onnxscript were installed). :func:`mmdeploy_compat` makes ``dynamo=False`` the default
   while MMDeploy runs.
2. ``torch.onnx.symbolic_opset9._cast_Long`` is gone from torch 2.13; MMDeploy's
   ``RoIAlign`` symbolic imports it: ``ImportError: cannot import name '_cast_Long' from
   'torch.onnx.symbolic_opset9'``. :func:`mmdeploy_compat` provides it (an ONNX ``Cast`` to
   int64, what it was).
3. MMDeploy rewrites ``F.adaptive_avg_pool2d`` (UperNet's pyramid pooling) for ONNX Runtime
   into ``avg_pool2d`` with a kernel of ``int(size / output_size)`` computed at trace time:
   that is exact only where the map is a multiple of every pooling scale, it fixes the size in
   the graph, and it fails (``RuntimeError: stride should not be zero``) when the map is
   smaller than the scale (a 4x4 stage-4 map under scale 6). This module registers, for the
   ONNX Runtime backend, an exact rewrite with dynamic shapes instead
   (:func:`adaptive_avg_pool2d_exact`: adaptive average pooling as two averaging matrices).

4. ``F.scaled_dot_product_attention``: MMDeploy's rewrite divides the logits by ``scale``
   where PyTorch multiplies (every ResT attention passes ``scale=``) and applies dropout;
   :func:`scaled_dot_product_attention_exact` writes it as PyTorch defines it.
5. RPN proposals (``RPNHead.predict_by_feat``): MMDeploy runs one NMS over all levels and drops
   scores below 0.05; :func:`rpn_predict_by_feat_exact` runs NMS per level and keeps every
   score, as MMDetection does.
6. R-CNN box head (``BBoxHead.predict_by_feat``): MMDeploy gives every class the box of the
   RoI's best class; :func:`bbox_head_predict_by_feat_exact` decodes each class's own box and
   runs NMS per class, as MMDetection's ``multiclass_nms``.
7. Detector forwards (``TwoStageDetector.forward``, ``SingleStageDetector.forward``): the
   graph takes the unpadded image and pads it to the size divisor itself (:func:`_pad_inside`),
   so that boxes are clipped to the image rather than to the padding.
8. MMSegmentation's ``Upsample`` (the scale heads of the semantic FPN ``FPNHead``) computes its
   output size as ``int(size * scale_factor)`` in Python: a trace records the sizes of the
   trace image, so at any other size the lower-resolution levels were upsampled to the
   trace image's sizes and then resized to the right ones (logits off by ~0.1 on a toy model,
   while the maps still mostly agree). :func:`mmseg_upsample_dynamic` upsamples by the scale
   factor itself where that is exact (integer factors: ``t * s`` is the size, and the
   sampling grid is the same), so the sizes stay dynamic.

:func:`register_rewrites` registers 3-8 for the ONNX Runtime backend. MMDeploy's own rewriters
do the rest (NMS in ONNX, ``RoiAlign``, mask heads, RetinaNet's head and decoding). The ONNX
graphs use only standard ONNX operators, so the custom-operator library bundled in the MMDeploy
wheel (built for ONNX Runtime 1.15) is not loaded unless a graph needs it.

Install: ``pip install --no-deps mmdeploy==1.3.1`` plus its light dependencies
(``pip install -e .[deploy]``): its metadata pins ``protobuf<=3.20.2``, which would
downgrade onnx (1.17) and protobuf under everything else; it works with the installed
protobuf. ``pip check`` then reports that pin.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import os
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["DEPLOY_CONFIGS", "mmdeploy_available", "mmdeploy_compat", "adaptive_avg_pool2d_exact",
           "mmseg_upsample_dynamic",
           "deploy_config_path", "deploy_config", "register_rewrites"]

#: task -> shipped deploy config (under ``configs/deploy/``)
DEPLOY_CONFIGS: Dict[str, str] = {
    "detection": "deploy/detection_onnxruntime_dynamic.py",
    "instance-seg": "deploy/instance-seg_onnxruntime_dynamic.py",
    "segmentation": "deploy/segmentation_onnxruntime_dynamic.py",
}

_REGISTERED = False


def mmdeploy_available() -> Tuple[bool, str]:
    """Whether MMDeploy imports, and why not."""
    try:
        import mmdeploy  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        from ..utils import missing_package_hint

        hint = missing_package_hint(e) if getattr(e, "name", "mmdeploy") != "mmdeploy" else None
        if hint:  # MMDeploy is there, one of its needs is not
            return False, hint
        return False, (f"{type(e).__name__}: {e}; install it with `pip install --no-deps "
                       "mmdeploy==1.3.1 aenum multiprocess terminaltables` "
                       "(or `pip install 'rest_dense[deploy]'` plus that line)")
    return True, ""


# ------------------------------------------------------------------ adaptive pooling
def _pool_matrix(n: Any, out: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(out, n)`` matrix whose rows average the input bins of adaptive pooling:
    row ``i`` covers ``[floor(i n / out), ceil((i + 1) n / out))``."""
    n = torch.as_tensor(n, device=device)
    i = torch.arange(out, device=device)
    start = torch.div(i * n, out, rounding_mode="floor")
    end = torch.div((i + 1) * n + out - 1, out, rounding_mode="floor")
    j = torch.arange(n, device=device)
    inside = (j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])
    return inside.to(dtype) / (end - start).to(dtype)[:, None]


def adaptive_avg_pool2d_exact(x: Tensor, output_size: Any) -> Tensor:
    """``F.adaptive_avg_pool2d`` as ``P_h @ x @ P_w^T``: the same values (to float rounding) for
    any input size, and traceable with the input size free (``Range``, integer ``Div``,
    ``MatMul`` in ONNX).

    Args:
        x: ``(N, C, H, W)``.
        output_size: int or ``(oh, ow)`` (``None`` keeps that side).
    """
    if isinstance(output_size, int):
        oh = ow = output_size
    else:
        oh, ow = output_size
    oh = x.shape[-2] if oh is None else int(oh)
    ow = x.shape[-1] if ow is None else int(ow)
    if oh == 1 and ow == 1:
        return x.mean(dim=(-2, -1), keepdim=True)
    ph = _pool_matrix(x.shape[-2], oh, x.dtype, x.device)
    pw = _pool_matrix(x.shape[-1], ow, x.dtype, x.device)
    return torch.matmul(torch.matmul(ph, x), pw.transpose(0, 1))


def mmseg_upsample_dynamic(self, x: Tensor) -> Tensor:
    """``mmseg.models.utils.Upsample.forward`` with dynamic sizes (fix 8 of the module
    docstring): with an integer ``scale_factor`` and no fixed ``size``, ``F.interpolate`` by
    the factor (the same output size and sampling as mmseg's ``int(t * scale_factor)``
    sizes); otherwise mmseg's own code."""
    import torch.nn.functional as F

    factor = self.scale_factor
    if not self.size and isinstance(factor, float) and factor.is_integer() and factor >= 1:
        return F.interpolate(x, scale_factor=factor, mode=self.mode,
                             align_corners=self.align_corners)
    from mmdeploy.core import FUNCTION_REWRITER

    return FUNCTION_REWRITER.get_context().origin_func(self, x)


def register_rewrites() -> None:
    """Register our rewrites in MMDeploy's ``FUNCTION_REWRITER`` (once)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from mmdeploy.core import FUNCTION_REWRITER

    @FUNCTION_REWRITER.register_rewriter(
        func_name="torch.nn.functional.adaptive_avg_pool2d", backend="onnxruntime")
    def adaptive_avg_pool2d__onnxruntime(input, output_size):  # noqa: A002 (MMDeploy's names)
        return adaptive_avg_pool2d_exact(input, output_size)

    for func_name, rewrite in (
            ("mmdet.models.dense_heads.rpn_head.RPNHead.predict_by_feat",
             rpn_predict_by_feat_exact),
            ("torch.nn.functional.scaled_dot_product_attention",
             scaled_dot_product_attention_exact),
            ("mmdet.models.roi_heads.bbox_heads.bbox_head.BBoxHead.predict_by_feat",
             bbox_head_predict_by_feat_exact),
            ("mmdet.models.detectors.two_stage.TwoStageDetector.forward",
             two_stage_forward_padding_inside),
            ("mmdet.models.detectors.single_stage.SingleStageDetector.forward",
             single_stage_forward_padding_inside),
            ("mmseg.models.utils.wrappers.Upsample.forward", mmseg_upsample_dynamic)):
        FUNCTION_REWRITER.register_rewriter(func_name=func_name, backend="onnxruntime")(rewrite)
    _REGISTERED = True


def _pad_inside(batch_inputs, data_samples, deploy_cfg):
    """Pad the (unpadded) network input to the detector's size divisor inside the graph and
    record the unpadded size as ``img_shape``.

    MMDeploy's detector rewrites take the padded input's size as ``img_shape``, so boxes and
    proposals are clipped to the padding rather than to the image, unlike MMDetection. With
    ``codebase_config.pad_size_divisor`` set (rest-dense sets it from the model's data
    preprocessor and gives the graph the unpadded image), the graph pads by itself and clips
    as MMDetection does.
    """
    import torch.nn.functional as F
    from mmdeploy.utils import get_codebase_config
    from mmdet.structures import DetDataSample

    codebase = get_codebase_config(deploy_cfg)
    divisor = int(codebase.get("pad_size_divisor", 1) or 1)
    img_shape = torch._shape_as_tensor(batch_inputs)[2:]
    if data_samples is None:
        data_samples = [DetDataSample()]
    for sample in data_samples:
        sample.set_field(name="img_shape", value=img_shape, field_type="metainfo")
    if divisor > 1:
        h, w = batch_inputs.shape[2], batch_inputs.shape[3]
        pad_h = (divisor - h % divisor) % divisor
        pad_w = (divisor - w % divisor) % divisor
        batch_inputs = F.pad(batch_inputs, [0, pad_w, 0, pad_h],
                             value=float(codebase.get("pad_value", 0)))
    return batch_inputs, data_samples


def two_stage_forward_padding_inside(self, batch_inputs, data_samples=None, mode="tensor",
                                     **kwargs):
    """MMDeploy's ``TwoStageDetector.forward`` rewrite with :func:`_pad_inside`."""
    from mmdeploy.core import FUNCTION_REWRITER

    ctx = FUNCTION_REWRITER.get_context()
    batch_inputs, data_samples = _pad_inside(batch_inputs, data_samples, ctx.cfg)
    x = self.extract_feat(batch_inputs)
    if data_samples[0].get("proposals", None) is None:
        proposals = self.rpn_head.predict(x, data_samples, rescale=False)
    else:
        proposals = [s.proposals for s in data_samples]
    return self.roi_head.predict(x, proposals, data_samples, rescale=False)


def single_stage_forward_padding_inside(self, batch_inputs, data_samples=None, mode="tensor",
                                        **kwargs):
    """MMDeploy's ``SingleStageDetector.forward`` rewrite with :func:`_pad_inside`."""
    from mmdeploy.core import FUNCTION_REWRITER

    ctx = FUNCTION_REWRITER.get_context()
    batch_inputs, data_samples = _pad_inside(batch_inputs, data_samples, ctx.cfg)
    x = self.extract_feat(batch_inputs)
    return self.bbox_head.predict(x, data_samples, rescale=False)


def bbox_head_predict_by_feat_exact(self, rois, cls_scores, bbox_preds, batch_img_metas,
                                    rcnn_test_cfg=None, rescale=False):
    """The R-CNN box head's detections as MMDetection computes them, in an exportable form.

    With class-specific box regression, MMDeploy's rewrite keeps for each RoI only the box of
    its highest-scoring class and gives it to every class; MMDetection decodes one box per
    class, and a class's detection carries that class's box. This rewrite decodes every
    class's box and runs NMS per class over those boxes (each box is a candidate of its own
    class only), then keeps the ``max_per_img`` best, as MMDetection's ``multiclass_nms``.

    Returns ``(dets, labels)`` as MMDeploy's rewrite does.
    """
    import torch.nn.functional as F
    from mmdeploy.mmcv.ops import multiclass_nms
    from mmdet.structures.bbox import get_box_tensor

    cfg = rcnn_test_cfg
    img_shape = batch_img_metas[0]["img_shape"]
    if self.custom_cls_channels:
        scores = self.loss_cls.get_activation(cls_scores)
    else:
        scores = F.softmax(cls_scores, dim=-1)
    scores = scores[..., :self.num_classes]
    boxes = get_box_tensor(self.bbox_coder.decode(rois[..., 1:], bbox_preds, max_shape=img_shape))
    batch, n = scores.shape[0], scores.shape[1]
    c = self.num_classes
    max_per_img = int(cfg.get("max_per_img", 100))
    if not self.reg_class_agnostic:
        size = self.bbox_coder.encode_size
        boxes = boxes.reshape(batch, n * c, size)
        # row (roi, k) may only be a detection of class k
        eye = torch.eye(c, dtype=torch.bool, device=scores.device)
        per_class = torch.where(eye[None, None], scores[..., None, :],
                                scores.new_full((1,), -1.0))  # (B, n, c (box), c (class))
        scores = per_class.reshape(batch, n * c, c)
    return multiclass_nms(boxes, scores, max_per_img,
                          iou_threshold=float(cfg.nms.get("iou_threshold", 0.5)),
                          score_threshold=float(cfg.get("score_thr", 0.0)), pre_top_k=-1,
                          keep_top_k=max_per_img, nms_type=cfg.nms.get("type", "nms"))


def scaled_dot_product_attention_exact(query, key, value, attn_mask=None, dropout_p=0.0,
                                       is_causal=False, scale=None, **kwargs):
    """``F.scaled_dot_product_attention`` in plain operations, as PyTorch defines it.

    MMDeploy 1.3.1's default rewrite divides the logits by ``scale`` (PyTorch multiplies
    them) and applies dropout in training mode; a model that passes ``scale=`` (every ResT
    attention does) is silently changed. This one multiplies by ``scale`` (default
    ``1 / sqrt(head_dim)``), honours boolean / additive masks and ``is_causal``, and applies
    no dropout (export is inference).
    """
    import math

    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    logits = torch.matmul(query, key.transpose(-2, -1)) * scale
    if is_causal:
        n, m = query.shape[-2], key.shape[-2]
        causal = torch.ones(n, m, dtype=torch.bool, device=query.device).tril()
        logits = logits.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask
    return torch.matmul(logits.softmax(dim=-1), value)


def rpn_predict_by_feat_exact(self, cls_scores, bbox_preds, score_factors=None,
                              batch_img_metas=None, cfg=None, rescale=False, with_nms=True,
                              **kwargs):
    """MMDetection's RPN proposals, as MMDetection computes them, in an exportable form.

    MMDeploy's own rewrite runs one NMS over the proposals of all pyramid levels and drops
    proposals scoring below its ``score_threshold`` (0.05); MMDetection runs NMS within each
    level (``batched_nms`` over level ids), keeps every score and drops boxes without area
    (``min_bbox_size``). The two give visibly different detections from a Mask R-CNN that is
    not fully trained. This rewrite keeps MMDetection's semantics: per level the ``nms_pre``
    best anchors, decoded; NMS per level (the level is the "class" of ONNX
    ``NonMaxSuppression``); the ``max_per_img`` best proposals overall.

    Returns ``(dets, labels)`` as MMDeploy's rewrite does (``dets``: ``(N, K, 5)``).
    """
    from mmdeploy.core import FUNCTION_REWRITER
    from mmdeploy.mmcv.ops import multiclass_nms
    from mmdeploy.utils import is_dynamic_shape

    ctx = FUNCTION_REWRITER.get_context()
    cfg = self.test_cfg if cfg is None else cfg
    num_levels = len(cls_scores)
    device = cls_scores[0].device
    featmap_sizes = [cls_scores[i].shape[-2:] for i in range(num_levels)]
    mlvl_anchors = self.anchor_generator.grid_anchors(featmap_sizes, device=device)
    dynamic = is_dynamic_shape(ctx.cfg)
    batch_size = cls_scores[0].shape[0]
    pre_topk = cfg.get("nms_pre", -1)
    boxes, scores = [], []
    for level, (cls_score, bbox_pred, anchors) in enumerate(zip(cls_scores, bbox_preds, mlvl_anchors)):
        cls_score = cls_score.detach().permute(0, 2, 3, 1)
        if self.use_sigmoid_cls:
            score = cls_score.reshape(batch_size, -1).sigmoid()
        else:
            score = cls_score.reshape(batch_size, -1, 2).softmax(-1)[..., 0]
        delta = bbox_pred.detach().permute(0, 2, 3, 1).reshape(batch_size, -1, self.bbox_coder.encode_size)
        anchors = (anchors if dynamic else anchors.data).unsqueeze(0)
        if pre_topk > 0:
            score, inds = score.topk(pre_topk)  # MMDeploy's topk rewrite caps k at the size
            batch = torch.arange(batch_size, device=device).unsqueeze(-1)
            delta = delta[batch, inds]
            anchors = anchors[0][inds]
        box = self.bbox_coder.decode(anchors, delta, max_shape=batch_img_metas[0]["img_shape"])
        min_size = cfg.get("min_bbox_size", -1)
        if min_size >= 0:
            w = box[..., 2] - box[..., 0]
            h = box[..., 3] - box[..., 1]
            score = torch.where((w > min_size) & (h > min_size), score, score.new_full((1,), -1.0))
        # one column per level: NMS runs within a level only
        filler = torch.full_like(score, -1.0)
        boxes.append(box)
        scores.append(torch.stack([score if i == level else filler for i in range(num_levels)], -1))
    boxes = torch.cat(boxes, dim=1)
    scores = torch.cat(scores, dim=1)
    if not with_nms:
        return boxes, scores.max(-1, keepdim=True)[0]
    max_per_img = int(cfg.get("max_per_img", 1000))
    dets, labels = multiclass_nms(boxes, scores, max_per_img,
                                  iou_threshold=float(cfg.nms.get("iou_threshold", 0.7)),
                                  score_threshold=-0.5, pre_top_k=-1, keep_top_k=max_per_img,
                                  nms_type=cfg.nms.get("type", "nms"))
    return dets, torch.zeros_like(labels)


# ------------------------------------------------------------------ compatibility
def _cast_long(g, input, non_blocking):  # noqa: A002
    return g.op("Cast", input, to_i=7)  # TensorProto.INT64


@contextlib.contextmanager
def mmdeploy_compat() -> Iterator[None]:
    """Run MMDeploy 1.3.1 on torch 2.13 (see the module docstring): the TorchScript ONNX
    exporter by default, ``_cast_Long`` back, our rewrites registered. Undone on exit."""
    import torch.onnx
    import torch.onnx.symbolic_opset9 as opset9

    register_rewrites()
    original_export = torch.onnx.export

    @functools.wraps(original_export)
    def export(*args, **kwargs):
        kwargs.setdefault("dynamo", False)
        return original_export(*args, **kwargs)

    had_cast = hasattr(opset9, "_cast_Long")
    torch.onnx.export = export
    if not had_cast:
        opset9._cast_Long = _cast_long
    try:
        yield
    finally:
        torch.onnx.export = original_export
        if not had_cast:
            del opset9._cast_Long


# ------------------------------------------------------------------ deploy configs
def deploy_config_path(task: str) -> str:
    """The shipped deploy config of ``task`` (``'detection'``, ``'instance-seg'``,
    ``'segmentation'``)."""
    from ..configs import configs_root

    if task not in DEPLOY_CONFIGS:
        raise ValueError(f"no deploy config for task {task!r}; one of {', '.join(DEPLOY_CONFIGS)}")
    path = os.path.join(configs_root(), DEPLOY_CONFIGS[task])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"deploy config {path} is missing from the installation")
    return path


def deploy_config(task: str, opset: Optional[int] = None,
                  input_shape: Optional[Tuple[int, int]] = None, base: Optional[str] = None,
                  pad_size_divisor: Optional[int] = None, pad_value: float = 0.0):
    """Load a deploy config and adjust it.

    Args:
        task: ``'detection'``, ``'instance-seg'`` or ``'segmentation'``.
        opset: ONNX opset (default: the config's).
        input_shape: ``(H, W)`` the trace input is resized to (MMDeploy spells it ``[W, H]``);
            the graph keeps dynamic height and width.
        pad_size_divisor: detectors: pad to this multiple inside the graph (then the graph takes
            the unpadded image; see :func:`_pad_inside`).
        pad_value: the value padded with.
        base: a deploy config file to start from instead of the shipped one.

    Returns:
        An ``mmengine.Config``.
    """
    from mmengine.config import Config

    cfg = Config.fromfile(base or deploy_config_path(task))
    cfg = copy.deepcopy(cfg)
    if opset is not None:
        cfg.onnx_config.opset_version = int(opset)
    if input_shape is not None:
        cfg.onnx_config.input_shape = [int(input_shape[1]), int(input_shape[0])]
    if pad_size_divisor is not None and task != "segmentation":
        cfg.codebase_config.pad_size_divisor = int(pad_size_divisor)
        cfg.codebase_config.pad_value = float(pad_value)
    return cfg
