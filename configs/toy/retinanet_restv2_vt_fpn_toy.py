# RetinaNet with a VT-FPN neck on the toy-shapes instance data: retinanet_restv2_toy.py (same
# small ResTv2 with stages 2-4, RetinaHead, data and 600-iteration schedule) with the FPN
# replaced by the visual-token neck.
#
# RetinaNet reads five levels (anchors at strides 8..128). The backbone gives strides
# 8/16/32 (out_indices 1-3); num_outs=5 adds strides 64 and 128. Difference from the FPN
# baseline: mmdet's RetinaNet FPN makes P6 and P7 with learnt 3x3 stride-2 convs
# (add_extra_convs='on_input': P6 from C5, P7 from P6); VT-FPN has no extra convs, so its
# P6 / P7 are parameter-free stride-2 subsamplings (max_pool2d, kernel 1) of its stride-32
# output and of P6, as mmdet's FPN does with add_extra_convs=False. The head's two coarsest
# levels therefore see the same features as P5, only subsampled.
#   rest-dense train toy/retinanet_restv2_vt_fpn_toy.py --threads 1 train_cfg.max_iters=200
_base_ = ['./retinanet_restv2_toy.py']

model = dict(
    neck=dict(
        _delete_=True,
        type='VTFPN',
        in_channels=[64, 128, 256],
        out_channels={{_base_.neck_channels}},
        num_outs=5,
        num_tokens=8,
        token_channels=256,
        tokenizer='filter',
        transformer_depth=1,
        num_heads=16,
        pos_encoding=False))
