#!/usr/bin/env python
"""Train a config: the same as ``rest-dense train`` (see ``rest-dense train --help``).

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp] [key=value ...]
"""
import sys

from rest_dense.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
