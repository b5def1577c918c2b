"""Crash-safe checkpoint saves and resuming for mmengine runs (the adapter of
:mod:`rest_dense.run_files`).

What :func:`rest_dense.mm.runner.build_runner` uses so that an MMDetection / MMSegmentation
training run killed at any moment resumes with ``--resume`` from its last complete checkpoint:

* :class:`AtomicCheckpointHook`: mmengine's ``CheckpointHook`` with a different order of
  work. mmengine (0.10) deletes the oldest checkpoint of ``max_keep_ckpts`` *before* it
  writes the new one, writes straight onto the final name and then overwrites
  ``last_checkpoint`` in place; a run killed during the save could be left with no
  checkpoint at all. This hook writes the checkpoint to a hidden temporary file, flushes it
  to disk and renames it into place (:mod:`rest_dense.run_files`), then replaces the
  ``last_checkpoint`` pointer the same way, and only then removes the checkpoints that fall
  out of ``max_keep_ckpts``. :func:`make_checkpoint_hooks_atomic` puts it in place of the
  runner's ``CheckpointHook`` (the config is left as written).
* :func:`find_resume_checkpoint`: what ``--resume`` without a file resumes from: the most
  recent checkpoint of the work dir that loads (a damaged one is skipped with a warning), also
  when the work dir was moved or copied (mmengine's ``last_checkpoint`` holds an absolute
  path; it is resolved inside the work dir).
"""
from __future__ import annotations

import logging
import os
import os.path as osp
from typing import Any, List, Optional

from mmengine.dist import is_main_process
from mmengine.fileio.backends import LocalBackend
from mmengine.hooks import CheckpointHook
from mmengine.logging import print_log

from .. import run_files, safe_load

__all__ = ["AtomicCheckpointHook", "make_checkpoint_hooks_atomic", "find_resume_checkpoint",
           "CHECKPOINT_PATTERN", "ResumeError"]

ResumeError = run_files.ResumeError

#: file names of mmengine's periodic checkpoints (``filename_tmpl`` ``iter_{}.pth`` /
#: ``epoch_{}.pth``); the group is the step
CHECKPOINT_PATTERN = r"(?:iter|epoch)_(\d+)\.pth"


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
            target = osp.basename(run_files.temporary_name(self.last_ckpt))
        runner.save_checkpoint(self.out_dir, target, self.file_client_args,
                               save_optimizer=self.save_optimizer,
                               save_param_scheduler=self.save_param_scheduler, meta=meta,
                               by_epoch=self.by_epoch, backend_args=self.backend_args,
                               **self.args)
        if not is_main_process():
            return
        if local:
            _commit_written(osp.join(self.out_dir, target), self.last_ckpt)
            run_files.atomic_write_text(osp.join(runner.work_dir, run_files.POINTER_NAME),
                                    self.last_ckpt)
        else:
            with open(osp.join(runner.work_dir, run_files.POINTER_NAME), "w") as f:
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
        run_files._pause_for_tests()
        os.replace(tmp, path)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise
    run_files._fsync_folder(osp.dirname(osp.abspath(path)))



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
    tries the work dir's checkpoints newest first (:func:`rest_dense.run_files.
    resume_candidates`: the ``last_checkpoint`` pointer, resolved inside ``work_dir`` when
    the folder was moved or copied, and the ``iter_N.pth`` / ``epoch_N.pth`` files) and
    returns the first that loads under :mod:`rest_dense.safe_load`'s policy.

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
        run_files.remove_stale_temporaries(work_dir, log=log)
    candidates = run_files.resume_candidates(work_dir, CHECKPOINT_PATTERN)
    return run_files.select_resume_checkpoint(
        candidates, read=lambda p: safe_load.load_checkpoint_file(p, map_location="cpu"), log=log)


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

