"""VT-FPN in detectron2: the registered builders (ResTv2 and ResTv1) emit p2..p5 (p6) with
their shapes, SemanticSegmentor + SemSegFPNHead consume them unchanged at an odd size, a
training step on the toy label maps, the shipped yaml / LazyConfig configs, named errors."""
import re

import pytest
import torch

from _d2_utils import TINY_ARCH, config_path  # noqa: I100

from detectron2.config import LazyConfig, instantiate  # noqa: E402
from detectron2.data import DatasetCatalog, DatasetMapper  # noqa: E402
from detectron2.evaluation import SemSegEvaluator  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling import BACKBONE_REGISTRY, build_model  # noqa: E402

from rest_dense.d2 import D2VTFPN, register_toy_sem_seg_datasets  # noqa: E402
from rest_dense.d2.engine import (RestTrainer, sem_seg_train_augmentations,  # noqa: E402
                                  setup_yaml_config)
from rest_dense.data.toy import generate_toy_dataset  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TOY_VT = "toy/sem_seg_restv2_vt_fpn_toy.yaml"
H, W = 97, 131
ARCH = ["MODEL.RESTV2.ARCH.EMBED_DIMS", str(TINY_ARCH["embed_dims"]),
        "MODEL.RESTV2.ARCH.DEPTHS", str(TINY_ARCH["depths"])]


def _cfg(name=TOY_VT, extra=()):
    return setup_yaml_config(config_path(name), ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "",
                                                 *ARCH, "MODEL.VT_FPN.OUT_CHANNELS", "32",
                                                 "MODEL.VT_FPN.TOKEN_CHANNELS", "64",
                                                 "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32", *extra])


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_d2_vt_fpn")
    generate_toy_dataset(root, num_train=8, num_val=2)
    return root


def _strides(backbone):
    return {k: (v.stride, v.channels) for k, v in backbone.output_shape().items()}


def test_builders_registered_and_output_shapes():
    for name in ("build_restv2_vt_fpn_backbone", "build_restv1_vt_fpn_backbone",
                 "build_rest_vt_fpn_backbone"):
        assert BACKBONE_REGISTRY.get(name) is not None
    cfg = _cfg()
    backbone = BACKBONE_REGISTRY.get("build_restv2_vt_fpn_backbone")(cfg, ShapeSpec(channels=3))
    assert isinstance(backbone, D2VTFPN) and backbone.size_divisibility == 32
    assert _strides(backbone) == {"p2": (4, 32), "p3": (8, 32), "p4": (16, 32), "p5": (32, 32)}
    assert backbone.neck.in_channels == tuple(TINY_ARCH["embed_dims"])
    x = torch.rand(1, 3, 128, 160)
    outs = backbone(x)
    assert {k: tuple(v.shape) for k, v in outs.items()} == {
        "p2": (1, 32, 32, 40), "p3": (1, 32, 16, 20), "p4": (1, 32, 8, 10), "p5": (1, 32, 4, 5)}

    # a fifth level (Mask R-CNN's p6) by max pooling; ResTv1 on three stages
    cfg = _cfg(extra=["MODEL.VT_FPN.NUM_OUTS", "5"])
    p6 = BACKBONE_REGISTRY.get("build_restv2_vt_fpn_backbone")(cfg, ShapeSpec(channels=3))
    assert _strides(p6)["p6"] == (64, 32) and tuple(p6(x)["p6"].shape) == (1, 32, 2, 3)
    cfg = _cfg(extra=["MODEL.REST.ARCH.EMBED_DIMS", "[16, 32, 64, 128]",
                      "MODEL.REST.ARCH.DEPTHS", "[1, 1, 1, 1]",
                      "MODEL.VT_FPN.IN_FEATURES", "['stage2', 'stage3', 'stage4']",
                      "MODEL.SEM_SEG_HEAD.IN_FEATURES", "['p3', 'p4', 'p5']"])
    v1 = BACKBONE_REGISTRY.get("build_restv1_vt_fpn_backbone")(cfg, ShapeSpec(channels=3))
    assert type(v1.bottom_up).__name__ == "D2ResTv1"
    assert _strides(v1) == {"p3": (8, 32), "p4": (16, 32), "p5": (32, 32)}
    assert v1.neck.in_channels == (32, 64, 128)


