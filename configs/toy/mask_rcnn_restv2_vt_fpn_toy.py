# Mask R-CNN with a VT-FPN neck on the toy-shapes instance data: mask_rcnn_restv2_toy.py
# (same small ResTv2, heads, data and 600-iteration schedule) with the FPN replaced by the
# visual-token neck. Mask R-CNN reads five levels (RPN anchors at strides 4..64), so the neck
# emits num_outs=5: the fifth (stride 64) is a stride-2 max pool of the fourth, as mmdet's FPN
# does without extra convs. The VT-FPN paper only tried semantic segmentation.
#   rest-dense train toy/mask_rcnn_restv2_vt_fpn_toy.py --threads 1 train_cfg.max_iters=200
_base_ = ['./mask_rcnn_restv2_toy.py']

model = dict(
    neck=dict(
        _delete_=True,
        type='VTFPN',
        in_channels=[32, 64, 128, 256],
        out_channels=64,
        num_outs=5,
        num_tokens=8,
        token_channels=256,
        tokenizer='filter',
        transformer_depth=1,
        num_heads=16,
        pos_encoding=False))
