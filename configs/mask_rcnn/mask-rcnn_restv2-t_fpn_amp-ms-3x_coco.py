# Mask R-CNN + FPN, ResTv2-T, COCO, 3x schedule, multi-scale training, mixed precision,
# batch 16 (8 GPUs x 2). Paper (3x, detectron2): 49.94M params, box AP 47.6, mask AP 43.2.
_base_ = [
    '../_base_/models/mask-rcnn_restv2_fpn.py',
    '../_base_/datasets/coco_instance_ms.py',
    '../_base_/schedules/adamw_3x.py',
    '../_base_/default_runtime_det.py',
]

model = dict(
    backbone=dict(
        arch='tiny',
        drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/restv2_tiny_224.pth')))
