# Semantic FPN (Kirillov et al. 2019; mmseg's sem_fpn): FPN neck (256 channels, one output per
# backbone stage) + FPNHead (128 channels: per level 3x3 convs and 2x upsampling down to
# stride 4, summed, 1x1 classifier), no auxiliary head, with a ResTv2 backbone, for 150-class
# ADE20K at 512x512. VT-FPN (`vt-fpn_restv2.py`) swaps the neck and keeps everything else.
norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=dict(
        type='SegDataPreProcessor',
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        size=(512, 512),
        pad_val=0,
        seg_pad_val=255),
    pretrained=None,
    backbone=dict(
        type='ResTv2',
        arch='tiny',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.1,
        attn_mode='global',
        frozen_stages=-1,
        norm_eval=False,
        with_cp=False),
    neck=dict(
        type='FPN',
        in_channels=[96, 192, 384, 768],
        out_channels=256,
        num_outs=4),
    decode_head=dict(
        type='FPNHead',
        in_channels=[256, 256, 256, 256],
        in_index=[0, 1, 2, 3],
        feature_strides=[4, 8, 16, 32],
        channels=128,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))
