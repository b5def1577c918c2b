#!/usr/bin/env python
"""Build the model of MMDetection / MMSegmentation configs and print its parameter count.

Examples::

    python tools/count_params.py configs/upernet/upernet_restv2-t_8xb2-160k_ade20k-512x512.py
    python tools/count_params.py configs/mask_rcnn configs/retinanet   # every config below
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Iterable, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmengine.config import Config, DictAction  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Print the parameter count of config models.")
    parser.add_argument("configs", nargs="+", help="config files or directories (searched "
                        "recursively for *.py, skipping _base_ folders)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction,
                        help="override config entries, key=value (applied to every config)")
    parser.add_argument("--backbone", action="store_true", help="also print the backbone's count")
    return parser.parse_args(argv)


def expand(paths: Iterable[str]) -> List[str]:
    """Config files named directly or found under directories (``_base_`` excluded)."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if d != "_base_" and not d.startswith("__"))
                found += [os.path.join(root, f) for f in sorted(files) if f.endswith(".py")]
        else:
            found.append(path)
    return found


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from rest_dense.mm.utils import build_model, count_parameters

    for path in expand(args.configs):
        cfg = Config.fromfile(path)
        if args.cfg_options:
            cfg.merge_from_dict(args.cfg_options)
        model = build_model(cfg)
        line = f"{count_parameters(model) / 1e6:9.3f}M  {path}"
        if args.backbone:
            inner = getattr(model, "module", model)  # test-time-augmentation wrappers
            line += f"  (backbone {count_parameters(inner.backbone) / 1e6:.3f}M)"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
