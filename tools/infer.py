#!/usr/bin/env python
"""Run a trained model on images: ``rest-dense infer`` (see its ``--help``).

    python tools/infer.py configs/toy/mask_rcnn_restv2_toy.py iter_600.pth data/toy/val --out out/
"""
import sys

from rest_dense.cli import main

if __name__ == "__main__":
    sys.exit(main(["infer", *sys.argv[1:]]))
