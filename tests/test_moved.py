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
    "rest_dense.deploy.checkpoints": ("check_checkpoint_fits", "rest_dense.checkpoint_reader"),
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


def test_old_path_is_the_module_itself_so_patches_reach_the_code(monkeypatch):
    sys.modules.pop("rest_dense.models.checkpoint", None)
    with pytest.warns(DeprecationWarning):
        old = importlib.import_module("rest_dense.models.checkpoint")
    from rest_dense.models import pretrained
    assert old is pretrained
    monkeypatch.setattr(old, "describe_model", lambda model: "patched")
    assert pretrained.describe_model(None) == "patched"


def test_renamed_names_and_star_imports_of_split_modules():
    sys.modules.pop("rest_dense.deploy.checkpoints", None)
    with pytest.warns(DeprecationWarning):
        old = importlib.import_module("rest_dense.deploy.checkpoints")
    from rest_dense import checkpoint_reader
    # the old read_model_checkpoint returned mmengine's layout: today's read_for_deployment
    assert old.read_model_checkpoint is checkpoint_reader.read_for_deployment
    for module, names in (("rest_dense.mm.checkpointing",
                           {"scale_schedule", "SCALE_SCHEDULE_KEY", "AtomicCheckpointHook",
                            "install_config_format_cache"}),
                          ("rest_dense.checkpointing", {"atomic_save", "scale_count"})):
        sys.modules.pop(module, None)
        space: dict = {}
        with pytest.warns(DeprecationWarning):
            exec(f"from {module} import *", space)
        assert names <= set(space), names - set(space)


@pytest.mark.parametrize("package,name,new", [
    ("rest_dense", "trust", "rest_dense.safe_load"),
    ("rest_dense.models", "checkpoint", "rest_dense.models.pretrained"),
    ("rest_dense.mm", "trusted_checkpoints", "rest_dense.mm.safe_load"),
    ("rest_dense.mm", "checkpointing", None),
    ("rest_dense.d2", "checkpoint", "rest_dense.d2.checkpointer"),
    ("rest_dense.deploy", "onnx_export", "rest_dense.deploy.model_onnx"),
])
def test_old_submodules_are_attributes_of_their_package(package, name, new):
    parent = importlib.import_module(package)
    sys.modules.pop(f"{package}.{name}", None)
    parent.__dict__.pop(name, None)
    with pytest.warns(DeprecationWarning):
        module = getattr(parent, name)
    if new is not None:
        assert module is importlib.import_module(new)
    else:
        assert callable(module.scale_schedule)
    with pytest.raises(AttributeError, match="no attribute 'not_a_module'"):
        getattr(parent, "not_a_module")


def test_moved_functions_warn_and_work():
    from rest_dense import benchmark, neck_bench, toy_compare
    from rest_dense.commands import bench
    for module, name in ((benchmark, "format_markdown"), (benchmark, "markdown_document"),
                         (benchmark, "plot_rows"), (neck_bench, "format_neck_table")):
        with pytest.warns(DeprecationWarning, match=f"import rest_dense.commands.bench.{name}"):
            assert getattr(module, name) is getattr(bench, name)
    with pytest.raises(AttributeError, match="tools/vt_fpn_toy_table.py"):
        toy_compare.format_markdown


def test_the_package_api_uses_no_old_path():
    code = ("import warnings, importlib\n"
            "warnings.simplefilter('error', DeprecationWarning)\n"
            "warnings.filterwarnings('ignore', module='torch')\n"
            "import rest_dense.deploy as d\n"
            "for name in d.__all__: getattr(d, name)\n")
    subprocess.run([sys.executable, "-c", code], check=True)