@pytest.mark.parametrize("name", [TOY_VT, "toy/sem_seg_restv2_fpn_toy.yaml",
                                  "sem_seg_restv2_tiny_vt_fpn_ade20k.yaml",
                                  "sem_seg_restv2_tiny_fpn_ade20k.yaml"])
def test_shipped_yaml_predicts_odd_size(name):
    cfg = _cfg(name, ["MODEL.FPN.OUT_CHANNELS", "32"])
    assert cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor"
    assert cfg.MODEL.SEM_SEG_HEAD.NAME == "SemSegFPNHead"
    if "ade20k" in name:
        assert cfg.DATASETS.TRAIN == ("ade20k_sem_seg_train",)
        assert cfg.DATASETS.TEST == ("ade20k_sem_seg_val",)
        assert cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupPolyLR" and cfg.SOLVER.MAX_ITER == 160000
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert type(model.backbone).__name__ == ("D2VTFPN" if "vt_fpn" in name else "FPN")
    with torch.no_grad():
        out = model([{"image": torch.rand(3, H, W) * 255, "height": H, "width": W}])
    assert out[0]["sem_seg"].shape == (cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, H, W)


def test_semantic_segmentor_trains_on_toy_label_maps(toy_root):
    names = register_toy_sem_seg_datasets(toy_root, prefix="d2test_vt_sem_seg")
    assert set(names) == {"d2test_vt_sem_seg_train", "d2test_vt_sem_seg_val"}
    cfg = _cfg(extra=["DATASETS.TRAIN", "('d2test_vt_sem_seg_train',)",
                      "DATASETS.TEST", "('d2test_vt_sem_seg_val',)"])
    evaluator = RestTrainer.build_evaluator(cfg, "d2test_vt_sem_seg_val", output_folder=None)
    assert isinstance(evaluator, SemSegEvaluator)
    dicts = DatasetCatalog.get("d2test_vt_sem_seg_train")
    mapper = DatasetMapper(cfg, is_train=True, augmentations=sem_seg_train_augmentations(cfg))
    batch = [mapper(d) for d in dicts[:4]]
    assert batch[0]["sem_seg"].shape == (128, 128) and int(batch[0]["sem_seg"].max()) <= 3
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    optim = RestTrainer.build_optimizer(cfg, model)
    neck0 = {k: v.clone() for k, v in model.backbone.neck.state_dict().items()}
    losses = []
    for _ in range(5):
        loss = model(batch)["loss_sem_seg"]
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    moved = [k for k, v in model.backbone.neck.state_dict().items()
             if v.is_floating_point() and not torch.equal(v, neck0[k])]
    for part in ("lateral_convs.", "tokenizers.", "transformer.", "projectors."):
        assert any(k.startswith(part) for k in moved), part


def test_lazy_config_builds_and_predicts():
    cfg = LazyConfig.load(config_path("lazy/sem_seg_restv2_tiny_vt_fpn_ade20k.py"))
    assert cfg.dataloader.train.dataset.names == "ade20k_sem_seg_train"
    assert cfg.dataloader.evaluator.dataset_name == "ade20k_sem_seg_val"
    cfg.model.backbone.bottom_up.arch = {k: list(v) for k, v in TINY_ARCH.items()}
    cfg.model.backbone.token_channels = 64
    cfg.model.backbone.out_channels = 32
    cfg.model.sem_seg_head.conv_dims = 32
    model = instantiate(cfg.model).eval()
    assert model.sem_seg_head.predictor.in_channels == 32
    with torch.no_grad():
        out = model([{"image": torch.rand(3, H, W) * 255, "height": H, "width": W}])
    assert out[0]["sem_seg"].shape == (150, H, W)
    sched = instantiate(cfg.lr_multiplier)
    assert sched(0.0) == pytest.approx(1e-6) and sched(0.5) == pytest.approx(0.5)


