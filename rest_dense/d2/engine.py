"""Training / evaluation entry points for detectron2 with the ResT backbones.

* :class:`RestTrainer`: ``DefaultTrainer`` with the papers' optimizer (``SOLVER.OPTIMIZER``,
  per-parameter weight decay, gradient clipping), :class:`RestDetectionCheckpointer` and
  ``COCOEvaluator``; for yacs configs.
* :func:`lazy_train` / :func:`lazy_test`: the same for LazyConfig (python) configs.
* :func:`setup_yaml_config` / :func:`setup_lazy_config`: read a config file plus
  command-line overrides; yaml configs with ``SOLVER.SCALE_SCHEDULE_WITH_MAX_ITER: True`` (the
  toy config) keep their schedule proportionate to an overridden ``SOLVER.MAX_ITER``
  (:func:`scale_yaml_schedule`).
* :class:`BF16Trainer`: bf16 mixed precision, which detectron2 0.5 lacks: the forward runs
  under ``torch.autocast(<device>, dtype=torch.bfloat16)``, without a grad scaler, on the CPU
  too. Chosen by ``SOLVER.AMP.ENABLED: True`` with ``SOLVER.AMP.PRECISION: "bfloat16"``
  (LazyConfig: ``train.amp.enabled=True``, ``train.amp.precision="bfloat16"``); fp16
  (the default precision) keeps detectron2's CUDA-only ``AMPTrainer``.

Nothing is trusted implicitly: checkpoints that need full unpickling load only from paths
given to ``--trust-checkpoint`` (:mod:`rest_dense.safe_load`), also in the run's own output folder.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
import weakref
from typing import Any, Collection, Dict, List, Optional, Sequence, Tuple, Union

import torch
from detectron2.config import CfgNode, LazyConfig, get_cfg, instantiate
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, default_writers, hooks
from detectron2.engine import defaults as _d2_defaults
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, inference_on_dataset, print_csv_format
from detectron2.utils import comm
from omegaconf import DictConfig

from .. import distributed
from ..amp import accelerator_available, parse_precision, resolve_amp, warn_if_bf16_emulated
from ..configs import building_from_config
from ..safe_load import checkpoint_file
from ..utils import check_count, scale_count
from .backbone import check_head_features
from .checkpointer import RestDetectionCheckpointer
from .config import add_rest_config, add_restv2_config
from .solver import build_optimizer

__all__ = ["RestTrainer", "BF16Trainer", "setup_yaml_config", "setup_lazy_config", "lazy_train",
           "lazy_test", "lazy_build_model", "instantiate_model", "is_lazy_config", "default_setup",
           "scale_yaml_schedule", "is_sem_seg_dataset", "sem_seg_train_augmentations"]

logger = logging.getLogger("rest_dense.d2")


def is_lazy_config(path: str) -> bool:
    """Whether ``path`` is a detectron2 LazyConfig (the rule of
    :func:`rest_dense.configs.config_framework`)."""
    from ..configs import config_framework

    return config_framework(path) == "d2-lazy"


def _amp_guard(device: str, enabled: bool, precision: str = "float16") -> bool:
    """Whether AMP stays on: detectron2 0.5's fp16 ``AMPTrainer`` needs CUDA, bf16
    (:class:`BF16Trainer`) a device with bf16 autocast (the CPU, most GPUs); elsewhere the
    recipe's AMP is switched off with a warning (:func:`rest_dense.amp.resolve_amp`, shared
    with the mm adapter)."""
    return resolve_amp(bool(enabled), device, backends=("cuda",), log=logger, precision=precision)


def _model_device_type(model: torch.nn.Module) -> str:
    """``'cpu'``, ``'cuda'``, ...: where the (possibly DDP-wrapped) model's parameters are."""
    for p in model.parameters():
        return p.device.type
    return "cpu"


