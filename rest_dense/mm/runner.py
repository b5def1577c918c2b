"""Train and test MMDetection / MMSegmentation configs with mmengine's ``Runner``.

What ``rest-dense train`` / ``rest-dense test`` (and ``tools/train.py`` / ``tools/test.py``)
run for OpenMMLab configs. The framework is taken from the config's ``default_scope`` (or,
failing that, from the registry that knows ``model.type``); ``rest_dense.mm`` is imported
before anything is built, so configs need no ``custom_imports``.

Checkpoints are read under :mod:`rest_dense.safe_load`'s policy: ``weights_only=True`` with an
allow-list that covers mmengine's training checkpoints; full unpickling only for the paths
passed as ``trust`` (``--trust-checkpoint``), never implicitly.

Training survives being killed: checkpoints are written atomically and the oldest one of
``max_keep_ckpts`` is removed only after the new one is complete
(:class:`rest_dense.mm.run_files.AtomicCheckpointHook`), and ``resume=True`` continues from
the most recent checkpoint of the work dir that loads
(:func:`rest_dense.mm.run_files.find_resume_checkpoint`). Configs that set
``scale_schedule_with_max_iters = True`` (the toy configs) stretch their schedule with an
overridden ``train_cfg.max_iters`` (:func:`rest_dense.mm.schedule.scale_schedule`).

Example::

    from rest_dense.mm import runner

    model = runner.train("mask_rcnn/mask-rcnn_restv2-t_fpn_amp-ms-1x_coco.py",
                         work_dir="work_dirs/mrcnn_t", cfg_options=["train_dataloader.batch_size=1"])
    metrics = runner.test("mask_rcnn/mask-rcnn_restv2-t_fpn_amp-ms-1x_coco.py",
                          "work_dirs/mrcnn_t/epoch_12.pth")
"""
from __future__ import annotations

import copy
import logging
import os
import os.path as osp
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

from mmengine.config import Config
from mmengine.logging import print_log
from mmengine.registry import RUNNERS
from mmengine.runner import Runner
from mmengine.runner.checkpoint import CheckpointLoader
from torch import nn

from ..configs import building_from_config, get_config_path, parse_cfg_options
from ..models import CheckpointMismatchError
from ..run_files import ResumeError
from ..utils import check_count
from ..safe_load import checkpoint_file
from .run_files import find_resume_checkpoint, make_checkpoint_hooks_atomic
from .schedule import SCALE_SCHEDULE_KEY, scale_schedule
from ..distributed import setup_mm_distributed
from .necks import check_neck_levels
from .optim import amp_unavailable_fallback, bf16_wrapper_defaults, set_mixed_precision
from .safe_load import install_checkpoint_loader, trust_checkpoints
from .utils import (check_neck_channels, default_work_dir, detect_framework, set_toy_root,
                    install_config_format_cache, load_config, wrap_for_tta)

__all__ = ["LAUNCHERS", "parse_cfg_options", "check_train_loop", "resolve_config", "train_config", "test_config",
           "enable_visualization", "build_runner", "train", "test", "check_test_checkpoint",
           "check_start_checkpoint", "check_resume_optimizer", "check_same_start"]

PathLike = Union[str, "os.PathLike[str]"]
ConfigLike = Union[PathLike, Config]
CfgOptions = Union[Mapping[str, Any], Sequence[str], None]

#: job launchers mmengine's Runner accepts
LAUNCHERS = ("none", "pytorch", "slurm", "mpi")


# parse_cfg_options (imported above) is rest_dense.configs.parse_cfg_options: one parser, with
# mmengine DictAction's rules, for every command


def check_train_loop(cfg: Config, minimum_length: int = 1) -> None:
    """Refuse a ``train_cfg`` whose counts are not whole numbers (``max_iters=2.5`` would
    train 2 iterations) or are below 1, naming the key.

    Args:
        cfg: a loaded config.
        minimum_length: the smallest ``max_iters`` / ``max_epochs`` accepted.

    Raises:
        ValueError: ``train_cfg.max_iters``, ``max_epochs``, ``val_interval`` or ``val_begin``
            that is a float, a bool, text, or too small.
    """
    train_cfg = cfg.get("train_cfg")
    if not train_cfg or not hasattr(train_cfg, "get"):
        return
    for key, minimum in (("max_iters", minimum_length), ("max_epochs", minimum_length),
                         ("val_interval", 1), ("val_begin", 0)):
        if train_cfg.get(key) is not None:
            check_count(train_cfg[key], f"train_cfg.{key}", minimum)


