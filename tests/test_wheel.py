"""The package as users get it: build the wheel from the tracked files, install it (without
dependencies) into a fresh virtual environment that sees the pinned stack, and use it from a
directory outside the checkout."""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

# every test here may start a process: a hung one fails after the timeout (pytest-timeout)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400, func_only=True)]


def _run(cmd, cwd, env, timeout=600):
    proc = subprocess.run([str(c) for c in cmd], cwd=str(cwd), env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, (f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                                  f"{proc.stderr[-3000:]}")
    return proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel built from a copy of the tracked files (what a clean clone holds)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    dist = root / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", dist, src], cwd=root, env=dict(os.environ))
    wheels = list(dist.glob("rest_dense-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    configs = [n for n in names if n.startswith("rest_dense/.mim/configs/")]
    on_disk = [p for p in (REPO / "configs").rglob("*")
               if p.suffix in (".py", ".yaml", ".md") and "__pycache__" not in p.parts]
    assert len(configs) == len(on_disk) > 30
    for rel in ("mask_rcnn/mask-rcnn_restv2-t_fpn_amp-ms-1x_coco.py", "_base_/default_runtime_det.py",
                "detectron2/Base-RCNN-FPN-ResTv2.yaml", "detectron2/lazy/mask_rcnn_restv2_tiny_3x.py",
                "toy/mask_rcnn_restv2_toy.py"):
        assert f"rest_dense/.mim/configs/{rel}" in names, rel
    for mod in ("rest_dense/models/registry.py", "rest_dense/cli.py", "rest_dense/mm/backbones.py",
                "rest_dense/d2/backbone.py", "rest_dense/data/toy.py"):
        assert mod in names, mod
    assert not any(n.startswith(("tests/", "tools/")) for n in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "rest-dense = rest_dense.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    print(f"wheel: {wheel.name}, {len(names)} files, {len(configs)} configs")


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """A fresh venv with only the wheel installed; the pinned stack comes from the project's
    environment through a .pth line. Returns (venv python, env, outside working dir)."""
    root = tmp_path_factory.mktemp("venv")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=root, env=dict(os.environ))
    py = venv / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=root, env=dict(os.environ)).strip())
    (site / "project_stack.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([py, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], cwd=root,
         env=dict(os.environ))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1")
    work = root / "outside"
    work.mkdir()
    return py, env, work


def test_installed_package_is_the_wheel(installed):
    py, env, work = installed
    code = textwrap.dedent("""
        import json, sys, torch
        import rest_dense
        from rest_dense.configs import configs_root
        from rest_dense.models import create_model
        m = create_model('restv2_tiny', attn_mode='win').eval()
        with torch.no_grad():
            outs = m(torch.randn(1, 3, 112, 137))
        assert all(torch.isfinite(o).all() for o in outs)
        print(json.dumps(dict(file=rest_dense.__file__, root=str(configs_root()),
                              shapes=[list(o.shape) for o in outs], version=rest_dense.__version__)))
    """)
    info = json.loads(_run([py, "-c", code], cwd=work, env=env).strip().splitlines()[-1])
    assert str(REPO) not in info["file"] and "site-packages" in info["file"]
    assert info["root"].endswith(os.path.join("rest_dense", ".mim", "configs"))
    assert info["shapes"] == [[1, 96, 28, 35], [1, 192, 14, 18], [1, 384, 7, 9], [1, 768, 4, 5]]


def test_installed_mmdet_config_builds(installed):
    py, env, work = installed
    code = textwrap.dedent("""
        from mmengine.config import Config
        from mmengine.registry import init_default_scope
        from rest_dense.configs import get_config_path
        cfg = Config.fromfile(get_config_path('mask_rcnn/mask-rcnn_restv2-t_fpn_amp-ms-1x_coco.py'))
        init_default_scope('mmdet')
        from mmdet.registry import MODELS   # rest_dense.mm registered through custom_imports
        model = MODELS.build(cfg.model)
        n = sum(p.numel() for p in model.parameters())
        print('PARAMS', n, type(model.backbone).__name__)
    """)
    out = _run([py, "-c", code], cwd=work, env=env)
    assert "PARAMS 49941024 MMResTv2" in out  # the paper's 49.94M


def test_installed_cli(installed):
    py, env, work = installed
    cli = Path(py).with_name("rest-dense")
    out = _run([cli, "configs"], cwd=work, env=env)
    assert "mask_rcnn/mask-rcnn_restv2-t_fpn_amp-ms-1x_coco.py" in out and ".mim" in out
    out = _run([cli, "flops", "restv2_tiny"], cwd=work, env=env)
    assert "restv2_tiny" in out
    assert _run([cli, "--version"], cwd=work, env=env).strip().startswith("rest_dense ")


def test_installed_demo_runs(installed):
    py, env, work = installed
    cli = Path(py).with_name("rest-dense")
    _run([cli, "demo", "--task", "seg", "--max-iters", "4", "--threads", "1",
          "--work-dir", work / "wd"], cwd=work, env=env, timeout=900)
    metrics = list((work / "wd").rglob("metrics.json"))
    assert metrics, "the demo wrote no metrics.json"
    assert (work / "data" / "toy").is_dir()


def test_wheel_built_from_the_sdist_ships_the_configs(wheel, tmp_path):
    """`python -m build` makes the wheel from the sdist: the sdist must carry configs/ (and
    the tests and tools that check it), or the wheel ships no config."""
    src = tmp_path / "src"
    shutil.copytree(wheel.parent.parent / "src", src)
    junk = ["tools/work_dirs/run/iter_1.pth", "tests/outputs/run/log.json", "docs/run.log",
            "tests/.pytest_cache/README.md", "tests/__pycache__/x.cpython-311.pyc"]
    for rel in junk:  # what runs leave in a working copy
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text("x")
    sdist_dir = tmp_path / "sdist"
    _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--skip-dependency-check",
          "--outdir", sdist_dir, src],
         cwd=tmp_path, env=dict(os.environ))
    sdists = list(sdist_dir.glob("rest_dense-*.tar.gz"))
    assert len(sdists) == 1, sdists
    import tarfile

    with tarfile.open(sdists[0]) as tar:
        names = tar.getnames()
    top = names[0].split("/")[0]
    for rel in ("configs/toy/mask_rcnn_restv2_toy.py", "configs/_base_/default_runtime_det.py",
                "tests/conftest.py", "tests/models/test_vt_fpn.py", "tools/run_tests.sh",
                "MANIFEST.in", "rest_dense/data/toy.py", "rest_dense/models/restv2.py"):
        assert f"{top}/{rel}" in names, rel
    assert not [n for n in names if n.endswith(".pyc") or "__pycache__" in n]
    assert not [n for n in names if any(n.endswith(rel) for rel in junk)]
    out = tmp_path / "wheel_from_sdist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", out, sdists[0]], cwd=tmp_path, env=dict(os.environ))
    built = list(out.glob("rest_dense-*.whl"))
    assert len(built) == 1, built
    from_sdist = sorted(n for n in zipfile.ZipFile(built[0]).namelist()
                        if n.startswith("rest_dense/.mim/configs/"))
    direct = sorted(n for n in zipfile.ZipFile(wheel).namelist()
                    if n.startswith("rest_dense/.mim/configs/"))
    assert from_sdist == direct and len(direct) > 30
