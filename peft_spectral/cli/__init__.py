"""The `peft-spectral` command line (also `python -m peft_spectral`).

Each sub-command lives in its own module of this package and exposes `add_parser(subparsers)`, which adds its
parser and sets `func` (called with the parsed arguments, returning an exit code). The options every command
shares, and the conventions they follow, are in `peft_spectral.cli._common` and at the top of `docs/cli.md`.

Expected errors (a bad option, file, state or adapter: [`~peft_spectral.cli._common.CommandError`] and the package's
own error classes, see [`expected_errors`]) end a command with one line on stderr,
`peft-spectral COMMAND: error: MESSAGE`, and exit status 2; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Optional

from . import compress, cpi, demo, mix, tasks, train_svf
from ._common import CommandError, progress_bars


#: Sub-command modules, in the order `--help` lists them.
COMMAND_MODULES = (demo, train_svf, mix, compress, cpi, tasks)


class _Parser(argparse.ArgumentParser):
    """An `ArgumentParser` whose errors are one line (`PROG: error: MESSAGE (see PROG --help)`), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def expected_errors() -> tuple[type[BaseException], ...]:
    """The exception classes `main` reports as one line with exit status 2: bad inputs, not bugs."""
    from peft.utils.error import PeftError

    from ..adapter_io import AdapterLoadError
    from ..data import TaskSpecError
    from ..data.sources.bigbench import BigBenchUnavailableError
    from ..sandbox import SandboxUnavailableError
    from ..state import StateFileError
    from ..transformer2.library import ExpertLibraryError

    return (
        CommandError,
        AdapterLoadError,
        BigBenchUnavailableError,
        ExpertLibraryError,
        PeftError,  # e.g. NoMatchingPeftModuleError: --target-modules that match nothing
        SandboxUnavailableError,
        StateFileError,
        TaskSpecError,
    )


def build_parser() -> argparse.ArgumentParser:
    """The `peft-spectral` parser with every sub-command."""
    from .. import __version__

    parser = _Parser(
        prog="peft-spectral",
        description="SVF + Transformer², SpectralCompress and CoreIsolation adapters for Hugging Face PEFT.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in COMMAND_MODULES:
        module.add_parser(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run `peft-spectral` with `argv` (default: `sys.argv[1:]`); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with progress_bars(not getattr(args, "no_progress", False)):
            return int(args.func(args) or 0)
    except SystemExit as err:
        if not isinstance(err.code, str):  # argparse, --help, an exit status
            raise
        return _report(args.command, err.code)
    except Exception as err:
        if not isinstance(err, expected_errors()):
            raise
        return _report(args.command, str(err))


def _report(command: str, message: str) -> int:
    message = " ".join(message.split())
    prefix = f"peft-spectral {command}: "
    print(message if message.startswith(prefix) else f"{prefix}error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
