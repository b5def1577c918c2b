"""The toy dataset registered in detectron2: a short CPU training run of the shipped toy config
(through RestTrainer, with COCO evaluation) clearly improves box AP; ``rest-dense train`` /
``rest-dense test`` on a detectron2 config (train, resume, evaluate); the AMP fallback."""
import json
import logging
import math
import os
import subprocess
import sys

import pytest
import torch

from _d2_utils import LAZY_CONFIG, config_path  # noqa: F401,I100
from conftest import without_logging_errors  # noqa: I100

from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402

from rest_dense import amp, safe_load  # noqa: E402
from rest_dense.cli import main as cli  # noqa: E402
from rest_dense.d2 import register_toy_datasets  # noqa: E402
from rest_dense.d2.data import toy_class_names  # noqa: E402
from rest_dense.d2.engine import RestTrainer, _amp_guard, setup_yaml_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy_root(make_toy_root):
    return make_toy_root(num_train=48, num_val=12)  # enough to learn something


def test_register_toy_datasets(toy_root):
    names = register_toy_datasets(toy_root, prefix="d2test_toy")
    assert set(names) == {"d2test_toy_train", "d2test_toy_val"}
    register_toy_datasets(toy_root, prefix="d2test_toy")  # idempotent
    dicts = DatasetCatalog.get("d2test_toy_val")
    assert len(dicts) == 12 and all(d["annotations"] for d in dicts)
    assert MetadataCatalog.get("d2test_toy_val").thing_classes == ["circle", "square", "triangle"]


