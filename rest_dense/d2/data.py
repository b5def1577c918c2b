"""Registering the synthetic toy dataset (COCO layout) in detectron2's catalogs."""
from __future__ import annotations

import os
from typing import Dict, Sequence, Union

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

__all__ = ["register_toy_datasets", "TOY_SPLITS"]

#: split -> (annotation file relative to the root, image folder relative to the root)
TOY_SPLITS: Dict[str, tuple] = {
    "train": (os.path.join("annotations", "instances_train.json"), "train"),
    "val": (os.path.join("annotations", "instances_val.json"), "val"),
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
        register_coco_instances(name, {}, json_file, image_root)
        out[name] = json_file
    return out
