"""FLOP and parameter counting: rest_dense.analysis and ``rest-dense flops``."""
import math
import re

import pytest
import torch

from rest_dense import analysis as an
from rest_dense.cli import main
from rest_dense.models import ResTv2

from conftest import make_tiny_arch, without_logging_errors

#: two blocks in the middle stages, so that every stage's attention is counted
TINY = make_tiny_arch(depths=(1, 2, 2, 1))
MASK_RCNN_T = "mask_rcnn/mask-rcnn_restv2-t_fpn_amp-ms-1x_coco.py"


def _attention_flops(model: ResTv2, h: int, w: int) -> int:
    """q k^T and attn v of every block: tokens N, keys M = N / sr^2, channels C."""
    total = 0
    for i, (c, depth, sr) in enumerate(zip(model.embed_dims, model.depths, model.sr_ratios)):
        s = 2 ** (i + 2)
        n = math.ceil(h / s) * math.ceil(w / s)
        m = math.ceil(h / s / sr) * math.ceil(w / s / sr)
        total += depth * n * m * 2 * c
    return total


def test_fused_attention_counted_like_math_path(one_thread):
    torch.manual_seed(0)
    fused = ResTv2(TINY).eval()
    math_path = ResTv2(TINY, fast_paths=False).eval()
    x = torch.randn(1, 3, 64, 96)
    a = an.count_flops(fused, (x,))
    b = an.count_flops(math_path, (x,))
    assert "scaled_dot_product_attention" in a.by_operator and "matmul" not in a.by_operator
    assert "matmul" in b.by_operator
    assert a.total == b.total > 0
    assert a.groups == b.groups
    assert a.groups["matmul"] == _attention_flops(fused, 64, 96) > 0


def test_attention_flops_grow_quadratically_with_tokens(one_thread):
    model = ResTv2(TINY).eval()
    small = an.count_flops(model, (torch.randn(1, 3, 64, 64),)).groups
    large = an.count_flops(model, (torch.randn(1, 3, 128, 128),)).groups
    assert large["matmul"] == 16 * small["matmul"] > 0  # 4x tokens, 4x keys
    assert large["linear"] == 4 * small["linear"] > 0
    assert small["conv"] > 0 and small["layer_norm"] > 0


@pytest.mark.parametrize("mode", ["win", "cwin", "hwin"])
def test_window_modes_count_fewer_attention_products(one_thread, mode):
    glob = ResTv2(TINY).eval()
    win = ResTv2(TINY, attn_mode=mode, window_size=(8, 4, 2, 1)).eval()
    x = torch.randn(1, 3, 128, 128)
    g, w = an.count_flops(glob, (x,)).groups, an.count_flops(win, (x,)).groups
    assert 0 < w["matmul"] < g["matmul"]
    assert w["linear"] == g["linear"]  # no padding at this size


def test_count_cache_counts_each_model_config_once():
    calls = []

    def counter(n):
        def run():
            calls.append(n)
            return an.FlopCount(n, {"conv": n}), {"box": 7}
        return run

    cache = an.CountCache()
    a, notes_a = cache.count("mmdet", (8, 8), "model A", "a.py", counter(1))
    b, notes_b = cache.count("mmdet", (8, 8), "model A", "b.py", counter(2))
    c, _ = cache.count("mmdet", (8, 8), "model A, attn_mode=win", "c.py", counter(3))
    d, _ = cache.count("mmdet", (16, 16), "model A", "a.py", counter(4))
    assert calls == [1, 3, 4] and a is b and c.total == 3 and d.total == 4
    assert notes_a == ["RoIs: box 7"] and notes_b == ["RoIs: box 7", "same model as a.py"]


def test_resolve_targets_names_configs_and_errors():
    targets = an.resolve_targets(["rest_small", "restv2_tiny", MASK_RCNN_T,
                                  "detectron2/mask_rcnn_restv2_tiny_1x.yaml"])
    assert [(t.kind, t.label) for t in targets] == [
        ("backbone", "restv1_small"), ("backbone", "restv2_tiny"), ("mmdet", MASK_RCNN_T),
        ("d2", "detectron2/mask_rcnn_restv2_tiny_1x.yaml")]
    assert an.resolve_targets([], all_configs=True)[0].kind in ("mmdet", "mmseg", "d2", "d2-lazy")
    with pytest.raises(ValueError, match="restv2_tinny.*neither a model"):
        an.resolve_targets(["restv2_tinny"])


