# ResTv2-T Mask R-CNN 1x with window attention in all but the last block of each stage,
# which stays global. Paper (1x): box AP 45.02, mask AP 41.56.
_base_ = './mask-rcnn_restv2-t_fpn_amp-ms-1x_coco.py'

model = dict(backbone=dict(attn_mode='hwin', window_size=(64, 32, 16, 8)))
