"""The seams of issue 17: what is checked is what is loaded, runs that cannot trample each
other, and the toolboxes' own tools on our files.

One toy Mask R-CNN (MMDetection) is trained for 2 iterations (its ``iter_2.pth`` is a real
training checkpoint: message hub, optimizer, schedulers); every row below reads it, rewritten
in another layout or damaged. Processes get timeouts.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rest_dense.cli import main as cli
from rest_dense.data.toy import generate_toy_dataset
from rest_dense.checkpoint_reader import normalize_model_checkpoint, read_model_checkpoint
from rest_dense.models import CheckpointError, CheckpointMismatchError

from conftest import REPO, without_logging_errors

# every test here may start a process: a hung one fails after the timeout (pytest-timeout)
pytestmark = pytest.mark.timeout(600, func_only=True)

DET = REPO / "configs/toy/mask_rcnn_restv2_toy.py"
SITE = Path(torch.__file__).resolve().parents[1]
MMDET_TOOLS = SITE / "mmdet/.mim/tools"
PY = sys.executable


def _opts(root: Path) -> dict:
    r = str(root).rstrip("/") + "/"
    return {"train_dataloader.dataset.data_root": r, "val_dataloader.dataset.data_root": r,
            "test_dataloader.dataset.data_root": r, "train_dataloader.batch_size": 1,
            "val_evaluator.ann_file": r + "annotations/instances_val.json",
            "test_evaluator.ann_file": r + "annotations/instances_val.json",
            "default_hooks.logger.interval": 1}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(toy data root, work dir, iter_2.pth, the checkpoint's state dict)."""
    from rest_dense.mm.runner import train

    base = tmp_path_factory.mktemp("seams")
    root = base / "toy"
    generate_toy_dataset(root, num_train=2, num_val=2)
    work = base / "det"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(str(DET), work_dir=work, cfg_options={**_opts(root), "train_cfg.max_iters": 2,
                                                    "default_hooks.checkpoint.interval": 2})
    finally:
        torch.set_num_threads(n)
    ckpt = work / "iter_2.pth"
    assert ckpt.is_file()
    sd = torch.load(ckpt, weights_only=False)["state_dict"]
    return root, work, ckpt, sd


@pytest.fixture(scope="module")
def runner(toy):
    """A test runner of the toy config, built once (its model is reloaded per row)."""
    from rest_dense.mm.runner import build_runner, test_config

    root, work, ckpt, _ = toy
    cfg = test_config(str(DET), ckpt, work_dir=work.parent / "runner", cfg_options=_opts(root))
    return build_runner(cfg)


# ------------------------------------------------------------------ 1. checked is loaded
def _ema(sd):
    return {"steps": torch.tensor(7), **{"module." + k: v for k, v in sd.items()}}


