# Semantic FPN, ResTv2-T, ADE20K 512x512, 160k iterations: mmseg's sem_fpn model with the
# recipe of the UperNet configs (AdamW lr 1.5e-4, wd 0.05, stage-wise lr decay 0.9,
# 1500-iteration warm-up, poly decay, batch 16 = 8 GPUs x 2) and the same data pipeline.
# The baseline of the VT-FPN config beside it.
_base_ = [
    '../_base_/models/fpn_restv2.py',
    '../_base_/datasets/ade20k_512x512.py',
    '../_base_/schedules/adamw_lrdecay_160k.py',
    '../_base_/default_runtime_seg.py',
]

model = dict(
    backbone=dict(
        arch='tiny',
        drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/restv2_tiny_224.pth')),
    neck=dict(in_channels=[96, 192, 384, 768]))
