# Mask R-CNN + FPN, ResTv2-S, COCO, 1x schedule (see the ResTv2-T config).
# For reference, the paper's 3x result: 60.71M params, box AP 48.1, mask AP 43.3.
_base_ = './mask-rcnn_restv2-t_fpn_amp-ms-1x_coco.py'

model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/restv2_small_224.pth')))
