#!/usr/bin/env python
"""Latency, throughput and peak memory: ``rest-dense bench`` (see its ``--help``).

    python tools/benchmark.py restv2_tiny --shape 800x1216 224x224 --batch 1 8 \
        --attn-impls sdpa math released --threads 2
"""
import sys

from rest_dense.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
