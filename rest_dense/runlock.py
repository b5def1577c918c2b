"""A lock file per output folder, so that two live runs never write into the same one.

``rest-dense train`` holds ``<work dir>/.rest-dense.lock`` and ``rest-dense infer`` holds
``<out>/.rest-dense.lock`` while they run. The file records the holder's pid, its start
time (from ``/proc/<pid>/stat``, so a recycled pid is not mistaken for the holder), host and
command line. A second run refuses with :class:`FolderBusyError`, naming that process. A lock
whose process is gone (killed with SIGKILL, a crashed machine) is stale: the next run takes it
over with a warning, so a killed run never blocks its folder for good. A lock written on
another host (shared file systems) is honoured as long as it is younger than
:data:`FOREIGN_HOST_MAX_AGE_S`, since its process cannot be checked from here.

In distributed runs only the process of global rank 0 takes the lock (the others write no
logs or checkpoints of their own). Launchers that start the workers themselves (detectron2's
``--num-machines``) hold the lock in the launching process of machine 0 only
(``primary=machine_rank == 0``): the other machines' launchers join the same run, and with a
work dir on a shared file system (or two launches on one host standing in for two machines)
they would otherwise find machine 0's lock and refuse.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from typing import Any, Dict, Iterator, Optional, Union

__all__ = ["FolderBusyError", "hold_folder", "read_lock", "LOCK_NAME", "process_start_time"]

LOCK_NAME = ".rest-dense.lock"
#: a lock written on another host is taken as stale after this many seconds
FOREIGN_HOST_MAX_AGE_S = 7 * 24 * 3600

logger = logging.getLogger("rest_dense")

PathLike = Union[str, "os.PathLike[str]"]


class FolderBusyError(RuntimeError):
    """Another live run holds the folder; the message names its pid and command."""


def process_start_time(pid: int) -> Optional[str]:
    """The start time of process ``pid`` in clock ticks since boot (``/proc/<pid>/stat``
    field 22), ``None`` when the process does not exist or ``/proc`` is unavailable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def read_lock(folder: PathLike) -> Optional[Dict[str, Any]]:
    """The lock record of ``folder`` (``None`` when there is none; ``{}`` when unreadable)."""
    path = os.path.join(os.fspath(folder), LOCK_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _holder_is_live(rec: Dict[str, Any]) -> bool:
    pid = rec.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if rec.get("host") not in (None, socket.gethostname()):
        return time.time() - float(rec.get("created", 0) or 0) < FOREIGN_HOST_MAX_AGE_S
    if pid == os.getpid():
        return False  # our own leftover (e.g. a run in this process that raised)
    if not _alive(pid):
        return False
    started = rec.get("start_time")
    now = process_start_time(pid)
    return started is None or now is None or str(started) == str(now)


def _describe(rec: Dict[str, Any]) -> str:
    cmd = rec.get("command") or "?"
    since = rec.get("created")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "?"
    return f"pid {rec.get('pid')} on {rec.get('host', '?')} since {when}: {cmd}"


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0


@contextlib.contextmanager
def hold_folder(folder: PathLike, what: str = "run",
                primary: Optional[bool] = None) -> Iterator[Optional[str]]:
    """Hold ``folder``'s lock for the block (created with the folder if needed).

    Args:
        folder: the work dir / output folder.
        what: how messages name the run (``"training"``, ``"infer"``).
        primary: whether this process is the run's first (the one that takes the lock);
            default: global rank 0 (``RANK`` unset or 0). A launcher of several machines
            passes ``machine_rank == 0``.

    Yields:
        The lock file's path (``None`` where this process is not the primary one, which
        takes no lock).

    Raises:
        FolderBusyError: another live process holds the folder; names its pid, host, start
            and command line, and the lock file to delete if that is wrong.
    """
    if not (_is_rank_zero() if primary is None else primary):
        yield None
        return
    folder = os.path.abspath(os.fspath(folder))
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_NAME)
    me = {"pid": os.getpid(), "start_time": process_start_time(os.getpid()),
          "host": socket.gethostname(), "created": time.time(), "what": what,
          "command": " ".join([os.path.basename(sys.argv[0] or "python")] + sys.argv[1:])}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            rec = read_lock(folder)
            if rec is None:
                continue  # released meanwhile
            if rec and _holder_is_live(rec):
                raise FolderBusyError(
                    f"{folder} is in use by another live {rec.get('what', 'run')} "
                    f"({_describe(rec)}); wait for it to finish, use another folder, or, if "
                    f"that process is not writing there, delete {path}")
            logger.warning("rest_dense: taking over the stale lock %s (%s)", path,
                           _describe(rec) if rec else "unreadable")
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
        break
    else:
        raise FolderBusyError(f"could not take the lock {path} (other runs keep taking it)")
    try:
        yield path
    finally:
        rec = read_lock(folder)
        if rec and rec.get("pid") == me["pid"] and rec.get("created") == me["created"]:
            with contextlib.suppress(OSError):
                os.remove(path)
