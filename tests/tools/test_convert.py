"""Checkpoint conversion between the released, MMDetection/MMSegmentation and detectron2 layouts."""
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

from conftest import FIXTURES, REPO  # noqa: E402

TOOLS = REPO / "tools"
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
