#!/usr/bin/env python
"""Export a ResT backbone to ONNX and check it: ``rest-dense export`` (see its ``--help``).

    python tools/export_onnx.py restv2_tiny --attn-mode hwin --out restv2_tiny_hwin.onnx
"""
import sys

from rest_dense.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
