"""Toy data and briefly trained toy models for the deployment tests.

The models are the shipped toy configs, trained for a few iterations on the toy dataset
through the project's own training entry points (``rest_dense.mm.runner.train``,
``rest-dense train`` for detectron2); the tests use the checkpoint files those runs write
(mmengine ``iter_N.pth``, detectron2 ``model_final.pth``). Each model is trained at most
once per test session, on first use (:func:`trained`), whichever test module asks first.
One extra RetinaNet test exports the shipped COCO config made small, with a perturbed random
checkpoint (:func:`random_retina_checkpoint`); the other RetinaNet tests use the toy configs,
trained like the rest.

Window attention: ``global``, ``win`` and ``hwin`` have the same weights, so the
global-trained checkpoints serve those modes (``window_options``); ``cwin`` adds a
depth-wise conv per stage, initialised to zero (so that only training gives it a part in the
result): its models are the global-trained ones fine-tuned for a few iterations in ``cwin``
mode.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import pytest
import torch

from conftest import REPO, TINY_ARCH

MM_DET = REPO / "configs/toy/mask_rcnn_restv2_toy.py"
MM_SEG = REPO / "configs/toy/upernet_restv2_toy.py"
MM_RETINA = REPO / "configs/retinanet/retinanet_restv2-t_fpn_amp-ms-1x_coco.py"
MM_RETINA_TOY = REPO / "configs/toy/retinanet_restv2_toy.py"
D2_DET = REPO / "configs/detectron2/toy/mask_rcnn_restv2_toy.yaml"
D2_RETINA = REPO / "configs/detectron2/toy/retinanet_restv2_toy.yaml"
MM_VT_FPN = REPO / "configs/toy/vt_fpn_restv2_toy.py"
D2_VT_FPN = REPO / "configs/detectron2/toy/sem_seg_restv2_vt_fpn_toy.yaml"

#: windows (tokens per stage) small enough that the toy maps (32x32 .. 4x4 at 128x128) are
#: split into several windows, with padding at the test sizes
WINDOWS = [8, 4, 4, 2]
#: training iterations of each toy model (2 images a batch): about the fewest that give
#: detections / label maps that are not all background on the toy images
#: RetinaNet (both frameworks): 30 iterations at the constant lr 1e-3 (~10 s on one core) lift
#: the focal-loss classifier well off its 0.01 prior (top-20 scores ~0.08-0.7)
#: VT-FPN (semantic FPN head on the visual-token neck), constant lr 1e-3: the MMSegmentation
#: model still labels every pixel background after 24 iterations (~0.2 s each); after 60 the
#: synthetic check pictures get shapes of two or three classes; detectron2's (background not
#: down-weighted) gets there in 24
ITERS = {"mrcnn": 12, "upernet": 24, "d2": 12, "retina": 30, "d2_retina": 30,
         "vt_fpn": 60, "d2_vt_fpn": 24,
         "cwin": 6}  # cwin: fine-tuning the global-trained model in cwin mode
TRAIN_IMAGES = 8  # toy training images (the validation split has 3)
#: test-time overrides of the toy Mask R-CNN (MMDetection): after a few iterations the box
#: head's class scores are still low (~0.02-0.06), so the 0.05 threshold would keep almost
#: nothing; with 0.01 every image keeps its 20 best detections (masks non-empty)
DET_OPTIONS: Dict[str, object] = {"model.test_cfg.rcnn.score_thr": 0.01}
#: the same for the detectron2 toy Mask R-CNN (scores ~0.015-0.04 after 12 iterations)
D2_OPTIONS: Dict[str, object] = {"MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.01}


def window_options(mode: str, framework: str = "mm") -> Dict[str, object]:
    """Config overrides for attention mode ``mode`` with :data:`WINDOWS`.

    Args:
        mode: ``'global'``, ``'win'``, ``'cwin'`` or ``'hwin'``.
        framework: ``'mm'`` (OpenMMLab keys) or ``'d2'`` (detectron2 yaml keys).
    """
    if framework == "d2":
        return {"MODEL.RESTV2.ATTN_MODE": mode, "MODEL.RESTV2.WINDOW_SIZE": list(WINDOWS)}
    return {"model.backbone.attn_mode": mode, "model.backbone.window_size": list(WINDOWS)}


def retina_options() -> Dict[str, object]:
    """The shipped RetinaNet config made small: tiny backbone, 3 classes, images resized to
    <= 256x160."""
    return {
        "model.backbone.arch": dict(TINY_ARCH, _delete_=True),
        "model.backbone.init_cfg": None,
        "model.neck.in_channels": list(TINY_ARCH["embed_dims"])[1:],
        "model.bbox_head.num_classes": 3,
        "model.bbox_head.feat_channels": 64,
        "test_dataloader.dataset.pipeline.1.scale": (256, 160),
    }


def random_retina_checkpoint(path: Path, seed: int = 0,
                             options: Optional[Dict[str, object]] = None) -> Path:
    """The RetinaNet of :func:`retina_options`, randomly initialised with every weight
    perturbed (seeded) and the classification prior raised so that scores spread around 0.1.

    For the one test of the shipped COCO config itself (built and exported as shipped, only
    made small). Trained as shipped (anchors 32-813 px for the ~15-65 px toy shapes, lr 1e-4
    with warm-up), it keeps its scores near the focal-loss prior 0.01 for longer than a test
    can train; the trained RetinaNet tests use the toy configs instead
    (``configs/toy/retinanet_restv2_toy.py``, 16-406 px anchors, constant lr 1e-3).
    """
    from rest_dense.mm.utils import build_model

    cfg = mm_config(MM_RETINA, dict(retina_options(), **(options or {})))
    torch.manual_seed(seed)
    model = build_model(cfg)
    model.init_weights()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)
        cls = model.bbox_head.retina_cls  # scores spread around ~0.1: no near-ties at the cuts
        cls.bias.fill_(-2.5)
        cls.weight.copy_(torch.randn(cls.weight.shape, generator=gen) * 0.2)
    torch.save({"state_dict": model.state_dict(), "meta": {}}, path)
    return path


def constant_lr(iters: int) -> list:
    """The optimizer's lr throughout, no warm-up or decay. For UperNet: a few-iteration run
    of the toy config's own schedule (scaled with ``train_cfg.max_iters``) is mostly warm-up
    and decay and still labels every pixel background after 20 iterations. (Mask R-CNN keeps
    its schedule: without the warm-up its box head drops all scores below 0.01.)"""
    return [dict(type="ConstantLR", factor=1.0, by_epoch=False, begin=0, end=iters)]


def toy_data(root: Path) -> Path:
    """The toy-shapes dataset (COCO and ADE layouts): 8 training and 3 validation images."""
    from rest_dense.data.toy import generate_toy_dataset

    generate_toy_dataset(root, num_train=TRAIN_IMAGES, num_val=3, size=128)
    return root


class _OneThread:
    """Torch on one CPU thread inside the block (restores the previous setting)."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


