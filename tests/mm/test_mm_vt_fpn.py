"""VT-FPN in MMSegmentation / MMDetection: the registered neck, every shipped semantic-FPN and
VT-FPN config built with a small backbone and run on an odd size, real training steps on the
toy data (mmseg VT-FPN, mmdet Mask R-CNN with VT-FPN, mmdet RetinaNet with VT-FPN through the
Runner), and the errors of careless configs."""
import copy
import re

import pytest
import torch
from mmengine.config import Config
from mmengine.dataset import pseudo_collate
from mmengine.optim import build_optim_wrapper
from mmengine.registry import DefaultScope, Registry, init_default_scope

import rest_dense.mm  # noqa: F401
from rest_dense.mm import MMVTFPN
from rest_dense.mm.necks import check_neck_levels
from rest_dense.mm.utils import register_once
from rest_dense.models import VTFPN

from _mm_utils import TINY_ARCH, build, load, shrink

pytestmark = pytest.mark.usefixtures("one_thread")

SEG_CONFIGS = ["sem_fpn/fpn_restv2-t_8xb2-160k_ade20k-512x512.py",
               "sem_fpn/vt-fpn_restv2-t_8xb2-160k_ade20k-512x512.py",
               "toy/sem_fpn_restv2_toy.py", "toy/vt_fpn_restv2_toy.py"]
DIMS = list(TINY_ARCH["embed_dims"])
H, W = 97, 131


@pytest.fixture(scope="module")
def toy_root(make_toy_root):
    return str(make_toy_root(num_train=8, num_val=2)) + "/"


def test_registered_in_both_frameworks_and_refuses_foreign_names():
    from mmdet.registry import MODELS as DET
    from mmseg.registry import MODELS as SEG

    assert DET.get("VTFPN") is MMVTFPN and SEG.get("VTFPN") is MMVTFPN
    assert issubclass(MMVTFPN, VTFPN)
    register_once(SEG, "VTFPN", MMVTFPN)  # re-import: a no-op

    class VTFPNOfAnotherPackage(torch.nn.Module):
        pass

    with pytest.raises(KeyError, match="will not replace"):
        register_once(SEG, "VTFPN", VTFPNOfAnotherPackage)
    other = Registry("models")  # a package that registered the name first
    other.register_module(name="VTFPN", module=VTFPNOfAnotherPackage)
    with pytest.raises(KeyError, match="VTFPN"):
        register_once(other, "VTFPN", MMVTFPN)
    assert other.get("VTFPN") is VTFPNOfAnotherPackage


def test_adapter_arguments_and_init_cfg(request):
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS

    # an earlier test of this worker may leave another default scope (e.g. mmengine's),
    # which Registry.build would follow instead of mmseg's registry
    scope = DefaultScope.overwrite_default_scope("mmseg")
    scope.__enter__()
    request.addfinalizer(lambda: scope.__exit__(None, None, None))

    neck = MODELS.build(dict(type="VTFPN", in_channels=DIMS, out_channels=16, token_channels=32,
                             num_heads=4, norm_cfg=dict(type="SyncBN", requires_grad=True),
                             init_cfg=dict(type="Constant", layer="Conv2d", val=0.5, bias=0.0)))
    assert neck.norm_layer == "syncbn" and not neck.is_init
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in neck.modules())
    neck.init_weights()
    assert neck.is_init and (neck.lateral_convs[0].weight == 0.5).all()
    neck.init_weights()  # a second call (a parent's) only warns: the init_cfg result stays
    assert (neck.lateral_convs[0].weight == 0.5).all()
    assert MODELS.build(dict(type="VTFPN", in_channels=DIMS, norm_cfg=None)).norm_layer is None
    with pytest.raises(TypeError, match="add_extra_convs"):
        MODELS.build(dict(type="VTFPN", in_channels=DIMS, num_outs=5, add_extra_convs="on_input"))
    with pytest.raises(ValueError, match="norm_cfg"):
        MODELS.build(dict(type="VTFPN", in_channels=DIMS, norm_cfg=dict(type="GN", num_groups=4)))
    with pytest.raises(TypeError, match="not both"):
        MODELS.build(dict(type="VTFPN", in_channels=DIMS, norm_cfg=None, norm_layer="ln"))


