"""Argument types and the model loader shared by the `peft-spectral` subcommands."""

from __future__ import annotations

import argparse
from typing import Optional


def names(text: str) -> list[str]:
    """`"a, b,c"` → `["a", "b", "c"]`."""
    return [x.strip() for x in text.split(",") if x.strip()]


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from err


def floats(text: str) -> list[float]:
    """`"0.1,0.01"` → `[0.1, 0.01]`."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = number(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def load_model_or_exit(name: Optional[str]):
    """`(model, tokenizer)`: the embedded default model when `name` is None, else a local path or Hub id (fp32).

    A model that cannot be loaded ends the command with a message naming `--model`.
    """
    from ..assets import load_model

    try:
        return load_model(name)
    except OSError as err:
        raise SystemExit(f"--model {name!r}: cannot load it ({err})") from None
