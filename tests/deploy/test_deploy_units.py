"""rest_dense.deploy building blocks: inputs, prediction files and comparison, the exact
replacements registered with MMDeploy, and the validity rules of traced graphs (checked
against ONNX Runtime)."""
import json
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rest_dense.deploy.inputs import (ImageReadError, collect_images, output_names, read_image,
                                      synthetic_image)
from rest_dense.deploy.predictions import (Detections, SegMap, Tolerances, compare_predictions,
                                           detections_from_json, detections_to_json,
                                           read_label_png, write_label_png)

from conftest import TINY_ARCH


def _write_png(path, h=20, w=30, value=100):
    import cv2

    img = np.full((h, w, 3), value, np.uint8)
    assert cv2.imwrite(str(path), img)
    return path


# ------------------------------------------------------------------ inputs
def test_collect_images_files_folders_globs_and_errors(tmp_path):
    a = _write_png(tmp_path / "a.png")
    sub = tmp_path / "sub"
    sub.mkdir()
    b = _write_png(sub / "b.jpg")
    (sub / "notes.txt").write_text("x")
    assert collect_images([str(tmp_path)]) == [str(a), str(b)]
    assert collect_images([str(tmp_path / "*.png"), str(a)]) == [str(a)]  # duplicates once
    with pytest.raises(FileNotFoundError, match="does not exist"):
        collect_images([str(tmp_path / "missing.png")])
    with pytest.raises(FileNotFoundError, match="no file matches"):
        collect_images([str(tmp_path / "*.bmp")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no image"):
        collect_images([str(empty)])
    # a link loop under a recursive pattern: each file once, not once per path through it
    os.symlink(tmp_path, sub / "loop")
    assert collect_images([str(tmp_path / "**" / "*.jpg")]) == [str(b)]


def test_files_left_out_of_a_folder_are_reported(tmp_path):
    a = _write_png(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden").write_text("x")
    (tmp_path / "anim.gif").write_bytes(b"GIF89a")  # an image suffix: taken, read later
    left: list = []
    assert collect_images([str(tmp_path)], left_out=left) == [str(a), str(tmp_path / "anim.gif")]
    assert left == [str(tmp_path / "notes.txt")]


def test_links_to_missing_files_are_inputs_the_reader_reports(tmp_path):
    a = _write_png(tmp_path / "a.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "b.png")
    os.symlink(tmp_path / "gone.txt", tmp_path / "c.txt")  # not an image name: not taken
    assert collect_images([str(tmp_path)]) == [str(a), str(tmp_path / "b.png")]
    assert collect_images([str(tmp_path / "*.png")]) == [str(a), str(tmp_path / "b.png")]
    with pytest.raises(ImageReadError, match="b.png.* is a link to .*gone.png.*leads to no file"):
        read_image(tmp_path / "b.png")
    with pytest.raises(FileNotFoundError, match="b.png.* is a link to .*gone.png"):
        collect_images([str(tmp_path / "b.png")])


def test_read_image_decodes_and_names_bad_files(tmp_path):
    img = read_image(_write_png(tmp_path / "ok.png", 7, 9))
    assert img.shape == (7, 9, 3) and img.dtype == np.uint8
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    with pytest.raises(ImageReadError, match="bad.png.*cannot be decoded"):
        read_image(tmp_path / "bad.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty file"):
        read_image(tmp_path / "empty.png")


def test_output_names_are_distinct():
    names = output_names(["x/a.png", "y/a.jpg", "b.png"])
    assert len(set(names.values())) == 3 and names["b.png"] == "b"


def test_output_names_fit_the_file_systems_limit():
    long_a, long_b = "a" * 251 + ".png", "a" * 250 + "b.png"
    names = output_names([long_a, long_b, "é" * 200 + ".jpg", "x/c.png"])
    assert len(set(names.values())) == 4 and names["x/c.png"] == "c"
    for name in names.values():
        assert len((name + "_99.json").encode()) <= 255, name
    assert names[long_a].startswith("a" * 150)  # readable: the start of the name is kept


def test_synthetic_image_is_deterministic_and_sized():
    a, b = synthetic_image(37, 51, seed=3), synthetic_image(37, 51, seed=3)
    assert a.shape == (37, 51, 3) and np.array_equal(a, b) and a.std() > 5


# ------------------------------------------------------------------ prediction files
def _dets(n=3, size=(40, 50), seed=0):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 20, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 15, (n, 2))], 1).astype(np.float32)
    masks = np.zeros((n,) + size, bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes.astype(int)):
        masks[i, y0:y1, x0:x1] = True
    return Detections(boxes, np.linspace(0.9, 0.5, n).astype(np.float32),
                      np.arange(n) % 2, masks, size)


def test_detections_json_round_trip_with_rle(tmp_path):
    det = _dets()
    doc = detections_to_json(det, ["a", "b"], image="x.png")
    path = tmp_path / "d.json"
    path.write_text(json.dumps(doc))
    back = detections_from_json(path)
    assert doc["instances"][1]["category"] == "b" and "counts" in doc["instances"][0]["segmentation"]
    assert np.allclose(back.boxes, det.boxes, atol=1e-3) and np.array_equal(back.masks, det.masks)
    assert np.array_equal(back.labels, det.labels)


def test_label_png_round_trip_8_and_16_bit(tmp_path):
    small = np.arange(12).reshape(3, 4) % 7
    write_label_png(small, tmp_path / "s.png")
    assert np.array_equal(read_label_png(tmp_path / "s.png"), small)
    big = np.array([[0, 300], [299, 1]])
    write_label_png(big, tmp_path / "b.png")
    assert np.array_equal(read_label_png(tmp_path / "b.png"), big)


def test_compare_detections_tolerances_and_failures():
    ref = _dets(4)
    same = compare_predictions(ref, _dets(4))
    assert same.ok and same.metrics["matched"] == 4 and same.metrics["min_mask_iou"] == 1.0
    moved = _dets(4)
    moved.boxes[0] += 2.0
    res = compare_predictions(ref, moved)
    assert not res.ok and any("boxes differ" in p for p in res.problems)
    nan = _dets(4)
    nan.boxes[1, 0] = np.nan
    assert any("non-finite" in p for p in compare_predictions(ref, nan).problems)
    missing = _dets(4).select(np.array([True, True, True, False]))
    assert compare_predictions(ref, missing).ok is False  # a confident detection lost
    # a detection at the cut-off on one side only is a borderline case
    tol = Tolerances(score_thr=0.5)
    assert compare_predictions(ref, missing, tol).ok


def test_compare_segmentation():
    a = SegMap(np.zeros((10, 10), np.int64))
    b = SegMap(a.labels.copy())
    assert compare_predictions(a, b).ok
    b.labels[0, 0] = 1
    res = compare_predictions(a, b)
    assert not res.ok and res.metrics["pixel_agreement"] == pytest.approx(0.99)


def test_compare_segmentation_logits():
    logits = np.random.default_rng(0).normal(size=(3, 10, 12)).astype(np.float32)
    a = SegMap(logits.argmax(0), logits)
    b = SegMap(logits.argmax(0), logits + 1e-4)
    res = compare_predictions(a, b)  # measured, not held to a bound by default
    assert res.ok and res.metrics["max_logit_diff"] == pytest.approx(1e-4, rel=1e-2)
    assert compare_predictions(a, b, Tolerances(logit_atol=1e-3)).ok
    res = compare_predictions(a, b, Tolerances(logit_atol=1e-5))
    assert not res.ok and "logits differ" in res.describe()
    b.logits[0, 0, 0] = np.nan
    assert "non-finite logits" in compare_predictions(a, b).describe()
    assert "max_logit_diff" not in compare_predictions(a, SegMap(a.labels)).metrics


def test_mmseg_upsample_rewrite_matches_mmseg():
    Upsample = pytest.importorskip("mmseg.models.utils").Upsample

    from rest_dense.deploy.mmdeploy_support import mmseg_upsample_dynamic

    x = torch.randn(1, 2, 5, 7)
    for up in (Upsample(scale_factor=2, mode="bilinear", align_corners=False),
               Upsample(scale_factor=4, mode="nearest")):
        assert torch.equal(mmseg_upsample_dynamic(up, x), up(x))


# ------------------------------------------------------------------ exact replacements
@pytest.mark.parametrize("size", [(4, 4), (5, 7), (16, 16), (25, 38), (1, 1), (13, 6)])
def test_adaptive_avg_pool2d_exact_matches_torch(size):
    from rest_dense.deploy.mmdeploy_support import adaptive_avg_pool2d_exact

    x = torch.randn(2, 3, *size)
    for out in (1, 2, 3, 6, (2, 5)):
        assert torch.allclose(adaptive_avg_pool2d_exact(x, out), F.adaptive_avg_pool2d(x, out),
                              atol=1e-5)


def test_scaled_dot_product_attention_exact_matches_torch():
    from rest_dense.deploy.mmdeploy_support import scaled_dot_product_attention_exact

    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    for kw in ({}, {"scale": 0.1}, {"attn_mask": torch.rand(5, 7) > 0.3},
               {"attn_mask": torch.randn(5, 7)}):
        ref = F.scaled_dot_product_attention(q, k, v, **kw)
        assert torch.allclose(scaled_dot_product_attention_exact(q, k, v, **kw), ref, atol=1e-5)
    q7 = torch.randn(2, 3, 7, 8)
    assert torch.allclose(scaled_dot_product_attention_exact(q7, k, v, is_causal=True),
                          F.scaled_dot_product_attention(q7, k, v, is_causal=True), atol=1e-5)


def test_deploy_configs_are_shipped_and_adjustable():
    from rest_dense.deploy.mmdeploy_support import DEPLOY_CONFIGS, deploy_config

    for task in DEPLOY_CONFIGS:
        cfg = deploy_config(task, opset=17, input_shape=(96, 128), pad_size_divisor=32)
        assert cfg.onnx_config.opset_version == 17 and cfg.onnx_config.input_shape == [128, 96]
        assert cfg.backend_config.type == "onnxruntime"
        assert set(cfg.onnx_config.dynamic_axes["input"].values()) == {"batch", "height", "width"}
        assert (cfg.codebase_config.get("pad_size_divisor") == 32) == (task != "segmentation")
    with pytest.raises(ValueError, match="no deploy config"):
        deploy_config("pose")


# ------------------------------------------------------------------ traced-graph validity
def test_graph_rules_predict_onnxruntime(tmp_path, one_thread):
    """Export a windowed backbone at one size; ONNX Runtime equals eager exactly where
    ``graph_problems`` says the graph is valid, and differs (or fails) where it says not."""
    import onnxruntime as ort

    from rest_dense.deploy.shapes import choose_trace_size, graph_problems
    from rest_dense.models import ResTv2

    torch.manual_seed(0)
    model = ResTv2(arch=dict(TINY_ARCH), attn_mode="win", window_size=8).eval()
    valid_sizes = [(96, 128), (128, 128)]
    trace, problems = choose_trace_size(model, valid_sizes, divisor=32)
    assert problems == []
    path = tmp_path / "b.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (torch.randn(1, 3, *trace),), str(path), dynamo=False,
                          input_names=["x"], opset_version=16,
                          dynamic_axes={"x": {2: "h", 3: "w"}})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for size in valid_sizes + [(256, 320), (32, 64)]:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            ref = model(x)
        predicted_ok = not graph_problems(model, trace, size)
        try:
            outs = sess.run(None, {"x": x.numpy()})
            agree = all(o.shape == r.shape and np.abs(o - r.numpy()).max() < 1e-3
                        for o, r in zip(outs, ref))
        except Exception:  # noqa: BLE001  (a shape error in ONNX Runtime is a disagreement)
            agree = False
        assert agree == predicted_ok, (size, trace, graph_problems(model, trace, size))
    assert graph_problems(model, trace, (256, 320))  # windows larger than at trace time


