#!/usr/bin/env python
"""End-to-end demo: train and evaluate a small ResTv2 on the synthetic toy-shapes data.

    python tools/demo.py                    # Mask R-CNN (MMDetection), a few minutes on 2 CPU cores
    python tools/demo.py --task seg         # UperNet (MMSegmentation)
    python tools/demo.py --task all         # both
    python tools/demo.py --max-iters 20     # quick smoke run
    python tools/demo.py --max-iters 0      # evaluate the untrained (randomly initialised) model only

Steps: write the toy dataset if it is missing (``rest_dense/data/toy.py``), build the config from
``configs/toy/``, evaluate the randomly initialised model, train it with mmengine's Runner,
evaluate it (COCO bbox/segm mAP, or mIoU), and save a picture of predictions next to the ground
truth for a few validation images. The trained model is evaluated in memory: nothing is reloaded
from a checkpoint (the checkpoint written at the end is there for the user).

Everything goes under ``--work-dir`` (default ``work_dirs/toy_demo``), one sub-folder per task:
the mmengine log, the config as run, the final checkpoint, ``metrics.json`` and the picture.
"""
from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import random
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, REPO)
# OpenMP threads that spin while waiting make small CPU models crawl (10x measured) when the
# cores are shared with other work; sleeping waiters cost next to nothing when they are not.
# Must be set before torch is imported; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

TASKS = {
    "det": dict(config="configs/toy/mask_rcnn_restv2_toy.py", name="mask_rcnn",
                headline=(("coco/bbox_mAP", "bbox mAP"), ("coco/segm_mAP", "segm mAP"),
                          ("coco/bbox_mAP_50", "bbox mAP@50"), ("coco/segm_mAP_50", "segm mAP@50"))),
    "seg": dict(config="configs/toy/upernet_restv2_toy.py", name="upernet",
                headline=(("mIoU", "mIoU"), ("mAcc", "mAcc"), ("aAcc", "aAcc"))),
}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("det", "seg", "all"), default="det",
                   help="det: Mask R-CNN (default); seg: UperNet; all: both")
    p.add_argument("--work-dir", default="work_dirs/toy_demo", help="output folder (default: work_dirs/toy_demo)")
    p.add_argument("--data-root", default="data/toy", help="toy dataset root, made if missing (default: data/toy)")
    p.add_argument("--max-iters", type=int, default=None,
                   help="training iterations (default: the config's); 0 evaluates the untrained model only")
    p.add_argument("--batch-size", type=int, default=None, help="training batch size (default: the config's)")
    p.add_argument("--lr", type=float, default=None, help="base learning rate (default: the config's)")
    p.add_argument("--num-train", type=int, default=300, help="toy training images (default: 300)")
    p.add_argument("--num-val", type=int, default=50, help="toy validation images (default: 50)")
    p.add_argument("--size", type=int, default=128, help="toy image side in pixels (default: 128)")
    p.add_argument("--class-color-prob", type=float, default=0.75,
                   help="toy data: probability that a shape is coloured from its class's hue range")
    p.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own choice, i.e. OMP_NUM_THREADS or all cores)")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip evaluating the randomly initialised model before training")
    p.add_argument("--num-vis", type=int, default=4, help="validation images in the picture (default: 4)")
    p.add_argument("--score-thr", type=float, default=0.5, help="score threshold for drawn detections")
    p.add_argument("--log-interval", type=int, default=None, help="iterations between log lines")
    p.add_argument("--quiet", action="store_true", help="mmengine logs at WARNING level (metrics still printed)")
    from mmengine.config import DictAction

    p.add_argument("--cfg-options", nargs="+", action=DictAction, default=None, metavar="KEY=VALUE",
                   help="override config entries, e.g. model.decode_head.channels=128 "
                        "(applied after the options above)")
    return p.parse_args(argv)


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


def build_config(task: str, args: argparse.Namespace, work_dir: str):
    """Load ``configs/toy/<task config>`` and apply the command-line overrides."""
    from mmengine.config import Config

    cfg = Config.fromfile(osp.join(REPO, TASKS[task]["config"]))
    root = args.data_root.rstrip("/") + "/"
    for dl in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        dl.dataset.data_root = root
    for key in ("val_evaluator", "test_evaluator"):
        if "ann_file" in cfg[key]:
            cfg[key].ann_file = osp.join(root, "annotations/instances_val.json")
    if args.size != cfg.img_size:
        _set_image_size(cfg, args.size)
    if args.batch_size:
        cfg.train_dataloader.batch_size = args.batch_size
    if args.lr:
        cfg.optim_wrapper.optimizer.lr = args.lr
    _set_max_iters(cfg, cfg.train_cfg.max_iters if args.max_iters is None else args.max_iters,
                   args.log_interval)
    cfg.randomness = dict(seed=args.seed)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.work_dir = work_dir
    if args.quiet:
        cfg.log_level = "WARNING"
    return cfg


