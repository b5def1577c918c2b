# RetinaNet + FPN, ResTv1-Base, COCO, 1x schedule (see the ResTv1-Small config).
# Paper: box AP 42.0.
_base_ = './retinanet_rest-s_fpn_amp-ms-1x_coco.py'

model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/rest_base.pth')),
    neck=dict(in_channels=[192, 384, 768]))