def _retina_inputs(seed, level_sizes, num_classes=3, mean=-2.0):
    """Random per-level RetinaNet outputs (logits, deltas, anchors) for one image."""
    from detectron2.structures import Boxes

    gen = torch.Generator().manual_seed(seed)
    logits, deltas, anchors = [], [], []
    for n in level_sizes:
        logits.append(torch.randn(n, num_classes, generator=gen) * 2 + mean)
        deltas.append(torch.randn(n, 4, generator=gen) * 0.2)
        xy = torch.rand(n, 2, generator=gen) * 200
        wh = torch.rand(n, 2, generator=gen) * 60 + 4
        anchors.append(Boxes(torch.cat([xy, xy + wh], 1)))
    return anchors, logits, deltas


def _retina_stub(topk=50, thresh=0.05, num_classes=3):
    """What RetinaNet.inference_single_image reads of its model."""
    from types import SimpleNamespace

    from detectron2.modeling.box_regression import Box2BoxTransform

    return SimpleNamespace(test_topk_candidates=topk, test_score_thresh=thresh,
                           num_classes=num_classes, box2box_transform=Box2BoxTransform((1.0,) * 4),
                           test_nms_thresh=0.5, max_detections_per_image=100)


@pytest.mark.parametrize("seed,sizes,thresh", [
    (0, [400, 100, 30, 8, 2], 0.05),   # level 0: more candidates above the threshold than topk
    (1, [12, 6, 3], 0.05),             # every level fewer than topk
    (2, [500, 40], 0.3),               # a higher threshold: some levels keep none
    (3, [300, 9], 0.0),                # threshold 0: every candidate passes
])
def test_d2_retinanet_traceable_decoding_equals_detectron2(seed, sizes, thresh):
    from detectron2.modeling.meta_arch.retinanet import RetinaNet

    from rest_dense.deploy.d2_support import traceable_inference_single_image

    model = _retina_stub(thresh=thresh)
    anchors, logits, deltas = _retina_inputs(seed, sizes)
    passing = [int((lg.sigmoid() > thresh).sum()) for lg in logits]
    assert min(passing) < model.test_topk_candidates or thresh == 0.3
    ref = RetinaNet.inference_single_image(model, anchors, [x.clone() for x in logits], deltas, (256, 256))
    new = traceable_inference_single_image(model, anchors, [x.clone() for x in logits], deltas, (256, 256))
    assert len(ref) > 0
    assert torch.equal(ref.pred_boxes.tensor, new.pred_boxes.tensor)
    assert torch.equal(ref.scores, new.scores)
    assert torch.equal(ref.pred_classes, new.pred_classes)


