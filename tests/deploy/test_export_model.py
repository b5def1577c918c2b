"""Whole-model ONNX export (MMDeploy for MMDetection / MMSegmentation, TracingAdapter for
detectron2) checked with real ONNX Runtime sessions against PyTorch, at image sizes that are
not multiples of 32, through ``rest-dense export-model``."""
import math
import os

import onnx
import pytest
import torch

from rest_dense.cli import main
from rest_dense.deploy.onnx_export import load_deployment

from _toy import (D2_DET, MM_DET, MM_RETINA, MM_SEG, d2_checkpoint, retina_options,
                  d2_ckpt, det_ckpt, mm_checkpoint, seg_ckpt, toy_root, val_images)  # noqa: F401

SIZES = ["120x152", "136x200"]


def _export(capsys, config, ckpt, out, *extra, sizes=SIZES):
    code = main(["export-model", str(config), str(ckpt), "--out", str(out),
                 "--check-shapes", *sizes, *extra])
    text = capsys.readouterr()
    return code, text.out, text.err


def _checked_lines(out):
    return [ln for ln in out.splitlines() if ln.startswith("onnxruntime vs pytorch:")]


def _assert_all_ok(code, out, err, n_images):
    lines = _checked_lines(out)
    assert code == 0, out + err
    assert len(lines) == n_images and all(ln.endswith("ok") for ln in lines), out
    assert f"ok: ONNX Runtime agrees with PyTorch on {n_images} images" in out


@pytest.mark.slow
def test_mask_rcnn_mmdeploy_boxes_and_masks(tmp_path, capsys, det_ckpt, toy_root, one_thread):
    out = tmp_path / "mrcnn.onnx"
    image = val_images(toy_root)[0]
    code, text, err = _export(capsys, MM_DET, det_ckpt, out, "--check-images", str(image))
    _assert_all_ok(code, text, err, 3)
    assert "mmdeploy 1.3.1" in text and "outputs ['dets', 'labels', 'masks']" in text
    graph = onnx.load(str(out))
    ops = {n.op_type for n in graph.graph.node}
    assert {"NonMaxSuppression", "RoiAlign"} <= ops  # NMS and RoIAlign run inside the graph
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims[2:]] == ["height", "width"]
    # the comparisons were about something: detections with masks, matched exactly
    for line in _checked_lines(text):
        matched = int(line.split("matched ")[1].split(",")[0])
        assert matched >= 5 and "min_mask_iou 1" in line, line


@pytest.mark.slow
def test_upernet_mmdeploy_dynamic_sizes(tmp_path, capsys, seg_ckpt, toy_root, one_thread):
    out = tmp_path / "upernet.onnx"
    image = val_images(toy_root, "ade")[0]
    code, text, err = _export(capsys, MM_SEG, seg_ckpt, out, "--check-images", str(image),
                              "--benchmark", "--runs", "2")
    _assert_all_ok(code, text, err, 3)
    assert "pixel_agreement 1" in text
    classes = [int(ln.split("classes ")[1].split()[0]) for ln in _checked_lines(text)]
    assert max(classes) >= 2  # the maps are not constant
    table = [ln for ln in text.splitlines() if ln.startswith("| upernet.onnx")]
    assert len(table) == 3 and all(float(c) > 0 for ln in table for c in ln.split("|")[4:6])


@pytest.mark.slow
def test_retinanet_shipped_config_mmdeploy(tmp_path, capsys, one_thread):
    ckpt = mm_checkpoint(tmp_path / "retina.pth", MM_RETINA, retina_options(), scale=0.01)
    opts = [f"{k}={v!r}" for k, v in retina_options().items()]
    out = tmp_path / "retina.onnx"
    code, text, err = _export(capsys, "retinanet/retinanet_restv2-t_fpn_amp-ms-1x_coco.py", ckpt,
                              out, "--cfg-options", *opts)
    _assert_all_ok(code, text, err, 2)
    assert "outputs ['dets', 'labels']" in text
    for line in _checked_lines(text):
        assert int(line.split("matched ")[1].split(",")[0]) >= 10, line


