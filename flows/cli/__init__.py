"""The ``prostate-cohort`` command line: parse arguments, make one call, print the outcome.

Exit codes: 0 success; 1 some patients failed (their errors are printed and recorded);
2 invalid settings or arguments.

:func:`main` parses the arguments first (:mod:`flows.cli.parser` imports nothing heavy, so
``--help`` and argument errors answer at once) and only then imports the command machinery
(settings, image libraries, Prefect) in :mod:`flows.cli.commands`.
"""

from __future__ import annotations

from flows.cli.parser import build_parser

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from flows.cli.commands import run_command  # noqa: PLC0415 - after parsing, on purpose

    return run_command(args)