@pytest.mark.parametrize("rel", SEG_CONFIGS)
def test_shipped_seg_config_predicts_odd_size(rel):
    cfg = shrink(load(rel))
    model_cfg = cfg.model
    assert model_cfg.neck.type == ("VTFPN" if "vt" in rel.split("/")[1] else "FPN")
    assert model_cfg.decode_head.type == "FPNHead" and model_cfg.get("auxiliary_head") is None
    torch.manual_seed(0)
    model = build(cfg).eval()
    img = torch.randint(0, 256, (3, H, W), dtype=torch.uint8)
    from mmseg.structures import SegDataSample

    sample = SegDataSample()
    sample.set_metainfo(dict(ori_shape=(H, W), img_shape=(H, W), pad_shape=(H, W),
                             scale_factor=(1.0, 1.0), flip=False))
    with torch.no_grad():
        res = model.test_step(dict(inputs=[img], data_samples=[sample]))[0]
    num_classes = model_cfg.decode_head.num_classes
    assert res.pred_sem_seg.data.shape == (1, H, W)
    assert res.seg_logits.data.shape == (num_classes, H, W)
    assert torch.isfinite(res.seg_logits.data).all()


def _toy_batch(cfg, root, n):
    from mmengine.registry import DATASETS

    ds_cfg = copy.deepcopy(cfg.train_dataloader.dataset)
    ds_cfg.data_root = root
    if "ann_file" in ds_cfg:
        ds_cfg.pop("filter_cfg", None)
    dataset = DATASETS.build(ds_cfg)
    return pseudo_collate([dataset[i] for i in range(n)])


def _train_steps(cfg, root, steps, n=4):
    init_default_scope(cfg.default_scope)
    torch.manual_seed(0)
    model = build(cfg)
    model.init_weights()
    optim = build_optim_wrapper(model, cfg.optim_wrapper)
    batch = _toy_batch(cfg, root, n)
    model.train()
    model.initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    losses = []
    for _ in range(steps):
        log_vars = model.train_step(batch, optim)
        losses.append(float(log_vars["loss"].detach()))
    return model, losses


def test_mmseg_vt_fpn_trains_on_toy_data(toy_root):
    cfg = load("toy/vt_fpn_restv2_toy.py")
    model, losses = _train_steps(cfg, toy_root, steps=6)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses
    # the optimizer moved every part of the neck (gradients reached it)
    moved = [k for k, v in model.neck.state_dict().items()
             if v.is_floating_point() and not torch.equal(v, model.initial_state["neck." + k])]
    for part in ("lateral_convs.", "tokenizers.", "transformer.", "projectors."):
        assert any(k.startswith(part) for k in moved), (part, moved)


def test_mmdet_mask_rcnn_vt_fpn_trains_on_toy_data(toy_root):
    cfg = load("toy/mask_rcnn_restv2_vt_fpn_toy.py")
    assert cfg.model.neck.type == "VTFPN" and cfg.model.neck.num_outs == 5
    cfg.model.train_cfg.rpn_proposal.max_per_img = 50
    model, losses = _train_steps(cfg, toy_root, steps=2, n=2)
    assert model.neck.num_outs == 5
    assert all(torch.isfinite(torch.tensor(losses))), losses
    feats = model.extract_feat(torch.rand(1, 3, H, W))
    assert len(feats) == 5 and [f.shape[-2:] for f in feats][-1] == (2, 3)


def _scalars(work_dir):
    """The per-iteration training scalars the Runner logged (``vis_data/scalars.json``)."""
    import glob
    import json

    (path,) = glob.glob(str(work_dir / "*" / "vis_data" / "scalars.json"))
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if "loss_cls" in r]


