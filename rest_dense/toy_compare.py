"""Toy segmentation side by side: semantic FPN, VT-FPN and UperNet on one small ResTv2.

What ``python tools/vt_fpn_toy_table.py`` runs. Every model is trained on the synthetic
toy-shapes label maps (:mod:`rest_dense.data.toy`) with the shipped toy configs, which share
the backbone (a random-init ResTv2 with 32..256 channels), the data and the schedule (AdamW,
warm-up + cosine, batch 4) and differ only in what sits on the backbone:

========  ==============  ================================================================
toolbox   model           config
========  ==============  ================================================================
mm        semantic FPN    ``toy/sem_fpn_restv2_toy.py`` (mmseg FPN + FPNHead)
mm        VT-FPN          ``toy/vt_fpn_restv2_toy.py`` (VTFPN + FPNHead)
mm        UperNet         ``toy/upernet_restv2_toy.py`` (UPerHead + FCN auxiliary head)
d2        semantic FPN    ``detectron2/toy/sem_seg_restv2_fpn_toy.yaml`` (FPN + SemSegFPNHead)
d2        VT-FPN          ``detectron2/toy/sem_seg_restv2_vt_fpn_toy.yaml`` (D2VTFPN + SemSegFPNHead)
========  ==============  ================================================================

For each: mIoU of the randomly initialised model and after ``max_iters`` iterations (the
schedule is scaled to that length, see ``scale_schedule_with_max_iters``), the mean training
time per iteration (the frameworks' own timers, the first 5 iterations left out), and
parameters and FLOPs (fvcore multiply-adds at the toy size, 128x128, one image; neck alone,
decoder = everything after the backbone, whole model without the auxiliary head).

Example::

    from rest_dense.toy_compare import ToyCompareOptions, run_toy_comparison

    rows = run_toy_comparison(ToyCompareOptions(max_iters=300, threads=1))

``tools/vt_fpn_toy_table.py`` formats the rows as the table in ``docs/vt_fpn.md``.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import os.path as osp
import time
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["ToyEntry", "ENTRIES", "ToyCompareOptions", "ToyRow", "run_toy_comparison",
           "run_entry"]


@dataclasses.dataclass(frozen=True)
class ToyEntry:
    """One model of the comparison.

    Attributes:
        toolbox: ``'mm'`` (MMSegmentation) or ``'d2'`` (detectron2).
        model: the label in the table.
        config: shipped config name.
        overrides: config overrides (``key=value`` for mm, ``KEY VALUE`` pairs flattened for
            d2), e.g. for an ablation.
    """

    toolbox: str
    model: str
    config: str
    overrides: Tuple[str, ...] = ()


#: the models of the table, in its order
ENTRIES: Tuple[ToyEntry, ...] = (
    ToyEntry("mm", "semantic FPN", "toy/sem_fpn_restv2_toy.py"),
    ToyEntry("mm", "VT-FPN", "toy/vt_fpn_restv2_toy.py"),
    ToyEntry("mm", "UperNet", "toy/upernet_restv2_toy.py"),
    ToyEntry("d2", "semantic FPN", "detectron2/toy/sem_seg_restv2_fpn_toy.yaml"),
    ToyEntry("d2", "VT-FPN", "detectron2/toy/sem_seg_restv2_vt_fpn_toy.yaml"),
)


@dataclasses.dataclass
class ToyCompareOptions:
    """Settings of a comparison run.

    Attributes:
        max_iters: training iterations of every model (the schedule is scaled to it).
        data_root: toy dataset root; written if missing.
        work_dir: output folder (one sub-folder per model).
        threads: torch CPU threads (1 is fastest on a shared CPU).
        seed: training seed of every model.
        flops_shape: input (H, W) of the FLOP count.
        quiet: frameworks log at WARNING level only.
    """

    max_iters: int = 300
    data_root: str = "data/toy"
    work_dir: str = "work_dirs/vt_fpn_toy"
    threads: Optional[int] = 1
    seed: int = 0
    flops_shape: Tuple[int, int] = (128, 128)
    quiet: bool = True

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""
        if int(self.max_iters) != self.max_iters or self.max_iters < 1:
            raise ValueError(f"max_iters must be a positive integer, got {self.max_iters!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be positive, got {self.threads}")
        if len(self.flops_shape) != 2 or min(self.flops_shape) < 32:
            raise ValueError(f"flops_shape must be (H, W) with sides >= 32, got {self.flops_shape}")


@dataclasses.dataclass
class ToyRow:
    """The measurements of one model (mIoU as a fraction, 0..1; FLOPs in multiply-adds)."""

    entry: ToyEntry
    miou_untrained: float
    miou: float
    sec_per_iter: float
    train_seconds: float
    params: int
    neck_params: Optional[int]
    flops: int
    decoder_flops: int
    neck_flops: Optional[int]
    max_iters: int
    per_class_iou: Dict[str, float] = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------------------------ counting
def _params(module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def _count(module, inputs) -> int:
    from .analysis import count_flops

    return count_flops(module.eval(), inputs).total


def _levels(neck):
    """``neck`` called as ``module(*maps)``: fvcore traces positional tensors."""
    import torch

    class _Wrap(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *maps):
            return tuple(self.inner(list(maps)))

    return _Wrap(neck)


def _mm_flops(model, shape: Tuple[int, int]) -> Tuple[int, int, Optional[int]]:
    """(whole model, decoder, neck) FLOPs of an mmseg ``EncoderDecoder`` as mmseg's
    get_flops counts it (``_forward``: no auxiliary head, logits at stride 4)."""
    import torch

    class _Whole(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m._forward(x)

    class _Backbone(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return tuple(self.m.backbone(x))

    model = model.eval()
    x = torch.rand(1, 3, *shape)
    whole = _count(_Whole(model), (x,))
    backbone = _count(_Backbone(model), (x,))
    neck = None
    if getattr(model, "neck", None) is not None:
        with torch.no_grad():
            feats = tuple(model.backbone(x))
        neck = _count(_levels(model.neck), feats)
    return whole, whole - backbone, neck


def _d2_flops(model, shape: Tuple[int, int]) -> Tuple[int, int, int]:
    """(whole model, decoder, neck) FLOPs of a detectron2 ``SemanticSegmentor`` (backbone
    with its neck, then ``SemSegFPNHead.layers``: logits at stride 4, as for mmseg)."""
    import torch

    class _Whole(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m.sem_seg_head.layers(self.m.backbone(x))

    class _Dict(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return tuple(self.m(x).values())

    model = model.eval()
    x = torch.rand(1, 3, *shape)
    whole = _count(_Whole(model), (x,))
    with_neck = _count(_Dict(model.backbone), (x,))
    bottom_up = _count(_Dict(model.backbone.bottom_up), (x,))
    return whole, whole - bottom_up, with_neck - bottom_up


# ------------------------------------------------------------------------------ runs
def _mean_time(values: Sequence[float], skip: int = 5) -> float:
    values = list(values)
    kept = values[skip:] if len(values) > skip + 2 else values
    return float(sum(kept) / max(len(kept), 1))


def _run_mm(entry: ToyEntry, options: ToyCompareOptions, work_dir: str) -> ToyRow:
    import torch

    from .mm.runner import build_runner, train_config

    root = osp.abspath(options.data_root).rstrip("/") + "/"
    overrides = [f"train_cfg.max_iters={options.max_iters}",
                 f"train_dataloader.dataset.data_root={root}",
                 f"val_dataloader.dataset.data_root={root}",
                 f"test_dataloader.dataset.data_root={root}",
                 f"randomness.seed={options.seed}",
                 # evaluated below, untrained and trained; no checkpoint needed
                 f"train_cfg.val_interval={options.max_iters + 1}",
                 f"default_hooks.checkpoint.interval={options.max_iters + 1}",
                 "default_hooks.checkpoint.save_last=False",
                 *entry.overrides]
    if options.quiet:
        overrides.append("log_level=WARNING")
    cfg = train_config(entry.config, work_dir=work_dir, cfg_options=overrides)
    runner = build_runner(cfg)
    runner.model.init_weights()  # runs once: train() keeps these weights
    state = torch.get_rng_state()
    untrained = runner.val_loop.run()
    torch.set_rng_state(state)
    t = time.time()
    runner.train()
    train_seconds = time.time() - t
    metrics = runner.val_loop.run()
    times = runner.message_hub.get_scalar("train/time").data[0]
    model = runner.model
    whole, decoder, neck = _mm_flops(model, options.flops_shape)
    neck_module = getattr(model, "neck", None)
    return ToyRow(entry, float(untrained["mIoU"]) / 100, float(metrics["mIoU"]) / 100,
                  _mean_time(times), train_seconds, _params(model),
                  _params(neck_module) if neck_module is not None else None,
                  whole, decoder, neck, options.max_iters)


def _run_d2(entry: ToyEntry, options: ToyCompareOptions, work_dir: str) -> ToyRow:
    import torch

    from .d2.config import add_vt_fpn_config  # noqa: F401  (keys registered with the configs)
    from .d2.data import register_toy_sem_seg_datasets
    from .d2.engine import RestTrainer, setup_yaml_config

    register_toy_sem_seg_datasets(options.data_root)
    from .configs import get_config_path

    opts = ["MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", str(options.max_iters),
            "SOLVER.CHECKPOINT_PERIOD", str(options.max_iters + 1), "SEED", str(options.seed),
            "OUTPUT_DIR", work_dir, "TEST.EVAL_PERIOD", "0", *entry.overrides]
    cfg = setup_yaml_config(get_config_path(entry.config), opts)
    d2_logger = logging.getLogger("detectron2")
    level = d2_logger.level
    if options.quiet:
        d2_logger.setLevel(logging.WARNING)
    try:
        from detectron2.utils.env import seed_all_rng

        seed_all_rng(options.seed)
        trainer = RestTrainer(cfg)  # sets detectron2's logger up (DEBUG) if nothing did
        if options.quiet:
            d2_logger.setLevel(logging.WARNING)
        trainer.resume_or_load(resume=False)
        untrained = RestTrainer.test(cfg, trainer.model)
        t = time.time()
        trained = trainer.train()  # evaluates once at the end of training
        train_seconds = time.time() - t
        times = [v for v, _ in trainer.storage.history("time").values()]
    finally:
        d2_logger.setLevel(level)
    model = trainer.model
    whole, decoder, neck = _d2_flops(model, options.flops_shape)
    sem = trained["sem_seg"]
    per_class = {k[4:]: float(v) / 100 for k, v in sem.items() if k.startswith("IoU-")}
    neck_params = _params(model.backbone) - _params(model.backbone.bottom_up)
    return ToyRow(entry, float(untrained["sem_seg"]["mIoU"]) / 100, float(sem["mIoU"]) / 100,
                  _mean_time(times), train_seconds, _params(model), neck_params,
                  whole, decoder, neck, options.max_iters, per_class)


def run_entry(entry: ToyEntry, options: ToyCompareOptions) -> ToyRow:
    """Train and evaluate one model (the toy data must exist)."""
    name = f"{entry.toolbox}_" + osp.splitext(osp.basename(entry.config))[0]
    work_dir = osp.abspath(osp.join(options.work_dir, name))
    os.makedirs(work_dir, exist_ok=True)
    run = {"mm": _run_mm, "d2": _run_d2}.get(entry.toolbox)
    if run is None:
        raise ValueError(f"toolbox must be 'mm' or 'd2', got {entry.toolbox!r}")
    return run(entry, options, work_dir)


def run_toy_comparison(options: Optional[ToyCompareOptions] = None,
                       entries: Sequence[ToyEntry] = ENTRIES, log=print) -> List[ToyRow]:
    """Write the toy data if missing, then train and measure every entry in turn.

    Args:
        options: settings (default: :class:`ToyCompareOptions`).
        entries: the models (default: :data:`ENTRIES`).
        log: progress lines go here (``None``: silent).

    Returns:
        One :class:`ToyRow` per entry, in order.
    """
    import torch

    from .data.toy import generate_toy_dataset

    options = options or ToyCompareOptions()
    options.validate()
    if options.threads:
        torch.set_num_threads(options.threads)
    generate_toy_dataset(options.data_root)  # no-op when it is there already
    rows = []
    for i, entry in enumerate(entries):
        t = time.time()
        row = run_entry(entry, options)
        rows.append(row)
        if log:
            log(f"[{i + 1}/{len(entries)}] {entry.toolbox} {entry.model} ({entry.config}): "
                f"mIoU {row.miou_untrained:.3f} -> {row.miou:.3f}, "
                f"{row.sec_per_iter * 1000:.0f} ms/iteration, {time.time() - t:.0f} s")
    return rows


def __getattr__(name: str):
    if name == "format_markdown":
        raise AttributeError("rest_dense.toy_compare.format_markdown moved to the tool that writes "
                             "the docs table, tools/vt_fpn_toy_table.py (the library returns rows)")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
