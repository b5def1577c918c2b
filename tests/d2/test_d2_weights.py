"""Parameter counts of the authors' detectron2 models and MODEL.WEIGHTS in every released layout."""
import json
import logging
import os
import pickle
import re

import numpy as np
import pytest
import torch

from _d2_utils import REPO, TINY_ARCH, config_path, small_cfg  # noqa: F401,I100

from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from rest_dense import safe_load  # noqa: E402
from rest_dense.safe_load import UntrustedCheckpointError  # noqa: E402
from rest_dense.d2 import (RestDetectionCheckpointer, add_rest_config, add_restv2_config,  # noqa: E402
                           classify_checkpoint)
from rest_dense.d2.engine import setup_yaml_config  # noqa: E402
from rest_dense.models import CheckpointMismatchError, ResTv1, ResTv2  # noqa: E402

FIXTURE_KEYS = os.path.join(os.path.dirname(REPO), "shared", "fixtures",
                            "official_imagenet_checkpoint_keys.json")

pytestmark = pytest.mark.usefixtures("one_thread")


def _full_cfg(name, extra=()):
    return setup_yaml_config(config_path(name), ["MODEL.DEVICE", "cpu", *extra])


@pytest.fixture(scope="module")
def tiny_mask_rcnn():
    """Full-size ResTv2-T Mask R-CNN from the shipped 3x config."""
    torch.manual_seed(0)
    return build_model(_full_cfg("mask_rcnn_restv2_tiny_3x.yaml"))


def _millions(model):
    return round(sum(p.numel() for p in model.parameters()) / 1e6, 2)


def test_param_count_restv2_tiny(tiny_mask_rcnn):
    assert _millions(tiny_mask_rcnn) == 49.94


@pytest.mark.parametrize("name,expected", [
    ("mask_rcnn_restv2_small_3x.yaml", 60.71),
    ("mask_rcnn_restv2_base_3x.yaml", 75.47),
    # cwin adds one 3x3 depth-wise conv per stage (ResTv2 paper, Table 4a)
    ("mask_rcnn_restv2_tiny_cwin_1x.yaml", 49.96),
])
def test_param_counts(name, expected):
    assert _millions(build_model(_full_cfg(name))) == expected


# ------------------------------------------------------------------------------ checkpoints
def _tiny_core(v1=False, seed=1):
    torch.manual_seed(seed)
    return (ResTv1 if v1 else ResTv2)(dict(TINY_ARCH)).eval()


def _released_d2_layout(state_dict):
    """Key layout of the authors' released detectron2 checkpoints."""
    return {"backbone.bottom_up." + re.sub(r"^norm_(\d)\.", r"norm_\1.0.", k): v
            for k, v in state_dict.items()}


def _bottom_up_outputs(model, x):
    bb = model.backbone.bottom_up.eval()
    with torch.no_grad():
        return [bb(x)[f"stage{i + 1}"] for i in range(4)]


