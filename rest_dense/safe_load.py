"""One policy for reading checkpoint files, shared by the MMDetection / MMSegmentation and
the detectron2 adapters (PyTorch and numpy only).

Since torch 2.6, ``torch.load`` defaults to ``weights_only=True``: a restricted unpickler
that builds tensors, plain containers and an allow-list of types, and refuses everything
else. Training checkpoints hold a little more than that: numpy scalars and arrays, and in
mmengine's case the message hub's ``HistoryBuffer`` objects, whose statistics functions
pickle as ``getattr(HistoryBuffer, 'mean')`` (mmengine issue #1655).

The policy, in this order:

1. Every file is read with ``torch.load(weights_only=True)``, with the allow-list of this
   module active (:func:`safe_globals`): the numpy number types, ``numpy.ndarray`` /
   ``numpy.dtype`` and the classes the adapters register with
   :func:`register_safe_globals`. ``getattr`` is *not* allowed in general: the name
   ``builtins.getattr`` resolves to a stand-in that returns only the attributes
   registered with :func:`register_safe_attributes` (e.g. ``HistoryBuffer.mean``) and
   refuses every other lookup. So the checkpoints that mmengine and detectron2 training
   writes load without unpickling anything else, wherever they lie.
2. Only if that fails, and only for a path the user named explicitly (:func:`trust`; on
   the command line ``--trust-checkpoint PATH`` of ``rest-dense train`` / ``rest-dense
   test``), the file is unpickled in full, with a warning. Nothing is trusted implicitly:
   not the run's work / output directory, not a ``--resume`` file, not the CHECKPOINT of
   ``rest-dense test``.
3. Anything else fails with :class:`UntrustedCheckpointError`, which names the file and
   the flag that marks it trusted. Unpickling stops at the first refused global, so
   nothing the file names runs.

Legacy ``.pkl`` weight files (detectron2's model zoo format) are read by
:func:`load_pickle_file` with the same allow-list through a restricted
:class:`pickle.Unpickler`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import os.path as osp
import pickle
import zipfile
import zlib
from typing import Any, Dict, Iterable, Iterator, List, Optional, Set, Tuple, Union

import numpy as np
import torch

__all__ = ["trust", "forget_trusted", "trusted_paths", "is_trusted", "register_safe_globals",
           "register_safe_attributes", "safe_globals", "safe_global_names", "load_checkpoint_file",
           "load_pickle_file", "UntrustedCheckpointError", "TRUST_HINT",
           "register_framework_classes", "install_global_allow_list", "load_allow_listed",
           "CheckpointError", "CheckpointFormatError", "checkpoint_file_kind", "describe_file"]


class CheckpointError(ValueError):
    """Base class: a checkpoint cannot be loaded into a model."""


class CheckpointFormatError(CheckpointError):
    """The file (or object) is not a readable checkpoint; the message says what it is."""


# ------------------------------------------------------------------ reading files
_ZIP_MAGIC = b"PK\x03\x04"
_EMPTY_ZIP_MAGIC = b"PK\x05\x06"
_ZIP_END = b"PK\x05\x06"
# torch.save's legacy (non-zip) format: pickle protocol 2, then this magic number as a long
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
_SNIFF_BYTES = 4096

_KIND_TEXT = {
    "torch-zip": "a torch.save checkpoint (zip archive)",
    "torch-legacy": "a torch.save checkpoint (legacy, non-zip format)",
    "pickle": "a plain Python pickle (not written by torch.save)",
    "safetensors": "a safetensors file",
    "empty": "an empty file (0 bytes)",
    "truncated-zip": "a truncated or damaged zip archive (no end-of-archive record)",
    "zip": "a zip archive that is not a torch.save checkpoint (e.g. a numpy .npz)",
    "truncated-safetensors": "a truncated safetensors file (shorter than its own header)",
    "json": "a JSON file",
    "html": "an HTML page (a failed download?)",
    "git-lfs-pointer": "a Git LFS pointer file (the weights themselves were never downloaded; "
                       "run `git lfs pull`)",
    "text": "a text file",
    "gzip": "a gzip-compressed file (decompress it first)",
    "unknown": "not a checkpoint format rest_dense knows",
}


def checkpoint_file_kind(path: Union[str, os.PathLike]) -> str:
    """What a file is, judged from its first bytes (its name plays no part).

    Args:
        path: an existing file.

    Returns:
        One of ``'torch-zip'``, ``'torch-legacy'``, ``'pickle'``, ``'safetensors'`` (the
        readable kinds) or ``'empty'``, ``'truncated-zip'``, ``'zip'``,
        ``'truncated-safetensors'``, ``'json'``, ``'html'``, ``'git-lfs-pointer'``,
        ``'text'``, ``'gzip'``, ``'unknown'``.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
        if size == 0:
            return "empty"
        # safetensors: 8-byte little-endian header length, then a JSON object
        if len(head) >= 9 and head[8:9] == b"{":
            n = int.from_bytes(head[:8], "little")
            if 2 <= n < 1 << 40:
                return "safetensors" if 8 + n <= size else "truncated-safetensors"
        if head.startswith((_ZIP_MAGIC, _EMPTY_ZIP_MAGIC)):
            f.seek(max(0, size - (1 << 16) - 22))
            if _ZIP_END not in f.read():
                return "truncated-zip"
            try:
                with zipfile.ZipFile(path) as z:
                    names = z.namelist()
            except (zipfile.BadZipFile, OSError):
                return "truncated-zip"
            return "torch-zip" if any(n.endswith("data.pkl") for n in names) else "zip"
    if head.startswith(_LEGACY_TORCH_MAGIC):
        return "torch-legacy"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        # a multi-byte character cut by the sniff window is still text
        if e.start < len(head) - 4:
            return "unknown"
        text = head[:e.start].decode("utf-8")
    if any(c in text for c in "\x00\x01\x02\x03\x04\x05\x06\x07\x0e\x0f"):
        return "unknown"
    stripped = text.lstrip("\ufeff \t\r\n")
    if stripped.startswith("version https://git-lfs"):
        return "git-lfs-pointer"
    low = stripped[:512].lower()
    if low.startswith(("<!doctype html", "<html")) or "<html" in low:
        return "html"
    if stripped[:1] in ("{", "["):
        return "json"
    return "text"


