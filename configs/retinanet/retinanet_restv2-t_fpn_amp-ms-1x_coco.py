# RetinaNet + FPN, ResTv2-T, COCO, 1x schedule, multi-scale training (short side
# 480-800, long side <= 1333, flip), AdamW lr 1e-4 wd 0.05, mixed precision, batch 16.
_base_ = [
    '../_base_/models/retinanet_restv2_fpn.py',
    '../_base_/datasets/coco_detection_ms.py',
    '../_base_/schedules/adamw_1x.py',
    '../_base_/default_runtime_det.py',
]

model = dict(
    backbone=dict(
        arch='tiny',
        drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/restv2_tiny_224.pth')))