def resolve_config(config: ConfigLike) -> Union[str, Config]:
    """A config file path or shipped config name -> absolute path; a ``Config`` unchanged.

    Raises:
        FileNotFoundError: neither a file nor a shipped config (close names suggested).
    """
    if isinstance(config, Config):
        return config
    return get_config_path(os.fspath(config))


def _load(config: ConfigLike, cfg_options: CfgOptions) -> Config:
    options = parse_cfg_options(cfg_options)
    given = "train_cfg.max_iters" in options
    max_iters = options.pop("train_cfg.max_iters", None)
    if given:  # checked before the schedule is scaled to it (None too: never dropped)
        max_iters = check_count(max_iters, "train_cfg.max_iters")
    resolved = resolve_config(config)
    if isinstance(resolved, Config):
        import rest_dense.mm  # noqa: F401  (registers the backbones)

        cfg = copy.deepcopy(resolved)
        if options:
            cfg.merge_from_dict(options)
        cfg.default_scope = detect_framework(cfg)  # config_framework, OpenMMLab only
    else:
        cfg = load_config(resolved, options)
    if max_iters is not None:
        if cfg.get(SCALE_SCHEDULE_KEY):
            changes = scale_schedule(cfg, max_iters, explicit=options)
            print_log("rest_dense: schedule scaled to train_cfg.max_iters=%s (%s): %s" % (
                max_iters, SCALE_SCHEDULE_KEY, ", ".join(
                    f"{k} {a}->{b}" for k, (a, b) in changes.items())), logger="current")
        else:
            cfg.merge_from_dict({"train_cfg.max_iters": max_iters})
    return cfg


def _set_work_dir(cfg: Config, config: ConfigLike, work_dir: Optional[PathLike]) -> None:
    if work_dir is not None:
        cfg.work_dir = os.fspath(work_dir)
    elif cfg.get("work_dir") is None:
        name = config.filename if isinstance(config, Config) else os.fspath(config)
        cfg.work_dir = default_work_dir(name or "config")


def _check_local_file(path: Optional[PathLike], what: str) -> None:
    if path is None:
        return
    try:
        checkpoint_file(path, what, urls=True)
    except IsADirectoryError as err:
        if not what.startswith("resume"):
            raise
        raise type(err)(err.errno, f"{err.strerror} (--resume without a value resumes from "
                        "the newest checkpoint of the --work-dir)", err.filename) from None


