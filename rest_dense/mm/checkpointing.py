"""Crash-safe checkpoints, resuming and proportionate short schedules for mmengine runs.

What :func:`rest_dense.mm.runner.build_runner` / :func:`~rest_dense.mm.runner.train_config`
use so that an MMDetection / MMSegmentation training run killed at any moment resumes with
``--resume`` from its last complete checkpoint:

* :class:`AtomicCheckpointHook`: mmengine's ``CheckpointHook`` with a different order of
  work. mmengine (0.10) deletes the oldest checkpoint of ``max_keep_ckpts`` *before* it
  writes the new one, writes straight onto the final name and then overwrites
  ``last_checkpoint`` in place; a run killed during the save could be left with no
  checkpoint at all. This hook writes the checkpoint to a hidden temporary file, flushes it
  to disk and renames it into place (:mod:`rest_dense.checkpointing`), then replaces the
  ``last_checkpoint`` pointer the same way, and only then removes the checkpoints that fall
  out of ``max_keep_ckpts``. :func:`make_checkpoint_hooks_atomic` puts it in place of the
  runner's ``CheckpointHook`` (the config is left as written).
* :func:`find_resume_checkpoint`: what ``--resume`` without a file resumes from: the most
  recent checkpoint of the work dir that loads (a damaged one is skipped with a warning), also
  when the work dir was moved or copied (mmengine's ``last_checkpoint`` holds an absolute
  path; it is resolved inside the work dir).
* :func:`scale_schedule`: configs that set ``scale_schedule_with_max_iters = True`` (the
  toy configs) keep their schedule proportionate when ``train_cfg.max_iters`` is overridden.
* :func:`install_config_format_cache`: mmengine re-formats the whole config with yapf for
  every checkpoint it saves; the formatting is memoized (same output, once per process).
"""
from __future__ import annotations

import logging
import os
import os.path as osp
from collections import OrderedDict
from typing import Any, Collection, Dict, List, Optional, Tuple

from mmengine.config import Config
from mmengine.dist import is_main_process
from mmengine.fileio.backends import LocalBackend
from mmengine.hooks import CheckpointHook
from mmengine.logging import print_log

from .. import checkpointing as _ckpt
from .. import trust as _trust

__all__ = ["AtomicCheckpointHook", "make_checkpoint_hooks_atomic", "find_resume_checkpoint",
           "install_config_format_cache",
           "CHECKPOINT_PATTERN", "SCALE_SCHEDULE_KEY", "scale_schedule", "ResumeError"]

ResumeError = _ckpt.ResumeError

#: file names of mmengine's periodic checkpoints (``filename_tmpl`` ``iter_{}.pth`` /
#: ``epoch_{}.pth``); the group is the step
CHECKPOINT_PATTERN = r"(?:iter|epoch)_(\d+)\.pth"

#: the config flag that opts a config into :func:`scale_schedule`
SCALE_SCHEDULE_KEY = "scale_schedule_with_max_iters"

_LINEAR = ("LinearLR", "LinearParamScheduler", "LinearMomentum")


class AtomicCheckpointHook(CheckpointHook):
    """``CheckpointHook`` whose saves survive being killed at any moment.

    Same arguments and behaviour as mmengine's ``CheckpointHook``, with three changes for
    local folders: the checkpoint file appears under its name only when complete (written
    to a temporary file in the same folder, ``fsync``-ed, renamed), ``last_checkpoint`` is
    replaced atomically and names a complete file, and checkpoints beyond
    ``max_keep_ckpts`` are removed only after the new checkpoint and pointer are in place.
    Other storage backends keep mmengine's behaviour (apart from the removal order).
    """

    def _is_local(self) -> bool:
        backend = getattr(self, "file_backend", None)
        return isinstance(backend, LocalBackend) and "://" not in str(self.out_dir)

    def _save_checkpoint_with_step(self, runner, step, meta):
        outdated: List[int] = []
        if self.max_keep_ckpts > 0:
            # the epoch and the best-checkpoint saves may both call this in one step
            if not (self.keep_ckpt_ids and self.keep_ckpt_ids[-1] == step):
                if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                    outdated.append(self.keep_ckpt_ids.popleft())
                self.keep_ckpt_ids.append(step)
                runner.message_hub.update_info("keep_ckpt_ids", list(self.keep_ckpt_ids))

        ckpt_filename = self.filename_tmpl.format(step)
        self.last_ckpt = self.file_backend.join_path(self.out_dir, ckpt_filename)
        runner.message_hub.update_info("last_ckpt", self.last_ckpt)

        local = self._is_local()
        target = ckpt_filename
        if local:  # mmengine writes the temporary file; we flush and rename it
            target = osp.basename(_ckpt.temporary_name(self.last_ckpt))
        runner.save_checkpoint(self.out_dir, target, self.file_client_args,
                               save_optimizer=self.save_optimizer,
                               save_param_scheduler=self.save_param_scheduler, meta=meta,
                               by_epoch=self.by_epoch, backend_args=self.backend_args,
                               **self.args)
        if not is_main_process():
            return
        if local:
            _commit_written(osp.join(self.out_dir, target), self.last_ckpt)
            _ckpt.atomic_write_text(osp.join(runner.work_dir, _ckpt.POINTER_NAME),
                                    self.last_ckpt)
        else:
            with open(osp.join(runner.work_dir, _ckpt.POINTER_NAME), "w") as f:
                f.write(self.last_ckpt)
        for old in outdated:
            path = self.file_backend.join_path(self.out_dir, self.filename_tmpl.format(old))
            if self.file_backend.isfile(path):
                self.file_backend.remove(path)
            elif self.file_backend.isdir(path):  # deepspeed saves folders
                self.file_backend.rmtree(path)


