"""Small helpers shared by the package's tools (pure Python / PyTorch)."""
from __future__ import annotations

import contextlib
import os
import re
import stat
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

__all__ = ["ENV_PREFIX", "env_var", "parse_size", "size_arg", "format_size", "positive_int",
           "guess_config_framework", "scale_count", "path_inside", "same_file",
           "check_output_path", "make_parent_folder", "missing_folders", "MAX_COUNT", "check_count", "OPTIONAL_PACKAGES",
           "missing_package_hint", "require_package", "ImageReadError", "reading_images"]

#: the prefix of every environment variable the package reads (``REST_DENSE_TOY_ROOT``, ...)
ENV_PREFIX = "REST_DENSE_"
_OLD_PREFIX = "RESTDENSE_"
#: the largest count of iterations / epochs a run may ask for: the frameworks' loggers and
#: ETA estimates convert it to a C int
MAX_COUNT = 2 ** 31 - 1


#: top-level modules of the optional dependencies -> how a wheel user installs them
OPTIONAL_PACKAGES = {
    "fvcore": "pip install fvcore (FLOP counts; also in rest_dense[d2])",
    "onnx": "pip install onnx onnxruntime (or rest_dense[deploy])",
    "onnxruntime": "pip install onnxruntime (or rest_dense[deploy])",
    "safetensors": "pip install safetensors",
    "mmengine": "pip install 'rest_dense[mm]' (mmcv with compiled ops: see the README)",
    "mmcv": "pip install 'rest_dense[mm]' (mmcv with compiled ops: see the README)",
    "mmdet": "pip install 'rest_dense[mm]'",
    "mmseg": "pip install 'rest_dense[mm]'",
    "mmdeploy": "pip install --no-deps mmdeploy==1.3.1 and 'rest_dense[deploy]'",
    "detectron2": ("pip install 'rest_dense[d2]', then detectron2 itself: pip install "
                   "--no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'"),
    "pycocotools": "pip install pycocotools",
    "matplotlib": "pip install matplotlib",
}


def require_package(name: str, why: str = "") -> None:
    """Raise the ``ModuleNotFoundError`` of a missing optional package before the work that
    needs it starts (the commands report it with :func:`missing_package_hint`).

    Raises:
        ModuleNotFoundError: ``name`` is not installed (``why`` ends the message).
    """
    import importlib.util

    if importlib.util.find_spec(name) is None:
        raise ModuleNotFoundError(f"No module named {name!r}" + (f": {why}" if why else ""),
                                  name=name)


def missing_package_hint(error: BaseException) -> Optional[str]:
    """One line for an ``ImportError`` of an optional dependency: which package, and how to
    install it (a package that imports only in part, such as mmcv without its compiled ops,
    is named as such); ``None`` for any other error or module."""
    name = getattr(error, "name", None) if isinstance(error, ImportError) else None
    root = (name or "").split(".")[0]
    if root not in OPTIONAL_PACKAGES:
        return None
    if isinstance(error, ModuleNotFoundError) and name == root:
        return f"this needs {root}, which is not installed: {OPTIONAL_PACKAGES[root]}"
    return (f"this needs {root}, whose install is incomplete ({error}): "
            f"{OPTIONAL_PACKAGES[root]}")


def check_count(value: object, key: str, minimum: int = 1) -> int:
    """A count of iterations or epochs from a config (``max_iters``, ``SOLVER.MAX_ITER``):
    a whole number from ``minimum`` to :data:`MAX_COUNT`, named by ``key`` otherwise.

    Raises:
        ValueError: a bool, a number with a fraction (never rounded: ``2.5`` would train 2
            iterations), or a value out of range.
    """
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{key} must be a whole number, got {value!r} "
                         f"({type(value).__name__}); it is never rounded")
    if value < minimum:
        raise ValueError(f"{key} must be at least {minimum}, got {value}")
    if value > MAX_COUNT:  # the frameworks' loggers and ETA take it as a C int
        raise ValueError(f"{key} must be at most {MAX_COUNT}, got {value}")
    return int(value)


def env_var(name: str, default: Optional[str] = None) -> Optional[str]:
    """The environment variable ``REST_DENSE_<name>`` (``name`` with or without the prefix).

    The old spelling ``RESTDENSE_<name>`` still works when the new one is unset, with a
    :class:`DeprecationWarning`.

    Returns:
        Its value, or ``default`` when neither spelling is set.
    """
    import warnings

    name = name[len(ENV_PREFIX):] if name.startswith(ENV_PREFIX) else name
    value = os.environ.get(ENV_PREFIX + name)
    if value is not None:
        return value
    value = os.environ.get(_OLD_PREFIX + name)
    if value is None:
        return default
    warnings.warn(f"the environment variable {_OLD_PREFIX + name} is deprecated; set "
                  f"{ENV_PREFIX + name} instead", DeprecationWarning, stacklevel=2)
    return value

