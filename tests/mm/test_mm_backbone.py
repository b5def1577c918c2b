"""The OpenMMLab adapter of the backbones: ``init_cfg`` loading of every released
checkpoint wrapping, ``is_init`` semantics, frozen stages, errors."""
import argparse
import logging
import pickle

import pytest
import torch
from mmengine.logging import MMLogger

from rest_dense.mm import MMResTv1, MMResTv2
from rest_dense.models import CheckpointMismatchError, ResTv1, ResTv2

from _mm_utils import TINY_ARCH, build, load, shrink

from conftest import without_logging_errors

MASK_RCNN = "mask_rcnn/mask-rcnn_restv2-t_fpn_amp-ms-1x_coco.py"
RETINA_V1 = "retinanet/retinanet_rest-s_fpn_amp-ms-1x_coco.py"
UPERNET = "upernet/upernet_restv2-t_8xb2-160k_ade20k-512x512.py"


def _source_v2():
    torch.manual_seed(1)
    return ResTv2(arch=TINY_ARCH).state_dict()


def _imagenet_style(sd):
    """Released ImageNet layout: {'model': ...} with final norm and classifier, no norm_i."""
    out = {k: v for k, v in sd.items() if not k.startswith("norm_")}
    c = TINY_ARCH["embed_dims"][-1]
    out.update({"norm.weight": torch.ones(c), "norm.bias": torch.zeros(c),
                "head.weight": torch.randn(1000, c), "head.bias": torch.zeros(1000)})
    return {"model": out}


def _mmseg_style(sd):
    out = {"backbone." + k: v for k, v in sd.items()}
    out["decode_head.conv_seg.weight"] = torch.randn(150, 512, 1, 1)
    return {"meta": {"iter": 160000}, "state_dict": out}


def _d2_style(sd):
    out = {}
    for k, v in sd.items():
        if k.startswith("norm_"):
            k = k.replace(".", ".0.", 1)  # norm_1.weight -> norm_1.0.weight
        out["backbone.bottom_up." + k] = v
    out["backbone.fpn_lateral2.weight"] = torch.randn(256, 16, 1, 1)
    out["roi_heads.box_predictor.cls_score.weight"] = torch.randn(81, 1024)
    return {"model": out, "__author__": "someone"}


WRAPPINGS = {"imagenet": _imagenet_style, "mmseg": _mmseg_style, "detectron2": _d2_style}


def _detector_with_pretrained(path, rel=MASK_RCNN, **backbone):
    cfg = shrink(load(rel))
    cfg.model.backbone.init_cfg = dict(type="Pretrained", checkpoint=str(path))
    cfg.model.backbone.update(backbone)
    return build(cfg)


@pytest.mark.parametrize("wrapping", sorted(WRAPPINGS))
def test_pretrained_init_cfg_loads_each_wrapping(tmp_path, wrapping):
    sd = _source_v2()
    path = tmp_path / f"{wrapping}.pth"
    torch.save(WRAPPINGS[wrapping](sd), path)

    model = _detector_with_pretrained(path)
    backbone = model.backbone
    assert isinstance(backbone, MMResTv2) and not backbone.is_init
    assert not torch.equal(backbone.stage3[0].attn.q.weight, sd["stage3.0.attn.q.weight"])
    model.init_weights()  # what mmengine's Runner does: top level, recursing into children
    assert backbone.is_init

    own = backbone.state_dict()
    expected = [k for k in sd if wrapping != "imagenet" or not k.startswith("norm_")]
    assert len(expected) > 100
    for k in expected:
        assert torch.equal(own[k], sd[k]), k
    if wrapping == "imagenet":  # the dense output norms are not in ImageNet files
        assert torch.equal(own["norm_4.weight"], torch.ones(128))


def test_pretrained_is_not_overwritten_by_parent_init(tmp_path):
    """A parent's own init_cfg runs before its children's init_weights, and repeated
    init_weights calls neither re-randomise nor reload."""
    sd = _source_v2()
    path = tmp_path / "w.pth"
    torch.save(_imagenet_style(sd), path)
    cfg = shrink(load(MASK_RCNN))
    cfg.model.backbone.init_cfg = dict(type="Pretrained", checkpoint=str(path))
    cfg.model.init_cfg = dict(type="Constant", val=0.5, layer=["Linear", "Conv2d"])
    model = build(cfg)
    model.init_weights()
    key = "stage2.0.mlp.fc1.weight"
    assert torch.equal(model.backbone.state_dict()[key], sd[key])

    with torch.no_grad():
        model.backbone.stage2[0].mlp.fc1.weight.add_(1.0)
    model.init_weights()          # warns, changes nothing
    model.backbone.init_weights()  # idem
    assert torch.equal(model.backbone.state_dict()[key], sd[key] + 1.0)


