"""The `peft-spectral` command line (also `python -m peft_spectral`).

Each sub-command lives in its own module of this package and exposes `add_parser(subparsers)`, which adds its
parser and sets `func` (called with the parsed arguments, returning an exit code). The options every command
shares, and the conventions they follow, are in `peft_spectral.cli._common` and at the top of `docs/cli.md`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Optional

from . import compress, cpi, demo, mix, tasks, train_svf
from ._common import progress_bars


#: Sub-command modules, in the order `--help` lists them.
COMMAND_MODULES = (demo, train_svf, mix, compress, cpi, tasks)


def build_parser() -> argparse.ArgumentParser:
    """The `peft-spectral` parser with every sub-command."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="peft-spectral",
        description="SVF + Transformer², SpectralCompress and CoreIsolation adapters for Hugging Face PEFT.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
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
    with progress_bars(not getattr(args, "no_progress", False)):
        return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
