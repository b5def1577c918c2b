"""The recipe's optimizer: AdamW, no weight decay on norms and biases, whole-model clipping."""
import subprocess
import sys

import pytest
import torch

from _d2_utils import REPO, small_cfg  # noqa: I100

from detectron2.modeling import build_model  # noqa: E402

from rest_dense.d2 import build_optimizer, with_full_model_gradient_clipping  # noqa: E402

# every test here may start a process: a hung one fails after the timeout (pytest-timeout)
pytestmark = pytest.mark.timeout(120, func_only=True)

NORMS = (torch.nn.LayerNorm, torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm)


def test_adamw_param_groups():
    cfg = small_cfg("mask_rcnn_restv2_tiny_3x.yaml")
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.AdamW)
    assert type(opt).__name__ == "AdamWFullModelClipped"
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert all(g["lr"] == 1e-4 for g in opt.param_groups)
    n_checked = 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            expect = 0.0 if isinstance(module, NORMS) or name == "bias" else 0.05
            assert wd[id(p)] == expect, (type(module).__name__, name)
            n_checked += 1
    assert n_checked == len(wd)
    # the backbone's LayerNorms (stem, patch embeddings, blocks, output norms) are exempt
    bb = model.backbone.bottom_up
    assert wd[id(bb.norm_1.weight)] == 0.0 and wd[id(bb.stage1[0].attn.q.weight)] == 0.05


def test_full_model_clipping():
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))]
    opt = with_full_model_gradient_clipping(torch.optim.SGD, 1.0)(params, lr=1.0)
    params[0].grad = torch.full((3,), 3.0)
    params[1].grad = torch.full((4,), 4.0)
    opt.step()
    total = torch.cat([p.grad for p in params]).norm()
    assert total == pytest.approx(1.0, rel=1e-5)
    # the step used the clipped gradient
    assert torch.cat([p.detach() for p in params]).norm() == pytest.approx(1.0, rel=1e-5)


def test_import_rest_dense_d2_registers_builders():
    code = ("import rest_dense.d2\n"
            "from detectron2.modeling import BACKBONE_REGISTRY\n"
            "for n in ['build_restv2_backbone', 'build_restv2_fpn_backbone',\n"
            "          'build_retinanet_restv2_fpn_backbone', 'build_rest_backbone',\n"
            "          'build_rest_fpn_backbone', 'build_retinanet_rest_fpn_backbone']:\n"
            "    BACKBONE_REGISTRY.get(n)\n")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