def test_cli_flops_backbone_default_size(tmp_path, capsys, one_thread):
    md = tmp_path / "docs" / "flops.md"
    assert main(["flops", "restv2_tiny", "--markdown", str(md), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "== restv2_tiny [backbone] input 224x224: 29.667M params, 4.11 GFLOPs" in out
    assert "scaled_dot_product_attention" in out  # the breakdown by operator
    text = md.read_text()
    assert text.startswith("# Parameters and FLOPs") and "rest-dense flops restv2_tiny" in text
    row = next(line for line in text.splitlines() if line.startswith("| restv2_tiny |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[:5] == ["restv2_tiny", "backbone", "224×224", "29.667", "29.667"]
    assert float(cells[6]) == pytest.approx(4.11, abs=0.01)  # GFLOPs
    assert all(math.isfinite(float(c)) for c in cells[9:14])  # conv .. other

    assert "How the papers' figures compare" not in text  # prose of docs/flops.md only


def test_flops_doc_tool_appends_the_paper_notes(tmp_path, monkeypatch):
    """tools/flops_doc.py writes docs/flops.md: ``rest-dense flops --markdown`` on the
    backbones and every shipped config, then the notes on the papers' figures."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("flops_doc", REPO / "tools" / "flops_doc.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    calls = []

    def fake_cli(argv):
        calls.append(argv)
        out = argv[argv.index("--markdown") + 1]
        with open(out, "w", encoding="utf-8") as f:
            f.write("# Parameters and FLOPs\n")
        return 0

    monkeypatch.setattr(tool, "cli", fake_cli)
    # the VT-FPN whole-model section (tests/mm/test_vt_fpn_whole_flops.py counts it for real)
    monkeypatch.setattr(tool, "whole_models_section", lambda: "WHOLE-MODEL TABLE")
    out = tmp_path / "flops.md"
    assert tool.main(["--out", str(out), "--no-progress"]) == 0
    (argv,) = calls
    assert argv[:9] == ["flops", *tool.BACKBONES] and "--all" in argv
    text = out.read_text()
    assert text.startswith("# Parameters and FLOPs\n\nHow the papers' figures compare")
    assert "UperNet (ResTv2 paper, Tab. 5" in text
    assert text.index("## VT-FPN, semantic FPN and UperNet") < text.index("WHOLE-MODEL TABLE")

def test_cli_flops_check_math_and_shape(capsys, one_thread):
    assert main(["flops", "restv1_lite", "--shape", "64x96", "--check-math", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "input 64x96" in out and "fused == math path" in out


def test_cli_flops_bad_input_is_named(capsys):
    assert main(["flops", "restv2_tiny", "--shape", "800by1216"]) == 2
    assert "800by1216" in capsys.readouterr().err
    assert main(["flops", "no_such_model"]) == 2
    assert "'no_such_model' is neither a model" in capsys.readouterr().err
    assert main(["flops"]) == 2
    assert "nothing to count" in capsys.readouterr().err


def test_cli_flops_refuses_checkpoints_and_unwritable_markdown_up_front(tmp_path, capsys):
    ckpt = tmp_path / "weights.pth"
    ckpt.write_text("not a config")
    assert main(["flops", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "is not a config" in err and "Traceback" not in err
    # a folder as --markdown: refused before anything is counted
    assert main(["flops", "restv2_tiny", "--no-progress", "--markdown", str(tmp_path)]) == 2
    out = capsys.readouterr()
    assert "is a folder" in out.err and "flops.md" in out.err and "GFLOPs" not in out.out


def test_config_without_model_is_named(tmp_path, capsys):
    cfg = tmp_path / "deploy_like.py"
    cfg.write_text("backend_config = dict(type='onnxruntime')\n")
    with pytest.raises(an.NoModelInConfig, match="defines no model"):
        an.analyze_config(str(cfg), params_only=True)
    assert main(["flops", "--params-only", "--no-progress", str(cfg)]) == 2
    assert "deploy_like.py defines no model" in capsys.readouterr().err


def test_mmdet_config_counted(one_thread):
    # 50 proposals instead of 1000 keep the trace short; the backbone count is unaffected
    res = an.analyze_config(MASK_RCNN_T, shape=(128, 160),
                            cfg_options=["model.test_cfg.rpn.max_per_img=50"])
    assert res.framework == "mmdet" and res.target == MASK_RCNN_T
    assert abs(res.params / 1e6 - 49.941) < 5e-4  # shared/ENV.md: 49.941M
    assert abs(res.backbone_params / 1e6 - 29.667) < 5e-4
    backbone = an.count_flops(ResTv2("tiny").eval(), (torch.randn(1, 3, 128, 160),))
    assert res.flops.by_module["model.backbone"] == backbone.total
    assert res.flops.groups["matmul"] == backbone.groups["matmul"] > 0
    assert res.flops.total > backbone.total
    assert "RoIs: box 50, mask 50" in res.notes


def test_cli_flops_cfg_options_reach_necks_or_are_refused(capsys, one_thread):
    """--cfg-options are a neck target's arguments (applied, labelled, typos named); with
    model names, which have no config, or necks and configs together: refused."""
    assert main(["flops", "neck:vt_fpn", "--shape", "64x64", "--no-progress"]) == 0
    default = capsys.readouterr().out
    assert main(["flops", "neck:vt_fpn", "--shape", "64x64", "--no-progress",
                 "--cfg-options", "num_tokens=4"]) == 0
    fewer = capsys.readouterr().out
    assert "num_tokens=4" in fewer and "num_tokens" not in default
    row = re.compile(r"neck:vt_fpn .*\bneck\s+64x64\s+[\d.]+\s+([\d.]+)")
    gflops = [float(row.search(out).group(1)) for out in (default, fewer)]
    assert 0 < gflops[1] < gflops[0]  # fewer tokens, fewer FLOPs
    for argv, named in ((["neck:vt_fpn", "--cfg-options", "num_tokenz=4"], "num_tokenz"),
                        (["restv2_tiny", "--cfg-options", "typo=3"], r"model names \(restv2_tiny\)"),
                        (["neck:fpn", "toy/vt_fpn_restv2_toy.py", "--cfg-options", "a=1"],
                         "two runs"),
                        (["toy/vt_fpn_restv2_toy.py", "--shape", "64x64", "--cfg-options",
                          "model.neck.num_tokenz=3"], "does not build: .*num_tokenz")):
        assert main(["flops", *argv, "--no-progress"]) == 2
        err = without_logging_errors(capsys.readouterr().err)
        assert re.search(named, err) and "Traceback" not in err, err


@pytest.mark.parametrize("config", ["detectron2/toy/sem_seg_restv2_vt_fpn_toy.yaml",
                                    "detectron2/lazy/sem_seg_restv2_tiny_vt_fpn_ade20k.py"])
def test_detectron2_semantic_segmentation_counted(config, one_thread):
    """SemanticSegmentor answers with sem_seg maps, not instances: counted all the same."""
    res = an.analyze_d2_config(config, shape=(64, 96))
    assert res.framework == "d2" and res.flops.total > 0
    assert res.flops.by_module["model.backbone"] > 0
    assert res.flops.total > res.flops.by_module["model.backbone"]  # the head counted too


def test_cli_params_only_shipped_configs(capsys):
    assert main(["flops", "--params-only", "--no-progress", MASK_RCNN_T,
                 "detectron2/mask_rcnn_restv2_tiny_1x.yaml"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line, name in zip(lines, [MASK_RCNN_T, "detectron2/mask_rcnn_restv2_tiny_1x.yaml"]):
        assert line.split()[0] == "49.941M" and "(backbone 29.667M)" in line
        assert line.endswith(name)


def test_cli_keeps_the_config_warnings(capsys):
    """flops silences the frameworks' notices while it builds a config's model, not ours
    about the config (a Swin window_size carried into global attention)."""
    from rest_dense.models import ConfigWarning

    with pytest.warns(ConfigWarning, match="window_size=7 has no effect"):
        assert main(["flops", "--params-only", "--no-progress", "toy/mask_rcnn_restv2_toy.py",
                     "--cfg-options", "model.backbone.window_size=7"]) == 0
    assert capsys.readouterr().out.strip().endswith("toy/mask_rcnn_restv2_toy.py")


def test_cli_shipped_folder_from_any_directory(capsys, tmp_path, monkeypatch):
    """`rest-dense flops configs/upernet` (the README's example) from a folder that is not
    the checkout: the shipped folder, as a shipped file name resolves (a wheel has no
    ./configs)."""
    monkeypatch.chdir(tmp_path)
    for name in ("configs/toy", "toy/"):
        assert main(["flops", "--params-only", "--no-progress", name]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert len(lines) == 7 and all(" toy/" in line or line.split()[-1].startswith("toy/")
                                       for line in lines), lines
    assert main(["flops", "--params-only", "--no-progress", "no_such_folder"]) == 2
