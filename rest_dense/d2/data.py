"""Registering the synthetic toy dataset in detectron2's catalogs: the COCO instances
(``toy_train`` / ``toy_val``) and the same scenes' label maps for semantic segmentation
(``toy_sem_seg_train`` / ``toy_sem_seg_val``)."""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Union

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_sem_seg, register_coco_instances

__all__ = ["register_toy_datasets", "register_toy_sem_seg_datasets", "toy_class_names",
           "set_toy_sem_seg_metadata", "TOY_SPLITS", "TOY_SEM_SEG_SPLITS"]

#: split -> (annotation file relative to the root, image folder relative to the root)
TOY_SPLITS: Dict[str, tuple] = {
    "train": (os.path.join("annotations", "instances_train.json"), "train"),
    "val": (os.path.join("annotations", "instances_val.json"), "val"),
}
#: split -> (label-map folder, image folder), relative to the root (the ADE20K-style layout)
TOY_SEM_SEG_SPLITS: Dict[str, tuple] = {
    "train": (os.path.join("annotations", "training"), os.path.join("images", "training")),
    "val": (os.path.join("annotations", "validation"), os.path.join("images", "validation")),
}


def register_toy_datasets(root: Union[str, os.PathLike] = "data/toy", prefix: str = "toy",
                          splits: Sequence[str] = ("train", "val")) -> Dict[str, str]:
    """Register ``<prefix>_train`` / ``<prefix>_val`` (COCO instances under ``root``) with
    ``register_coco_instances``, so configs can name them in ``DATASETS.TRAIN/TEST``.

    Re-registering the same name for the same files is a no-op; for other files the
    old entry is replaced. The files need not exist yet (detectron2 reads them lazily).

    Args:
        root: dataset root holding ``annotations/instances_{split}.json`` and ``{split}/``.
        prefix: dataset name prefix.
        splits: which splits to register.

    Returns:
        ``{dataset name: annotation json path}``.
    """
    root = os.path.abspath(os.fspath(root))
    out = {}
    for split in splits:
        rel_json, rel_images = TOY_SPLITS[split]
        name = f"{prefix}_{split}"
        json_file = os.path.join(root, rel_json)
        image_root = os.path.join(root, rel_images)
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            if getattr(meta, "json_file", None) == json_file and \
                    getattr(meta, "image_root", None) == image_root:
                out[name] = json_file
                continue
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        # the class names before the json is read (infer, demo), as reading it sets them
        register_coco_instances(name, _toy_thing_metadata(), json_file, image_root)
        out[name] = json_file
    return out


def toy_class_names(dataset_name: str) -> Optional[List[str]]:
    """The toy classes for the default toy dataset names (``toy_train`` / ``toy_val``:
    circle / square / triangle), else None: what ``rest-dense infer`` names the classes of
    a toy detection config by when nothing was registered under that name. Nothing is set
    in ``MetadataCatalog`` (a dataset of your own may use those names)."""
    if dataset_name in (f"toy_{split}" for split in TOY_SPLITS):
        from ..data.toy import TOY_CLASSES

        return list(TOY_CLASSES)
    return None


def _toy_thing_metadata() -> Dict[str, list]:
    from ..data.toy import TOY_CLASSES, TOY_PALETTE

    return dict(thing_classes=list(TOY_CLASSES), thing_colors=[list(c) for c in TOY_PALETTE[1:]])


def register_toy_sem_seg_datasets(root: Union[str, os.PathLike] = "data/toy",
                                  prefix: str = "toy_sem_seg",
                                  splits: Sequence[str] = ("train", "val")) -> Dict[str, str]:
    """Register ``<prefix>_train`` / ``<prefix>_val``: the toy scenes' label maps
    (``annotations/{training,validation}/*.png``: 0 background, 1 circle, 2 square, 3
    triangle) for detectron2's ``SemanticSegmentor``, evaluated by ``SemSegEvaluator``
    (``evaluator_type='sem_seg'``, ``ignore_label=255``, 4 ``stuff_classes``).

    Re-registering the same name for the same folders is a no-op; for other folders the
    old entry is replaced. The files need not exist yet (read when the dataset is used).

    Args:
        root: dataset root (``rest_dense.data.toy.generate_toy_dataset`` writes it).
        prefix: dataset name prefix.
        splits: which splits to register.

    Returns:
        ``{dataset name: label-map folder}``.
    """
    root = os.path.abspath(os.fspath(root))
    out = {}
    for split in splits:
        rel_gt, rel_images = TOY_SEM_SEG_SPLITS[split]
        name = f"{prefix}_{split}"
        gt_root, image_root = os.path.join(root, rel_gt), os.path.join(root, rel_images)
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            if getattr(meta, "sem_seg_root", None) == gt_root and \
                    getattr(meta, "image_root", None) == image_root:
                out[name] = gt_root
                continue
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(name, lambda gt=gt_root, img=image_root: load_sem_seg(
            gt, img, gt_ext="png", image_ext="png"))
        set_toy_sem_seg_metadata(prefix, (split,))
        MetadataCatalog.get(name).set(image_root=image_root, sem_seg_root=gt_root)
        out[name] = gt_root
    return out


def set_toy_sem_seg_metadata(prefix: str = "toy_sem_seg",
                             splits: Sequence[str] = ("train", "val")) -> None:
    """The toy label maps' class names and colours (``stuff_classes`` background / circle /
    square / triangle, ``stuff_colors``, ``ignore_label=255``, ``evaluator_type='sem_seg'``)
    in ``MetadataCatalog`` for ``<prefix>_<split>``, without registering any data.

    Run for the default names when :mod:`rest_dense.d2` is imported (as detectron2 does for
    its builtin datasets), so that ``rest-dense infer`` / ``demo`` of the toy semantic
    segmentation configs name the classes without a dataset on disk.
    :func:`register_toy_sem_seg_datasets` sets the same values (and the folders).
    """
    from ..data.toy import TOY_PALETTE, TOY_SEG_CLASSES

    for split in splits:
        MetadataCatalog.get(f"{prefix}_{split}").set(
            stuff_classes=list(TOY_SEG_CLASSES), stuff_colors=[list(c) for c in TOY_PALETTE],
            evaluator_type="sem_seg", ignore_label=255)


set_toy_sem_seg_metadata()
