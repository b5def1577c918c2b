"""The seams of issue 17 on the detectron2 side, MMSegmentation's own ``tools/test.py``, and
``--resume`` with another optimizer setup.

Real training checkpoints, each written by 2 iterations of our training: the toy Mask
R-CNN of MMDetection (``toy`` of ``test_seams.py``), the toy UperNet of MMSegmentation and
the toy Mask R-CNN of detectron2 (all three with the same toy ResTv2 backbone).

* ``test_d2_checkpoint_layouts_load_the_whole_model``: detectron2 checkpoints with DDP
  ``module.`` prefixes (and other wrappers) load every entry of the model, with the weights
  of the file (not "the backbone only");
* ``test_d2_refuses_the_other_frameworks_checkpoint``: an MMDetection / MMSegmentation
  training checkpoint given to a detectron2 config for evaluation is refused naming the
  other framework's layout (not "untrusted", not "backbone only");
* ``test_d2_work_dir_lock``: a second ``rest-dense train`` of a detectron2 config into the
  output folder of a live run is refused naming that process;
* ``test_shipped_mmseg_test_reads_our_checkpoint``: MMSegmentation's ``tools/test.py``
  (shipped in its wheel) evaluates the UperNet checkpoint that our training wrote;
* ``test_resume_with_other_paramwise_cfg``: ``--resume`` of the same model with another
  lr-decay setup names the parameter groups and ``paramwise_cfg``.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rest_dense.cli import main as cli
from rest_dense.models import CheckpointError

from conftest import REPO, without_logging_errors
from test_seams import DET, SITE, _cli, _opts, toy  # noqa: F401  (toy: the MMDetection fixture)

pytestmark = pytest.mark.timeout(600, func_only=True)

SEG = REPO / "configs/toy/upernet_restv2_toy.py"
D2 = REPO / "configs/detectron2/toy/mask_rcnn_restv2_toy.yaml"
MMSEG_TOOLS = SITE / "mmseg/.mim/tools"
PY = sys.executable


def _seg_opts(root: Path) -> dict:
    r = str(root).rstrip("/") + "/"
    return {"train_dataloader.dataset.data_root": r, "val_dataloader.dataset.data_root": r,
            "test_dataloader.dataset.data_root": r, "train_dataloader.batch_size": 2,
            "val_dataloader.batch_size": 1, "default_hooks.logger.interval": 1}


def _d2_opts(root: Path, iters: int = 2) -> list:
    return ["--toy-root", str(root), "--threads", "1", "MODEL.DEVICE", "cpu",
            "SOLVER.MAX_ITER", str(iters), "SOLVER.CHECKPOINT_PERIOD", "2",
            "SOLVER.IMS_PER_BATCH", "1", "DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", "()"]


@pytest.fixture(scope="module")
def seg(toy):
    """(work dir, iter_2.pth) of the toy UperNet trained by ``rest_dense.mm.runner.train``."""
    from rest_dense.mm.runner import train

    root = toy[0]
    work = root.parent / "seg"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(str(SEG), work_dir=work, cfg_options={
            **_seg_opts(root), "train_cfg.max_iters": 2, "default_hooks.checkpoint.interval": 2,
            "train_cfg.val_begin": 1000})
    finally:
        torch.set_num_threads(n)
    assert (work / "iter_2.pth").is_file()
    return work, work / "iter_2.pth"


@pytest.fixture(scope="module")
def d2(toy):
    """(model_final.pth of 2 iterations of ``rest-dense train`` on the detectron2 config, a
    freshly built model of that config)."""
    from rest_dense.d2.engine import RestTrainer, setup_yaml_config

    root = toy[0]
    work = root.parent / "d2"
    n = torch.get_num_threads()
    try:
        assert cli(["train", str(D2), "--work-dir", str(work), *_d2_opts(root)]) == 0
    finally:
        torch.set_num_threads(n)
    ckpt = work / "model_final.pth"
    assert ckpt.is_file()
    cfg = setup_yaml_config(str(D2), ["MODEL.DEVICE", "cpu"])
    return ckpt, RestTrainer.build_model(cfg)


def _checkpointer(model, complete=True):
    from rest_dense.d2.checkpointer import RestDetectionCheckpointer

    ck = RestDetectionCheckpointer(model, save_dir="")
    ck.require_complete = complete
    return ck


# ------------------------------------------------- detectron2: checked is what is loaded
D2_LAYOUTS = {
    "as-written": lambda obj: obj,
    "ddp-prefix": lambda obj: {**obj, "model": {"module." + k: v for k, v in obj["model"].items()}},
    "ddp-prefix-bare": lambda obj: {"module." + k: v for k, v in obj["model"].items()},
    "ddp-prefix-state_dict-wrapper": lambda obj: {
        "state_dict": {"module." + k: v for k, v in obj["model"].items()}, "iteration": 1},
    "compiled-prefix": lambda obj: {**obj, "model": {"_orig_mod." + k: v
                                                     for k, v in obj["model"].items()}},
}


@pytest.mark.parametrize("layout", list(D2_LAYOUTS))
def test_d2_checkpoint_layouts_load_the_whole_model(d2, layout, tmp_path):
    """Every entry of the model gets the file's weights (evaluation's completeness rule)."""
    ckpt, model = d2
    obj = torch.load(ckpt, map_location="cpu", weights_only=False)
    sd = {k: v for k, v in obj["model"].items() if isinstance(v, torch.Tensor)}
    path = tmp_path / "x.pth"
    torch.save(D2_LAYOUTS[layout](obj), path)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    _checkpointer(model).load(str(path), checkpointables=[])
    own = model.state_dict()
    assert set(sd) == set(own), set(sd) ^ set(own)
    differ = [k for k in sd if not torch.equal(own[k], sd[k])]
    assert not differ, (layout, differ[:5])


@pytest.mark.parametrize("source", ["mmdet", "mmseg"])
def test_d2_refuses_the_other_frameworks_checkpoint(d2, toy, seg, source, tmp_path):
    """A whole-model training checkpoint of MMDetection / MMSegmentation (message hub,
    optimizer: what the issue saw refused as "untrusted") is named as the other
    framework's, for evaluation; for training it gives its backbone (MODEL.WEIGHTS)."""
    _, model = d2
    ckpt = toy[2] if source == "mmdet" else seg[1]
    with pytest.raises(CheckpointError) as err:
        _checkpointer(model).load(str(ckpt), checkpointables=[])
    msg = str(err.value)
    assert "MMDetection / MMSegmentation (mmengine) checkpoint" in msg, msg
    assert "other framework" in msg and "untrusted" not in msg.lower(), msg
    # as initial weights for training, its ResT backbone loads (the heads keep their init)
    mm = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    _checkpointer(model, complete=False).load(str(ckpt), checkpointables=[])
    own = model.state_dict()
    bb = [k for k in own if k.startswith("backbone.bottom_up.")]
    assert bb and all(torch.equal(own[k], mm["backbone." + k[len("backbone.bottom_up."):]])
                      for k in bb if "backbone." + k[len("backbone.bottom_up."):] in mm)


