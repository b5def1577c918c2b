#!/usr/bin/env python
"""Export a detector / segmenter to ONNX and check it with ONNX Runtime: ``rest-dense export-model`` (see its ``--help``).

    python tools/export_model.py configs/toy/mask_rcnn_restv2_toy.py iter_600.pth --out mrcnn.onnx
"""
import sys

from rest_dense.cli import main

if __name__ == "__main__":
    sys.exit(main(["export-model", *sys.argv[1:]]))