def _commit_written(tmp: str, path: str) -> None:
    """Flush a file another writer has just closed and rename it onto ``path``."""
    try:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _ckpt._pause_for_tests()
        os.replace(tmp, path)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise
    _ckpt._fsync_folder(osp.dirname(osp.abspath(path)))


def install_config_format_cache(max_entries: int = 8) -> None:
    """Format each config text with yapf once per process (idempotent).

    mmengine's ``Config.pretty_text`` runs yapf over the whole config for the log, for the
    dumped config and again for the meta data of *every* checkpoint it saves -- seconds per
    save on a small CPU, for the same text each time. This memoizes mmengine's
    ``FormatCode`` on its arguments (a pure function), so the output is unchanged.

    Args:
        max_entries: how many distinct texts to remember.
    """
    import mmengine.config.config as mm_config

    original = mm_config.FormatCode
    if getattr(original, "rest_dense_memoized", False):
        return
    cache: "OrderedDict[Tuple[str, str], Any]" = OrderedDict()

    def format_code(text: str, *args: Any, **kwargs: Any) -> Any:
        key = (text, repr((args, sorted(kwargs.items()))))
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        result = original(text, *args, **kwargs)
        cache[key] = result
        while len(cache) > max_entries:
            cache.popitem(last=False)
        return result

    format_code.rest_dense_memoized = True  # type: ignore[attr-defined]
    mm_config.FormatCode = format_code


def make_checkpoint_hooks_atomic(runner) -> int:
    """Make the runner's ``CheckpointHook`` (exactly that class, not subclasses of it) an
    :class:`AtomicCheckpointHook`. The hook keeps its state; the config is not changed.

    Returns:
        The number of hooks changed.
    """
    changed = 0
    for hook in getattr(runner, "_hooks", []):
        if type(hook) is CheckpointHook:
            hook.__class__ = AtomicCheckpointHook
            changed += 1
    return changed


def find_resume_checkpoint(work_dir: str, logger: Any = "current") -> Optional[str]:
    """The checkpoint ``--resume`` (without a file) continues from.

    Removes the temporary files of saves that were interrupted (main process only), then
    tries the work dir's checkpoints newest first (:func:`rest_dense.checkpointing.
    resume_candidates`: the ``last_checkpoint`` pointer, resolved inside ``work_dir`` when
    the folder was moved or copied, and the ``iter_N.pth`` / ``epoch_N.pth`` files) and
    returns the first that loads under :mod:`rest_dense.trust`'s policy.

    Args:
        work_dir: the run's work dir.
        logger: an mmengine logger (name) for the warnings.

    Returns:
        The checkpoint, or ``None`` when the work dir holds none.

    Raises:
        ResumeError: there are checkpoints, but none can be read.
        UntrustedCheckpointError: the newest one needs full unpickling and is not trusted.
    """
    log = _PrintLog(logger)
    if int(os.environ.get("RANK", "0")) == 0:
        _ckpt.remove_stale_temporaries(work_dir, log=log)
    candidates = _ckpt.resume_candidates(work_dir, CHECKPOINT_PATTERN)
    return _ckpt.select_resume_checkpoint(
        candidates, read=lambda p: _trust.load_checkpoint_file(p, map_location="cpu"), log=log)


class _PrintLog:
    """The bits of ``logging.Logger`` the checkpoint helpers use, through mmengine's
    ``print_log``."""

    def __init__(self, logger: Any):
        self.logger = logger

    def _log(self, level: int, msg: str, *args: Any) -> None:
        print_log(msg % args if args else msg, logger=self.logger, level=level)

    def info(self, msg: str, *args: Any) -> None:
        self._log(logging.INFO, msg, *args)

    def warning(self, msg: str, *args: Any) -> None:
        self._log(logging.WARNING, msg, *args)


