"""MMSegmentation UperNet built from the shipped configs (backbone shrunk): a training
step, single-scale inference and the multi-scale + flip (SegTTAModel) config."""
import pytest
import torch
from mmengine.structures import PixelData
from mmseg.structures import SegDataSample

from _mm_utils import backbone_grads_reach, build, load, shrink

UPERNET = "upernet/upernet_restv2-t_8xb2-160k_ade20k-512x512.py"
UPERNET_MS = "upernet/upernet_restv2-t_8xb2-160k_ade20k-512x512_ms-flip.py"
H, W = 64, 96


def _batch(n=2, flip=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs, samples = [], []
    for i in range(n):
        img = torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=g)
        seg = torch.randint(0, 150, (1, H, W), generator=g)
        seg[:, :8] = 255  # ignored pixels
        if flip:
            img, seg = img.flip(-1), seg.flip(-1)
        sample = SegDataSample(gt_sem_seg=PixelData(data=seg))
        sample.set_metainfo(dict(img_path=f"img{i}.jpg", ori_shape=(H, W), img_shape=(H, W),
                                 pad_shape=(H, W), scale_factor=(1.0, 1.0), flip=flip,
                                 flip_direction="horizontal" if flip else None,
                                 reduce_zero_label=True))
        inputs.append(img)
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def _small_inputs(cfg):
    # the shipped data preprocessor pads training batches to 512x512; keep them small
    cfg.model.data_preprocessor.size = (H, W)
    return cfg


def test_upernet_train_step_and_predict():
    cfg = _small_inputs(shrink(load(UPERNET)))
    torch.manual_seed(0)
    model = build(cfg)
    assert type(model).__name__ == "EncoderDecoder"
    assert model.decode_head.channels == 512 and model.auxiliary_head.channels == 256
    model.train()
    data = model.data_preprocessor(_batch(), True)
    losses = model(**data, mode="loss")
    loss, log_vars = model.parse_losses(losses)
    assert {"decode.loss_ce", "aux.loss_ce"} <= set(log_vars)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    reached = backbone_grads_reach(model)
    for prefix in ("stem.", "stage1.", "stage2.", "stage3.", "stage4.", "norm_4."):
        assert any(n.startswith(prefix) for n in reached), f"no gradient in {prefix}"

    model.eval()
    with torch.no_grad():
        results = model.test_step(_batch(seed=1))
    assert len(results) == 2
    for res in results:
        assert isinstance(res, SegDataSample)
        pred = res.pred_sem_seg.data
        assert pred.shape == (1, H, W)
        assert 0 <= int(pred.min()) and int(pred.max()) < 150
        assert res.seg_logits.data.shape == (150, H, W)


def test_multiscale_flip_config_predicts():
    cfg = shrink(load(UPERNET_MS))
    assert cfg.model.type == "SegTTAModel"
    transforms = cfg.test_dataloader.dataset.pipeline[1]["transforms"]
    assert [t["scale_factor"] for t in transforms[0]] == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    assert sorted(t["prob"] for t in transforms[1]) == [0.0, 1.0]

    torch.manual_seed(0)
    model = build(cfg)
    assert type(model).__name__ == "SegTTAModel"
    model.eval()
    plain, flipped = _batch(seed=3), _batch(seed=3, flip=True)
    data = dict(inputs=[plain["inputs"], flipped["inputs"]],
                data_samples=[plain["data_samples"], flipped["data_samples"]])
    with torch.no_grad():
        merged = model.test_step(data)
        one = model.module.test_step(_batch(seed=3))
        other = model.module.test_step(_batch(seed=3, flip=True))  # logits flipped back
    assert len(merged) == 2
    for res, a, b in zip(merged, one, other):
        assert isinstance(res, SegDataSample)
        assert res.pred_sem_seg.data.shape == (1, H, W)
        # the merge averages the class probabilities of the plain and the flipped view
        probs = a.seg_logits.data.softmax(0) + b.seg_logits.data.softmax(0)
        assert torch.equal(res.pred_sem_seg.data[0], probs.argmax(0))
        assert not torch.equal(a.seg_logits.data, b.seg_logits.data)


@pytest.mark.parametrize("config", ["toy/upernet_restv2_toy.py", "toy/sem_fpn_restv2_toy.py",
                                    "toy/vt_fpn_restv2_toy.py"])
def test_toy_configs_train_on_images_below_their_size(config):
    """The toy configs weight the classes; images smaller than the configured size are
    padded, and the padding must not reach the weighted loss as the ignore label (which
    MMSegmentation 1.2's cross_entropy cannot index its class weights with)."""
    cfg = load(config)
    torch.manual_seed(0)
    model = build(cfg).train()
    g = torch.Generator().manual_seed(0)
    inputs, samples = [], []
    for i, (h, w) in enumerate([(96, 112), (128, 128)]):
        inputs.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g))
        seg = torch.randint(0, 4, (1, h, w), generator=g)
        sample = SegDataSample(gt_sem_seg=PixelData(data=seg))
        sample.set_metainfo(dict(img_path=f"img{i}.png", ori_shape=(h, w), img_shape=(h, w)))
        samples.append(sample)
    data = model.data_preprocessor(dict(inputs=inputs, data_samples=samples), True)
    assert data["inputs"].shape[-2:] == (128, 128)  # the first image was padded
    loss, _ = model.parse_losses(model(**data, mode="loss"))
    assert torch.isfinite(loss) and loss.item() > 0
