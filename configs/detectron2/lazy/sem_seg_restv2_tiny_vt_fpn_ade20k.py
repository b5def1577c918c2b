"""VT-FPN with ResTv2-T on ADE20K (512x512 crops, 160k iterations) as a detectron2 LazyConfig.

The same model and recipe as ``configs/detectron2/sem_seg_restv2_tiny_vt_fpn_ade20k.yaml``:
detectron2's ``SemanticSegmentor`` + ``SemSegFPNHead`` (128 channels, GroupNorm) on the maps
p2..p5 of :class:`rest_dense.d2.D2VTFPN` (ResTv2-T + the visual-token neck with the paper's
settings); AdamW (lr 1.5e-4, weight decay 0.05, none on norms and biases), 1500-iteration
linear warm-up then poly decay to 0, batch 16; short side 256..1024, long side <= 2048,
512x512 crops in which no class covers more than 75%, flip; test at short side 512.
Data: detectron2's builtin ``ade20k_sem_seg_train`` / ``ade20k_sem_seg_val``
(``$DETECTRON2_DATASETS/ADEChallengeData2016``, labels prepared by detectron2's
``datasets/prepare_ade20k_sem_seg.py``).

    rest-dense train detectron2/lazy/sem_seg_restv2_tiny_vt_fpn_ade20k.py --num-gpus 8
    # overrides use key=value, e.g.  train.max_iter=1000 dataloader.train.total_batch_size=2
"""
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.data import (DatasetMapper, build_detection_test_loader,
                             build_detection_train_loader, get_detection_dataset_dicts)
from detectron2.evaluation import SemSegEvaluator
from detectron2.layers import ShapeSpec
from detectron2.modeling import SemanticSegmentor
from detectron2.modeling.meta_arch.semantic_seg import SemSegFPNHead
from detectron2.solver import WarmupParamScheduler
from detectron2.solver.build import get_default_optimizer_params
from fvcore.common.param_scheduler import PolynomialDecayParamScheduler

from rest_dense.d2 import D2ResTv2, D2VTFPN, build_adamw
from rest_dense.d2.lazy import get_d2_config

NUM_CLASSES = 150
MAX_ITER = 160000
LEVELS = {"p2": 4, "p3": 8, "p4": 16, "p5": 32}

model = L(SemanticSegmentor)(
    backbone=L(D2VTFPN)(
        bottom_up=L(D2ResTv2)(
            arch="tiny",
            out_features=["stage1", "stage2", "stage3", "stage4"],
            drop_path_rate=0.1,
            attn_mode="global",
            frozen_stages=-1,  # train the whole backbone
        ),
        in_features=["stage1", "stage2", "stage3", "stage4"],
        out_channels=256,
        num_tokens=8,
        token_channels=1024,
        tokenizer="filter",
        transformer_depth=1,
        num_heads=16,
        pos_encoding=False,
        norm_layer="syncbn",  # the token path's norm, as the paper trains VT-FPN
    ),
    sem_seg_head=L(SemSegFPNHead)(
        input_shape={name: L(ShapeSpec)(channels="${....backbone.out_channels}", stride=stride)
                     for name, stride in LEVELS.items()},
        num_classes=NUM_CLASSES,
        conv_dims=128,
        common_stride=4,
        norm="GN",
        ignore_value=255,
        loss_weight=1.0,
    ),
    # the ImageNet weights expect RGB images with these statistics
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
)

dataloader = dict(
    train=L(build_detection_train_loader)(
        dataset=L(get_detection_dataset_dicts)(names="ade20k_sem_seg_train"),
        mapper=L(DatasetMapper)(
            is_train=True,
            image_format="RGB",
            augmentations=[
                L(T.ResizeShortestEdge)(
                    short_edge_length=[int(512 * r / 10) for r in range(5, 21)],
                    max_size=2048, sample_style="choice"),
                L(T.RandomCrop_CategoryAreaConstraint)(
                    crop_type="absolute", crop_size=(512, 512), single_category_max_area=0.75,
                    ignored_category=255),
                L(T.RandomFlip)(horizontal=True),
            ],
        ),
        total_batch_size=16,
        num_workers=4,
    ),
    test=L(build_detection_test_loader)(
        dataset=L(get_detection_dataset_dicts)(names="ade20k_sem_seg_val", filter_empty=False),
        mapper=L(DatasetMapper)(
            is_train=False,
            image_format="RGB",
            augmentations=[L(T.ResizeShortestEdge)(short_edge_length=512, max_size=2048)],
        ),
        num_workers=4,
    ),
    evaluator=L(SemSegEvaluator)(dataset_name="ade20k_sem_seg_val"),
)

optimizer = L(build_adamw)(
    params=L(get_default_optimizer_params)(weight_decay_norm=0.0, weight_decay_bias=0.0),
    lr=1.5e-4,
    weight_decay=0.05,
    betas=(0.9, 0.999),
)

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(PolynomialDecayParamScheduler)(base_value=1.0, power=1.0),
    warmup_factor=1e-6,
    warmup_length=1500 / MAX_ITER,
    warmup_method="linear",
)

train = get_d2_config("common/train.py").train
train.init_checkpoint = "checkpoints/restv2_tiny_224.pth"  # ImageNet-1k weights of the authors
train.max_iter = MAX_ITER
train.amp.enabled = True
train.checkpointer.period = 16000
train.eval_period = 16000
train.output_dir = "./outputs/d2_sem_seg_restv2_tiny_vt_fpn_ade20k_lazy"
