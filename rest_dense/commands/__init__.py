"""Subcommands of ``rest-dense`` (see :mod:`rest_dense.cli`): one module each, with ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``. Heavy imports happen inside ``run``."""
