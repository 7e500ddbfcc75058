"""Reading a few-shot file: the package's JSON Lines records (see [`peft_spectral.data.records`])."""

from __future__ import annotations

from pathlib import Path
from typing import Union

from ..data import Example, read_jsonl_examples


def load_shots(path: Union[str, Path]) -> list[Example]:
    """Labelled examples from a JSONL file of records, in file order.

    Raises:
        `ValueError`: missing file, empty file, bad JSON, or a record without a prompt or a label (`path:line`).
    """
    try:
        return read_jsonl_examples(path)
    except FileNotFoundError as err:
        raise ValueError(f"shots file {str(path)!r} does not exist") from err
