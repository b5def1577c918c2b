"""Training / evaluation entry points for detectron2 with the ResT backbones.

* :class:`RestTrainer`: ``DefaultTrainer`` with the papers' optimizer (``SOLVER.OPTIMIZER``,
  per-parameter weight decay, gradient clipping), :class:`RestDetectionCheckpointer` and
  ``COCOEvaluator``; for yacs configs.
* :func:`lazy_train` / :func:`lazy_test`: the same for LazyConfig (python) configs.
* :func:`setup_yaml_config` / :func:`setup_lazy_config`: read a config file plus
  command-line overrides.
"""
from __future__ import annotations

import argparse
import logging
import os
import weakref
from typing import Any, Dict, Optional, Sequence, Union

import torch
from detectron2.config import CfgNode, LazyConfig, get_cfg, instantiate
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, default_writers, hooks
from detectron2.engine import defaults as _d2_defaults
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, inference_on_dataset, print_csv_format
from detectron2.utils import comm
from omegaconf import DictConfig

from ..amp import resolve_amp
from ..trust import trust
from .checkpoint import RestDetectionCheckpointer
from .config import add_rest_config, add_restv2_config
from .solver import build_optimizer

__all__ = ["RestTrainer", "setup_yaml_config", "setup_lazy_config", "lazy_train", "lazy_test",
           "lazy_build_model", "is_lazy_config", "default_setup"]

logger = logging.getLogger("rest_dense.d2")


def is_lazy_config(path: str) -> bool:
    """LazyConfig files are python; yacs ones are yaml."""
    return path.endswith(".py")


def _amp_guard(device: str, enabled: bool) -> bool:
    """detectron2 0.5's ``AMPTrainer`` needs CUDA: elsewhere the recipe's AMP is switched
    off with a warning (:func:`rest_dense.amp.resolve_amp`, shared with the mm adapter)."""
    return resolve_amp(bool(enabled), device, backends=("cuda",), log=logger)


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


def setup_yaml_config(config_file: str, opts: Sequence[str] = ()) -> CfgNode:
    """detectron2 defaults + ResT keys + ``config_file`` + ``opts``; AMP is disabled with a
    warning when the device is not CUDA. Returns a frozen config."""
    cfg = get_cfg()
    add_restv2_config(cfg)
    add_rest_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.SOLVER.AMP.ENABLED = _amp_guard(cfg.MODEL.DEVICE, cfg.SOLVER.AMP.ENABLED)
    cfg.freeze()
    return cfg


def setup_lazy_config(config_file: str, opts: Sequence[str] = ()) -> DictConfig:
    """Load a LazyConfig file and apply ``key=value`` overrides."""
    cfg = LazyConfig.load(config_file)
    cfg = LazyConfig.apply_overrides(cfg, list(opts))
    cfg.train.amp.enabled = _amp_guard(cfg.train.get("device", "cuda"), cfg.train.amp.enabled)
    return cfg


def _create_ddp_model(model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
    """detectron2's ``create_ddp_model``, for CPU models too: DDP takes no ``device_ids``
    there (CPU-only jobs run with gloo, see :mod:`rest_dense.distributed`)."""
    if all(p.device.type == "cpu" for p in model.parameters()):
        kwargs.setdefault("device_ids", None)
    return create_ddp_model(model, **kwargs)


class RestTrainer(DefaultTrainer):
    """``DefaultTrainer`` for the ResT configs.

    Differences from detectron2's: the optimizer comes from
    :func:`rest_dense.d2.solver.build_optimizer` (AdamW / SGD, no weight decay on norms and
    biases as configured, per-parameter or whole-model gradient clipping), weights are loaded
    by :class:`RestDetectionCheckpointer` (ImageNet, released detectron2 and converted
    checkpoints alike), evaluation uses ``COCOEvaluator``, ``OUTPUT_DIR`` is created if
    missing (detectron2's writers need it) and marked as the run's own checkpoints
    (:func:`rest_dense.trust.trust`), and checkpoints carry the optimizer (and AMP grad
    scaler) state, so ``--resume`` continues where training stopped.
    """

    def __init__(self, cfg: CfgNode):
        if cfg.OUTPUT_DIR:
            if comm.is_main_process():
                os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
            trust(cfg.OUTPUT_DIR)
        wrap = _d2_defaults.create_ddp_model
        _d2_defaults.create_ddp_model = _create_ddp_model  # CPU (gloo) jobs: no device_ids
        try:
            super().__init__(cfg)
        finally:
            _d2_defaults.create_ddp_model = wrap

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
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, output_dir=output_folder)

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


def lazy_build_model(cfg: DictConfig) -> torch.nn.Module:
    """Instantiate ``cfg.model`` on ``cfg.train.device``."""
    model = instantiate(cfg.model)
    return model.to(cfg.train.get("device", "cuda"))


def lazy_train(cfg: DictConfig, resume: bool = False,
               resume_from: Optional[str] = None) -> Dict[str, Any]:
    """Train with a LazyConfig (``model``, ``optimizer``, ``dataloader``, ``lr_multiplier``,
    ``train``), with periodic checkpoints and evaluation.

    Args:
        cfg: the config.
        resume: continue from the last checkpoint in ``train.output_dir`` if there is one
            (else start from ``train.init_checkpoint``).
        resume_from: continue from this checkpoint file (model, optimizer, iteration);
            overrides ``resume``. The file is marked trusted (:func:`rest_dense.trust.trust`).

    Returns:
        The last evaluation results.
    """
    trust(cfg.train.output_dir, resume_from)  # the run's own checkpoints
    model = lazy_build_model(cfg)
    logger.info("Model:\n%s", model)
    cfg.optimizer.params.model = model
    optim = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)

    model = _create_ddp_model(model, **cfg.train.ddp)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, train_loader, optim)
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
        checkpointer.load(resume_from)
        start_iter = trainer.iter + 1
    else:
        checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
        start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)
    return dict(results)
