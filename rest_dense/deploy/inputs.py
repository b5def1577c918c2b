"""Image inputs of the deployment tools: files, folders and globs; decoding; test images."""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["IMAGE_SUFFIXES", "ImageReadError", "collect_images", "read_image", "output_names",
           "synthetic_image"]

#: file suffixes taken from folders (files named explicitly may have any suffix)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
                  ".gif")


class ImageReadError(ValueError):
    """An image file that does not exist or cannot be decoded."""


def collect_images(inputs: Sequence[Union[str, os.PathLike]],
                   left_out: Optional[List[str]] = None) -> List[str]:
    """Expand image files, folders (recursively, by suffix) and glob patterns.

    Args:
        inputs: paths or shell-style patterns (``'data/*.jpg'``, ``'imgs/**/*.png'``).
        left_out: if given, the files of the folders that were not taken (no image suffix;
            hidden files aside) are appended to it, for the caller to report.

    Returns:
        The image paths, each once (also when linked folders reach a file by several
        paths), in the order given (sorted within a folder or pattern); links to missing
        files are kept, for the reader to report.

    Raises:
        FileNotFoundError: an input is neither an existing file, nor a folder, nor a pattern
            that matches a file; or a folder holds no image.
    """
    found: List[str] = []
    for item in inputs:
        item = os.fspath(item)
        if os.path.isfile(item):
            found.append(item)
        elif os.path.isdir(item):
            entries = [p for p in Path(item).rglob("*") if _file_or_broken_link(p)]
            files = sorted(str(p) for p in entries if p.suffix.lower() in IMAGE_SUFFIXES)
            if left_out is not None:
                left_out += sorted(str(p) for p in entries if p.suffix.lower() not in
                                   IMAGE_SUFFIXES and not p.name.startswith("."))
            if not files:
                raise FileNotFoundError(f"folder {item!r} holds no image files "
                                        f"({', '.join(IMAGE_SUFFIXES)})")
            found += files
        elif glob.has_magic(item):
            files = sorted(p for p in glob.glob(item, recursive=True) if _file_or_broken_link(p))
            if not files:
                raise FileNotFoundError(f"no file matches the pattern {item!r}")
            found += files
        elif os.path.islink(item):
            raise FileNotFoundError(f"input {item!r} {_broken_link(item)}")
        else:
            raise FileNotFoundError(f"input {item!r} does not exist (expected an image file, "
                                    "a folder of images or a glob pattern)")
    # one file reached through linked folders (a loop under '**'): once, by its shortest
    # path, where it came first; links to files are inputs of their own
    best: dict = {}
    for path in found:
        key = os.path.join(os.path.realpath(os.path.dirname(path) or "."),
                           os.path.basename(path))
        if key not in best or len(path) < len(best[key]):
            best[key] = path
    return list(best.values())


def _file_or_broken_link(path: Union[str, os.PathLike]) -> bool:
    """A file, or a link whose target is gone: an input that cannot be read is reported
    (as skipped, by :func:`read_image`'s error), never dropped unseen."""
    return os.path.isfile(path) or (os.path.islink(path) and not os.path.exists(path))


def _broken_link(path: str) -> str:
    return (f"is a link to {os.readlink(path)!r}, which leads to no file (missing, or a loop "
            "of links)")


def read_image(path: Union[str, os.PathLike]) -> np.ndarray:
    """Decode an image file into an ``(H, W, 3)`` uint8 BGR array (the frameworks' layout).

    Grey and palette images are expanded to three channels; an alpha channel is dropped.

    Raises:
        ImageReadError: the file is missing, empty or not a decodable image.
    """
    import cv2

    path = os.fspath(path)
    if not os.path.isfile(path):
        if os.path.islink(path) and not os.path.exists(path):
            raise ImageReadError(f"image {path!r} {_broken_link(path)}")
        raise ImageReadError(f"image {path!r} does not exist")
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0:
        raise ImageReadError(f"image {path!r} is an empty file")
    image = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        raise ImageReadError(f"image {path!r} cannot be decoded (not an image, or a format "
                             "OpenCV does not read)")
    return image


def output_names(paths: Sequence[str]) -> Dict[str, str]:
    """A distinct file stem per input path, for the files written about it.

    The stem is the file name without its suffix; inputs that share one (``a/x.jpg`` and
    ``b/x.png``) get their parent folders prepended (``a_x``, ``b_x``) and, if still equal,
    a counter. A stem longer than :data:`MAX_STEM_BYTES` (UTF-8) is cut and given a hash of
    the whole, so that every output name (stem + suffix) fits the file systems' 255 bytes.
    """
    stems: Dict[str, str] = {}
    by_stem: Dict[str, List[str]] = {}
    for path in paths:
        by_stem.setdefault(Path(path).stem, []).append(path)
    used = set()
    for stem, group in by_stem.items():
        for path in group:
            name = stem
            if len(group) > 1:
                parts = Path(os.path.abspath(path)).parts[:-1]
                name = "_".join(list(parts[-1:]) + [stem]).lstrip("_")
            name = _short_stem(name)
            base, k = name, 1
            while name in used:
                k += 1
                name = f"{base}_{k}"
            used.add(name)
            stems[path] = name
    return stems


#: the longest output stem, in UTF-8 bytes: room for a counter and the longest suffix
MAX_STEM_BYTES = 200


def _short_stem(name: str) -> str:
    data = name.encode("utf-8", "surrogateescape")
    if len(data) <= MAX_STEM_BYTES:
        return name
    import hashlib

    digest = hashlib.sha1(data).hexdigest()[:10]
    head = data[:MAX_STEM_BYTES - 11].decode("utf-8", "ignore")  # whole characters only
    return f"{head}_{digest}"


def synthetic_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A deterministic ``(height, width, 3)`` uint8 BGR test picture with object-like content.

    A toy-shapes scene (:func:`rest_dense.data.toy.make_scene`) resized to the requested size,
    so that detectors and segmenters trained on anything shape-like give non-trivial output.
    """
    import cv2

    from ..data.toy import make_scene

    side = max(int(height), int(width), 32)
    scene = make_scene(np.random.default_rng([int(seed), int(height), int(width)]), size=side)
    rgb = cv2.resize(scene.image, (int(width), int(height)), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(rgb[..., ::-1])


def image_sizes(paths: Iterable[str]) -> List[Tuple[int, int]]:
    """``(H, W)`` of each image (decoded)."""
    return [read_image(p).shape[:2] for p in paths]
