"""bf16 mixed precision for detectron2 (which 0.5 lacks): ``SOLVER.AMP.PRECISION`` /
``train.amp.precision``, :class:`BF16Trainer` (bf16 autocast without grad scaler, on the CPU
too), ``rest-dense train --amp-dtype``, and short real training runs of the toy Mask R-CNN
and the toy VT-FPN semantic segmentor in bf16 on the CPU."""
import math
import os

import pytest
import torch
from torch import nn

from _d2_utils import LAZY_CONFIG, TINY_ARCH, config_path  # noqa: F401,I100

from detectron2.engine import AMPTrainer, SimpleTrainer  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from rest_dense import safe_load  # noqa: E402
from rest_dense.cli import build_parser  # noqa: E402
from rest_dense.commands import train as train_cmd  # noqa: E402
from rest_dense.d2 import (register_toy_datasets,  # noqa: E402
                           register_toy_sem_seg_datasets)
from rest_dense.d2.engine import (BF16Trainer, RestTrainer, _amp_guard,  # noqa: E402
                                  _inner_trainer, setup_lazy_config, setup_yaml_config)
from rest_dense.data.toy import generate_toy_dataset  # noqa: E402

TOY = "toy/mask_rcnn_restv2_toy.yaml"


class _LossNet(nn.Module):
    """A model in detectron2's training contract: a batch in, a dict of losses out."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(8, 16), nn.Linear(16, 1)
        self.seen = []

    def forward(self, batch):
        h = self.fc(batch)
        self.seen.append(h.dtype)
        return {"loss_a": self.head(h).float().pow(2).mean(), "loss_b": h.float().abs().mean()}


# ----------------------------------------------------------------------------- config keys
def test_precision_keys_and_guard():
    assert _amp_guard("cpu", True, "bfloat16") and _amp_guard("cpu", True, "bf16")
    assert not _amp_guard("cpu", True)  # fp16: detectron2's AMPTrainer needs CUDA
    assert not _amp_guard("cpu", False, "bfloat16")
    cfg = setup_yaml_config(config_path(TOY), ["MODEL.DEVICE", "cpu"])
    assert cfg.SOLVER.AMP.PRECISION == "float16" and cfg.SOLVER.AMP.ENABLED is False
    cfg = setup_yaml_config(config_path(TOY), ["MODEL.DEVICE", "cpu", "SOLVER.AMP.ENABLED", "True",
                                               "SOLVER.AMP.PRECISION", "bf16"])
    assert cfg.SOLVER.AMP.PRECISION == "bfloat16" and cfg.SOLVER.AMP.ENABLED is True
    # the COCO recipe's fp16 AMP still falls back to fp32 on the CPU
    cfg = setup_yaml_config(config_path("mask_rcnn_restv2_tiny_3x.yaml"), ["MODEL.DEVICE", "cpu"])
    assert cfg.SOLVER.AMP.ENABLED is False
    with pytest.raises(ValueError, match="mixed-precision dtype"):
        setup_yaml_config(config_path(TOY), ["SOLVER.AMP.PRECISION", "int8"])


def test_emulated_bf16_warns_when_training_starts_not_for_evaluation(monkeypatch):
    """On a CPU without native bf16: reading a bf16 config (also done by --eval-only and
    `rest-dense test`) does not warn; the BF16Trainer does, once."""
    from rest_dense import amp

    monkeypatch.setattr(amp, "cpu_has_native_bf16", lambda *a, **k: False)
    monkeypatch.setattr(amp, "_WARNED_BF16", [])
    cfg = setup_yaml_config(config_path(TOY), ["MODEL.DEVICE", "cpu", "SOLVER.AMP.ENABLED", "True",
                                               "SOLVER.AMP.PRECISION", "bf16"])
    assert cfg.SOLVER.AMP.ENABLED is True and not amp._WARNED_BF16
    setup_lazy_config(LAZY_CONFIG, ["train.device=cpu", "train.amp.precision=bf16"])
    assert not amp._WARNED_BF16
    model = _LossNet()
    BF16Trainer(model, iter([torch.randn(2, 8)]), torch.optim.SGD(model.parameters(), lr=0.1))
    assert amp._WARNED_BF16 == [True]


def test_lazy_config_precision():
    cfg = setup_lazy_config(LAZY_CONFIG, ["train.device=cpu", "train.amp.precision=bf16"])
    assert cfg.train.amp.enabled is True and cfg.train.amp.precision == "bfloat16"
    cfg = setup_lazy_config(LAZY_CONFIG, ["train.device=cpu"])
    assert cfg.train.amp.enabled is False and cfg.train.amp.precision == "float16"


def test_train_command_amp_flags():
    parse = build_parser("train").parse_args
    args = parse(["train", "C", "MODEL.DEVICE", "cpu", "--amp-dtype", "bf16"])
    assert train_cmd.d2_amp_overrides(args, lazy=False) == [
        "SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", "bfloat16"]
    assert train_cmd.d2_amp_overrides(args, lazy=True) == [
        "train.amp.enabled=True", "train.amp.precision=bfloat16"]
    args = parse(["train", "C", "--amp"])  # the config's precision
    assert train_cmd.d2_amp_overrides(args, lazy=False) == ["SOLVER.AMP.ENABLED", "True"]
    assert train_cmd.d2_amp_overrides(parse(["train", "C"]), lazy=True) == []


# ----------------------------------------------------------------------------- the trainer
def test_bf16_trainer_step():
    torch.manual_seed(0)
    model = _LossNet()
    optim = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trainer = _inner_trainer(model, [torch.randn(4, 8)] * 3, optim, True, "bfloat16")
    assert isinstance(trainer, BF16Trainer) and trainer.device_type == "cpu"
    assert not hasattr(trainer, "grad_scaler")
    before = [p.detach().clone() for p in model.parameters()]
    with EventStorage() as storage:
        trainer.iter = 0
        trainer.run_step()
    assert model.seen == [torch.bfloat16]
    assert math.isfinite(storage.history("total_loss").latest())
    for p, b in zip(model.parameters(), before):
        assert p.dtype == torch.float32 and not torch.equal(p.detach(), b)
    assert type(_inner_trainer(model, [0], optim, False, "bfloat16")) is SimpleTrainer
    # fp16 (detectron2's AMPTrainer) resumes from the bf16 run's state, scaler afresh
    state = trainer.state_dict()
    assert "grad_scaler" not in state and state["optimizer"]["state"]
    optim16 = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    fp16 = _inner_trainer(model, [0], optim16, True, "float16")
    assert isinstance(fp16, AMPTrainer)
    fp16.load_state_dict(state)
    assert fp16.optimizer.state_dict()["state"].keys() == state["optimizer"]["state"].keys()


# ----------------------------------------------------------------------------- training
#: model -> (toy yaml, dataset registration, the head checked for bf16, its layer type, extra
#: options): the toy Mask R-CNN, and the toy VT-FPN SemanticSegmentor (issue 18: the
#: visual-token neck and SemSegFPNHead's convs in bf16 too)
TOY_RUNS = {
    "mask_rcnn": (TOY, register_toy_datasets, "roi_heads", nn.Linear, []),
    "vt_fpn": ("toy/sem_seg_restv2_vt_fpn_toy.yaml", register_toy_sem_seg_datasets,
               "sem_seg_head", nn.Conv2d, ["MODEL.VT_FPN.TOKEN_CHANNELS", "64"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TOY_RUNS))
def test_toy_model_trains_in_bf16_on_cpu(name, tmp_path, one_thread):
    """Three iterations of a toy model (tiny backbone) through ``RestTrainer`` with
    ``SOLVER.AMP.PRECISION bfloat16``: the Linear layers of the backbone and the layers of
    the head (Mask R-CNN: the ROI heads' Linears; VT-FPN: SemSegFPNHead's convs, and every
    layer of the neck) compute in bf16 (torchvision's nms / roi_align cast for themselves),
    losses stay finite, fp32 parameters change and the final checkpoint is written."""
    config, register, head_name, head_layer, extra = TOY_RUNS[name]
    root = tmp_path / "toy"
    generate_toy_dataset(root, num_train=4, num_val=2)
    prefix = f"d2bf16_{name}"
    register(root, prefix=prefix)
    out = tmp_path / "out"
    cfg = setup_yaml_config(config_path(config), [
        "MODEL.DEVICE", "cpu", "SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", "bfloat16",
        "MODEL.RESTV2.ARCH.EMBED_DIMS", str(TINY_ARCH["embed_dims"]),
        "MODEL.RESTV2.ARCH.DEPTHS", str(TINY_ARCH["depths"]),
        "DATASETS.TRAIN", f"('{prefix}_train',)", "DATASETS.TEST", "()",
        "SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
        "OUTPUT_DIR", str(out), *extra])
    trainer = RestTrainer(cfg)
    trainer.resume_or_load(resume=False)
    assert isinstance(trainer._trainer, BF16Trainer)
    model = trainer.model
    seen, head_seen, neck_seen, losses = [], [], [], []
    parts = [(getattr(model.backbone, "bottom_up", model.backbone), nn.Linear, seen),
             (getattr(model, head_name), head_layer, head_seen)]
    if name == "vt_fpn":
        parts.append((model.backbone.neck, (nn.Linear, nn.Conv2d), neck_seen))
    for module, layer, found in parts:
        layers = [m for m in module.modules() if isinstance(m, layer)]
        assert layers
        for m in layers:
            m.register_forward_hook(lambda mod, inp, o, found=found: found.append(o.dtype))
    model.register_forward_hook(lambda mod, inp, o: losses.append(
        {k: float(v.detach()) for k, v in o.items()}))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    trainer.train()

    assert seen and set(seen) == {torch.bfloat16}
    assert head_seen and set(head_seen) == {torch.bfloat16}  # the whole forward, heads too
    if name == "vt_fpn":
        assert len(neck_seen) >= 3 * 4 and set(neck_seen) == {torch.bfloat16}
    assert not torch.is_autocast_enabled("cpu")
    assert len(losses) == 3 and all(math.isfinite(v) for d in losses for v in d.values()), losses
    changed = 0
    for pname, p in model.named_parameters():
        assert p.dtype == torch.float32, pname
        changed += pname in before and not torch.equal(p.detach(), before[pname])
    assert changed > len(before) // 2, (changed, len(before))
    final = out / "model_final.pth"
    assert os.path.isfile(final)
    ckpt = safe_load.load_checkpoint_file(final, trusted=False)
    assert ckpt["iteration"] == 2 and "grad_scaler" not in ckpt["trainer"]["_trainer"]
    assert ckpt["trainer"]["_trainer"]["optimizer"]["state"]
    assert all(t.dtype == torch.float32 for t in ckpt["model"].values()
               if torch.is_tensor(t) and t.is_floating_point())
