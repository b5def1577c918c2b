"""Hostile inputs for the conversion and export tools (``rest-dense convert`` / ``export``).

One parametrised case per row. Every case runs the real command through
``rest_dense.cli.main`` and checks that it fails with a non-zero exit status, an error on
stderr that names the problem, no traceback, and no output file (nor a hidden temporary one)
left behind. Nothing here exports or compiles: every refusal comes before that work.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import pytest
import torch

from rest_dense.cli import main
from rest_dense.models import create_model

from conftest import fixture_path


# --------------------------------------------------------------------------- helpers
def _run(argv: Sequence[str], capsys) -> tuple:
    """``main(argv)`` -> (exit status, stdout, stderr); argparse's exit counts as a status."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse: usage errors exit with status 2
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def _assert_refused(rc, err: str, expect: Sequence[str], status=None) -> None:
    assert rc not in (0, None), f"accepted; stderr: {err}"
    if status is not None:
        assert rc == status, err
    assert "Traceback" not in err and 'File "' not in err, err
    assert "error:" in err, err
    # commands.fail's one form, which argparse's refusals share
    assert re.search(r"^rest-dense [a-z-]+: error: ", err, re.MULTILINE), err
    for text in expect:
        assert text in err, f"{text!r} not in: {err}"


def _fill(argv: Sequence[str], names: Dict[str, str]) -> List[str]:
    """Replace ``{name}`` placeholders (file names, ``{d}``, ``{out}``) in ``argv``."""
    out = []
    for a in argv:
        for k, v in names.items():
            a = a.replace("{" + k + "}", v)
        assert "{" not in a, a
        out.append(a)
    return out


def _hidden(folder: Path) -> List[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Dict[str, Path]:
    """Every source file the cases use, written once: a good restv1_lite checkpoint and its
    hostile relatives."""
    d = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    sd = create_model("restv1_lite").state_dict()
    paths = {name: d / name for name in (
        "good.pth", "empty.pth", "text.pth", "config.json.pth", "truncated.pth",
        "weights.pth", "resnet.pth", "shallow.pth", "pickled.pth", "nan.pth", "folder")}
    torch.save({"model": sd}, paths["good.pth"])
    paths["empty.pth"].write_bytes(b"")
    paths["text.pth"].write_text("restv1_lite weights: see the release page\n")
    paths["config.json.pth"].write_text(json.dumps({"model": {"stem.conv1.weight": [0.1]}}))
    data = paths["good.pth"].read_bytes()
    paths["truncated.pth"].write_bytes(data[: len(data) // 2])
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(paths["weights.pth"]))
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)},
               paths["resnet.pth"])
    # stage 3 with 1 block: a ResTv1 that no registered variant has
    torch.save({k: v for k, v in sd.items() if not k.startswith("stage3.1.")}, paths["shallow.pth"])
    torch.save({"model": sd, "args": argparse.Namespace(lr=1e-4)}, paths["pickled.pth"])
    bad = dict(sd)
    bad["stage2.1.attn.q.weight"] = bad["stage2.1.attn.q.weight"].clone()
    bad["stage2.1.attn.q.weight"][3, 5] = float("nan")
    torch.save(bad, paths["nan.pth"])
    paths["folder"].mkdir()
    return paths