def test_mm_resume_from_a_d2_checkpoint_names_the_framework(toy, d2, tmp_path, capsys):
    """``--resume`` of an MMDetection config with detectron2's training checkpoint: named as
    the other framework's file, not as "backbone weights only" or "another model"."""
    root = toy[0]
    opts = [f"{k}={v}" for k, v in _opts(root).items()]
    code, text = _cli(["train", str(DET), "--work-dir", str(tmp_path / "w"), "--threads", "1",
                       "--resume", str(d2[0]), "train_cfg.max_iters=3", *opts], capsys)
    assert code == 2 and "is a detectron2 checkpoint" in text, text
    assert "MMDetection / MMSegmentation (mmengine) config" in text and "--to mmdet" in text
    assert "backbone only" not in text and "another model" not in text, text
    assert not (tmp_path / "w" / "iter_3.pth").exists()


def test_d2_resume_from_another_models_file_is_one_line(toy, d2, tmp_path, capsys):
    """``--resume`` with a detectron2 training checkpoint that lacks part of the model (here:
    the ROI heads): named before loading, not a traceback about parameter groups."""
    obj = torch.load(d2[0], map_location="cpu", weights_only=False)
    obj["model"] = {k: v for k, v in obj["model"].items() if not k.startswith("roi_heads.")}
    other = tmp_path / "other.pth"
    torch.save(obj, other)
    code = cli(["train", str(D2), "--work-dir", str(tmp_path / "w"), "--resume", str(other),
                *_d2_opts(toy[0])])
    err = without_logging_errors(capsys.readouterr().err)
    assert code == 2 and "--resume: checkpoint" in err and "partial or cut-off" in err, err
    assert "roi_heads." in err and "Traceback" not in err, err