def test_toy_class_names_without_data(tmp_path, subprocess_env):
    """infer names the toy classes of the default toy dataset names without data, and
    importing rest_dense.d2 claims no such name: a dataset of your own called toy_train,
    with other classes, registers and loads (in a fresh process: nothing registered)."""
    assert toy_class_names("toy_val") == ["circle", "square", "triangle"]
    assert toy_class_names("coco_2017_val") is None
    own = tmp_path / "own.json"
    own.write_text(json.dumps({"images": [], "annotations": [],
                               "categories": [{"id": 1, "name": "cat"}]}))
    code = ("import sys, rest_dense.d2\n"
            "from detectron2.data import DatasetCatalog, MetadataCatalog\n"
            "from detectron2.data.datasets import register_coco_instances\n"
            "register_coco_instances('toy_train', {}, sys.argv[1], sys.argv[2])\n"
            "assert DatasetCatalog.get('toy_train') == []\n"
            "print(MetadataCatalog.get('toy_train').thing_classes)\n")
    res = subprocess.run([sys.executable, "-c", code, str(own), str(tmp_path)],
                         capture_output=True, text=True, env=subprocess_env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "['cat']"


@pytest.mark.slow
def test_toy_training_improves_ap(toy_root, tmp_path):
    register_toy_datasets(toy_root, prefix="d2test_toy")
    cfg = setup_yaml_config(config_path("toy/mask_rcnn_restv2_toy.yaml"), [
        "MODEL.DEVICE", "cpu",
        "DATASETS.TRAIN", "('d2test_toy_train',)", "DATASETS.TEST", "('d2test_toy_val',)",
        "SOLVER.MAX_ITER", "50", "SOLVER.STEPS", "(40,)", "SOLVER.WARMUP_ITERS", "10",
        "SOLVER.BASE_LR", "0.002", "SOLVER.IMS_PER_BATCH", "8", "DATALOADER.NUM_WORKERS", "0",
        "OUTPUT_DIR", str(tmp_path / "out"),
    ])
    trainer = RestTrainer(cfg)  # creates OUTPUT_DIR
    trainer.resume_or_load(resume=False)
    before = RestTrainer.test(cfg, trainer.model)["bbox"]["AP"]
    after = trainer.train()["bbox"]["AP"]  # evaluated at the end of training
    with open(tmp_path / "out" / "metrics.json") as f:
        losses = [json.loads(line)["total_loss"] for line in f if "total_loss" in line]
    assert losses[-1] < losses[0], losses
    print(f"toy bbox AP: untrained {before:.2f}, after 50 iterations {after:.2f}")
    assert after > before + 10.0, (before, after)  # measured: 0.0 -> 30.0
    assert os.path.isfile(tmp_path / "out" / "model_final.pth")


def _metrics_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_cli_train_resume_and_test(toy_root, tmp_path, capsys):
    """`rest-dense train` on the shipped toy yaml (by name), `--resume` from the output
    folder, then `rest-dense test` of the final checkpoint."""
    safe_load.forget_trusted()
    config = "detectron2/toy/mask_rcnn_restv2_toy.yaml"
    out = tmp_path / "out"
    common = ["--threads", "1", "--toy-root", str(toy_root), "--work-dir", str(out)]
    small = ["MODEL.DEVICE", "cpu", "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
             "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS=(1,)", "TEST.EVAL_PERIOD", "0"]
    assert cli(["train", config, *common, *small, "SOLVER.MAX_ITER", "2"]) == 0
    final = out / "model_final.pth"
    assert final.is_file() and (out / "last_checkpoint").is_file()
    assert not safe_load.is_trusted(final)  # nothing is trusted implicitly, not even OUTPUT_DIR
    # what training wrote loads without full unpickling, optimizer state included
    ckpt = safe_load.load_checkpoint_file(final, trusted=False)
    assert ckpt["iteration"] == 1 and ckpt["trainer"]["_trainer"]["optimizer"]["state"]
    losses = [m for m in _metrics_lines(out / "metrics.json") if "total_loss" in m]
    assert losses and all(math.isfinite(m["total_loss"]) for m in losses)
    assert "Starting training from iteration 0" in (out / "log.txt").read_text()

    # --resume continues at iteration 2 with the restored optimizer, not from scratch
    assert cli(["train", config, *common, "--resume", *small, "SOLVER.MAX_ITER", "3"]) == 0
    assert "Starting training from iteration 2" in (out / "log.txt").read_text()
    assert torch.load(final, weights_only=True)["iteration"] == 2

    capsys.readouterr()
    saved = tmp_path / "metrics.json"
    assert cli(["test", config, str(final), "--threads", "1", "--toy-root", str(toy_root),
                "--work-dir", str(tmp_path / "eval"), "--save-metrics", str(saved),
                "MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0"]) == 0
    metrics = json.loads(saved.read_text())
    assert {"bbox/AP", "segm/AP"} <= set(metrics), metrics
    assert all(math.isfinite(metrics[k]) for k in ("bbox/AP", "segm/AP", "bbox/AP50"))
    assert "bbox/AP" in capsys.readouterr().out
    safe_load.forget_trusted()


def test_fresh_run_into_an_earlier_runs_folder_warns(toy_root, tmp_path, capsys, caplog):
    """Without --resume, an output folder with an earlier run's checkpoints is named
    before anything else happens (here: a missing MODEL.WEIGHTS stops the run next)."""
    out = tmp_path / "out"
    out.mkdir()
    torch.save({"model": {}, "iteration": 9}, out / "model_0000009.pth")
    with caplog.at_level(logging.WARNING):
        code = cli(["train", "detectron2/toy/mask_rcnn_restv2_toy.yaml", "--threads", "1",
                    "--toy-root", str(toy_root), "--work-dir", str(out), "MODEL.DEVICE", "cpu",
                    "MODEL.WEIGHTS", str(tmp_path / "missing.pth")])
    captured = capsys.readouterr()
    assert code == 2 and "missing.pth" in captured.err
    said = caplog.text + captured.out + captured.err
    assert "holds checkpoints of an earlier run (newest: model_0000009.pth)" in said


def test_cli_rejects_options_of_the_other_framework(capsys):
    config = "detectron2/toy/mask_rcnn_restv2_toy.yaml"
    assert cli(["train", config, "--launcher", "pytorch"]) == 2
    assert "--launcher is not an option for a detectron2 config" in capsys.readouterr().err
    assert cli(["test", config, "model.pth", "--tta"]) == 2
    assert "--tta" in capsys.readouterr().err
    assert cli(["test", config, "missing_model.pth"]) == 2
    assert "checkpoint 'missing_model.pth' does not exist" in capsys.readouterr().err
    assert cli(["train", config, "SOLVER.MAX_ITER"]) == 2
    assert "has no value" in capsys.readouterr().err


def test_amp_fallback_uses_shared_helper(monkeypatch, caplog):
    """detectron2's AMP guard asks rest_dense.amp (the same helper as the mm adapter's); the
    AMPTrainer of detectron2 0.5 runs on CUDA only."""
    monkeypatch.setattr(amp, "accelerator_available", lambda device_type: True)
    assert _amp_guard("cuda", True) and _amp_guard("cuda:1", True)
    assert not _amp_guard("npu", True) and not _amp_guard("cpu", True)
    assert not _amp_guard("cuda", False)
    monkeypatch.setattr(amp, "accelerator_available", lambda device_type: False)
    with caplog.at_level("WARNING", logger="rest_dense.d2"):
        assert not _amp_guard("cuda", True)
    assert "training in fp32" in caplog.text
    cfg = setup_yaml_config(config_path("mask_rcnn_restv2_tiny_3x.yaml"), ["MODEL.DEVICE", "cpu"])
    assert cfg.SOLVER.AMP.ENABLED is False


@pytest.mark.parametrize("command", ["train", "test"])
@pytest.mark.parametrize("opts,named", [
    (["MODEL.RESTV2.ATTN_MODE", "winn"], "winn"),  # refused by the backbone
    (["MODEL.RESTV2.DROP_PATH_RATE", "-1"], "DROP_PATH_RATE"),  # by yacs' type check
    (["MODEL.NOPE", "3"], "MODEL.NOPE"),  # by yacs' key check (an assertion)
])
def test_cli_bad_config_value_is_one_line(tmp_path, capsys, command, opts, named):
    ckpt = tmp_path / "any.pth"
    torch.save({"model": {}}, ckpt)
    argv = [command, config_path("toy/mask_rcnn_restv2_toy.yaml"), *([str(ckpt)] if command == "test" else []),
            "--work-dir", str(tmp_path / "w"), "MODEL.DEVICE", "cpu", *opts]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert f"rest-dense {command}: error: the config does not build" in err and named in err
    assert "Traceback" not in without_logging_errors(err)


@pytest.mark.parametrize("option,named", [
    ("model.backbone.bottom_up.attn_mode=winn", "winn"),
    # read by detectron2 only after training started (the yacs checks, lazy names)
    ("train.checkpointer.period=0", "train.checkpointer.period must be >= 1"),
    ("train.eval_period=-1", "train.eval_period must be >= 0"),
    ("dataloader.test.dataset.names=coco_2017_vall", "close: coco_2017_val"),
    ("model.pixel_std=[1.0,0.0,1.0]", "model.pixel_std values must be > 0"),
    # a misspelt key would be added (and the config's own 270k iterations trained)
    ("train.max_iters=1", "no key 'train.max_iters' (nothing under 'train' of that name); "
                          "did you mean train.max_iter?"),
    ("train.max_iter=abc", "train.max_iter must be a whole number, got 'abc'"),
    ("train.max_iter=2.5", "train.max_iter must be a whole number, got 2.5"),
    ("train.max_iter=0", "train.max_iter must be at least 1, got 0"),
    ("train.max_iter=[1,2", "cannot parse the override"),
])
def test_cli_bad_lazy_config_value_is_one_line(tmp_path, capsys, option, named):
    argv = ["train", LAZY_CONFIG, "--work-dir", str(tmp_path / "w"), "train.device=cpu", option]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert "the config does not build" in err and named in err
    assert "Traceback" not in without_logging_errors(err)


def test_train_net_bad_config_value_is_one_line(tmp_path, capsys):
    """tools/train_net.py (detectron2's command line) reports a config that does not build
    as `rest-dense train` does: one line, exit 2."""
    from rest_dense.d2.launch import cli_main

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--config-file", config_path("toy/mask_rcnn_restv2_toy.yaml"),
                  "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path / "w"),
                  "MODEL.RESTV2.ATTN_MODE", "winn"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: the config does not build" in err and "winn" in err
    assert "Traceback" not in without_logging_errors(err)


def test_cli_bad_solver_value_and_missing_data_are_one_line(tmp_path, capsys, toy_root):
    """Checked by detectron2's assertions when the trainer builds its loader; and a dataset
    folder without the data."""
    argv = ["train", config_path("toy/mask_rcnn_restv2_toy.yaml"), "--work-dir",
            str(tmp_path / "w"), "MODEL.DEVICE", "cpu"]
    assert cli([*argv, "--toy-root", str(toy_root), "SOLVER.IMS_PER_BATCH", "0"]) == 2
    err = capsys.readouterr().err
    assert "the config does not build: Total batch size (0)" in err
    assert "Traceback" not in without_logging_errors(err)
    # read by detectron2 only after training started: refused before it starts
    for opts, named in ((["DATASETS.TEST", '("toy_vall",)'], "close: toy_val"),
                        (["SOLVER.CHECKPOINT_PERIOD", "0", "SOLVER.SCALE_SCHEDULE_WITH_MAX_ITER",
                          "False"], "SOLVER.CHECKPOINT_PERIOD must be >= 1"),
                        # a std of 0 made every input inf; a short mean, a tensor shape error
                        (["MODEL.PIXEL_STD", "[1.0, 2.0, 0.0]"], "MODEL.PIXEL_STD values must be > 0"),
                        (["MODEL.PIXEL_MEAN", "[1.0, 2.0]"], "one value per input channel"),
                        # one check_count for both frameworks, with and without scaling
                        (["SOLVER.MAX_ITER", "0"], "SOLVER.MAX_ITER must be at least 1, got 0"),
                        (["SOLVER.MAX_ITER", "2.5"], "SOLVER.MAX_ITER must be an integer"),
                        (["SOLVER.MAX_ITER", str(2 ** 31)], "SOLVER.MAX_ITER must be at most"),
                        (["SOLVER.SCALE_SCHEDULE_WITH_MAX_ITER", "False", "SOLVER.MAX_ITER",
                          "2.5"], "for config key: SOLVER.MAX_ITER")):
        assert cli([*argv, "--toy-root", str(toy_root), *opts]) == 2
        err = capsys.readouterr().err
        assert "the config does not build" in err and named in err
        assert not (tmp_path / "w" / "model_final.pth").exists()
    assert cli([*argv, "--toy-root", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "rest-dense train: error:" in err and "nowhere" in err
    assert "Traceback" not in without_logging_errors(err)


def test_lazy_overrides_of_call_arguments_left_at_their_defaults():
    """An argument a LazyCall target takes is a key even when the config leaves it out;
    a name the target does not take is refused with the close ones."""
    from detectron2.config import LazyCall as L
    from omegaconf import OmegaConf

    from rest_dense.d2.engine import check_lazy_overrides

    cfg = OmegaConf.create({"m": L(torch.nn.Linear)(in_features=2, out_features=3),
                            "train": {"max_iter": 5}})
    check_lazy_overrides(cfg, ["m.bias=False", "train.max_iter=2", "+train.extra=1"])
    with pytest.raises(KeyError, match=r"no key 'm.biass'.*did you mean .*m\.bias"):
        check_lazy_overrides(cfg, ["m.biass=False"])
    with pytest.raises(KeyError, match=r"no key 'train.max_iters'.*train\.max_iter\?"):
        check_lazy_overrides(cfg, ["train.max_iters=1"])


def test_yaml_checks_keep_python_tags_and_name_broken_files(tmp_path):
    from rest_dense.d2.engine import setup_yaml_config

    base = config_path("toy/mask_rcnn_restv2_toy.yaml")
    tagged = tmp_path / "tuple.yaml"
    tagged.write_text(f'_BASE_: "{base}"\nINPUT:\n  MIN_SIZE_TRAIN: !!python/tuple [64, 96]\n')
    assert tuple(setup_yaml_config(str(tagged), ["MODEL.DEVICE", "cpu"]).INPUT.MIN_SIZE_TRAIN) \
        == (64, 96)
    for text, message in (("MODEL:\n  WEIGHTS: [\n", "not a valid YAML config"),
                          ("", "is empty"), ("- 1\n- 2\n", "not a mapping")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            setup_yaml_config(str(bad))
