"""bf16 mixed precision for MMDetection / MMSegmentation: :class:`BF16OptimWrapper` (bf16
autocast without loss scaling, on the CPU too), :func:`set_mixed_precision` /
``train_config(amp=...)`` / ``rest-dense train --amp-dtype``, and a short real training run
of the toy Mask R-CNN config in bf16 on the CPU."""
import math

import pytest
import torch
from mmengine.registry import OPTIM_WRAPPERS
from torch import nn

from rest_dense import amp, safe_load
from rest_dense.cli import build_parser
from rest_dense.commands import train as train_cmd
from rest_dense.data.toy import generate_toy_dataset
from rest_dense.mm import runner as mm_runner
from rest_dense.mm.optim import BF16OptimWrapper, set_mixed_precision
from rest_dense.models import VTFPN

from _mm_utils import TINY_ARCH, load

AMP_CONFIG = "mask_rcnn/mask-rcnn_restv2-t_fpn_amp-ms-1x_coco.py"
DIMS = list(TINY_ARCH["embed_dims"])


class _Net(nn.Module):
    """body (Linear -> LayerNorm) -> Linear; records the dtype of the first Linear's output
    (``seen``) and of the second Linear's input (``fc2_in``)."""

    def __init__(self):
        super().__init__()
        self.body, self.fc2 = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16)), nn.Linear(16, 1)
        self.seen, self.fc2_in = [], []
        self.body[0].register_forward_hook(lambda m, i, o: self.seen.append(o.dtype))
        self.fc2.register_forward_pre_hook(lambda m, i: self.fc2_in.append(i[0].dtype))

    def forward(self, x):
        return self.fc2(self.body(x))


def _wrapper(model, **kwargs):
    return OPTIM_WRAPPERS.build(dict(type="BF16OptimWrapper", optimizer=torch.optim.SGD(
        model.parameters(), lr=0.1), **kwargs))


# ----------------------------------------------------------------------------- the wrapper
def test_bf16_optim_wrapper_runs_forward_in_bf16_and_updates_fp32_params():
    torch.manual_seed(0)
    model = _Net()
    wrapper = _wrapper(model, clip_grad=dict(max_norm=1.0), loss_scale="dynamic")
    assert isinstance(wrapper, BF16OptimWrapper) and not hasattr(wrapper, "loss_scaler")
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(4, 8)
    with wrapper.optim_context(model):
        loss = model(x).float().pow(2).mean()
    assert model.seen == [torch.bfloat16]
    assert not torch.is_autocast_enabled("cpu")  # the context is closed again
    wrapper.update_params(loss)
    assert math.isfinite(loss.item())
    for p, b in zip(model.parameters(), before):
        assert p.dtype == torch.float32
        assert not torch.equal(p.detach(), b)
    # outside the wrapper's context the same model runs in fp32
    model(x)
    assert model.seen[-1] == torch.float32


def test_bf16_optim_wrapper_autocasts_only_the_named_modules():
    model = _Net()
    wrapper = _wrapper(model, autocast_modules=["body"])
    with wrapper.optim_context(model):
        out = model(torch.randn(4, 8))
        assert model.seen == [torch.bfloat16]
        assert model.fc2_in == [torch.float32] and out.dtype == torch.float32
        assert not torch.is_autocast_enabled("cpu")  # only inside body's forward
    wrapper.update_params(out.pow(2).mean())
    assert "forward" not in vars(model.body)  # the module's own forward again
    model(torch.randn(2, 8))
    assert model.seen[-1] == torch.float32
    with pytest.raises(AttributeError):
        with wrapper.__class__(torch.optim.SGD(model.parameters(), lr=0.1),
                               autocast_modules=["nope"]).optim_context(model):
            pass


def test_bf16_optim_wrapper_names_once_and_restores_an_instance_forward():
    model = _Net()
    own = model.body.forward  # an instance's own forward (a user's wrapper)
    model.body.forward = lambda x: own(x)
    users = model.body.forward
    wrapper = _wrapper(model, autocast_modules=["body", "body"])
    assert wrapper.autocast_modules == ("body",)
    with wrapper.optim_context(model):
        out = model(torch.randn(4, 8))
        assert model.seen == [torch.bfloat16]
    wrapper.update_params(out.pow(2).mean())
    assert vars(model.body)["forward"] is users  # put back, not deleted
    with pytest.raises(ValueError, match="autocast_modules is empty"):
        _wrapper(model, autocast_modules=[])
    with pytest.raises(TypeError, match="submodule names"):
        _wrapper(model, autocast_modules=["body", 3])


