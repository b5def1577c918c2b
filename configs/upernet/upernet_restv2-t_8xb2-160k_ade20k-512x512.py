# UperNet, ResTv2-T, ADE20K 512x512, 160k iterations, the ResTv2 paper's recipe (AdamW
# lr 1.5e-4, wd 0.05, stage-wise lr decay 0.9, 1500-iteration warm-up, batch 16).
# Paper: 62.1M params, mIoU 47.3 (multi-scale; see the *_ms-flip config).
_base_ = [
    '../_base_/models/upernet_restv2.py',
    '../_base_/datasets/ade20k_512x512.py',
    '../_base_/schedules/adamw_lrdecay_160k.py',
    '../_base_/default_runtime_seg.py',
]

model = dict(
    backbone=dict(
        arch='tiny',
        drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/restv2_tiny_224.pth')))