# --------------------------------------------------------------------------- convert
# (id, argv with {name} placeholders for files / {out}, texts the error must contain)
CONVERT_CASES = [
    ("missing-source", ["{d}/nowhere.pth", "{out}", "--to", "core"],
     ["nowhere.pth", "does not exist"]),
    ("source-is-folder", ["{folder}", "{out}", "--to", "core"], ["is a directory"]),
    ("empty-file", ["{empty.pth}", "{out}", "--to", "mmdet"], ["empty.pth", "empty file"]),
    ("text-file", ["{text.pth}", "{out}", "--to", "mmdet"], ["text file", "restv1_lite weights"]),
    ("json-file", ["{config.json.pth}", "{out}", "--to", "d2"], ["JSON file"]),
    ("truncated-checkpoint", ["{truncated.pth}", "{out}", "--to", "core"], ["truncated"]),
    ("safetensors-named-pth", ["{weights.pth}", "{out}", "--to", "core"],
     ["safetensors", "rename"]),
    ("not-a-rest-checkpoint", ["{resnet.pth}", "{out}", "--to", "core"],
     ["not a ResT backbone", "conv1.weight"]),
    ("unregistered-variant", ["{shallow.pth}", "{out}", "--to", "core"],
     ["no registered variant", "restv1_lite"]),
    ("pickled-objects", ["{pickled.pth}", "{out}", "--to", "core"],
     ["argparse.Namespace", "--unsafe-load"]),
    ("unknown-layout", ["{good.pth}", "{out}", "--to", "caffe2"],
     ["--to", "invalid choice", "caffe2"]),
    ("unknown-model-name", ["{good.pth}", "{out}", "--to", "core", "--model", "restv3_tiny"],
     ["unknown model", "restv3_tiny"]),
    ("another-variant-named", ["{good.pth}", "{out}", "--to", "core", "--model", "restv1_base"],
     ["restv1_lite", "restv1_base", "not written"]),
    ("destination-is-folder", ["{good.pth}", "{folder}", "--to", "core"], ["is a folder"]),
    ("destination-folder-is-file", ["{good.pth}", "{text.pth}/out.pth", "--to", "core"],
     ["is a file"]),
    ("destination-is-source", ["{good.pth}", "{good.pth}", "--to", "core"], ["same file"]),
    ("destination-is-source-other-path", ["{good.pth}", "{d}/../{dname}/good.pth", "--to", "core"],
     ["same file"]),
    ("destination-is-link-to-source", ["{good.pth}", "{d}/link.pth", "--to", "core"],
     ["same file"]),
    ("nan-in-checkpoint", ["{nan.pth}", "{out}", "--to", "mmseg"],
     ["NaN", "stage2.1.attn.q.weight", "not written"]),
]


@pytest.mark.parametrize("argv,expect", [c[1:] for c in CONVERT_CASES],
                         ids=[c[0] for c in CONVERT_CASES])
def test_convert_refuses(files, argv, expect, capsys, tmp_path):
    d = files["good.pth"].parent
    link = d / "link.pth"
    if not link.exists():
        os.link(files["good.pth"], link)  # a hard link: another name, the same file
    names = {k: str(v) for k, v in files.items()}
    names.update(d=str(d), dname=d.name, out=str(tmp_path / "out.pth"))
    before = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    t0 = time.perf_counter()
    rc, out, err = _run(["convert", *_fill(argv, names)], capsys)
    _assert_refused(rc, err, expect)
    assert time.perf_counter() - t0 < 30
    assert "sha256" not in out
    assert os.listdir(tmp_path) == [] and not _hidden(d)  # nothing written anywhere
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir()} == before  # sources untouched


def test_convert_library_errors_are_typed(files, tmp_path):
    """The library raises typed errors the CLI turns into messages."""
    from rest_dense.convert import convert_checkpoint
    from rest_dense.models import CheckpointFormatError, CheckpointValueError

    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_checkpoint(tmp_path / "nowhere.pth", tmp_path / "x.pth")
    with pytest.raises(CheckpointFormatError, match="empty"):
        convert_checkpoint(files["empty.pth"], tmp_path / "x.pth")
    with pytest.raises(CheckpointValueError, match="NaN"):
        convert_checkpoint(files["nan.pth"], tmp_path / "x.pth")
    with pytest.raises(ValueError, match="which is a file"):
        convert_checkpoint(files["good.pth"], files["text.pth"] / "sub" / "x.pth")
    with pytest.raises(ValueError, match="is a folder"):
        convert_checkpoint(files["good.pth"], tmp_path)
    assert os.listdir(tmp_path) == []


