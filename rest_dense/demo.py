"""End-to-end demo: train and evaluate a small ResTv2 on the synthetic toy-shapes data
(what ``rest-dense demo`` and ``bash tools/run_main.sh`` run).

Steps, per task: write the toy dataset if it is missing (:mod:`rest_dense.data.toy`), load
the shipped config (``toy/mask_rcnn_restv2_toy.py`` for ``det``, Mask R-CNN with
MMDetection; ``toy/upernet_restv2_toy.py`` for ``seg``, UperNet with MMSegmentation),
evaluate the randomly initialised model, train it with mmengine's Runner, evaluate it
(COCO bbox/segm mAP, or mIoU) and save a picture of predictions next to the ground truth
for a few validation images. The trained model is evaluated in memory; the checkpoint
written at the end is there for the user.

Everything goes under ``work_dir``, one sub-folder per task: the mmengine log, the config
as run, the final checkpoint, ``metrics.json`` and the picture. Works from any directory
(the configs come with the package); the data go to ``data_root``.

Example::

    from rest_dense.demo import DemoOptions, run_demo

    summaries = run_demo(DemoOptions(task="seg", max_iters=20, threads=1))
    print(summaries[0]["trained"]["mIoU"])
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import os.path as osp
import random
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["TASKS", "ALL_TASKS", "DemoOptions", "build_config", "run_task", "run_demo", "format_summary",
           "draw_det_comparison", "draw_seg_comparison"]

#: task -> shipped config, output sub-folder and the metrics of the summary
TASKS: Dict[str, Dict[str, Any]] = {
    "det": dict(config="toy/mask_rcnn_restv2_toy.py", name="mask_rcnn",
                headline=(("coco/bbox_mAP", "bbox mAP"), ("coco/segm_mAP", "segm mAP"),
                          ("coco/bbox_mAP_50", "bbox mAP@50"), ("coco/segm_mAP_50", "segm mAP@50"))),
    "seg": dict(config="toy/upernet_restv2_toy.py", name="upernet",
                headline=(("mIoU", "mIoU"), ("mAcc", "mAcc"), ("aAcc", "aAcc"))),
    # the same backbone, data and schedule with semantic FPN / VT-FPN instead of UperNet
    "sem_fpn": dict(config="toy/sem_fpn_restv2_toy.py", name="sem_fpn",
                    headline=(("mIoU", "mIoU"), ("mAcc", "mAcc"), ("aAcc", "aAcc"))),
    "vt_fpn": dict(config="toy/vt_fpn_restv2_toy.py", name="vt_fpn",
                   headline=(("mIoU", "mIoU"), ("mAcc", "mAcc"), ("aAcc", "aAcc"))),
}
#: what ``task='all'`` runs
ALL_TASKS: Tuple[str, ...] = ("det", "seg")


@dataclasses.dataclass
class DemoOptions:
    """Settings of a demo run (the options of ``rest-dense demo``).

    Attributes:
        task: ``'det'`` (Mask R-CNN), ``'seg'`` (UperNet), ``'sem_fpn'`` (semantic FPN),
            ``'vt_fpn'`` (VT-FPN) or ``'all'`` (det and seg).
        work_dir: output folder (one sub-folder per task).
        data_root: toy dataset root; written if missing or made with other parameters.
        max_iters: training iterations (``None``: the config's); 0 evaluates the untrained
            model only.
        batch_size: training batch size (``None``: the config's).
        lr: base learning rate (``None``: the config's).
        num_train: toy training images.
        num_val: toy validation images.
        size: toy image side in pixels (``HxW`` sizes are not supported: the scenes are square).
        class_color_prob: probability that a toy shape is coloured from its class's hues.
        seed: training seed.
        threads: torch CPU threads (``None``: torch's own choice).
        baseline: evaluate the randomly initialised model before training.
        num_vis: validation images in the picture.
        score_thr: score threshold of drawn detections.
        log_interval: iterations between log lines (``None``: about a tenth of the run).
        quiet: mmengine logs at WARNING level only.
        cfg_options: further config overrides (``key=value`` strings or a dict), applied
            after the settings above.
    """

    task: str = "det"
    work_dir: str = "work_dirs/toy_demo"
    data_root: str = "data/toy"
    max_iters: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    num_train: int = 300
    num_val: int = 50
    size: int = 128
    class_color_prob: float = 0.75
    seed: int = 0
    threads: Optional[int] = None
    baseline: bool = True
    num_vis: int = 4
    score_thr: float = 0.5
    log_interval: Optional[int] = None
    quiet: bool = False
    cfg_options: Any = None

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting."""
        if self.task not in (*TASKS, "all"):
            raise ValueError(f"task {self.task!r} is not one of {', '.join((*TASKS, 'all'))}")
        for name in ("num_train", "num_val", "size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.size < 32:
            raise ValueError(f"size {self.size} is too small for the toy models (32 at least)")
        for name in ("max_iters", "batch_size", "threads", "log_interval"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "max_iters" else 1):
                raise ValueError(f"{name} must be {'>= 0' if name == 'max_iters' else 'positive'}, "
                                 f"got {value}")
        if self.lr is not None and not 0 < self.lr < float("inf"):
            raise ValueError(f"lr must be a positive finite number, got {self.lr}")
        if not 0.0 <= self.class_color_prob <= 1.0:
            raise ValueError(f"class_color_prob must lie in [0, 1], got {self.class_color_prob}")
        if self.num_vis < 0:
            raise ValueError(f"num_vis must be >= 0, got {self.num_vis}")
        if self.cfg_options:
            from .configs import parse_cfg_options

            parse_cfg_options(self.cfg_options)  # names a malformed override now, not later

    @property
    def tasks(self) -> Tuple[str, ...]:
        return ALL_TASKS if self.task == "all" else (self.task,)


# ----------------------------------------------------------------------------- config
def _set_max_iters(cfg, max_iters: int, log_interval: Optional[int]) -> None:
    """Set the iteration budget and rescale everything tied to it (schedules, hooks)."""
    n = max(int(max_iters), 0)
    cfg.train_cfg.max_iters = n
    cfg.train_cfg.val_interval = max(n, 1)
    cfg.default_hooks.checkpoint.interval = max(n, 1)
    warmup = min(int(cfg.get("warmup_iters", 0)), max(n // 5, 1))
    for sched in cfg.param_scheduler:
        if sched.type == "LinearLR":
            sched.end = warmup
        elif sched.type == "CosineAnnealingLR":
            sched.begin, sched.end = warmup, max(n, warmup + 1)
            sched.T_max = max(n - warmup, 1)
    interval = log_interval or min(20, max(n // 10, 1))
    cfg.default_hooks.logger.interval = interval
    cfg.log_processor.window_size = interval


def _set_image_size(cfg, size: int) -> None:
    """Point every resize step (and the seg pre-processor's padding size) at ``size``."""
    for dl in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        for step in dl.dataset.pipeline:
            if step.type == "Resize":
                step.scale = (size, size)
    if "size" in cfg.model.data_preprocessor:
        cfg.model.data_preprocessor.size = (size, size)


def build_config(task: str, options: DemoOptions, work_dir: str):
    """The shipped toy config of ``task`` with ``options`` applied.

    Args:
        task: ``'det'`` or ``'seg'``.
        options: the demo settings.
        work_dir: the task's output folder.

    Returns:
        An ``mmengine.Config`` ready for ``Runner.from_cfg``.
    """
    from .configs import get_config_path, parse_cfg_options
    from .mm.runner import check_train_loop
    from .mm.utils import load_config

    cfg = load_config(get_config_path(TASKS[task]["config"]))
    root = osp.abspath(options.data_root).rstrip("/") + "/"
    for dl in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        dl.dataset.data_root = root
    for key in ("val_evaluator", "test_evaluator"):
        if "ann_file" in cfg[key]:
            cfg[key].ann_file = osp.join(root, "annotations/instances_val.json")
    if options.size != cfg.img_size:
        _set_image_size(cfg, options.size)
    if options.batch_size:
        cfg.train_dataloader.batch_size = options.batch_size
    if options.lr:
        cfg.optim_wrapper.optimizer.lr = options.lr
    _set_max_iters(cfg, cfg.train_cfg.max_iters if options.max_iters is None else options.max_iters,
                   options.log_interval)
    cfg.randomness = dict(seed=options.seed)
    overrides = parse_cfg_options(options.cfg_options)
    if overrides:
        cfg.merge_from_dict(overrides)
    check_train_loop(cfg, minimum_length=0)  # 0 iterations: evaluate the untrained model only
    cfg.work_dir = work_dir
    if options.quiet:
        cfg.log_level = "WARNING"
    return cfg


# ----------------------------------------------------------------------------- running
def _quiet_stdout(quiet: bool):
    """With ``quiet``: what the frameworks print to stdout (pycocotools' evaluation tables)
    goes nowhere; the demo's own lines and every warning and error still show."""
    import contextlib
    import io

    return contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext()


def _metrics_hook():
    """A hook that keeps the metrics of the latest validation run (``hook.metrics``)."""
    from mmengine.hooks import Hook

    class _Recorder(Hook):
        priority = "VERY_LOW"

        def __init__(self) -> None:
            self.metrics: Dict[str, float] = {}

        def after_val_epoch(self, runner, metrics: Optional[Dict[str, float]] = None) -> None:
            self.metrics = dict(metrics or {})

    return _Recorder()


def _rng_state():
    import torch
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _set_rng_state(state) -> None:
    import torch
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])


def _to_float(metrics: Dict) -> Dict[str, float]:
    return {k: round(float(v), 4) for k, v in metrics.items()
            if isinstance(v, (int, float, np.floating, np.integer))}


def run_task(task: str, options: DemoOptions) -> Dict[str, Any]:
    """Train and evaluate one toy model (the dataset must exist, see :func:`run_demo`).

    Args:
        task: ``'det'`` or ``'seg'``.
        options: the demo settings.

    Returns:
        The summary, also written to ``<work_dir>/<task folder>/metrics.json``: metrics of
        the untrained and the trained model, times, paths of the log, checkpoint, picture.

    Raises:
        RuntimeError: an evaluation produced no metrics.
    """
    from mmengine.runner import Runner

    spec = TASKS[task]
    work_dir = osp.abspath(osp.join(options.work_dir, spec["name"]))
    cfg = build_config(task, options, work_dir)
    max_iters = cfg.train_cfg.max_iters
    t0 = time.time()
    with _quiet_stdout(options.quiet):  # pycocotools reports loading the annotations
        runner = Runner.from_cfg(cfg)
        recorder = _metrics_hook()
        runner.register_hook(recorder)
        val_loop = runner.val_loop  # builds the val dataloader and evaluator

    # The randomly initialised model, exactly as training will start from it. init_weights() of
    # mmengine modules runs once, so train() keeps these weights; the RNG state is restored so
    # that the baseline evaluation does not change the training run.
    runner.model.init_weights()
    baseline: Optional[Dict[str, float]] = None
    if max_iters == 0 or options.baseline:
        state = _rng_state()
        t = time.time()
        print(f"[demo] {task}: evaluating the untrained model on {len(val_loop.dataloader.dataset)} "
              "images ...", flush=True)
        with _quiet_stdout(options.quiet):  # pycocotools prints its tables itself
            baseline = _to_float(val_loop.run())
        _set_rng_state(state)
        print(f"[demo] {task}: untrained model evaluated in {time.time() - t:.1f} s", flush=True)
        if not baseline:
            raise RuntimeError(f"the {task} evaluation of the untrained model produced no metrics")

    train_time = 0.0
    trained: Optional[Dict[str, float]] = None
    if max_iters > 0:
        print(f"[demo] {task}: training {max_iters} iterations "
              f"(batch {cfg.train_dataloader.batch_size}) ...", flush=True)
        t = time.time()
        with _quiet_stdout(options.quiet):
            runner.train()  # validates once at the end (val_interval == max_iters)
        train_time = time.time() - t
        trained = _to_float(recorder.metrics)
        if not trained:
            raise RuntimeError(f"the {task} evaluation after training produced no metrics")

    picture = osp.join(work_dir, f"toy_{task}_predictions.png")
    ckpt = osp.join(work_dir, f"iter_{max_iters}.pth") if max_iters > 0 else None
    dataset = val_loop.dataloader.dataset
    indices = list(range(min(options.num_vis, len(dataset))))
    if indices:
        if task == "det":
            draw_det_comparison(runner.model, dataset, indices, picture, score_thr=options.score_thr)
        else:
            draw_seg_comparison(runner.model, dataset, indices, picture)

    summary = {
        "task": task, "config": spec["config"], "max_iters": max_iters,
        "train_batch_size": cfg.train_dataloader.batch_size,
        "data_root": osp.abspath(options.data_root),
        "untrained": baseline, "trained": trained,
        "train_seconds": round(train_time, 1), "total_seconds": round(time.time() - t0, 1),
        "work_dir": work_dir, "log_dir": runner.log_dir, "checkpoint": ckpt,
        "picture": picture if indices else None,
    }
    with open(osp.join(work_dir, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def run_demo(options: Optional[DemoOptions] = None) -> List[Dict[str, Any]]:
    """The whole demo: toy data (if missing), then :func:`run_task` for each task.

    Args:
        options: settings (default: :class:`DemoOptions` defaults, Mask R-CNN).

    Returns:
        One summary per task.

    Raises:
        ValueError: a bad setting, a work dir or data folder that is a file, or a data
            folder holding files that are no toy dataset.
        rest_dense.runlock.FolderBusyError: another live demo (or run) uses the work dir
            or the data folder.
    """
    options = options or DemoOptions()
    options.validate()
    from .configs import config_framework
    from .data.toy import generate_toy_dataset, toy_dataset_ready, toy_root_problem
    from .runlock import hold_folder
    from .utils import check_output_path, require_package

    for task in options.tasks:  # before any folder or image is written
        framework = config_framework(TASKS[task]["config"])
        for package in ("mmengine", framework):
            require_package(package, f"the demo's {task!r} task runs {framework}")

    check_output_path(options.work_dir, "--work-dir", folder=True)
    check_output_path(options.data_root, "--data-root", folder=True)
    problem = toy_root_problem(options.data_root, besides=[options.work_dir])
    if problem:
        raise ValueError(f"--data-root: {problem}")
    if options.threads:
        import torch

        torch.set_num_threads(options.threads)
    data = dict(num_train=options.num_train, num_val=options.num_val, size=options.size,
                class_color_prob=options.class_color_prob)
    # one demo per work dir and per data folder at a time: another one would rewrite the
    # images this one trains on
    with hold_folder(options.work_dir, "demo"), hold_folder(options.data_root, "demo (toy data)"):
        if not toy_dataset_ready(options.data_root, **data):
            t = time.time()
            print(f"[demo] writing the toy dataset ({options.num_train} + {options.num_val} "
                  f"images) to {osp.abspath(options.data_root)} ...", flush=True)
            generate_toy_dataset(options.data_root, besides=[options.work_dir], **data)
            print(f"[demo] toy dataset ready ({time.time() - t:.1f} s)", flush=True)
        summaries = []
        for i, task in enumerate(options.tasks):
            print(f"[demo] task {i + 1}/{len(options.tasks)}: {task} ({TASKS[task]['config']})",
                  flush=True)
            summaries.append(run_task(task, options))
    return summaries


# ----------------------------------------------------------------------------- pictures
_ZOOM = 3


def _font():
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _zoom(img: np.ndarray) -> np.ndarray:
    return np.repeat(np.repeat(img, _ZOOM, axis=0), _ZOOM, axis=1)


def _instances_panel(image: np.ndarray, boxes: np.ndarray, masks: np.ndarray, labels: np.ndarray,
                     names: Sequence[str], colors: Sequence[Tuple[int, int, int]],
                     scores: Optional[np.ndarray] = None) -> np.ndarray:
    """Blend masks into the (zoomed) image and draw boxes with class names (and scores)."""
    from PIL import Image, ImageDraw

    canvas = _zoom(image).astype(np.float32)
    for mask, label in zip(masks, labels):
        m = _zoom(mask.astype(bool))
        canvas[m] = 0.45 * canvas[m] + 0.55 * np.array(colors[label], dtype=np.float32)
    pil = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    font = _font()
    for i, (box, label) in enumerate(zip(boxes, labels)):
        x0, y0, x1, y1 = (float(v) * _ZOOM for v in box)
        draw.rectangle((x0, y0, x1, y1), outline=tuple(colors[label]), width=2)
        text = names[label] if scores is None else f"{names[label]} {scores[i]:.2f}"
        tx, ty = x0 + 2, max(y0 - 15, 0)
        draw.rectangle(draw.textbbox((tx, ty), text, font=font), fill=(0, 0, 0))
        draw.text((tx, ty), text, fill=(255, 255, 255), font=font)
    return np.asarray(pil)


def _grid(rows: List[List[np.ndarray]], titles: Sequence[str], out_path: str,
          legend: Sequence[Tuple[str, Tuple[int, int, int]]] = ()) -> None:
    """Stack panels into a grid under a title row, add a colour legend, save as PNG."""
    from PIL import Image, ImageDraw

    gap, title_h = 4, 22
    legend_h = title_h if legend else 0
    h, w = rows[0][0].shape[:2]
    ncol = len(titles)
    out = np.full((title_h + len(rows) * (h + gap) + legend_h, ncol * (w + gap) - gap, 3), 255, np.uint8)
    for r, panels in enumerate(rows):
        for c, panel in enumerate(panels):
            y, x = title_h + r * (h + gap), c * (w + gap)
            out[y:y + h, x:x + w] = panel
    pil = Image.fromarray(out)
    draw = ImageDraw.Draw(pil)
    font = _font()
    for c, title in enumerate(titles):
        draw.text((c * (w + gap) + 4, 4), title, fill=(0, 0, 0), font=font)
    x, y = 4, out.shape[0] - legend_h + 4
    for name, color in legend:
        draw.rectangle((x, y, x + 14, y + 14), fill=tuple(int(v) for v in color), outline=(0, 0, 0))
        draw.text((x + 18, y), name, fill=(0, 0, 0), font=font)
        x += 18 + int(draw.textlength(name, font=font)) + 16
    os.makedirs(osp.dirname(out_path), exist_ok=True)
    pil.save(out_path)


def _predict(model, dataset, indices: Sequence[int]):
    import torch
    from mmengine.dataset import pseudo_collate

    model.eval()
    with torch.no_grad():
        return model.test_step(pseudo_collate([dataset[i] for i in indices]))


def _read_rgb(path: str) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(path).convert("RGB"))


def draw_det_comparison(model, dataset, indices: Sequence[int], out_path: str,
                        score_thr: float = 0.5) -> None:
    """Save ``ground truth | prediction`` panels (boxes, masks, class names) for ``indices``.

    Args:
        model: an MMDetection instance-segmentation model.
        dataset: its validation dataset (``metainfo`` with ``classes`` and ``palette``).
        indices: dataset indices to draw, one row each.
        out_path: the PNG to write.
        score_thr: detections below this score are not drawn.
    """
    names = dataset.metainfo["classes"]
    colors = dataset.metainfo["palette"]
    rows = []
    for sample in _predict(model, dataset, indices):
        image = _read_rgb(sample.img_path)
        gt = sample.gt_instances
        gt_boxes = gt.bboxes.tensor if hasattr(gt.bboxes, "tensor") else gt.bboxes
        gt_masks = gt.masks.masks if hasattr(gt.masks, "masks") else np.asarray(gt.masks)
        pred = sample.pred_instances
        keep = (pred.scores >= score_thr).cpu().numpy()
        rows.append([
            _instances_panel(image, gt_boxes.cpu().numpy(), gt_masks, gt.labels.cpu().numpy(), names, colors),
            _instances_panel(image, pred.bboxes.cpu().numpy()[keep], pred.masks.cpu().numpy()[keep],
                             pred.labels.cpu().numpy()[keep], names, colors, pred.scores.cpu().numpy()[keep]),
        ])
    _grid(rows, ["ground truth", f"prediction (score >= {score_thr:g})"], out_path,
          legend=list(zip(names, colors)))


def draw_seg_comparison(model, dataset, indices: Sequence[int], out_path: str) -> None:
    """Save ``image | ground truth | prediction`` panels of label maps for ``indices``.

    Args:
        model: an MMSegmentation model.
        dataset: its validation dataset (``metainfo`` with ``classes`` and ``palette``).
        indices: dataset indices to draw, one row each.
        out_path: the PNG to write.
    """
    palette = np.array(dataset.metainfo["palette"], dtype=np.float32)
    rows = []
    for sample in _predict(model, dataset, indices):
        image = _read_rgb(sample.img_path).astype(np.float32)
        panels = [_zoom(image.astype(np.uint8))]
        for seg in (sample.gt_sem_seg.data, sample.pred_sem_seg.data):
            lab = seg.squeeze(0).cpu().numpy().astype(np.int64)
            valid = lab < len(palette)
            colored = image * 0.35
            colored[valid] = 0.35 * image[valid] + 0.65 * palette[lab[valid]]
            panels.append(_zoom(colored.clip(0, 255).astype(np.uint8)))
        rows.append(panels)
    _grid(rows, ["image", "ground truth", "prediction"], out_path,
          legend=list(zip(dataset.metainfo["classes"], dataset.metainfo["palette"])))


# ----------------------------------------------------------------------------- report
def _fmt_metrics(task: str, metrics: Optional[Dict[str, float]]) -> str:
    if metrics is None:
        return "-"
    parts = []
    for key, label in TASKS[task]["headline"]:
        if key in metrics:
            value = metrics[key] / 100.0 if task != "det" else metrics[key]  # mmseg: percent
            parts.append(f"{label} {value:.3f}" if math.isfinite(value) else f"{label} n/a")
    return ", ".join(parts)


def format_summary(summary: Dict[str, Any]) -> str:
    """A few lines for the terminal: metrics before / after training, time, files."""
    task = summary["task"]
    lines = [
        f"=== toy {task} ({summary['config']}), {summary['max_iters']} iterations "
        f"x batch {summary['train_batch_size']} ===",
        f"  untrained : {_fmt_metrics(task, summary['untrained'])}",
        f"  trained   : {_fmt_metrics(task, summary['trained'])}",
        f"  time      : training {summary['train_seconds']:.0f} s, "
        f"total {summary['total_seconds']:.0f} s",
    ]
    if summary["picture"]:
        lines.append(f"  picture   : {summary['picture']}")
    if summary["checkpoint"]:
        lines.append(f"  checkpoint: {summary['checkpoint']}")
    lines.append(f"  log       : {summary['log_dir']}")
    lines.append(f"  metrics   : {osp.join(summary['work_dir'], 'metrics.json')}")
    return "\n".join(lines)