def test_d2_cli_test_on_an_empty_dataset_is_one_line(toy, d2, tmp_path, capsys):
    """A test set without images: named before detectron2's assertion (a traceback)."""
    import json
    import shutil

    empty = tmp_path / "empty"
    shutil.copytree(toy[0], empty)
    for split in ("train", "val"):
        path = empty / "annotations" / f"instances_{split}.json"
        doc = json.loads(path.read_text())
        doc["images"], doc["annotations"] = [], []
        path.write_text(json.dumps(doc))
    code = cli(["test", str(D2), str(d2[0]), "--toy-root", str(empty), "--threads", "1",
                "MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0"])
    err = without_logging_errors(capsys.readouterr().err)
    assert code == 2 and "DATASETS.TEST: dataset 'toy_val' holds no images" in err, err
    assert "Traceback" not in err


def test_d2_cli_test_refuses_mm_checkpoint(toy, capsys):
    """The same through ``rest-dense test`` on the detectron2 config (exit 2, one line)."""
    code = cli(["test", str(D2), str(toy[2]), "--toy-root", str(toy[0]), "--threads", "1",
                "MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "MMDetection / MMSegmentation (mmengine) checkpoint" in err, err
    assert "untrusted" not in err.lower() and "backbone only" not in err


# ------------------------------------------------- detectron2: runs cannot trample
@pytest.mark.timeout(240)
@pytest.mark.parametrize("second", ["same-work-dir", "same-work-dir-resume", "config-output-dir"])
def test_d2_work_dir_lock(toy, tmp_path, second, capsys, subprocess_env):
    """A live ``rest-dense train`` of the detectron2 config holds its output folder: a
    second one (a fresh run or ``--resume``) is refused naming its pid and command line,
    and writes nothing there; also when the folder is the config's OUTPUT_DIR, not
    ``--work-dir``."""
    root = toy[0]
    work = tmp_path / "w"
    where = (["OUTPUT_DIR", str(work)] if second == "config-output-dir"
             else ["--work-dir", str(work)])
    first = subprocess.Popen(
        [PY, "-m", "rest_dense.cli", "train", str(D2), *_d2_opts(root, iters=100000), *where],
        cwd=REPO, env=subprocess_env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (work / ".rest-dense.lock").exists():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        # the holder stays alive but stopped, so that every file that appears from here on
        # comes from the refused run (a running holder writes its log and checkpoints)
        os.killpg(first.pid, signal.SIGSTOP)
        time.sleep(0.5)
        before = sorted(p.name for p in work.iterdir())
        code = cli(["train", str(D2), *_d2_opts(root), *where,
                    *(["--resume"] if second.endswith("resume") else [])])
        err = capsys.readouterr().err
        assert code == 2 and f"pid {first.pid}" in err and "in use by another live training" \
            in err, err
        assert str(D2.name) in err  # the holder's command line
        assert not [p for p in work.iterdir() if p.name not in before and
                    p.name.endswith((".pth", ".txt"))]
    finally:
        os.killpg(first.pid, 9)
        first.wait(timeout=60)


# ------------------------------------------------- MMSegmentation's own tools/test.py
@pytest.mark.timeout(300)
def test_shipped_mmseg_test_reads_our_checkpoint(toy, seg, tmp_path):
    root = toy[0]
    opts = [f"{k}={v}" for k, v in _seg_opts(root).items()]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    r = subprocess.run([PY, str(MMSEG_TOOLS / "test.py"), str(SEG), str(seg[1]), "--work-dir",
                        str(tmp_path / "t"), "--cfg-options", *opts], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=240)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "mIoU" in out and "HistoryBuffer" not in out and "weights_only" not in out, out[-3000:]
    # mmengine loaded every entry of the model (a key mismatch would be logged)
    assert "missing keys in source state_dict" not in out
    assert "unexpected key in source state_dict" not in out


# ------------------------------------------------- --resume with another optimizer setup
LAYER_DECAY = ("optim_wrapper = dict(constructor='ResTLayerDecayOptimizerConstructor', "
               "paramwise_cfg=dict(_delete_=True, decay_rate=0.9, num_layers={n}, "
               "decay_type='stage_wise'))\n")


@pytest.mark.parametrize("written,resumed", [
    ("default", "layer-decay"),  # the lr-decay constructor switched on
    ("layer-decay", "default"),  # ... and off
])
def test_resume_with_other_paramwise_cfg(toy, tmp_path, capsys, written, resumed):
    """The same model with another optimizer grouping: refused before training, naming
    both counts and ``paramwise_cfg`` (not torch's bare "different number of parameter
    groups")."""
    root, work, ckpt, _ = toy
    configs = {"default": DET}
    ld = tmp_path / "layer_decay.py"
    ld.write_text(f"_base_ = [{str(DET)!r}]\n" + LAYER_DECAY.format(n=4))
    configs["layer-decay"] = ld
    opts = [f"{k}={v}" for k, v in _opts(root).items()]
    if written == "default":
        start = ckpt
    else:  # a checkpoint written by a layer-decay run
        w0 = tmp_path / "w0"
        assert cli(["train", str(ld), "--work-dir", str(w0), "--threads", "1",
                    "train_cfg.max_iters=1", "default_hooks.checkpoint.interval=1",
                    "train_cfg.val_begin=1000", *opts]) == 0
        start = w0 / "iter_1.pth"
    capsys.readouterr()
    w = tmp_path / "w"
    code = cli(["train", str(configs[resumed]), "--work-dir", str(w), "--threads", "1",
                "--resume", str(start), "train_cfg.max_iters=3", *opts])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "the optimizer's parameter groups differ from the checkpoint's" in err, err
    assert "paramwise_cfg" in err and "load_from" in err
    n_ld = 2 * 6  # stages 0..5 (stem, 4 stages, outside), decay / no decay
    assert (f"{n_ld} vs " if resumed == "layer-decay" else f" vs {n_ld} ") in err, err
    assert not list(w.glob("*.pth"))


def test_resume_with_the_same_paramwise_cfg_still_resumes(toy, tmp_path, capsys):
    """The check lets the same setup through (the control row)."""
    root, work, ckpt, _ = toy
    opts = [f"{k}={v}" for k, v in _opts(root).items()]
    w = tmp_path / "w"
    code = cli(["train", str(DET), "--work-dir", str(w), "--threads", "1", "--resume",
                str(ckpt), "train_cfg.max_iters=3", "default_hooks.checkpoint.interval=1",
                "train_cfg.val_begin=1000", *opts])
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    assert (w / "iter_3.pth").is_file() and not (w / "iter_1.pth").exists()
