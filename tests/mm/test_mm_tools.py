"""tools/train.py and tools/test.py end to end on tiny on-disk datasets (MMSegmentation
and MMDetection), including --resume and testing trained checkpoints under torch>=2.6
(mmengine issue #1655), plus the helpers behind them."""
import importlib.util
import json
import pickle
import shutil

import cv2
import numpy as np
import pytest
import torch
from mmengine.config import Config

from rest_dense.mm import trusted_checkpoints
from rest_dense.mm.utils import detect_framework, wrap_for_tta
from rest_dense.models import ResTv2

from _mm_utils import CONFIG_DIR, REPO, TINY_ARCH, load


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"rest_dense_tools_{name}",
                                                  REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = repr(dict(TINY_ARCH))


def _last_log(work_dir):
    """The log of the latest run in a work dir (runs log to <work_dir>/<timestamp>/)."""
    return max(work_dir.glob("*/*.log"), key=lambda p: p.stat().st_mtime).read_text()


def _pretrained(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tiny_in1k.pth"
    torch.save({"model": ResTv2(arch=TINY_ARCH).state_dict()}, path)
    return path


# ------------------------------------------------------------------------- helpers
def test_detect_framework():
    assert detect_framework(load("mask_rcnn/mask-rcnn_restv2-t_fpn_amp-ms-1x_coco.py")) == "mmdet"
    assert detect_framework(load("upernet/upernet_restv2-t_8xb2-160k_ade20k-512x512.py")) == "mmseg"
    assert detect_framework(Config(dict(model=dict(type="EncoderDecoder")))) == "mmseg"
    assert detect_framework(Config(dict(model=dict(type="RetinaNet")))) == "mmdet"
    with pytest.raises(ValueError, match="default_scope"):
        detect_framework(Config(dict(model=dict(type="NoSuchModel"))))


def test_wrap_for_tta():
    cfg = load("upernet/upernet_restv2-t_8xb2-160k_ade20k-512x512.py")
    wrap_for_tta(cfg)
    assert cfg.model.type == "SegTTAModel" and cfg.model.module.type == "EncoderDecoder"
    assert cfg.test_dataloader.dataset.pipeline[1]["type"] == "TestTimeAug"
    wrap_for_tta(cfg)  # idempotent
    assert cfg.model.module.type == "EncoderDecoder"
    with pytest.raises(KeyError, match="tta_model"):
        wrap_for_tta(load("mask_rcnn/mask-rcnn_restv2-t_fpn_amp-ms-1x_coco.py"))


# ------------------------------------------------------------- MMSegmentation end to end
def _ade_like(root):
    for split, n in (("training", 2), ("validation", 1)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            img = np.random.default_rng(i).integers(0, 255, (64, 80, 3), dtype=np.uint8)
            seg = np.zeros((64, 80), np.uint8)
            seg[:, :40] = 3
            seg[20:50, 30:70] = 7
            cv2.imwrite(str(root / "images" / split / f"im{i}.jpg"), img)
            cv2.imwrite(str(root / "annotations" / split / f"im{i}.png"), seg)


def _seg_config(tmp_path, base):
    """A tiny ADE20K-style set and a config inheriting the shipped one (heads narrowed)."""
    data = tmp_path / "ade"
    _ade_like(data)
    path = tmp_path / "seg.py"
    path.write_text(f"""
_base_ = {str(CONFIG_DIR / base)!r}
model = dict(
    data_preprocessor=dict(size=(64, 64)),
    backbone=dict(arch=dict(_delete_=True, **{TINY}),
                  init_cfg=dict(checkpoint={str(_pretrained(tmp_path))!r})),
    decode_head=dict(in_channels=[16, 32, 64, 128], channels=32),
    auxiliary_head=dict(in_channels=64, channels=16))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(96, 64), ratio_range=(0.8, 1.2), keep_ratio=True),
    dict(type='RandomCrop', crop_size=(64, 64), cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(96, 64), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root={str(data)!r}, pipeline=train_pipeline))
val_dataloader = dict(num_workers=0, persistent_workers=False,
                      dataset=dict(data_root={str(data)!r}, pipeline=test_pipeline))
test_dataloader = val_dataloader
train_cfg = dict(max_iters=2, val_interval=100)
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1))
""")
    return str(path)


def test_seg_train_resume_and_test(tmp_path):
    train, test = _tool("train"), _tool("test")
    cfg = _seg_config(tmp_path, "upernet/upernet_restv2-t_8xb2-160k_ade20k-512x512.py")
    work = tmp_path / "work"
    model = train.main([cfg, "--work-dir", str(work), "--cfg-options", "experiment_name=seg_a"])
    assert type(model).__name__ == "EncoderDecoder"
    ckpt = work / "iter_2.pth"
    assert ckpt.is_file()
    log = _last_log(work)
    assert "MMResTv2: loaded 128 tensors from" in log          # init_cfg Pretrained
    assert "ResTLayerDecayOptimizerConstructor: decay_rate=0.9" in log

    # the mmengine checkpoint cannot be read with weights_only=True (mmengine #1655) ...
    with pytest.raises(pickle.UnpicklingError):
        torch.load(ckpt, weights_only=True)
    # ... so --resume of the run's own work dir unpickles it, as documented
    train.main([cfg, "--work-dir", str(work), "--resume",
                "--cfg-options", "experiment_name=seg_b", "train_cfg.max_iters=3"])
    log = _last_log(work)
    assert "resumed epoch: 0, iter: 2" in log
    assert (work / "iter_3.pth").is_file()

    # testing the trained checkpoint, multi-scale + flip (single scale: see the det test)
    metrics = test.main([cfg, str(work / "iter_3.pth"), "--tta", "--work-dir",
                         str(tmp_path / "t2"), "--cfg-options", "experiment_name=seg_d"])
    assert {"mIoU", "aAcc", "mAcc"} <= set(metrics)
    assert "SegTTAModel" in _last_log(tmp_path / "t2")

    # a copy outside the trusted locations is read with weights_only=True and refused
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(work / "iter_3.pth", elsewhere / "copy.pth")
    assert not trusted_checkpoints.is_trusted(elsewhere / "copy.pth")
    with pytest.raises(pickle.UnpicklingError, match="--trust-checkpoint"):
        trusted_checkpoints.load_from_local(str(elsewhere / "copy.pth"), "cpu")


# -------------------------------------------------------------- MMDetection end to end
def _coco_like(root):
    (root / "img").mkdir(parents=True)
    images, anns = [], []
    for i in range(2):
        img = np.full((96, 128, 3), 40, np.uint8)
        x, y = 20 + 10 * i, 16
        cv2.rectangle(img, (x, y), (x + 48, y + 40), (200, 80, 30), -1)
        cv2.imwrite(str(root / "img" / f"{i}.jpg"), img)
        images.append(dict(id=i + 1, file_name=f"{i}.jpg", height=96, width=128))
        poly = [x, y, x + 48, y, x + 48, y + 40, x, y + 40]
        anns.append(dict(id=i + 1, image_id=i + 1, category_id=1, bbox=[x, y, 48, 40],
                         area=48 * 40, iscrowd=0, segmentation=[poly]))
    coco = dict(images=images, annotations=anns, categories=[dict(id=1, name="person")])
    (root / "ann.json").write_text(json.dumps(coco))


def test_det_train_and_test(tmp_path):
    """The tool flow on a 2-image COCO-format set (heads narrowed: this is about the tools)."""
    train, test = _tool("train"), _tool("test")
    data = tmp_path / "coco"
    _coco_like(data)
    base = CONFIG_DIR / "mask_rcnn/mask-rcnn_restv2-t_fpn_amp-ms-1x_coco.py"
    cfg = tmp_path / "det.py"
    cfg.write_text(f"""
_base_ = {str(base)!r}
model = dict(
    backbone=dict(arch=dict(_delete_=True, **{TINY}),
                  init_cfg=dict(checkpoint={str(_pretrained(tmp_path))!r})),
    neck=dict(in_channels=[16, 32, 64, 128], out_channels=32),
    rpn_head=dict(in_channels=32, feat_channels=32),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=32),
        bbox_head=dict(in_channels=32, fc_out_channels=64, num_classes=1),
        mask_roi_extractor=dict(out_channels=32),
        mask_head=dict(in_channels=32, conv_out_channels=32, num_classes=1)),
    train_cfg=dict(rpn_proposal=dict(max_per_img=200), rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(rpn=dict(max_per_img=100), rcnn=dict(score_thr=0.0)))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomChoiceResize', scales=[(160, 96), (160, 112)], keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(160, 96), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
data = dict(data_root={str(data) + '/'!r}, ann_file='ann.json', data_prefix=dict(img='img/'),
            metainfo=dict(classes=('person',)))
train_dataloader = dict(num_workers=0, persistent_workers=False,
                        dataset=dict(pipeline=train_pipeline, **data))
val_dataloader = dict(num_workers=0, persistent_workers=False,
                      dataset=dict(pipeline=test_pipeline, **data))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file={str(data / 'ann.json')!r})
test_evaluator = val_evaluator
train_cfg = dict(max_epochs=1, val_interval=10)
default_hooks = dict(logger=dict(interval=1))
""")
    work = tmp_path / "work"
    # the config asks for AmpOptimWrapper, which needs a GPU: on CPU the tool trains fp32
    runner_model = train.main([str(cfg), "--work-dir", str(work),
                               "--cfg-options", "experiment_name=det_a"])
    assert type(runner_model).__name__ == "MaskRCNN"
    assert (work / "epoch_1.pth").is_file()
    log = _last_log(work)
    assert "MMResTv2: loaded 128 tensors" in log
    if not torch.cuda.is_available():
        assert "Epoch(train) [1][1/1]" in log
    metrics = test.main([str(cfg), str(work / "epoch_1.pth"), "--work-dir", str(tmp_path / "t"),
                         "--cfg-options", "experiment_name=det_b"])
    assert "coco/bbox_mAP" in metrics and "coco/segm_mAP" in metrics
