"""FLOP and parameter counting."""
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