def test_d2_retinanet_exported_decoding_serves_other_candidate_counts(tmp_path):
    """Exported (traced) on an input with fewer candidates above the threshold than
    ``topk``, detectron2's own decoding no longer applies the top-k cut in ONNX Runtime (the
    Python ``min()`` took the trace input's branch); the traceable decoding gives, in ONNX
    Runtime, what the eager model gives on inputs with more candidates than ``topk``."""
    import onnxruntime as ort
    from detectron2.modeling.meta_arch.retinanet import RetinaNet
    from detectron2.structures import Boxes

    from rest_dense.deploy.d2_support import traceable_inference_single_image

    model = _retina_stub(topk=50)

    class Decode(torch.nn.Module):
        def __init__(self, decode):
            super().__init__()
            self.decode = decode

        def forward(self, logits, deltas, anchors):  # (detectron2 applies sigmoid_ in place)
            r = self.decode(model, [Boxes(anchors)], [logits.clone()], [deltas], (256, 256))
            return r.pred_boxes.tensor, r.scores, r.pred_classes

    few = _retina_inputs(0, [200], mean=-6.0)   # 45 candidates above 0.05
    many = _retina_inputs(1, [300], mean=-1.0)  # hundreds above 0.05
    assert 0 < int((few[1][0].sigmoid() > 0.05).sum()) < 50
    assert int((many[1][0].sigmoid() > 0.05).sum()) > 100

    def args(x):
        return x[1][0], x[2][0], x[0][0].tensor

    eager = Decode(RetinaNet.inference_single_image)(*args(many))
    assert len(eager[1]) == 50  # the top-k cut, before NMS
    results = {}
    for name, decode in (("detectron2", RetinaNet.inference_single_image),
                         ("traceable", traceable_inference_single_image)):
        path = str(tmp_path / f"{name}.onnx")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's warnings about Python values
            torch.onnx.export(Decode(decode), args(few), path, dynamo=False, opset_version=16,
                              input_names=["logits", "deltas", "anchors"],
                              dynamic_axes={n: {0: "n"} for n in ("logits", "deltas", "anchors")})
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        results[name] = session.run(None, dict(zip(("logits", "deltas", "anchors"),
                                                   (t.numpy() for t in args(many)))))
    assert len(results["detectron2"][1]) != len(eager[1])  # the problem the patch solves
    boxes, scores, classes = results["traceable"]
    np.testing.assert_allclose(boxes, eager[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(scores, eager[1].numpy(), atol=1e-6)
    np.testing.assert_array_equal(classes, eager[2].numpy())


def test_d2_traceable_retinanet_patches_one_model_for_the_block():
    from rest_dense.deploy.d2_support import traceable_retinanet

    class Model:
        def inference_single_image(self):
            return "detectron2"

    model, other = Model(), Model()
    with traceable_retinanet(model):
        assert model.inference_single_image.__func__.__name__ == "traceable_inference_single_image"
        assert other.inference_single_image() == "detectron2"
    assert model.inference_single_image() == "detectron2" and "inference_single_image" not in vars(model)


@pytest.mark.parametrize("device, result, match", [
    ("cpu", "cpu", None),
    ("cuda", "cpu" if not torch.cuda.is_available() else "cuda", None),
    ("gpu", None, "not a torch device"),
    ("cuda:x", None, "not a torch device"),
])
def test_resolve_device(device, result, match, capsys):
    from rest_dense.deploy.infer import resolve_device

    if match:
        with pytest.raises(ValueError, match=match):
            resolve_device(device)
        return
    assert resolve_device(device) == result
    if device == "cuda" and not torch.cuda.is_available():
        assert "no CUDA GPU" in capsys.readouterr().err


def test_overwrite_takes_only_a_runs_own_files(tmp_path):
    """What infer --overwrite may remove: the files a finished run's summary lists; all of
    preds/ and vis/ of a run that did not finish (killed, interrupted, failed while
    writing); never a foreign summary, unlisted files of a finished run, or dotfiles."""
    from rest_dense.deploy.infer import OutputFolderInUseError, _previous_results

    out = tmp_path / "out"
    (out / "preds").mkdir(parents=True)
    (out / "vis").mkdir()
    (out / "preds" / "a.json").write_text("{}")
    (out / "vis" / ".DS_Store").write_text("")
    head = {"config": "c.py", "checkpoint": "k.pth"}
    for status, extra in (("interrupted", {"interrupted_by": "an error", "images": []}),
                          ("running", {})):
        (out / "summary.json").write_text(json.dumps(dict(head, status=status, **extra)))
        assert _previous_results(str(out)) == [str(out / "preds" / "a.json"),
                                                str(out / "summary.json")]
    done = dict(head, status="complete", images=[{"input": "a.png", "pred": "x/preds/a.json"}])
    (out / "summary.json").write_text(json.dumps(done))
    assert _previous_results(str(out))[0] == str(out / "preds" / "a.json")
    (out / "preds" / "notes.txt").write_text("mine")
    with pytest.raises(OutputFolderInUseError, match="did not write.*notes.txt"):
        _previous_results(str(out))
    (out / "summary.json").write_text('{"accuracy": 0.9}')
    with pytest.raises(OutputFolderInUseError, match="no rest-dense infer run wrote"):
        _previous_results(str(out))


def test_pickled_arrays_become_tensors_of_their_shape():
    """detectron2 .pkl entries: 0-d arrays stay 0-d, other byte orders convert, strings and
    objects are not tensors (left out, not a crash)."""
    from rest_dense.checkpoint_reader import _tensors
    from rest_dense.models.pretrained import array_to_tensor

    assert array_to_tensor(np.array(5)).shape == ()
    big = np.arange(4, dtype=">f4")
    assert torch.equal(array_to_tensor(big), torch.arange(4.0))
    assert array_to_tensor(np.array(["x", "y"])) is None
    assert array_to_tensor(np.array([{}], dtype=object)) is None
    got = _tensors({"n": np.array(3), "s": np.array(["x"]), "w": np.ones((2, 2))})
    assert set(got) == {"n", "w"} and got["n"].shape == ()
