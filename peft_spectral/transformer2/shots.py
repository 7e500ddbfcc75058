"""Reading a few-shot file: JSON Lines of labelled examples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

from ..tasks import Example


_PROMPT_KEYS = ("prompt", "input", "question")
_CHOICE_KEYS = ("choices", "options")


def load_shots(path: Union[str, Path]) -> list[Example]:
    """Read labelled examples from a JSONL file, one object per line.

    Each line has a prompt (`prompt`, `input` or `question`) and either options (`choices`/`options`, a list of
    strings) with the gold option as `label` (its index) or `target` (its text), or, for generation, a `target`.

    Raises:
        `ValueError`: missing file, empty file, bad JSON, or a line without a prompt or a label (line number given).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"shots file {str(path)!r} does not exist")
    out: list[Example] = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({err})") from err
        prompt = next((row[k] for k in _PROMPT_KEYS if k in row), None)
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{path}:{lineno}: no prompt (one of {_PROMPT_KEYS})")
        choices = next((row[k] for k in _CHOICE_KEYS if k in row), None) or []
        label, target = row.get("label"), row.get("target")
        if choices:
            choices = tuple(str(c) for c in choices)
            if label is None and target is not None and str(target) in choices:
                label = choices.index(str(target))
            if not isinstance(label, int) or not 0 <= label < len(choices):
                raise ValueError(f"{path}:{lineno}: multiple-choice line without a valid 'label' (or 'target' option)")
            out.append(Example(prompt=prompt, target=choices[label], choices=choices, label=label))
        else:
            if target is None or str(target) == "":
                raise ValueError(f"{path}:{lineno}: no 'target' answer (shots must be labelled)")
            out.append(Example(prompt=prompt, target=str(target)))
    if not out:
        raise ValueError(f"shots file {str(path)!r} holds no examples")
    return out