@pytest.mark.parametrize("v1", [False, True])
def test_released_detectron2_checkpoint_matches_core(tmp_path, v1, monkeypatch):
    name = "mask_rcnn_rest_small_1x.yaml" if v1 else "mask_rcnn_restv2_tiny_1x.yaml"
    core = _tiny_core(v1)
    donor = build_model(small_cfg(name))  # supplies head weights for a complete checkpoint
    sd = {k: v for k, v in donor.state_dict().items() if not k.startswith("backbone.bottom_up.")}
    sd.update(_released_d2_layout(core.state_dict()))
    if not v1:
        assert any(".norm_1.0.weight" in k for k in sd)
    path = tmp_path / "released_d2.pth"
    torch.save({"model": sd}, path)

    torch.manual_seed(123)
    model = build_model(small_cfg(name))
    assert classify_checkpoint(model, sd) == "detectron2"
    monkeypatch.setenv("HOME", str(tmp_path))  # "~/..." as detectron2 users write it
    RestDetectionCheckpointer(model).load("~/released_d2.pth")
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        expected = core(x)
    for got, want in zip(_bottom_up_outputs(model, x), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the heads were loaded as well
    for k, v in donor.state_dict().items():
        if k.startswith("roi_heads."):
            assert torch.equal(model.state_dict()[k], v), k


def test_imagenet_checkpoint_loads_into_backbone(tmp_path):
    core = _tiny_core()
    sd = {k: v for k, v in core.state_dict().items() if not k.startswith("norm_")}
    sd["norm.weight"] = torch.ones(TINY_ARCH["embed_dims"][3])
    sd["norm.bias"] = torch.zeros(TINY_ARCH["embed_dims"][3])
    sd["head.weight"] = torch.randn(1000, TINY_ARCH["embed_dims"][3])
    sd["head.bias"] = torch.zeros(1000)
    path = tmp_path / "restv2_tiny_224.pth"
    torch.save({"model": sd, "epoch": 299}, path)

    model = build_model(small_cfg("mask_rcnn_restv2_tiny_1x.yaml"))
    heads_before = {k: v.clone() for k, v in model.state_dict().items()
                    if not k.startswith("backbone.bottom_up.")}
    assert classify_checkpoint(model, sd) == "backbone"
    ret = RestDetectionCheckpointer(model).load(str(path))
    assert "epoch" not in ret
    own = model.backbone.bottom_up.state_dict()
    for k, v in core.state_dict().items():
        if not k.startswith("norm_"):
            assert torch.equal(own[k], v), k
    for k, v in heads_before.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_mm_style_checkpoint_loads_into_backbone(tmp_path, caplog):
    core = _tiny_core()
    sd = {"backbone." + k: v for k, v in core.state_dict().items()}
    sd["decode_head.conv_seg.weight"] = torch.randn(150, 8, 1, 1)
    path = tmp_path / "upernet.pth"
    torch.save({"state_dict": sd, "meta": {"epoch": 1}}, path)
    model = build_model(small_cfg("mask_rcnn_restv2_tiny_1x.yaml"))
    with caplog.at_level(logging.WARNING):
        RestDetectionCheckpointer(model).load(str(path))
    # a whole model of another framework: said, with what is left at its initialisation
    assert any("whole model of another framework (decode_head.*" in r.getMessage()
               and r.levelno == logging.WARNING for r in caplog.records), caplog.text
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = core(x)
    for got, want in zip(_bottom_up_outputs(model, x), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.skipif(not os.path.isfile(FIXTURE_KEYS), reason="shared fixtures not available")
@pytest.mark.parametrize("variant", ["restv2_tiny"])
def test_official_imagenet_key_layout(tmp_path, tiny_mask_rcnn, variant):
    """A checkpoint with exactly the keys and shapes of the released ImageNet file."""
    with open(FIXTURE_KEYS) as f:
        shapes = json.load(f)[variant]
    sd = {k: torch.full(tuple(s), 0.5) for k, s in shapes.items()}
    path = tmp_path / f"{variant}_224.pth"
    torch.save({"model": sd}, path)
    model = tiny_mask_rcnn
    RestDetectionCheckpointer(model).load(str(path))
    own = model.backbone.bottom_up.state_dict()
    loaded = [k for k in own if k in sd]
    not_loaded = sorted(k for k in own if k not in sd)
    assert len(loaded) == len(sd) - 4  # all but the classifier's norm and head
    assert all(torch.all(own[k] == 0.5) for k in loaded if not k.endswith("num_batches_tracked"))
    # only the dense output norms (absent from classifiers) keep their initialisation
    assert {k.split(".")[0] for k in not_loaded} == {"norm_1", "norm_2", "norm_3", "norm_4"}


def test_own_training_checkpoint_resumes(tmp_path):
    """A checkpoint saved with optimizer state (as training writes it) resumes from the output
    dir; it needs no trust: torch.load(weights_only=True) with rest_dense's allow-list reads it."""
    from rest_dense.d2 import build_optimizer

    safe_load.forget_trusted()
    cfg = small_cfg("mask_rcnn_restv2_tiny_1x.yaml")
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    ckpt = RestDetectionCheckpointer(model, str(tmp_path), optimizer=opt)
    ckpt.save("model_0000009", iteration=9)
    model2 = build_model(cfg)
    opt2 = build_optimizer(cfg, model2)
    ret = RestDetectionCheckpointer(model2, str(tmp_path), optimizer=opt2).resume_or_load(
        "", resume=True)
    assert ret["iteration"] == 9
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k


class Note:
    """An object no allow-list admits (a stand-in for anything a checkpoint may carry)."""

    def __init__(self, text):
        self.text = text


def test_checkpoint_needing_full_unpickling_is_trusted_only_when_marked(tmp_path):
    safe_load.forget_trusted()
    core = _tiny_core()
    path = tmp_path / "foreign" / "weights.pth"
    path.parent.mkdir()
    torch.save({"model": core.state_dict(), "note": Note("mine"), "numpy": np.float64(1.5)}, path)
    model = build_model(small_cfg("mask_rcnn_restv2_tiny_1x.yaml"))
    # the checkpointer's own save_dir does not make a file trusted: only rest_dense.safe_load does
    with pytest.raises(UntrustedCheckpointError, match="--trust-checkpoint") as info:
        RestDetectionCheckpointer(model, save_dir=str(path.parent)).load(str(path))
    assert str(path) in str(info.value) and "Note" in str(info.value)
    safe_load.trust(path.parent)
    try:
        RestDetectionCheckpointer(model).load(str(path))
    finally:
        safe_load.forget_trusted()
    own = model.backbone.bottom_up.state_dict()
    assert all(torch.equal(own[k], v) for k, v in core.state_dict().items())


def test_pkl_weights_read_with_the_allow_list(tmp_path):
    """detectron2 model-zoo / Caffe2 ``.pkl`` files (numpy arrays) load through the restricted
    unpickler; a pickle that would run code is refused before anything runs."""
    safe_load.forget_trusted()
    core = _tiny_core()
    blobs = {"backbone.bottom_up." + k: v.numpy() for k, v in core.state_dict().items()}
    blobs["backbone.bottom_up.stem.proj.0.weight_momentum"] = np.zeros(1)  # left out
    path = tmp_path / "released.pkl"
    with open(path, "wb") as f:
        pickle.dump({"blobs": blobs}, f)
    model = build_model(small_cfg("mask_rcnn_restv2_tiny_1x.yaml"))
    RestDetectionCheckpointer(model).load(str(path))
    own = model.backbone.bottom_up.state_dict()
    for k, v in core.state_dict().items():
        assert torch.equal(own[k], v), k

    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pkl"
    with open(evil, "wb") as f:
        pickle.dump({"model": _RunsCode(str(marker))}, f)
    with pytest.raises(UntrustedCheckpointError, match="allow-list"):
        RestDetectionCheckpointer(model).load(str(evil))
    assert not marker.exists()


class _RunsCode:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_yaml_keys_and_arch_override():
    cfg = get_cfg()
    add_restv2_config(cfg)
    add_rest_config(cfg)
    add_restv2_config(cfg)  # idempotent
    assert list(cfg.MODEL.RESTV2.OUT_FEATURES) == ["stage1", "stage2", "stage3", "stage4"]
    assert cfg.MODEL.RESTV2.NAME == "restv2_tiny" and cfg.MODEL.REST.NAME == "rest_small"
    assert cfg.SOLVER.OPTIMIZER == "SGD"
    model = build_model(small_cfg("mask_rcnn_restv2_base_1x.yaml"))
    bb = model.backbone.bottom_up
    # depths/dims from ARCH, heads and sr ratios from the named variant
    assert bb.depths == tuple(TINY_ARCH["depths"]) and bb.embed_dims == tuple(TINY_ARCH["embed_dims"])
    assert bb.sr_ratios == (8, 4, 2, 1)


# ------------------------------------------------------------- whole-model files that do not fit
def _whole_model_file(tmp_path, name, arch=None, drop=(), seed=5):
    """A complete detectron2 checkpoint of the small model (optionally another backbone
    width), its keys in the released spelling, with entries starting with ``drop`` removed."""
    opts = []
    if arch is not None:
        opts = ["MODEL.RESTV2.ARCH.EMBED_DIMS", str(arch["embed_dims"]),
                "MODEL.RESTV2.ARCH.DEPTHS", str(arch["depths"])]
    torch.manual_seed(seed)
    donor = build_model(small_cfg(name, opts))
    sd = {k: v for k, v in donor.state_dict().items() if not k.startswith(tuple(drop))}
    path = tmp_path / "model_final.pth"
    # the released spelling of the output norms (norm_i.0.) must not hide the mismatch
    sd = {re.sub(r"(bottom_up\.norm_\d)\.", r"\1.0.", k): v for k, v in sd.items()}
    torch.save({"model": sd}, path)
    return str(path)


def test_whole_model_of_another_width_raises(tmp_path):
    """Today's fvcore path would skip all 192 backbone tensors with a warning."""
    wide = {"embed_dims": [d * 2 for d in TINY_ARCH["embed_dims"]], "depths": TINY_ARCH["depths"]}
    path = _whole_model_file(tmp_path, "mask_rcnn_restv2_tiny_1x.yaml", arch=wide)
    model = build_model(small_cfg("mask_rcnn_restv2_tiny_1x.yaml"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match=r"wrong variant.*|does not fit") as err:
        RestDetectionCheckpointer(model).load(path)
    assert "backbone.bottom_up" in str(err.value) and "shape mismatches" in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_whole_model_of_another_depth_raises(tmp_path):
    """Every key of the model is there, but the checkpoint's backbone is deeper."""
    deeper = {"embed_dims": TINY_ARCH["embed_dims"],
              "depths": [d + 1 for d in TINY_ARCH["depths"]]}
    path = _whole_model_file(tmp_path, "mask_rcnn_restv2_tiny_1x.yaml", arch=deeper)
    model = build_model(small_cfg("mask_rcnn_restv2_tiny_1x.yaml"))
    with pytest.raises(CheckpointMismatchError, match="not used by the model"):
        RestDetectionCheckpointer(model).load(path)


def test_foreign_whole_model_raises(tmp_path):
    """A checkpoint of another detector (no ResT backbone keys) is not loaded in part."""
    path = tmp_path / "r50.pth"
    torch.save({"model": {"backbone.bottom_up.res2.0.conv1.weight": torch.zeros(64, 64, 1, 1),
                          "roi_heads.box_predictor.cls_score.bias": torch.zeros(4)}}, path)
    model = build_model(small_cfg("mask_rcnn_restv2_tiny_1x.yaml"))
    with pytest.raises(CheckpointMismatchError, match="matches none|no weights of the model.s ResT|holds no ResT backbone"):
        RestDetectionCheckpointer(model).load(str(path))


def test_head_of_another_shape_is_skipped_for_fine_tuning(tmp_path):
    """Fine-tuning on another dataset: only the class-dependent heads differ."""
    path = _whole_model_file(tmp_path, "mask_rcnn_restv2_tiny_1x.yaml")
    model = build_model(small_cfg("mask_rcnn_restv2_tiny_1x.yaml",
                                  ["MODEL.ROI_HEADS.NUM_CLASSES", "5"]))
    RestDetectionCheckpointer(model).load(path)  # detectron2's warning, no error
    ckpt = torch.load(path, weights_only=True)["model"]
    keys = [k for k in ckpt if k.startswith("backbone.bottom_up.stage")]
    assert keys and all(torch.equal(model.state_dict()[k], ckpt[k]) for k in keys)


def test_evaluation_refuses_incomplete_checkpoints(tmp_path):
    path = _whole_model_file(tmp_path, "mask_rcnn_restv2_tiny_1x.yaml",
                             drop=("roi_heads.mask_head.",))
    model = build_model(small_cfg("mask_rcnn_restv2_tiny_1x.yaml"))
    checkpointer = RestDetectionCheckpointer(model)
    checkpointer.require_complete = True
    with pytest.raises(CheckpointMismatchError, match="roi_heads.mask_head"):
        checkpointer.load(path)
    checkpointer.load(_whole_model_file(tmp_path, "mask_rcnn_restv2_tiny_1x.yaml"))


def test_resume_from_a_file_needs_detectron2_training_state(tmp_path, caplog):
    """--resume FILE with a whole MM model, backbone weights or a bare state dict would
    restart at iteration 0 over the run's own checkpoints: refused before loading; the
    file a detectron2 run wrote resumes. A classifier's backbone.* + head.* file is
    ordinary pretraining: no "other framework" warning."""
    from rest_dense.run_files import ResumeError

    core = _tiny_core()
    model = build_model(small_cfg("mask_rcnn_restv2_tiny_1x.yaml"))
    mm = {"backbone." + k: v for k, v in core.state_dict().items()}
    mm["neck.lateral_convs.0.conv.weight"] = torch.randn(8, 8, 1, 1)
    torch.save({"state_dict": mm, "meta": {"iter": 20}}, tmp_path / "mm.pth")
    torch.save({"model": model.state_dict()}, tmp_path / "bare.pth")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for name, what in (("mm.pth", "another framework"), ("bare.pth", "no iteration")):
        with pytest.raises(ResumeError, match=f"not a detectron2 training checkpoint.*{what}"):
            RestDetectionCheckpointer(model).load_to_resume(str(tmp_path / name))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    saver = RestDetectionCheckpointer(model, save_dir=str(tmp_path / "run"))
    saver.save("model_0000009", iteration=9)
    assert saver.load_to_resume(str(tmp_path / "run" / "model_0000009.pth"))["iteration"] == 9

    pretrain = {"backbone." + k: v for k, v in core.state_dict().items()}
    pretrain["head.fc.weight"] = torch.randn(1000, 8)
    torch.save({"state_dict": pretrain}, tmp_path / "mmpretrain.pth")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        RestDetectionCheckpointer(model).load(str(tmp_path / "mmpretrain.pth"))
    assert "another framework" not in caplog.text and "backbone-only" in caplog.text


def test_pretrained_weights_with_caffe_style_inputs_warn():
    """A config built on a detectron2 ResNet one keeps BGR inputs with std 1: with ResT
    weights that is a silent mismatch, so building the backbone warns; the shipped recipe
    (RGB, ImageNet mean / std) and training from scratch do not."""
    import warnings

    from detectron2.config import get_cfg
    from detectron2.modeling import build_backbone

    import rest_dense.d2
    from rest_dense.configs import get_config_path

    cfg = get_cfg()
    rest_dense.d2.add_restv2_config(cfg)
    cfg.merge_from_file(get_config_path("detectron2/mask_rcnn_restv2_tiny_3x.yaml"))
    cfg.MODEL.RESTV2.ARCH.EMBED_DIMS = [16, 32, 64, 128]
    cfg.MODEL.RESTV2.ARCH.DEPTHS = [1, 1, 1, 1]
    cfg.MODEL.WEIGHTS = "checkpoints/restv2_tiny_224.pth"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_backbone(cfg)  # the shipped inputs: no warning
    cfg.INPUT.FORMAT, cfg.MODEL.PIXEL_MEAN = "BGR", [103.53, 116.28, 123.675]
    cfg.MODEL.PIXEL_STD = [1.0, 1.0, 1.0]
    with pytest.warns(UserWarning, match="INPUT.FORMAT BGR, MODEL.PIXEL_STD .*Base-ResT-Recipe"):
        build_backbone(cfg)
    cfg.MODEL.WEIGHTS = ""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_backbone(cfg)  # from scratch: the inputs are the user's choice