def test_outputs_never_overwrite_the_configs_they_read(tmp_path, capsys):
    """flops / bench --markdown and --plot, export-model --out and --save-metrics refuse the
    files the command reads: the config, the files it builds on (_base_), check images,
    a dataset's annotations."""
    import shutil

    from rest_dense.commands.train import check_replaces_metrics
    from rest_dense.configs import configs_root

    cfgs = tmp_path / "cfgs"
    shutil.copytree(configs_root() / "toy", cfgs / "toy")
    shutil.copytree(configs_root() / "_base_", cfgs / "_base_")
    config, base = cfgs / "toy" / "retinanet_restv2_toy.py", cfgs / "toy" / "mask_rcnn_restv2_toy.py"
    before = {p: p.read_bytes() for p in (config, base)}
    for argv in (["flops", config, "--params-only", "--markdown", base],
                 ["flops", config, "--params-only", "--markdown", config],
                 ["bench", "--configs", config, "--shape", "32x32", "--markdown", base],
                 ["bench", "--configs", config, "--shape", "32x32", "--plot", tmp_path / "p.txt"],
                 ["bench", "restv2_tiny", "--plot", tmp_path / "p.png", "--markdown",
                  tmp_path / "p.png"],
                 ["flops", config, "--params-only", "--markdown", ""]):
        rc, out, err = _run([str(a) for a in argv] + ["--no-progress"], capsys)
        assert rc == 2 and err.count("\n") == 1 and "error:" in err, (argv, err)
        assert "Traceback" not in err
    assert {p: p.read_bytes() for p in (config, base)} == before
    ann = tmp_path / "instances_val.json"
    ann.write_text('{"images": [], "annotations": [], "categories": []}')
    with pytest.raises(ValueError, match="holds no metrics"):
        check_replaces_metrics(str(ann))
    classes = tmp_path / "classes.json"
    classes.write_text('{"0": "circle", "1": "square"}')
    with pytest.raises(ValueError, match="holds no metrics"):
        check_replaces_metrics(str(classes))
    metrics = tmp_path / "m.json"
    metrics.write_text('{"coco/bbox_mAP": 0.5, "coco/segm_mAP": null, '
                       '"coco/bbox_mAP_copypaste": "0.5 0.7"}')
    check_replaces_metrics(str(metrics))  # a previous run's metrics: replaced


def test_runs_never_overwrite_a_file_the_config_builds_on(tmp_path, monkeypatch):
    """train / test write the config as run into the work dir: refused when that is the
    config or a file of its _base_ / _BASE_ chain (also a `~` base of detectron2)."""
    from rest_dense.commands.train import check_config_not_overwritten
    from rest_dense.configs import config_files, configs_root

    (tmp_path / "c4").mkdir()
    (tmp_path / "c5").mkdir()
    base = tmp_path / "c4" / "retinanet_restv2_toy.py"
    base.write_text(f"_base_ = {str(configs_root() / 'toy' / 'retinanet_restv2_toy.py')!r}\n")
    config = tmp_path / "c5" / "retinanet_restv2_toy.py"
    config.write_text("_base_ = '../c4/retinanet_restv2_toy.py'\n")
    with pytest.raises(ValueError, match="holds the config file .*c4"):
        check_config_not_overwritten(str(config), str(tmp_path / "c4"), base.name)
    check_config_not_overwritten(str(config), str(tmp_path / "other"), base.name)
    with pytest.raises(ValueError, match="holds the config file .*c4"):  # test: bases still
        check_config_not_overwritten(str(config), str(tmp_path / "c4"), base.name,
                                     bases_only=True)
    # test of the config a run saved into its own folder (mmdet's tools/test.py habit): fine
    check_config_not_overwritten(str(config), str(tmp_path / "c5"), config.name, bases_only=True)
    with pytest.raises(ValueError, match="holds the config file"):  # train: refused
        check_config_not_overwritten(str(config), str(tmp_path / "c5"), config.name)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "hb.yaml").write_text("MODEL:\n  DEVICE: cpu\n")
    (tmp_path / "c5" / "c.yaml").write_text("_BASE_: ~/hb.yaml\nSOLVER:\n  MAX_ITER: 1\n")
    assert str(tmp_path / "hb.yaml") in config_files(str(tmp_path / "c5" / "c.yaml"))


def test_export_out_and_program_through_a_link(files, tmp_path, capsys):
    (tmp_path / "p.pt2").symlink_to(tmp_path / "e.onnx")
    rc, out, err = _run(["export", "restv1_lite", "--static", "--shape", "64x64", "--out",
                         str(tmp_path / "e.onnx"), "--program", str(tmp_path / "p.pt2")], capsys)
    assert rc != 0 and "name the same file" in err and "exported" not in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.pt2"]


def test_convert_creates_missing_folders(files, tmp_path, capsys):
    """The one output rule (utils.check_output_path): missing folders are created when the
    file is written, as by flops --markdown, bench, export-model and --save-metrics."""
    dst = tmp_path / "no" / "such" / "dir" / "out.pth"
    rc, out, err = _run(["convert", str(files["good.pth"]), str(dst), "--to", "core"], capsys)
    assert rc == 0, err
    assert dst.is_file() and dst.stat().st_size > 0
    assert sorted(p.name for p in dst.parent.iterdir()) == ["out.pth"]  # no temporaries


