"""The synthetic toy-shapes dataset and the end-to-end demo (``rest-dense demo``,
:mod:`rest_dense.demo`) built on it."""
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rest_dense.cli import main as cli
from rest_dense.data.rle import coco_rle_to_mask, mask_to_coco_rle
from rest_dense.data.toy import (TOY_CLASSES, generate_toy_dataset, make_scene, mask_to_bbox, scene_rng,
                                 toy_dataset_ready)
from rest_dense.demo import DemoOptions


# ------------------------------------------------------------------ generator

def test_scene_is_deterministic_and_consistent():
    a = make_scene(scene_rng(0, "train", 7), size=96)
    b = make_scene(scene_rng(0, "train", 7), size=96)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.masks, b.masks)
    np.testing.assert_array_equal(a.labels, b.labels)
    c = make_scene(scene_rng(0, "val", 7), size=96)
    assert not np.array_equal(a.image, c.image)

    assert a.image.shape == (96, 96, 3) and a.image.dtype == np.uint8
    assert a.masks.shape[1:] == (96, 96) and len(a.masks) == len(a.labels) >= 1
    assert a.masks.sum(axis=0).max() <= 1  # visible masks are disjoint
    seg = a.semantic_map()
    assert seg.dtype == np.uint8
    np.testing.assert_array_equal(seg > 0, a.masks.any(axis=0))
    for mask, label in zip(a.masks, a.labels):
        assert (seg[mask] == label + 1).all()


def test_rle_roundtrip():
    """The annotations' RLE (tested against pycocotools in tests/data/test_rle.py) and boxes."""
    rng = np.random.default_rng(0)
    cases = [rng.random((13, 17)) > 0.5, np.zeros((5, 4), bool), np.ones((5, 4), bool)]
    edge = np.zeros((6, 7), bool)
    edge[0, 0] = edge[-1, -1] = True
    cases.append(edge)
    for mask in cases:
        rle = mask_to_coco_rle(mask)
        assert rle["size"] == list(mask.shape) and coco_rle_to_mask(rle).size == mask.size
        np.testing.assert_array_equal(coco_rle_to_mask(rle), mask)
    assert mask_to_bbox(edge) == [0.0, 0.0, 7.0, 6.0]


@pytest.fixture(scope="module")
def toy_root(make_toy_root):
    return make_toy_root(num_train=12, num_val=5, size=80, seed=3)


def test_dataset_files_and_determinism(toy_root, tmp_path):
    assert toy_dataset_ready(toy_root, num_train=12, num_val=5, size=80, seed=3)
    assert not toy_dataset_ready(toy_root, num_train=12, num_val=5, size=80, seed=4)
    for split, ade, n in (("train", "training", 12), ("val", "validation", 5)):
        for d in (f"{split}", f"images/{ade}", f"annotations/{ade}"):
            assert len(os.listdir(toy_root / d)) == n
    # a matching dataset is left alone
    stamp = (toy_root / "annotations/instances_val.json").stat().st_mtime_ns
    generate_toy_dataset(toy_root, num_train=12, num_val=5, size=80, seed=3)
    assert (toy_root / "annotations/instances_val.json").stat().st_mtime_ns == stamp
    # same parameters elsewhere -> byte-identical files
    other = tmp_path / "again"
    generate_toy_dataset(other, num_train=12, num_val=5, size=80, seed=3)
    for rel in ("annotations/instances_train.json", "annotations/instances_val.json",
                "train/toy_00004.png", "images/validation/toy_00002.png",
                "annotations/validation/toy_00002.png"):
        assert (toy_root / rel).read_bytes() == (other / rel).read_bytes(), rel


def test_smaller_dataset_over_a_larger_one_leaves_no_stale_scenes(tmp_path):
    """Regenerating with fewer scenes (or another size) into the same root: the folders
    hold exactly the new scenes (mmseg lists the image folder: stale, larger images would
    join the validation set or break batching); files of other names are the user's."""
    root = tmp_path / "toy"
    generate_toy_dataset(root, num_train=6, num_val=4, size=48)
    (root / "images/validation/notes.txt").write_text("mine")
    generate_toy_dataset(root, num_train=3, num_val=2, size=32)
    for split, ade, n in (("train", "training", 3), ("val", "validation", 2)):
        for d in (f"{split}", f"images/{ade}", f"annotations/{ade}"):
            scenes = sorted(p for p in os.listdir(root / d) if p.endswith(".png"))
            assert scenes == [f"toy_{i:05d}.png" for i in range(n)], d
            assert all(Image.open(root / d / p).size == (32, 32) for p in scenes)
    assert (root / "images/validation/notes.txt").read_text() == "mine"
    assert toy_dataset_ready(root, num_train=3, num_val=2, size=32)