# ----------------------------------------------------------------------------- schedules
def _explicit(key: str, explicit: Collection[str]) -> bool:
    """Whether the user set ``key`` (or a parent of it) themselves."""
    return any(key == e or key.startswith(e + ".") for e in explicit)


def scale_schedule(cfg: Config, max_iters: int,
                   explicit: Collection[str] = ()) -> Dict[str, Tuple[Any, Any]]:
    """Set ``train_cfg.max_iters`` and stretch everything counted in iterations with it.

    With ``r = max_iters / <the config's max_iters>``: the iteration-based parameter
    schedulers' ``begin`` / ``end`` / ``T_max`` / ``milestones`` (warm-up, decay steps), the
    validation interval, the checkpoint interval and the logging interval are multiplied by
    ``r`` and rounded (intervals at least 1; a scheduler ending at the old ``max_iters`` ends
    at the new one; a linear warm-up keeps at least two iterations, the least in which
    mmengine's ``LinearLR`` gets from ``start_factor`` to ``end_factor``). So a short run
    (``--cfg-options train_cfg.max_iters=20``) warms up, reaches its learning rate, decays,
    saves checkpoints and validates like the full one, only sooner. Entries named in
    ``explicit`` keep their value.

    Args:
        cfg: an iteration-based config (``train_cfg.max_iters``); modified in place.
        max_iters: the new number of iterations (>= 1).
        explicit: dotted keys the user set explicitly (e.g. the ``--cfg-options`` keys).

    Returns:
        What changed: ``{key: (old, new)}``.

    Raises:
        ValueError: ``max_iters`` < 1, or the config is not iteration-based.
    """
    max_iters = int(max_iters)
    if max_iters < 1:
        raise ValueError(f"train_cfg.max_iters must be at least 1, got {max_iters}")
    old = (cfg.get("train_cfg") or {}).get("max_iters")
    if not old:
        raise ValueError(f"{SCALE_SCHEDULE_KEY} needs an iteration-based train_cfg "
                         "(train_cfg.max_iters)")
    ratio = max_iters / float(old)
    changes: Dict[str, Tuple[Any, Any]] = {}

    def put(owner: Any, attr: str, key: str, value: Any) -> None:
        if _explicit(key, explicit) or owner.get(attr) == value:
            return
        changes[key] = (owner.get(attr), value)
        owner[attr] = value

    changes["train_cfg.max_iters"] = (old, max_iters)
    cfg.train_cfg.max_iters = max_iters
    if cfg.train_cfg.get("val_interval"):
        put(cfg.train_cfg, "val_interval", "train_cfg.val_interval",
            _ckpt.scale_count(cfg.train_cfg.val_interval, ratio))
    hooks = cfg.get("default_hooks") or {}
    for name in ("checkpoint", "logger"):
        hook = hooks.get(name)
        if isinstance(hook, dict) and hook.get("interval") and not hook.get("by_epoch", False):
            put(hook, "interval", f"default_hooks.{name}.interval",
                _ckpt.scale_count(hook["interval"], ratio))

    schedulers = cfg.get("param_scheduler") or []
    if isinstance(schedulers, dict):
        schedulers = [schedulers]
    if not _explicit("param_scheduler", explicit):
        for i, sched in enumerate(schedulers):
            if sched.get("by_epoch", True):
                continue
            key = f"param_scheduler.{i}"
            begin, end = sched.get("begin", 0), sched.get("end")
            new_begin = _ckpt.scale_count(begin, ratio, minimum=0)
            put(sched, "begin", f"{key}.begin", new_begin)
            new_end = None
            if end is not None and end < 2 ** 31:  # mmengine's "until the end" is INF
                # mmengine's LinearLR reaches end_factor at its last step, end - 1; over a
                # single step it never leaves start_factor: a shortened warm-up keeps two
                shortest = 2 if sched.get("type") in _LINEAR and end - begin >= 2 else 1
                new_end = max(max_iters if end >= old else _ckpt.scale_count(end, ratio),
                              new_begin + shortest)
                put(sched, "end", f"{key}.end", new_end)
            if sched.get("T_max"):
                spans = new_end is not None and sched["T_max"] == end - begin
                put(sched, "T_max", f"{key}.T_max",
                    new_end - new_begin if spans else _ckpt.scale_count(sched["T_max"], ratio))
            if sched.get("milestones"):
                put(sched, "milestones", f"{key}.milestones",
                    [_ckpt.scale_count(m, ratio) for m in sched["milestones"]])
    return changes