def train_config(config: ConfigLike, work_dir: Optional[PathLike] = None,
                 amp: Union[bool, str] = False,
                 resume: Union[bool, str, PathLike, None] = None, cfg_options: CfgOptions = None,
                 launcher: str = "none", auto_scale_lr: bool = False,
                 trust: Iterable[PathLike] = (), toy_root: Optional[PathLike] = None) -> Config:
    """The training config as :func:`train` runs it, with the trusted paths registered.

    Args:
        config: config file, shipped config name (``rest-dense configs``) or ``Config``.
        work_dir: where logs and checkpoints go (default: the config's ``work_dir``, else
            ``./work_dirs/<config name>``).
        amp: mixed precision (:func:`rest_dense.mm.optim.set_mixed_precision`): ``True``
            or ``'float16'``: ``AmpOptimWrapper`` (dynamic loss scale; without an
            accelerator, AMP configs fall back to fp32 with a warning); ``'bfloat16'``:
            ``BF16OptimWrapper`` (bf16 autocast, no loss scaling, CPU and GPU).
        resume: ``True`` / ``'auto'``: continue from the most recent checkpoint in
            ``work_dir`` that loads (:func:`~rest_dense.mm.run_files.
            find_resume_checkpoint`; with none there, a warning says so and training starts
            afresh); a path: continue from that checkpoint; ``None`` / ``False``: start
            afresh.
        cfg_options: overrides, see :func:`parse_cfg_options`.
        launcher: ``'none'``, ``'pytorch'``, ``'slurm'`` or ``'mpi'``.
        auto_scale_lr: scale the lr by total batch size / ``auto_scale_lr.base_batch_size``.
        trust: checkpoints (or folders) of the user's own that may be unpickled in full if
            ``weights_only=True`` and the allow-list refuse them (``--trust-checkpoint``).
            Nothing else is: not the work dir, not the ``resume`` file.
        toy_root: the toy dataset's folder, for the paths of a config under ``data/toy/``
            (the shipped toy configs'; :func:`rest_dense.mm.utils.set_toy_root`).

    Returns:
        The config (``work_dir``, ``resume`` / ``load_from``, optimizer wrapper set).

    Raises:
        ValueError: unknown launcher.
        FileNotFoundError: the config or the ``resume`` file does not exist.
        KeyError: ``auto_scale_lr`` without ``auto_scale_lr.base_batch_size`` in the config.
        ResumeError: ``resume=True`` and the work dir holds checkpoints, none of them readable.
        UntrustedCheckpointError: ``resume=True`` and the newest checkpoint of the work dir
            needs full unpickling but is not among ``trust``.
    """
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher {launcher!r} is not one of {', '.join(LAUNCHERS)}")
    resume_file = None
    if resume not in (None, False, True, "auto"):
        resume_file = os.fspath(resume)
        _check_local_file(resume_file, "resume checkpoint")
    cfg = _load(config, cfg_options)
    if toy_root is not None:
        set_toy_root(cfg, toy_root)
    check_train_loop(cfg)
    cfg.launcher = launcher
    _set_work_dir(cfg, config, work_dir)

    if amp:
        set_mixed_precision(cfg, amp)
    bf16_wrapper_defaults(cfg)  # also a config that names the wrapper itself
    if amp_unavailable_fallback(cfg):
        print_log("rest_dense: no GPU found; mixed precision (AmpOptimWrapper) needs one, "
                  "training in fp32 with OptimWrapper instead", logger="current")

    if auto_scale_lr:
        scale = cfg.get("auto_scale_lr") or {}
        if "base_batch_size" not in scale:
            raise KeyError("auto_scale_lr (--auto-scale-lr) needs auto_scale_lr.base_batch_size "
                           "in the config")
        cfg.auto_scale_lr.enable = True

    # only the paths the user named as their own may be unpickled in full
    trust_checkpoints(*trust)
    if resume_file is not None:
        cfg.resume, cfg.load_from = True, resume_file
    elif resume in (True, "auto"):
        found = find_resume_checkpoint(cfg.work_dir)
        if found is None:
            print_log(f"rest_dense: --resume: no checkpoint in {osp.abspath(cfg.work_dir)} to "
                      "resume from; starting from scratch", logger="current",
                      level=logging.WARNING)
            cfg.resume = False
        else:
            print_log(f"rest_dense: resuming from {found}", logger="current")
            cfg.resume, cfg.load_from = True, found
    return cfg


def enable_visualization(cfg: Config, show_dir: Optional[PathLike] = None, show: bool = False,
                         wait_time: float = 2.0) -> Config:
    """Turn on the config's visualization hook (``--show`` / ``--show-dir``).

    Args:
        cfg: a loaded config with ``default_scope`` set; modified in place.
        show_dir: save painted predictions here (mmdet: inside the run's folder in the work
            dir; mmseg: as given).
        show: display them in a window.
        wait_time: seconds each image is shown.

    Returns:
        ``cfg``.

    Raises:
        KeyError: the config has no ``default_hooks.visualization``.
    """
    hooks = cfg.get("default_hooks") or {}
    if "visualization" not in hooks:
        raise KeyError("--show/--show-dir need a `visualization` entry in default_hooks")
    hook = hooks["visualization"]
    hook["draw"] = True
    if show:
        hook["show"] = True
        hook["wait_time"] = wait_time
    if show_dir:
        if cfg.default_scope == "mmdet":
            hook["test_out_dir"] = os.fspath(show_dir)  # mmdet paints every test image there
        else:
            cfg.visualizer["save_dir"] = os.fspath(show_dir)
            hook["interval"] = 1  # mmseg paints every `interval`-th image only
    return cfg


