"""``rest-dense infer`` with DetInferencer / MMSegInferencer / DefaultPredictor on briefly
trained toy models: its files checked against each framework's own test-time output on the
same images, and bad input."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from rest_dense.cli import main
from rest_dense.deploy.predictions import (Tolerances, compare_predictions, detections_from_json,
                                           from_d2_instances, from_det_sample, from_seg_sample,
                                           read_label_png, SegMap)

from _toy import (D2_DET, D2_OPTIONS, D2_VT_FPN, DET_OPTIONS, MM_DET, MM_SEG,  # noqa: F401
                  d2_ckpt, d2_opts, det_ckpt, mm_config, seg_ckpt, toy_root, trained,
                  untrained_checkpoint, val_images)
from conftest import REPO, without_logging_errors

# every test here may start a process: a hung one fails after the timeout (pytest-timeout)
pytestmark = pytest.mark.timeout(600, func_only=True)

EXACT = Tolerances(box_atol=1e-3, score_atol=1e-5, mask_iou=0.999, seg_agreement=1.0)


def _infer(capsys, config, ckpt, inputs, out, *extra):
    code = main(["infer", str(config), str(ckpt), *map(str, inputs), "--out", str(out),
                 "--quiet", *extra])
    text = capsys.readouterr()
    return code, text.out, text.err


def _summary(out):
    with open(out / "summary.json") as f:
        return json.load(f)


def _check_files(out, n, suffix):
    summary = _summary(out)
    assert len(summary["images"]) == n and not summary["skipped"]
    for item in summary["images"]:
        assert item["pred"].endswith(suffix) and os.path.getsize(item["pred"]) > 0
        assert os.path.getsize(item["vis"]) > 1000  # a real picture was written
    return summary


@pytest.mark.slow
def test_infer_mmdet_matches_test_step(tmp_path, capsys, det_ckpt, toy_root, one_thread):
    from mmdet.apis import init_detector
    from mmengine.runner import Runner

    out = tmp_path / "out"
    options = [f"{k}={v!r}" for k, v in DET_OPTIONS.items()]
    code, text, err = _infer(capsys, MM_DET, det_ckpt, [toy_root / "val"], out, "--score-thr", "0",
                             "--cfg-options", *options)
    assert code == 0, err
    summary = _check_files(out, 3, ".json")
    assert summary["framework"] == "mmdet"
    assert summary["classes"] == ["circle", "square", "triangle"]
    by_image = {os.path.basename(i["input"]): i["pred"] for i in summary["images"]}

    # MMDetection's own test step over the config's test dataloader (with annotations)
    cfg = mm_config(MM_DET, DET_OPTIONS, data_root=toy_root)
    model = init_detector(cfg, str(det_ckpt), device="cpu").eval()
    compared = pixels = 0
    with torch.no_grad():
        for batch in Runner.build_dataloader(cfg.test_dataloader):
            for sample in model.test_step(batch):
                ref = from_det_sample(sample)
                got = detections_from_json(by_image[os.path.basename(sample.img_path)])
                res = compare_predictions(ref, got, EXACT)
                assert res.ok, res.describe()
                compared += len(ref)
                pixels += int(ref.masks.sum())
    assert compared >= 10 and pixels > 0  # detections with masks were compared, not empty lists


@pytest.mark.slow
def test_infer_mmseg_matches_test_step(tmp_path, capsys, seg_ckpt, toy_root, one_thread):
    from mmengine.runner import Runner
    from mmseg.apis import init_model

    out = tmp_path / "out"
    images = val_images(toy_root, "ade")
    code, text, err = _infer(capsys, MM_SEG, seg_ckpt, [toy_root / "images/validation/*.png"], out)
    assert code == 0, err
    summary = _check_files(out, len(images), ".png")
    by_image = {os.path.basename(i["input"]): i["pred"] for i in summary["images"]}
    # the checkpoint's names and colours, not the visualizer's default (Cityscapes')
    ckpt_meta = torch.load(seg_ckpt, map_location="cpu", weights_only=False)["meta"]["dataset_meta"]
    assert summary["classes"] == list(ckpt_meta["classes"]) == [
        "background", "circle", "square", "triangle"]
    from rest_dense.deploy.infer import MMSegPredictor

    predictor = MMSegPredictor(str(MM_SEG), str(seg_ckpt))
    drawn = predictor.inferencer.visualizer.dataset_meta
    assert drawn["classes"] == summary["classes"]
    assert [tuple(c) for c in drawn["palette"]] == [tuple(c) for c in ckpt_meta["palette"]]

    cfg = mm_config(MM_SEG, data_root=toy_root)
    model = init_model(cfg, str(seg_ckpt), device="cpu").eval()
    seen = set()
    with torch.no_grad():
        for batch in Runner.build_dataloader(cfg.test_dataloader):
            for sample in model.test_step(batch):
                ref = from_seg_sample(sample)
                got = SegMap(read_label_png(by_image[os.path.basename(sample.img_path)]))
                assert compare_predictions(ref, got, EXACT).ok
                seen |= set(np.unique(ref.labels).tolist())
    assert len(seen) >= 2  # the maps are not constant


def test_infer_mmseg_names_and_colours_without_checkpoint_meta(tmp_path, seg_ckpt, one_thread):
    """A checkpoint without meta (converted, released) takes the config's names and colours;
    a palette that is no list of RGB triples in 0..255 is replaced, never drawn with."""
    from rest_dense.deploy.infer import MMSegPredictor, _seg_palette

    state = torch.load(seg_ckpt, map_location="cpu", weights_only=False)
    config_classes = ["background", "circle", "square", "triangle"]
    config_palette = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (0, 130, 200)]
    cases = [
        ({}, config_classes, config_palette),
        ({"dataset_meta": {"classes": ["a", "b", "c", "d"], "palette": [[300, -5, 0]] * 4}},
         ["a", "b", "c", "d"], config_palette),
        ({"dataset_meta": {"classes": [1, 2, 3, 4], "palette": {"a": 1}}},
         ["1", "2", "3", "4"], config_palette),
    ]
    for i, (meta, classes, palette) in enumerate(cases):
        ckpt = tmp_path / f"c{i}.pth"
        torch.save({"state_dict": state["state_dict"], "meta": meta}, ckpt)
        predictor = MMSegPredictor(str(MM_SEG), str(ckpt))
        drawn = predictor.inferencer.visualizer.dataset_meta
        assert predictor.classes == classes and drawn["classes"] == classes
        assert [tuple(c) for c in drawn["palette"]] == palette
    # neither the checkpoint nor the config names them: numbers and fixed colours
    predictor = MMSegPredictor(str(MM_SEG), str(tmp_path / "c0.pth"),
                               cfg_options={"test_dataloader.dataset.metainfo": None})
    assert predictor.classes == ["0", "1", "2", "3"]
    assert predictor.inferencer.visualizer.dataset_meta["palette"] == _seg_palette(4)


@pytest.mark.slow
def test_infer_detectron2_matches_test_loader(tmp_path, capsys, d2_ckpt, toy_root, one_thread):
    from detectron2.data import build_detection_test_loader
    from detectron2.modeling import build_model

    from rest_dense.d2 import RestDetectionCheckpointer, register_toy_datasets
    from rest_dense.d2.engine import setup_yaml_config

    out = tmp_path / "out"
    options = [f"{k}={v}" for k, v in D2_OPTIONS.items()]
    code, text, err = _infer(capsys, D2_DET, d2_ckpt, val_images(toy_root), out,
                             "--score-thr", "0", "--cfg-options", *options)
    assert code == 0, err
    summary = _check_files(out, 3, ".json")
    by_image = {os.path.basename(i["input"]): i["pred"] for i in summary["images"]}
    assert summary["classes"] == ["circle", "square", "triangle"]  # not class_0 .. class_2

    # detectron2's own test loader (DatasetMapper, test-time resize) and model call
    register_toy_datasets(toy_root)
    cfg = setup_yaml_config(str(D2_DET), d2_opts({"DATALOADER.NUM_WORKERS": 0, **D2_OPTIONS}))
    model = build_model(cfg).eval()
    RestDetectionCheckpointer(model).load(str(d2_ckpt))
    compared = pixels = 0
    with torch.no_grad():
        for inputs in build_detection_test_loader(cfg, "toy_val"):
            for inp, output in zip(inputs, model(inputs)):
                ref = from_d2_instances(output["instances"].to("cpu"))
                got = detections_from_json(by_image[os.path.basename(inp["file_name"])])
                res = compare_predictions(ref, got, EXACT)
                assert res.ok, res.describe()
                compared += len(ref)
                pixels += int(ref.masks.sum())
    assert compared >= 10 and pixels > 0


@pytest.mark.slow
def test_infer_detectron2_sem_seg_writes_label_maps(tmp_path, tmp_path_factory, toy_root,
                                                    subprocess_env, one_thread):
    """The detectron2 SemanticSegmentor configs (here the toy VT-FPN) give label maps at each
    image's own size, the toy class names, and the same labels as the model's own output.

    ``rest-dense infer`` runs in a fresh interpreter, as a user runs it: no toy dataset is
    registered there (this process registered them to train), so the class names must come
    from the metadata :mod:`rest_dense.d2` sets on import."""
    import cv2
    from detectron2.engine import DefaultPredictor

    from rest_dense.d2 import RestDetectionCheckpointer
    from rest_dense.d2.engine import setup_yaml_config

    ckpt = trained("d2_vt_fpn", tmp_path_factory)
    square = val_images(toy_root)[0]
    odd = tmp_path / "odd.png"  # an odd size, not a multiple of 32 (padded, then cropped back)
    cv2.imwrite(str(odd), cv2.resize(cv2.imread(str(val_images(toy_root)[1])), (131, 97)))
    inputs = [square, odd]
    out = tmp_path / "out"
    res = subprocess.run(
        [sys.executable, "-c", "import sys; from rest_dense.cli import main; "
         "sys.exit(main(sys.argv[1:]))", "infer", str(D2_VT_FPN), str(ckpt),
         *map(str, inputs), "--out", str(out), "--quiet"],
        capture_output=True, text=True, cwd=tmp_path, env=subprocess_env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = _check_files(out, 2, ".png")
    assert (summary["framework"], summary["task"]) == ("detectron2", "seg")
    # the toy label maps' names (rest_dense.d2.data metadata), not class_0 .. class_3
    assert summary["classes"] == ["background", "circle", "square", "triangle"]
    assert sorted(i["input"] for i in summary["images"]) == sorted(map(str, inputs))

    cfg = setup_yaml_config(str(D2_VT_FPN), d2_opts({"MODEL.WEIGHTS": ""}))
    predictor = DefaultPredictor(cfg)
    RestDetectionCheckpointer(predictor.model).load(str(ckpt))
    seen = set()
    for item in summary["images"]:
        image = cv2.imread(item["input"])
        labels = read_label_png(item["pred"])
        assert labels.shape == image.shape[:2], (item["input"], labels.shape, image.shape)
        with torch.no_grad():
            ref = predictor(image)["sem_seg"].argmax(0).numpy()
        assert np.array_equal(labels, ref), item["input"]
        assert item["classes_present"] == sorted(np.unique(labels).tolist())
        assert labels.min() >= 0 and labels.max() <= 3
        seen |= set(item["classes_present"])
    assert len(seen) >= 2  # not one constant map


@pytest.mark.slow
def test_infer_detectron2_names_the_classes_of_a_registered_coco_file(tmp_path, capsys, d2_ckpt,
                                                                      toy_root, one_thread):
    """A dataset of one's own registered with register_coco_instances: detectron2 learns
    its class names only when it reads the file; infer reads them from its categories."""
    import uuid

    from detectron2.data.datasets import register_coco_instances

    data = json.loads((toy_root / "annotations" / "instances_val.json").read_text())
    for category in data["categories"]:
        category["name"] = "pet_" + category["name"]
    ann = tmp_path / "mine.json"
    ann.write_text(json.dumps(data))
    name = f"mine_{uuid.uuid4().hex[:8]}"
    register_coco_instances(name, {}, str(ann), str(toy_root / "val"))
    out = tmp_path / "out"
    code, text, err = _infer(capsys, D2_DET, d2_ckpt, val_images(toy_root)[:1], out,
                             "--cfg-options", f"DATASETS.TEST=('{name}',)")
    assert code == 0, err
    expected = [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])]
    assert _summary(out)["classes"] == expected and expected[0].startswith("pet_")


@pytest.mark.slow
def test_infer_bad_input(tmp_path, capsys, det_ckpt, seg_ckpt, d2_ckpt, toy_root, one_thread):
    good = val_images(toy_root)[0]
    broken = tmp_path / "imgs" / "broken.jpg"
    broken.parent.mkdir()
    broken.write_bytes(b"\x89PNG but not really")
    os.symlink(good, broken.parent / "good.png")
    (broken.parent / "notes.txt").write_text("not an image")

    # a folder with an unreadable image: the rest is processed, the file reported; a file
    # that is no image by its suffix is left out, and said to be
    code, text, err = _infer(capsys, MM_DET, det_ckpt, [broken.parent], tmp_path / "o1")
    assert code == 0 and "skipped" in err and "broken.jpg" in err
    # listed once, at the end (not also while running)
    assert sum("broken.jpg" in line for line in err.splitlines()) == 1, err
    assert "note: 1 file of the input folders left out for its suffix" in err and "notes.txt" in err
    summary = _summary(tmp_path / "o1")
    assert len(summary["images"]) == 1 and summary["skipped"][0]["input"].endswith("broken.jpg")
    assert summary["not_images"] == [str(broken.parent / "notes.txt")]
    # nothing could be processed: exit 1, and the summary does not call the run complete
    code, text, err = _infer(capsys, MM_DET, det_ckpt, [broken], tmp_path / "o2")
    assert code == 1 and "no image could be processed" in err
    assert _summary(tmp_path / "o2")["status"] == "nothing processed"

    # a 1x1 and a 1x50 picture: segmented and drawn (mmseg's drawing of a one-pixel map
    # indexed out of range, which ended the whole run)
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    for name, shape in (("one.png", (1, 1, 3)), ("row.png", (1, 50, 3))):
        Image.fromarray(np.full(shape, 120, np.uint8)).save(tiny / name)
    code, text, err = _infer(capsys, MM_SEG, seg_ckpt, [tiny], tmp_path / "o5")
    assert code == 0, err
    summary = _summary(tmp_path / "o5")
    assert summary["status"] == "complete" and len(summary["images"]) == 2
    for item in summary["images"]:
        size = Image.open(item["input"]).size
        assert Image.open(item["pred"]).size == size and Image.open(item["vis"]).size == size

    cases = [
        ((MM_DET, tmp_path / "missing.pth", [good]), "checkpoint .*missing.pth.* does not exist"),
        ((MM_DET, det_ckpt, [tmp_path / "nope.png"]), "nope.png.* does not exist"),
        ((MM_DET, seg_ckpt, [good]), "is not a checkpoint of the model"),
        ((tmp_path / "other.py", det_ckpt, [good]), "other.py fits no framework"),
    ]
    (tmp_path / "other.py").write_text("answer = 42\n")
    for (config, ckpt, inputs), pattern in cases:
        code, text, err = _infer(capsys, config, ckpt, inputs, tmp_path / "o3")
        assert code == 2 and re.search(pattern, err), (pattern, err)
        assert not (tmp_path / "o3").exists()  # no empty results folder left behind
        assert "unexpected key" not in text  # mmengine's key dump is not shown first

    # a config that does not build, a folder for a checkpoint, a bare backbone, a detectron2
    # pickle that is no checkpoint: one line each (they gave tracebacks)
    import pickle as pkl

    bare = tmp_path / "bare.pth"
    sd = torch.load(det_ckpt, map_location="cpu", weights_only=False)["state_dict"]
    torch.save({k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}, bare)
    (tmp_path / "dict.pkl").write_bytes(pkl.dumps({"a": 1, "b": [1, 2]}))
    torch.save({"state_dict": sd, "meta": None}, tmp_path / "meta_none.pth")
    cases = [
        # a checkpoint problem met while the framework builds: the checkpoint's, not the config's
        ((MM_DET, tmp_path / "meta_none.pth", [good]), "its 'meta' entry is NoneType, not a dict"),
        ((MM_DET, det_ckpt, [good], "--cfg-options", "model.nonexistent_key=1"),
         "the config does not build: .*nonexistent_key"),
        ((D2_DET, d2_ckpt, [good], "--cfg-options", "MODEL.NOPE=1"),
         "the config does not build: Non-existent key: MODEL.NOPE"),
        ((MM_DET, tmp_path, [good]), "is a directory, not a file"),
        ((MM_DET, bare, [good]), "it holds the config's backbone, but not under 'backbone.'"),
        ((D2_DET, tmp_path / "dict.pkl", [good]), r"holds no arrays \(entries: a, b\)"),
    ]
    for (config, ckpt, inputs, *extra), pattern in cases:
        code, text, err = _infer(capsys, config, ckpt, inputs, tmp_path / "o6", *extra)
        err = without_logging_errors(err)
        assert code == 2 and re.search(pattern, err), (pattern, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err

    # another variant of the same model: the message names both backbones
    wide = untrained_checkpoint(tmp_path / "wide.pth", MM_DET, {
        "model.backbone.arch.embed_dims": (48, 96, 192, 384),
        "model.neck.in_channels": [48, 96, 192, 384]})
    code, text, err = _infer(capsys, MM_DET, wide, [good], tmp_path / "o4")
    assert code == 2 and "other shapes" in err and "embed_dims (48, 96, 192, 384)" in err


def test_tools_are_thin_wrappers_that_import_no_framework():
    for tool, sub in (("infer.py", "infer"), ("export_model.py", "export-model")):
        text = (REPO / "tools" / tool).read_text()
        assert "sys.path" not in text and f'main(["{sub}", *sys.argv[1:]])' in text
    # the tool's --help runs without importing any framework (heavy imports live in run())
    code = ("import runpy, sys, rest_dense.deploy, rest_dense.commands.infer\n"
            "sys.argv = ['tools/export_model.py', '--help']\n"
            "try:\n    runpy.run_path('tools/export_model.py', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\n"
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'mmdet', 'mmseg', 'mmengine', "
            "'mmcv', 'mmdeploy', 'detectron2', 'onnx', 'onnxruntime'})\n"
            "assert not bad, bad\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert "rest-dense export-model" in res.stdout and "--check-shapes" in res.stdout


@pytest.mark.slow
def test_infer_one_image_that_cannot_be_written_stops_no_run(tmp_path, capsys, det_ckpt, toy_root,
                                                          monkeypatch, one_thread):
    """A long file name (its outputs' names are shortened) and a picture the writer refuses:
    that image is listed as failed, with no file of it left, and the others are done."""
    import cv2

    good = val_images(toy_root)[:2]
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    long_name = imgs / ("a" * 251 + ".png")
    long_name.write_bytes(good[0].read_bytes())
    (imgs / "refused.png").write_bytes(good[0].read_bytes())
    (imgs / "fine.png").write_bytes(good[1].read_bytes())
    real = cv2.imwrite
    monkeypatch.setattr(cv2, "imwrite", lambda path, img, *a: False if "refused" in path
                        else real(path, img, *a))
    code, text, err = _infer(capsys, MM_DET, det_ckpt, [imgs], tmp_path / "out")
    summary = _summary(tmp_path / "out")
    assert code == 1 and summary["status"] == "errors", err
    assert [f["input"] for f in summary["failed"]] == [str(imgs / "refused.png")]
    assert "writing its outputs failed: could not write" in summary["failed"][0]["error"]
    done = sorted(os.path.basename(i["input"]) for i in summary["images"])
    assert done == sorted([long_name.name, "fine.png"])
    for item in summary["images"]:
        assert os.path.getsize(item["pred"]) > 0 and os.path.getsize(item["vis"]) > 1000
    left = [p for sub in ("preds", "vis") for p in os.listdir(tmp_path / "out" / sub)]
    assert not [p for p in left if p.startswith("refused")], left


@pytest.mark.slow
def test_infer_image_too_thin_for_the_resize_is_named(tmp_path, capsys, det_ckpt, toy_root,
                                                     one_thread):
    """A 1x300 image: the keep-ratio resize of the test pipeline scales its short side to 0
    pixels, and OpenCV's assertion alone named neither the size nor the cause."""
    import cv2

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    cv2.imwrite(str(imgs / "thin.png"), np.full((1, 300, 3), 128, np.uint8))
    (imgs / "fine.png").write_bytes(val_images(toy_root)[0].read_bytes())
    code, text, err = _infer(capsys, MM_DET, det_ckpt, [imgs], tmp_path / "out")
    summary = _summary(tmp_path / "out")
    assert code == 1 and summary["status"] == "errors", err
    assert [os.path.basename(f["input"]) for f in summary["failed"]] == ["thin.png"]
    assert "the 1x300 (height x width) image is too thin for the test pipeline" in \
        summary["failed"][0]["error"]
    assert summary["failed"][0]["cause"] == "image"
    assert [os.path.basename(i["input"]) for i in summary["images"]] == ["fine.png"]
    # only thin images: image problems, not "the config or checkpoint", and no "others"
    code, text, err = _infer(capsys, MM_DET, det_ckpt, [imgs / "thin.png"], tmp_path / "out2")
    assert code == 1 and "no image could be processed" in err, err
    assert "config or checkpoint" not in err and "the others' results" not in err