def _describe_file(path: str, kind: str) -> str:
    detail = _KIND_TEXT[kind]
    if kind in ("text", "json", "html"):
        with open(path, "rb") as f:
            start = f.read(60).decode("utf-8", "replace").strip().replace("\n", " ")
        detail += f" starting {start!r}"
    elif kind == "unknown":
        with open(path, "rb") as f:
            detail += f" (first bytes {f.read(8).hex(' ')})"
    return f"{path!r} ({os.path.getsize(path)} bytes) is {detail}"


def describe_file(path: str) -> str:
    """``"'path' (N bytes) is <what its first bytes say>"``, for error messages."""
    return _describe_file(path, checkpoint_file_kind(path))

PathLike = Union[str, "os.PathLike[str]"]

logger = logging.getLogger("rest_dense.safe_load")

#: how the command-line tools let a user mark a checkpoint as their own
TRUST_HINT = ("if you produced it yourself, mark it as trusted with `--trust-checkpoint {path}` "
              "(rest-dense train / test / infer / export-model; rest-dense convert: "
              "--unsafe-load), from Python rest_dense.safe_load.trust(path); "
              "files of unknown origin should never need that")


class UntrustedCheckpointError(pickle.UnpicklingError):
    """A checkpoint needs full unpickling but its path was not marked trusted."""


# ----------------------------------------------------------------------------- trusted paths
_TRUSTED: List[str] = []


def _real(path: PathLike) -> str:
    return osp.realpath(osp.expanduser(os.fspath(path)))


def trust(*paths: Optional[PathLike]) -> List[str]:
    """Mark files or directories as the user's own checkpoints (full unpickling allowed if
    ``weights_only=True`` is not enough). Unpickling runs code stored in the file: only
    call this for files you produced, and only for paths the user named explicitly (the
    command-line tools call it for ``--trust-checkpoint`` paths, nothing else).

    Args:
        *paths: checkpoint files or directories (a directory covers everything under it,
            e.g. the work dir of an old run of your own); ``None``, ``''`` and URLs are ignored.

    Returns:
        The resolved paths now trusted (in registration order).
    """
    for p in paths:
        if p is None or os.fspath(p) == "" or "://" in os.fspath(p):
            continue
        real = _real(p)
        if real not in _TRUSTED:
            _TRUSTED.append(real)
    return list(_TRUSTED)


