"""Whole-model ONNX export with ResTv1 backbones, checked with ONNX Runtime against PyTorch.

ResTv1 mixes its heads' attention maps in float64; the exported graphs keep that in ops that
ONNX Runtime's CPU provider has (see ``rest_dense.models.restv1.mix_heads_decomposed``).
Covered: the detectron2 toy Mask R-CNN and the MMDetection toy RetinaNet with a small ResTv1
backbone, briefly trained on the toy data; the shipped MMDetection ``retinanet_rest-s`` config
made small, with perturbed random weights (its COCO anchors do not fit the toy objects).
"""
import onnx
import pytest

from rest_dense import safe_load
from rest_dense.cli import main

from _toy import (D2_DET, D2_OPTIONS, ITERS, MM_RETINA_TOY, TRAIN_IMAGES, constant_lr,
                  mm_config, toy_data, train_d2, train_mm, val_images)

SIZES = ["120x152", "136x200"]

#: the detectron2 toy yaml with a small ResTv1 backbone in place of ResTv2 (every stage with
#: more than one head, so the float64 head mixing runs in stages 2-4)
D2_V1 = {
    "MODEL.BACKBONE.NAME": "build_rest_fpn_backbone",
    "MODEL.REST.NAME": "restv1_lite",
    "MODEL.REST.ARCH.EMBED_DIMS": [32, 64, 128, 256],
    "MODEL.REST.ARCH.NUM_HEADS": [1, 2, 4, 8],
    "MODEL.REST.ARCH.DEPTHS": [1, 1, 2, 1],
}


def _export(capsys, config, ckpt, out, *extra):
    code = main(["export-model", str(config), str(ckpt), "--out", str(out),
                 "--check-shapes", *SIZES, *extra])
    text = capsys.readouterr()
    lines = [ln for ln in text.out.splitlines() if ln.startswith("onnxruntime vs pytorch:")]
    print("\n".join(lines))
    return code, text.out + text.err, lines


def _matched(line):
    return int(line.split("matched ")[1].split()[0].rstrip(","))


def _assert_float64_mixing(path):
    graph = onnx.load(str(path)).graph
    ops = {n.op_type for n in graph.node}
    assert "InstanceNormalization" not in ops, "float64 InstanceNormalization has no ORT CPU kernel"
    assert any(n.op_type == "Cast" and any(a.name == "to" and a.i == onnx.TensorProto.DOUBLE
                                           for a in n.attribute) for n in graph.node)


#: the toy RetinaNet (MMDetection) with the same small ResTv1 backbone
MM_V1 = {
    "model.backbone": dict(_delete_=True, type="ResTv1",
                           arch=dict(embed_dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8),
                                     depths=(1, 1, 2, 1), sr_ratios=(8, 4, 2, 1)),
                           out_indices=(1, 2, 3)),
}


@pytest.fixture(scope="module")
def v1_data(tmp_path_factory):
    return toy_data(tmp_path_factory.mktemp("toy_v1"))


@pytest.fixture(scope="module")
def d2_v1_ckpt(tmp_path_factory, v1_data):
    data = v1_data
    work = tmp_path_factory.mktemp("train_d2_v1")
    # 20 iterations at lr 0.002: the ResTv2 toy recipe (12 at 0.001) leaves this model's
    # class scores below 1e-4; these give the best detections 1e-4 to 0.02 (by CPU)
    ckpt = train_d2(work, data, 20, options=dict(D2_V1, **{"SOLVER.BASE_LR": 0.002}))
    state = safe_load.load_checkpoint_file(ckpt, trusted=False)["model"]
    assert any(k.endswith("attn.transform_conv.weight") for k in state), sorted(state)[:20]
    return ckpt, data


@pytest.mark.slow
def test_detectron2_mask_rcnn_restv1_trained(tmp_path, capsys, d2_v1_ckpt, one_thread):
    ckpt, data = d2_v1_ckpt
    assert len(list((data / "train").glob("*.png"))) == TRAIN_IMAGES
    # scores are still low (see d2_v1_ckpt) and differ by CPU (1e-4 to 2e-2): no test-time
    # threshold, the 20 best detections per image are compared
    opts = [f"{k}={v}" for k, v in dict(D2_OPTIONS, **D2_V1, **{
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0, "TEST.DETECTIONS_PER_IMAGE": 20}).items()]
    out = tmp_path / "d2_v1.onnx"
    code, text, lines = _export(capsys, D2_DET, ckpt, out, "--check-images",
                                str(val_images(data)[0]), "--cfg-options", *opts)
    assert code == 0, text
    assert len(lines) == 3 and all(ln.endswith("ok") for ln in lines), text
    assert "TracingAdapter" in text
    assert sum(_matched(ln) for ln in lines) >= 5, text
    _assert_float64_mixing(out)


@pytest.mark.slow
def test_mmdeploy_retinanet_restv1_trained(tmp_path, capsys, v1_data, one_thread):
    iters = ITERS["retina"]
    ckpt = train_mm(tmp_path / "train", MM_RETINA_TOY, v1_data, iters,
                    dict(MM_V1, param_scheduler=constant_lr(iters)))
    state = safe_load.load_checkpoint_file(ckpt, trusted=False)["state_dict"]
    assert any(k.endswith("attn.transform_conv.weight") for k in state)
    out = tmp_path / "retina_v1.onnx"
    code, text, lines = _export(capsys, MM_RETINA_TOY, ckpt, out, "--check-images",
                                str(val_images(v1_data)[0]), "--cfg-options",
                                *[f"{k}={v!r}" for k, v in MM_V1.items()])
    assert code == 0, text
    assert len(lines) == 3 and all(ln.endswith("ok") for ln in lines), text
    assert sum(_matched(ln) for ln in lines) >= 10, text
    _assert_float64_mixing(out)


@pytest.mark.slow
def test_mmdeploy_retinanet_restv1_shipped_config(tmp_path, capsys, one_thread):
    import torch

    from rest_dense.mm.utils import build_model

    from conftest import REPO

    config = REPO / "configs/retinanet/retinanet_rest-s_fpn_amp-ms-1x_coco.py"
    options = {
        "model.backbone.arch": dict(embed_dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8),
                                    depths=(1, 1, 1, 1), sr_ratios=(8, 4, 2, 1), _delete_=True),
        "model.backbone.init_cfg": None,
        "model.neck.in_channels": [64, 128, 256],
        "model.bbox_head.num_classes": 3,
        "model.bbox_head.feat_channels": 64,
        "test_dataloader.dataset.pipeline.1.scale": (256, 160),
    }
    cfg = mm_config(config, options)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # spread the scores (as random_retina_checkpoint does)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)
        cls = model.bbox_head.retina_cls
        cls.bias.fill_(-2.5)
        cls.weight.copy_(torch.randn(cls.weight.shape, generator=gen) * 0.2)
    assert type(model.backbone).__name__ == "MMResTv1"
    ckpt = tmp_path / "retina_v1.pth"
    torch.save({"state_dict": model.state_dict(), "meta": {}}, ckpt)
    out = tmp_path / "retina_v1.onnx"
    code, text, lines = _export(capsys, config, ckpt, out, "--cfg-options",
                                *[f"{k}={v!r}" for k, v in options.items()])
    assert code == 0, text
    assert len(lines) == 2 and all(ln.endswith("ok") for ln in lines), text
    assert all(_matched(ln) >= 10 for ln in lines), text
    _assert_float64_mixing(out)