def test_bf16_optim_wrapper_refuses_fp16_and_drops_a_grad_scaler_state():
    model = _Net()
    with pytest.raises(ValueError, match="bf16 only"):
        _wrapper(model, dtype="float16")
    wrapper = _wrapper(model, dtype="bf16")
    state = wrapper.state_dict()
    assert "loss_scaler" not in state
    state["loss_scaler"] = {"scale": 65536.0}  # as an fp16 AmpOptimWrapper run saves it
    wrapper.load_state_dict(state)
    assert wrapper.optimizer.state_dict()["param_groups"] == state["param_groups"]


def test_bf16_falls_back_to_fp32_where_the_device_has_no_bf16(monkeypatch):
    model = _Net()
    wrapper = _wrapper(model)
    monkeypatch.setattr(amp, "bf16_supported", lambda device=None: False)
    with wrapper.optim_context(model):
        model(torch.randn(2, 8))
    assert model.seen == [torch.float32]


# ----------------------------------------------------------------------------- configs
def test_set_mixed_precision_keeps_the_optimizer_settings():
    cfg = load(AMP_CONFIG)
    cfg.optim_wrapper.clip_grad = dict(max_norm=1.0)
    cfg.optim_wrapper.constructor = "ResTLayerDecayOptimizerConstructor"
    cfg.optim_wrapper.paramwise_cfg = dict(decay_rate=0.9)
    kept = {k: cfg.optim_wrapper[k] for k in ("optimizer", "constructor", "paramwise_cfg",
                                              "clip_grad")}
    assert cfg.optim_wrapper.type == "AmpOptimWrapper" and "loss_scale" in cfg.optim_wrapper
    set_mixed_precision(cfg, "bf16")
    assert cfg.optim_wrapper.type == "BF16OptimWrapper" and "loss_scale" not in cfg.optim_wrapper
    assert {k: cfg.optim_wrapper[k] for k in kept} == kept
    # MMDetection: mmcv's nms / RoIAlign have no bf16 kernels, the heads stay fp32
    assert cfg.optim_wrapper.autocast_modules == ["backbone", "neck"]
    seg = load("toy/upernet_restv2_toy.py")
    set_mixed_precision(seg, "bf16")
    assert seg.optim_wrapper.type == "BF16OptimWrapper"
    assert "autocast_modules" not in seg.optim_wrapper
    set_mixed_precision(cfg, True)  # --amp: the config's precision
    assert cfg.optim_wrapper.type == "BF16OptimWrapper"
    cfg.optim_wrapper.cache_enabled = False
    set_mixed_precision(cfg, "float16")
    assert cfg.optim_wrapper.type == "AmpOptimWrapper"
    assert cfg.optim_wrapper.loss_scale == "dynamic"
    assert {k: cfg.optim_wrapper[k] for k in kept} == kept
    # BF16OptimWrapper's own keys would stop mmengine's AmpOptimWrapper from building
    assert "autocast_modules" not in cfg.optim_wrapper
    assert "cache_enabled" not in cfg.optim_wrapper
    with pytest.raises(ValueError, match="mixed-precision dtype"):
        set_mixed_precision(cfg, "int8")


def test_bf16_wrapper_named_by_type_alone_gets_the_detector_defaults():
    """``--cfg-options optim_wrapper.type=BF16OptimWrapper`` (no ``--amp-dtype``): the
    MMDetection defaults apply as with ``--amp-dtype bf16`` (the whole forward crashed in
    mmcv's nms)."""
    from rest_dense.mm.optim import bf16_wrapper_defaults

    cfg = load("toy/mask_rcnn_restv2_toy.py")
    cfg.optim_wrapper.type = "BF16OptimWrapper"
    bf16_wrapper_defaults(cfg)
    assert cfg.optim_wrapper.autocast_modules == ["backbone", "neck"]
    seg = load("toy/upernet_restv2_toy.py")
    seg.optim_wrapper.type = "BF16OptimWrapper"
    assert "autocast_modules" not in bf16_wrapper_defaults(seg).optim_wrapper
    # the wrapper on a detector without the setting (MMDetection's own tools/train.py)
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules()
    detector = MODELS.build(cfg.model)
    wrapper = _wrapper(detector)
    assert wrapper._modules_of(detector) == ("backbone", "neck")
    assert _wrapper(_Net())._modules_of(_Net()) is None
    # a detector with neither at the top (SoftTeacher's student / teacher): left to the
    # whole forward, as before, never an empty list
    semi = load("toy/mask_rcnn_restv2_toy.py")
    semi.model = dict(type="SoftTeacher", detector=semi.model, data_preprocessor=None)
    semi.optim_wrapper.type = "BF16OptimWrapper"
    assert "autocast_modules" not in bf16_wrapper_defaults(semi).optim_wrapper
    from mmdet.models.detectors import BaseDetector

    class Pair(BaseDetector):
        def __init__(self):
            super().__init__()
            self.student = _Net()

        def loss(self, *a):
            pass

        def predict(self, *a):
            pass

        def _forward(self, *a):
            pass

        def extract_feat(self, *a):
            pass

    pair = Pair()
    assert _wrapper(pair)._modules_of(pair) is None


