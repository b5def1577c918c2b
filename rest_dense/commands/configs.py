"""List the configs shipped with rest_dense, or print the path of one.

Examples::

    rest-dense configs                       # every config, with its framework
    rest-dense configs 'mask_rcnn/*'         # a shell-style filter
    rest-dense configs --framework mmseg
    rest-dense configs --path upernet/upernet_restv2-t_8xb2-160k_ade20k-512x512.py
"""
from __future__ import annotations

import argparse
import sys

from ..utils import error_text

HELP = "list the shipped configs (or print one's path)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pattern", nargs="?", default="*",
                        help="shell-style filter on the config name (default: all); a word "
                        "without wildcards matches the names that contain it")
    parser.add_argument("--framework",
                        choices=["mmdet", "mmseg", "d2", "d2-lazy", "openmmlab", "detectron2"],
                        help="only configs of this framework (d2: detectron2 yaml, d2-lazy: "
                        "LazyConfig) or family (openmmlab, detectron2)")
    parser.add_argument("--path", metavar="NAME", help="print the absolute path of one config")


def run(args: argparse.Namespace) -> int:
    from ..configs import (config_framework, configs_root, framework_family, get_config_path,
                           list_configs)

    if args.path is not None:
        if not args.path.strip():
            print("rest-dense configs: error: --path needs a config name", file=sys.stderr)
            return 2
        try:
            path = get_config_path(args.path)
        except FileNotFoundError as err:
            print(f"rest-dense configs: error: {error_text(err)}", file=sys.stderr)
            return 2
        try:
            kind = config_framework(path) if args.framework else None
        except ValueError:  # a fragment (a _base_ schedule) belongs to no one framework
            kind = None
        if kind is not None and args.framework not in (kind, framework_family(kind)):
            print(f"rest-dense configs: error: {args.path} is a {kind} config, not "
                  f"{args.framework}", file=sys.stderr)
            return 2
        print(path)
        return 0
    word = args.pattern
    if word.startswith("rest_dense::"):  # the spelling configs inherit them by
        word = word[len("rest_dense::"):]
    pattern = word if any(c in word for c in "*?[") else f"*{word}*"
    try:
        names = list_configs(pattern, args.framework)
    except FileNotFoundError as err:  # an install without its configs
        print(f"rest-dense configs: error: {error_text(err)}", file=sys.stderr)
        return 2
    if not names:
        print(f"no shipped config matches {args.pattern!r}"
              + (f" for {args.framework}" if args.framework else ""))
        return 1
    width = max(len(n) for n in names)
    for name in names:
        print(f"{name:<{width}}  {config_framework(name)}")
    print(f"({len(names)} configs in {configs_root()})")
    return 0
