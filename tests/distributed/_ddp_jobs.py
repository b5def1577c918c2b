"""Jobs of the DDP tests, run in every process of a 2-process gloo group by
:func:`rest_dense.distributed.launch` (module-level functions, so spawned workers can
import them by name).

Each job builds a model from a shipped toy config (tiny backbone, one block per stage) for
each setting, wraps it in DDP *without* ``find_unused_parameters``, trains a few steps
with the config's optimizer on rank-specific batches and then checks that

* every trainable parameter received a gradient in every step (hooks record it),
* the parameters are bit-identical on both ranks (:func:`assert_replicas_in_sync`),
* trainable parameters moved and frozen ones did not, and nothing is NaN/inf.

Rank 0 writes one record per setting to ``out_path`` (JSON) for the test to check.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch

from rest_dense import distributed

REPO = Path(__file__).resolve().parents[2]
TOY_DET = REPO / "configs" / "toy" / "mask_rcnn_restv2_toy.py"
TOY_SEG = REPO / "configs" / "toy" / "upernet_restv2_toy.py"
TOY_D2 = REPO / "configs" / "detectron2" / "toy" / "mask_rcnn_restv2_toy.yaml"
#: the VT-FPN toy models (the visual-token neck, rest_dense.models.VTFPN): semantic FPN head
#: (MMSegmentation), Mask R-CNN (MMDetection), SemanticSegmentor + SemSegFPNHead (detectron2)
TOY_SEG_VT_FPN = REPO / "configs" / "toy" / "vt_fpn_restv2_toy.py"
TOY_DET_VT_FPN = REPO / "configs" / "toy" / "mask_rcnn_restv2_vt_fpn_toy.py"
TOY_D2_VT_FPN = REPO / "configs" / "detectron2" / "toy" / "sem_seg_restv2_vt_fpn_toy.yaml"
#: the VT-FPN neck made small as the rest (32 channels, 64 token channels, 16 heads)
VT_FPN_NECK = dict(out_channels=32, token_channels=64)

TINY = dict(embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), depths=(1, 1, 1, 1),
            sr_ratios=(8, 4, 2, 1))
STEPS = 3
#: window sizes (tokens) small enough for the test images to hold several windows
#: per stage, multiples of each stage's sr_ratio
WINDOW = (8, 4, 2, 2)

Setting = Tuple[str, Dict[str, Any]]


# ------------------------------------------------------------------------ the common part
class _GradRecorder:
    """Records which trainable parameters received a gradient since :meth:`reset`."""

    def __init__(self, module: torch.nn.Module):
        self.names = {id(p): n for n, p in module.named_parameters() if p.requires_grad}
        self.seen: set = set()
        self.handles = [p.register_post_accumulate_grad_hook(self._hook)
                        for p in module.parameters() if p.requires_grad]

    def _hook(self, p: torch.Tensor) -> None:
        self.seen.add(id(p))

    def missing(self) -> List[str]:
        return sorted(n for i, n in self.names.items() if i not in self.seen)

    def reset(self) -> None:
        self.seen.clear()

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _flat(module: torch.nn.Module, trainable: bool) -> torch.Tensor:
    ps = [p.detach().reshape(-1).double() for p in module.parameters()
          if p.requires_grad == trainable]
    return torch.cat(ps) if ps else torch.zeros(0, dtype=torch.float64)


def _train_and_check(name: str, ddp: torch.nn.Module,
                     step: Callable[[int], float]) -> Dict[str, Any]:
    """Run :data:`STEPS` steps of ``step(i)`` (returns the loss) and check the replicas."""
    module = ddp.module
    rank = distributed.get_rank()
    start = time.perf_counter()
    # DDP has broadcast rank 0's weights: these are the common starting point
    distributed.assert_replicas_in_sync(ddp)
    init_trainable, init_frozen = _flat(module, True), _flat(module, False)
    recorder = _GradRecorder(module)
    losses = []
    try:
        for i in range(STEPS):
            recorder.reset()
            loss = step(i)
            missing = recorder.missing()
            if missing:
                raise AssertionError(f"[{name}] rank {rank}, step {i}: {len(missing)} trainable "
                                     f"parameters got no gradient: {missing[:12]}")
            if not torch.isfinite(torch.tensor(loss)):
                raise AssertionError(f"[{name}] rank {rank}, step {i}: loss {loss}")
            losses.append(float(loss))
    finally:
        recorder.close()
    compared = distributed.assert_replicas_in_sync(ddp)
    trainable, frozen = _flat(module, True), _flat(module, False)
    return dict(
        name=name,
        compared=compared,
        n_params=sum(p.numel() for p in module.parameters()),
        n_trainable=int(trainable.numel()),
        n_frozen=int(frozen.numel()),
        trainable_changed=int((trainable != init_trainable).sum()),
        frozen_unchanged=bool(torch.equal(frozen, init_frozen)),
        finite=bool(torch.isfinite(trainable).all() and torch.isfinite(frozen).all()),
        losses=losses,
        seconds=round(time.perf_counter() - start, 2),
    )




def _seed(step: int) -> None:
    """Different data (and drop-path masks) on each rank and step."""
    torch.manual_seed(1000 * (distributed.get_rank() + 1) + step)


def _backbone_cfg(backbone: Dict[str, Any], setting: Dict[str, Any]) -> List[int]:
    """Apply a setting to a backbone config; returns out_indices."""
    backbone["arch"] = dict(TINY, depths=tuple(setting.get("depths", TINY["depths"])))
    if setting.get("v1"):
        backbone["type"] = "ResTv1"
    for key in ("attn_mode", "with_cp", "drop_path_rate", "frozen_stages", "out_indices"):
        if key in setting:
            backbone[key] = setting[key]
    if setting.get("attn_mode", "global") != "global":
        backbone["window_size"] = WINDOW
    return list(backbone.get("out_indices", (0, 1, 2, 3)))


# ------------------------------------------------------------------- MMDetection Mask R-CNN
def _det_config(cfg, setting: Dict[str, Any]):
    model = cfg.model
    outs = _backbone_cfg(model.backbone, setting)
    dims = TINY["embed_dims"]
    model.neck.in_channels = [dims[i] for i in outs]
    # five FPN levels from the first emitted stage on; RoI features from the first four
    strides = [4 * 2 ** (min(outs) + k) for k in range(5)]
    model.rpn_head.anchor_generator.strides = strides
    model.roi_head.bbox_roi_extractor.featmap_strides = strides[:4]
    model.roi_head.mask_roi_extractor.featmap_strides = strides[:4]
    model.neck.out_channels = 32
    if model.neck.type == "VTFPN":
        model.neck.token_channels = VT_FPN_NECK["token_channels"]
    for key in ("rpn_head",):
        model[key].in_channels = model[key].feat_channels = 32
    for key in ("bbox_roi_extractor", "mask_roi_extractor"):
        model.roi_head[key].out_channels = 32
    model.roi_head.bbox_head.in_channels = 32
    model.roi_head.bbox_head.fc_out_channels = 64
    model.roi_head.mask_head.in_channels = 32
    model.roi_head.mask_head.conv_out_channels = 16
    model.train_cfg.rpn_proposal.max_per_img = 50
    model.train_cfg.rcnn.sampler.num = 16
    return cfg


def _det_batch(step: int):
    from mmdet.testing import demo_mm_inputs

    _seed(step)
    shapes = [(3, 96, 128), (3, 80, 112)]
    packed = demo_mm_inputs(2, shapes, num_items=[3, 2], num_classes=3, with_mask=True)
    # demo_mm_inputs draws from a fixed seed: make each rank's images its own
    packed["inputs"] = [torch.randint(0, 256, s, dtype=torch.uint8) for s in shapes]
    return packed


def _seg_config(cfg, setting: Dict[str, Any]):
    model = cfg.model
    outs = _backbone_cfg(model.backbone, setting)
    dims = TINY["embed_dims"]
    model.decode_head.in_channels = [dims[i] for i in outs]
    model.decode_head.in_index = list(range(len(outs)))
    model.decode_head.channels = 32
    aux = min(1, len(outs) - 1)
    model.auxiliary_head.in_index = aux
    model.auxiliary_head.in_channels = dims[outs[aux]]
    model.auxiliary_head.channels = 16
    model.data_preprocessor.size = (96, 128)
    if setting.get("sync_bn"):
        for head in (model.decode_head, model.auxiliary_head):
            head.norm_cfg = dict(type="SyncBN", requires_grad=True)
    return cfg


def _seg_vt_fpn_config(cfg, setting: Dict[str, Any]):
    """The toy VT-FPN segmentor (FPNHead on the neck) with the tiny backbone."""
    model = cfg.model
    outs = _backbone_cfg(model.backbone, setting)
    dims = TINY["embed_dims"]
    model.neck.in_channels = [dims[i] for i in outs]
    model.neck.update(VT_FPN_NECK)
    channels = VT_FPN_NECK["out_channels"]
    head = model.decode_head
    head.in_channels = [channels] * len(outs)
    head.in_index = list(range(len(outs)))
    head.feature_strides = [4 * 2 ** i for i in outs]
    head.channels = channels
    model.data_preprocessor.size = (96, 128)
    return cfg


def _seg_batch(step: int):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    _seed(step)
    h, w = 96, 128
    inputs, samples = [], []
    for i in range(2):
        seg = torch.randint(0, 4, (1, h, w))  # no ignored (255) pixels: the toy config's
        # class_weight makes mmseg 1.2.2's cross entropy index its weights by label
        sample = SegDataSample(gt_sem_seg=PixelData(data=seg))
        sample.set_metainfo(dict(img_path=f"img{i}.png", ori_shape=(h, w), img_shape=(h, w),
                                 pad_shape=(h, w), scale_factor=(1.0, 1.0), flip=False,
                                 flip_direction=None, reduce_zero_label=False))
        inputs.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def mm_records(framework: str, settings: Sequence[Setting]) -> List[Dict[str, Any]]:
    """DDP training of the toy Mask R-CNN (``framework='mmdet'``), UperNet (``'mmseg'``) or
    their VT-FPN versions (``'mmdet_vt_fpn'``, ``'mmseg_vt_fpn'``) through mmengine's
    ``MMDistributedDataParallel.train_step``, once per setting."""
    from mmengine.config import Config
    from mmengine.model import MMDistributedDataParallel
    from mmengine.optim import build_optim_wrapper

    from rest_dense.mm.utils import build_model

    config, make_cfg, make_batch = {
        "mmdet": (TOY_DET, _det_config, _det_batch),
        "mmseg": (TOY_SEG, _seg_config, _seg_batch),
        "mmdet_vt_fpn": (TOY_DET_VT_FPN, _det_config, _det_batch),
        "mmseg_vt_fpn": (TOY_SEG_VT_FPN, _seg_vt_fpn_config, _seg_batch),
    }[framework]
    base = Config.fromfile(str(config))

    def one(name: str, setting: Dict[str, Any]) -> Dict[str, Any]:
        cfg = make_cfg(copy.deepcopy(base), setting)
        changes: List[str] = []
        if setting.get("sync_bn"):
            # what `rest-dense train --launcher pytorch` does on a machine without CUDA
            cfg.launcher = "pytorch"
            changes = distributed.prepare_mm_config(cfg)
            assert any("SyncBN -> BN" in c for c in changes), changes
        torch.manual_seed(distributed.get_rank())  # different inits: DDP must broadcast
        model = build_model(cfg)
        model.init_weights()
        model.train()
        ddp = distributed.wrap_ddp(model, MMDistributedDataParallel, broadcast_buffers=False)
        assert ddp is not model and not ddp.find_unused_parameters
        optim_cfg = dict(cfg.optim_wrapper, type="OptimWrapper")
        optim = build_optim_wrapper(model, optim_cfg)

        def step(i: int) -> float:
            log_vars = ddp.train_step(make_batch(i), optim)
            return float(log_vars["loss"])

        record = _train_and_check(f"{framework}:{name}", ddp, step)
        record["changes"] = changes
        return record

    return [one(name, setting) for name, setting in settings]


# ---------------------------------------------------------------------- detectron2 Mask R-CNN
def _d2_inputs(step: int) -> List[dict]:
    from detectron2.structures import BitMasks, Boxes, Instances

    _seed(step)
    out = []
    for i, (h, w) in enumerate([(128, 160), (112, 144)]):
        boxes = torch.tensor([[10.0, 12.0, 70.0, 90.0], [50.0 + 8 * i, 30.0, 140.0, 100.0]])
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.tensor([0, 2])
        masks = torch.zeros(2, h, w, dtype=torch.bool)
        for j, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
            masks[j, y0:y1, x0:x1] = True
        inst.gt_masks = BitMasks(masks)
        out.append({"image": torch.randint(0, 256, (3, h, w)).float(), "height": h,
                    "width": w, "instances": inst})
    return out


def _d2_opts(setting: Dict[str, Any]) -> List[str]:
    key = "REST" if setting.get("v1") else "RESTV2"
    outs = list(setting.get("out_indices", (0, 1, 2, 3)))
    features = [f"stage{i + 1}" for i in outs]
    levels = [f"p{i + 2}" for i in range(min(outs), min(outs) + len(outs) + 1)]
    opts = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "",
            f"MODEL.{key}.ARCH.EMBED_DIMS", str(list(TINY["embed_dims"])),
            f"MODEL.{key}.ARCH.NUM_HEADS", str(list(TINY["num_heads"])),
            f"MODEL.{key}.ARCH.DEPTHS", str(list(setting.get("depths", TINY["depths"]))),
            f"MODEL.{key}.ARCH.SR_RATIOS", str(list(TINY["sr_ratios"])),
            f"MODEL.{key}.OUT_FEATURES", str(features),
            "MODEL.FPN.IN_FEATURES", str(features), "MODEL.FPN.OUT_CHANNELS", "32",
            "MODEL.RPN.IN_FEATURES", str(levels),
            "MODEL.ROI_HEADS.IN_FEATURES", str(levels[:-1] if len(levels) > 2 else levels),
            "MODEL.ANCHOR_GENERATOR.SIZES", str([[16 * 2 ** k] for k in range(len(levels))]),
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "32",
            "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50", "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
            "MODEL.ROI_MASK_HEAD.CONV_DIM", "16",
            f"MODEL.{key}.DROP_PATH_RATE", str(setting.get("drop_path_rate", 0.0)),
            f"MODEL.{key}.WITH_CP", str(setting.get("with_cp", False)),
            "MODEL.BACKBONE.FREEZE_AT", str(setting.get("frozen_stages", -1) + 1)]
    if setting.get("v1"):
        opts += ["MODEL.BACKBONE.NAME", "build_rest_fpn_backbone", "MODEL.REST.NAME", "rest_small"]
    else:
        mode = setting.get("attn_mode", "global")
        opts += ["MODEL.RESTV2.ATTN_MODE", mode]
        if mode != "global":
            opts += ["MODEL.RESTV2.WINDOW_SIZE", str(list(WINDOW))]
    return opts


def _d2_sem_seg_inputs(step: int) -> List[dict]:
    _seed(step)
    return [{"image": torch.randint(0, 256, (3, h, w)).float(), "height": h, "width": w,
             "sem_seg": torch.randint(0, 4, (h, w))} for h, w in [(128, 160), (112, 144)]]


def _d2_vt_fpn_opts(setting: Dict[str, Any]) -> List[str]:
    """The detectron2 toy VT-FPN SemanticSegmentor with the tiny backbone."""
    outs = list(setting.get("out_indices", (0, 1, 2, 3)))
    features = [f"stage{i + 1}" for i in outs]
    opts = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "",
            "MODEL.RESTV2.ARCH.EMBED_DIMS", str(list(TINY["embed_dims"])),
            "MODEL.RESTV2.ARCH.NUM_HEADS", str(list(TINY["num_heads"])),
            "MODEL.RESTV2.ARCH.DEPTHS", str(list(setting.get("depths", TINY["depths"]))),
            "MODEL.RESTV2.ARCH.SR_RATIOS", str(list(TINY["sr_ratios"])),
            "MODEL.RESTV2.OUT_FEATURES", str(features),
            "MODEL.RESTV2.DROP_PATH_RATE", str(setting.get("drop_path_rate", 0.0)),
            "MODEL.RESTV2.WITH_CP", str(setting.get("with_cp", False)),
            "MODEL.VT_FPN.IN_FEATURES", str(features),
            "MODEL.VT_FPN.OUT_CHANNELS", str(VT_FPN_NECK["out_channels"]),
            "MODEL.VT_FPN.TOKEN_CHANNELS", str(VT_FPN_NECK["token_channels"]),
            "MODEL.SEM_SEG_HEAD.IN_FEATURES", str([f"p{i + 2}" for i in outs]),
            "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32",
            "MODEL.BACKBONE.FREEZE_AT", str(setting.get("frozen_stages", -1) + 1)]
    mode = setting.get("attn_mode", "global")
    opts += ["MODEL.RESTV2.ATTN_MODE", mode]
    if mode != "global":
        opts += ["MODEL.RESTV2.WINDOW_SIZE", str(list(WINDOW))]
    return opts


def d2_records(settings: Sequence[Setting], vt_fpn: bool = False) -> List[Dict[str, Any]]:
    """DDP training of detectron2's Mask R-CNN (toy yaml config, tiny backbone; ``vt_fpn``:
    the toy VT-FPN SemanticSegmentor instead) with
    ``torch.nn.parallel.DistributedDataParallel``, once per setting."""
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from rest_dense.d2.engine import setup_yaml_config
    from rest_dense.d2.solver import build_optimizer

    def one(name: str, setting: Dict[str, Any]) -> Dict[str, Any]:
        cfg = (setup_yaml_config(str(TOY_D2_VT_FPN), _d2_vt_fpn_opts(setting)) if vt_fpn
               else setup_yaml_config(str(TOY_D2), _d2_opts(setting)))
        make_inputs = _d2_sem_seg_inputs if vt_fpn else _d2_inputs
        torch.manual_seed(distributed.get_rank())
        model = build_model(cfg)
        model.train()
        optimizer = build_optimizer(cfg, model)
        sync_bn = 0
        if setting.get("sync_bn_modules"):
            # as a lazy config builds them (norm_layer='syncbn'): wrap_ddp reverts them on
            # the CPU, keeping the parameters the optimizer already holds
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            sync_bn = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
            assert sync_bn > 0
        ddp = distributed.wrap_ddp(model, broadcast_buffers=False)
        assert ddp is not model and not ddp.find_unused_parameters
        assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in ddp.modules())
        model = ddp.module
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        assert all(id(p) in in_optimizer for p in model.parameters() if p.requires_grad)

        def step(i: int) -> float:
            with EventStorage(i) as storage:
                storage.iter = i
                losses = ddp(make_inputs(i))
                loss = sum(losses.values())
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            return float(loss.detach())

        record = _train_and_check(f"{'d2_vt_fpn' if vt_fpn else 'd2'}:{name}", ddp, step)
        record["sync_bn_reverted"] = sync_bn
        record["broadcast_buffers"] = bool(ddp.broadcast_buffers)
        return record

    return [one(name, setting) for name, setting in settings]


# ---------------------------------------------------------------------------- the job
def sanity_check() -> Dict[str, Any]:
    """The replica check is not vacuous: replicas that differ (a layer initialised with
    the rank as seed) are reported, naming the parameter; after DDP's broadcast they agree."""
    torch.manual_seed(distributed.get_rank())
    layer = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    with torch.no_grad():
        layer[0].weight.copy_(torch.ones(2, 3))  # the first parameter agrees, the rest not
    try:
        distributed.assert_replicas_in_sync(layer)
        error = ""
    except RuntimeError as err:
        error = str(err)
    ddp = distributed.wrap_ddp(layer)
    return dict(error=error, after_ddp=distributed.assert_replicas_in_sync(ddp))


def job(plan: Sequence[Tuple[str, Sequence[Setting]]], out_path: str) -> None:
    """Every group of settings of ``plan`` (``'mmdet'``, ``'mmseg'``, ``'d2'`` and their
    ``'*_vt_fpn'`` versions) in one
    process group (one start-up for all); rank 0 writes ``{group: [records]}``."""
    torch.set_num_threads(1)
    results: Dict[str, Any] = {"sanity": sanity_check()}
    for group, settings in plan:
        start = time.perf_counter()
        if group in ("d2", "d2_vt_fpn"):
            records = d2_records(settings, vt_fpn=group == "d2_vt_fpn")
        else:
            records = mm_records(group, settings)
        results[group] = dict(records=records, seconds=round(time.perf_counter() - start, 1))
    if distributed.get_rank() == 0:
        Path(out_path).write_text(json.dumps(results, indent=1))