class BF16Trainer(SimpleTrainer):
    """``SimpleTrainer`` whose forward pass (model and losses) runs under
    ``torch.autocast(<the model's device type>, dtype=torch.bfloat16)``.

    bf16 has fp32's exponent range, so unlike detectron2's fp16 ``AMPTrainer`` there is no
    grad scaler: backward, the optimizer step (with the gradient clipping that
    :func:`rest_dense.d2.solver.build_optimizer` adds) and the checkpointed state are
    ``SimpleTrainer``'s, and parameters, gradients and optimizer state stay fp32. Runs on the
    CPU and on GPUs with bf16 support.

    Args:
        model, data_loader, optimizer: as for ``SimpleTrainer``.
        device_type: autocast device type (default: that of the model's parameters).
    """

    def __init__(self, model: torch.nn.Module, data_loader: Any,
                 optimizer: torch.optim.Optimizer, device_type: Optional[str] = None):
        super().__init__(model, data_loader, optimizer)
        self.precision = torch.bfloat16
        self.device_type = device_type or _model_device_type(model)
        warn_if_bf16_emulated(self.device_type, logger)
        # through detectron2's logger, whose handlers its setup attaches (the training log)
        logging.getLogger("detectron2.rest_dense").info(
            "BF16Trainer: forward passes in bf16 autocast on %s, no grad scaler", self.device_type)

    def run_step(self) -> None:
        """One iteration: data, bf16 forward, fp32 backward and optimizer step."""
        assert self.model.training, "[BF16Trainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        with torch.autocast(self.device_type, dtype=self.precision):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                losses = loss_dict
                loss_dict = {"total_loss": loss_dict}
            else:
                losses = sum(loss_dict.values())

        self.optimizer.zero_grad()
        losses.backward()  # outside autocast: gradients come back in the parameters' fp32
        self._write_metrics(loss_dict, data_time)
        self.optimizer.step()


class _FP16Trainer(AMPTrainer):
    """detectron2's ``AMPTrainer`` that also resumes from a checkpoint without grad-scaler
    state (one of an fp32 or bf16 run): the scaler then starts afresh."""

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if "grad_scaler" in state_dict:
            super().load_state_dict(state_dict)
        else:
            SimpleTrainer.load_state_dict(self, state_dict)


def _inner_trainer(model: torch.nn.Module, data_loader: Any, optimizer: torch.optim.Optimizer,
                   amp: bool, precision: str) -> SimpleTrainer:
    """The loop for the AMP setting: ``SimpleTrainer`` (fp32), detectron2's ``AMPTrainer``
    (fp16) or :class:`BF16Trainer`."""
    if not amp:
        return SimpleTrainer(model, data_loader, optimizer)
    if parse_precision(precision) == "bfloat16":
        return BF16Trainer(model, data_loader, optimizer)
    return _FP16Trainer(model, data_loader, optimizer)


def default_setup(cfg: Union[CfgNode, DictConfig], args: argparse.Namespace) -> None:
    """detectron2's ``default_setup`` (logging, config backup, seeding), tolerant of a
    detectron2 build without its compiled extension, whose environment report would fail."""
    collect = _d2_defaults.collect_env_info

    def _collect_env_info() -> str:
        try:
            return collect()
        except ImportError as e:  # detectron2._C missing
            return f"(environment report unavailable: {e})"

    _d2_defaults.collect_env_info = _collect_env_info
    try:
        _d2_defaults.default_setup(cfg, args)
    finally:
        _d2_defaults.collect_env_info = collect


def scale_yaml_schedule(cfg: CfgNode, max_iter: int,
                        explicit: Collection[str] = ()) -> Dict[str, Tuple[Any, Any]]:
    """Set ``SOLVER.MAX_ITER`` and stretch everything counted in iterations with it.

    With ``r = max_iter / <the config's SOLVER.MAX_ITER>``: ``SOLVER.STEPS`` (lr decay),
    ``SOLVER.WARMUP_ITERS``, ``SOLVER.CHECKPOINT_PERIOD`` and a non-zero ``TEST.EVAL_PERIOD``
    are multiplied by ``r`` and rounded (periods at least 1, steps before the last
    iteration). A short run then warms up,
    decays, saves checkpoints and evaluates like the full one, only sooner. Keys named in
    ``explicit`` keep their value.

    Args:
        cfg: a yacs config, not frozen; modified in place.
        max_iter: the new number of iterations (>= 1).
        explicit: keys the user set explicitly (e.g. ``SOLVER.STEPS`` among the overrides).

    Returns:
        What changed: ``{key: (old, new)}``.

    Raises:
        ValueError: ``max_iter`` or the config's ``SOLVER.MAX_ITER`` is not a count
            (:func:`rest_dense.utils.check_count`).
    """
    max_iter = check_count(max_iter, "SOLVER.MAX_ITER")
    old = check_count(cfg.SOLVER.MAX_ITER, "the config's SOLVER.MAX_ITER")
    ratio = max_iter / float(old)
    changes: Dict[str, Tuple[Any, Any]] = {"SOLVER.MAX_ITER": (old, max_iter)}
    cfg.SOLVER.MAX_ITER = max_iter
    new_values = {
        # fvcore's MultiStepParamScheduler wants milestones in [1, MAX_ITER)
        "SOLVER.STEPS": tuple(sorted({min(scale_count(s, ratio), max_iter - 1)
                                      for s in cfg.SOLVER.STEPS} - {0})),
        "SOLVER.WARMUP_ITERS": scale_count(cfg.SOLVER.WARMUP_ITERS, ratio, minimum=0),
        "SOLVER.CHECKPOINT_PERIOD": scale_count(cfg.SOLVER.CHECKPOINT_PERIOD, ratio),
    }
    if cfg.TEST.EVAL_PERIOD > 0:
        new_values["TEST.EVAL_PERIOD"] = scale_count(cfg.TEST.EVAL_PERIOD, ratio)
    for key, value in new_values.items():
        section, name = key.split(".")
        before = cfg[section][name]
        if key in explicit or before == value:
            continue
        cfg[section][name] = value
        changes[key] = (before, value)
    return changes