def test_coco_annotations_valid(toy_root):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    for split, ade in (("train", "training"), ("val", "validation")):
        coco = COCO(str(toy_root / f"annotations/instances_{split}.json"))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(TOY_CLASSES)
        assert len(coco.getAnnIds()) >= len(coco.getImgIds())
        for img_id in coco.getImgIds():
            info = coco.loadImgs(img_id)[0]
            img = np.asarray(Image.open(toy_root / split / info["file_name"]))
            assert img.shape == (info["height"], info["width"], 3)
            same = np.asarray(Image.open(toy_root / "images" / ade / info["file_name"]))
            np.testing.assert_array_equal(img, same)
            label_map = np.asarray(Image.open(toy_root / "annotations" / ade / info["file_name"]))
            assert label_map.shape == img.shape[:2] and label_map.dtype == np.uint8

            expected = np.zeros_like(label_map)
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=img_id)):
                mask = coco.annToMask(ann).astype(bool)  # pycocotools decodes our RLE
                np.testing.assert_array_equal(mask, coco_rle_to_mask(ann["segmentation"]))
                assert ann["area"] == mask.sum() > 0 and ann["iscrowd"] == 0
                assert ann["bbox"] == mask_to_bbox(mask)
                assert ann["segmentation"]["size"] == [info["height"], info["width"]]
                np.testing.assert_allclose(mask_utils.toBbox(ann["segmentation"]), ann["bbox"])
                assert (expected[mask] == 0).all()  # disjoint
                expected[mask] = ann["category_id"]
            np.testing.assert_array_equal(label_map, expected)


# ------------------------------------------------------------------ end to end

