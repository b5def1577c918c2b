#!/usr/bin/env python
"""End-to-end demo on synthetic toy data: the same as ``rest-dense demo``
(see ``rest-dense demo --help``).

    python tools/demo.py [--task det|seg|all] [--max-iters N] [--threads N] [--work-dir DIR]
"""
import os
import sys

# OpenMP threads that spin while waiting make small CPU models crawl when the cores are
# shared with other work; must be set before torch is imported (an explicit setting wins).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from rest_dense.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
