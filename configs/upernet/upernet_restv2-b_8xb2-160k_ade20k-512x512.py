# UperNet, ResTv2-B, ADE20K 512x512, 160k iterations (see the ResTv2-T config).
# Paper: 87.6M params, mIoU 49.6 (multi-scale; see the *_ms-flip config).
_base_ = './upernet_restv2-t_8xb2-160k_ade20k-512x512.py'

model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/restv2_base_224.pth')))
