#!/usr/bin/env python
"""Write the synthetic toy-shapes dataset (COCO instances + ADE20K-style label maps).

    python tools/make_toy_data.py                      # -> data/toy (300 train / 50 val, 128 px)
    python tools/make_toy_data.py --out data/toy_big --num-train 2000 --size 192

The output is a pure function of the arguments (see :func:`rest_dense.data.toy.generate_toy_dataset`);
an existing dataset with the same parameters is left alone unless ``--overwrite`` is given.
"""
import argparse
import sys

from rest_dense.data.toy import generate_toy_dataset


def main(argv=None) -> int:
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
    args = p.parse_args(argv)
    paths = generate_toy_dataset(args.out, num_train=args.num_train, num_val=args.num_val, size=args.size,
                                 seed=args.seed, max_objects=args.max_objects,
                                 class_color_prob=args.class_color_prob, overwrite=args.overwrite)
    for key, path in paths.items():
        print(f"{key:17s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
