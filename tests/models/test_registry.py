"""The model registry, the outputs' description and the framework-free core."""
import subprocess
import sys
import textwrap

import pytest
import torch

from rest_dense.models import (DEFAULT_WINDOW_SIZE, STAGE_STRIDES, ResTv1, ResTv2, canonical_name,
                               create_model, get_model_entry, list_models)

from conftest import TINY_ARCH

# every test here may start a process: a hung one fails after the timeout (pytest-timeout)
pytestmark = pytest.mark.timeout(180, func_only=True)

V2 = ["restv2_tiny", "restv2_small", "restv2_base", "restv2_large"]
V1 = ["restv1_lite", "restv1_small", "restv1_base", "restv1_large"]


def test_list_models_canonical_names():
    assert list_models() == V2 + V1
    assert list_models("restv2_*") == V2
    assert list_models(family="restv1") == V1
    assert list_models("nothing*") == []


@pytest.mark.parametrize("alias, name", [("rest_small", "restv1_small"), ("REST_LITE", "restv1_lite"),
                                         ("ResTv2_Tiny", "restv2_tiny"), (" restv2_base ", "restv2_base")])
def test_aliases_and_case(alias, name):
    assert canonical_name(alias) == name


@pytest.mark.parametrize("name", V2 + V1)
def test_create_model_builds_the_registered_arch(name):
    entry = get_model_entry(name)
    model = create_model(name)
    assert isinstance(model, ResTv2 if entry.family == "restv2" else ResTv1)
    spec = entry.arch_spec
    for key in ("embed_dims", "num_heads", "depths", "sr_ratios"):
        assert tuple(model.arch[key]) == tuple(spec[key]), key
    assert [f.channels for f in model.feature_info] == list(spec["embed_dims"])
    assert [f.stride for f in model.feature_info] == list(STAGE_STRIDES)
    assert [f.name for f in model.feature_info] == ["stage1", "stage2", "stage3", "stage4"]


def test_create_model_passes_arguments():
    model = create_model("restv2_tiny", attn_mode="hwin", out_indices=(3, 1), drop_path_rate=0.1)
    assert model.attn_mode == "hwin" and model.window_size == DEFAULT_WINDOW_SIZE
    assert model.out_channels == (768, 192)
    outs = model.eval()(torch.randn(1, 3, 112, 137))
    # outputs follow out_indices' order, as feature_info does
    assert [o.shape[1] for o in outs] == [768, 192]
    assert [tuple(o.shape[-2:]) for o in outs] == [(4, 5), (14, 18)]


@pytest.mark.parametrize("call, exc, words", [
    (lambda: create_model("restv3_tiny"), ValueError, ["restv3_tiny", "restv2_tiny", "rest_small"]),
    (lambda: create_model("restv1_small", attn_mode="win"), ValueError, ["restv1_small", "global"]),
    (lambda: create_model("restv2_tiny", attn_mode="swin"), ValueError, ["swin"]),
    (lambda: create_model("restv2_tiny", arch="small"), TypeError, ["arch"]),
    (lambda: create_model(3), TypeError, ["string"]),
])
def test_create_model_errors(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for word in words:
        assert word in str(info.value)


def test_feature_info_custom_arch(tiny_arch):
    model = ResTv2(tiny_arch, out_indices=(2, 0))
    assert [(f.stage, f.channels, f.stride) for f in model.feature_info] == [(2, 64, 16), (0, 16, 4)]


FRAMEWORKS = ("mmengine", "mmcv", "mmdet", "mmseg", "detectron2", "fvcore", "onnx", "onnxruntime")


@pytest.mark.parametrize("statement", ["import rest_dense", "import rest_dense.models",
                                       "from rest_dense.models import create_model",
                                       "import rest_dense.configs", "import rest_dense.cli"])
def test_core_imports_no_framework(statement, subprocess_env):
    """A fresh interpreter: importing the core loads none of the frameworks (they are all
    installed here, so this proves the import graph, not their absence)."""
    code = textwrap.dedent(f"""
        import sys
        {statement}
        import rest_dense
        m = rest_dense.create_model('restv2_tiny')
        loaded = sorted(n for n in sys.modules if n.split('.')[0] in {FRAMEWORKS!r})
        print('LOADED', loaded)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=subprocess_env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LOADED []" in proc.stdout, proc.stdout


def test_adapters_register_on_their_own_import(subprocess_env):
    code = textwrap.dedent("""
        import sys
        import rest_dense
        assert 'rest_dense.mm' not in sys.modules and 'rest_dense.d2' not in sys.modules
        import rest_dense.mm
        from mmdet.registry import MODELS
        assert MODELS.get('ResTv2') is rest_dense.mm.MMResTv2
        import rest_dense.d2
        from detectron2.modeling import BACKBONE_REGISTRY
        BACKBONE_REGISTRY.get('build_restv2_fpn_backbone')
        print('OK')
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=subprocess_env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("OK")


def test_tiny_arch_constant_is_consistent():
    model = ResTv2(TINY_ARCH)
    assert model.out_channels == TINY_ARCH["embed_dims"]


def test_register_model_refuses_names_that_could_never_be_looked_up():
    """Lookups are case-insensitive: a mixed-case name would be listed but unusable."""
    from rest_dense.models.registry import _ENTRIES, ModelEntry, register_model

    before = dict(_ENTRIES)
    for entry, match in (
            (ModelEntry("MyTiny", "restv2", "tiny", ResTv2), "lower case.*'mytiny'"),
            (ModelEntry(" mine", "restv2", "tiny", ResTv2), "lower case"),
            (ModelEntry("mine", "restv2", "tiny", ResTv2, aliases=("Restv2_Mine",)), "lower case"),
            (ModelEntry("mine", "restv2", "tiny", ResTv2, aliases=("restv2_tiny",)),
             "already registered"),
            (ModelEntry("mine", "restv2", "tiny", ResTv2, aliases=("mine",)), "repeats"),
            (ModelEntry("mine", "restv2", "huge", ResTv2), "unknown arch 'huge'")):
        with pytest.raises(ValueError, match=match):
            register_model(entry)
    assert _ENTRIES == before  # nothing half-registered
