"""The ``rest-dense`` command: one entry point over the package's jobs.

Each subcommand lives in :mod:`rest_dense.commands` as a module with ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``; this module only dispatches, and
imports a subcommand's module (and its framework) only when that subcommand runs.
The scripts in ``tools/`` call :func:`main` with their subcommand's name.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional, Sequence

from .version import __version__

__all__ = ["main", "build_parser", "SUBCOMMANDS"]

#: subcommand -> module of rest_dense.commands (help text is read from the module)
SUBCOMMANDS = {
    "configs": "configs",
    "demo": "demo",
    "train": "train",
    "test": "test",
    "flops": "flops",
    "bench": "bench",
    "convert": "convert",
    "export": "export",
    "infer": "infer",
    "export-model": "export_model",
}


def _command_module(name: str):
    return importlib.import_module(f"rest_dense.commands.{SUBCOMMANDS[name]}")


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """The argument parser; with ``only``, just that subcommand's modules are imported."""
    parser = argparse.ArgumentParser(
        prog="rest-dense",
        description="ResT / ResTv2 backbones for dense prediction: configs, training, testing, "
                    "FLOPs, benchmarks, checkpoint conversion and export.")
    parser.add_argument("--version", action="version", version=f"rest_dense {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        if only is not None and name != only:
            sub.add_parser(name, help="(see `rest-dense %s --help`)" % name, add_help=False)
            continue
        module = _command_module(name)
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
    parser.subcommand_parsers = sub.choices  # type: ignore[attr-defined]  (for their errors)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``rest-dense`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    argv: List[str] = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    only = first if first in SUBCOMMANDS else None
    parser = build_parser(only)
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported with the subcommand's usage, not the top level's
        sub = parser.subcommand_parsers.get(args.command) if args.command else None
        (sub or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(_command_module(args.command).run(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C: one line and the shell's status for SIGINT
        print(f"rest-dense {args.command}: interrupted", file=sys.stderr)
        return 130
    except ImportError as err:  # an optional dependency (a core install lacks it)
        from .utils import missing_package_hint

        hint = missing_package_hint(err)
        if hint is None:
            raise
        print(f"rest-dense {args.command}: error: {hint}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `rest-dense configs | head`: the reader left, nothing to report
        _silence_stdout()
        return 141  # the shell's status for SIGPIPE


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit raises no second error."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # a stdout without a file (pytest capture)
        pass


if __name__ == "__main__":
    sys.exit(main())
