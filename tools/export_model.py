#!/usr/bin/env python
"""Thin wrapper: `rest-dense export-model` (see `rest-dense export-model --help`)."""
import sys

from rest_dense.cli import main

if __name__ == "__main__":
    sys.exit(main(["export-model", *sys.argv[1:]]))
