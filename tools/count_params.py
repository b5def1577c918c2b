#!/usr/bin/env python
"""Parameter counts of models and configs: ``rest-dense flops --params-only`` (see its ``--help``).

    python tools/count_params.py configs/mask_rcnn configs/retinanet configs/upernet
"""
import sys

from rest_dense.cli import main

if __name__ == "__main__":
    sys.exit(main(["flops", "--params-only", *sys.argv[1:]]))