# ----------------------------------------------------------------------------- running

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


def run_task(task: str, args: argparse.Namespace) -> Dict:
    """Train and evaluate one toy model; returns a summary dict (also written to metrics.json)."""
    from mmengine.runner import Runner

    spec = TASKS[task]
    work_dir = osp.abspath(osp.join(args.work_dir, spec["name"]))
    cfg = build_config(task, args, work_dir)
    max_iters = cfg.train_cfg.max_iters
    t0 = time.time()
    runner = Runner.from_cfg(cfg)
    recorder = _metrics_hook()
    runner.register_hook(recorder)
    val_loop = runner.val_loop  # builds the val dataloader and evaluator

    # The randomly initialised model, exactly as training will start from it. init_weights() of
    # mmengine modules runs once, so train() keeps these weights; the RNG state is restored so
    # that the baseline evaluation does not change the training run.
    runner.model.init_weights()
    baseline: Optional[Dict[str, float]] = None
    if max_iters == 0 or not args.no_baseline:
        state = _rng_state()
        t = time.time()
        baseline = _to_float(val_loop.run())
        _set_rng_state(state)
        print(f"[demo] {task}: untrained model evaluated in {time.time() - t:.1f} s", flush=True)

    train_time = 0.0
    trained: Optional[Dict[str, float]] = None
    if max_iters > 0:
        t = time.time()
        runner.train()  # validates once at the end (val_interval == max_iters)
        train_time = time.time() - t
        trained = _to_float(recorder.metrics)

    picture = osp.join(work_dir, f"toy_{task}_predictions.png")
    ckpt = osp.join(work_dir, f"iter_{max_iters}.pth") if max_iters > 0 else None
    model = runner.model
    dataset = val_loop.dataloader.dataset
    indices = list(range(min(args.num_vis, len(dataset))))
    if task == "det":
        draw_det_comparison(model, dataset, indices, picture, score_thr=args.score_thr)
    else:
        draw_seg_comparison(model, dataset, indices, picture)

    summary = {
        "task": task, "config": spec["config"], "max_iters": max_iters,
        "train_batch_size": cfg.train_dataloader.batch_size,
        "data_root": osp.abspath(args.data_root),
        "untrained": baseline, "trained": trained,
        "train_seconds": round(train_time, 1), "total_seconds": round(time.time() - t0, 1),
        "work_dir": work_dir, "log_dir": runner.log_dir, "checkpoint": ckpt, "picture": picture,
    }
    with open(osp.join(work_dir, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


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


def draw_det_comparison(model, dataset, indices: Sequence[int], out_path: str, score_thr: float = 0.5) -> None:
    """Save ``ground truth | prediction`` panels (boxes, masks, class names) for ``indices``."""
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
    """Save ``image | ground truth | prediction`` panels of label maps for ``indices``."""
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
            value = metrics[key] / 100.0 if task == "seg" else metrics[key]  # mmseg reports percent
            parts.append(f"{label} {value:.3f}")
    return ", ".join(parts)


def print_summary(summary: Dict) -> None:
    task = summary["task"]
    print(f"\n=== toy {task} ({summary['config']}), {summary['max_iters']} iterations "
          f"x batch {summary['train_batch_size']} ===")
    print(f"  untrained : {_fmt_metrics(task, summary['untrained'])}")
    print(f"  trained   : {_fmt_metrics(task, summary['trained'])}")
    print(f"  time      : training {summary['train_seconds']:.0f} s, total {summary['total_seconds']:.0f} s")
    print(f"  picture   : {summary['picture']}")
    if summary["checkpoint"]:
        print(f"  checkpoint: {summary['checkpoint']}")
    print(f"  log       : {summary['log_dir']}")
    print(f"  metrics   : {osp.join(summary['work_dir'], 'metrics.json')}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    from rest_dense.data.toy import generate_toy_dataset, toy_dataset_ready

    t0 = time.time()
    data_args = dict(num_train=args.num_train, num_val=args.num_val, size=args.size,
                     class_color_prob=args.class_color_prob)
    if not toy_dataset_ready(args.data_root, **data_args):
        print(f"[demo] writing the toy dataset to {args.data_root} ...", flush=True)
        generate_toy_dataset(args.data_root, **data_args)
        print(f"[demo] toy dataset ready ({time.time() - t0:.1f} s)", flush=True)
    tasks = ("det", "seg") if args.task == "all" else (args.task,)
    summaries = [run_task(task, args) for task in tasks]
    for summary in summaries:
        print_summary(summary)
    print(f"\n[demo] done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
