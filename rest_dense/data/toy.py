"""Deterministic synthetic "toy shapes" dataset for end-to-end smoke runs.

Every scene is a small RGB image with a few filled shapes (circles, squares,
triangles) of random size and rotation on a textured, noisy background. Colour is
a strong but imperfect cue: with probability ``class_color_prob`` (default 0.75)
a shape takes a hue from its class's range (circles red-orange, squares green,
triangles blue-violet), otherwise any hue, so the remaining shapes can only be
told apart by their outline. Shapes may overlap; a later shape occludes earlier ones, and the annotations
hold the *visible* part of every shape, so instance masks are disjoint and the
semantic label map is exactly their union.

The same scenes are written twice, in the two layouts the configs read:

* COCO instances (MMDetection / detectron2)::

      <root>/annotations/instances_train.json
      <root>/annotations/instances_val.json
      <root>/train/toy_00000.png ...
      <root>/val/toy_00000.png ...

  Segmentations are compressed COCO RLE (``{"size": [h, w], "counts": str}``,
  :func:`rest_dense.data.rle.mask_to_coco_rle`), which pycocotools, MMDetection and
  detectron2 read directly. Category ids are 1..3.

* ADE20K-style semantic segmentation (MMSegmentation)::

      <root>/images/training/toy_00000.png
      <root>/images/validation/toy_00000.png
      <root>/annotations/training/toy_00000.png
      <root>/annotations/validation/toy_00000.png

  Label maps are single-channel uint8 PNGs: 0 = background, ``k`` = the
  COCO category id ``k`` (1 = circle, 2 = square, 3 = triangle). Background is
  a real class here, so the segmentation configs use ``reduce_zero_label=False``
  and the four classes of :data:`TOY_SEG_CLASSES`.

Only numpy and Pillow are used (the RLE is written by :mod:`rest_dense.data.rle`). Each image is drawn from its own random
generator seeded by ``(seed, split, index)``, so a scene does not depend on how
many other images are generated.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw

from .rle import mask_to_coco_rle

__all__ = [
    "TOY_CLASSES", "TOY_SEG_CLASSES", "TOY_PALETTE", "TOY_HUES", "ToyScene", "make_scene", "scene_rng",
    "mask_to_bbox", "generate_toy_dataset", "toy_dataset_ready",
]

#: Instance classes (COCO category ids are the 1-based positions).
TOY_CLASSES: Tuple[str, ...] = ("circle", "square", "triangle")
#: Semantic classes: label value ``i`` is ``TOY_SEG_CLASSES[i]``.
TOY_SEG_CLASSES: Tuple[str, ...] = ("background",) + TOY_CLASSES
#: Display colours of the semantic classes (RGB).
TOY_PALETTE: Tuple[Tuple[int, int, int], ...] = ((0, 0, 0), (230, 25, 75), (60, 180, 75), (0, 130, 200))

#: Hue range (fraction of the colour wheel, may wrap past 1) of each class's own colours.
TOY_HUES: Tuple[Tuple[float, float], ...] = ((-0.04, 0.1), (0.22, 0.42), (0.56, 0.76))

_SPLITS = {"train": ("train", "training", 0), "val": ("val", "validation", 1)}
_FORMAT_VERSION = 3  # 3: compressed COCO RLE (2: uncompressed)
_META_FILE = "toy_meta.json"


@dataclass
class ToyScene:
    """One synthetic scene.

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB image.
        masks: ``(N, H, W)`` bool visible masks, pairwise disjoint, in drawing order.
        labels: ``(N,)`` int64 class indices into :data:`TOY_CLASSES` (0-based).
    """

    image: np.ndarray
    masks: np.ndarray
    labels: np.ndarray

    def semantic_map(self) -> np.ndarray:
        """Return the ``(H, W)`` uint8 label map: 0 background, ``label + 1`` on each shape."""
        seg = np.zeros(self.image.shape[:2], dtype=np.uint8)
        for mask, label in zip(self.masks, self.labels):
            seg[mask] = label + 1
        return seg


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random generator of image ``index`` of ``split`` (``'train'`` or ``'val'``)."""
    return np.random.default_rng([int(seed), _SPLITS[split][2], int(index)])


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-saturation textured background: base colour + smooth blobs + stripes."""
    base = rng.uniform(70, 190) + rng.normal(0, 12, size=3)
    grid = int(rng.integers(3, 9))
    coarse = rng.normal(0, 1, size=(grid, grid, 3)) * rng.uniform(10, 30)
    coarse_img = Image.fromarray(((coarse + 128).clip(0, 255)).astype(np.uint8))
    smooth = np.asarray(coarse_img.resize((size, size), Image.BICUBIC), dtype=np.float32) - 128
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = rng.uniform(0, math.pi)
    period = rng.uniform(6, 24)
    stripes = np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * 2 * math.pi / period)
    stripes = stripes[..., None] * rng.uniform(0, 14)
    return base + smooth + stripes


def _shape_color(rng: np.random.Generator, kind: int, class_color_prob: float) -> np.ndarray:
    """A saturated colour (HSV -> RGB), its hue from the class's range with ``class_color_prob``."""
    own = rng.uniform(0, 1) < class_color_prob
    lo, hi = TOY_HUES[kind] if own else (0.0, 1.0)
    h, s, v = rng.uniform(lo, hi) % 1.0, rng.uniform(0.55, 1.0), rng.uniform(0.45, 1.0)
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, dtype=np.float32) * 255


