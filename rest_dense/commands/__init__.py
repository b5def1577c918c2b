"""Subcommands of ``rest-dense`` (see :mod:`rest_dense.cli`): one module each, with ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``. Heavy imports happen inside ``run``."""


def fail(command: str, message: str, code: int = 2) -> int:
    """The one way a subcommand reports a refusal or a failure: one line,
    ``rest-dense COMMAND: error: MESSAGE``, on stderr; returns the exit status ``code``."""
    import sys

    print(f"rest-dense {command}: error: {message}", file=sys.stderr)
    return code
