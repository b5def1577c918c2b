"""Stage-wise learning-rate decay: per-stage rates and weight decay from the shipped
UperNet recipe, frozen parameters, schedules, errors."""
import re

import pytest
import torch
from mmengine.optim import build_optim_wrapper
from mmengine.registry import PARAM_SCHEDULERS
from torch import nn

from rest_dense.mm import stage_lr_scales

from _mm_utils import build, load, shrink

UPERNET = "upernet/upernet_restv2-t_8xb2-160k_ade20k-512x512.py"
RETINA_V1 = "retinanet/retinanet_rest-s_fpn_amp-ms-1x_coco.py"
BASE_LR, WD, DECAY = 1.5e-4, 0.05, 0.9

# expected stage of a parameter, written out independently of the backbone's stage_id()
_V2_STAGE = [(r"^backbone\.stem\.", 0), (r"^backbone\.stage(\d)\.", None),
             (r"^backbone\.patch_(\d)\.", None), (r"^backbone\.norm_(\d)\.", None)]
_V1_STAGE = [(r"^backbone\.stem\.", 0), (r"^backbone\.stage(\d)\.", None),
             (r"^backbone\.patch_embed_(\d)\.", None), (r"^backbone\.norm(\d)\.", None),
             (r"^backbone\.norm\.", 4)]


def _expected_stage(name, table):
    for pattern, stage in table:
        m = re.match(pattern, name)
        if m:
            return stage if stage is not None else int(m.group(1))
    assert not name.startswith("backbone."), f"unclassified backbone parameter {name}"
    return 5


def _groups_by_param(optim_wrapper):
    return {id(p): g for g in optim_wrapper.optimizer.param_groups for p in g["params"]}


def _check_rates(model, optim_wrapper, table, base_lr, wd):
    groups = _groups_by_param(optim_wrapper)
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert id(p) not in groups, f"frozen {name} is optimised"
            continue
        stage = _expected_stage(name, table)
        seen.add(stage)
        g = groups[id(p)]
        assert g["lr"] == pytest.approx(base_lr * DECAY ** (5 - stage)), name
        no_decay = p.ndim == 1 or name.endswith(".bias")
        assert g["weight_decay"] == (0.0 if no_decay else wd), name
    return seen


def test_stage_scales():
    scales = stage_lr_scales(0.9, 4)
    assert scales == pytest.approx({0: 0.9 ** 5, 1: 0.9 ** 4, 2: 0.9 ** 3, 3: 0.9 ** 2, 4: 0.9,
                                    5: 1.0})


def test_upernet_recipe_rates():
    cfg = shrink(load(UPERNET))
    assert cfg.optim_wrapper.constructor == "ResTLayerDecayOptimizerConstructor"
    assert cfg.optim_wrapper.paramwise_cfg == dict(num_layers=4, decay_rate=DECAY,
                                                   decay_type="stage_wise")
    model = build(cfg)
    optim = build_optim_wrapper(model, cfg.optim_wrapper)
    assert type(optim.optimizer).__name__ == "AdamW"
    assert _check_rates(model, optim, _V2_STAGE, BASE_LR, WD) == {0, 1, 2, 3, 4, 5}
    # spot checks, by hand
    lr = {n: _groups_by_param(optim)[id(p)]["lr"] for n, p in model.named_parameters()}
    assert lr["backbone.stem.proj.0.weight"] == pytest.approx(1.5e-4 * 0.59049)
    assert lr["backbone.stage1.0.attn.q.weight"] == pytest.approx(1.5e-4 * 0.6561)
    assert lr["backbone.patch_3.proj.weight"] == pytest.approx(1.5e-4 * 0.81)
    assert lr["backbone.norm_4.weight"] == pytest.approx(1.5e-4 * 0.9)
    assert lr["decode_head.conv_seg.weight"] == pytest.approx(1.5e-4)
    assert lr["auxiliary_head.conv_seg.weight"] == pytest.approx(1.5e-4)

    # warm-up then poly decay keep the per-stage ratios
    schedulers = [PARAM_SCHEDULERS.build(dict(s, optimizer=optim)) for s in cfg.param_scheduler]
    stem_group = _groups_by_param(optim)[id(model.backbone.stem.proj[0].weight)]
    head_group = _groups_by_param(optim)[id(model.decode_head.conv_seg.weight)]
    for _ in range(1500):
        for s in schedulers:
            s.step()
    assert head_group["lr"] == pytest.approx(1.5e-4, rel=1e-3)
    assert stem_group["lr"] / head_group["lr"] == pytest.approx(0.9 ** 5, rel=1e-6)


def test_resnet_v1_stage_ids_and_frozen_params():
    cfg = shrink(load(RETINA_V1))
    cfg.model.backbone.frozen_stages = 1
    model = build(cfg)
    assert not model.backbone.stem.conv1.weight.requires_grad
    optim_cfg = dict(type="OptimWrapper", constructor="ResTLayerDecayOptimizerConstructor",
                     optimizer=dict(type="AdamW", lr=1e-4, weight_decay=0.05),
                     paramwise_cfg=dict(decay_rate=DECAY))  # num_layers defaults to 4 stages
    optim = build_optim_wrapper(model, optim_cfg)
    seen = _check_rates(model, optim, _V1_STAGE, 1e-4, 0.05)
    assert seen == {2, 3, 4, 5}  # stem and stage 1 frozen
    lr = {n: _groups_by_param(optim)[id(p)]["lr"] for n, p in model.named_parameters()
          if p.requires_grad}
    assert lr["backbone.norm.weight"] == pytest.approx(1e-4 * 0.9)  # final norm: stage 4
    assert lr["backbone.norm2.weight"] == pytest.approx(1e-4 * 0.9 ** 3)


