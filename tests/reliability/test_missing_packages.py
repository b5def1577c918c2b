"""A core install (the wheel alone) lacks the optional packages: each command that needs one
names it and how to install it, in one line, instead of a traceback. The packages are made
unimportable in a child interpreter (a meta-path finder that refuses them), as on a machine
without them."""
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(600)

BLOCKER = textwrap.dedent('''
    import os, sys
    _BLOCK = set(os.environ["BLOCK_MODULES"].split(","))
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in _BLOCK:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, _Block())
''')


@pytest.fixture(scope="module")
def blocker(tmp_path_factory):
    folder = tmp_path_factory.mktemp("blocker")
    (folder / "sitecustomize.py").write_text(BLOCKER)
    return folder


def _run(blocker, subprocess_env, tmp_path, module, args):
    env = dict(subprocess_env, BLOCK_MODULES=module,
               PYTHONPATH=f"{blocker}:{subprocess_env['PYTHONPATH']}")
    proc = subprocess.run([sys.executable, "-m", "rest_dense.cli", *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("module,args,how", [
    ("fvcore", ["flops", "restv2_tiny"], "pip install fvcore"),
    ("onnx", ["export", "restv2_tiny", "--out", "m.onnx"], "pip install onnx"),
    ("detectron2", ["flops", "detectron2/toy/mask_rcnn_restv2_toy.yaml"], "detectron2.git"),
    ("detectron2", ["train", "detectron2/toy/mask_rcnn_restv2_toy.yaml"], "detectron2.git"),
    ("mmdet", ["train", "toy/mask_rcnn_restv2_toy.py"], "rest_dense[mm]"),
    ("mmseg", ["flops", "toy/upernet_restv2_toy.py"], "rest_dense[mm]"),
    ("mmengine", ["test", "toy/mask_rcnn_restv2_toy.py", "m.pth"], "rest_dense[mm]"),
    # refused before the work, not after it
    ("onnxruntime", ["export", "restv2_tiny", "--out", "m.onnx"], "pip install onnxruntime"),
    ("matplotlib", ["bench", "restv2_tiny", "--shape", "32x32", "--plot", "p.png"],
     "pip install matplotlib"),
    # before the toy data and the work dir are written
    ("mmengine", ["demo", "--data-root", "d", "--work-dir", "w"], "rest_dense[mm]"),
    ("mmseg", ["demo", "--task", "seg", "--data-root", "d", "--work-dir", "w"], "rest_dense[mm]"),
])
def test_a_missing_optional_package_is_named(blocker, subprocess_env, tmp_path, module, args, how):
    (tmp_path / "m.pth").write_bytes(b"")
    code, err = _run(blocker, subprocess_env, tmp_path, module, args)
    assert code == 2, err[-2000:]
    assert f"this needs {module}, which is not installed" in err and how in err, err[-2000:]
    assert "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "p.png").exists()
    assert not (tmp_path / "d").exists() and not (tmp_path / "w").exists()


def test_blocking_works_and_other_packages_still_run(blocker, subprocess_env, tmp_path):
    """The blocker makes the package unimportable, and nothing else: with fvcore blocked,
    the conversion of a checkpoint still runs."""
    env = dict(subprocess_env, BLOCK_MODULES="fvcore",
               PYTHONPATH=f"{blocker}:{subprocess_env['PYTHONPATH']}")
    probe = subprocess.run([sys.executable, "-c", "import fvcore"], env=env,
                           capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'fvcore'" in probe.stderr
    code, err = _run(blocker, subprocess_env, tmp_path, "fvcore", ["configs", "toy/*"])
    assert code == 0, err


def test_a_package_that_imports_in_part_is_named_as_such():
    from rest_dense.utils import error_text, missing_package_hint

    ext = ModuleNotFoundError("No module named 'mmcv._ext'", name="mmcv._ext")
    assert "this needs mmcv, whose install is incomplete" in missing_package_hint(ext)
    c_ext = ImportError("cannot import name '_C' from 'detectron2'", name="detectron2")
    assert "this needs detectron2, whose install is incomplete" in error_text(c_ext)
    whole = ModuleNotFoundError("No module named 'fvcore'", name="fvcore")
    assert error_text(whole).startswith("this needs fvcore, which is not installed")
    assert missing_package_hint(ModuleNotFoundError("x", name="rest_dense.nothing")) is None
    assert missing_package_hint(ValueError("mmdet")) is None


def test_flops_all_with_every_toolbox_missing_fails(blocker, subprocess_env, tmp_path):
    """`flops --all` skips the configs whose toolbox is missing; when that leaves nothing,
    it says so and fails instead of printing an empty table with status 0."""
    code, err = _run(blocker, subprocess_env, tmp_path, "mmengine,mmdet,mmseg,detectron2",
                     ["flops", "--all", "--params-only", "--no-progress"])
    assert code == 1, err[-2000:]
    assert "skipping" in err and "no target could be counted" in err and "Traceback" not in err
