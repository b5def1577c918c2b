"""detectron2 models built from the shipped configs (backbone shrunk) train and infer on CPU."""
import math

import pytest
import torch

from _d2_utils import (LAZY_CONFIG, TINY_ARCH, config_path, make_inputs,  # noqa: F401,I100
                       shipped_yaml_configs, small_cfg)

from detectron2.config import LazyConfig, get_cfg, instantiate  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from rest_dense.d2 import D2ResTv1, D2ResTv2, add_rest_config, add_restv2_config  # noqa: E402
from rest_dense.d2.engine import setup_yaml_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _train_and_infer(model, bottom_up):
    torch.manual_seed(0)
    model.train()
    with EventStorage():
        losses = model(make_inputs())
    assert losses and all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    grads = [p.grad for p in bottom_up.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads), "some backbone parameters got no gradient"
    assert any(g.abs().sum() > 0 for g in grads)

    model.eval()
    with torch.no_grad():
        out = model(make_inputs(n=1, with_targets=False))
    assert isinstance(out[0]["instances"], Instances)
    assert out[0]["instances"].image_size == (128, 160)


# one config per meta-architecture x backbone x attention mode (all yaml files share the bases)
@pytest.mark.parametrize("name,extra", [
    ("mask_rcnn_restv2_tiny_3x.yaml", []),
    ("retinanet_restv2_tiny_1x.yaml", []),
    ("mask_rcnn_rest_small_1x.yaml", []),
    ("retinanet_rest_base_1x.yaml", []),
    # windows smaller than the 128x160 test images, so the window code paths really run
    ("mask_rcnn_restv2_tiny_cwin_1x.yaml", ["MODEL.RESTV2.WINDOW_SIZE", "[8, 4, 4, 2]"]),
    ("mask_rcnn_restv2_tiny_hwin_1x.yaml", ["MODEL.RESTV2.WINDOW_SIZE", "[8, 4, 4, 2]"]),
])
def test_shipped_yaml_model_trains_and_infers(name, extra):
    cfg = small_cfg(name, extra)
    model = build_model(cfg)
    bottom_up = model.backbone.bottom_up
    assert isinstance(bottom_up, D2ResTv1 if "_rest_" in name else D2ResTv2)
    assert list(bottom_up.embed_dims) == TINY_ARCH["embed_dims"]
    if "win" in name:
        assert bottom_up.attn_mode == name.split("_")[4]
    _train_and_infer(model, bottom_up)


def test_lazy_config_model_trains_and_infers():
    cfg = LazyConfig.load(LAZY_CONFIG)
    assert cfg.train.max_iter == 270000 and cfg.train.amp.enabled
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.weight_decay == 0.05
    cfg.model.backbone.bottom_up.arch = dict(TINY_ARCH)
    cfg.model.backbone.out_channels = 32
    cfg.model.proposal_generator.head.in_channels = 32
    rh = cfg.model.roi_heads
    rh.num_classes = 3
    rh.batch_size_per_image = 32
    rh.box_head.input_shape = ShapeSpec(channels=32, height=7, width=7)
    rh.box_head.fc_dims = [64, 64]
    rh.box_predictor.input_shape = ShapeSpec(channels=64)
    rh.mask_head.input_shape = ShapeSpec(channels=32, width=14, height=14)
    rh.mask_head.conv_dims = [16, 16, 16, 16, 16]
    cfg.model.proposal_generator.batch_size_per_image = 32
    cfg.model.proposal_generator.pre_nms_topk = (200, 200)
    cfg.model.proposal_generator.post_nms_topk = (50, 50)
    model = instantiate(cfg.model)
    assert isinstance(model.backbone.bottom_up, D2ResTv2)
    assert model.input_format == "RGB"

    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    assert isinstance(optimizer, torch.optim.AdamW)
    _train_and_infer(model, model.backbone.bottom_up)
    optimizer.step()  # whole-model clipping + AdamW step run


def test_backbone_shapes_any_input_size():
    cfg = small_cfg("mask_rcnn_restv2_tiny_1x.yaml")
    model = build_model(cfg)
    bb = model.backbone.bottom_up
    shapes = bb.output_shape()
    assert {k: (v.channels, v.stride) for k, v in shapes.items()} == {
        "stage1": (16, 4), "stage2": (32, 8), "stage3": (64, 16), "stage4": (128, 32)}
    assert bb.size_divisibility == 32 and model.backbone.size_divisibility == 32
    assert bb.padding_constraints["size_divisibility"] == 32
    bb.eval()
    with torch.no_grad():
        out = bb(torch.randn(1, 3, 50, 75))
    for i, name in enumerate(["stage1", "stage2", "stage3", "stage4"]):
        s = 2 ** (i + 2)
        assert out[name].shape[-2:] == (math.ceil(50 / s), math.ceil(75 / s))
    fpn = model.backbone.output_shape()
    assert sorted(fpn) == ["p2", "p3", "p4", "p5", "p6"]
    assert all(v.channels == 32 for v in fpn.values())


def test_retinanet_fpn_levels():
    model = build_model(small_cfg("retinanet_restv2_tiny_3x.yaml"))
    shapes = model.backbone.output_shape()
    assert {k: v.stride for k, v in shapes.items()} == {"p3": 8, "p4": 16, "p5": 32, "p6": 64, "p7": 128}
    # P6 is computed from C5 (stage4), as in detectron2's RetinaNet ResNet builder
    assert model.backbone.top_block.in_feature == "stage4"
    assert model.backbone.top_block.p6.in_channels == TINY_ARCH["embed_dims"][3]
    assert model.backbone.bottom_up.out_indices == (1, 2, 3)


