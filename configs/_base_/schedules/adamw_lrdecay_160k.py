# ADE20K 160k iterations with the ResTv2 paper's recipe: AdamW lr 1.5e-4, weight decay
# 0.05 (none on norms and biases), stage-wise lr decay 0.9 (ResTLayerDecayOptimizerConstructor),
# 1500-iteration linear warm-up, then linear ("poly", power 1) decay to 0. Batch 16.
train_cfg = dict(type='IterBasedTrainLoop', max_iters=160000, val_interval=16000)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1.5e-4, betas=(0.9, 0.999), weight_decay=0.05),
    constructor='ResTLayerDecayOptimizerConstructor',
    paramwise_cfg=dict(num_layers=4, decay_rate=0.9, decay_type='stage_wise'))

param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=1500, end=160000),
]

auto_scale_lr = dict(enable=False, base_batch_size=16)