def test_init_weights_without_pretrained_randomises_once():
    backbone = MMResTv2(arch=TINY_ARCH)
    assert backbone.init_cfg is None and not backbone.is_init
    with torch.no_grad():
        backbone.stage1[0].attn.q.weight.fill_(3.0)
    backbone.init_weights()
    assert backbone.is_init
    w = backbone.stage1[0].attn.q.weight
    assert not torch.all(w == 3.0) and w.std() < 0.05  # truncated normal, std 0.02


def test_resnet_v1_pretrained_and_prefix(tmp_path):
    torch.manual_seed(2)
    sd = ResTv1(arch=TINY_ARCH).state_dict()
    full = {"state_dict": {"backbone." + k: v for k, v in sd.items()}}
    full["state_dict"].update({"neck.lateral_convs.0.conv.weight": torch.randn(256, 32, 1, 1)})
    path = tmp_path / "retina_v1.pth"
    torch.save(full, path)

    cfg = shrink(load(RETINA_V1))
    cfg.model.backbone.init_cfg = dict(type="Pretrained", checkpoint=str(path), prefix="backbone")
    model = build(cfg)
    assert isinstance(model.backbone, MMResTv1)
    model.init_weights()
    own = model.backbone.state_dict()
    assert all(torch.equal(own[k], v) for k, v in sd.items())

    bad = MMResTv1(arch=TINY_ARCH, init_cfg=dict(type="Pretrained", checkpoint=str(path),
                                                 prefix="detector."))
    with pytest.raises(ValueError, match="prefix"):
        bad.init_weights()


def test_mmseg_pretrained_shorthand(tmp_path):
    """MMSegmentation's ``EncoderDecoder(pretrained=...)`` passes ``pretrained`` down."""
    sd = _source_v2()
    path = tmp_path / "w.pth"
    torch.save(_mmseg_style(sd), path)
    cfg = shrink(load(UPERNET))
    cfg.model.pretrained = str(path)
    model = build(cfg)
    assert model.backbone.init_cfg == dict(type="Pretrained", checkpoint=str(path))
    model.init_weights()
    assert torch.equal(model.backbone.state_dict()["stem.proj.0.weight"], sd["stem.proj.0.weight"])


def test_wrong_variant_raises_clear_error(tmp_path):
    other = dict(TINY_ARCH, embed_dims=(32, 64, 128, 256))
    path = tmp_path / "other.pth"
    torch.save({"model": ResTv2(arch=other).state_dict()}, path)
    model = _detector_with_pretrained(path)
    with pytest.raises(CheckpointMismatchError, match=r"MMResTv2: cannot load .*other\.pth.*shape"):
        model.init_weights()

    v1 = tmp_path / "v1.pth"
    torch.save({"model": ResTv1(arch=TINY_ARCH).state_dict()}, v1)
    backbone = MMResTv2(arch=TINY_ARCH, init_cfg=dict(type="Pretrained", checkpoint=str(v1)))
    with pytest.raises(CheckpointMismatchError, match="v1.pth"):
        backbone.init_weights()


def test_missing_file_and_bad_init_cfg(tmp_path):
    backbone = MMResTv2(arch=TINY_ARCH, init_cfg=dict(type="Pretrained",
                                                      checkpoint=str(tmp_path / "nope.pth")))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        backbone.init_weights()
    with pytest.raises(ValueError, match="unsupported keys"):
        MMResTv2(arch=TINY_ARCH, init_cfg=dict(type="Pretrained", checkpoint="x",
                                               revise_keys=[])).init_weights()
    with pytest.raises(ValueError, match="either"):
        MMResTv2(arch=TINY_ARCH, init_cfg=dict(type="Pretrained", checkpoint="x"), pretrained="y")
    # a flag written as a string is refused, not read as True
    path = tmp_path / "in1k.pth"
    torch.save(_imagenet_style(_source_v2()), path)
    for key in ("strict", "weights_only"):
        with pytest.raises(TypeError, match=f"init_cfg {key} must be True or False"):
            MMResTv2(arch=TINY_ARCH, init_cfg=dict(type="Pretrained", checkpoint=str(path),
                                                   **{key: "False"})).init_weights()


