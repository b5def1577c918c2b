"""FLOPs of the necks alone (rest_dense.neck_analysis, ``rest-dense flops neck:...``) against
the VT paper's figures (Wu et al., arXiv 2006.03677: FPN 55.1 / VT-FPN 8.5 GFLOPs at 800x1216,
12.8 / 2.0 at 473x473, ResNet-50 channels)."""
import pytest
import torch

from rest_dense import neck_analysis as na
from rest_dense.analysis import count_flops
from rest_dense.cli import main
from rest_dense.models import VTFPN

#: operators fvcore may skip in VT-FPN: element-wise ones and softmax (not counted by convention)
ELEMENTWISE = {"aten::softmax", "aten::mul", "aten::add", "aten::max_pool2d"}


@pytest.mark.parametrize("neck, shape, paper, tol", [
    ("fpn", (800, 1216), 55.1, 0.02),
    ("vt_fpn", (800, 1216), 8.5, 0.15),
    ("fpn", (473, 473), 12.8, 0.02),
    ("vt_fpn", (473, 473), 2.0, 0.15),
])
def test_paper_neck_flops_resnet50(one_thread, neck, shape, paper, tol):
    r = na.analyze_neck(neck, "resnet50", shape)
    assert r.framework == "neck" and r.target == f"neck:{neck} (resnet50)"
    assert r.paper_flops.startswith(f"{paper} (VT paper")
    assert abs(r.flops.total / 1e9 - paper) <= tol * paper, r.flops.total / 1e9
    assert set(r.flops.unsupported) <= ELEMENTWISE


def _vt_fpn_flops(channels, sizes, c=256, l=8, ct=1024, depth=1):
    """The multiply-adds VT-FPN should cost, written out (norms excluded)."""
    n = len(channels) * l
    total = 0
    for ci, (h, w) in zip(channels, sizes):
        hw = h * w
        total += hw * ci * c              # lateral 1x1 conv
        total += hw * c * l * 4           # tokenizer logits, A^T X, projector logits, readout
        total += l * c * ct + 2 * l * ct * c  # token projection; projector keys and values
    total += depth * (4 * n * ct * ct + 2 * n * n * ct)  # q, k, fc1, fc2; attention products
    return total


def test_vt_fpn_flops_match_the_written_out_count(one_thread):
    channels, sizes = (16, 24, 40), ((13, 17), (7, 9), (1, 1))
    neck = VTFPN(channels, out_channels=32, num_tokens=4, token_channels=64, num_heads=4,
                 transformer_depth=2).eval()
    fc = count_flops(neck, ([torch.randn(1, ci, h, w) for ci, (h, w) in zip(channels, sizes)],))
    counted = fc.total - fc.by_operator.get("batch_norm", 0)
    assert counted == _vt_fpn_flops(channels, sizes, c=32, l=4, ct=64, depth=2)
    assert fc.groups["matmul"] > 0 and set(fc.unsupported) <= ELEMENTWISE


def test_neck_channels_and_sizes():
    assert na.parse_neck_channels("resnet50") == ((256, 512, 1024, 2048), "resnet50")
    assert na.parse_neck_channels("ResTv2_Tiny") == ((96, 192, 384, 768), "restv2_tiny")
    assert na.parse_neck_channels(" 8, 16 ") == ((8, 16), "8,16")
    assert na.parse_neck_channels([8, 16]) == ((8, 16), "8,16")
    for bad, match in (("", "no levels"), (",", "no levels"), ("8,0", ">= 1"),
                       ("resnet5", "neither"), ([8, 2.5], ">= 1")):
        with pytest.raises(ValueError, match=match):
            na.parse_neck_channels(bad)
    assert na.neck_feature_shapes((473, 473)) == [(119, 119), (60, 60), (30, 30), (15, 15)]
    assert na.neck_feature_shapes((97, 131), 5) == [(25, 33), (13, 17), (7, 9), (4, 5), (2, 3)]
    assert na.neck_name("neck:VT-FPN") == "vt_fpn"
    with pytest.raises(ValueError, match="unknown neck 'fpnn'"):
        na.neck_name("neck:fpnn")


def test_cli_counts_necks(tmp_path, capsys, one_thread):
    md = tmp_path / "necks.md"
    assert main(["flops", "neck:fpn", "neck:vt_fpn", "--neck-channels", "8,16", "--shape", "64x96",
                 "--no-progress", "--markdown", str(md)]) == 0
    out = capsys.readouterr().out
    assert "== neck:fpn (8,16) [neck] input 64x96" in out
    assert "== neck:vt_fpn (8,16) [neck] input 64x96" in out and "matmul" in out
    text = md.read_text()
    assert "rest-dense flops neck:fpn neck:vt_fpn --shape 64x96 --neck-channels 8,16" in text
    assert "| neck:vt_fpn (8,16) | neck | 64×96 |" in text
    assert main(["flops", "neck:bifpn"]) == 2
    assert "unknown neck 'bifpn'" in capsys.readouterr().err
    assert main(["flops", "neck:fpn", "--neck-channels", "256,x"]) == 2
    assert "neck channels '256,x'" in capsys.readouterr().err
