# Semantic FPN (FPN neck + FPNHead) with the small, randomly initialised ResTv2 of
# upernet_restv2_toy.py on the synthetic toy-shapes segmentation data. Everything but the
# decoder is inherited from that config: backbone, data, schedule (600 iterations, AdamW,
# warm-up + cosine), runtime; so the toy UperNet, semantic FPN and VT-FPN
# (vt_fpn_restv2_toy.py) differ only in what sits on the backbone.
#   rest-dense train toy/sem_fpn_restv2_toy.py --threads 1 train_cfg.max_iters=200
_base_ = ['./upernet_restv2_toy.py']

neck_channels = 64
# as in the UperNet toy config: 4 classes, background down-weighted, BN on one CPU process
class_weight = [0.2, 1.0, 1.0, 1.0]
norm_cfg = dict(type='BN', requires_grad=True)

model = dict(
    neck=dict(
        type='FPN',
        in_channels=[32, 64, 128, 256],
        out_channels=neck_channels,
        num_outs=4),
    decode_head=dict(
        _delete_=True,
        type='FPNHead',
        in_channels=[neck_channels] * 4,
        in_index=[0, 1, 2, 3],
        feature_strides=[4, 8, 16, 32],
        channels=neck_channels,
        dropout_ratio=0.1,
        num_classes=4,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(
            type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0, class_weight=class_weight)),
    auxiliary_head=None)