def test_train_config_amp_bf16_stays_on_cpu():
    """fp16 AMP falls back to fp32 without an accelerator; bf16 does not need one."""
    cfg = mm_runner.train_config(AMP_CONFIG, work_dir="/nonexistent/w", amp="bfloat16")
    assert cfg.optim_wrapper.type == "BF16OptimWrapper"
    if not amp.amp_supported():
        fp16 = mm_runner.train_config(AMP_CONFIG, work_dir="/nonexistent/w", amp=True)
        assert fp16.optim_wrapper.type == "OptimWrapper"


def test_fp16_over_a_bf16_config_builds_its_optimizer(tmp_path):
    """``--amp-dtype fp16`` on a config written for BF16OptimWrapper (autocast_modules):
    the wrapper that results (AmpOptimWrapper, or fp32 OptimWrapper without an
    accelerator) gets none of BF16OptimWrapper's keys and builds."""
    from mmengine.optim import build_optim_wrapper

    base = mm_runner.get_config_path("toy/mask_rcnn_restv2_toy.py")
    path = tmp_path / "det_bf16.py"
    path.write_text(f"_base_ = [{str(base)!r}]\noptim_wrapper = dict(type='BF16OptimWrapper', "
                    "autocast_modules=['backbone', 'neck'], cache_enabled=True)\n")
    cfg = mm_runner.train_config(str(path), work_dir=str(tmp_path / "w"), amp="float16")
    optim = cfg.optim_wrapper
    assert optim.type == ("AmpOptimWrapper" if amp.amp_supported() else "OptimWrapper")
    assert "autocast_modules" not in optim and "cache_enabled" not in optim
    if optim.type == "OptimWrapper":
        wrapper = build_optim_wrapper(nn.Linear(2, 2), optim)
        assert type(wrapper).__name__ == "OptimWrapper"


def test_train_command_amp_flags():
    parse = build_parser("train").parse_args
    args = parse(["train", "C", "--amp-dtype", "bf16", "a.b=1"])
    assert args.amp_dtype == "bfloat16" and args.overrides == ["a.b=1"]
    assert train_cmd.amp_setting(args) == "bfloat16"
    assert train_cmd.amp_setting(parse(["train", "C", "--amp", "c=2"])) is True
    assert train_cmd.amp_setting(parse(["train", "C"])) is False
    assert train_cmd.amp_setting(parse(["train", "C", "--amp", "--amp-dtype=fp16"])) == "float16"
    with pytest.raises(SystemExit):
        parse(["train", "C", "--amp-dtype", "int8"])