@pytest.mark.slow
# global: the tests below; win: cwin is win plus a conv (and the backbone-level ONNX Runtime
# test of tests/deploy/test_deploy_units.py runs win)
@pytest.mark.parametrize("mode", ["cwin", "hwin"])
def test_detectron2_tracing_adapter_window_attention_modes(tmp_path, capsys, mode, toy_root,
                                                         one_thread):
    options = {"MODEL.RESTV2.ATTN_MODE": mode, "MODEL.RESTV2.WINDOW_SIZE": [8, 4, 4, 2]}
    ckpt = d2_checkpoint(tmp_path / f"d2_{mode}.pth", options)
    out = tmp_path / f"d2_{mode}.onnx"
    opts = [f"{k}={v}" for k, v in options.items()]
    code, text, err = _export(capsys, D2_DET, ckpt, out, "--check-images",
                              str(val_images(toy_root)[0]), "--cfg-options", *opts,
                              sizes=SIZES + ["97x301"])
    _assert_all_ok(code, text, err, 4)
    assert "TracingAdapter" in text and "outputs ['boxes', 'scores', 'labels', 'masks']" in text
    inputs = {ln.split("network input ")[1].split(")")[0] for ln in _checked_lines(text)}
    assert len(inputs) >= 3  # dynamic height and width really exercised


@pytest.mark.slow
def test_detectron2_global_and_failures(tmp_path, capsys, d2_ckpt, toy_root, one_thread):
    out = tmp_path / "d2.onnx"
    code, text, err = _export(capsys, D2_DET, d2_ckpt, out, "--check-images",
                              str(val_images(toy_root)[0]))
    _assert_all_ok(code, text, err, 3)

    # PyTorch changed after the export: ONNX Runtime disagrees
    dep = load_deployment(D2_DET, d2_ckpt)
    with torch.no_grad():
        dep.model.roi_heads.box_predictor.bbox_pred.bias.add_(3.0)
    results = dep.check(out, [(120, 152)])
    assert not results[0].ok and "boxes differ" in results[0].describe()

    # NaN weights: detectron2 drops non-finite detections, so nothing is left to compare,
    # which fails the check rather than passing it vacuously
    sd = torch.load(d2_ckpt, weights_only=True)
    sd["model"]["roi_heads.box_predictor.bbox_pred.bias"][:] = math.nan
    torch.save(sd, tmp_path / "nan.pth")
    code, text, err = _export(capsys, D2_DET, tmp_path / "nan.pth", tmp_path / "nan.onnx",
                              sizes=["120x152"])
    assert code == 1 and "nothing was compared" in text and "FAILED" in err


@pytest.mark.slow
def test_graph_not_valid_at_a_check_size_fails(tmp_path, capsys, one_thread):
    # traced at 64x64, the 8-token windows of stage 2 cover the whole map: the graph has no
    # windows there, the 120x152 image's network input (128x192) needs them
    options = {"MODEL.RESTV2.ATTN_MODE": "win", "MODEL.RESTV2.WINDOW_SIZE": [8]}
    ckpt = d2_checkpoint(tmp_path / "win.pth", options)
    code, text, err = _export(capsys, D2_DET, ckpt, tmp_path / "win.onnx", "--shape", "64x64",
                              "--cfg-options", *[f"{k}={v}" for k, v in options.items()],
                              sizes=["120x152"])
    assert code == 1 and "graph not valid here" in text and "FAILED" in err


def test_export_bad_inputs(tmp_path, capsys, det_ckpt, seg_ckpt):
    code, _, err = _export(capsys, MM_DET, tmp_path / "missing.pth", tmp_path / "x.onnx")
    assert code == 2 and "does not exist" in err
    code, _, err = _export(capsys, MM_DET, seg_ckpt, tmp_path / "x.onnx")
    assert code == 2 and "is not a checkpoint of the model" in err
    assert not os.path.exists(tmp_path / "x.onnx")
    with pytest.raises(SystemExit):
        main(["export-model", str(MM_DET), str(det_ckpt), "--out", "y.onnx", "--shape", "12xx"])
    assert "HxW" in capsys.readouterr().err