# --------------------------------------------------------------------------- export
# (id, argv after `export`, texts the error must contain, exit status)
EXPORT_CASES = [
    ("unknown-model", ["restv9_tiny"], ["restv9_tiny", "neither a registered model"], 1),
    ("shape-no-width", ["restv2_tiny", "--shape", "800x"], ["--shape", "800x", "HxW"], 2),
    ("shape-letters", ["restv2_tiny", "--shape", "axb"], ["--shape", "axb", "HxW"], 2),
    ("shape-zero", ["restv2_tiny", "--shape", "0x10"], ["--shape", "0x10", "positive"], 2),
    ("shape-negative", ["restv2_tiny", "--shape=-1x5"], ["--shape", "-1x5", "HxW"], 2),
    # a single side is S x S (as everywhere); 800x800 is no valid trace size for a dynamic graph
    ("shape-single-side", ["restv2_tiny", "--shape", "800"],
     ["traced at 800x800", "multiple of sr_ratio", "257x385"], 1),
    ("check-shape-by", ["restv2_tiny", "--check-shapes", "320by480"], ["320by480", "HxW"], 2),
    ("check-size-below-window-limit", ["restv2_tiny", "--attn-mode", "win", "--check-shapes",
                                       "320x480", "128x200"], ["128x200", "below 253"], 2),
    ("unknown-attn-mode", ["restv2_tiny", "--attn-mode", "swin"], ["invalid choice", "swin"], 2),
    ("window-mode-for-restv1", ["restv1_lite", "--attn-mode", "win"], ["attn_mode", "win"], 1),
    ("checkpoint-of-another-variant", ["restv1_small", "--checkpoint", "{good.pth}"],
     ["restv1_lite", "restv1_small"], 1),
    ("missing-checkpoint", ["restv2_tiny", "--checkpoint", "{d}/nowhere.pth"],
     ["nowhere.pth", "does not exist"], 1),
    ("checkpoint-is-text", ["{text.pth}"], ["text file"], 1),
    ("window-not-multiple-of-sr", ["restv2_tiny", "--attn-mode", "win", "--window-size", "12"],
     ["window_size[0]=12", "sr_ratio 8"], 1),
    ("window-size-count", ["restv2_tiny", "--window-size", "8", "8"], ["1 or 4 values"], 2),
    ("batch-zero", ["restv2_tiny", "--batch", "0"], ["--batch"], 2),
    ("atol-nan", ["restv2_tiny", "--atol", "nan"], ["--atol"], 2),
    ("opset-unsupported", ["restv2_tiny", "--opset", "99"], ["--opset 99"], 2),
    ("opset-before-attention", ["restv2_tiny", "--opset", "13"],
     ["--opset 13", "choose 14..", "from opset 14"], 2),
    ("static-without-shape", ["restv2_tiny", "--static"], ["--static needs --shape"], 2),
    ("out-below-a-file", ["restv2_tiny", "--out", "{text.pth}/sub/m.onnx"],
     ["--out", "which is a file"], 1),
    ("out-is-a-folder", ["restv2_tiny", "--out", "{d}"], ["--out", "is a folder", "backbone.onnx"], 1),
    # the output must not overwrite what the command reads
    ("out-is-the-checkpoint", ["restv2_tiny", "--checkpoint", "{good.pth}", "--out",
                               "{good.pth}"], ["same file", "good.pth"], 1),
    ("out-is-the-model-file", ["{good.pth}", "--out", "{good.pth}"], ["same file"], 1),
    ("program-is-the-checkpoint", ["restv2_tiny", "--checkpoint", "{good.pth}", "--static",
                                   "--shape", "64x64", "--program", "{good.pth}"],
     ["same file"], 1),
    ("unknown-compile-backend", ["restv2_tiny", "--no-onnx", "--compile", "tensorrtx"],
     ["unknown torch.compile backend", "tensorrtx", "inductor"], 2),
    ("dynamic-compile-window-mode", ["restv2_tiny", "--attn-mode", "hwin", "--no-onnx",
                                     "--compile", "aot_eager", "--dynamic"],
     ["dynamic=False", "attn_mode='global'", "ONNX"], 2),
    ("dynamic-program-window-mode", ["restv2_tiny", "--attn-mode", "cwin", "--no-onnx",
                                     "--program", "{out}.pt2"], ["--static", "ONNX"], 2),
]


@pytest.mark.parametrize("argv,expect,status", [c[1:] for c in EXPORT_CASES],
                         ids=[c[0] for c in EXPORT_CASES])