def test_errors_name_the_key():
    with pytest.raises(ValueError, match="MODEL.VT_FPN.IN_FEATURES"):
        build_model(_cfg(extra=["MODEL.RESTV2.OUT_FEATURES", "['stage2', 'stage3', 'stage4']"]))
    with pytest.raises(ValueError, match="MODEL.VT_FPN: .*token_channels"):
        build_model(_cfg(extra=["MODEL.VT_FPN.TOKEN_CHANNELS", "100"]))
    with pytest.raises(ValueError, match="MODEL.VT_FPN: num_outs"):
        build_model(_cfg(extra=["MODEL.VT_FPN.NUM_OUTS", "3"]))
    assert build_model(_cfg(extra=["MODEL.VT_FPN.NORM", "LN"])).backbone.neck.norm_layer == "ln"
    with pytest.raises(ValueError, match="MODEL.VT_FPN.NORM"):
        build_model(_cfg(extra=["MODEL.VT_FPN.NORM", "GN"]))
    # SyncBN is the paper's: nn.SyncBatchNorm (one process computes as BatchNorm; a
    # multi-process CPU job trains it as BatchNorm: rest_dense.distributed.wrap_ddp)
    cfg = _cfg(extra=["MODEL.VT_FPN.NORM", "SyncBN"])
    neck = build_model(cfg).backbone.neck
    assert neck.norm_layer == "syncbn"
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in neck.modules())
    # yacs takes None for a str key: it is not "the default BN"
    with pytest.raises(ValueError, match="MODEL.VT_FPN.NORM .*got None"):
        build_model(_cfg(extra=["MODEL.VT_FPN.NORM", "None"]))


@pytest.mark.parametrize("key,value,named", [
    ("NUM_TOKENS", 8.7, "MODEL.VT_FPN.NUM_TOKENS must be an integer, got 8.7"),
    ("NUM_OUTS", 4.5, "MODEL.VT_FPN.NUM_OUTS must be an integer, got 4.5"),
    ("NUM_OUTS", None, "MODEL.VT_FPN.NUM_OUTS must be an integer, got None"),
    ("OUT_CHANNELS", None, "MODEL.VT_FPN.OUT_CHANNELS must be an integer, got None"),
    ("NUM_HEADS", True, "MODEL.VT_FPN.NUM_HEADS must be an integer, got the bool True"),
    ("DEPTH", -1, "MODEL.VT_FPN.DEPTH must be >= 0, got -1"),
    ("POS_ENCODING", "False", "MODEL.VT_FPN.POS_ENCODING must be True or False"),
    ("IN_FEATURES", None, "MODEL.VT_FPN.IN_FEATURES must be a list"),
    ("TOKENIZER", 1, "MODEL.VT_FPN.TOKENIZER must be a string"),
])
def test_values_set_in_python_are_checked_not_coerced(key, value, named):
    """yacs checks the types of merged values only: a config edited in Python could hold
    8.7 tokens (built as 8) or 'False' (built as True)."""
    cfg = _cfg()
    cfg.defrost()
    cfg.MODEL.VT_FPN[key] = value
    with pytest.raises((TypeError, ValueError), match=re.escape(named)):
        build_model(cfg)


def test_heads_reading_maps_the_neck_lacks_are_refused_when_built():
    """A Mask R-CNN on a 4-level VT-FPN (its RPN reads p6), a semantic-segmentation head
    on levels the LazyConfig's neck does not give: refused at build time with the setting
    to change, not a KeyError at the first forward."""
    from rest_dense.d2.engine import instantiate_model

    mask_rcnn = ["MODEL.BACKBONE.NAME", "build_restv2_vt_fpn_backbone",
                 "MODEL.VT_FPN.OUT_CHANNELS", "32", "MODEL.VT_FPN.TOKEN_CHANNELS", "64", *ARCH]
    cfg = setup_yaml_config(config_path("toy/mask_rcnn_restv2_toy.yaml"),
                            ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *mask_rcnn])
    with pytest.raises(ValueError, match=r"MODEL.RPN.IN_FEATURES .* reads \['p6'\].*"
                                         r"MODEL.VT_FPN.NUM_OUTS 5"):
        build_model(cfg)
    cfg = setup_yaml_config(config_path("toy/mask_rcnn_restv2_toy.yaml"),
                            ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *mask_rcnn,
                             "MODEL.VT_FPN.NUM_OUTS", "5"])
    assert "p6" in build_model(cfg).backbone.output_shape()

    lazy = LazyConfig.load(config_path("lazy/sem_seg_restv2_tiny_vt_fpn_ade20k.py"))
    lazy.model.backbone.bottom_up.arch = {k: list(v) for k, v in TINY_ARCH.items()}
    lazy.model.backbone.token_channels = 64
    lazy.model.backbone.in_features = ["stage2", "stage3", "stage4"]
    with pytest.raises(ValueError, match=r"sem_seg_head.in_features .* reads \['p2'\]"):
        instantiate_model(lazy)
