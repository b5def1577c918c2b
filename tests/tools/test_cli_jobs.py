"""`rest-dense train` / `test` / `demo`: parsing
the shared command line, light command modules, thin tool scripts. (The jobs themselves
run in tests/mm/test_mm_tools.py, tests/d2/test_d2_toy.py and tests/tools/test_toy.py.)"""
import subprocess
import sys

import pytest

from rest_dense.cli import build_parser, main as cli
from rest_dense.commands import train as train_cmd

from conftest import REPO

# every test here may start a process: a hung one fails after the timeout (pytest-timeout)
pytestmark = pytest.mark.timeout(600, func_only=True)


def test_overrides_may_follow_options():
    parser = build_parser("train")
    args = parser.parse_args(["train", "C", "--work-dir", "W", "a.b=1", "--amp", "c=2"])
    assert args.overrides == ["a.b=1", "c=2"] and args.work_dir == "W" and args.amp
    args = parser.parse_args(["train", "C", "MODEL.DEVICE", "cpu", "--num-gpus", "2",
                              "SOLVER.MAX_ITER", "3"])
    assert args.overrides == ["MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", "3"] and args.num_gpus == 2
    args = build_parser("test").parse_args(["test", "C", "K", "--tta", "x=1", "--weights-only"])
    assert (args.config, args.checkpoint, args.overrides) == ("C", "K", ["x=1"])
    assert args.tta and args.weights_only


def test_metrics_without_a_value_are_null_in_standard_json(tmp_path, capsys):
    """An evaluation with nothing to score gives NaN metrics: --save-metrics writes standard
    JSON (null) and a warning names them; finite values are kept as they are."""
    import json

    out = tmp_path / "m.json"
    train_cmd.print_metrics({"sem_seg": {"mIoU": float("nan"), "aAcc": 97.5},
                             "bbox/AP": float("inf")}, str(out))
    text = out.read_text()
    assert json.loads(text) == {"sem_seg/mIoU": None, "sem_seg/aAcc": 97.5, "bbox/AP": None}
    assert "NaN" not in text and "Infinity" not in text
    err = capsys.readouterr().err
    assert "2 metric(s) without a value" in err and "sem_seg/mIoU" in err and "bbox/AP" in err
    train_cmd.print_metrics({"mIoU": 40.0}, str(out))
    assert json.loads(out.read_text()) == {"mIoU": 40.0}
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("argv,resume,overrides", [
    (["C", "--resume"], "auto", []),
    (["C", "--resume", "a.b=1"], "auto", ["a.b=1"]),
    (["C", "--resume", "MODEL.DEVICE", "cpu"], "auto", ["MODEL.DEVICE", "cpu"]),
    (["C", "--resume", "work/iter_8.pth"], "work/iter_8.pth", []),
])
def test_resume_does_not_swallow_an_override(argv, resume, overrides):
    args = build_parser("train").parse_args(["train", *argv])
    train_cmd.fix_resume(args)
    assert args.resume == resume and args.overrides == overrides


@pytest.mark.parametrize("argv,trusted,overrides", [
    (["C", "--trust-checkpoint", "{f}", "train_cfg.max_iters=2"], ["{f}"], ["train_cfg.max_iters=2"]),
    (["C", "--trust-checkpoint", "{f}", "{d}", "MODEL.DEVICE", "cpu"], ["{f}", "{d}"],
     ["MODEL.DEVICE", "cpu"]),
    (["C", "--trust-checkpoint", "{f}"], ["{f}"], []),
    (["C", "x=1", "--trust-checkpoint", "{f}", "y=2"], ["{f}"], ["y=2", "x=1"]),
])
def test_trust_checkpoint_does_not_swallow_overrides(tmp_path, argv, trusted, overrides):
    """Overrides written after --trust-checkpoint's paths were read as paths and dropped
    (a run of 600 iterations instead of 2)."""
    f = tmp_path / "a=b.pth"  # an existing path stays a path, even with '=' in its name
    f.write_bytes(b"")
    fill = lambda items: [i.format(f=f, d=tmp_path) for i in items]  # noqa: E731
    args = build_parser("train").parse_args(["train", *fill(argv)])
    train_cmd.fix_trust(args)
    assert args.trust_checkpoint == fill(trusted) and args.overrides == overrides


def test_unknown_config_suggests_names(capsys):
    assert cli(["train", "toy/mask_rcnn_restv2_toyy.py"]) == 2
    err = capsys.readouterr().err
    assert "rest-dense train: error:" in err and "toy/mask_rcnn_restv2_toy.py" in err


def test_command_modules_import_no_framework(subprocess_env):
    """`rest-dense train --help` must not pay for (or need) mmengine / detectron2."""
    code = ("import sys\n"
            "from rest_dense.cli import main\n"
            "for cmd in ('train', 'test', 'demo'):\n"
            "    try:\n"
            "        main([cmd, '--help'])\n"
            "    except SystemExit as e:\n"
            "        assert e.code == 0, e.code\n"
            "import rest_dense.demo, rest_dense.safe_load, rest_dense.amp\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in\n"
            "               ('mmengine', 'mmcv', 'mmdet', 'mmseg', 'detectron2', 'fvcore'))\n"
            "print('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], env=subprocess_env, capture_output=True,
                         text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout
    assert "rest-dense demo" in out.stdout and "--trust-checkpoint" in out.stdout


@pytest.mark.parametrize("script,command", [("train.py", '"train"'), ("test.py", '"test"'),
                                            ("demo.py", '"demo"'), ("train_net.py", "cli_main")])
def test_tool_scripts_are_thin(script, command):
    text = (REPO / "tools" / script).read_text()
    assert "sys.path" not in text and command in text
    code = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(code) < 25, f"tools/{script} should only call into rest_dense"


@pytest.mark.parametrize("argv,prog", [
    (["infer", "C", "K", "imgs", "--out", "o", "--no-such-option", "1"], "rest-dense infer"),
    (["train", "C", "--no-such-option"], "rest-dense train"),
    (["--no-such-option"], "rest-dense"),
])
def test_unknown_options_get_the_subcommands_usage(argv, prog, capsys):
    with pytest.raises(SystemExit) as info:
        cli(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert f"{prog}: error: unrecognized arguments: --no-such-option" in err, err
    assert err.startswith(f"usage: {prog}"), err
