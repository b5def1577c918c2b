"""MODEL.BACKBONE.FREEZE_AT 0..5 freezes exactly stem / stages 1..FREEZE_AT-1, also after train()."""
import re

import pytest
import torch

from _d2_utils import small_cfg  # noqa: F401,I100

from detectron2.modeling import build_model  # noqa: E402

from rest_dense.d2 import build_optimizer  # noqa: E402

# which backbone stage a parameter belongs to (0 = stem), from its name alone
_V2 = re.compile(r"^(?:stem\.|stage(\d)\.|patch_(\d)\.|norm_(\d)\.|cwin_convs\.(\d)\.)")
_V1 = re.compile(r"^(?:stem\.|stage(\d)\.|patch_embed_(\d)\.|norm(\d)\.|(norm)\.)")

pytestmark = pytest.mark.usefixtures("one_thread")


def _stage(name: str, v1: bool) -> int:
    m = (_V1 if v1 else _V2).match(name)
    assert m is not None, name
    if m.group(0).startswith("stem."):
        return 0
    if v1 and m.group(4):  # final `norm` closes stage 4
        return 4
    if not v1 and m.group(4):  # cwin_convs.{i} belongs to stage i+1
        return int(m.group(4)) + 1
    return int(next(g for g in m.groups() if g))


@pytest.mark.parametrize("cfg_name,extra", [
    ("mask_rcnn_restv2_tiny_cwin_1x.yaml", []),
    ("mask_rcnn_rest_small_1x.yaml", []),
])
def test_freeze_at(cfg_name, extra):
    v1 = "_rest_" in cfg_name
    for freeze_at in range(6):
        model = build_model(small_cfg(cfg_name, extra + ["MODEL.BACKBONE.FREEZE_AT", str(freeze_at)]))
        for _ in range(2):  # as built, then after model.train()
            bb = model.backbone.bottom_up
            for name, p in bb.named_parameters():
                frozen = _stage(name, v1) < freeze_at
                assert p.requires_grad != frozen, (freeze_at, name)
            # everything outside the backbone trains
            assert all(p.requires_grad for n, p in model.named_parameters()
                       if not n.startswith("backbone.bottom_up."))
            # frozen BatchNorms (stem) stay in eval mode while the model trains
            bns = [m for m in bb.stem.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
            assert bns and all(m.training == (freeze_at == 0) for m in bns), freeze_at
            model.train()
        n_trainable = sum(p.requires_grad for p in bb.parameters())
        if freeze_at == 0:
            assert n_trainable == len(list(bb.parameters()))
        if freeze_at == 5:
            assert n_trainable == 0
        # the optimizer only gets trainable parameters
        opt = build_optimizer(small_cfg(cfg_name, extra), model)
        n_opt = sum(len(g["params"]) for g in opt.param_groups)
        assert n_opt == sum(p.requires_grad for p in model.parameters())