def test_export_refuses(files, argv, expect, status, capsys, tmp_path, one_thread):
    names = {k: str(v) for k, v in files.items()}
    names.update(d=str(files["good.pth"].parent), out=str(tmp_path / "m"))
    argv = _fill(argv, names)
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "m.onnx")]
    t0 = time.perf_counter()
    rc, out, err = _run(["export", *argv], capsys)
    _assert_refused(rc, err, expect, status)
    assert time.perf_counter() - t0 < 30  # refused before exporting or compiling
    assert "exported" not in out and os.listdir(tmp_path) == []


def test_export_bad_checkpoint_names_both_variants(files):
    """The library path of the 'checkpoint of another variant' case."""
    from rest_dense.deploy.backbone_onnx import build_model
    from rest_dense.models import CheckpointMismatchError

    with pytest.raises(CheckpointMismatchError,
                       match="restv1_lite.*restv1_small|restv1_small.*restv1_lite"):
        build_model("restv1_small", checkpoint=str(files["good.pth"]))


# --------------------------------------------------------------------------- numbers (issue 17)
TOY_DET = "toy/mask_rcnn_restv2_toy.py"
TOY_D2 = "detectron2/toy/mask_rcnn_restv2_toy.yaml"

# (id, argv, words the error must hold): refused before any model is built
NUMBER_CASES = [
    ("train-max-iters-float", ["train", TOY_DET, "train_cfg.max_iters=2.5"],
     ["train_cfg.max_iters", "whole number", "2.5"]),
    ("train-max-iters-bool", ["train", TOY_DET, "train_cfg.max_iters=true"],
     ["train_cfg.max_iters", "whole number"]),
    ("train-max-iters-zero", ["train", TOY_DET, "train_cfg.max_iters=0"],
     ["train_cfg.max_iters", "at least 1"]),
    ("train-max-iters-text", ["train", TOY_DET, "--cfg-options", "train_cfg.max_iters=many"],
     ["train_cfg.max_iters", "whole number"]),
    ("train-val-interval-float", ["train", TOY_DET, "train_cfg.val_interval=1.5"],
     ["train_cfg.val_interval", "whole number"]),
    ("train-max-epochs-float", ["train", "mask_rcnn/mask-rcnn_restv2-t_fpn_amp-ms-1x_coco.py",
                                "train_cfg.max_epochs=2.5"], ["train_cfg.max_epochs", "2.5"]),
    ("train-cfg-option-malformed", ["train", TOY_DET, "--cfg-options", "model.x=[1,2"],
     ["model.x=[1,2", "unbalanced brackets"]),
    ("train-threads-zero", ["train", TOY_DET, "--threads", "0"], ["--threads", "at least 1"]),
    ("train-threads-negative", ["train", TOY_D2, "--threads", "-2"], ["--threads", "at least 1"]),
    ("test-threads-float", ["test", TOY_DET, "x.pth", "--threads", "1.5"],
     ["--threads", "not a whole number"]),
    ("bench-threads-zero", ["bench", "restv2_tiny", "--threads", "0"], ["--threads", "at least 1"]),
    ("demo-threads-text", ["demo", "--threads", "two"], ["--threads", "not a whole number"]),
    ("export-model-threads-zero", ["export-model", TOY_DET, "x.pth", "--out", "o.onnx",
                                   "--threads", "0"], ["--threads", "at least 1"]),
    ("export-model-runs-zero", ["export-model", TOY_DET, "x.pth", "--out", "o.onnx",
                                "--runs", "0"], ["--runs", "at least 1"]),
    ("demo-cfg-option-not-kv", ["demo", "--cfg-options", "novalue"], ["novalue", "KEY=VALUE"]),
]


@pytest.mark.parametrize("argv,expect", [c[1:] for c in NUMBER_CASES],
                         ids=[c[0] for c in NUMBER_CASES])
def test_numbers_refused_where_they_enter(argv, expect, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no work_dirs/ in the checkout
    rc, out, err = _run(argv, capsys)
    _assert_refused(rc, err, expect, status=2)
    assert not (tmp_path / "work_dirs").exists()


@pytest.mark.parametrize("config, expect", [
    ("detectron2/toy/mask_rcnn_restv2_toy.yaml", ["detectron2 config (d2)", "MMDetection / MMSegmentation"]),
    ("detectron2/lazy/mask_rcnn_restv2_tiny_3x.py", ["detectron2 config (d2-lazy)"]),
    ("mmdet::no/such.py", ["no such config in mmdet"]),
])
def test_bench_configs_refuses_what_it_cannot_time(config, expect, capsys):
    rc, out, err = _run(["bench", "--configs", config, "--no-progress"], capsys)
    _assert_refused(rc, err, expect, status=2)