_SIZE = re.compile(r"^\s*(\d+)\s*(?:[xX×]\s*(\d+))?\s*$")


def parse_size(text: str) -> Tuple[int, int]:
    """An image size as every tool spells it: ``'HxW'`` (``'800x1216'``), or ``'S'`` for S x S.

    Raises:
        ValueError: anything else, naming the accepted form.
    """
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"image size {text!r} is not HxW (for example 800x1216) or a single side")
    h = int(m.group(1))
    w = int(m.group(2)) if m.group(2) else h
    if h <= 0 or w <= 0:
        raise ValueError(f"image size {text!r} must be positive")
    return h, w


def size_arg(text: str) -> Tuple[int, int]:
    """An argparse ``type`` for image sizes: :func:`parse_size`, its error as argparse's."""
    import argparse

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def format_size(size: Tuple[int, int]) -> str:
    """``(800, 1216)`` -> ``'800x1216'``."""
    return f"{size[0]}x{size[1]}"


def positive_int(text: str) -> int:
    """An argparse ``type`` for counts such as ``--threads``: a whole number >= 1.

    Raises:
        argparse.ArgumentTypeError: anything else (``0``, ``-2``, ``2.5``, ``two``), naming it.
    """
    import argparse

    try:
        value = int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (expected 1, 2, ...)") \
            from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def remove_if_empty(folders: Sequence[str]) -> None:
    """Remove those of ``folders`` (deepest first) that exist and are empty: the folders a
    refused or failed command created for its output."""
    for folder in folders:
        try:
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)
        except OSError:
            return


@contextlib.contextmanager
def removed_if_left_empty(folder: Union[str, "os.PathLike[str]"]) -> Iterator[list]:
    """For a command's output folder that the block may create: when the block fails (an
    exception, or a nonzero exit status appended to the yielded list), the folders on the
    way to it that did not exist before and are still empty are removed (a refused command
    leaves nothing behind)."""
    created = missing_folders(os.path.abspath(os.fspath(folder)))
    status: list = []

    def remove() -> None:
        remove_if_empty(created)

    try:
        yield status
    except BaseException:
        remove()
        raise
    if any(status):
        remove()


def error_text(e: BaseException) -> str:
    """An error's message for a one-line report: an ``OSError(errno, text, path)`` shows its
    text (which names the path already) without ``[Errno N]`` and the repeated path; a
    ``KeyError`` its message without the quotes ``str()`` adds; a failed download says so;
    an error that PyTorch re-raised from a DataLoader worker shows the worker's error, not
    its traceback."""
    from urllib.error import HTTPError, URLError

    worker = _data_loader_worker_error(e)
    if worker is not None:
        return worker
    if isinstance(e, ImportError) and missing_package_hint(e):
        return missing_package_hint(e)
    if isinstance(e, URLError) and not isinstance(e, HTTPError):
        return f"cannot download from the URL: {e.reason}"
    if isinstance(e, HTTPError):
        return f"cannot download {e.url or 'from the URL'}: HTTP {e.code} {e.msg}"
    if isinstance(e, OSError) and e.strerror:
        if e.filename is None or str(e.filename) in e.strerror:
            return e.strerror
        return f"{e.strerror}: {e.filename}"
    if isinstance(e, KeyError) and len(e.args) == 1:
        return str(e.args[0])
    return str(e)


class ImageReadError(ValueError):
    """An image of a dataset that cannot be decoded (a corrupt file, or not an image)."""


_FAILED_IMAGE = re.compile(r"failed to load image: (\S.*?)\s*(\(in DataLoader worker process \d+\))?$")
#: what PIL raises for files it cannot decode (detectron2 reads images with PIL)
_PIL_DECODE = ("cannot identify image file", "image file is truncated", "Truncated File Read",
               "broken data stream", "Corrupt JPEG")


