"""Old module paths (rest_dense._moved): importable, warned about, and the same objects."""
import importlib
import subprocess
import sys

import pytest

from rest_dense._moved import MOVED_MODULES

pytestmark = pytest.mark.timeout(120)

# a name each old module had, and the module that holds it now
OLD_NAMES = {
    "rest_dense.trust": ("trust", "rest_dense.safe_load"),
    "rest_dense.checkpointing": ("scale_count", "rest_dense.utils"),
    "rest_dense.model_checkpoint": ("read_model_checkpoint", "rest_dense.checkpoint_reader"),
    "rest_dense.models.checkpoint": ("load_checkpoint", "rest_dense.models.pretrained"),
    "rest_dense.export": ("export_onnx", "rest_dense.deploy.backbone_onnx"),
    "rest_dense.deploy.benchmark": ("measure_latency", "rest_dense.deploy.latency"),
    "rest_dense.deploy.onnx_export": ("load_deployment", "rest_dense.deploy.model_onnx"),
    "rest_dense.d2.checkpoint": ("RestDetectionCheckpointer", "rest_dense.d2.checkpointer"),
    "rest_dense.mm.trusted_checkpoints": ("load_from_local", "rest_dense.mm.safe_load"),
    "rest_dense.mm.checkpointing": ("scale_schedule", "rest_dense.mm.schedule"),
}


def test_every_moved_module_is_checked():
    assert set(OLD_NAMES) == set(MOVED_MODULES)


@pytest.mark.parametrize("old", sorted(OLD_NAMES))
def test_old_path_warns_and_gives_the_new_objects(old):
    name, new = OLD_NAMES[old]
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated: import .*{new}"):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        module.not_a_name


def test_split_module_finds_names_in_each_new_home():
    sys.modules.pop("rest_dense.mm.checkpointing", None)
    with pytest.warns(DeprecationWarning):
        old = importlib.import_module("rest_dense.mm.checkpointing")
    from rest_dense.mm import run_files, schedule, utils
    assert old.AtomicCheckpointHook is run_files.AtomicCheckpointHook
    assert old.SCALE_SCHEDULE_KEY is schedule.SCALE_SCHEDULE_KEY
    assert old.install_config_format_cache is utils.install_config_format_cache


def test_new_paths_import_without_warnings():
    # a fresh interpreter: nothing of the package imports an old path itself
    targets = sorted({t for ts in MOVED_MODULES.values() for t in ts})
    code = ("import warnings, importlib\n"
            "warnings.simplefilter('error', DeprecationWarning)\n"
            "warnings.filterwarnings('ignore', module='torch')\n"
            "import rest_dense.mm, rest_dense.d2, rest_dense.cli\n"
            f"for name in {targets!r}: importlib.import_module(name)\n")
    subprocess.run([sys.executable, "-c", code], check=True)
