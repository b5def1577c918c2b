"""Environment smoke tests: the frameworks import and their compiled ops really run on CPU."""
import os

import pytest
import torch


def _boxes():
    # boxes 0 and 1 overlap with IoU 81/119 ~ 0.68; box 2 is separate
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0],
                          [1.0, 1.0, 11.0, 11.0],
                          [50.0, 50.0, 60.0, 60.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    return boxes, scores


def _roi_inputs():
    # feature value at (y, x) equals x, so each RoIAlign bin returns the mean x of its samples
    feat = torch.arange(16, dtype=torch.float32).repeat(16, 1).view(1, 1, 16, 16)
    rois = torch.tensor([[0.0, 2.0, 2.0, 6.0, 6.0]])  # (batch index, x1, y1, x2, y2)
    # aligned=True: the box spans [1.5, 5.5] in pixel-centre coordinates; 2 bins x 2 samples
    expected = torch.tensor([[2.5, 4.5], [2.5, 4.5]])
    return feat, rois, expected


def test_versions():
    import mmcv
    import mmdet
    import mmengine
    import mmseg
    import numpy
    import torchvision

    assert torch.__version__.startswith("2.13.0"), torch.__version__
    assert torchvision.__version__.startswith("0.28.0"), torchvision.__version__
    assert mmcv.__version__ == "2.1.0"
    assert mmdet.__version__ == "3.3.0"
    assert mmseg.__version__ == "1.2.2"
    assert mmengine.__version__ == "0.10.7"
    assert int(numpy.__version__.split(".")[0]) >= 2


@pytest.mark.parametrize("iou_threshold, expected", [(0.5, [0, 2]), (0.7, [0, 1, 2])])
def test_torchvision_nms(iou_threshold, expected):
    from torchvision.ops import nms

    boxes, scores = _boxes()
    assert nms(boxes, scores, iou_threshold).tolist() == expected


def test_torchvision_roi_align():
    from torchvision.ops import roi_align

    feat, rois, expected = _roi_inputs()
    out = roi_align(feat, rois, output_size=(2, 2), spatial_scale=1.0, sampling_ratio=2,
                    aligned=True)
    assert out.shape == (1, 1, 2, 2)
    torch.testing.assert_close(out[0, 0], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("iou_threshold, expected", [(0.5, [0, 2]), (0.7, [0, 1, 2])])
def test_mmcv_nms(iou_threshold, expected):
    from mmcv.ops import nms

    boxes, scores = _boxes()
    dets, keep = nms(boxes, scores, iou_threshold=iou_threshold)
    assert keep.tolist() == expected
    assert dets.shape == (len(expected), 5)
    torch.testing.assert_close(dets[:, :4], boxes[expected])
    torch.testing.assert_close(dets[:, 4], scores[expected])


def test_mmcv_roi_align_matches_torchvision():
    from mmcv.ops import RoIAlign
    from torchvision.ops import roi_align

    feat, rois, expected = _roi_inputs()
    out = RoIAlign(output_size=(2, 2), spatial_scale=1.0, sampling_ratio=2, aligned=True)(feat, rois)
    assert out.shape == (1, 1, 2, 2)
    torch.testing.assert_close(out[0, 0], expected, atol=1e-4, rtol=0)

    g = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 4, 20, 24, generator=g)
    rois = torch.tensor([[0, 1.0, 2.0, 15.5, 12.0], [1, 0.0, 0.0, 23.0, 19.0], [1, 5.0, 3.0, 9.0, 8.0]])
    a = RoIAlign((3, 3), spatial_scale=1.0, sampling_ratio=2, aligned=True)(feat, rois)
    b = roi_align(feat, rois, (3, 3), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_mmdet_mmseg_registries():
    import mmdet.models  # noqa: F401
    import mmseg.models  # noqa: F401
    from mmdet.registry import MODELS as DET_MODELS
    from mmseg.registry import MODELS as SEG_MODELS

    assert DET_MODELS.get("MaskRCNN") is not None
    assert DET_MODELS.get("FPN") is not None
    assert SEG_MODELS.get("EncoderDecoder") is not None
    assert SEG_MODELS.get("UPerHead") is not None


def test_fvcore_flop_count():
    from fvcore.nn import FlopCountAnalysis

    model = torch.nn.Linear(8, 4)
    flops = FlopCountAnalysis(model, torch.zeros(2, 8))
    flops.unsupported_ops_warnings(False)
    assert flops.total() == 2 * 8 * 4


def test_detectron2_import_and_model_zoo():
    import detectron2
    from detectron2 import model_zoo
    from detectron2.modeling import build_model  # noqa: F401

    cfg_file = model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
    assert os.path.isfile(cfg_file)
    base = os.path.join(os.path.dirname(cfg_file), "..", "Base-RCNN-FPN.yaml")
    assert os.path.isfile(base), "the config's _BASE_ is missing"
    assert detectron2.__version__.startswith("0.5")


def test_detectron2_config_and_missing_C_message():
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(
        "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"))
    assert cfg.MODEL.MASK_ON and cfg.MODEL.BACKBONE.NAME == "build_resnet_fpn_backbone"
    assert list(cfg.MODEL.RESNETS.OUT_FEATURES) == ["res2", "res3", "res4", "res5"]

    from detectron2 import _C

    if getattr(_C, "RESTDENSE_STUB", False):  # our pure-Python build
        with pytest.raises(ImportError, match="not available"):
            _C.nms_rotated
