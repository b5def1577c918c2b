"""MMDetection models built from the shipped configs (backbone shrunk): a training step
and inference on small images."""
import pytest
import torch
from mmdet.structures import DetDataSample
from mmdet.testing import demo_mm_inputs
from mmengine.optim import build_optim_wrapper

from _mm_utils import backbone_grads_reach, build, load, shrink

SHAPES = [(3, 96, 128), (3, 80, 112)]

CASES = {
    "mask_rcnn": ("mask_rcnn/mask-rcnn_restv2-t_fpn_amp-ms-1x_coco.py", True),
    "retinanet": ("retinanet/retinanet_restv2-t_fpn_amp-ms-1x_coco.py", False),
    "retinanet_v1": ("retinanet/retinanet_rest-s_fpn_amp-ms-1x_coco.py", False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_train_step_and_predict(case):
    rel, with_mask = CASES[case]
    cfg = shrink(load(rel))
    torch.manual_seed(0)
    model = build(cfg)
    model.train()
    packed = demo_mm_inputs(2, SHAPES, num_items=[3, 2], num_classes=80, with_mask=with_mask)

    # loss + backward: finite, and the gradient reaches every trainable backbone stage
    data = model.data_preprocessor(packed, True)
    losses = model(**data, mode="loss")
    loss, log_vars = model.parse_losses(losses)
    assert torch.isfinite(loss) and loss.item() > 0
    expected = {"loss_cls", "loss_bbox"} | ({"loss_rpn_cls", "loss_mask"} if with_mask else set())
    assert expected <= set(log_vars)
    loss.backward()
    reached = backbone_grads_reach(model)
    for prefix in ("stem.", "stage1.", "stage2.", "stage3.", "stage4."):
        assert any(n.startswith(prefix) for n in reached), f"no gradient in {prefix}"

    # one optimizer step with the config's optimizer settings (fp32 wrapper on CPU)
    optim_cfg = dict(cfg.optim_wrapper, type="OptimWrapper")
    optim_cfg.pop("loss_scale", None)
    optim = build_optim_wrapper(model, optim_cfg)
    before = model.backbone.stage3[0].attn.q.weight.detach().clone()
    optim.step()
    assert not torch.equal(before, model.backbone.stage3[0].attn.q.weight)

    # inference
    model.eval()
    with torch.no_grad():
        results = model.test_step(packed)
    assert len(results) == 2
    for res, shape in zip(results, SHAPES):
        assert isinstance(res, DetDataSample)
        pred = res.pred_instances
        n = len(pred)
        assert pred.bboxes.shape == (n, 4)
        assert pred.scores.shape == (n,) and pred.labels.shape == (n,)
        assert n <= 100
        if with_mask:
            assert tuple(pred.masks.shape) == (n, *res.ori_shape)
        assert tuple(res.ori_shape) == shape[1:]
