# VT-FPN, ResTv2-T, ADE20K 512x512, 160k iterations: the semantic FPN config beside it
# (fpn_restv2-t_8xb2-160k_ade20k-512x512.py: same backbone, FPNHead, data and recipe) with the
# FPN neck replaced by the visual-token neck (rest_dense.models.VTFPN, the paper's settings:
# 8 tokens of 1024 channels per level, filter-based tokenizer, one shared transformer).
_base_ = [
    '../_base_/models/vt-fpn_restv2.py',
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
