"""Training and testing MMDetection / MMSegmentation configs end to end on tiny on-disk
datasets, through ``rest-dense train`` / ``rest-dense test`` (:func:`rest_dense.cli.main`)
and :mod:`rest_dense.mm.runner`: ``--resume``, test-time augmentation, ``--show-dir``, and
reading trained checkpoints under torch>=2.6 (mmengine issue #1655) with
:mod:`rest_dense.safe_load`'s policy; plus the helpers behind them."""
import json
import math
import pickle
import shutil

import cv2
import numpy as np
import pytest
import torch
from mmengine.config import Config

from rest_dense import safe_load
from rest_dense.amp import amp_supported
from rest_dense.cli import main as cli
from rest_dense.mm import runner as mm_runner
from rest_dense.mm import safe_load as mm_safe_load
from rest_dense.mm.optim import amp_unavailable_fallback
from rest_dense.configs import get_config_path
from rest_dense.mm.utils import detect_framework, wrap_for_tta
from rest_dense.models import CheckpointMismatchError, ResTv2

from _mm_utils import CONFIG_DIR, TINY_ARCH, build, load, shrink
from conftest import without_logging_errors

TINY = repr(dict(TINY_ARCH))


class Note:
    """An object no allow-list admits (a stand-in for anything a checkpoint may carry)."""

    def __init__(self, text):
        self.text = text


@pytest.fixture(autouse=True)
def _fresh_trust():
    """Each test starts and ends with nothing marked trusted."""
    safe_load.forget_trusted()
    yield
    safe_load.forget_trusted()


def _last_log(work_dir):
    """The log of the latest run in a work dir (runs log to <work_dir>/<timestamp>/)."""
    return max(work_dir.glob("*/*.log"), key=lambda p: p.stat().st_mtime).read_text()


