# Multi-scale (x0.5-1.75) + flip testing of the ResTv2-S UperNet (MMSegmentation's
# SegTTAModel). Test only: python tools/test.py THIS_CONFIG CHECKPOINT
_base_ = './upernet_restv2-s_8xb2-160k_ade20k-512x512.py'

model = dict(_delete_=True, type='SegTTAModel', module={{_base_.model}})
test_dataloader = dict(dataset=dict(pipeline={{_base_.tta_pipeline}}))
