"""No foreign code runs by default: a checkpoint whose unpickling would run a shell command
(writing a marker file) is refused on every default path of the command line, with an
error that names the file and the flag that would allow it; the marker never appears.

Paths: ``rest-dense test`` (MMSegmentation and detectron2), ``rest-dense train --resume``
(the work dir's newest checkpoint, and an explicit file), mmengine's ``load_from``, the
backbone's ``init_cfg`` ``Pretrained``, detectron2's ``MODEL.WEIGHTS`` (``.pth`` and
``.pkl``), and ``rest-dense convert``. The explicit flags (``--trust-checkpoint``,
``--unsafe-load``) do let the payload run, which shows the files are live.

(``rest-dense infer`` / ``export-model`` still trust their CHECKPOINT unless --weights-only;
they belong to the deployment commands.)
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import List

import pytest
import torch

from rest_dense import safe_load
from rest_dense.cli import main as cli

from conftest import TINY_ARCH

DIMS = list(TINY_ARCH["embed_dims"])
SEG = "toy/upernet_restv2_toy.py"
DET = "toy/mask_rcnn_restv2_toy.py"
D2 = "detectron2/toy/mask_rcnn_restv2_toy.yaml"


class Payload:
    """Unpickling this runs ``echo pwned > marker`` in a shell."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > '{self.marker}'",))


@pytest.fixture(autouse=True)
def _nothing_trusted():
    safe_load.forget_trusted()
    yield
    safe_load.forget_trusted()


@pytest.fixture(scope="module")
def toy_root(make_toy_root) -> Path:
    return make_toy_root(num_train=2, num_val=2)


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "PWNED"
    yield path
    # every test ends with the payload not run (unless it asked for it and removed the file)
    assert not path.exists(), "a checkpoint's code ran"


def evil_pth(path: Path, marker: Path, **extra) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.ones(1)}, "meta": {"iter": 4}, "x": Payload(marker),
                **extra}, path)
    return path


def evil_pkl(path: Path, marker: Path) -> Path:
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": Payload(marker)}, "__author__": "someone"}, f)
    return path


def mm_options(toy_root: Path, name: str, seg: bool = True) -> List[str]:
    root = f"{toy_root}/"
    opts = ["--cfg-options", f"experiment_name={name}",
            f"model.backbone.arch.embed_dims={tuple(DIMS)}",
            f"model.backbone.arch.depths={tuple(TINY_ARCH['depths'])}",
            f"train_dataloader.dataset.data_root={root}",
            f"test_dataloader.dataset.data_root={root}", "val_cfg=None", "val_dataloader=None",
            "val_evaluator=None", "train_cfg.max_iters=2"]
    if seg:
        return opts + [f"model.decode_head.in_channels={DIMS}",
                       f"model.auxiliary_head.in_channels={DIMS[2]}"]
    return opts + [f"model.neck.in_channels={DIMS}"]


def d2_options(toy_root: Path, out: Path) -> List[str]:
    return ["--threads", "1", "--toy-root", str(toy_root), "--work-dir", str(out),
            "MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", "2", "DATALOADER.NUM_WORKERS", "0",
            "SOLVER.IMS_PER_BATCH", "1", "MODEL.RESTV2.ARCH.EMBED_DIMS", str(DIMS),
            "MODEL.RESTV2.ARCH.DEPTHS", str(list(TINY_ARCH["depths"]))]


def refused(capsys, command: str, path: Path, flag: str = "--trust-checkpoint") -> str:
    err = capsys.readouterr().err
    assert f"rest-dense {command}: error:" in err, err[-3000:]
    assert str(path) in err and flag in err, err[-3000:]
    return err


