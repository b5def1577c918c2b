# VT-FPN (Wu et al., "Visual Transformers", arXiv 2006.03677, VT-FPN): semantic FPN with the
# convolutions of its neck (3x3 output convs, top-down path) replaced by visual tokens: per
# level a 1x1 lateral conv, a filter-based tokenizer (8 tokens of 1024 channels), one
# transformer shared by the tokens of all levels, and a projector back into the level's map.
# The head (FPNHead) and everything else are those of `fpn_restv2.py`.
_base_ = ['./fpn_restv2.py']
model = dict(
    neck=dict(
        _delete_=True,
        type='VTFPN',
        in_channels=[96, 192, 384, 768],
        out_channels=256,
        num_tokens=8,
        token_channels=1024,
        tokenizer='filter',
        transformer_depth=1,
        num_heads=16,
        pos_encoding=False,
        norm_cfg=dict(type='SyncBN', requires_grad=True)))  # as the paper trains VT-FPN