def forget_trusted(*paths: PathLike) -> None:
    """Withdraw trust from ``paths`` (all of it when called without arguments)."""
    if not paths:
        _TRUSTED.clear()
        return
    for p in paths:
        real = _real(p)
        if real in _TRUSTED:
            _TRUSTED.remove(real)


def trusted_paths() -> List[str]:
    """The files and directories marked with :func:`trust` (resolved, absolute)."""
    return list(_TRUSTED)


def is_trusted(path: PathLike) -> bool:
    """Whether ``path`` is, or lies under, a location marked with :func:`trust`."""
    real = _real(path)
    return any(real == t or real.startswith(t.rstrip(os.sep) + os.sep) for t in _TRUSTED)


# ----------------------------------------------------------------------------- allow-list
_EXTRA_GLOBALS: Set[Any] = set()
_SAFE_ATTRIBUTES: Dict[type, Set[str]] = {}


def register_safe_globals(*objects: Any) -> None:
    """Add classes (or functions) that checkpoints may reference to the allow-list.

    A class on the list can be created and have its pickled state restored (its
    ``__setstate__`` runs), so only register plain data holders whose restoration runs no
    code named by the file.
    """
    _EXTRA_GLOBALS.update(objects)


def register_safe_attributes(owner: type, names: Iterable[str]) -> None:
    """Allow ``getattr(owner, name)`` during unpickling for exactly these ``names``.

    Python pickles functions defined in a class (e.g. ``HistoryBuffer.mean``) as
    ``getattr(HistoryBuffer, 'mean')``. ``owner`` is added to the allow-list as well.
    """
    register_safe_globals(owner)
    _SAFE_ATTRIBUTES.setdefault(owner, set()).update(names)


def _restricted_getattr(owner: Any, name: str, *default: Any) -> Any:
    """Stand-in for ``builtins.getattr`` inside the restricted unpicklers."""
    allowed = _SAFE_ATTRIBUTES.get(owner, ()) if isinstance(owner, type) else ()
    if default or name not in allowed:
        raise pickle.UnpicklingError(
            f"getattr({getattr(owner, '__qualname__', type(owner).__name__)}, {name!r}) is not "
            "on rest_dense's allow-list of attributes a checkpoint may reference")
    return getattr(owner, name)