LAYOUTS = {
    "mmengine": lambda sd, p: torch.save({"state_dict": sd, "meta": {}}, p),
    "model-wrapper": lambda sd, p: torch.save({"model": sd}, p),
    "bare": lambda sd, p: torch.save(sd, p),
    "ddp-prefix": lambda sd, p: torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, p),
    "ddp-in-model-wrapper": lambda sd, p: torch.save({"model": {"module." + k: v for k, v in sd.items()}}, p),
    "nested-wrappers": lambda sd, p: torch.save({"model": {"state_dict": sd}}, p),
    "ema-extracted": lambda sd, p: torch.save(_ema(sd), p),
    "ema-only": lambda sd, p: torch.save({"ema_state_dict": _ema(sd), "meta": {}}, p),
    "mmdet2-ema-buffers": lambda sd, p: torch.save(
        {"state_dict": {**sd, "ema_backbone_stem_0_weight": torch.zeros(3)}}, p),
    "compiled": lambda sd, p: torch.save({"state_dict": {"_orig_mod." + k: v for k, v in sd.items()}}, p),
    "fp16": lambda sd, p: torch.save({"state_dict": {k: v.half() if v.is_floating_point() else v
                                                     for k, v in sd.items()}}, p),
    "bf16": lambda sd, p: torch.save({"state_dict": {k: v.bfloat16() if v.is_floating_point() else v
                                                     for k, v in sd.items()}}, p),
    "safetensors": lambda sd, p: __import__("safetensors.torch").torch.save_file(
        {k: v.contiguous() for k, v in sd.items()}, str(p)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_checked_and_loaded_the_same(toy, runner, layout, tmp_path):
    """The state dict the check accepts is the one mmengine's runner loads (same weights)."""
    from rest_dense.mm.runner import check_test_checkpoint

    _, _, _, sd = toy
    path = tmp_path / ("w.safetensors" if layout == "safetensors" else "w.pth")
    LAYOUTS[layout](sd, path)
    check_test_checkpoint(runner.model, str(path))
    with torch.no_grad():
        for p in runner.model.parameters():
            p.zero_()
    runner.load_checkpoint(str(path), map_location="cpu")  # what runner.test() calls
    tol = 1e-2 if layout in ("fp16", "bf16") else 0
    own = runner.model.state_dict()
    for k, v in sd.items():
        assert torch.allclose(own[k].float(), v.float(), atol=tol, rtol=tol), (layout, k)


def _refuse_cases(sd):
    bb = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    return {
        # a detectron2 training file (whole d2 model layout) given to an mm config
        "d2-file-to-mm": ({"model": {"backbone.bottom_up." + k: v for k, v in bb.items()},
                           "iteration": 5}, "detectron2 checkpoint"),
        "half-prefixed-keys": ({"state_dict": {("wrap." + k if i % 2 == 0 else "wrap." + k): v
                                               for i, (k, v) in enumerate(sd.items())}},
                               "under the prefix 'wrap.'"),
        "backbone-only": ({"state_dict": bb}, "backbone only"),
        "nan-weights": ({"state_dict": {k: (torch.full_like(v, float("nan"))
                                            if k.startswith("backbone.stem") and v.is_floating_point()
                                            else v) for k, v in sd.items()}}, "NaN"),
        "no-tensors": ({"state_dict": {"a": 1}, "meta": {}}, "holds no tensors"),
        "cut-off": ({"state_dict": dict(list(sd.items())[:5])}, "partial or cut-off"),
        "not-a-dict": ([1, 2, 3], "not a checkpoint"),
    }


@pytest.mark.parametrize("case", ["d2-file-to-mm", "half-prefixed-keys", "backbone-only",
                                  "nan-weights", "no-tensors", "not-a-dict", "cut-off"])
def test_refusals_name_the_real_cause(toy, runner, case, tmp_path):
    from rest_dense.mm.runner import check_test_checkpoint

    obj, expect = _refuse_cases(toy[3])[case]
    path = tmp_path / "x.pth"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=expect):
        check_test_checkpoint(runner.model, str(path))


def test_reader_is_the_loader(toy):
    """mmengine's local loader returns exactly the reader's state dict."""
    from rest_dense.mm.safe_load import load_from_local

    _, _, ckpt, _ = toy
    a = read_model_checkpoint(ckpt).state_dict
    b = load_from_local(str(ckpt), "cpu")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert normalize_model_checkpoint({"model": a}).framework == "mmengine"  # by its keys


def _cli(args, capsys):
    code = cli(args)
    out = capsys.readouterr()
    return code, out.out + out.err


def test_cli_test_with_model_wrapper_loads(toy, tmp_path, capsys):
    """`{'model': sd}` is scored with its weights: the same metrics as the original file."""
    root, work, ckpt, sd = toy
    opts = [f"{k}={v}" for k, v in _opts(root).items()]
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": sd}, wrapped)
    res = []
    for f in (ckpt, wrapped):
        m = tmp_path / f"{f.stem}.json"
        code, text = _cli(["test", str(DET), str(f), "--work-dir", str(tmp_path / f.stem),
                           "--threads", "1", "--save-metrics", str(m), *opts], capsys)
        assert code == 0, text
        res.append(json.loads(m.read_text()))
    assert res[0] == res[1]


