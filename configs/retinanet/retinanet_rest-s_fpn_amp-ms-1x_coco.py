# RetinaNet + FPN, ResTv1-Small, COCO, 1x schedule, with the ResTv1 paper's settings
# (multi-scale training, AdamW lr 1e-4 wd 0.05, batch 16). Paper: box AP 40.3.
_base_ = './retinanet_restv2-t_fpn_amp-ms-1x_coco.py'

model = dict(
    backbone=dict(
        _delete_=True,
        type='ResTv1',
        arch='small',
        out_indices=(1, 2, 3),
        drop_path_rate=0.1,
        frozen_stages=-1,
        norm_eval=False,
        with_cp=False,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/rest_small.pth')),
    neck=dict(in_channels=[128, 256, 512]))