def test_unknown_name_and_freeze_at_rejected():
    with pytest.raises(ValueError, match="restv2_tiny"):
        build_model(small_cfg("mask_rcnn_restv2_tiny_1x.yaml", ["MODEL.RESTV2.NAME", "restv2_huge"]))
    with pytest.raises(ValueError, match="FREEZE_AT"):
        build_model(small_cfg("mask_rcnn_restv2_tiny_1x.yaml", ["MODEL.BACKBONE.FREEZE_AT", "6"]))


def _set(cfg, key, value):
    """Set a node directly, as code (or a LazyConfig) does: past yacs' type checks."""
    node = cfg.MODEL
    for k in key.split(".")[:-1]:
        node = node[k]
    node[key.split(".")[-1]] = value
    return cfg


@pytest.mark.parametrize("key, value, error, match", [
    ("RESTV2.ARCH.DEPTHS", [1, 1, 2.9, 1], TypeError, r"MODEL.RESTV2.ARCH.DEPTHS\[2\] must be an integer"),
    ("RESTV2.ARCH.DEPTHS", [1, "1", 1, 1], TypeError, r"DEPTHS\[1\] must be an integer"),
    ("RESTV2.ARCH.EMBED_DIMS", [True, 32, 64, 128], TypeError, r"EMBED_DIMS\[0\]"),
    ("RESTV2.ARCH.MLP_RATIO", -1.0, ValueError, "MLP_RATIO must be positive"),
    ("BACKBONE.FREEZE_AT", 1.7, TypeError, "FREEZE_AT"),
    ("RESTV2.FAST_PATHS", "False", TypeError, "FAST_PATHS must be True or False"),
    ("FPN.IN_FEATURES", ["stage1", "stage_4"], ValueError, r"reads \['stage_4'\], which MODEL.RESTV2.OUT_FEATURES"),
    ("FPN.IN_FEATURES", ["stage4", "stage3"], ValueError, "consecutive stages from fine to coarse"),
    ("FPN.IN_FEATURES", [], ValueError, "MODEL.FPN.IN_FEATURES is empty"),
])
def test_config_values_are_checked_under_their_keys(key, value, error, match):
    """Values set past yacs' type checks (list elements, code) are refused naming the key,
    never truncated (2.9 -> 2) or read as truthy ("False")."""
    cfg = _set(small_cfg("mask_rcnn_restv2_tiny_1x.yaml"), key, value)
    with pytest.raises(error, match=match):
        build_model(cfg)


def test_size_divisibility_is_checked():
    for bad, error in ((31.9, TypeError), (True, TypeError), (-32, ValueError)):
        with pytest.raises(error, match="size_divisibility"):
            D2ResTv2(arch=dict(TINY_ARCH), size_divisibility=bad)
    assert D2ResTv2(arch=dict(TINY_ARCH), size_divisibility=0).size_divisibility == 0


def test_all_shipped_configs_follow_the_recipe():
    names = shipped_yaml_configs()
    expected = {f"mask_rcnn_restv2_{v}_{s}.yaml" for v in ("tiny", "small", "base") for s in ("1x", "3x")}
    expected |= {"retinanet_restv2_tiny_1x.yaml", "retinanet_restv2_tiny_3x.yaml",
                 "mask_rcnn_rest_small_1x.yaml", "mask_rcnn_rest_base_1x.yaml",
                 "retinanet_rest_small_1x.yaml", "retinanet_rest_base_1x.yaml",
                 "mask_rcnn_restv2_tiny_win_1x.yaml", "mask_rcnn_restv2_tiny_cwin_1x.yaml",
                 "mask_rcnn_restv2_tiny_hwin_1x.yaml"}
    assert expected <= set(names), expected - set(names)
    drop_path = {"restv2_tiny": 0.1, "restv2_small": 0.2, "restv2_base": 0.3,
                 "rest_small": 0.1, "rest_base": 0.2}
    for name in sorted(expected):
        cfg = get_cfg()
        add_restv2_config(cfg)
        add_rest_config(cfg)
        cfg.merge_from_file(config_path(name))
        s = cfg.SOLVER
        assert (s.OPTIMIZER, s.BASE_LR, s.WEIGHT_DECAY) == ("ADAMW", 1e-4, 0.05), name
        assert (s.WEIGHT_DECAY_NORM, s.WEIGHT_DECAY_BIAS) == (0.0, 0.0), name
        assert s.CLIP_GRADIENTS.ENABLED and s.IMS_PER_BATCH == 16, name
        # AMP is on in the recipe; setup_yaml_config switches it off for non-CUDA devices
        amp = setup_yaml_config(config_path(name), ["MODEL.DEVICE", "cpu"]).SOLVER.AMP.ENABLED
        assert not amp, name
        if "_3x" in name:
            assert (s.MAX_ITER, tuple(s.STEPS)) == (270000, (210000, 250000)), name
        else:
            assert (s.MAX_ITER, tuple(s.STEPS)) == (90000, (60000, 80000)), name
        assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == tuple(range(480, 801, 32)), name
        assert cfg.INPUT.MAX_SIZE_TRAIN == 1333 and cfg.INPUT.FORMAT == "RGB", name
        assert list(cfg.MODEL.PIXEL_MEAN) == [123.675, 116.28, 103.53], name
        assert list(cfg.MODEL.PIXEL_STD) == [58.395, 57.12, 57.375], name
        node = cfg.MODEL.REST if "_rest_" in name else cfg.MODEL.RESTV2
        assert node.DROP_PATH_RATE == drop_path[node.NAME], name
        assert cfg.MODEL.WEIGHTS == f"checkpoints/{node.NAME}_224.pth", name
        if "win_" in name:
            assert node.ATTN_MODE == name.split("_")[4], name
        assert s.AMP.ENABLED, name
