#!/usr/bin/env python
"""Write the synthetic toy-shapes dataset (COCO instances + ADE20K-style label maps).

    python tools/make_toy_data.py                      # -> data/toy (300 train / 50 val, 128 px)
    python tools/make_toy_data.py --out data/toy_big --num-train 2000 --size 192

The output is a pure function of the arguments (see ``rest_dense/data/toy.py``); an existing
dataset with the same parameters is left alone unless ``--overwrite`` is given.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from rest_dense.data.toy import generate_toy_dataset  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/toy", help="dataset root (default: data/toy)")
    p.add_argument("--num-train", type=int, default=300, help="training images (default: 300)")
    p.add_argument("--num-val", type=int, default=50, help="validation images (default: 50)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default: 128)")
    p.add_argument("--max-objects", type=int, default=4, help="most shapes per image (default: 4)")
    p.add_argument("--class-color-prob", type=float, default=0.75,
                   help="probability that a shape is coloured from its class's hue range (default: 0.75)")
    p.add_argument("--seed", type=int, default=0, help="base random seed (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="regenerate even if a matching dataset exists")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    paths = generate_toy_dataset(args.out, num_train=args.num_train, num_val=args.num_val, size=args.size,
                                 seed=args.seed, max_objects=args.max_objects,
                                 class_color_prob=args.class_color_prob, overwrite=args.overwrite)
    with open(os.path.join(args.out, "toy_meta.json")) as f:
        stats = json.load(f)["stats"]
    print(f"toy dataset at {paths['root']} ({time.time() - t0:.1f} s): "
          + ", ".join(f"{k}: {v['images']} images / {v['instances']} shapes" for k, v in stats.items()))
    for key in ("train_json", "val_json", "train_seg_labels", "val_seg_labels"):
        print(f"  {key:17s} {paths[key]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