def _numpy_globals() -> List[Tuple[Any, str]]:
    """numpy arrays, scalars and the numeric / bool dtypes, under numpy 2's module names and
    the ``numpy.core`` names of files written with numpy 1."""
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    out: List[Tuple[Any, str]] = []
    for obj, name in ((multiarray.scalar, "scalar"), (multiarray._reconstruct, "_reconstruct")):
        for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
            out.append((obj, f"{module}.{name}"))
    out += [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    for code in "?bhilqpBHILQPefdgFDG":  # bool, integers, floats, complex: no object dtype
        dtype_cls = type(np.dtype(code))
        if dtype_cls is not np.dtype:
            out.append((dtype_cls, f"{dtype_cls.__module__}.{dtype_cls.__qualname__}"))
    return out


def safe_global_names() -> List[str]:
    """Dotted names of every global the allow-list admits beyond torch's own (sorted)."""
    return sorted({name for _, name in _allow_list()})


def _allow_list() -> List[Tuple[Any, str]]:
    out = _numpy_globals()
    out += [(obj, f"{obj.__module__}.{obj.__qualname__}") for obj in _EXTRA_GLOBALS]
    out.append((_restricted_getattr, "builtins.getattr"))
    return out


@contextlib.contextmanager
def safe_globals() -> Iterator[None]:
    """Context in which ``torch.load(weights_only=True)`` admits the allow-list (torch >=
    2.5; older versions have no allow-list, so only their built-in types load that way)."""
    context = getattr(torch.serialization, "safe_globals", None)
    if context is None:
        yield
        return
    with context(list(dict.fromkeys(_allow_list()))):
        yield


def register_framework_classes() -> bool:
    """Put mmengine's ``HistoryBuffer`` (and its four statistics functions) on the allow-list
    when mmengine is installed, so that an MMDetection / MMSegmentation training checkpoint
    is read as what it is in any process (e.g. handed to a detectron2 config) instead of
    being refused as untrusted. Nothing is imported when mmengine is absent.

    Returns:
        Whether anything was added.
    """
    try:
        from mmengine.logging.history_buffer import HistoryBuffer
    except Exception:  # noqa: BLE001  (not installed or unusable)
        return False
    if "mean" in _SAFE_ATTRIBUTES.get(HistoryBuffer, ()):
        return False
    register_safe_attributes(HistoryBuffer, ("min", "max", "mean", "current"))
    return True


def install_global_allow_list() -> List[str]:
    """Admit this module's allow-list in *every* ``torch.load(weights_only=True)`` of the
    process (``torch.serialization.add_safe_globals``), not only inside :func:`safe_globals`.

    This is what lets the toolboxes' own scripts (MMDetection's / MMSegmentation's
    ``tools/train.py --resume``, ``tools/test.py``), which call ``torch.load`` with torch's
    default ``weights_only=True``, read the checkpoints that training writes once a config's
    ``custom_imports`` has imported :mod:`rest_dense.mm`. It runs no code from any file: the
    list holds numpy's array / scalar / dtype reconstructors, the registered plain data
    classes (mmengine's ``HistoryBuffer``) and a ``getattr`` stand-in that resolves only
    the registered attributes (``HistoryBuffer.mean`` etc.) and refuses every other lookup.
    Calling it again adds what was registered since.

    Returns:
        The dotted names now admitted (see :func:`safe_global_names`).
    """
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is not None:
        add(list(dict.fromkeys(_allow_list())))
    return safe_global_names()


# ----------------------------------------------------------------------------- loading
def _first_line(err: BaseException) -> str:
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    # torch puts the useful part ("Unsupported global: ...") after its generic preamble
    useful = [ln for ln in lines if "Unsupported global" in ln or "Can only" in ln
              or "Trying to" in ln or "allow-list" in ln]
    return (useful or lines or [type(err).__name__])[0].strip()


def _allow_full_unpickling(filename: str, err: BaseException, trusted: Optional[bool],
                           log: Optional[logging.Logger], refused_by: str) -> None:
    """Raise :class:`UntrustedCheckpointError` unless ``filename`` is trusted (``trusted``,
    or marked with :func:`trust` when ``None``); when it is, log that it is unpickled in full."""
    if trusted is None:
        trusted = is_trusted(filename)
    if not trusted:
        raise UntrustedCheckpointError(
            f"{filename} holds objects that {refused_by} ({_first_line(err)}); nothing of it "
            f"was run. {TRUST_HINT.format(path=filename)}.") from err
    (log or logger).warning(
        "%s needs full unpickling (%s); allowed because it is marked as your own checkpoint",
        filename, _first_line(err))


def check_archive_crc(path: PathLike) -> None:
    """Check the CRC-32 that ``torch.save`` stores for every entry of its zip archive
    against the data: ``torch.load`` does not, so a bit flipped on disk or in transfer
    would load as a silently different tensor. Entries stored without a checksum (0) and
    files that are not zip archives are left alone.

    Raises:
        zipfile.BadZipFile: an entry whose data does not match its checksum, named.
    """
    if not isinstance(path, (str, os.PathLike)) or not zipfile.is_zipfile(path):
        return
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.CRC == 0:
                continue
            crc = 0
            with archive.open(info) as entry:  # zipfile compares the checksum at the end
                while True:
                    chunk = entry.read(1 << 22)
                    if not chunk:
                        break
                    crc = zlib.crc32(chunk, crc)
            if crc != info.CRC:
                raise zipfile.BadZipFile(f"entry {info.filename!r} does not match its CRC-32 "
                                         "(the file was altered after it was written)")


def load_allow_listed(path: PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with this module's allow-list; an mmengine
    training checkpoint read where :mod:`rest_dense.mm` was never imported (``convert``,
    ``export``, a detectron2 config) gets mmengine's ``HistoryBuffer`` admitted and is read
    again. Nothing of the file runs. The archive's checksums are checked first
    (:func:`check_archive_crc`).

    Raises:
        pickle.UnpicklingError: the file needs more than the allow-list.
        zipfile.BadZipFile: the data does not match the archive's checksums.
    """
    check_archive_crc(path)
    try:
        with safe_globals():
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as first:
        if "mmengine." not in str(first) or not register_framework_classes():
            raise
    with safe_globals():
        return torch.load(path, map_location=map_location, weights_only=True)



class CheckpointIsADirectoryError(IsADirectoryError, FileNotFoundError):
    """A folder where a checkpoint file belongs. Also a ``FileNotFoundError``: no file is
    there, and the handlers of a missing file report it."""


def checkpoint_file(path: Union[str, "os.PathLike[str]"], what: str = "checkpoint", *,
                    urls: bool = False) -> str:
    """``path`` (``~`` expanded) when it is a file; otherwise the error every reader gives.

    Args:
        path: the file.
        what: what the file is for, as the message names it (default ``'checkpoint'``).
        urls: let ``scheme://`` paths through unchecked (default False), for callers whose
            loader downloads them.

    Raises:
        FileNotFoundError: nothing there (also a link to a missing file).
        CheckpointIsADirectoryError: a folder.
    """
    filename = os.fspath(path)
    if urls and "://" in filename:
        return filename
    filename = osp.expanduser(filename)
    if osp.isdir(filename):
        raise CheckpointIsADirectoryError(
            21, f"{what} {filename!r} is a directory, not a file", filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(2, f"{what} {filename!r} does not exist", filename)
    return filename


def load_checkpoint_file(path: PathLike, map_location: Any = "cpu", *,
                         trusted: Optional[bool] = None,
                         log: Optional[logging.Logger] = None) -> Any:
    """Read a checkpoint file under the policy of this module.

    Args:
        path: a local file.
        map_location: passed to ``torch.load``.
        trusted: whether full unpickling is allowed if the allow-list does not suffice;
            ``None`` (default) asks :func:`is_trusted`.
        log: logger for the warning about full unpickling (default: ``rest_dense.safe_load``).

    Returns:
        Whatever the file holds (usually a dict).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        UntrustedCheckpointError: the file needs full unpickling and is not trusted; the
            message names the file and how to mark it trusted.
        CheckpointFormatError: torch.load cannot read the file; the message says what it is.
    """
    filename = checkpoint_file(path)
    try:
        return load_allow_listed(filename, map_location)
    except pickle.UnpicklingError as err:
        _allow_full_unpickling(filename, err, trusted, log,
                               "torch.load(weights_only=True) and rest_dense's allow-list refuse")
        return torch.load(filename, map_location=map_location, weights_only=False)
    except Exception as err:  # truncated, damaged or not a torch file: say what it is

        raise CheckpointFormatError(
            f"{describe_file(filename)} that torch.load cannot read (damaged or truncated?): "
            f"{type(err).__name__}: {_first_line(err)}") from err


class _RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only allow-listed globals."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = {n: obj for obj, n in _allow_list()}
        for key in (f"{module}.{name}", f"{module}.{name}".replace("numpy.core.", "numpy._core.")):
            if key in allowed:
                return allowed[key]
        raise pickle.UnpicklingError(f"global {module}.{name} is not on rest_dense's allow-list")


def load_pickle_file(path: PathLike, *, trusted: Optional[bool] = None,
                     encoding: str = "latin1", log: Optional[logging.Logger] = None) -> Any:
    """Read a plain pickle (e.g. detectron2's ``.pkl`` model-zoo weights: numpy arrays in
    dicts) with the allow-list; full unpickling only for trusted paths, as in
    :func:`load_checkpoint_file`.
    """
    filename = checkpoint_file(path)
    try:
        with open(filename, "rb") as f:
            return _RestrictedUnpickler(f, encoding=encoding).load()
    except pickle.UnpicklingError as err:
        _allow_full_unpickling(filename, err, trusted, log, "are outside rest_dense's allow-list")
        with open(filename, "rb") as f:
            return pickle.load(f, encoding=encoding)
