"""Registration of the ResT backbones and the lr-decay constructor with mmengine,
MMDetection and MMSegmentation, with and without each framework installed."""
import os
import subprocess
import sys
import textwrap

import mmdet.registry
import mmengine.registry
import mmseg.registry
import pytest

import rest_dense
from rest_dense.mm import MMResTv1, MMResTv2, ResTLayerDecayOptimizerConstructor
from rest_dense.models import ResTv1, ResTv2

from _mm_utils import REPO

# every test here may start a process: a hung one fails after the timeout (pytest-timeout)
pytestmark = pytest.mark.timeout(180, func_only=True)


@pytest.mark.parametrize("registry", [mmdet.registry, mmseg.registry], ids=["mmdet", "mmseg"])
def test_backbones_registered(registry):
    assert registry.MODELS.get("ResTv2") is MMResTv2
    assert registry.MODELS.get("ResTv1") is MMResTv1
    assert issubclass(MMResTv2, ResTv2) and issubclass(MMResTv1, ResTv1)
    assert registry.OPTIM_WRAPPER_CONSTRUCTORS.get(
        "ResTLayerDecayOptimizerConstructor") is ResTLayerDecayOptimizerConstructor


def test_constructor_registered_in_mmengine():
    assert mmengine.registry.OPTIM_WRAPPER_CONSTRUCTORS.get(
        "ResTLayerDecayOptimizerConstructor") is ResTLayerDecayOptimizerConstructor
    assert rest_dense.mm.REGISTERED == ["mmdet", "mmseg"]


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=240)


def test_mmseg_alone_and_custom_imports(tmp_path):
    """With MMDetection unimportable, `custom_imports=['rest_dense.mm']` in a config still
    registers the backbones with MMSegmentation (fresh interpreter, nothing imported before)."""
    cfg = tmp_path / "cfg.py"
    cfg.write_text("custom_imports = dict(imports=['rest_dense.mm'], allow_failed_imports=False)\n"
                   "model = dict(type='ResTv2', arch=dict(embed_dims=(16, 32, 64, 128), "
                   "num_heads=(1, 2, 4, 8), depths=(1, 1, 1, 1), sr_ratios=(8, 4, 2, 1)))\n")
    proc = _run(f"""
        import sys
        sys.modules['mmdet'] = None          # MMDetection "not installed"
        assert 'rest_dense' not in sys.modules
        from mmengine.config import Config
        cfg = Config.fromfile({str(cfg)!r})  # imports rest_dense through custom_imports
        import rest_dense.mm as mm
        from mmseg.registry import MODELS
        model = MODELS.build(cfg.model)
        assert type(model).__name__ == 'MMResTv2', type(model)
        assert mm.REGISTERED == ['mmseg'], mm.REGISTERED
        assert 'mmdet' in mm.UNAVAILABLE
        print('OK', model.out_channels)
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK (16, 32, 64, 128)" in proc.stdout


def test_import_without_mmengine():
    """`import rest_dense` works without any OpenMMLab package (pure-PyTorch core)."""
    proc = _run("""
        import sys
        for name in ('mmengine', 'mmcv', 'mmdet', 'mmseg', 'detectron2'):
            sys.modules[name] = None
        import rest_dense
        assert 'rest_dense.mm' not in sys.modules
        model = rest_dense.ResTv2(arch=dict(embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8),
                                            depths=(1, 1, 1, 1), sr_ratios=(8, 4, 2, 1)))
        print('OK', type(model).__name__)
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK ResTv2" in proc.stdout