@contextlib.contextmanager
def reading_images() -> Iterator[None]:
    """Training or testing: an image the toolbox cannot decode becomes
    :class:`ImageReadError`, one line naming the file where the toolbox names it (mmcv's
    ``failed to load image`` assertion, PIL's errors), instead of an assertion traceback."""
    try:
        yield
    except AssertionError as e:
        match = _FAILED_IMAGE.search(error_text(e))
        if match is None:
            raise
        raise ImageReadError(f"cannot decode the image {match.group(1)} (a corrupt file, or not "
                             "an image)") from e
    except OSError as e:
        text = error_text(e)
        if isinstance(e, FileNotFoundError) or not any(m in text for m in _PIL_DECODE):
            raise
        raise ImageReadError(f"an image of the dataset cannot be decoded: {text}") from e


_WORKER_ERROR = re.compile(r"Caught (\w+) (in DataLoader worker process \d+)\.\s*\n"
                           r"Original Traceback \(most recent call last\):\n")
_ERRNO = re.compile(r"^\[Errno \d+\] ")


def _data_loader_worker_error(e: BaseException) -> Optional[str]:
    """``'<message> (in DataLoader worker process N)'`` for an error that
    ``torch.utils.data`` re-raised in the main process with the worker's traceback as its
    message; None for any other error."""
    text = str(e.args[0]) if len(e.args) == 1 else str(e)
    match = _WORKER_ERROR.match(text)
    if match is None:
        return None
    name, where = match.groups()
    tail = text[match.end():]
    # the traceback ends in "[module.]<name>: <message>", the message perhaps over lines
    lines = tail.rstrip().splitlines()
    head = re.compile(rf"^(?:[\w.]+\.)?{re.escape(name)}(?:: (.*))?$")
    at = next((i for i in range(len(lines) - 1, -1, -1) if head.match(lines[i])), None)
    if at is None:
        message = lines[-1].strip() if lines else name
    else:
        first = head.match(lines[at]).group(1)
        message = " ".join(part.strip() for part in [first or name, *lines[at + 1:]] if part.strip())
    if name == "KeyError" and len(message) >= 2 and message[0] == message[-1] and message[0] in "'\"":
        message = message[1:-1]  # str() of a KeyError quotes its key
    message = _ERRNO.sub("", message)
    return f"{message} ({where})"