def train_mm(work: Path, config: Path, data_root: Path, iters: int,
             options: Optional[Dict[str, object]] = None) -> Path:
    """Train an OpenMMLab toy config for ``iters`` iterations on ``data_root``.

    Args:
        work: the work dir.
        config: a toy config (its schedule scales with ``train_cfg.max_iters``).
        data_root: the toy dataset.
        iters: training iterations.
        options: further overrides (attention mode, lr schedule, ``load_from``).

    Returns:
        The checkpoint the run wrote at its last iteration (``iter_{iters}.pth``).
    """
    from rest_dense.mm.runner import train

    root = str(data_root).rstrip("/") + "/"
    opts: Dict[str, object] = {
        "train_cfg.max_iters": iters,
        "train_dataloader.dataset.data_root": root,
        "train_dataloader.batch_size": 2,
        "default_hooks.checkpoint.interval": iters,
        "default_hooks.logger.interval": 1,
        "val_cfg": None, "val_dataloader": None, "val_evaluator": None,
    }
    opts.update(options or {})
    with _OneThread():
        train(str(config), work_dir=work, cfg_options=opts)
    ckpt = work / f"iter_{iters}.pth"
    assert ckpt.is_file(), f"training {config.name} wrote no {ckpt.name}"
    return ckpt


def d2_opts(options: Optional[Dict] = None) -> List[str]:
    """``KEY VALUE`` overrides of the detectron2 toy yaml (on CPU)."""
    out = ["MODEL.DEVICE", "cpu"]
    for k, v in (options or {}).items():
        out += [k, str(v)]
    return out


def train_d2(work: Path, data_root: Path, iters: int,
             options: Optional[Dict[str, object]] = None, config: Path = D2_DET) -> Path:
    """Train a detectron2 toy yaml (default: the toy Mask R-CNN) with ``rest-dense train``
    (in this process).

    Returns:
        ``model_final.pth`` of the run.
    """
    from rest_dense.cli import main

    opts = d2_opts({"SOLVER.MAX_ITER": iters, "SOLVER.IMS_PER_BATCH": 2,
                    "SOLVER.CHECKPOINT_PERIOD": 10 ** 6, "DATALOADER.NUM_WORKERS": 0,
                    "DATASETS.TEST": "()", **(options or {})})
    with _OneThread():
        code = main(["train", str(config), "--work-dir", str(work), "--threads", "1",
                     "--toy-root", str(data_root), *opts])
    ckpt = work / "model_final.pth"
    assert code == 0 and ckpt.is_file(), f"detectron2 training exited {code}, wrote no {ckpt}"
    return ckpt


