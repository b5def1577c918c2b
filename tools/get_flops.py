#!/usr/bin/env python
"""Parameters and FLOPs of backbones and whole models: ``rest-dense flops`` (see its ``--help``).

    python tools/get_flops.py restv2_tiny --shape 800x1280
    python tools/get_flops.py mask_rcnn/mask-rcnn_restv2-t_fpn_amp-ms-1x_coco.py
"""
import sys

from rest_dense.cli import main

if __name__ == "__main__":
    sys.exit(main(["flops", *sys.argv[1:]]))
