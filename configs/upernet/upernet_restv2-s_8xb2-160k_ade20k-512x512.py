# UperNet, ResTv2-S, ADE20K 512x512, 160k iterations (see the ResTv2-T config).
# Paper: 72.9M params, mIoU 49.2 (multi-scale; see the *_ms-flip config).
_base_ = './upernet_restv2-t_8xb2-160k_ade20k-512x512.py'

model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/restv2_small_224.pth')))