def test_cli_resume_from_another_models_file(toy, tmp_path, capsys):
    root, work, ckpt, sd = toy
    other = tmp_path / "seg.pth"  # a segmenter's file: same backbone, other heads
    torch.save({"state_dict": {**{k: v for k, v in sd.items() if k.startswith("backbone.")},
                               "decode_head.conv_seg.weight": torch.zeros(4, 8, 1, 1)},
                "meta": {}}, other)
    opts = [f"{k}={v}" for k, v in _opts(root).items()]
    code, text = _cli(["train", str(DET), "--work-dir", str(tmp_path / "w"), "--threads", "1",
                       "--resume", str(other), "train_cfg.max_iters=3", *opts], capsys)
    assert code == 2 and "--resume" in text and "another model" in text, text
    assert "parameter groups" not in text


def test_cli_resume_from_weights_without_training_state(toy, tmp_path, capsys):
    """The model's own weights as a bare state dict: no iteration to resume from (mmengine's
    resume stopped on KeyError 'meta'); load_from is named instead."""
    root, work, ckpt, sd = toy
    bare = tmp_path / "bare.pth"
    torch.save(sd, bare)
    opts = [f"{k}={v}" for k, v in _opts(root).items()]
    code, text = _cli(["train", str(DET), "--work-dir", str(tmp_path / "w"), "--threads", "1",
                       "--resume", str(bare), "train_cfg.max_iters=3", *opts], capsys)
    assert code == 2 and "not an MMEngine training checkpoint" in text and "load_from=" in text
    assert "Traceback" not in without_logging_errors(text), text


def test_cli_resume_of_a_finished_run_says_nothing_is_left(toy, tmp_path, capsys):
    root, work, ckpt, sd = toy
    opts = [f"{k}={v}" for k, v in _opts(root).items()]
    code, text = _cli(["train", str(DET), "--work-dir", str(tmp_path / "w"), "--threads", "1",
                       "--resume", str(ckpt), "train_cfg.max_iters=1", *opts], capsys)
    assert code == 0 and "nothing is left to train" in text, text[-2000:]


def test_cli_resume_with_a_longer_schedule_says_the_saved_one_goes_on(toy, tmp_path, capsys):
    """mmengine restores a resumed run's schedulers whole: with train_cfg.max_iters raised,
    the scaled cosine's end and T_max of the config are not used, and that is said."""
    import shutil

    root, work, ckpt, sd = toy
    mine = tmp_path / "iter_2.pth"
    shutil.copy(ckpt, mine)
    opts = [f"{k}={v}" for k, v in _opts(root).items()]
    code, text = _cli(["train", str(DET), "--work-dir", str(tmp_path / "w"), "--threads", "1",
                       "--resume", str(mine), "train_cfg.max_iters=3", *opts], capsys)
    assert code == 0, text[-2000:]
    assert "the learning-rate schedule goes on as the checkpoint saved it" in text, text[-3000:]
    assert "param_scheduler[1].end: 2 saved, 3 configured" in text


def test_scheduler_changes_compares_like_with_like():
    from rest_dense.mm.runner import scheduler_changes

    saved = [{"begin": 0, "end": 2, "by_epoch": False, "milestones": [1]}]
    assert scheduler_changes(saved, [dict(begin=0, end=2, by_epoch=False)]) == []
    assert scheduler_changes(saved, dict(begin=0, end=5, milestones=(1,), by_epoch=False)) == [
        "param_scheduler[0].end: 2 saved, 5 configured"]
    # epochs converted to iterations are not comparable; nor are lists of other lengths
    assert scheduler_changes(saved, [dict(end=5, by_epoch=True, convert_to_iter_based=True)]) == []
    assert scheduler_changes(saved, [dict(end=5), dict(end=6)]) == []
    assert scheduler_changes(None, [dict(end=5)]) == []


