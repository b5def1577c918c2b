"""Crash-safe checkpoint files and picking the checkpoint to resume from (PyTorch only).

Shared by the MMDetection / MMSegmentation adapter (:mod:`rest_dense.mm.run_files`) and
the detectron2 one (:class:`rest_dense.d2.checkpointer.RestDetectionCheckpointer`), so that a
training run killed at any moment -- also while it writes a checkpoint -- resumes from the
last complete checkpoint:

* :func:`atomic_save` / :func:`atomic_write_text` write to a hidden temporary file in the
  destination folder, ``fsync`` it, and only then ``os.replace`` it onto the final name
  (atomic on POSIX and Windows within one file system), then ``fsync`` the folder. A
  reader sees the old file or the new one, never half of one.
* :func:`resume_candidates` lists a run folder's checkpoints, newest first, from the
  ``last_checkpoint`` pointer and the files that follow the run's naming scheme; a
  pointer whose recorded path is missing or lies outside the folder (a moved or copied
  work dir) is resolved to the file of that name inside the folder.
* :func:`select_resume_checkpoint` returns the newest candidate that loads, with a warning
  naming every file it skipped; :class:`ResumeError` when there are checkpoints but none
  loads.
* :class:`StagedFile`: an output (converted checkpoint, ONNX graph) written under a
  temporary name and renamed only after the command has checked it.
* :func:`remove_stale_temporaries` deletes the temporary files of killed writers.

For tests only: when the environment variable ``REST_DENSE_TEST_SAVE_PAUSE`` holds a number
of seconds, :func:`atomic_save` sleeps that long between writing the temporary file and
renaming it, so that a test can kill the process in the middle of a save (the old
spelling ``RESTDENSE_TEST_SAVE_PAUSE`` still works, with a :class:`DeprecationWarning`).
"""
from __future__ import annotations

import logging
import math
import os
import os.path as osp
import pickle
import re
import secrets
import signal
import stat
import threading
import time
from typing import Any, Callable, Iterable, List, Optional, Pattern, Sequence, Union
from urllib.error import URLError

import torch

from .safe_load import CheckpointError
from .utils import env_var, path_inside

__all__ = ["CHECKPOINT_ERRORS", "SAVE_PAUSE_ENV", "POINTER_NAME", "ResumeError", "atomic_save", "atomic_write_text",
           "StagedFile", "temporary_name", "remove_stale_temporaries", "read_pointer",
           "resume_candidates", "select_resume_checkpoint"]

PathLike = Union[str, "os.PathLike[str]"]

logger = logging.getLogger("rest_dense.run_files")

#: test hook: seconds to sleep between writing a checkpoint's temporary file and renaming it
SAVE_PAUSE_ENV = "REST_DENSE_TEST_SAVE_PAUSE"

#: the file naming the latest checkpoint of a run (mmengine and detectron2 use this name)
POINTER_NAME = "last_checkpoint"

# .<final name>.tmp-<pid>-<random>[<suffix>]: hidden, never ends in .pth, tells its writer's
# pid (a StagedFile may add a format suffix such as .onnx or .safetensors)
_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]+(\.(onnx|safetensors|pt2))?$")


class ResumeError(RuntimeError):
    """A run folder holds checkpoints, but none of them can be read."""


