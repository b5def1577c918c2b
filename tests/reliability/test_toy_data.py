"""The toy dataset as a wheel user meets it: written by `python -m rest_dense.data.toy`,
found through --toy-root by the OpenMMLab toy configs as by detectron2's, and named with how
to write it when it is missing."""
import subprocess
import sys

import pytest

from rest_dense.cli import main as cli
from rest_dense.data.toy import generate_toy_dataset

from conftest import without_logging_errors


def test_module_writes_the_dataset_and_refuses_bad_counts(tmp_path, subprocess_env):
    out = tmp_path / "toy"
    proc = subprocess.run([sys.executable, "-m", "rest_dense.data.toy", "--out", str(out),
                           "--num-train", "2", "--num-val", "1", "--size", "32"],
                          env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (out / "annotations" / "instances_train.json").is_file()
    assert len(list((out / "images" / "training").glob("*.png"))) == 2
    proc = subprocess.run([sys.executable, "-m", "rest_dense.data.toy", "--out",
                           str(tmp_path / "bad"), "--num-train", "-1"],
                          env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "num_train must be an integer >= 1, got -1" in proc.stderr
    for bad, named in ((dict(num_val=0), "num_val"), (dict(size=8), "size"),
                       (dict(class_color_prob=float("nan")), "class_color_prob")):
        with pytest.raises(ValueError, match=named):
            generate_toy_dataset(tmp_path / "bad2", **bad)


@pytest.mark.parametrize("config", ["toy/mask_rcnn_restv2_toy.py",
                                    "detectron2/toy/mask_rcnn_restv2_toy.yaml"])
def test_missing_toy_data_says_how_to_write_it(tmp_path, capsys, monkeypatch, config):
    monkeypatch.chdir(tmp_path)  # no data/toy here
    monkeypatch.delenv("REST_DENSE_TOY_ROOT", raising=False)
    code = cli(["train", config, "--work-dir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "instances_train.json" in err and "python -m rest_dense.data.toy --out data/toy" in err
    assert "Traceback" not in without_logging_errors(err)


def _train_toy_upernet(tmp_path, root, batch_size):
    """One iteration of the toy UperNet on a toy dataset written at ``root``."""
    generate_toy_dataset(root, num_train=2, num_val=1, size=64)
    return cli(["train", "toy/upernet_restv2_toy.py", "--work-dir", str(tmp_path / "w"),
                "--toy-root", str(root), "--threads", "1", "train_cfg.max_iters=1",
                f"train_dataloader.batch_size={batch_size}", "train_dataloader.num_workers=0"])


def test_openmmlab_toy_configs_take_the_toy_root(tmp_path, capsys):
    root = tmp_path / "elsewhere"
    code = _train_toy_upernet(tmp_path, root, batch_size=2)
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    assert (tmp_path / "w" / "iter_1.pth").is_file()
    # a config that reads no toy data: the option is refused, not ignored
    code = cli(["train", "upernet/upernet_restv2-t_8xb2-160k_ade20k-512x512.py",
                "--work-dir", str(tmp_path / "w2"), "--toy-root", str(root)])
    assert code == 2 and "--toy-root: the config reads nothing under data/toy/" in \
        capsys.readouterr().err


def test_batch_of_one_for_a_head_with_batchnorm_is_one_line(tmp_path, capsys):
    """UPerHead's 1x1 pooling branch has a BatchNorm: one image per step fails in torch's
    check at the first step; the batch size is named instead of a traceback."""
    code = _train_toy_upernet(tmp_path, tmp_path / "toy", batch_size=1)
    err = capsys.readouterr().err
    assert code == 2 and "train_dataloader.batch_size" in err and "at least 2 images" in err
    assert "Traceback" not in without_logging_errors(err)


def test_empty_toy_root_and_empty_checkpoint_are_refused(tmp_path, capsys):
    """An empty --toy-root pointed the data at / ; an empty checkpoint reached detectron2's
    eval-only check with a traceback."""
    assert cli(["train", "toy/retinanet_restv2_toy.py", "--toy-root", "",
                "--work-dir", str(tmp_path / "w")]) == 2
    assert "--toy-root needs a folder" in capsys.readouterr().err
    for config in ("toy/retinanet_restv2_toy.py", "detectron2/toy/retinanet_restv2_toy.yaml"):
        assert cli(["test", config, " ", "--work-dir", str(tmp_path / "w")]) == 2
        err = capsys.readouterr().err
        assert "the checkpoint to evaluate is an empty string" in err and "Traceback" not in err


def test_vt_fpn_token_norm_with_one_value_is_one_line(tmp_path, capsys):
    root = tmp_path / "toy"
    generate_toy_dataset(root, num_train=2, num_val=1, size=64)
    code = cli(["train", "toy/vt_fpn_restv2_toy.py", "--work-dir", str(tmp_path / "w"),
                "--toy-root", str(root), "--threads", "1", "train_cfg.max_iters=1",
                "train_dataloader.batch_size=1", "model.neck.num_tokens=1",
                "train_dataloader.num_workers=0"])
    err = capsys.readouterr().err
    assert code == 2 and "needs more than one token" in err and "train_dataloader.batch_size" in err
    assert "Traceback" not in without_logging_errors(err)


def test_max_iters_none_is_refused_not_dropped(tmp_path, capsys):
    """`train_cfg.max_iters=None` was dropped and the config's 600 iterations trained."""
    assert cli(["train", "toy/retinanet_restv2_toy.py", "--work-dir", str(tmp_path / "w"),
                "train_cfg.max_iters=None"]) == 2
    assert "train_cfg.max_iters must be a whole number, got None" in capsys.readouterr().err


def test_a_checkpoint_url_that_does_not_download_is_one_line():
    from urllib.error import HTTPError, URLError

    from rest_dense.utils import error_text

    assert error_text(URLError(OSError(-2, "Name or service not known"))).startswith(
        "cannot download from the URL:")
    assert error_text(HTTPError("https://x/w.pth", 404, "Not Found", {}, None)) == \
        "cannot download https://x/w.pth: HTTP 404 Not Found"
