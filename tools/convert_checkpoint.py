#!/usr/bin/env python
"""Convert a ResT checkpoint between layouts: ``rest-dense convert`` (see its ``--help``).

    python tools/convert_checkpoint.py restv2_tiny_224.pth restv2_tiny_mm.pth --to mmdet
"""
import sys

from rest_dense.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