# ----------------------------------------------------------------------------- writing
def temporary_name(path: PathLike) -> str:
    """A fresh hidden temporary file name next to ``path`` (same folder, same file system)."""
    path = os.fspath(path)
    folder, base = osp.split(osp.abspath(path))
    # a long name keeps its start: the temporary one must fit the file system's limit too
    encoded = base.encode("utf-8", "surrogateescape")
    if len(encoded) > 200:  # bytes: the file system's limit is in bytes
        base = encoded[:200].decode("utf-8", "ignore")
    return osp.join(folder, f".{base}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def _fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable (best effort: not every OS / file system can)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pause_for_tests() -> None:
    value = env_var(SAVE_PAUSE_ENV)
    if value:
        time.sleep(float(value))


def _commit(tmp: str, path: str, write: Callable[[Any], None], binary: bool) -> str:
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        _pause_for_tests()
        os.replace(tmp, path)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_folder(osp.dirname(path))
    return path


def _mode_for(dst: str) -> int:
    """The permission bits a file written to ``dst`` should have."""
    try:
        return stat.S_IMODE(os.stat(dst).st_mode)
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


#: checkpoint errors that the commands report in one line: a file refused by the trust policy or
#: by ``torch.load(weights_only=True)`` (:class:`rest_dense.safe_load.UntrustedCheckpointError`
#: is one), a checkpoint to resume from that cannot be read (:class:`ResumeError`), one that
#: does not fit the model, and a checkpoint URL that cannot be downloaded
CHECKPOINT_ERRORS = (pickle.UnpicklingError, ResumeError, CheckpointError, URLError)


class StagedFile:
    """An output written under a hidden temporary name beside ``dst`` and given its name
    only by :meth:`commit`, once it has been checked: an interrupted or failed command
    leaves no file that looks finished, and an existing ``dst`` is replaced only by a
    checked one. Leaving the ``with`` block without a commit removes the temporary file;
    inside it (main thread) SIGTERM raises ``SystemExit(143)`` so that it is removed then
    too, and the file of a process killed otherwise is one
    :func:`remove_stale_temporaries` recognises.

    Args:
        dst: the final path (checked by :func:`rest_dense.utils.check_output_path`; its
            missing folders are created on entering the block and removed again, if left
            empty, when the file is not committed). A link is written through.
        suffix: appended to the temporary name (:func:`temporary_name`), for writers that
            pick a format by the file's ending (``'.onnx'``, ``'.safetensors'``).

    Example::

        with StagedFile("model.onnx") as staged:
            export(staged.path)
            check(staged.path)
            staged.commit()
    """

    def __init__(self, dst: PathLike, suffix: str = ""):
        self.dst = os.fspath(dst)
        # a link is written through (its target gets the file), as open() would
        self._target = osp.realpath(self.dst)
        self.path = temporary_name(self._target) + suffix
        self.committed = False
        self._previous_handler: Optional[list] = None  # [handler] while ours is installed
        self._created: List[str] = []

    def commit(self) -> str:
        """Give the checked file its final name (atomically); returns it. The file gets the
        mode of the one it replaces, or of a newly created file (``0o666`` less the umask):
        writers that create their file private (safetensors: 0600) do not decide it."""
        os.chmod(self.path, _mode_for(self._target))
        os.replace(self.path, self._target)
        self.committed = True
        _fsync_folder(osp.dirname(self._target))
        return self.dst

    def __enter__(self) -> "StagedFile":
        from .utils import missing_folders

        folder = osp.dirname(self._target)
        self._created = missing_folders(folder)
        os.makedirs(folder, exist_ok=True)
        # SIGTERM (a job scheduler, `kill`) would end the process without unwinding, leaving
        # the temporary file: it raises SystemExit(143) here instead, so that __exit__ runs
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = [signal.signal(signal.SIGTERM, _exit_on_sigterm)]
        return self

    def __exit__(self, *exc) -> None:
        if self._previous_handler is not None:
            previous = self._previous_handler[0]
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
            self._previous_handler = None
        if not self.committed:
            if osp.exists(self.path):
                os.remove(self.path)
            from .utils import remove_if_empty

            remove_if_empty(self._created)  # the folders made for the file, if left empty


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def atomic_save(obj: Any, path: PathLike) -> str:
    """``torch.save(obj, path)`` such that ``path`` is never left half-written.

    The data go to a hidden temporary file in ``path``'s folder, which is flushed to disk and
    then renamed onto ``path``; an existing ``path`` is replaced only by a complete file. If
    the process dies before the rename, ``path`` is untouched and the temporary file stays
    behind (:func:`remove_stale_temporaries` removes it).

    Args:
        obj: what to save.
        path: the destination file; its folder is created if missing.

    Returns:
        ``path`` (absolute).
    """
    path = osp.abspath(os.fspath(path))
    os.makedirs(osp.dirname(path), exist_ok=True)
    return _commit(temporary_name(path), path, lambda f: torch.save(obj, f), binary=True)


def atomic_write_text(path: PathLike, text: str) -> str:
    """Write a small text file (e.g. a ``last_checkpoint`` pointer) atomically, like
    :func:`atomic_save`. Returns ``path`` (absolute)."""
    path = osp.abspath(os.fspath(path))
    os.makedirs(osp.dirname(path), exist_ok=True)
    return _commit(temporary_name(path), path, lambda f: f.write(text), binary=False)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot tell: leave its files alone
    return True


def remove_stale_temporaries(folder: PathLike, log: Optional[logging.Logger] = None) -> List[str]:
    """Delete the temporary files that killed writers of :func:`atomic_save` /
    :func:`atomic_write_text` left in ``folder`` (only files whose writer process is gone).

    Args:
        folder: a run's work / output folder (missing: nothing to do).
        log: where to report removals (default: this module's logger).

    Returns:
        The removed paths.
    """
    folder = os.fspath(folder)
    if not osp.isdir(folder):
        return []
    removed = []
    for name in sorted(os.listdir(folder)):
        match = _TEMP.match(name)
        if not match or _pid_alive(int(match["pid"])):
            continue
        path = osp.join(folder, name)
        try:
            os.remove(path)
        except FileNotFoundError:  # another process of the job was quicker
            continue
        removed.append(path)
    if removed:
        (log or logger).info("removed %d incomplete checkpoint file(s) of an interrupted save: %s",
                             len(removed), ", ".join(osp.basename(p) for p in removed))
    return removed


# ----------------------------------------------------------------------------- resuming
def read_pointer(folder: PathLike, pointer: str = POINTER_NAME) -> Optional[str]:
    """The checkpoint a run folder's pointer file names, resolved for moved folders.

    mmengine records an absolute path, detectron2 a file name. A recorded path that exists
    and lies inside ``folder`` is returned as is; otherwise (the folder was moved or copied,
    or the name is relative) the file of that name inside ``folder`` if it exists, else the
    recorded path unchanged if it exists (a checkpoint folder of its own, e.g. mmengine's
    ``CheckpointHook(out_dir=...)``).

    Args:
        folder: the run's work / output folder.
        pointer: the pointer file's name in ``folder``.

    Returns:
        The checkpoint path, or ``None`` without a pointer or when it names no existing file.
    """
    folder = os.fspath(folder)
    try:
        with open(osp.join(folder, pointer), encoding="utf-8") as f:
            recorded = f.read().strip()
    except (OSError, ValueError):  # unreadable, or not text (UnicodeDecodeError)
        return None
    if not recorded:
        return None
    if not osp.isabs(recorded):
        local = osp.join(folder, recorded)
        return local if osp.isfile(local) else None
    if osp.isfile(recorded) and path_inside(recorded, folder):
        return recorded
    local = osp.join(folder, osp.basename(recorded))  # the folder was moved or copied
    if osp.isfile(local):
        return local
    return recorded if osp.isfile(recorded) else None


def earlier_run_warning(folder: PathLike, pattern: Union[str, Pattern[str]],
                        final_names: Iterable[str] = ()) -> Optional[str]:
    """The warning for a run started anew (no ``--resume``) in a folder that holds an
    earlier run's checkpoints (:func:`resume_candidates` with ``pattern`` and
    ``final_names``), which its own checkpoints may overwrite or, past ``max_keep_ckpts``,
    delete; None if there are none."""
    candidates = resume_candidates(folder, pattern, final_names=final_names)
    if not candidates:
        return None
    return (f"{os.fspath(folder)} holds checkpoints of an earlier run (newest: "
            f"{osp.basename(candidates[0])}); this run starts anew (no --resume), and its own "
            "checkpoints may overwrite or delete them: pass --resume to continue that run, "
            "or another --work-dir to keep it")


def resume_candidates(folder: PathLike, pattern: Union[str, Pattern[str]],
                      pointer: str = POINTER_NAME, final_names: Iterable[str] = ()) -> List[str]:
    """A run folder's checkpoints, the one to resume from first.

    Order: by the step number in the file name (the first group of ``pattern``), highest
    first; files named in ``final_names`` (written at the end of training, e.g.
    detectron2's ``model_final.pth``) before all others; ties broken by modification time.
    The pointer's file (:func:`read_pointer`) is always a candidate, also when its name does
    not follow ``pattern`` (then it comes first). A pointer that lags behind -- the process
    died after renaming a new checkpoint into place but before updating the pointer -- does
    not hide the newer file.

    Args:
        folder: the run's work / output folder.
        pattern: regular expression a checkpoint's file name must match in full; its first
            group is the step (iteration or epoch).
        pointer: the pointer file's name.
        final_names: file names that rank above every numbered checkpoint.

    Returns:
        Absolute paths, most recent first (empty when there is nothing to resume from).
    """
    folder = osp.abspath(os.fspath(folder))
    regex = re.compile(pattern) if isinstance(pattern, str) else pattern
    finals = set(final_names)
    ranked = {}
    if osp.isdir(folder):
        for name in os.listdir(folder):
            path = osp.join(folder, name)
            if not osp.isfile(path):
                continue
            match = regex.fullmatch(name)
            if name in finals:
                ranked[path] = (math.inf, osp.getmtime(path))
            elif match:
                ranked[path] = (int(match.group(1)), osp.getmtime(path))
    pointed = read_pointer(folder, pointer)
    if pointed is not None:
        pointed = osp.abspath(pointed)
        if pointed not in ranked:
            ranked[pointed] = (math.inf, math.inf)
    return sorted(ranked, key=lambda p: ranked[p], reverse=True)


def _default_reader(path: str) -> Any:
    from .safe_load import load_checkpoint_file

    return load_checkpoint_file(path, map_location="cpu")


def select_resume_checkpoint(candidates: Sequence[str], read: Optional[Callable[[str], Any]] = None,
                             log: Optional[logging.Logger] = None) -> Optional[str]:
    """The first of ``candidates`` that can be read; warns about each file it skips.

    A file that needs full unpickling and is not trusted is not skipped: that
    :class:`rest_dense.safe_load.UntrustedCheckpointError` is raised, since resuming from an
    older file instead would silently throw work away.

    Args:
        candidates: checkpoints, most recent first (:func:`resume_candidates`).
        read: reads a file, raising on failure (default:
            :func:`rest_dense.safe_load.load_checkpoint_file` to the CPU).
        log: where the warnings go (default: this module's logger).

    Returns:
        The chosen path, or ``None`` for an empty ``candidates``.

    Raises:
        ResumeError: no candidate can be read (each file and its error are listed).
        UntrustedCheckpointError: a candidate needs full unpickling.
    """
    from .safe_load import UntrustedCheckpointError

    read = read or _default_reader
    log = log or logger
    failures = []
    for path in candidates:
        try:
            read(path)
        except UntrustedCheckpointError:
            raise
        except Exception as err:  # truncated, damaged, not a checkpoint at all
            lines = str(err).strip().splitlines()
            reason = type(err).__name__ + (f": {lines[0]}" if lines else "")
            failures.append(f"{path} ({reason})")
            log.warning("rest_dense: skipping checkpoint %s, which cannot be read (%s); trying "
                        "the next most recent one", path, reason)
            continue
        if failures:
            log.warning("rest_dense: resuming from %s, the most recent checkpoint that loads",
                        path)
        return path
    if failures:
        raise ResumeError("no checkpoint to resume from can be read: " + "; ".join(failures))
    return None


# ----------------------------------------------------------------------------- schedules