def test_config(config: ConfigLike, checkpoint: PathLike, work_dir: Optional[PathLike] = None,
                trust: Iterable[PathLike] = (), tta: bool = False,
                show_dir: Optional[PathLike] = None, show: bool = False, wait_time: float = 2.0,
                cfg_options: CfgOptions = None, launcher: str = "none",
                toy_root: Optional[PathLike] = None) -> Config:
    """The test config as :func:`test` runs it (``load_from`` set, the ``trust`` paths
    registered). Arguments as in :func:`test`; ``toy_root`` as in :func:`train_config`."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher {launcher!r} is not one of {', '.join(LAUNCHERS)}")
    checkpoint = os.fspath(checkpoint)
    _check_local_file(checkpoint, "checkpoint")
    cfg = _load(config, cfg_options)
    if toy_root is not None:
        set_toy_root(cfg, toy_root)
    cfg.launcher = launcher
    _set_work_dir(cfg, config, work_dir)
    cfg.load_from = checkpoint
    trust_checkpoints(*trust)
    if show or show_dir:
        enable_visualization(cfg, show_dir, show, wait_time)
    if tta:
        wrap_for_tta(cfg)
    return cfg


def build_runner(cfg: Config) -> Runner:
    """The config's runner (``runner_type`` if given, else mmengine's ``Runner``), its
    ``CheckpointHook`` made crash-safe (:class:`~rest_dense.mm.run_files.
    AtomicCheckpointHook`) and the config's yapf formatting done once
    (:func:`~rest_dense.mm.utils.install_config_format_cache`).

    The visualizer is named after the run (mmengine's default) rather than the shipped
    configs' fixed ``'visualizer'``: mmengine keeps one visualizer per name and process, so
    with a fixed name a second run in the same process (train, then test) would write its
    logs and pictures into the first run's folder.

    Distributed runs without CUDA use gloo, DDP without device ids and BN for SyncBN
    (:func:`rest_dense.distributed.setup_mm_distributed`); on GPUs nothing changes.

    Raises:
        rest_dense.configs.ConfigBuildError: a value of the config that the model or the
            runner refuses.
    """
    install_checkpoint_loader()
    install_config_format_cache()  # mmengine formats the config anew for every checkpoint
    for change in setup_mm_distributed(cfg):
        print_log(f"rest_dense: {change}", logger="current")
    vis = cfg.get("visualizer")
    if isinstance(vis, dict) and vis.get("name") == "visualizer":
        vis.pop("name")
    with building_from_config(assertions=True):  # a bad value in it: ConfigBuildError
        runner = Runner.from_cfg(cfg) if "runner_type" not in cfg else RUNNERS.build(cfg)
        check_neck_channels(runner.model)  # a named error, not a conv shape error mid-run
        check_neck_levels(runner.model)  # neck.num_outs the heads cannot use: named
    make_checkpoint_hooks_atomic(runner)  # crash-safe saves, see rest_dense.mm.run_files
    return runner


def _scheduler_configs(cfg: Any) -> Iterator[Mapping]:
    """The scheduler dicts of a ``param_scheduler`` value: one dict, a list of them, or a
    dict of those per optimizer (mmengine's three forms)."""
    if isinstance(cfg, Mapping) and "type" not in cfg:
        for value in cfg.values():
            yield from _scheduler_configs(value)
    elif isinstance(cfg, (list, tuple)):
        for value in cfg:
            yield from _scheduler_configs(value)
    elif isinstance(cfg, Mapping):
        yield cfg


def _check_scheduler_types(cfg: Any) -> None:
    """Refuse an unknown parameter scheduler type now; the schedulers themselves are built
    inside ``train()`` (after ``auto_scale_lr`` sets the learning rate), too late for the
    one-line rule."""
    from mmengine.registry import PARAM_SCHEDULERS

    for scheduler in _scheduler_configs(cfg):
        name = scheduler.get("type")
        if not isinstance(name, str):
            continue
        with PARAM_SCHEDULERS.switch_scope_and_registry(None) as registry:
            if registry.get(name) is None:
                raise KeyError(f"param_scheduler type {name!r} is not in the {registry.scope} "
                               f"parameter scheduler registry")


def build_loops(runner: Runner, mode: str) -> None:
    """Build now what :meth:`Runner.train` / :meth:`Runner.test` would build first from the
    config, under the one-line rule (:class:`~rest_dense.configs.ConfigBuildError`): a bad
    value there (``lr=-1``, ``batch_size=0``, an unknown optimizer, dataset, metric or
    evaluator type) stops the command before anything runs, not as a traceback from inside
    the loop. The runner takes them as built.

    ``'train'``: the training loop with its dataloader, the optimizer wrapper and the
    validation loop (the parameter schedulers stay to ``train()``: they must be built after
    ``auto_scale_lr`` has set the learning rate; their types are checked now).
    ``'test'``: the test loop.
    """
    from mmengine.optim import OptimWrapper

    with building_from_config(assertions=True):
        if mode == "train":
            _check_scheduler_types(runner.param_schedulers)
            if runner._train_loop is not None:
                runner._train_loop = runner.build_train_loop(runner._train_loop)
            if not isinstance(runner.optim_wrapper, OptimWrapper) and runner.optim_wrapper:
                runner.optim_wrapper = runner.build_optim_wrapper(runner.optim_wrapper)
            if runner._val_loop is not None:
                runner._val_loop = runner.build_val_loop(runner._val_loop)
        elif mode == "test":
            if runner._test_loop is not None:
                runner._test_loop = runner.build_test_loop(runner._test_loop)
        else:
            raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")


def train(config: ConfigLike, work_dir: Optional[PathLike] = None, amp: Union[bool, str] = False,
          resume: Union[bool, str, PathLike, None] = None, cfg_options: CfgOptions = None,
          launcher: str = "none", auto_scale_lr: bool = False,
          trust: Iterable[PathLike] = ()) -> nn.Module:
    """Train a config with mmengine's runner.

    Arguments as in :func:`train_config`.

    Returns:
        The trained model.
    """
    cfg = train_config(config, work_dir=work_dir, amp=amp, resume=resume,
                       cfg_options=cfg_options, launcher=launcher, auto_scale_lr=auto_scale_lr,
                       trust=trust)
    runner = build_runner(cfg)
    check_same_start(cfg)
    check_start_checkpoint(runner.model, cfg)
    check_resume_optimizer(runner, cfg)
    return runner.train()


def test(config: ConfigLike, checkpoint: PathLike, work_dir: Optional[PathLike] = None,
         trust: Iterable[PathLike] = (), tta: bool = False, show_dir: Optional[PathLike] = None,
         show: bool = False, wait_time: float = 2.0, cfg_options: CfgOptions = None,
         launcher: str = "none") -> Dict[str, Any]:
    """Evaluate a checkpoint on the config's test set.

    Args:
        config: config file, shipped config name or ``Config``.
        checkpoint: checkpoint file (or URL) to evaluate.
        work_dir: where logs (and mmdet's ``show_dir``) go (default as in :func:`train`).
        trust: checkpoints (or folders) of the user's own that may be unpickled in full if
            ``weights_only=True`` and the allow-list refuse them (``--trust-checkpoint``);
            ``checkpoint`` itself is not trusted unless listed.
        tta: test-time augmentation from the config's ``tta_model`` / ``tta_pipeline``.
        show_dir: save painted predictions, see :func:`enable_visualization`.
        show: display painted predictions.
        wait_time: seconds each image is shown with ``show``.
        cfg_options: overrides, see :func:`parse_cfg_options`.
        launcher: ``'none'``, ``'pytorch'``, ``'slurm'`` or ``'mpi'``.

    Returns:
        The metrics (e.g. ``{'coco/bbox_mAP': ..., ...}`` or ``{'mIoU': ..., ...}``).
    """
    cfg = test_config(config, checkpoint, work_dir=work_dir, trust=trust, tta=tta,
                      show_dir=show_dir, show=show, wait_time=wait_time, cfg_options=cfg_options,
                      launcher=launcher)
    runner = build_runner(cfg)
    check_test_checkpoint(runner.model, cfg.load_from)
    return runner.test()


def check_test_checkpoint(model: nn.Module, checkpoint: str) -> None:
    """Refuse to evaluate ``checkpoint`` unless it covers the whole ``model``.

    mmengine loads test checkpoints non-strictly and only logs what did not fit, so a
    checkpoint of another model (or another backbone variant) would be scored with
    randomly initialised layers. The file is read the way the runner reads it (trust
    policy included).

    Raises:
        CheckpointMismatchError: the checkpoint matches no entry of the model, holds another
            backbone, or leaves entries of the model missing (names them).
    """
    _check_whole_model(model, checkpoint, complete=True)


def _check_whole_model(model: nn.Module, checkpoint: str, complete: bool,
                       purpose: str = "") -> Any:
    """Read ``checkpoint`` with the loader mmengine then uses (local files:
    :func:`rest_dense.checkpoint_reader.read_model_checkpoint`, the same normalised state
    dict) and check it against ``model``."""
    from ..checkpoint_reader import check_checkpoint, normalize_model_checkpoint

    install_checkpoint_loader()
    data = CheckpointLoader.load_checkpoint(checkpoint, map_location="cpu")
    ckpt = normalize_model_checkpoint(data, source=f"checkpoint {checkpoint!r}")
    check_checkpoint(model, ckpt, complete=complete, expect="mmengine", purpose=purpose)
    return data


def check_start_checkpoint(model: nn.Module, cfg: Config) -> None:
    """Before training: the ``--resume`` file must be a checkpoint of this very model (every
    entry, same shapes; not mmengine's later "different number of parameter groups"), and a
    ``load_from`` file must hold this model's ResT backbone (another variant is refused).

    Raises:
        CheckpointMismatchError: naming the real cause (other model, other framework's
            layout, a wrapper's key prefix).
    """
    path = cfg.get("load_from")
    if not path:
        return
    resume = bool(cfg.get("resume"))
    data = _check_whole_model(model, os.fspath(path), complete=resume,
                              purpose="--resume" if resume else "load_from")
    meta = data.get("meta") if isinstance(data, Mapping) else None
    if resume and not (isinstance(meta, Mapping) and ("iter" in meta or "epoch" in meta)):
        # mmengine's resume reads meta['iter'] / ['epoch']: a KeyError after the build
        raise ResumeError(
            f"--resume {path}: not an MMEngine training checkpoint (no iteration count in "
            "its 'meta'); resuming needs one written by training (iter_*.pth / epoch_*.pth). "
            f"To start from its weights, set load_from={path!r} instead")
    done = meta.get("iter") if resume and isinstance(meta, Mapping) else None
    total = (cfg.get("train_cfg") or {}).get("max_iters")
    if isinstance(done, int) and isinstance(total, int) and done >= total:
        print_log(f"rest_dense: --resume {path}: the checkpoint is at iteration {done} and "
                  f"train_cfg.max_iters is {total}: nothing is left to train (raise "
                  "train_cfg.max_iters to train on)", logger="current", level=logging.WARNING)
    if resume and isinstance(data, Mapping):
        changed = scheduler_changes(data.get("param_schedulers"), cfg.get("param_scheduler"))
        if changed:
            print_log(f"rest_dense: --resume {path}: the learning-rate schedule goes on as the "
                      f"checkpoint saved it, not as this config sets it ({'; '.join(changed)}): "
                      "mmengine restores the saved schedulers whole. To train on the new "
                      "schedule, start from the weights (load_from) instead",
                      logger="current", level=logging.WARNING)


#: the settings of a parameter scheduler that place it in the run
_SCHEDULE_KEYS = ("begin", "end", "T_max", "milestones", "total_iters", "power", "eta_min",
                  "step_size", "gamma")


def scheduler_changes(saved: Any, configured: Any) -> List[str]:
    """Where a checkpoint's parameter schedulers differ from the config's
    ``param_scheduler`` (``'param_scheduler[1].end: 2 saved, 4 configured'``). Only
    schedulers counted in the same unit are compared (iteration-based ones, or epoch-based
    ones not converted to iterations); an empty list when nothing differs or the two cannot
    be matched one to one."""
    if isinstance(configured, Mapping):
        configured = [configured]
    if not isinstance(saved, list) or not isinstance(configured, (list, tuple)) \
            or len(saved) != len(configured):
        return []
    changes = []
    for i, (state, conf) in enumerate(zip(saved, configured)):
        if not isinstance(state, Mapping) or not isinstance(conf, Mapping) \
                or (conf.get("by_epoch", True) and conf.get("convert_to_iter_based")):
            continue
        for key in _SCHEDULE_KEYS:
            if key in conf and key in state:
                want = list(conf[key]) if isinstance(conf[key], (list, tuple)) else conf[key]
                have = list(state[key]) if isinstance(state[key], (list, tuple)) else state[key]
                if want != have:
                    changes.append(f"param_scheduler[{i}].{key}: {have} saved, {want} configured")
    return changes


def check_same_start(cfg: Config) -> None:
    """In a distributed run (after the runner joined the process group): every process must
    start from the same checkpoint. ``--resume`` without a file looks in each machine's own
    work dir; where it is not on a file system every machine sees, machine 0 would resume
    while the others start from scratch (their weights never synchronised again: DDP
    broadcasts them once, before resuming) and the run dies later with a peer's "connection
    closed". A collective: every process calls it.

    Raises:
        CheckpointMismatchError: naming what each rank would start from.
    """
    from mmengine.dist import all_gather_object, get_rank, get_world_size

    if get_world_size() < 2:
        return
    path = cfg.get("load_from")
    mine = None
    if path:
        path = os.fspath(path)
        size = osp.getsize(path) if osp.isfile(path) else None
        mine = (bool(cfg.get("resume")), osp.basename(path), size)
    gathered = all_gather_object((mine, osp.abspath(cfg.work_dir)))
    starts = [g[0] for g in gathered]
    if all(s == starts[0] for s in starts):
        return

    def _what(s: Any, work: str) -> str:
        if s is None:
            return f"nothing (no checkpoint in its work dir {work})"
        return f"{'resume' if s[0] else 'load_from'} {s[1]} ({s[2]} bytes)"

    listing = "; ".join(f"rank {r}: {_what(s, w)}" for r, (s, w) in enumerate(gathered))
    raise CheckpointMismatchError(
        f"rank {get_rank()}: the processes of this run would start from different "
        f"checkpoints ({listing}): --resume without a file looks in each machine's own work "
        "dir, so put the work dir on a file system that every machine sees, or give every "
        "machine the same checkpoint file (--resume FILE)")


def _group_sizes(state: Any) -> Optional[List[int]]:
    """The sizes of an optimizer state dict's parameter groups (``None``: no such entry)."""
    groups = state.get("param_groups") if isinstance(state, Mapping) else None
    if not isinstance(groups, (list, tuple)):
        return None
    return [len(g.get("params", ())) if isinstance(g, Mapping) else -1 for g in groups]


def check_resume_optimizer(runner: Runner, cfg: Config) -> None:
    """Before ``--resume``: the optimizer this run builds must have the parameter groups
    that the checkpoint's optimizer state holds (their number and sizes), else mmengine
    stops in the middle of resuming with torch's bare "different number of parameter
    groups". The same model with another ``paramwise_cfg`` (the lr-decay constructor on or
    off, other ``num_layers`` / ``custom_keys`` / decay multipliers) groups the parameters
    differently.

    Builds the optimizer wrapper the way :meth:`mmengine.runner.Runner.train` does and
    leaves it on the runner (``train`` takes a built one as it is).

    Raises:
        CheckpointMismatchError: naming both counts, ``paramwise_cfg`` and ``load_from``.
    """
    from ..checkpoint_reader import normalize_model_checkpoint

    path = cfg.get("load_from")
    if not (path and cfg.get("resume")):
        return
    data = CheckpointLoader.load_checkpoint(os.fspath(path), map_location="cpu")
    saved = _group_sizes(normalize_model_checkpoint(
        data, source=f"checkpoint {path!r}").extra.get("optimizer"))
    if saved is None:
        return  # no optimizer state (mmengine resumes without one) or several wrappers
    from mmengine.optim import OptimWrapper

    if not isinstance(runner.optim_wrapper, OptimWrapper):
        runner.optim_wrapper = runner.build_optim_wrapper(runner.optim_wrapper)
    optimizer = getattr(runner.optim_wrapper, "optimizer", None)
    own = _group_sizes(optimizer.state_dict()) if optimizer is not None else None
    if own is None or own == saved:
        return
    how = (f"{len(own)} vs {len(saved)}" if len(own) != len(saved) else
           f"the same number ({len(own)}), but of other sizes")
    constructor = (cfg.get("optim_wrapper") or {}).get("constructor") or \
        "DefaultOptimWrapperConstructor"
    raise CheckpointMismatchError(
        f"--resume: the optimizer's parameter groups differ from the checkpoint's: {how} "
        f"(this run: {len(own)} groups of {sum(own)} tensors, built by {constructor} with "
        f"optim_wrapper.paramwise_cfg={dict((cfg.get('optim_wrapper') or {}).get('paramwise_cfg') or {})}; "
        f"checkpoint {path!r}: {len(saved)} groups of {sum(saved)} tensors). The model fits, "
        "but the optimizer is set up differently from the run that wrote the file (the lr-"
        "decay constructor on or off, another paramwise_cfg: num_layers, decay_rate, "
        "custom_keys, decay multipliers): resume with that run's optim_wrapper, or start a new "
        "schedule from these weights with load_from=FILE instead of --resume")


# not pytest tests when imported into a test module
test.__test__ = False  # type: ignore[attr-defined]
test_config.__test__ = False  # type: ignore[attr-defined]
check_test_checkpoint.__test__ = False  # type: ignore[attr-defined]