def test_weights_only_by_default(tmp_path):
    """Downloaded weights are read with torch.load(weights_only=True) unless the config
    explicitly opts out."""
    path = tmp_path / "pickled.pth"
    torch.save({"model": _source_v2(), "args": argparse.Namespace(lr=0.1)}, path)
    backbone = MMResTv2(arch=TINY_ARCH, init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    with pytest.raises(pickle.UnpicklingError):
        backbone.init_weights()
    trusting = MMResTv2(arch=TINY_ARCH, init_cfg=dict(type="Pretrained", checkpoint=str(path),
                                                      weights_only=False))
    trusting.init_weights()
    assert trusting.is_init


def test_missing_keys_logged_through_mmengine(tmp_path):
    path = tmp_path / "in1k.pth"
    torch.save(_imagenet_style(_source_v2()), path)
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger = MMLogger.get_current_instance()
    handler = Collect(level=logging.DEBUG)
    logger.addHandler(handler)
    try:
        backbone = MMResTv2(arch=TINY_ARCH,
                            init_cfg=dict(type="Pretrained", checkpoint=str(path)))
        backbone.init_weights()
    finally:
        logger.removeHandler(handler)
    text = "\n".join(r.getMessage() for r in records)
    assert "loaded" in text and "in1k.pth" in text
    warning = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert any("norm_1.weight" in m for m in warning)                 # missing
    assert any("norm.weight" in m and "unused" in m for m in warning)  # unexpected


def test_frozen_stages_from_config():
    cfg = shrink(load(MASK_RCNN))
    cfg.model.backbone.frozen_stages = 2
    model = build(cfg)
    backbone = model.backbone
    frozen = ("stem.", "stage1.", "stage2.", "patch_2.", "norm_1.", "norm_2.")
    for name, p in backbone.named_parameters():
        assert p.requires_grad == (not name.startswith(frozen)), name
    model.train()
    assert not backbone.stem.proj[1].training and not backbone.stage2.training
    assert backbone.stage3.training and backbone.patch_3.training

    outs = backbone(torch.randn(2, 3, 64, 96))
    sum(o.square().mean() for o in outs).backward()
    grads = {n: p.grad for n, p in backbone.named_parameters()}
    assert all(g is None for n, g in grads.items() if n.startswith(frozen))
    assert grads["stage3.0.attn.q.weight"] is not None
    assert torch.count_nonzero(grads["stage3.0.attn.q.weight"]) > 0


def test_pretrained_from_url(tmp_path, monkeypatch):
    """http(s) checkpoints are downloaded into torch.hub's cache and read weights-only."""
    import functools
    import http.server
    import threading

    served = tmp_path / "served"
    served.mkdir()
    sd = _source_v2()
    torch.save(_d2_style(sd), served / "model_final.pth")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    try:
        url = f"http://127.0.0.1:{server.server_port}/model_final.pth"
        backbone = MMResTv2(arch=TINY_ARCH, init_cfg=dict(type="Pretrained", checkpoint=url))
        backbone.init_weights()
    finally:
        server.shutdown()
    assert all(torch.equal(backbone.state_dict()[k], v) for k, v in sd.items())
    assert list((tmp_path / "hub").rglob("model_final.pth"))


def test_another_backbones_keys_name_delete(capsys):
    """Swin's settings left in the backbone dict by a _base_ config (no _delete_=True) are
    named, with the fix; through the whole detector build too, in one line."""
    from rest_dense.cli import main as cli
    from rest_dense.mm import MMResTv2

    with pytest.raises(TypeError, match=r"ResTv2 does not take \['depths', 'embed_dims'\].*"
                                        r"_delete_=True"):
        MMResTv2(arch="tiny", embed_dims=96, depths=[2, 2, 6, 2])
    rc = cli(["flops", "toy/mask_rcnn_restv2_toy.py", "--params-only", "--cfg-options",
              "model.backbone.patch_norm=True"])
    err = without_logging_errors(capsys.readouterr().err)
    assert rc == 2 and "ResTv2 does not take ['patch_norm']" in err and "Traceback" not in err
