# Mask R-CNN + FPN, ResTv2-B, COCO, 1x schedule (see the ResTv2-T config).
# For reference, the paper's 3x result: 75.47M params, box AP 48.7, mask AP 43.9.
_base_ = './mask-rcnn_restv2-t_fpn_amp-ms-1x_coco.py'

model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/restv2_base_224.pth')))