def _pop_override(opts: List[str], key: str) -> Tuple[Optional[str], List[str]]:
    """``(value, the other overrides)`` of a flat ``[KEY, VALUE, ...]`` list."""
    value, rest = None, []
    for k, v in zip(opts[0::2], opts[1::2]):
        if k == key:
            value = v
        else:
            rest += [k, v]
    return value, rest


def available_device(device: str, key: str = "MODEL.DEVICE") -> str:
    """``device``, or ``'cpu'`` with a warning when it names an accelerator this machine
    does not have (as the MMDetection / MMSegmentation path does), instead of torch's
    "Found no NVIDIA driver" at the first ``.to()``."""
    kind = str(device).split(":")[0]
    if kind != "cpu" and not accelerator_available(kind):
        logger.warning("%s=%s: no %s device on this machine; running on the CPU instead "
                       "(set %s cpu to silence this)", key, device, kind.upper(), key)
        return "cpu"
    return str(device)


def check_weights_file(weights, key: str) -> None:
    """A local weights file that does not exist, named in one line (detectron2 asserts it
    with a traceback when it loads; URLs and catalog names pass).

    Raises:
        FileNotFoundError: naming ``key`` and the path.
    """
    if weights and isinstance(weights, str):
        checkpoint_file(weights, key, urls=True)


