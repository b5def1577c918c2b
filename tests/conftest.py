"""Fixtures and constants shared by the whole test suite.

Test modules import the constants with ``from conftest import ...`` (pytest puts this
folder on ``sys.path``); fixtures are found by name.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

#: the repository root and the read-only ``shared/`` folder beside it
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures"
CONFIG_DIR = REPO / "configs"

#: a tiny ResTv2/ResTv1 arch (one block per stage) for fast CPU tests
TINY_ARCH = dict(embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), depths=(1, 1, 1, 1),
                 sr_ratios=(8, 4, 2, 1))


def make_tiny_arch(depths=(1, 1, 1, 1), **overrides) -> dict:
    """:data:`TINY_ARCH` with other ``depths`` (or fields) where a test depends on them, e.g.
    ``(1, 2, 2, 1)``: two blocks in stages 2-3, so that ``hwin`` has windowed blocks there."""
    return {**{k: tuple(v) for k, v in TINY_ARCH.items()}, "depths": tuple(depths), **overrides}


def without_logging_errors(text: str) -> str:
    """``text`` (captured stderr) without the "--- Logging error ---" blocks that a logger
    left by an earlier test in the process prints, traceback included, when it writes to
    that test's closed capture stream: they are not the command's output."""
    return re.sub(r"--- Logging error ---.*?\nArguments: [^\n]*\n?", "", text, flags=re.S)


def fixture_path(name: str) -> Path:
    """A file of ``shared/fixtures``; fails the test (never skips) when it is missing."""
    path = FIXTURES / name
    if not path.is_file():
        pytest.fail(f"fixture {path} is missing (../shared must sit beside the repository)")
    return path


@pytest.fixture
def tiny_arch() -> dict:
    """A fresh copy of :data:`TINY_ARCH`."""
    return {k: tuple(v) for k, v in TINY_ARCH.items()}


@pytest.fixture(scope="session")
def make_toy_root(tmp_path_factory):
    """Toy datasets (:func:`rest_dense.data.toy.generate_toy_dataset`), each made once per
    session: ``make_toy_root(num_train=8, num_val=4, **other_arguments) -> Path``. Tests
    whose outcome depends on the size pass theirs."""
    made = {}

    def make(num_train: int = 8, num_val: int = 4, **kwargs) -> Path:
        from rest_dense.data.toy import generate_toy_dataset

        key = (num_train, num_val, tuple(sorted(kwargs.items())))
        if key not in made:
            root = tmp_path_factory.mktemp("toy")
            generate_toy_dataset(root, num_train=num_train, num_val=num_val, **kwargs)
            made[key] = root
        return made[key]

    return make


@pytest.fixture(scope="session")
def toy_root(make_toy_root) -> Path:
    """The default toy dataset: 8 training and 4 validation scenes of 128x128."""
    return make_toy_root()


@pytest.fixture
def one_thread():
    """Run on one CPU thread: on a shared 2-core machine, two threads are several times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def subprocess_env() -> dict:
    """Environment for child interpreters: the repository importable, one thread each."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env
