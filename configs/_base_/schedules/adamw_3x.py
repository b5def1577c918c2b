# COCO 3x: 36 epochs, lr x0.1 after epochs 28 and 33 (the paper's 210k/250k of 270k
# iterations at batch 16), otherwise as the 1x schedule.
_base_ = './adamw_1x.py'

train_cfg = dict(max_epochs=36)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type='MultiStepLR', begin=0, end=36, by_epoch=True, milestones=[28, 33], gamma=0.1),
]