def _check_yaml_file(config_file: str) -> None:
    """A yacs config must be a YAML mapping: name a file that is not (a Python config given
    as yaml, broken syntax, an empty file) instead of yaml's or yacs' traceback.

    Raises:
        ValueError: naming the file and the problem.
    """
    import yaml

    try:
        with open(config_file, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except yaml.constructor.ConstructorError:
        return  # python tags (!!python/tuple): valid for detectron2's loader, which reads them
    except yaml.YAMLError as e:
        raise ValueError(f"{config_file} is not a valid YAML config: "
                         f"{' '.join(str(e).split())}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{config_file} is not a text (YAML) file") from None
    if not isinstance(doc, dict):
        what = "empty" if doc is None else f"a YAML {type(doc).__name__}, not a mapping of keys"
        raise ValueError(f"{config_file} is {what}: a detectron2 yaml config holds keys such "
                         "as MODEL: and SOLVER:")


def setup_yaml_config(config_file: str, opts: Sequence[str] = ()) -> CfgNode:
    """detectron2 defaults + ResT keys + ``config_file`` + ``opts``; AMP is disabled with a
    warning when the device is not CUDA. An overridden ``SOLVER.MAX_ITER`` rescales the
    schedule if the config sets ``SOLVER.SCALE_SCHEDULE_WITH_MAX_ITER``
    (:func:`scale_yaml_schedule`). Returns a frozen config."""
    cfg = get_cfg()
    add_restv2_config(cfg)
    add_rest_config(cfg)
    _check_yaml_file(config_file)
    try:
        with building_from_config(assertions=True):  # yacs refuses unknown keys by assertion
            cfg.merge_from_file(config_file)
    except FileNotFoundError as err:  # the config is there (checked): one of its _BASE_
        missing = getattr(err, "filename", None)
        if not missing:
            raise
        raise FileNotFoundError(f"config {config_file}: the _BASE_ file "
                                f"{os.path.normpath(missing)} does not exist") from None
    opts = list(opts)
    max_iter, others = (None, opts)  # an odd list: merge_from_list reports it
    if len(opts) % 2 == 0:
        max_iter, others = _pop_override(opts, "SOLVER.MAX_ITER")
    with building_from_config(assertions=True):
        cfg.merge_from_list(others)
    if max_iter is not None:
        if cfg.SOLVER.SCALE_SCHEDULE_WITH_MAX_ITER:
            try:
                n = int(str(max_iter))
            except ValueError:
                raise ValueError(f"SOLVER.MAX_ITER must be an integer, got {max_iter!r}") from None
            changes = scale_yaml_schedule(cfg, n, explicit=set(others[0::2]))
            logger.info("schedule scaled to SOLVER.MAX_ITER=%s (SOLVER.SCALE_SCHEDULE_WITH_MAX_"
                        "ITER): %s", max_iter, ", ".join(f"{k} {a}->{b}"
                                                         for k, (a, b) in changes.items()))
        else:
            cfg.merge_from_list(["SOLVER.MAX_ITER", max_iter])
    cfg.MODEL.DEVICE = available_device(cfg.MODEL.DEVICE, "MODEL.DEVICE")
    cfg.SOLVER.AMP.PRECISION = parse_precision(cfg.SOLVER.AMP.PRECISION)  # 'bf16' -> 'bfloat16'
    cfg.SOLVER.AMP.ENABLED = _amp_guard(cfg.MODEL.DEVICE, cfg.SOLVER.AMP.ENABLED,
                                        cfg.SOLVER.AMP.PRECISION)
    cfg.freeze()
    return cfg


#: LazyConfig keys this package reads that detectron2's defaults do not hold (overrides of
#: them are allowed where the config leaves them out)
OPTIONAL_LAZY_KEYS = ("train.amp.precision", "train.device")


def _lazy_call_parameters(node: Any) -> Optional[set]:
    """The argument names a LazyCall node's target takes (``None``: any, through
    ``**kwargs`` or a target that cannot be inspected); an empty set for a plain dict."""
    import inspect

    from omegaconf import DictConfig as _Dict

    if not isinstance(node, _Dict) or "_target_" not in node:
        return set()
    target = node._target_
    if isinstance(target, str):
        try:
            from detectron2.config.instantiate import locate

            target = locate(target)
        except Exception:  # noqa: BLE001  (unresolvable: let detectron2 report it)
            return None
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                 inspect.Parameter.KEYWORD_ONLY)}


def check_lazy_overrides(cfg: DictConfig, opts: Sequence[str]) -> None:
    """Refuse a ``key=value`` override whose key the LazyConfig does not have (detectron2
    would add it, and a misspelt ``train.max_iters=1`` would train the config's own length),
    naming close keys. An argument of a ``LazyCall`` target that the config leaves at its
    default is a key (``model.backbone.bottom_up.drop_path_rate=0.2``); keys starting with
    ``+`` (hydra's "add") are left alone.

    Raises:
        KeyError: the first unknown key.
    """
    import difflib

    from omegaconf import DictConfig as _Dict, OmegaConf

    for item in opts:
        key = str(item).split("=", 1)[0].strip()
        if not key or key.startswith(("+", "~")) or "=" not in str(item) \
                or key in OPTIONAL_LAZY_KEYS:
            continue
        parent, _, last = key.rpartition(".")
        node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
        if isinstance(node, _Dict) and last in node:
            continue
        if node is not None and not isinstance(node, _Dict):
            continue  # a list index or a leaf's attribute: detectron2 reports those
        accepted = _lazy_call_parameters(node)
        if accepted is None or last in accepted:
            continue  # an argument the config leaves at its default (or **kwargs)
        siblings = list(node.keys()) + sorted(accepted) if isinstance(node, _Dict) else []
        close = difflib.get_close_matches(last, [str(k) for k in siblings], n=3)
        where = f"under {parent!r}" if parent else "at the top level"
        prefix = parent + "." if parent else ""
        hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""
        raise KeyError(f"the LazyConfig has no key {key!r} (nothing {where} of that name){hint} "
                       "(prefix it with '+' to add a new key)")


