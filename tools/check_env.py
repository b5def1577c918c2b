#!/usr/bin/env python
"""Check that the environment built by tools/setup_env.sh really works (CPU only).

Prints the versions of the stack, runs torchvision's and mmcv's compiled ops on small CPU tensors,
and builds detectron2's R50-FPN Mask R-CNN from its model-zoo config, running one training step
(inside EventStorage) and one inference call. Exits non-zero on the first failure.

Usage: python tools/check_env.py [--skip-d2-model]
"""
import argparse
import importlib
import os
import sys
import time
import traceback

PACKAGES = [
    ("torch", "torch"),
    ("torchvision", "torchvision"),
    ("numpy", "numpy"),
    ("mmengine", "mmengine"),
    ("mmcv", "mmcv"),
    ("mmdet", "mmdet"),
    ("mmseg", "mmsegmentation"),
    ("fvcore", "fvcore"),
    ("detectron2", "detectron2"),
]


def _versions():
    from importlib import metadata

    for mod_name, dist in PACKAGES:
        mod = importlib.import_module(mod_name)
        try:
            dist_version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            dist_version = "?"
        ver = getattr(mod, "__version__", dist_version)
        extra = "" if str(ver) == dist_version else " (dist %s)" % dist_version
        print("  %-12s %s%s" % (mod_name, ver, extra))
    import torch

    print("  torch threads %d, CUDA available: %s" % (torch.get_num_threads(),
                                                       torch.cuda.is_available()))


def _boxes():
    import torch

    # two heavily overlapping boxes + one separate box
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0],
                          [1.0, 1.0, 11.0, 11.0],
                          [50.0, 50.0, 60.0, 60.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    return boxes, scores


def _roi_inputs():
    import torch

    # feature map whose value at (y, x) is x: RoIAlign of a box averages x over the box
    feat = torch.arange(16, dtype=torch.float32).repeat(16, 1).view(1, 1, 16, 16)
    rois = torch.tensor([[0.0, 2.0, 2.0, 6.0, 6.0]])  # (batch_idx, x1, y1, x2, y2)
    return feat, rois


def check_torchvision_ops():
    import torch
    from torchvision.ops import nms, roi_align

    boxes, scores = _boxes()
    keep = nms(boxes, scores, 0.5)
    assert keep.tolist() == [0, 2], keep
    feat, rois = _roi_inputs()
    out = roi_align(feat, rois, output_size=(2, 2), spatial_scale=1.0, sampling_ratio=2,
                    aligned=True)
    assert out.shape == (1, 1, 2, 2), out.shape
    # aligned=True: box [2, 6] shifted by -0.5 -> bins centred at x = 2.5 and 4.5
    expected = torch.tensor([[2.5, 4.5], [2.5, 4.5]])
    assert torch.allclose(out[0, 0], expected, atol=1e-4), out


def check_mmcv_ops():
    import torch
    from mmcv.ops import RoIAlign, nms

    boxes, scores = _boxes()
    dets, keep = nms(boxes, scores, iou_threshold=0.5)
    assert keep.tolist() == [0, 2], keep
    assert dets.shape == (2, 5) and torch.allclose(dets[:, 4], torch.tensor([0.9, 0.7])), dets
    feat, rois = _roi_inputs()
    out = RoIAlign(output_size=(2, 2), spatial_scale=1.0, sampling_ratio=2, aligned=True)(feat, rois)
    expected = torch.tensor([[2.5, 4.5], [2.5, 4.5]])
    assert out.shape == (1, 1, 2, 2) and torch.allclose(out[0, 0], expected, atol=1e-4), out


def check_mm_frameworks():
    import mmdet.models  # noqa: F401  (imports mmcv.ops everywhere)
    import mmseg.models  # noqa: F401
    from mmdet.registry import MODELS as DET_MODELS
    from mmseg.registry import MODELS as SEG_MODELS

    assert DET_MODELS.get("MaskRCNN") is not None
    assert SEG_MODELS.get("EncoderDecoder") is not None


def check_detectron2(run_model=True):
    import torch
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes, BitMasks, Instances
    from detectron2.utils.events import EventStorage

    cfg_file = model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
    assert os.path.isfile(cfg_file), cfg_file
    if not run_model:
        return
    cfg = get_cfg()
    cfg.merge_from_file(cfg_file)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 64
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 200
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 100
    cfg.INPUT.MIN_SIZE_TEST = 128
    cfg.INPUT.MAX_SIZE_TEST = 160
    torch.manual_seed(0)
    model = build_model(cfg)

    h, w = 128, 160
    masks = torch.zeros(2, h, w, dtype=torch.bool)
    masks[0, 10:60, 20:90] = True
    masks[1, 70:120, 100:150] = True
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(torch.tensor([[20.0, 10.0, 90.0, 60.0], [100.0, 70.0, 150.0, 120.0]]))
    inst.gt_classes = torch.tensor([0, 2])
    inst.gt_masks = BitMasks(masks)
    batch = [{"image": torch.randint(0, 255, (3, h, w), dtype=torch.uint8).float(),
              "height": h, "width": w, "instances": inst}]

    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with EventStorage(0):
        losses = model(batch)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
    expected = {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"}
    assert expected <= set(losses), sorted(losses)
    assert torch.isfinite(total), losses
    grads = [p.grad for p in model.backbone.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads), "no gradient reached the backbone"

    model.eval()
    with torch.no_grad():
        out = model([{"image": batch[0]["image"], "height": h, "width": w}])
    assert len(out) == 1 and "instances" in out[0], out
    pred = out[0]["instances"]
    assert pred.image_size == (h, w), pred.image_size
    for field in ("pred_boxes", "scores", "pred_classes", "pred_masks"):
        assert pred.has(field), field


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-d2-model", action="store_true",
                    help="skip building/running the detectron2 Mask R-CNN (import checks only)")
    args = ap.parse_args()

    checks = [
        ("versions", _versions),
        ("torchvision ops (nms, roi_align)", check_torchvision_ops),
        ("mmcv ops (nms, RoIAlign)", check_mmcv_ops),
        ("mmdet / mmseg model registries", check_mm_frameworks),
        ("detectron2 R50-FPN Mask R-CNN: train step + inference",
         lambda: check_detectron2(run_model=not args.skip_d2_model)),
    ]
    failed = 0
    for name, fn in checks:
        t0 = time.time()
        print("[check] %s" % name, flush=True)
        try:
            fn()
        except Exception:  # noqa: BLE001
            failed += 1
            traceback.print_exc()
            print("[check] FAILED: %s" % name, flush=True)
        else:
            print("[check] ok: %s (%.1f s)" % (name, time.time() - t0), flush=True)
    if failed:
        print("[check] %d check(s) failed" % failed)
        return 1
    print("[check] environment OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
