"""detectron2 models in a form ``TracingAdapter`` can export with dynamic image sizes:
RetinaNet's decoding (below) and ``SemanticSegmentor``'s inference without its
post-processing (:func:`semantic_inference`).

detectron2's ``RetinaNet.inference_single_image`` (0.5) decodes each pyramid level in two
steps: it drops the candidates scoring at most ``test_score_thresh`` (a boolean index), then
keeps the ``min(test_topk_candidates, number left)`` best. The ``min`` is a Python int: a
trace records the number of candidates of the trace image as a constant of the graph, so an
image with another number of candidates above the threshold would be decoded wrongly.

:func:`traceable_inference_single_image` selects the same candidates with a constant ``k``:
the level's scores are padded with ``-inf`` to at least ``k`` entries, the ``k`` best are
taken, and those scoring at most the threshold are dropped afterwards. Filter-then-top-k and
top-k-then-filter keep the same set: when at least ``k`` candidates pass the threshold, the
``k`` best of all of them pass it; when fewer do, all of them are among the ``k`` best.
Both lists are in descending score order, so the concatenation, the class-wise NMS across
levels and the cut to ``max_detections_per_image`` that follow are the same as detectron2's.

:func:`traceable_retinanet` installs it on one model for the duration of a ``with`` block
(the export); nothing of detectron2 is edited, and the eager model outside the block (the
reference the export is checked against) runs detectron2's own code.
"""
from __future__ import annotations

import contextlib
import types
from typing import Iterator, List, Tuple

import torch

__all__ = ["traceable_inference_single_image", "traceable_retinanet", "retinanet_inference",
           "semantic_inference", "semantic_postprocess"]


def traceable_inference_single_image(self, anchors, box_cls: List[torch.Tensor],
                                     box_delta: List[torch.Tensor], image_size: Tuple[int, int]):
    """``RetinaNet.inference_single_image`` of detectron2 0.5 with a constant top-k per level
    (see the module docstring); same arguments and result (``Instances``)."""
    from detectron2.layers import batched_nms, cat
    from detectron2.structures import Boxes, Instances

    k = int(self.test_topk_candidates)
    thresh = float(self.test_score_thresh)
    boxes_all, scores_all, classes_all = [], [], []
    for box_cls_i, box_reg_i, anchors_i in zip(box_cls, box_delta, anchors):
        prob = box_cls_i.flatten().sigmoid()
        padded = torch.cat([prob, prob.new_full((k,), float("-inf"))])
        top, idx = padded.topk(k)  # sorted, descending
        keep = top > thresh
        top = top[keep]
        idx = idx[keep]
        anchor_idx = torch.div(idx, self.num_classes, rounding_mode="floor")
        classes = idx - anchor_idx * self.num_classes
        boxes = self.box2box_transform.apply_deltas(box_reg_i[anchor_idx],
                                                    anchors_i.tensor[anchor_idx])
        boxes_all.append(boxes)
        scores_all.append(top)
        classes_all.append(classes)
    boxes_all, scores_all, classes_all = [cat(x) for x in (boxes_all, scores_all, classes_all)]
    keep = batched_nms(boxes_all, scores_all, classes_all, self.test_nms_thresh)
    keep = keep[: self.max_detections_per_image]
    result = Instances(image_size)
    result.pred_boxes = Boxes(boxes_all[keep])
    result.scores = scores_all[keep]
    result.pred_classes = classes_all[keep]
    return result


@contextlib.contextmanager
def traceable_retinanet(model) -> Iterator[None]:
    """Within the block, ``model`` (a detectron2 ``RetinaNet``) decodes with
    :func:`traceable_inference_single_image`; on exit it runs detectron2's own again."""
    had = "inference_single_image" in vars(model)
    previous = vars(model).get("inference_single_image")
    model.inference_single_image = types.MethodType(traceable_inference_single_image, model)
    try:
        yield
    finally:
        if had:
            model.inference_single_image = previous
        else:
            del model.inference_single_image


def retinanet_inference(model, inputs):
    """RetinaNet inference without post-processing (for ``TracingAdapter``): boxes, scores and
    classes of the network input, as ``RetinaNet.forward`` computes them before
    ``detector_postprocess``."""
    from detectron2.modeling.meta_arch.retinanet import permute_to_N_HWA_K

    images = model.preprocess_image(inputs)
    features = model.backbone(images.tensor)
    features = [features[f] for f in model.head_in_features]
    anchors = model.anchor_generator(features)
    logits, deltas = model.head(features)
    logits = [permute_to_N_HWA_K(x, model.num_classes) for x in logits]
    deltas = [permute_to_N_HWA_K(x, 4) for x in deltas]
    result = model.inference(anchors, logits, deltas, images.image_sizes)[0]
    return result.pred_boxes.tensor, result.scores, result.pred_classes


def semantic_inference(model, inputs):
    """``SemanticSegmentor`` inference without post-processing (for ``TracingAdapter``): the
    ``(1, C, H', W')`` logits of the padded network input, as ``SemanticSegmentor.forward``
    computes them before ``sem_seg_postprocess`` (normalisation, padding to the backbone's
    ``size_divisibility``, backbone + neck, e.g. ``D2VTFPN``, and the head -- ``SemSegFPNHead``
    upsamples its stride-4 logits to the padded input)."""
    from detectron2.structures import ImageList

    images = [x["image"].to(model.device) for x in inputs]
    images = [(x - model.pixel_mean) / model.pixel_std for x in images]
    images = ImageList.from_tensors(images, model.backbone.size_divisibility)
    features = model.backbone(images.tensor)
    logits, _ = model.sem_seg_head(features, None)
    return logits


def semantic_postprocess(logits: torch.Tensor, image_size: Tuple[int, int], height: int,
                         width: int) -> torch.Tensor:
    """What ``SemanticSegmentor.forward`` does after :func:`semantic_inference`, for one image:
    the padding cropped off (``image_size``: the network input before padding) and the logits
    resized to the original ``height x width`` (``(C, height, width)``)."""
    from detectron2.modeling.postprocessing import sem_seg_postprocess

    return sem_seg_postprocess(logits[0], image_size, height, width)