def _lazy_yaml(config_file: str) -> bool:
    """Whether a yaml file is a saved LazyConfig (lower-case ``train`` / ``model`` sections),
    not a yacs config (``MODEL:``, ``SOLVER:``)."""
    import yaml

    try:
        with open(config_file, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return True  # LazyConfig.load names the problem
    return isinstance(doc, dict) and "MODEL" not in doc and ("train" in doc or "model" in doc)


def _load_lazy(config_file: str) -> DictConfig:
    """``LazyConfig.load``; what the config's own code raises while it runs (a typo, a
    division by zero, a relative import of a missing file) is the config's error:
    :class:`~rest_dense.configs.ConfigBuildError` naming the line. A missing package that
    the commands know (detectron2, fvcore, ...) stays an ImportError, which they name with
    its install hint."""
    from ..configs import config_load_error
    from ..utils import missing_package_hint

    try:
        return LazyConfig.load(config_file)
    except ImportError as e:
        if missing_package_hint(e):  # a package of ours that is missing: the command names it
            raise
        raise config_load_error(config_file, e) from e
    except Exception as e:  # noqa: BLE001  the config is Python: anything may come out
        raise config_load_error(config_file, e) from e


def setup_lazy_config(config_file: str, opts: Sequence[str] = ()) -> DictConfig:
    """Load a LazyConfig file and apply ``key=value`` overrides. ``train.amp.precision``
    (``"float16"``, the default, or ``"bfloat16"``) is set, and ``train.amp.enabled`` turned
    off with a warning where the device cannot run that precision."""
    if str(config_file).endswith((".yaml", ".yml")) and not _lazy_yaml(config_file):
        raise ValueError(f"{config_file} is a yacs (yaml) config, not a LazyConfig (a .py file, "
                         "or the config.yaml a LazyConfig run saves); drop --lazy")
    cfg = _load_lazy(config_file)
    check_lazy_overrides(cfg, opts)
    try:
        cfg = LazyConfig.apply_overrides(cfg, list(opts))
    except Exception as e:  # noqa: BLE001  hydra's parser: unbalanced brackets, bad syntax
        if type(e).__name__ != "OverrideParseException":
            raise
        raise ValueError(f"cannot parse the override: {' '.join(str(e).split())}") from None
    cfg.train.device = available_device(cfg.train.get("device", "cuda"), "train.device")
    cfg.train.amp.precision = parse_precision(cfg.train.amp.get("precision", None))
    cfg.train.amp.enabled = _amp_guard(cfg.train.get("device", "cuda"), cfg.train.amp.enabled,
                                       cfg.train.amp.precision)
    return cfg


def _create_ddp_model(model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
    """detectron2's ``create_ddp_model``, for CPU models too: DDP takes no ``device_ids``
    there, and SyncBatchNorm layers (a lazy config's) become BatchNorm, which DDP takes
    (CPU-only jobs run with gloo, see :mod:`rest_dense.distributed`)."""
    if all(p.device.type == "cpu" for p in model.parameters()):
        kwargs.setdefault("device_ids", None)
        model = distributed.revert_sync_batchnorm_on_cpu(model, kwargs)
    return create_ddp_model(model, **kwargs)


def is_sem_seg_dataset(dataset_name: str) -> bool:
    """Whether a registered dataset is evaluated as semantic segmentation
    (``MetadataCatalog`` ``evaluator_type == 'sem_seg'``)."""
    from detectron2.data import MetadataCatalog

    return getattr(MetadataCatalog.get(dataset_name), "evaluator_type", None) == "sem_seg"


def sem_seg_train_augmentations(cfg: CfgNode) -> List[Any]:
    """Training augmentations for semantic segmentation, in mmseg's order: resize the short
    side to one of ``INPUT.MIN_SIZE_TRAIN`` (long side <= ``INPUT.MAX_SIZE_TRAIN``), then, if
    ``INPUT.CROP.ENABLED``, a random crop of ``INPUT.CROP.SIZE`` that no class covers more
    than ``INPUT.CROP.SINGLE_CATEGORY_MAX_AREA`` of (mmseg's ``cat_max_ratio``; pixels of
    ``SEM_SEG_HEAD.IGNORE_VALUE`` not counted), then ``INPUT.RANDOM_FLIP``.
    (detectron2's default mapper crops *before* resizing, which suits detection.)"""
    import detectron2.data.transforms as T

    augs: List[Any] = [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN,
                                            cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING)]
    if cfg.INPUT.CROP.ENABLED:
        augs.append(T.RandomCrop_CategoryAreaConstraint(
            cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE,
            float(cfg.INPUT.CROP.get("SINGLE_CATEGORY_MAX_AREA", 1.0)),
            cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE))
    if cfg.INPUT.RANDOM_FLIP != "none":
        augs.append(T.RandomFlip(horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                                 vertical=cfg.INPUT.RANDOM_FLIP == "vertical"))
    return augs


class RestTrainer(DefaultTrainer):
    """``DefaultTrainer`` for the ResT configs.

    Differences from detectron2's: the optimizer comes from
    :func:`rest_dense.d2.solver.build_optimizer` (AdamW / SGD, no weight decay on norms and
    biases as configured, per-parameter or whole-model gradient clipping), weights are loaded
    by :class:`RestDetectionCheckpointer` (ImageNet, released detectron2 and converted
    checkpoints alike) and saved atomically, evaluation uses ``COCOEvaluator``,
    ``OUTPUT_DIR`` is created if missing (detectron2's writers need it), and checkpoints
    carry the optimizer (and AMP grad scaler) state, so ``--resume`` continues where training
    stopped, from the most recent checkpoint that loads. ``SOLVER.AMP.PRECISION:
    "bfloat16"`` trains AMP with :class:`BF16Trainer` instead of detectron2's ``AMPTrainer``.
    """

    def __init__(self, cfg: CfgNode):
        if cfg.OUTPUT_DIR and comm.is_main_process():
            os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        wrap, amp_trainer = _d2_defaults.create_ddp_model, _d2_defaults.AMPTrainer
        _d2_defaults.create_ddp_model = _create_ddp_model  # CPU (gloo) jobs: no device_ids
        # what DefaultTrainer builds for SOLVER.AMP.ENABLED
        bf16 = parse_precision(cfg.SOLVER.AMP.get("PRECISION", None)) == "bfloat16"
        _d2_defaults.AMPTrainer = BF16Trainer if bf16 else _FP16Trainer
        try:
            super().__init__(cfg)
        finally:
            _d2_defaults.create_ddp_model, _d2_defaults.AMPTrainer = wrap, amp_trainer

    def state_dict(self) -> Dict[str, Any]:
        """Hooks' state plus the inner trainer's (optimizer, AMP grad scaler)."""
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; checkpoints without the inner trainer's state (older
        ones) restore the iteration and hooks only."""
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])

    def train(self) -> Optional[Dict[str, Any]]:
        """Run training; returns the last evaluation results (``None`` if none ran)."""
        ret = super().train()
        return ret if ret is not None else getattr(self, "_last_eval_results", None)

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(cfg, model)

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str,
                        output_folder: Optional[str] = None) -> DatasetEvaluator:
        """``SemSegEvaluator`` for datasets with ``evaluator_type='sem_seg'`` (ADE20K, the
        toy label maps), ``COCOEvaluator`` otherwise."""
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        if is_sem_seg_dataset(dataset_name):
            from detectron2.evaluation import SemSegEvaluator

            return SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder)
        return COCOEvaluator(dataset_name, output_dir=output_folder)

    @classmethod
    def build_lr_scheduler(cls, cfg: CfgNode, optimizer: torch.optim.Optimizer):
        """detectron2's schedulers plus ``"WarmupPolyLR"``: ``(1 - iter / MAX_ITER) **
        SOLVER.POLY_LR_POWER`` (mmseg's ``PolyLR`` to 0) after detectron2's warm-up."""
        if cfg.SOLVER.LR_SCHEDULER_NAME != "WarmupPolyLR":
            return super().build_lr_scheduler(cfg, optimizer)
        from detectron2.solver import LRMultiplier, WarmupParamScheduler
        from fvcore.common.param_scheduler import PolynomialDecayParamScheduler

        sched = WarmupParamScheduler(
            PolynomialDecayParamScheduler(1.0, float(cfg.SOLVER.get("POLY_LR_POWER", 1.0))),
            cfg.SOLVER.WARMUP_FACTOR, min(cfg.SOLVER.WARMUP_ITERS / cfg.SOLVER.MAX_ITER, 1.0),
            cfg.SOLVER.WARMUP_METHOD)
        return LRMultiplier(optimizer, multiplier=sched, max_iter=cfg.SOLVER.MAX_ITER)

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        """detectron2's loader; for ``SemanticSegmentor`` with the semantic-segmentation
        augmentations of :func:`sem_seg_train_augmentations` (resize, then crop)."""
        if cfg.MODEL.META_ARCHITECTURE != "SemanticSegmentor":
            return super().build_train_loader(cfg)
        from detectron2.data import DatasetMapper, build_detection_train_loader

        mapper = DatasetMapper(cfg, is_train=True, augmentations=sem_seg_train_augmentations(cfg))
        return build_detection_train_loader(cfg, mapper=mapper)

    def build_hooks(self):
        # DefaultTrainer.__init__ has just created a plain DetectionCheckpointer; replace it
        # before the checkpointing hook captures it.
        self.checkpointer = RestDetectionCheckpointer(
            self._trainer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        return super().build_hooks()


# ------------------------------------------------------------------------------ LazyConfig
def lazy_test(cfg: DictConfig, model: torch.nn.Module) -> Dict[str, Any]:
    """Evaluate ``model`` on ``cfg.dataloader.test`` with ``cfg.dataloader.evaluator``."""
    if "evaluator" not in cfg.dataloader:
        return {}
    ret = inference_on_dataset(model, instantiate(cfg.dataloader.test),
                               instantiate(cfg.dataloader.evaluator))
    if comm.is_main_process():
        print_csv_format(ret)
    return ret


def instantiate_model(cfg: DictConfig) -> torch.nn.Module:
    """Instantiate a LazyConfig's ``cfg.model`` (on the CPU), refusing heads that read maps
    its backbone does not give (:func:`~rest_dense.d2.backbone.check_head_features`)."""
    model = instantiate(cfg.model)
    backbone = getattr(model, "backbone", None)
    if backbone is not None and hasattr(backbone, "output_shape"):
        check_head_features(backbone, model, "the backbone's in_features (and a VT-FPN's "
                                             "num_outs, an FPN's top_block) set what it gives")
    return model


def lazy_build_model(cfg: DictConfig) -> torch.nn.Module:
    """Instantiate ``cfg.model`` (:func:`instantiate_model`) on ``cfg.train.device``."""
    return instantiate_model(cfg).to(cfg.train.get("device", "cuda"))


def lazy_train(cfg: DictConfig, resume: bool = False,
               resume_from: Optional[str] = None) -> Dict[str, Any]:
    """Train with a LazyConfig (``model``, ``optimizer``, ``dataloader``, ``lr_multiplier``,
    ``train``), with periodic checkpoints and evaluation.

    Args:
        cfg: the config.
        resume: continue from the most recent checkpoint in ``train.output_dir`` that loads
            if there is one (else, with a warning, start from ``train.init_checkpoint``).
        resume_from: continue from this checkpoint file (model, optimizer, iteration);
            overrides ``resume``.

    Returns:
        The last evaluation results.
    """
    with building_from_config(assertions=True):  # a bad value in it: ConfigBuildError
        model = lazy_build_model(cfg)
        logger.info("Model:\n%s", model)
        cfg.optimizer.params.model = model
        optim = instantiate(cfg.optimizer)
        train_loader = instantiate(cfg.dataloader.train)

    model = _create_ddp_model(model, **cfg.train.ddp)
    trainer = _inner_trainer(model, train_loader, optim, bool(cfg.train.amp.enabled),
                             cfg.train.amp.get("precision", "float16"))
    checkpointer = RestDetectionCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    results: Dict[str, Any] = {}

    def _test():
        results.clear()
        results.update(lazy_test(cfg, model))
        return results

    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
        if comm.is_main_process() else None,
        hooks.EvalHook(cfg.train.eval_period, _test),
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter),
                             period=cfg.train.log_period) if comm.is_main_process() else None,
    ])
    if resume_from:
        checkpointer.load_to_resume(resume_from)
        start_iter = trainer.iter + 1
    else:
        if not (resume and checkpointer.has_checkpoint()):
            check_weights_file(cfg.train.init_checkpoint, "train.init_checkpoint")
        if not resume:
            checkpointer.warn_if_earlier_run()
        checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
        start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)
    return dict(results)
