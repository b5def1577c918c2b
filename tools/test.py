#!/usr/bin/env python
"""Evaluate a checkpoint: the same as ``rest-dense test`` (see ``rest-dense test --help``).

    python tools/test.py CONFIG CHECKPOINT [--tta] [--show-dir DIR] [--weights-only] [key=value ...]
"""
import sys

from rest_dense.cli import main

if __name__ == "__main__":
    sys.exit(main(["test", *sys.argv[1:]]))