def _finite_float(text: str):
    import argparse
    import math

    try:
        value = float(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def non_negative_float(text: str) -> float:
    """An argparse ``type`` for tolerances and durations (``--box-atol``, ``--min-time``): a
    finite number >= 0.

    Raises:
        argparse.ArgumentTypeError: anything else (``-5``, ``nan``, ``inf``, ``abc``), naming it.
    """
    import argparse

    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def fraction(text: str) -> float:
    """An argparse ``type`` for a share or an IoU (``--seg-agreement``, ``--mask-iou``): a
    number in [0, 1].

    Raises:
        argparse.ArgumentTypeError: anything else (``2``, ``-0.1``, ``nan``), naming it.
    """
    import argparse

    value = _finite_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must lie in [0, 1]")
    return value


def guess_config_framework(path: str) -> str:
    """Deprecated: use :func:`rest_dense.configs.config_framework` (one vocabulary:
    ``'mmdet'``, ``'mmseg'``, ``'d2'``, ``'d2-lazy'``). Returns its family,
    ``'openmmlab'`` or ``'detectron2'``."""
    import warnings

    from .configs import config_framework, framework_family

    warnings.warn("rest_dense.utils.guess_config_framework is deprecated; use "
                  "rest_dense.configs.config_framework", DeprecationWarning, stacklevel=2)
    return framework_family(config_framework(path))


def scale_count(value: Union[int, float], ratio: float, minimum: int = 1) -> int:
    """``value * ratio`` rounded, at least ``minimum``: an iteration count (interval,
    warm-up length, milestone) of a schedule stretched or shrunk by ``ratio``."""
    return max(int(minimum), int(round(float(value) * ratio)))


def path_inside(path: Union[str, "os.PathLike[str]"], folder: Union[str, "os.PathLike[str]"]) -> bool:
    """Whether ``path`` is ``folder`` or lies below it (links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def same_file(a: Union[str, "os.PathLike[str]"], b: Union[str, "os.PathLike[str]"]) -> bool:
    """Whether two paths name one file: the same absolute path, or the same inode (a link,
    another spelling)."""
    a, b = os.fspath(a), os.fspath(b)
    if os.path.abspath(a) == os.path.abspath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def missing_folders(folder: Union[str, "os.PathLike[str]"]) -> List[str]:
    """The folders on the way to ``folder`` (itself included) that do not exist, deepest
    first, as the path spells them (no ``..`` folded away)."""
    folder = os.fspath(folder) or "."
    missing = []
    while folder and not os.path.lexists(folder):
        missing.append(folder)
        up = os.path.dirname(folder)
        folder = "" if up == folder else up
    return missing


def check_output_path(path: Union[str, "os.PathLike[str]"], what: str,
                      inputs: Iterable[Optional[Union[str, "os.PathLike[str]"]]] = (),
                      folder: bool = False, example: str = "", replaced: bool = False) -> str:
    """The one rule for the files and folders a command writes, checked before any work:
    refuse an empty path, one that would destroy an input (one of ``inputs``, also through a
    link or another spelling), a folder where a file is meant (or a file where a folder is
    meant), a path below an existing file (as the system resolves it: ``afile/../x`` too), a
    file name too long for the file system, or a place this process cannot write. Missing
    folders are fine: the writers create them (:func:`make_parent_folder`), as MMEngine's
    and detectron2's tools do. Nothing is created here.

    Args:
        path: the output file (or folder, with ``folder=True``).
        what: how the message names the path (``'--save-metrics'``, ``'the destination'``).
        inputs: the files the command reads (None entries are skipped).
        folder: ``path`` is a folder.
        example: a file name the message suggests when a folder is given for a file.
        replaced: the writer renames a finished temporary file onto ``path``
            (:class:`rest_dense.run_files.StagedFile`): an existing ``path`` that is not a
            regular file (a device such as ``/dev/null``, a pipe) is refused, as the rename
            would replace it.

    Returns:
        ``path`` as a string.

    Raises:
        ValueError: any of the above, naming the path and ``what``.
    """
    import tempfile

    path = given = os.fspath(path)
    if not path:
        raise ValueError(f"{what}: an empty path; give a {'folder' if folder else 'file'} name")
    for src in inputs:
        if src is not None and same_file(src, path):
            raise ValueError(f"{what} {path!r} is the same file as the input {os.fspath(src)!r}; "
                             "it would be overwritten: give another path")
    if os.path.islink(path.rstrip("/" + os.sep) or path):
        # the writers write through a link: its target is what is checked
        path = os.path.realpath(path)
        if os.path.islink(path):
            raise ValueError(f"{what} {given!r} is a symbolic link that resolves to no path "
                             "(a loop)")
        for src in inputs:
            if src is not None and same_file(src, path):
                raise ValueError(f"{what} {given!r} links to the input {os.fspath(src)!r}; it "
                                 "would be overwritten: give another path")
    full = os.path.abspath(path)  # (no trailing separator: "afile/" is checked as "afile")
    if folder and os.path.exists(full) and not os.path.isdir(full):
        raise ValueError(f"{what} {path!r} is a file, not a folder")
    if not folder and (os.path.isdir(full) or path.endswith(("/", os.sep))):
        hint = f" (e.g. {os.path.join(path, example)!r})" if example else ""
        raise ValueError(f"{what} {path!r} is a folder; give a file name inside it{hint}")
    if not folder and os.path.exists(path) and not os.path.isfile(path) and (
            replaced or stat.S_ISFIFO(os.stat(path).st_mode)):
        # a staged writer would replace a device; a pipe blocks a writer until read
        raise ValueError(f"{what} {given!r} exists and is not a regular file (a device or a "
                         "pipe); give a file name")
    # the folders as the system resolves them: walk the path as spelled
    spelled = path.rstrip("/" + os.sep) if folder else os.path.dirname(path)
    missing = missing_folders(spelled or ".")
    parent = os.path.dirname(missing[-1]) if missing else (spelled or ".")
    parent = parent or "."
    if os.path.lexists(parent) and not os.path.isdir(parent):
        shown = os.path.normpath(os.path.join(os.getcwd(), parent))
        kind = "a link to nothing" if os.path.islink(parent) else "a file"
        raise ValueError(f"{what} {given!r} lies below {shown!r}, which is {kind}")
    name_max = 255
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        pass
    for name in path.replace(os.sep, "/").split("/"):
        size = len(name.encode("utf-8", "surrogateescape"))
        if size > name_max:
            raise ValueError(f"{what}: the name {name[:24]!r}... is too long ({size} bytes; "
                             f"at most {name_max} here)")
    try:  # permissions alone do not tell (root, read-only or virtual file systems)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise ValueError(f"{what} {given!r}: cannot write into {parent!r}: "
                         f"{e.strerror or e}") from None
    return given


def make_parent_folder(path: Union[str, "os.PathLike[str]"]) -> str:
    """Create the missing folders above the output file ``path`` (checked by
    :func:`check_output_path`; a link's target's folders); returns ``path`` as a string."""
    path = os.fspath(path)
    target = os.path.realpath(path) if os.path.islink(path) else path
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    return path

