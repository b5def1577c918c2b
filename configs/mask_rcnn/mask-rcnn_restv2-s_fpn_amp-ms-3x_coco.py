# Mask R-CNN + FPN, ResTv2-S, COCO, 3x schedule (see the ResTv2-T config).
# Paper (3x, detectron2): 60.71M params, box AP 48.1, mask AP 43.3.
_base_ = './mask-rcnn_restv2-t_fpn_amp-ms-3x_coco.py'

model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/restv2_small_224.pth')))
