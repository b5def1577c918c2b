# RetinaNet + FPN with a small, randomly initialised ResTv2 on the synthetic toy-shapes
# dataset (rest_dense/data/toy.py; make it with `python -m rest_dense.data.toy`).
# The toy Mask R-CNN's data, backbone and schedule (configs/toy/mask_rcnn_restv2_toy.py)
# with the head of the shipped RetinaNet (configs/retinanet/, _base_/models/
# retinanet_restv2_fpn.py), scaled down: FPN on stages 2-4 plus two extra levels, 64
# channels, anchors 16-256 px for the ~15-65 px shapes.
_base_ = ['./mask_rcnn_restv2_toy.py']

neck_channels = 64

model = dict(
    _delete_=True,
    type='RetinaNet',
    data_preprocessor=dict(
        type='DetDataPreprocessor',
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_size_divisor=32),
    backbone=dict(
        type='ResTv2',
        arch=dict(
            embed_dims=(32, 64, 128, 256),
            num_heads=(1, 2, 4, 8),
            depths=(1, 1, 2, 1),
            sr_ratios=(8, 4, 2, 1)),
        out_indices=(1, 2, 3),
        drop_path_rate=0.0),
    neck=dict(
        type='FPN',
        in_channels=[64, 128, 256],
        out_channels=neck_channels,
        start_level=0,
        add_extra_convs='on_input',
        num_outs=5),
    bbox_head=dict(
        type='RetinaHead',
        num_classes=3,
        in_channels=neck_channels,
        stacked_convs=2,
        feat_channels=neck_channels,
        # base anchors 16/32/64/128/256 px (3 octave scales each)
        anchor_generator=dict(
            type='AnchorGenerator', octave_base_scale=2, scales_per_octave=3,
            ratios=[0.5, 1.0, 2.0], strides=[8, 16, 32, 64, 128]),
        bbox_coder=dict(
            type='DeltaXYWHBBoxCoder', target_means=[0.0, 0.0, 0.0, 0.0],
            target_stds=[1.0, 1.0, 1.0, 1.0]),
        loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
        loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
    train_cfg=dict(
        assigner=dict(
            type='MaxIoUAssigner', pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0,
            ignore_iof_thr=-1),
        sampler=dict(type='PseudoSampler'),
        allowed_border=-1,
        pos_weight=-1,
        debug=False),
    test_cfg=dict(
        nms_pre=1000, min_bbox_size=0, score_thr=0.05, nms=dict(type='nms', iou_threshold=0.5),
        max_per_img=20))

# boxes only
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(128, 128), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5, direction=['horizontal', 'vertical']),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(128, 128), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(metric='bbox')
test_evaluator = val_evaluator