def test_mmdet_retinanet_vt_fpn_trains_with_the_runner_and_predicts_odd_size(toy_root,
                                                                             tmp_path):
    """toy/retinanet_restv2_vt_fpn_toy.py: RetinaNet's five levels (strides 8..128) from three
    backbone maps (strides 8/16/32) and two max-pooled ones; real Runner iterations on the toy
    data (the config's own optimizer and scaled schedule), then a prediction at 97x131."""
    from mmdet.structures import DetDataSample

    from rest_dense.mm.runner import train

    cfg = load("toy/retinanet_restv2_vt_fpn_toy.py")
    base = load("toy/retinanet_restv2_toy.py")
    assert cfg.model.neck.type == "VTFPN" and cfg.model.neck.num_outs == 5
    assert cfg.model.neck.in_channels == base.model.neck.in_channels == [64, 128, 256]
    # everything but the neck is the FPN toy RetinaNet's
    for key in ("backbone", "bbox_head", "train_cfg", "test_cfg", "data_preprocessor"):
        assert cfg.model[key] == base.model[key], key
    for key in ("train_dataloader", "optim_wrapper", "param_scheduler", "train_cfg"):
        assert cfg[key] == base[key], key

    iters = 24
    model = train(cfg, work_dir=tmp_path, cfg_options={
        "train_cfg.max_iters": iters,
        "train_dataloader.dataset.data_root": toy_root,
        "default_hooks.checkpoint.interval": iters,
        "default_hooks.logger.interval": 1,
        "log_processor.window_size": 1,  # each iteration's own losses, not a moving mean
        "val_cfg": None, "val_dataloader": None, "val_evaluator": None})
    rows = _scalars(tmp_path)
    assert [r["iter"] for r in rows] == list(range(1, iters + 1))
    cls = [r["loss_cls"] for r in rows]
    for r in rows:
        assert all(map(torch.isfinite, torch.tensor([r["loss"], r["loss_cls"],
                                                     r["loss_bbox"]]))), r
    # the focal loss falls from its prior-initialised start (a model that does not learn,
    # e.g. no gradient through the neck, stays near the first values)
    first, last = sum(cls[:4]) / 4, sum(cls[-4:]) / 4
    assert last < 0.85 * first, cls
    # three token levels (the backbone's maps), two pooled ones
    assert model.neck.num_outs == 5 and len(model.neck.tokenizers) == 3

    model.eval()
    model.bbox_head.test_cfg.score_thr = 0.0  # few iterations: keep the top boxes whatever
    img = torch.randint(0, 256, (3, H, W), dtype=torch.uint8)
    sample = DetDataSample()
    sample.set_metainfo(dict(ori_shape=(H, W), img_shape=(H, W), scale_factor=(1.0, 1.0)))
    with torch.no_grad():
        feats = model.extract_feat(torch.rand(1, 3, H, W))
        res = model.test_step(dict(inputs=[img], data_samples=[sample]))[0]
    assert [tuple(f.shape[-2:]) for f in feats] == [(13, 17), (7, 9), (4, 5), (2, 3), (1, 2)]
    inst = res.pred_instances
    assert len(inst) == cfg.model.test_cfg.max_per_img
    assert torch.isfinite(inst.scores).all() and ((inst.scores >= 0) & (inst.scores <= 1)).all()
    boxes = inst.bboxes
    assert torch.isfinite(boxes).all() and (boxes[:, 2:] >= boxes[:, :2]).all()
    assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= W).all()
    assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= H).all()
    assert set(inst.labels.tolist()) <= {0, 1, 2}


def test_careless_configs_are_named_errors():
    # Mask R-CNN reads five levels: a four-level neck is refused at build time
    cfg = load("toy/mask_rcnn_restv2_vt_fpn_toy.py")
    cfg.model.neck.num_outs = 4
    with pytest.raises(ValueError, match=r"num_outs=4 .*anchor generator.*num_outs=5"):
        build(cfg)
    # a neck sized for ResTv2-T on the toy backbone: the channels named
    cfg = load("toy/vt_fpn_restv2_toy.py")
    cfg.model.neck.in_channels = [96, 192, 384, 768]
    with pytest.raises(ValueError, match=r"neck.in_channels=\[96, 192, 384, 768\]"):
        build(cfg)
    # an FPNHead reading more levels than the neck gives
    cfg = load("toy/vt_fpn_restv2_toy.py")
    model = build(cfg)
    model.decode_head.in_index = [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="decode_head.in_index"):
        check_neck_levels(model)
    # token channels not divisible by the heads: the core's error, with the argument
    cfg = load("toy/vt_fpn_restv2_toy.py")
    cfg.model.neck.token_channels = 100
    with pytest.raises(ValueError, match="token_channels"):
        build(cfg)


@pytest.mark.parametrize("bad,named", [
    ("work_dirs/neck.pth", "got the string 'work_dirs/neck.pth'; a checkpoint is "
                           "dict(type='Pretrained', checkpoint='work_dirs/neck.pth')"),
    (5, "init_cfg must be a dict or a list of dicts, got 5"),
    ([dict(type="Constant", val=1.0, layer="Conv2d"), "x"], "entries must be dicts with a 'type', got 'x'"),
])
def test_init_cfg_of_another_shape_is_named(bad, named):
    """One check (mm.backbones.init_cfg_entries) for the backbones and the neck; a path
    given as init_cfg itself was reported by its first character ('w')."""
    from mmseg.registry import MODELS

    for cfg in (dict(type="VTFPN", in_channels=DIMS, out_channels=16, token_channels=32,
                     num_heads=4), dict(type="ResTv2", arch="tiny")):
        with DefaultScope.overwrite_default_scope("mmseg"):
            with pytest.raises(TypeError, match=re.escape(named)):
                MODELS.build(dict(cfg, init_cfg=bad))