def test_cli_infer_refuses_cwin_checkpoint_in_global_config(toy, tmp_path, capsys):
    """infer applies test's completeness rules: cwin-trained weights in a global config."""
    root, work, ckpt, sd = toy
    cw = dict(sd)
    for s, d in zip(range(1, 5), (16, 32, 64, 128)):
        cw[f"backbone.cwin_convs.{s - 1}.weight"] = torch.zeros(d, 1, 3, 3)
    path = tmp_path / "cwin.pth"
    torch.save({"state_dict": cw, "meta": {}}, path)
    img = next((root / "val").glob("*")) if (root / "val").is_dir() else next(root.rglob("*.png"))
    code, text = _cli(["infer", str(DET), str(path), str(img), "--out", str(tmp_path / "o"),
                       "--quiet"], capsys)
    assert code == 2 and "not used by the model" in text, text


# ------------------------------------------------------------------ 2. runs cannot trample
def _sleeper(tmp_path):
    return subprocess.Popen([PY, "-c", "import time; time.sleep(60)", "holder-marker"])


def _write_lock(folder: Path, pid: int, start=None, host=None):
    from rest_dense.runlock import LOCK_NAME, process_start_time
    import socket

    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps({
        "pid": pid, "start_time": start if start is not None else process_start_time(pid),
        "host": host or socket.gethostname(), "created": time.time(), "what": "training",
        "command": "python -c holder-marker"}))


@pytest.mark.parametrize("state,busy", [("live", True), ("dead-pid", False),
                                        ("recycled-pid", False), ("garbage", False),
                                        ("other-host-recent", True)])
def test_work_dir_lock(tmp_path, state, busy):
    from rest_dense.runlock import FolderBusyError, LOCK_NAME, hold_folder

    folder = tmp_path / "w"
    proc = _sleeper(tmp_path)
    try:
        if state == "live":
            _write_lock(folder, proc.pid)
        elif state == "dead-pid":
            dead = subprocess.Popen([PY, "-c", "pass"])
            dead.wait(timeout=30)
            _write_lock(folder, dead.pid, start="1")
        elif state == "recycled-pid":
            _write_lock(folder, proc.pid, start="12345")  # same pid, other start time
        elif state == "garbage":
            folder.mkdir()
            (folder / LOCK_NAME).write_text("{not json")
        else:
            _write_lock(folder, 1, host="some-other-host")
        if busy:
            with pytest.raises(FolderBusyError, match=r"pid \d+ .*holder-marker|some-other-host"):
                with hold_folder(folder):
                    pass
        else:
            with hold_folder(folder):
                assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
            assert not (folder / LOCK_NAME).exists()
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_cli_train_refuses_live_work_dir(toy, tmp_path, capsys):
    root = toy[0]
    proc = _sleeper(tmp_path)
    try:
        _write_lock(tmp_path / "w", proc.pid)
        code, text = _cli(["train", str(DET), "--work-dir", str(tmp_path / "w"), "--threads", "1",
                           *[f"{k}={v}" for k, v in _opts(root).items()]], capsys)
        assert code == 2 and f"pid {proc.pid}" in text and "holder-marker" in text, text
        assert not list((tmp_path / "w").glob("*.pth"))
    finally:
        proc.kill()
        proc.wait(timeout=30)


