# ResTv2-T Mask R-CNN 1x with window attention in every block (windows of 64/32/16/8
# tokens on stages 1-4). Paper (1x): box AP 43.95, mask AP 40.42.
_base_ = './mask-rcnn_restv2-t_fpn_amp-ms-1x_coco.py'

model = dict(backbone=dict(attn_mode='win', window_size=(64, 32, 16, 8)))
