"""rest_dense.d2.launch: overrides in either spelling, early errors, tools/train_net.py's
detectron2-style command line."""
import argparse

import pytest

from conftest import without_logging_errors

from _d2_utils import LAZY_CONFIG, config_path  # noqa: F401,I100

from rest_dense.d2.launch import (build_parser, check_args, job_overrides,  # noqa: E402
                                  normalize_overrides)


def test_normalize_overrides_accepts_both_spellings():
    mixed = ["MODEL.DEVICE", "cpu", "SOLVER.STEPS=(1,)", "OUTPUT_DIR", "a=b"]
    assert normalize_overrides(mixed, lazy=False) == [
        "MODEL.DEVICE", "cpu", "SOLVER.STEPS", "(1,)", "OUTPUT_DIR", "a=b"]
    assert normalize_overrides(["train.max_iter=5", "train.device", "cpu"], lazy=True) == [
        "train.max_iter=5", "train.device=cpu"]
    with pytest.raises(ValueError, match="has no value"):
        normalize_overrides(["MODEL.DEVICE"], lazy=False)
    with pytest.raises(ValueError, match="has no key"):
        normalize_overrides(["=3"], lazy=True)


def test_job_overrides_add_output_dir_and_weights():
    args = argparse.Namespace(opts=["MODEL.DEVICE", "cpu"], output_dir="out", weights="w.pth")
    assert job_overrides(args, lazy=False) == ["MODEL.DEVICE", "cpu", "OUTPUT_DIR", "out",
                                               "MODEL.WEIGHTS", "w.pth"]
    args = argparse.Namespace(opts=["train.device=cpu"], output_dir="out", weights=None)
    assert job_overrides(args, lazy=True) == ["train.device=cpu", "train.output_dir=out"]


def test_train_net_command_line(tmp_path):
    parser = build_parser()
    args = parser.parse_args(["--config-file", config_path("toy/mask_rcnn_restv2_toy.yaml"),
                              "--resume", "--cpu-threads", "1", "--trust-checkpoint", "a.pth",
                              "--toy-root", str(tmp_path), "MODEL.DEVICE", "cpu"])
    assert args.resume is True and args.cpu_threads == 1 and args.trust_checkpoint == ["a.pth"]
    assert args.opts == ["MODEL.DEVICE", "cpu"]
    check_args(args)
    args.opts = ["MODEL.DEVICE"]
    with pytest.raises(ValueError, match="no value"):
        check_args(args)
    args.opts, args.config_file = [], str(tmp_path / "missing.yaml")
    with pytest.raises(FileNotFoundError, match="missing.yaml does not exist"):
        check_args(args)
    lazy = parser.parse_args(["--config-file", LAZY_CONFIG, "--num-gpus", "0"])
    with pytest.raises(ValueError, match="at least 1"):
        check_args(lazy)
    weights = argparse.Namespace(**{**vars(parser.parse_args(["--config-file", LAZY_CONFIG])),
                                    "weights": str(tmp_path / "nope.pth")})
    with pytest.raises(FileNotFoundError, match="checkpoint .*nope.pth' does not exist"):
        check_args(weights)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU fallback")
@pytest.mark.parametrize("lazy", [False, True])
def test_cuda_device_without_a_gpu_falls_back_to_cpu_with_a_warning(lazy, caplog):
    """MODEL.DEVICE cuda (train.device=cuda) on a machine without a GPU runs on the CPU with
    a warning naming the key, not torch's "Found no NVIDIA driver" at the first .to()."""
    import logging

    from rest_dense.d2.engine import setup_lazy_config, setup_yaml_config

    with caplog.at_level(logging.WARNING):
        if lazy:
            cfg = setup_lazy_config(LAZY_CONFIG, ["train.device=cuda"])
            assert cfg.train.device == "cpu"
        else:
            cfg = setup_yaml_config(config_path("mask_rcnn_restv2_tiny_1x.yaml"),
                                    ["MODEL.DEVICE", "cuda:0"])
            assert cfg.MODEL.DEVICE == "cpu"
    key = "train.device" if lazy else "MODEL.DEVICE"
    assert any(key in r.getMessage() and "running on the CPU" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("body,named", [
    ("dataloader = 1 / 0\n", "ZeroDivisionError: division by zero"),
    ("from .nothere import x\ndataloader = 1\n", "nothere.py has to exist"),
    ("import notapackage_xyz\ndataloader = 1\n", "No module named 'notapackage_xyz'"),
])
def test_a_lazy_config_that_fails_to_load_is_one_line(tmp_path, capsys, body, named):
    """A LazyConfig whose own code raises is the config's error: one line naming the
    error and the config's line, in train and in flops."""
    from rest_dense.cli import main

    path = tmp_path / "lz.py"
    path.write_text(body + "lr_multiplier = None\n")
    for command in ("train", "flops"):
        try:
            rc = main([command, str(path)])
        except SystemExit as exit:
            rc = exit.code
        err = without_logging_errors(capsys.readouterr().err)
        assert rc == 2, err
        assert named in err and f"{path}:" in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err


def test_a_missing_base_yaml_is_named_as_such(tmp_path, capsys):
    from rest_dense.cli import main

    config = tmp_path / "mine.yaml"
    config.write_text("_BASE_: nothere.yaml\nMODEL:\n  DEVICE: cpu\n")
    for command in ("train", "flops"):
        rc = main([command, str(config)])
        err = without_logging_errors(capsys.readouterr().err)
        assert rc == 2 and f"config {config}: the _BASE_ file {tmp_path / 'nothere.yaml'} does " \
                           "not exist" in err and "Traceback" not in err, err