def _shape_mask(kind: int, cx: float, cy: float, r: float, angle: float, size: int) -> np.ndarray:
    """Binary mask of one shape; ``r`` is roughly its half-extent in pixels."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if kind == 0:  # circle
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=1)
    else:
        n, scale = (4, 1.25) if kind == 1 else (3, 1.35)
        pts = [(cx + r * scale * math.cos(angle + 2 * math.pi * k / n),
                cy + r * scale * math.sin(angle + 2 * math.pi * k / n)) for k in range(n)]
        draw.polygon(pts, fill=1)
    return np.asarray(canvas, dtype=bool)


def make_scene(rng: np.random.Generator, size: int = 128, max_objects: int = 4,
               class_color_prob: float = 0.75, min_radius: float = 0.07, max_radius: float = 0.2,
               max_occlusion: float = 0.4, min_area: int = 40) -> ToyScene:
    """Draw one scene.

    Args:
        rng: random generator (see :func:`scene_rng`).
        size: side of the square image in pixels.
        max_objects: shapes per image are drawn uniformly from ``1..max_objects``.
        class_color_prob: probability that a shape's hue comes from its class's range
            (:data:`TOY_HUES`) rather than the whole colour wheel.
        min_radius: smallest shape half-extent, as a fraction of ``size``.
        max_radius: largest shape half-extent, as a fraction of ``size``.
        max_occlusion: a new shape is re-placed if it would hide more than this
            fraction of an earlier shape's visible area.
        min_area: a shape whose in-image area is below this (pixels) is re-placed.

    Returns:
        The scene with its visible instance masks and 0-based class labels.
    """
    image = _background(rng, size)
    n_target = int(rng.integers(1, max_objects + 1))
    masks: List[np.ndarray] = []
    labels: List[int] = []
    for _ in range(n_target):
        for _attempt in range(30):
            kind = int(rng.integers(0, len(TOY_CLASSES)))
            r = rng.uniform(min_radius, max_radius) * size
            cx, cy = rng.uniform(0.6 * r, size - 0.6 * r, size=2)
            m = _shape_mask(kind, cx, cy, r, rng.uniform(0, 2 * math.pi), size)
            if m.sum() < min_area:
                continue
            if any((v & m).sum() > max_occlusion * v.sum() for v in masks):
                continue
            break
        else:
            continue
        color = _shape_color(rng, kind, class_color_prob)
        # mild shading so shapes are not perfectly flat
        yy, xx = np.nonzero(m)
        shade = 1.0 + 0.15 * ((xx - cx) * rng.normal() + (yy - cy) * rng.normal()) / max(r, 1.0)
        image[yy, xx] = color[None, :] * np.clip(shade, 0.7, 1.3)[:, None]
        for v in masks:
            v &= ~m
        masks.append(m)
        labels.append(kind)
    image = image + rng.normal(0, rng.uniform(3, 10), size=image.shape)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    keep = [i for i, m in enumerate(masks) if m.any()]
    mask_arr = (np.stack([masks[i] for i in keep]) if keep
                else np.zeros((0, size, size), dtype=bool))
    return ToyScene(image=image, masks=mask_arr, labels=np.array([labels[i] for i in keep], dtype=np.int64))


def mask_to_bbox(mask: np.ndarray) -> List[float]:
    """Tight COCO box ``[x, y, w, h]`` of a non-empty mask (pixel-edge coordinates)."""
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return [float(x0), float(y0), float(xs.max() - x0 + 1), float(ys.max() - y0 + 1)]


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _params(num_train: int, num_val: int, size: int, seed: int, max_objects: int,
            class_color_prob: float) -> Dict[str, Union[int, float]]:
    return {"version": _FORMAT_VERSION, "num_train": int(num_train), "num_val": int(num_val),
            "size": int(size), "seed": int(seed), "max_objects": int(max_objects),
            "class_color_prob": float(class_color_prob)}


def toy_dataset_ready(out_dir: Union[str, os.PathLike], num_train: int = 300, num_val: int = 50,
                      size: int = 128, seed: int = 0, max_objects: int = 4,
                      class_color_prob: float = 0.75) -> bool:
    """Whether ``out_dir`` already holds a complete dataset made with these parameters."""
    meta = Path(out_dir) / _META_FILE
    if not meta.is_file():
        return False
    try:
        recorded = json.loads(meta.read_text())
    except (OSError, ValueError):
        return False
    return recorded.get("params") == _params(num_train, num_val, size, seed, max_objects, class_color_prob)


#: written first by :func:`generate_toy_dataset` and removed with its last file: a folder
#: holding it is an interrupted generation of ours, safe to write again
_GENERATING_FILE = ".toy-generating"


def toy_root_problem(out_dir: Union[str, os.PathLike],
                     besides: Sequence[Union[str, os.PathLike]] = ()) -> Optional[str]:
    """Why :func:`generate_toy_dataset` must not write into ``out_dir``, or None: a file, or
    a folder holding files that are no toy dataset of this generator (neither its
    ``toy_meta.json`` nor the mark of an interrupted generation), whose annotations or
    images it would overwrite. Hidden entries (``.gitkeep``, locks) and the folders in
    ``besides`` (a work dir placed inside the data folder) do not count."""
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        return f"the toy data folder {os.fspath(out_dir)!r} is a file"
    if not root.is_dir():
        return None
    names = [p.name for p in root.iterdir()]
    if _META_FILE in names or _GENERATING_FILE in names:
        return None
    skip = set()
    for other in besides:
        rel = os.path.relpath(os.path.abspath(other), os.path.abspath(root))
        if rel != "." and not rel.startswith(".."):
            skip.add(rel.split(os.sep)[0])
    entries = [n for n in names if not n.startswith(".") and n not in skip]
    if not entries:
        return None
    return (f"the toy data folder {os.fspath(out_dir)!r} holds files that are not a toy dataset "
            f"({', '.join(sorted(entries)[:4])}{', ...' if len(entries) > 4 else ''}; no "
            f"{_META_FILE}): writing the dataset would overwrite them; choose an empty or new "
            "folder")


#: the file name of a scene, ``toy_<index>.png``
_SCENE_NAME = re.compile(r"toy_(\d{5})\.png")


def generate_toy_dataset(out_dir: Union[str, os.PathLike] = "data/toy", num_train: int = 300,
                         num_val: int = 50, size: int = 128, seed: int = 0, max_objects: int = 4,
                         class_color_prob: float = 0.75, overwrite: bool = False,
                         splits: Optional[Sequence[str]] = None,
                         besides: Sequence[Union[str, os.PathLike]] = ()) -> Dict[str, str]:
    """Write the toy dataset (both layouts) under ``out_dir``.

    Skips the work when ``out_dir`` already holds a dataset generated with the same
    parameters (see :func:`toy_dataset_ready`), unless ``overwrite`` is set.

    Args:
        out_dir: dataset root.
        num_train: number of training scenes.
        num_val: number of validation scenes.
        size: image side in pixels.
        seed: base seed; the output is a pure function of the parameters.
        max_objects: most shapes per scene.
        class_color_prob: probability that a shape is coloured from its class's hue range.
        overwrite: regenerate even if a matching dataset exists.
        splits: subset of ``('train', 'val')`` to write (default both).
        besides: folders inside ``out_dir`` that are not part of the dataset (a work dir;
            see :func:`toy_root_problem`).

    Returns:
        Paths of the written artefacts (``root``, ``train_json``, ``val_json``, ...).

    Raises:
        ValueError: a count below 1 (``size`` outside 16..2048, a negative seed), a
            probability outside [0, 1], an empty ``out_dir``;
            ``out_dir`` is a file, or holds files that are no toy dataset
            (:func:`toy_root_problem`).
    """
    for name, value, low, high in (("num_train", num_train, 1, None),
                                   ("num_val", num_val, 1, None), ("size", size, 16, 2048),
                                   ("max_objects", max_objects, 1, None), ("seed", seed, 0, None)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low \
                or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in {low}..{high}"
            raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
    if not os.fspath(out_dir).strip():
        raise ValueError("the dataset folder is an empty path")
    if not 0.0 <= class_color_prob <= 1.0:  # NaN fails too
        raise ValueError(f"class_color_prob must be in [0, 1], got {class_color_prob!r}")
    root = Path(out_dir)
    splits = tuple(splits or ("train", "val"))
    counts = {"train": num_train, "val": num_val}
    paths = {"root": str(root)}
    for split in splits:
        coco_dir, ade_dir, _ = _SPLITS[split]
        paths[f"{split}_json"] = str(root / "annotations" / f"instances_{split}.json")
        paths[f"{split}_images"] = str(root / coco_dir)
        paths[f"{split}_seg_images"] = str(root / "images" / ade_dir)
        paths[f"{split}_seg_labels"] = str(root / "annotations" / ade_dir)
    params = _params(num_train, num_val, size, seed, max_objects, class_color_prob)
    if not overwrite and set(splits) == {"train", "val"} and toy_dataset_ready(
            root, num_train, num_val, size, seed, max_objects, class_color_prob):
        return paths
    problem = toy_root_problem(root, besides=besides)
    if problem:
        raise ValueError(problem)
    meta_path = root / _META_FILE
    root.mkdir(parents=True, exist_ok=True)
    marker = root / _GENERATING_FILE
    marker.touch()
    if meta_path.exists():
        meta_path.unlink()  # invalid until this run completes

    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(TOY_CLASSES)]
    stats: Dict[str, Dict[str, int]] = {}
    for split in splits:
        coco_dir, ade_dir, _ = _SPLITS[split]
        for d in (root / coco_dir, root / "images" / ade_dir, root / "annotations" / ade_dir):
            d.mkdir(parents=True, exist_ok=True)
            # scenes of an earlier, larger dataset here would be read as part of this one
            # (mmseg lists the image folder); only this generator's own names are removed
            for old in d.iterdir():
                match = _SCENE_NAME.fullmatch(old.name)
                if match and int(match.group(1)) >= counts[split] and old.is_file():
                    old.unlink()
        images, annotations = [], []
        for idx in range(counts[split]):
            scene = make_scene(scene_rng(seed, split, idx), size=size, max_objects=max_objects,
                               class_color_prob=class_color_prob)
            name = f"toy_{idx:05d}.png"
            img_bytes = _png_bytes(scene.image)
            (root / coco_dir / name).write_bytes(img_bytes)
            (root / "images" / ade_dir / name).write_bytes(img_bytes)
            (root / "annotations" / ade_dir / name).write_bytes(_png_bytes(scene.semantic_map()))
            image_id = idx + 1
            images.append({"id": image_id, "file_name": name, "height": size, "width": size})
            for mask, label in zip(scene.masks, scene.labels):
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id, "category_id": int(label) + 1,
                    "segmentation": mask_to_coco_rle(mask), "area": int(mask.sum()),
                    "bbox": mask_to_bbox(mask), "iscrowd": 0})
        coco = {"info": {"description": "rest_dense toy shapes", **params},
                "images": images, "annotations": annotations, "categories": categories}
        ann_dir = root / "annotations"
        ann_dir.mkdir(parents=True, exist_ok=True)
        (ann_dir / f"instances_{split}.json").write_text(json.dumps(coco, separators=(",", ":")))
        stats[split] = {"images": len(images), "instances": len(annotations)}
    if set(splits) == {"train", "val"}:
        meta_path.write_text(json.dumps({"params": params, "stats": stats}, indent=2))
        marker.unlink()
    return paths


#: where the shipped toy configs read the dataset (relative to the working directory)
DEFAULT_TOY_ROOT = "data/toy"


#: the dataset's own files and folders, as missing-file messages name them
_TOY_PARTS = ("annotations/instances_", "annotations/training", "annotations/validation",
              "images/training", "images/validation", "/train/", "/val/")


def missing_toy_data_hint(message: str, root: Union[str, os.PathLike] = DEFAULT_TOY_ROOT,
                          option: str = "--toy-root") -> str:
    """``message``, with how to write the toy dataset when it says that one of ``root``'s
    files or folders is missing (any other message is returned as it is)."""
    root = os.path.normpath(os.fspath(root))
    missing = "No such file or directory" in message or "does not exist" in message
    ours = (root in message or os.path.abspath(root) in message) and \
        any(part in message for part in _TOY_PARTS)
    if not (missing and ours):
        return message
    return (f"{message}; the toy configs read the synthetic toy-shapes dataset at {root}: "
            f"write it with `python -m rest_dense.data.toy --out {root}` (or `rest-dense demo "
            f"--data-root {root}`), or point {option} at one")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m rest_dense.data.toy [--out DIR] ...``: write the toy dataset."""
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m rest_dense.data.toy",
        description="Write the synthetic toy-shapes dataset (COCO instances + ADE20K-style "
        "label maps) that the toy configs read. The output is a pure function of the "
        "arguments; an existing dataset with the same parameters is left alone unless "
        "--overwrite is given.")
    p.add_argument("--out", default=DEFAULT_TOY_ROOT,
                   help=f"dataset root (default: {DEFAULT_TOY_ROOT})")
    p.add_argument("--num-train", type=int, default=300, help="training images (default: 300)")
    p.add_argument("--num-val", type=int, default=50, help="validation images (default: 50)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default: 128)")
    p.add_argument("--max-objects", type=int, default=4, help="most shapes per image (default: 4)")
    p.add_argument("--class-color-prob", type=float, default=0.75,
                   help="probability that a shape is coloured from its class's hue range "
                   "(default: 0.75)")
    p.add_argument("--seed", type=int, default=0, help="base random seed (default: 0)")
    p.add_argument("--overwrite", action="store_true",
                   help="regenerate even if a matching dataset exists")
    args = p.parse_args(argv)
    try:
        paths = generate_toy_dataset(args.out, num_train=args.num_train, num_val=args.num_val,
                                     size=args.size, seed=args.seed,
                                     max_objects=args.max_objects,
                                     class_color_prob=args.class_color_prob,
                                     overwrite=args.overwrite)
    except (ValueError, OSError) as err:
        print(f"{p.prog}: error: {err}", file=__import__("sys").stderr)
        return 2
    for key, path in paths.items():
        print(f"{key:17s} {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
