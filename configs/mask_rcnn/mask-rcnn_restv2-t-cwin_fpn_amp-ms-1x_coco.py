# ResTv2-T Mask R-CNN 1x with window attention plus a residual 3x3 depth-wise conv after
# each stage (cross-window exchange). Paper (1x): 49.96M params, box AP 44.07, mask AP 40.44.
_base_ = './mask-rcnn_restv2-t_fpn_amp-ms-1x_coco.py'

model = dict(backbone=dict(attn_mode='cwin', window_size=(64, 32, 16, 8)))