def _upernet(work: Path, data: Path, base: Callable[[str], Path]) -> Path:
    return train_mm(work, MM_SEG, data, ITERS["upernet"],
                    {"param_scheduler": constant_lr(ITERS["upernet"])})


def _upernet_cwin(work: Path, data: Path, base: Callable[[str], Path]) -> Path:
    # the global-trained UperNet fine-tuned in cwin mode (its convs start at zero)
    return train_mm(work, MM_SEG, data, ITERS["cwin"], dict(
        window_options("cwin"), param_scheduler=constant_lr(ITERS["cwin"]),
        load_from=str(base("upernet"))))


def _mrcnn_cwin(work: Path, data: Path, base: Callable[[str], Path]) -> Path:
    # the global-trained Mask R-CNN fine-tuned in cwin mode (its convs start at zero)
    return train_mm(work, MM_DET, data, ITERS["cwin"], dict(
        window_options("cwin"), param_scheduler=constant_lr(ITERS["cwin"]),
        load_from=str(base("mrcnn"))))


def _d2_cwin(work: Path, data: Path, base: Callable[[str], Path]) -> Path:
    # the global-trained detectron2 model fine-tuned in cwin mode
    return train_d2(work, data, ITERS["cwin"], dict(window_options("cwin", "d2"),
                                                    **{"MODEL.WEIGHTS": base("d2")}))


def _retina(work: Path, data: Path, base: Callable[[str], Path]) -> Path:
    return train_mm(work, MM_RETINA_TOY, data, ITERS["retina"],
                    {"param_scheduler": constant_lr(ITERS["retina"])})


def _retina_cwin(work: Path, data: Path, base: Callable[[str], Path]) -> Path:
    # the global-trained toy RetinaNet fine-tuned in cwin mode (its convs start at zero); at
    # lr 1e-3 the fresh AdamW steps push every score below 0.05 again, so lr 1e-4 for the
    # trained weights and 1e-3 for the new convs (which then reach ~5e-3)
    return train_mm(work, MM_RETINA_TOY, data, ITERS["cwin"], dict(
        window_options("cwin"), param_scheduler=constant_lr(ITERS["cwin"]),
        load_from=str(base("retina")), **{
            "optim_wrapper.optimizer.lr": 1e-4,
            "optim_wrapper.paramwise_cfg.custom_keys": {"cwin_convs": dict(lr_mult=10.0)}}))


#: detectron2 toy RetinaNet: constant lr (no warm-up, no steps)
D2_CONSTANT_LR: Dict[str, object] = {"SOLVER.WARMUP_ITERS": 0, "SOLVER.STEPS": "()"}


def _d2_retina(work: Path, data: Path, base: Callable[[str], Path]) -> Path:
    return train_d2(work, data, ITERS["d2_retina"], D2_CONSTANT_LR, config=D2_RETINA)


def _d2_retina_cwin(work: Path, data: Path, base: Callable[[str], Path]) -> Path:
    return train_d2(work, data, ITERS["cwin"], dict(D2_CONSTANT_LR, **window_options("cwin", "d2"),
                                                    **{"MODEL.WEIGHTS": base("d2_retina")}),
                    config=D2_RETINA)


def _vt_fpn(work: Path, data: Path, base: Callable[[str], Path]) -> Path:
    return train_mm(work, MM_VT_FPN, data, ITERS["vt_fpn"],
                    {"param_scheduler": constant_lr(ITERS["vt_fpn"])})


def _d2_vt_fpn(work: Path, data: Path, base: Callable[[str], Path]) -> Path:
    # the toy yaml's cosine schedule replaced by a constant lr (as for the toy RetinaNet)
    return train_d2(work, data, ITERS["d2_vt_fpn"],
                    dict(D2_CONSTANT_LR, **{"SOLVER.LR_SCHEDULER_NAME": "WarmupMultiStepLR"}),
                    config=D2_VT_FPN)