def test_num_layers_larger_than_stages_shifts_rates():
    cfg = shrink(load(UPERNET))
    cfg.optim_wrapper.paramwise_cfg.num_layers = 6
    model = build(cfg)
    optim = build_optim_wrapper(model, cfg.optim_wrapper)
    groups = _groups_by_param(optim)
    assert groups[id(model.backbone.stage4[0].attn.q.weight)]["lr"] == pytest.approx(
        1.5e-4 * 0.9 ** 3)
    assert groups[id(model.decode_head.conv_seg.weight)]["lr"] == pytest.approx(1.5e-4)


class _Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(4, 4)  # no stage_id()
        self.head = nn.Linear(4, 2)


@pytest.mark.parametrize("paramwise, error, match", [
    (dict(decay_rate=0.9, decay_type="layer_wise"), ValueError, "stage_wise"),
    (dict(decay_type="stage_wise"), ValueError, "decay_rate"),
    (dict(decay_rate=0.9, num_layers=3), ValueError, "smaller"),
    (dict(decay_rate=0.9, custom_keys={}), ValueError, "unsupported"),
])
def test_bad_paramwise_cfg(paramwise, error, match):
    model = build(shrink(load(UPERNET)))
    cfg = dict(type="OptimWrapper", constructor="ResTLayerDecayOptimizerConstructor",
               optimizer=dict(type="AdamW", lr=1e-4, weight_decay=0.05), paramwise_cfg=paramwise)
    with pytest.raises(error, match=match):
        build_optim_wrapper(model, cfg)


def test_backbone_without_stage_id():
    cfg = dict(type="OptimWrapper", constructor="ResTLayerDecayOptimizerConstructor",
               optimizer=dict(type="AdamW", lr=1e-4), paramwise_cfg=dict(decay_rate=0.9))
    with pytest.raises(TypeError, match="stage_id"):
        build_optim_wrapper(_Plain(), cfg)


def test_gradient_step_uses_the_groups():
    """A real AdamW step moves the stem less than the head for equal gradients."""
    model = nn.Module()
    model.backbone = build(shrink(load(UPERNET))).backbone
    model.head = nn.Linear(3, 3, bias=False)
    cfg = dict(type="OptimWrapper", constructor="ResTLayerDecayOptimizerConstructor",
               optimizer=dict(type="AdamW", lr=1e-2, weight_decay=0.0),
               paramwise_cfg=dict(decay_rate=0.5))
    optim = build_optim_wrapper(model, cfg)
    stem_w = model.backbone.stem.proj[6].weight
    before = {"stem": stem_w.detach().clone(), "head": model.head.weight.detach().clone()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optim.step()
    # Adam's first step moves every weight by lr (sign of the gradient)
    assert torch.allclose(before["head"] - model.head.weight, torch.full((3, 3), 1e-2))
    assert torch.allclose(before["stem"] - stem_w, torch.full_like(stem_w, 1e-2 * 0.5 ** 5))


# ---------------------------------------------------------------- numbers checked where they enter
_WRAPPER = dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=1e-4, weight_decay=0.05))


@pytest.mark.parametrize("paramwise, match", [
    (None, "needs a paramwise_cfg"),                      # would silently apply no decay
    (dict(), "needs a paramwise_cfg"),
    (dict(decay_rate=-0.9), r"decay_rate must be in \(0, 1\]"),  # negative lrs
    (dict(decay_rate=0.0), r"decay_rate must be in \(0, 1\]"),
    (dict(decay_rate=1.5), r"decay_rate must be in \(0, 1\]"),
    (dict(decay_rate=float("nan")), r"decay_rate must be in \(0, 1\]"),  # NaN checkpoint
    (dict(decay_rate=float("inf")), r"decay_rate must be in \(0, 1\]"),
    (dict(decay_rate=True), "decay_rate must be a number"),
    (dict(decay_rate="0.9"), "decay_rate must be a number"),
    (dict(decay_rate=None), "decay_rate must be a number"),
    (dict(decay_rate=[0.9]), "decay_rate must be a number"),
    (dict(decay_rate=0.9, num_layers=4.7), "num_layers must be a whole number"),  # not 4
    (dict(decay_rate=0.9, num_layers=4.0), "num_layers must be a whole number"),
    (dict(decay_rate=0.9, num_layers=True), "num_layers must be a whole number"),
    (dict(decay_rate=0.9, num_layers="4"), "num_layers must be a whole number"),
    (dict(decay_rate=0.9, num_layers=0), "num_layers must be at least 1"),
    (dict(decay_rate=0.9, num_layers=-4), "num_layers must be at least 1"),
])
def test_decay_constructor_refuses_when_built(paramwise, match):
    from rest_dense.mm import ResTLayerDecayOptimizerConstructor

    with pytest.raises(ValueError, match=match):
        ResTLayerDecayOptimizerConstructor(dict(_WRAPPER), paramwise)


@pytest.mark.parametrize("decay_rate", [1, 1.0, 0.5, 1e-6])
def test_decay_constructor_accepts_rates_in_range(decay_rate):
    from rest_dense.mm import ResTLayerDecayOptimizerConstructor

    ResTLayerDecayOptimizerConstructor(dict(_WRAPPER), dict(decay_rate=decay_rate, num_layers=4))
