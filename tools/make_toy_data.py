#!/usr/bin/env python
"""Write the synthetic toy-shapes dataset (COCO instances + ADE20K-style label maps).

    python tools/make_toy_data.py                      # -> data/toy (300 train / 50 val, 128 px)
    python tools/make_toy_data.py --out data/toy_big --num-train 2000 --size 192

The same as ``python -m rest_dense.data.toy`` (which an installed wheel has too); see
:func:`rest_dense.data.toy.main`.
"""
import sys

from rest_dense.data.toy import main

if __name__ == "__main__":
    sys.exit(main())