#: name -> how to train it: (work dir, toy data, the checkpoint of another name) -> checkpoint
RECIPES: Dict[str, Callable[[Path, Path, Callable[[str], Path]], Path]] = {
    "mrcnn": lambda w, d, base: train_mm(w, MM_DET, d, ITERS["mrcnn"]),
    "mrcnn_cwin": _mrcnn_cwin,
    "upernet": _upernet,
    "upernet_cwin": _upernet_cwin,
    "d2": lambda w, d, base: train_d2(w, d, ITERS["d2"]),
    "d2_cwin": _d2_cwin,
    "retina": _retina,
    "retina_cwin": _retina_cwin,
    "d2_retina": _d2_retina,
    "d2_retina_cwin": _d2_retina_cwin,
    "vt_fpn": _vt_fpn,
    "d2_vt_fpn": _d2_vt_fpn,
}

# one per session, shared by the test modules that import the fixtures (pytest makes a
# separate session fixture for each module that imports it)
_DONE: Dict[str, Path] = {}


def _shared_dir(factory: pytest.TempPathFactory) -> Path:
    """A folder all pytest-xdist workers of this run share (the run's own temp folder without
    xdist), so that each toy model is trained once per run, not once per worker."""
    base = factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the workers' temp folders sit side by side in the run's folder
    folder = base / "toy_models"
    folder.mkdir(exist_ok=True)
    return folder


def _made_once(key: str, factory: pytest.TempPathFactory, make: Callable[[Path], Path]) -> Path:
    """``make(folder)`` run by the first worker that asks (under a file lock); the others
    wait and reuse its result. A failed ``make`` leaves nothing, so the next caller retries."""
    from filelock import FileLock

    if key not in _DONE:
        shared = _shared_dir(factory)
        done = shared / f"{key}.path"
        with FileLock(str(shared / f"{key}.lock")):
            if not done.is_file():
                folder = shared / key
                shutil.rmtree(folder, ignore_errors=True)  # a failed earlier attempt
                folder.mkdir()
                result = make(folder)
                done.write_text(str(result))
            _DONE[key] = Path(done.read_text())
    return _DONE[key]


def shared_toy_root(factory: pytest.TempPathFactory) -> Path:
    """The run's toy dataset (made once)."""
    return _made_once("data", factory, lambda folder: toy_data(folder / "data"))


def trained(name: str, factory: pytest.TempPathFactory) -> Path:
    """The checkpoint of toy model ``name`` (a key of :data:`RECIPES`), trained on first use
    (once per test run, whichever worker asks first)."""
    def make(folder: Path) -> Path:
        data = shared_toy_root(factory)
        return RECIPES[name](folder, data, lambda other: trained(other, factory))

    return _made_once(f"train_{name}", factory, make)


def untrained_checkpoint(path: Path, config: Path, cfg_options: Optional[Dict] = None) -> Path:
    """A randomly initialised model of an OpenMMLab config saved like a trained one (for
    the bad-input tests, where only the tensor names and shapes matter)."""
    from rest_dense.mm.utils import build_model

    cfg = mm_config(config, cfg_options)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights()
    torch.save({"state_dict": model.state_dict(), "meta": {}}, path)
    return path


def mm_config(config: Path, cfg_options: Optional[Dict] = None, data_root: Optional[Path] = None):
    """An OpenMMLab config with overrides, its datasets pointed at ``data_root``."""
    from rest_dense.mm.utils import load_config

    cfg = load_config(str(config), cfg_options)
    if data_root is not None:
        root = str(data_root).rstrip("/") + "/"
        for dl in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
            dl.dataset.data_root = root
        for key in ("val_evaluator", "test_evaluator"):
            if "ann_file" in cfg[key]:
                cfg[key].ann_file = root + "annotations/instances_val.json"
    return cfg


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory) -> Path:
    return shared_toy_root(tmp_path_factory)


@pytest.fixture(scope="session")
def det_ckpt(tmp_path_factory) -> Path:
    """Mask R-CNN, MMDetection toy config, global attention."""
    return trained("mrcnn", tmp_path_factory)


@pytest.fixture(scope="session")
def seg_ckpt(tmp_path_factory) -> Path:
    """UperNet, MMSegmentation toy config, global attention."""
    return trained("upernet", tmp_path_factory)


@pytest.fixture(scope="session")
def d2_ckpt(tmp_path_factory) -> Path:
    """Mask R-CNN, detectron2 toy yaml, global attention."""
    return trained("d2", tmp_path_factory)


def val_images(root: Path, layout: str = "coco") -> Sequence[Path]:
    folder = root / ("val" if layout == "coco" else "images/validation")
    images = sorted(folder.glob("*.png"))
    assert images, f"no toy images under {folder}"
    return images