# ----------------------------------------------------------------------------- OpenMMLab
@pytest.mark.slow
def test_mm_test_checkpoint(toy_root, tmp_path, marker, capsys, one_thread):
    evil = evil_pth(tmp_path / "downloaded.pth", marker)
    assert cli(["test", SEG, str(evil), "--work-dir", str(tmp_path / "t"),
                *mm_options(toy_root, "trust_test")]) == 2
    refused(capsys, "test", evil)
    assert not marker.exists()

    # --trust-checkpoint (trust=...) is what lets it run: the file is live
    from rest_dense.mm import runner
    from rest_dense.mm import safe_load as mm_safe_load

    runner.test_config(SEG, evil, work_dir=tmp_path / "t2", trust=[evil])
    mm_safe_load.load_from_local(str(evil), "cpu")
    assert marker.read_text().strip() == "pwned"
    marker.unlink()


@pytest.mark.slow
def test_mm_resume_from_the_work_dir_and_from_a_file(toy_root, tmp_path, marker, capsys,
                                                     one_thread):
    work = tmp_path / "work"
    evil = evil_pth(work / "iter_4.pth", marker)
    (work / "last_checkpoint").write_text(str(evil))
    assert cli(["train", SEG, "--work-dir", str(work), "--resume",
                *mm_options(toy_root, "trust_resume")]) == 2
    refused(capsys, "train", evil)
    assert cli(["train", SEG, "--work-dir", str(tmp_path / "w2"), "--resume", str(evil),
                *mm_options(toy_root, "trust_resume2")]) == 2
    refused(capsys, "train", evil)


@pytest.mark.slow
def test_mm_load_from_and_init_cfg(toy_root, tmp_path, marker, capsys, one_thread):
    evil = evil_pth(tmp_path / "pretrained.pth", marker)
    assert cli(["train", DET, "--work-dir", str(tmp_path / "a"),
                *mm_options(toy_root, "trust_load_from", seg=False), f"load_from={evil}"]) == 2
    refused(capsys, "train", evil)

    assert cli(["train", DET, "--work-dir", str(tmp_path / "b"),
                *mm_options(toy_root, "trust_init_cfg", seg=False),
                "model.backbone.init_cfg.type=Pretrained",
                f"model.backbone.init_cfg.checkpoint={evil}"]) == 2
    refused(capsys, "train", evil, flag="weights_only=False")


# ----------------------------------------------------------------------------- detectron2
@pytest.mark.slow
def test_d2_weights_resume_and_test(toy_root, tmp_path, marker, capsys, one_thread):
    evil = evil_pth(tmp_path / "weights.pth", marker)
    assert cli(["train", D2, *d2_options(toy_root, tmp_path / "a"), "MODEL.WEIGHTS",
                str(evil)]) == 2
    refused(capsys, "train", evil)

    pkl = evil_pkl(tmp_path / "model_zoo.pkl", marker)
    assert cli(["train", D2, *d2_options(toy_root, tmp_path / "b"), "MODEL.WEIGHTS",
                str(pkl)]) == 2
    refused(capsys, "train", pkl)

    out = tmp_path / "c"
    own = evil_pth(out / "model_0000009.pth", marker)
    (out / "last_checkpoint").write_text(own.name)
    assert cli(["train", D2, *d2_options(toy_root, out), "--resume"]) == 2
    refused(capsys, "train", own)

    for path in (evil, pkl):
        assert cli(["test", D2, str(path), *d2_options(toy_root, tmp_path / "t")]) == 2
        refused(capsys, "test", path)


# ----------------------------------------------------------------------------- convert
def test_convert(tmp_path, marker, capsys):
    evil = evil_pth(tmp_path / "released.pth", marker)
    out = tmp_path / "out.pth"
    assert cli(["convert", str(evil), str(out), "--to", "core"]) != 0
    err = capsys.readouterr().err
    assert str(evil) in err and "--unsafe-load" in err, err
    assert not out.exists()

    cli(["convert", str(evil), str(out), "--to", "core", "--unsafe-load"])  # the explicit flag
    assert marker.read_text().strip() == "pwned"
    marker.unlink()
    capsys.readouterr()