@pytest.mark.timeout(240)
def test_cli_infer_out_reuse_and_interruption(toy, tmp_path, capsys):
    root, work, ckpt, _ = toy
    imgs = sorted(root.rglob("*.png"))[:2] or sorted(root.rglob("*.jpg"))[:2]
    out = tmp_path / "o"
    code, text = _cli(["infer", str(DET), str(ckpt), *map(str, imgs), "--out", str(out),
                       "--quiet", "--no-vis"], capsys)
    assert code == 0, text
    assert json.loads((out / "summary.json").read_text())["status"] == "complete"
    # a second run into the same folder: refused, then --overwrite replaces the old results
    code, text = _cli(["infer", str(DET), str(ckpt), str(imgs[0]), "--out", str(out),
                       "--quiet", "--no-vis"], capsys)
    assert code == 2 and "--overwrite" in text and "results of another run" in text
    # the one output rule: --out a file, or below one, is refused before anything is built
    for bad, words in ((out / "summary.json", "is a file, not a folder"),
                       (out / "summary.json" / "sub", "which is a file")):
        code, text = _cli(["infer", str(DET), str(ckpt), str(imgs[0]), "--out", str(bad),
                           "--quiet", "--no-vis"], capsys)
        assert code == 2 and "--out" in text and words in text and "Traceback" not in text, text
    # a file the run's summary does not list is not the run's: kept, and the run refused
    (out / "preds" / "stale-other-image.json").write_text("{}")
    code, text = _cli(["infer", str(DET), str(ckpt), str(imgs[0]), "--out", str(out),
                       "--quiet", "--no-vis", "--overwrite"], capsys)
    assert code == 2 and "did not write" in text and "stale-other-image.json" in text, text
    assert (out / "preds" / "stale-other-image.json").exists()
    (out / "preds" / "stale-other-image.json").unlink()
    code, text = _cli(["infer", str(DET), str(ckpt), str(imgs[0]), "--out", str(out),
                       "--quiet", "--no-vis", "--overwrite"], capsys)
    assert code == 0, text
    assert len(json.loads((out / "summary.json").read_text())["images"]) == 1
    assert len(list((out / "preds").iterdir())) == 1  # the old run's two files replaced
    # a summary.json of someone else's: the folder is not a run's, --overwrite or not
    other = tmp_path / "proj"
    (other / "vis").mkdir(parents=True)
    (other / "vis" / "my_precious.png").write_bytes(b"mine")
    (other / "summary.json").write_text('{"accuracy": 0.9}')
    code, text = _cli(["infer", str(DET), str(ckpt), str(imgs[0]), "--out", str(other),
                       "--quiet", "--no-vis", "--overwrite"], capsys)
    assert code == 2 and "no rest-dense infer run wrote" in text, text
    assert (other / "vis" / "my_precious.png").read_bytes() == b"mine"
    # SIGINT in the middle of a run: a summary says what was done and what was not
    many = tmp_path / "many"
    many.mkdir()
    for i in range(40):
        os.symlink(imgs[i % len(imgs)], many / f"im{i:02d}{imgs[0].suffix}")
    out2 = tmp_path / "o2"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([PY, "-m", "rest_dense.cli", "infer", str(DET), str(ckpt), str(many),
                             "--out", str(out2), "--quiet", "--no-vis"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 150
    while time.time() < deadline and not (out2 / "preds").is_dir() or not any(
            (out2 / "preds").glob("*.json")):
        if proc.poll() is not None or time.time() > deadline:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    text, _ = proc.communicate(timeout=120)
    doc = json.loads((out2 / "summary.json").read_text())
    assert proc.returncode == 130, text
    assert doc["status"] == "interrupted" and doc["interrupted_by"] == "SIGINT"
    assert doc["images"] and doc["not_processed"]
    assert len(doc["images"]) + len(doc["not_processed"]) == 40


@pytest.mark.timeout(240)
def test_cli_infer_keeps_user_files_and_skips_bad_images(toy, tmp_path, capsys):
    """--overwrite removes only what an infer run wrote (its summary.json comes first); a
    re-run with --out inside the input folder does not read its own results; an image the
    model cannot take (1 px high) is skipped and listed, the others are processed."""
    from PIL import Image

    root, work, ckpt, _ = toy
    img = (sorted(root.rglob("*.png")) or sorted(root.rglob("*.jpg")))[0]
    mine = tmp_path / "mine"
    (mine / "preds").mkdir(parents=True)
    (mine / "preds" / "my_photo.png").write_bytes(img.read_bytes())
    code, text = _cli(["infer", str(DET), str(ckpt), str(img), "--out", str(mine), "--quiet",
                       "--no-vis", "--overwrite"], capsys)
    assert code == 2 and "no summary.json" in text, text
    assert (mine / "preds" / "my_photo.png").is_file()
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes(img.read_bytes())
    Image.new("RGB", (300, 1), (90, 90, 90)).save(folder / "thin.png")
    out = folder / "out"
    for extra in ([], ["--overwrite"]):
        code, text = _cli(["infer", str(DET), str(ckpt), str(folder), "--out", str(out),
                           "--quiet", "--no-vis", *extra], capsys)
        doc = json.loads((out / "summary.json").read_text())
        assert code == 1 and doc["status"] == "errors", text
        assert [os.path.basename(i["input"]) for i in doc["images"]] == ["a.png"]
        assert [os.path.basename(i["input"]) for i in doc["failed"]] == ["thin.png"]
        assert doc["failed"][0]["error"].startswith("prediction failed") and not doc["skipped"]
    # a config error fails every image alike: reported as such (exit 2), not as success
    code, text = _cli(["infer", str(DET), str(ckpt), str(folder / "a.png"), "--out",
                       str(tmp_path / "o3"), "--quiet", "--no-vis", "--cfg-options",
                       "model.test_cfg.rcnn.nms.type=NoSuchNMS"], capsys)
    assert code == 2 and "failed on every image with the same error" in text, text
    # inputs among the results --overwrite would remove: refused before anything is removed
    code, text = _cli(["infer", str(DET), str(ckpt), *map(str, sorted((out / "preds").iterdir())),
                       "--out", str(out), "--quiet", "--no-vis", "--overwrite"], capsys)
    assert code == 2 and "--overwrite would remove" in text and any((out / "preds").iterdir())


def test_cli_test_refuses_outputs_that_would_destroy_inputs(toy, tmp_path, capsys):
    root, work, ckpt, _ = toy
    size = ckpt.stat().st_size
    opts = [f"{k}={v}" for k, v in _opts(root).items()]
    code, text = _cli(["test", str(DET), str(ckpt), "--work-dir", str(tmp_path / "t"),
                       "--save-metrics", str(ckpt), *opts], capsys)
    assert code == 2 and "same file as the input" in text and ckpt.stat().st_size == size
    (tmp_path / "afile").write_text("x")
    ann = tmp_path / "instances.json"  # e.g. a dataset's annotations
    ann.write_text('{"images": [], "annotations": []}')
    base = tmp_path / "base.py"
    base.write_text(f"_base_ = {str(DET)!r}\n")
    config = tmp_path / "mine.py"
    config.write_text("_base_ = './base.py'\n")
    for flags, message in ((["--work-dir", str(tmp_path / "afile")], "is a file, not a folder"),
                           (["--show-dir", str(tmp_path / "afile" / "v")], "which is a file"),
                           (["--save-metrics", str(ann)], "holds no metrics"),
                           (["--save-metrics", str(DET)], "same file as the input"),
                           (["--save-metrics", ""], "an empty path")):
        code, text = _cli(["test", str(config), str(ckpt), *flags, *opts], capsys)
        assert code == 2 and message in text, text
    assert ann.read_text().startswith('{"images"') and base.read_text().startswith("_base_")


# ------------------------------------------------------------------ 3. the toolboxes' tools
def _tool(args, cwd, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([PY, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tool", ["mmdet-test", "mmdet-train-resume"])
def test_shipped_mmdet_tools_read_our_checkpoints(toy, tmp_path, tool):
    root, work, ckpt, _ = toy
    opts = [f"{k}={v}" for k, v in _opts(root).items()]
    if tool == "mmdet-test":
        r = _tool([MMDET_TOOLS / "test.py", DET, ckpt, "--work-dir", tmp_path / "t",
                   "--cfg-options", *opts], tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "coco/bbox_mAP" in r.stdout + r.stderr
    else:
        import shutil

        w = tmp_path / "w"
        shutil.copytree(work, w)
        r = _tool([MMDET_TOOLS / "train.py", DET, "--work-dir", w, "--resume", "--cfg-options",
                   "train_cfg.max_iters=3", "default_hooks.checkpoint.interval=1", *opts],
                  tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "resumed" in (r.stdout + r.stderr).lower() and (w / "iter_3.pth").is_file()
    assert "HistoryBuffer" not in r.stderr


@pytest.mark.timeout(300)
@pytest.mark.parametrize("task", ["dataset", "dataloader"])
def test_shipped_mmdet_benchmark_tool_runs_on_our_config(toy, tmp_path, task):
    """MMDetection's analysis_tools/benchmark.py (its psutil need is in our mm extra). Its
    inference task moves the model to CUDA unconditionally (upstream), so on a CPU-only
    machine the data tasks are what it can run."""
    root = toy[0]
    opts = [f"{k}={v}" for k, v in _opts(root).items()]
    r = _tool([MMDET_TOOLS / "analysis_tools/benchmark.py", DET, "--task", task,
               "--max-iter", "3", "--num-warmup", "1", "--log-interval", "1",
               # the train loader samples without end (2 toy images would run out)
               "--dataset-type", "train" if task == "dataloader" else "val",
               "--work-dir", tmp_path / "b", "--cfg-options", *opts,
               "train_dataloader.num_workers=0", "train_dataloader.persistent_workers=False"],
              tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "Overall fps" in out or "fps" in out.lower(), out[-2000:]


def test_global_allow_list_runs_no_foreign_code(tmp_path):
    """After `import rest_dense.mm`, a plain torch.load (as the tools call it) reads our
    checkpoints and still refuses a file whose unpickling would run a command."""
    marker = tmp_path / "pwned"
    code = (
        "import os, torch, rest_dense.mm\n"
        "class P:\n"
        f"    def __reduce__(self): return (os.system, ('touch {marker}',))\n"
        f"torch.save({{'x': P()}}, '{tmp_path}/evil.pth')\n"
        "try:\n"
        f"    torch.load('{tmp_path}/evil.pth')\n"
        "except Exception as e: print('refused', type(e).__name__)\n"
        "import builtins\n"
        f"torch.save({{'g': builtins.getattr}}, '{tmp_path}/g.pth')\n"
        "try:\n"
        f"    torch.load('{tmp_path}/g.pth')\n"
        "    print('getattr loaded')\n"
        "except Exception as e: print('refused getattr', type(e).__name__)\n")
    r = _tool(["-c", code], tmp_path, timeout=120)
    assert "refused UnpicklingError" in r.stdout, r.stdout + r.stderr
    assert not marker.exists()


@pytest.mark.parametrize("where", ["backbone", "whole-model"])
def test_init_cfg_pretrained_loads_a_training_checkpoint(toy, where):
    from mmengine.config import Config

    from rest_dense.mm.utils import build_model

    _, _, ckpt, sd = toy
    cfg = Config.fromfile(str(DET))
    if where == "backbone":
        cfg.model.backbone.init_cfg = dict(type="Pretrained", checkpoint=str(ckpt))
    else:
        cfg.model.init_cfg = dict(type="Pretrained", checkpoint=str(ckpt))
    model = build_model(cfg)
    model.init_weights()
    own = model.state_dict()
    keys = [k for k in sd if k.startswith("backbone.")] if where == "backbone" else list(sd)
    assert all(torch.equal(own[k], sd[k]) for k in keys)
