"""Mask R-CNN with ResTv2-T, 3x schedule, as a detectron2 LazyConfig.

The same model and recipe as ``configs/detectron2/mask_rcnn_restv2_tiny_3x.yaml``: detectron2's
standard FPN Mask R-CNN (from its model-zoo ``common/`` configs) with the backbone swapped
for ResTv2-T; AdamW (lr 1e-4, weight decay 0.05, none on norms and biases) with whole-model
gradient clipping at norm 1.0, multi-scale training (short side 480-800, long side <= 1333),
batch 16, AMP, 270k iterations with the lr divided by 10 at 210k and 250k.

    python tools/train_net.py --num-gpus 8 --config-file configs/detectron2/lazy/mask_rcnn_restv2_tiny_3x.py
    # overrides use key=value, e.g.  train.max_iter=1000 dataloader.train.total_batch_size=2
"""
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.solver.build import get_default_optimizer_params

from rest_dense.d2 import D2ResTv2, build_adamw
from rest_dense.d2.lazy import get_d2_config

model = get_d2_config("common/models/mask_rcnn_fpn.py").model
dataloader = get_d2_config("common/data/coco.py").dataloader
lr_multiplier = get_d2_config("common/coco_schedule.py").lr_multiplier_3x  # steps 210k, 250k of 270k
train = get_d2_config("common/train.py").train

# backbone: ResTv2-T emitting stage1..stage4 (strides 4..32) into the FPN
model.backbone.bottom_up = L(D2ResTv2)(
    arch="tiny",
    out_features=["stage1", "stage2", "stage3", "stage4"],
    drop_path_rate=0.1,
    attn_mode="global",
    frozen_stages=-1,  # train the whole backbone
)
model.backbone.in_features = "${.bottom_up.out_features}"

# the ImageNet weights expect RGB images with these statistics
model.pixel_mean = [123.675, 116.28, 103.53]
model.pixel_std = [58.395, 57.12, 57.375]
model.input_format = "RGB"
dataloader.train.mapper.image_format = "RGB"

# multi-scale training: short side 480..800 (step 32), long side <= 1333, random flip
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(
        short_edge_length=tuple(range(480, 801, 32)), sample_style="choice", max_size=1333),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.train.total_batch_size = 16

optimizer = L(build_adamw)(
    params=L(get_default_optimizer_params)(weight_decay_norm=0.0, weight_decay_bias=0.0),
    lr=1e-4,
    weight_decay=0.05,
    betas=(0.9, 0.999),
    clip_grad_norm=1.0,
)

train.init_checkpoint = "checkpoints/restv2_tiny_224.pth"  # ImageNet-1k weights of the authors
train.max_iter = 270000
train.amp.enabled = True
train.checkpointer.period = 10000
train.eval_period = 10000
train.output_dir = "./outputs/d2_mask_rcnn_restv2_tiny_3x_lazy"
