# VT-FPN on the toy-shapes segmentation data: sem_fpn_restv2_toy.py (same small ResTv2,
# FPNHead, data and schedule) with the FPN neck replaced by the visual-token neck
# (rest_dense.models.VTFPN): per level a 1x1 lateral conv to 64 channels, 8 visual tokens from
# the filter-based tokenizer, one transformer over the tokens of all levels, a projector back.
# Token width scaled with the neck as in the paper (1024 tokens channels for a 256-channel neck).
#   rest-dense train toy/vt_fpn_restv2_toy.py --threads 1 train_cfg.max_iters=200
_base_ = ['./sem_fpn_restv2_toy.py']

model = dict(
    neck=dict(
        _delete_=True,
        type='VTFPN',
        in_channels=[32, 64, 128, 256],
        out_channels=64,
        num_tokens=8,
        token_channels=256,
        tokenizer='filter',
        transformer_depth=1,
        num_heads=16,
        pos_encoding=False))