def test_demo_options_are_checked(capsys):
    with pytest.raises(ValueError, match="task"):
        DemoOptions(task="detection").validate()
    with pytest.raises(ValueError, match="max_iters"):
        DemoOptions(max_iters=-1).validate()
    with pytest.raises(ValueError, match="'model.decode_head.channels' is not KEY=VALUE"):
        DemoOptions(cfg_options=["model.decode_head.channels"]).validate()
    assert cli(["demo", "--size", "8"]) == 2
    assert "size 8 is too small" in capsys.readouterr().err
    assert cli(["demo", "--size", "64x96"]) == 2
    assert "square" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_short_run_from_any_directory(tmp_path, monkeypatch, one_thread, capsys):
    """Both toy jobs, two iterations each, started outside the repository with the default
    data root (``data/toy`` under the working directory)."""
    monkeypatch.chdir(tmp_path)
    assert cli(["demo", "--task", "all", "--max-iters", "2", "--num-train", "8", "--num-val", "4",
                "--size", "64x64", "--num-vis", "1", "--threads", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "=== toy det" in out and "=== toy seg" in out and "[demo] done" in out
    # --quiet: pycocotools' own printing stays out too
    assert "Average Precision" not in out and "loading annotations" not in out, out
    assert toy_dataset_ready(tmp_path / "data" / "toy", num_train=8, num_val=4, size=64)
    for folder, keys in (("mask_rcnn", ("coco/bbox_mAP", "coco/segm_mAP")),
                         ("upernet", ("mIoU", "aAcc"))):
        summary = json.loads((tmp_path / "work_dirs" / "toy_demo" / folder / "metrics.json").read_text())
        assert summary["max_iters"] == 2
        for stage in ("untrained", "trained"):
            for key in keys:
                assert math.isfinite(summary[stage][key]), (folder, stage, key, summary[stage])
        assert Path(summary["checkpoint"]).is_file() and Path(summary["picture"]).is_file()


@pytest.mark.slow
def test_toy_segmentation_training_learns(tmp_path, one_thread):
    """A short UperNet run must clearly beat the untrained model (and the all-background guess)."""
    work = tmp_path / "work"
    assert cli(["demo", "--task", "seg", "--data-root", str(tmp_path / "toy"), "--work-dir", str(work),
                "--num-train", "64", "--num-val", "16", "--size", "64", "--max-iters", "60",
                "--log-interval", "20", "--num-vis", "2", "--quiet"]) == 0
    summary = json.loads((work / "upernet" / "metrics.json").read_text())
    untrained, trained = summary["untrained"]["mIoU"], summary["trained"]["mIoU"]
    # mmseg reports percent; predicting "background" everywhere scores about 22
    assert trained > max(untrained + 15.0, 35.0), (untrained, trained)
    assert Path(summary["picture"]).is_file()
    assert Image.open(summary["picture"]).size[0] > 64 * 3


@pytest.mark.slow
def test_toy_detection_training_learns(tmp_path, one_thread):
    """The default job (Mask R-CNN) in miniature: train, COCO-evaluate in memory, draw."""
    from rest_dense.demo import run_demo

    summary, = run_demo(DemoOptions(data_root=str(tmp_path / "toy"), work_dir=str(tmp_path / "work"),
                                    num_train=64, num_val=16, size=64, max_iters=80, num_vis=2,
                                    quiet=True))
    assert summary == json.loads((tmp_path / "work" / "mask_rcnn" / "metrics.json").read_text())
    untrained, trained = summary["untrained"], summary["trained"]
    for key in ("coco/bbox_mAP_50", "coco/segm_mAP_50"):
        # measured: 0.0 untrained, ~0.35 after 60 iterations, ~0.55 after 100
        assert trained[key] > max(untrained[key] + 0.15, 0.2), (key, untrained[key], trained[key])
    assert Path(summary["picture"]).is_file()
    assert Path(summary["checkpoint"]).is_file()


def test_generator_writes_only_into_its_own_folders(tmp_path):
    """A folder holding someone else's files is refused (its annotations would be
    overwritten); an empty one, a finished toy dataset and an interrupted generation (its
    mark left behind) are written."""
    from rest_dense.data.toy import generate_toy_dataset, toy_root_problem

    theirs = tmp_path / "theirs"
    (theirs / "annotations").mkdir(parents=True)
    (theirs / "annotations" / "instances_train.json").write_text("{}")
    with pytest.raises(ValueError, match="not a toy dataset"):
        generate_toy_dataset(theirs, num_train=2, num_val=1, size=32)
    assert (theirs / "annotations" / "instances_train.json").read_text() == "{}"
    (tmp_path / "afile").write_text("x")
    assert "is a file" in toy_root_problem(tmp_path / "afile")
    ours = tmp_path / "ours"
    generate_toy_dataset(ours, num_train=2, num_val=1, size=32)
    assert toy_root_problem(ours) is None and not (ours / ".toy-generating").exists()
    (ours / "toy_meta.json").unlink()  # as if killed mid-way: the mark says whose it is
    (ours / ".toy-generating").touch()
    generate_toy_dataset(ours, num_train=3, num_val=1, size=32)
    assert (ours / "toy_meta.json").is_file() and not (ours / ".toy-generating").exists()


def test_demo_refuses_a_foreign_data_folder(tmp_path, capsys):
    from rest_dense.cli import main

    data = tmp_path / "mydata"
    (data / "train").mkdir(parents=True)
    (data / "train" / "holiday.png").write_bytes(b"not ours")
    code = main(["demo", "--data-root", str(data), "--work-dir", str(tmp_path / "w"),
                 "--max-iters", "0", "--num-train", "4", "--num-val", "2", "--no-baseline"])
    assert code == 2 and "not a toy dataset" in capsys.readouterr().err
    assert (data / "train" / "holiday.png").read_bytes() == b"not ours"


def test_work_dir_and_hidden_files_inside_the_data_folder_are_not_foreign(tmp_path):
    from rest_dense.data.toy import toy_root_problem

    root = tmp_path / "toy"
    (root / "runs" / "demo").mkdir(parents=True)
    (root / ".gitkeep").write_text("")
    assert toy_root_problem(root, besides=[root / "runs" / "demo"]) is None
    assert "runs" in toy_root_problem(root)
