#!/usr/bin/env python
"""Thin wrapper: `rest-dense infer` (see `rest-dense infer --help`)."""
import sys

from rest_dense.cli import main

if __name__ == "__main__":
    sys.exit(main(["infer", *sys.argv[1:]]))