def _pretrained(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tiny_in1k.pth"
    torch.save({"model": ResTv2(arch=TINY_ARCH).state_dict()}, path)
    return path


def _finite_metrics(metrics, keys):
    assert set(keys) <= set(metrics), metrics
    for key in keys:
        assert math.isfinite(float(metrics[key])), (key, metrics[key])


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


def test_train_config_from_shipped_name(tmp_path):
    """A shipped config by name: work dir, resume, AMP fallback and trust set as documented:
    only the `trust` paths are trusted, not the work dir, not the resume file."""
    name = "mask_rcnn/mask-rcnn_restv2-t_fpn_amp-ms-1x_coco.py"
    ckpt = tmp_path / "mine.pth"
    torch.save({"state_dict": {}}, ckpt)
    cfg = mm_runner.train_config(name, work_dir=tmp_path / "w", resume=str(ckpt),
                                 cfg_options=["train_dataloader.batch_size=1"],
                                 trust=[tmp_path / "earlier"])
    assert cfg.default_scope == "mmdet" and cfg.work_dir == str(tmp_path / "w")
    assert cfg.resume is True and cfg.load_from == str(ckpt)
    assert cfg.train_dataloader.batch_size == 1
    assert cfg.optim_wrapper.type == ("AmpOptimWrapper" if amp_supported() else "OptimWrapper")
    assert not safe_load.is_trusted(tmp_path / "w" / "iter_5.pth") and not safe_load.is_trusted(ckpt)
    assert safe_load.is_trusted(tmp_path / "earlier" / "x.pth")
    assert not safe_load.is_trusted(tmp_path / "other.pth")

    auto = mm_runner.train_config(name, resume=True, work_dir=tmp_path / "empty")
    assert auto.resume is False and auto.load_from is None  # nothing to resume: fresh start
    named = mm_runner.train_config(name)
    assert named.work_dir.endswith("mask-rcnn_restv2-t_fpn_amp-ms-1x_coco")
    with pytest.raises(FileNotFoundError, match="resume checkpoint"):
        mm_runner.train_config(name, resume=tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="did you mean"):
        mm_runner.train_config("mask_rcnn/mask-rcnn_restv2-t_fpn_amp-ms-1x_cocoo.py")
    with pytest.raises(ValueError, match="launcher"):
        mm_runner.train_config(name, launcher="torchrun")


def test_amp_fallback_uses_shared_helper(monkeypatch):
    """mm's AmpOptimWrapper fallback asks rest_dense.amp (the same helper as detectron2's)."""
    import rest_dense.amp as amp

    cfg = load("mask_rcnn/mask-rcnn_restv2-t_fpn_amp-ms-1x_coco.py")
    monkeypatch.setattr(amp, "accelerator_available", lambda device_type: device_type == "npu")
    assert not amp_unavailable_fallback(cfg) and cfg.optim_wrapper.type == "AmpOptimWrapper"
    monkeypatch.setattr(amp, "accelerator_available", lambda device_type: False)
    assert amp_unavailable_fallback(cfg)
    assert cfg.optim_wrapper.type == "OptimWrapper" and "loss_scale" not in cfg.optim_wrapper
    # a bf16 AmpOptimWrapper keeps bf16 on the CPU, through BF16OptimWrapper
    cfg = load("mask_rcnn/mask-rcnn_restv2-t_fpn_amp-ms-1x_coco.py")
    cfg.optim_wrapper.dtype = "bfloat16"
    assert amp_unavailable_fallback(cfg)
    assert cfg.optim_wrapper.type == "BF16OptimWrapper" and "dtype" not in cfg.optim_wrapper
    assert cfg.optim_wrapper.autocast_modules == ["backbone", "neck"]


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


@pytest.mark.slow
def test_seg_train_resume_and_test(tmp_path, one_thread, capsys):
    cfg = _seg_config(tmp_path, "upernet/upernet_restv2-t_8xb2-160k_ade20k-512x512.py")
    work = tmp_path / "work"
    assert cli(["train", cfg, "--work-dir", str(work), "experiment_name=seg_a"]) == 0
    ckpt = work / "iter_2.pth"
    assert ckpt.is_file()
    log = _last_log(work)
    assert "MMResTv2: loaded 128 tensors from" in log          # init_cfg Pretrained
    assert "ResTLayerDecayOptimizerConstructor: decay_rate=0.9" in log

    # torch's plain weights_only=True refuses an mmengine checkpoint (mmengine #1655) ...
    with pytest.raises(pickle.UnpicklingError):
        torch.load(ckpt, weights_only=True)
    # ... rest_dense's allow-list reads it without full unpickling, from anywhere
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(ckpt, elsewhere / "copy.pth")
    assert not safe_load.is_trusted(elsewhere / "copy.pth")
    loaded = mm_safe_load.load_from_local(str(elsewhere / "copy.pth"), "cpu")
    assert loaded["meta"]["iter"] == 2
    buffers = loaded["message_hub"]["log_scalars"]
    assert math.isfinite(float(buffers["train/loss"].mean()))

    # --resume (no value) continues the latest run in the work dir
    assert cli(["train", cfg, "--work-dir", str(work), "--resume",
                "experiment_name=seg_b", "train_cfg.max_iters=3"]) == 0
    log = _last_log(work)
    assert "resumed epoch: 0, iter: 2" in log
    assert (work / "iter_3.pth").is_file()

    # testing the trained checkpoint, multi-scale + flip, painting the predictions
    capsys.readouterr()
    saved = tmp_path / "metrics.json"
    assert cli(["test", cfg, str(work / "iter_3.pth"), "--tta", "--work-dir", str(tmp_path / "t2"),
                "--show-dir", str(tmp_path / "vis"), "--save-metrics", str(saved),
                "--cfg-options", "experiment_name=seg_d"]) == 0
    metrics = json.loads(saved.read_text())
    _finite_metrics(metrics, ("mIoU", "aAcc", "mAcc"))
    assert "mIoU" in capsys.readouterr().out
    assert "SegTTAModel" in _last_log(tmp_path / "t2")
    assert list((tmp_path / "vis").rglob("*.png")), "--show-dir painted nothing"

    # a checkpoint that holds more than the allow-list admits: refused unless trusted
    # explicitly (being rest-dense test's CHECKPOINT is not enough)
    odd = elsewhere / "odd.pth"
    torch.save({**loaded, "extra": Note("mine")}, odd)
    with pytest.raises(safe_load.UntrustedCheckpointError, match="--trust-checkpoint"):
        mm_safe_load.load_from_local(str(odd), "cpu")
    capsys.readouterr()
    assert cli(["test", cfg, str(odd), "--work-dir", str(tmp_path / "t3"),
                "experiment_name=seg_e"]) == 2
    err = capsys.readouterr().err
    assert "rest-dense test: error:" in err and str(odd) in err and "--trust-checkpoint" in err
    assert cli(["test", cfg, str(odd), "--weights-only", "--trust-checkpoint", str(odd)]) == 2
    assert "contradicts" in capsys.readouterr().err
    mm_runner.test_config(cfg, odd)
    assert not safe_load.is_trusted(odd)
    mm_runner.test_config(cfg, odd, trust=[odd])        # --trust-checkpoint
    assert mm_safe_load.load_from_local(str(odd), "cpu")["extra"].text == "mine"


UPERNET_T = "upernet/upernet_restv2-t_8xb2-160k_ade20k-512x512.py"


def _upernet(arch=TINY_ARCH, seed=0):
    torch.manual_seed(seed)
    return build(shrink(load(UPERNET_T), arch=arch))


@pytest.mark.parametrize("case,expect", [
    ("foreign", "matches none of the model's"),
    ("wider", "wrong variant"),
    ("no_decode_head", "decode_head.conv_seg"),
    ("backbone_only", "weights of the ResT backbone only"),
    ("d2_layout", "is a detectron2 checkpoint"),
])
def test_test_checkpoint_must_cover_the_model(case, expect, tmp_path):
    """mmengine would evaluate these with randomly initialised layers and a log line."""
    model = _upernet()
    if case == "foreign":
        sd = {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.bias": torch.zeros(1000)}
    elif case == "wider":
        wide = dict(TINY_ARCH, embed_dims=[d * 2 for d in TINY_ARCH["embed_dims"]])
        sd = _upernet(arch=wide).state_dict()
    elif case == "no_decode_head":
        sd = {k: v for k, v in model.state_dict().items() if not k.startswith("decode_head.")}
    else:
        sd = {k[len("backbone."):]: v for k, v in model.state_dict().items()
              if k.startswith("backbone.")}
    path = tmp_path / f"{case}.pth"
    if case == "d2_layout":  # a detectron2 file of the backbone: {"model": {bottom_up...}}
        torch.save({"model": {"backbone.bottom_up." + k: v for k, v in sd.items()}}, path)
    else:
        torch.save({"state_dict": sd, "meta": {}}, path)
    with pytest.raises(CheckpointMismatchError, match=expect):
        mm_runner.check_test_checkpoint(model, str(path))
    # the model's own weights pass, also as a bare state dict
    torch.save(_upernet(seed=1).state_dict(), tmp_path / "own.pth")
    mm_runner.check_test_checkpoint(model, str(tmp_path / "own.pth"))


def test_cli_test_refuses_a_checkpoint_of_another_model(tmp_path, capsys, one_thread):
    path = tmp_path / "resnet.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(64, 3, 7, 7)}}, path)
    assert cli(["test", UPERNET_T, str(path), "--work-dir", str(tmp_path / "w"),
                "experiment_name=refuse_foreign"]) == 2
    err = capsys.readouterr().err
    assert "rest-dense test: error:" in err and "resnet.pth" in err and "matches none" in err
    # a truncated file: what it is, not an OSError traceback
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[:300])
    assert cli(["test", UPERNET_T, str(truncated), "--work-dir", str(tmp_path / "w"),
                "experiment_name=refuse_truncated"]) == 2
    err = capsys.readouterr().err
    assert "truncated.pth" in err and "cannot read" in err and "Traceback" not in err


def test_cli_errors_name_the_problem(tmp_path, capsys):
    cfg = "upernet/upernet_restv2-t_8xb2-160k_ade20k-512x512.py"
    assert cli(["test", cfg, str(tmp_path / "missing.pth")]) == 2
    assert "missing.pth' does not exist" in capsys.readouterr().err
    assert cli(["train", cfg, "--num-gpus", "2"]) == 2
    err = capsys.readouterr().err
    assert "--num-gpus" in err and "MMDetection / MMSegmentation" in err
    assert cli(["train", cfg, "MODEL.DEVICE", "cpu"]) == 2
    assert "'MODEL.DEVICE' is not KEY=VALUE" in capsys.readouterr().err
    assert cli(["train", cfg, "--auto-scale-lr", "auto_scale_lr=None"]) == 2
    assert "base_batch_size" in capsys.readouterr().err


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


@pytest.mark.slow
def test_det_train_and_test(tmp_path, one_thread):
    """The library flow on a 2-image COCO-format set (heads narrowed: this is about the tools)."""
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
    # the config asks for AmpOptimWrapper, which needs a GPU: on CPU the runner trains fp32
    model = mm_runner.train(cfg, work_dir=work, cfg_options={"experiment_name": "det_a"})
    assert type(model).__name__ == "MaskRCNN"
    assert (work / "epoch_1.pth").is_file()
    log = _last_log(work)
    assert "MMResTv2: loaded 128 tensors" in log
    if not amp_supported():
        assert "Epoch(train) [1][1/1]" in log
    metrics = mm_runner.test(cfg, work / "epoch_1.pth", work_dir=tmp_path / "t", show_dir="vis",
                             cfg_options=["experiment_name=det_b"])
    _finite_metrics(metrics, ("coco/bbox_mAP", "coco/segm_mAP"))
    painted = list((tmp_path / "t").rglob("vis/*.jpg"))
    assert len(painted) == 2, painted


@pytest.mark.parametrize("name, options, match", [
    ("toy/mask_rcnn_restv2_toy.py", ["model.neck.in_channels=1,2"],
     r"neck.in_channels=\[1, 2\] does not fit the backbone: MMResTv2 emits out_channels=\[32, 64, 128, 256\]"),
    ("toy/mask_rcnn_restv2_toy.py", ["model.backbone.out_indices=1,2,3"],
     r"neck.in_channels=\[32, 64, 128, 256\] .* out_channels=\[64, 128, 256\]"),
    ("toy/upernet_restv2_toy.py", ["model.backbone.out_indices=0,1,2"],
     r"decode_head.in_index=\[0, 1, 2, 3\] points past the 3 maps"),
    ("toy/upernet_restv2_toy.py", ["model.decode_head.in_channels=[8,64,128,256]"],
     r"decode_head.in_channels=\[8, 64, 128, 256\] does not fit"),
])
def test_neck_channels_checked_when_built(name, options, match):
    from rest_dense.mm.utils import build_model, load_config

    with pytest.raises(ValueError, match=match):
        build_model(load_config(get_config_path(name), options))


def test_neck_channels_deepest_first_neck(tmp_path):
    """mmdet's YOLOv3 neck lists its in_channels deepest first: the right order builds, the
    backbone's order is refused naming the order that neck wants."""
    from rest_dense.mm.utils import build_model, load_config

    base = get_config_path("toy/mask_rcnn_restv2_toy.py")
    path = tmp_path / "yolo.py"
    path.write_text(f"""_base_ = {str(base)!r}
model = dict(_delete_=True, type='YOLOV3',
    data_preprocessor=dict(type='DetDataPreprocessor', mean=[0, 0, 0], std=[255., 255., 255.],
                           bgr_to_rgb=True, pad_size_divisor=32),
    backbone=dict(type='ResTv2', arch=dict(embed_dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8),
                  depths=(1, 1, 2, 1), sr_ratios=(8, 4, 2, 1)), out_indices=(1, 2, 3)),
    neck=dict(type='YOLOV3Neck', num_scales=3, in_channels=[256, 128, 64],
              out_channels=[128, 64, 32]),
    bbox_head=dict(type='YOLOV3Head', num_classes=3, in_channels=[128, 64, 32],
                   out_channels=[256, 128, 64]))
""")
    model = build_model(load_config(str(path)))
    assert type(model.neck).__name__ == "YOLOV3Neck"
    with pytest.raises(ValueError, match=r"in_channels=\[256, 128, 64\], deepest first"):
        build_model(load_config(str(path), ["model.neck.in_channels=[64,128,256]"]))


@pytest.mark.parametrize("command", ["train", "test"])
@pytest.mark.parametrize("option,named", [
    ("model.backbone.attn_mode=winn", "winn"),
    ("model.backbone.drop_path_rate=-1", "drop_path_rate"),
    ("model.backbone.type=ResTv9", "ResTv9"),
    ("model.decode_head.in_channels=[1,2]", "assertion failed at"),  # mmseg's bare assert
])
def test_cli_bad_config_value_is_one_line(tmp_path, capsys, command, option, named):
    """A bad value in the config (here through --cfg-options) fails while the runner is
    built: one line naming it, exit 2, not the runner's traceback."""
    ckpt = tmp_path / "any.pth"
    torch.save({"state_dict": {}}, ckpt)
    argv = [command, UPERNET_T, *([str(ckpt)] if command == "test" else []),
            "--work-dir", str(tmp_path / "w"), "--cfg-options", option]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert f"rest-dense {command}: error: the config does not build" in err and named in err
    assert "Traceback" not in without_logging_errors(err)


@pytest.mark.parametrize("command,option,named", [
    ("train", "optim_wrapper.optimizer.lr=-1.0", "Invalid learning rate"),
    ("train", "train_dataloader.batch_size=0", "batch_size"),
    ("train", "optim_wrapper.type=FooWrapper", "FooWrapper"),
    ("train", "param_scheduler.1.type=FooLR", "FooLR"),
    ("test", "test_evaluator.type=FooMetric", "FooMetric"),
])
def test_cli_bad_loop_value_is_one_line(tmp_path, capsys, toy_root, command, option, named):
    """Values mmengine builds only inside train() / test() (loaders, optimizer, evaluator)
    are built before the run starts (mm.runner.build_loops): one line, nothing trained."""
    config = "toy/upernet_restv2_toy.py"
    ckpt = tmp_path / "any.pth"
    torch.save({"state_dict": build(load(config)).state_dict()}, ckpt)
    roots = [f"{split}_dataloader.dataset.data_root={toy_root}/"
             for split in ("train", "val", "test")]
    argv = [command, config, *([str(ckpt)] if command == "test" else []),
            "--work-dir", str(tmp_path / "w"), "--cfg-options", *roots,
            "train_cfg.max_iters=1", option]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert f"rest-dense {command}: error: the config does not build" in err and named in err
    assert "Traceback" not in without_logging_errors(err)
    assert not list((tmp_path / "w").rglob("*.pth"))


def test_fresh_run_into_a_folder_of_an_earlier_run_warns(tmp_path, capsys):
    """Without --resume a run starts anew; where the work dir holds an earlier run's
    checkpoints (which the new ones may overwrite or delete), it says so first."""
    work = tmp_path / "work"
    work.mkdir()
    torch.save({"meta": {"iter": 120}}, work / "iter_120.pth")
    code = cli(["train", "toy/mask_rcnn_restv2_toy.py", "--work-dir", str(work),
                "--cfg-options", "model.backbone.typo_key=1"])  # stops once the model builds
    err = capsys.readouterr().err
    assert code == 2 and "typo_key" in err
    assert "holds checkpoints of an earlier run (newest: iter_120.pth)" in err
    assert (work / "iter_120.pth").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    cli(["train", "toy/mask_rcnn_restv2_toy.py", "--work-dir", str(empty),
         "--cfg-options", "model.backbone.typo_key=1"])
    assert "earlier run" not in capsys.readouterr().err
