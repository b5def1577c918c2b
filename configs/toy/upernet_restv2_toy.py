# UperNet with a small, randomly initialised ResTv2 on the synthetic toy-shapes dataset
# (ADE20K-style layout written by `python -m rest_dense.data.toy`).
# Label maps: 0 = background (a real class here), 1 = circle, 2 = square, 3 = triangle,
# so reduce_zero_label=False and num_classes=4.
# Sized to train in a few minutes on a 2-core CPU; run with `python tools/demo.py --task seg`.
custom_imports = dict(imports=['rest_dense.mm'], allow_failed_imports=False)
default_scope = 'mmseg'

data_root = 'data/toy/'
classes = ('background', 'circle', 'square', 'triangle')
palette = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (0, 130, 200)]
img_size = 128
max_iters = 600
warmup_iters = 50
val_interval = max_iters
checkpoint_interval = max_iters // 4  # a killed run loses at most a quarter (--resume)
# `--cfg-options train_cfg.max_iters=N` stretches warm-up, cosine decay, validation,
# checkpoint and logging intervals by N / max_iters (rest_dense.mm.runner)
scale_schedule_with_max_iters = True
norm_cfg = dict(type='BN', requires_grad=True)  # single process on CPU: no SyncBN
# background covers ~85% of the pixels; down-weighting it gets the heads past the
# "everything is background" stage within the first ~100 iterations. With class weights,
# MMSegmentation 1.2's cross-entropy fails on the ignore label 255: for label maps of your
# own that use it, set class_weight=None in both heads' loss_decode
class_weight = [0.2, 1.0, 1.0, 1.0]

model = dict(
    type='EncoderDecoder',
    data_preprocessor=dict(
        type='SegDataPreProcessor',
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_val=0,
        # padding (images below img_size) is background, not the ignore label 255: with
        # class_weight, MMSegmentation 1.2's cross_entropy indexes the class weights by
        # every label and fails on 255
        seg_pad_val=0,
        size=(img_size, img_size)),
    pretrained=None,
    backbone=dict(
        type='ResTv2',
        arch=dict(
            embed_dims=(32, 64, 128, 256),
            num_heads=(1, 2, 4, 8),
            depths=(1, 1, 2, 1),
            sr_ratios=(8, 4, 2, 1)),
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.0),
    decode_head=dict(
        type='UPerHead',
        in_channels=[32, 64, 128, 256],
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=64,
        dropout_ratio=0.1,
        num_classes=len(classes),
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(
            type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0, class_weight=class_weight)),
    auxiliary_head=dict(
        type='FCNHead',
        in_channels=128,
        in_index=2,
        channels=32,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=len(classes),
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(
            type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4, class_weight=class_weight)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))

# ---------------------------------------------------------------- data
dataset_type = 'BaseSegDataset'
metainfo = dict(classes=classes, palette=palette)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=False),
    dict(type='RandomFlip', prob=0.5, direction=['horizontal', 'vertical']),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=False),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        metainfo=metainfo,
        img_suffix='.png',
        seg_map_suffix='.png',
        reduce_zero_label=False,
        data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        metainfo=metainfo,
        img_suffix='.png',
        seg_map_suffix='.png',
        reduce_zero_label=False,
        data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
        test_mode=True,
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

# ---------------------------------------------------------------- schedule
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=val_interval)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0),
    clip_grad=dict(max_norm=10.0, norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=warmup_iters),
    dict(type='CosineAnnealingLR', T_max=max_iters - warmup_iters, eta_min=1e-5, by_epoch=False,
         begin=warmup_iters, end=max_iters),
]

# ---------------------------------------------------------------- runtime
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=20, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(
        type='CheckpointHook', interval=checkpoint_interval, by_epoch=False, max_keep_ckpts=1),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))
env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'))
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='SegLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(type='LogProcessor', window_size=20, by_epoch=False)
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=0)