# ----------------------------------------------------------------------------- training
TOY_RUNS = {
    # MMDetection: backbone and neck in bf16 (set_mixed_precision's default), heads fp32
    "mmdet": ("toy/mask_rcnn_restv2_toy.py", [f"model.neck.in_channels={DIMS}",
                                              "train_dataloader.batch_size=1"]),
    # MMSegmentation: the whole forward pass in bf16
    "mmseg": ("toy/upernet_restv2_toy.py", [f"model.decode_head.in_channels={DIMS}",
                                            f"model.auxiliary_head.in_channels={DIMS[2]}",
                                            "train_dataloader.batch_size=2"]),
    # the VT-FPN toy models (issue 18): the visual-token neck in bf16 (its softmaxes
    # normalise in fp32 and return bf16), as the FPN it replaces
    "mmseg_vt_fpn": ("toy/vt_fpn_restv2_toy.py", [f"model.neck.in_channels={DIMS}",
                                                  "model.neck.token_channels=64",
                                                  "train_dataloader.batch_size=2"]),
    "mmdet_vt_fpn": ("toy/mask_rcnn_restv2_vt_fpn_toy.py", [f"model.neck.in_channels={DIMS}",
                                                            "model.neck.token_channels=64",
                                                            "train_dataloader.batch_size=1"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("framework", sorted(TOY_RUNS))
def test_toy_config_trains_in_bf16_on_cpu(framework, tmp_path, one_thread):
    """Three iterations of a toy config (tiny backbone) through the runner with
    ``amp='bf16'`` and the layer-decay constructor: the backbone's Linear layers compute in
    bf16 (and, for the segmentor, the decode head too), losses stay finite, fp32 parameters
    change, gradient clipping runs and the final checkpoint is written."""
    config, extra = TOY_RUNS[framework]
    root = tmp_path / "toy"
    generate_toy_dataset(root, num_train=4, num_val=2)
    work = tmp_path / "work"
    cfg = mm_runner.train_config(
        config, work_dir=work, amp="bf16", cfg_options=[
            "train_cfg.max_iters=3", f"model.backbone.arch.embed_dims={tuple(DIMS)}",
            f"model.backbone.arch.depths={tuple(TINY_ARCH['depths'])}", *extra,
            f"train_dataloader.dataset.data_root={root}/", "default_hooks.logger.interval=1",
            "default_hooks.checkpoint.interval=3", "val_cfg=None", "val_dataloader=None",
            "val_evaluator=None"])
    cfg.optim_wrapper.constructor = "ResTLayerDecayOptimizerConstructor"
    cfg.optim_wrapper.paramwise_cfg = dict(decay_rate=0.9)
    runner = mm_runner.build_runner(cfg)
    model = runner.model
    seen = {"backbone": [], "head": [], "neck": []}
    vt_fpn = framework.endswith("_vt_fpn")
    for part, module in (("backbone", model.backbone),
                         ("head", getattr(model, "decode_head", None) or model.rpn_head),
                         ("neck", model.neck if vt_fpn else nn.Identity())):
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.register_forward_hook(lambda mod, inp, out, part=part:
                                        seen[part].append(out.dtype))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    runner.train()

    wrapper = runner.optim_wrapper
    assert isinstance(wrapper, BF16OptimWrapper)
    assert wrapper.clip_grad_kwargs == dict(max_norm=10.0, norm_type=2)
    scales = {g["lr_scale"] for g in wrapper.optimizer.param_groups if "lr_scale" in g}
    assert len(scales) > 2  # the stage-wise lr decay groups are there
    assert seen["backbone"] and set(seen["backbone"]) == {torch.bfloat16}
    head_dtype = torch.float32 if framework.startswith("mmdet") else torch.bfloat16
    assert seen["head"] and set(seen["head"]) == {head_dtype}
    if vt_fpn:  # lateral convs, tokenizers, token transformer, projectors
        assert isinstance(model.neck, VTFPN)
        assert len(seen["neck"]) >= 4 * 3 and set(seen["neck"]) == {torch.bfloat16}
    assert not torch.is_autocast_enabled("cpu")
    losses = runner.message_hub.get_scalar("train/loss").data[0]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses), losses
    grad_norms = runner.message_hub.get_scalar("train/grad_norm").data[0]
    assert len(grad_norms) == 3 and all(math.isfinite(v) for v in grad_norms)
    changed = 0
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32, name
        changed += not torch.equal(p.detach(), before[name])
    assert changed > len(before) // 2, (changed, len(before))
    ckpt = safe_load.load_checkpoint_file(work / "iter_3.pth", trusted=False)
    assert ckpt["meta"]["iter"] == 3 and "loss_scaler" not in ckpt["optimizer"]
    assert all(t.dtype == torch.float32 for t in ckpt["state_dict"].values()
               if t.is_floating_point())


def test_bf16_wrapper_warns_on_emulated_bf16_when_training_starts(monkeypatch):
    """On a CPU without native bf16 the wrapper warns once, at its first forward; reading a
    bf16 config (train_config, also used by evaluation) does not."""
    monkeypatch.setattr(amp, "cpu_has_native_bf16", lambda *a, **k: False)
    monkeypatch.setattr(amp, "_WARNED_BF16", [])
    mm_runner.train_config(AMP_CONFIG, work_dir="/nonexistent/w", amp="bfloat16")
    assert not amp._WARNED_BF16
    model = nn.Linear(4, 4)
    wrapper = BF16OptimWrapper(torch.optim.SGD(model.parameters(), lr=0.1))
    with wrapper.optim_context(model):
        y = model(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16 and amp._WARNED_BF16 == [True]
