"""The package's one record format (JSON Lines files, `datasets` rows, few-shot files) and tasks built from it.

One record is one JSON object:

| kind | required keys | optional keys |
|---|---|---|
| generation | `prompt`, `target` (a string, or a list of accepted answers) | |
| multiple choice | `prompt`, `choices` (≥ 2 strings), `label` (index) or `target` (the gold option's text) | |
| code | `prompt`, `test`, `entry_point` | `target` (a reference solution) |

`input` or `question` may stand for `prompt`, `options` for `choices`. A record may name its split (`"split":
"train" | "validation" | "test"`); when every record does, the file's own splits are used as given. Any other key is
kept in `Example.meta`. Multiple-choice prompts that do not list their options get them lettered (`A. ...`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

from .splits import drop_seen, example_content, make_task
from .types import SPLITS, Example, Task, TaskKind, check_kind, multiple_choice_prompt


__all__ = [
    "example_from_record",
    "load_jsonl_task",
    "read_jsonl",
    "read_jsonl_examples",
    "task_from_dataset",
    "task_from_records",
]

_PROMPT_KEYS = ("prompt", "input", "question")
_CHOICE_KEYS = ("choices", "options")
_RESERVED = {"prompt", "input", "question", "choices", "options", "label", "target", "split"}
_LETTERED = re.compile(r"(?m)^\s*\(?A[.):]\s")


def example_from_record(record: Any, index: int = 0, where: str = "record") -> tuple[Example, TaskKind]:
    """An [`Example`] and its kind from one record (see the module docstring for the format).

    Args:
        record (`dict`): The record.
        index (`int`): Its position, for error messages.
        where (`str`): How errors name it (e.g. `"data.jsonl:12"`); `"record"` gives `"record <index>"`.
    """
    at = f"{where} {index}" if where == "record" else where
    if not isinstance(record, dict):
        raise ValueError(f"{at} must be a JSON object, got {type(record).__name__}")
    prompt = next((record[k] for k in _PROMPT_KEYS if k in record), None)
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{at} needs a non-empty string 'prompt' (or 'input' / 'question'); keys: {sorted(record)}")
    meta = {k: v for k, v in record.items() if k not in _RESERVED}
    if "question" not in meta:
        meta["question"] = prompt
    choices = next((record[k] for k in _CHOICE_KEYS if k in record), None)
    target = record.get("target")
    if choices is not None:
        if not isinstance(choices, (list, tuple)) or len(choices) < 2:
            raise ValueError(f"{at}: 'choices' must be a list of at least two options")
        choices = tuple(str(c) for c in choices)
        label = record.get("label")
        if label is None and target is not None and str(target) in choices:
            label = choices.index(str(target))
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
            raise ValueError(
                f"{at}: 'label' must be an index into 'choices' (or 'target' one of the options), got {label!r}"
            )
        if not _LETTERED.search(prompt):
            prompt = multiple_choice_prompt(prompt, choices)
        return Example(prompt, choices[label], choices, label, meta), "multiple_choice"
    if isinstance(target, (list, tuple)):
        if not target:
            raise ValueError(f"{at}: 'target' is an empty list")
        meta["targets"] = [str(t) for t in target]
        target = target[0]
    if "test" in record and "entry_point" in record:
        meta.setdefault("code_prompt", prompt)
        return Example(prompt, "" if target is None else str(target), (), None, meta), "code"
    if target is None or str(target) == "":
        raise ValueError(f"{at} needs 'target', or 'choices' and 'label' (keys: {sorted(record)})")
    return Example(prompt, str(target), (), None, meta), "generation"


def _record_split(record: dict, where: str) -> Optional[str]:
    split = record.get("split") if isinstance(record, dict) else None
    if split is not None and split not in SPLITS:
        raise ValueError(f"{where}: 'split' must be one of {SPLITS}, got {split!r}")
    return split


def task_from_records(
    records: Iterable[dict],
    *,
    name: str,
    kind: Optional[TaskKind] = None,
    description: str = "",
    seed: int = 0,
    max_examples: Optional[int] = None,
    fractions=(0.6, 0.2, 0.2),
    spec: str = "",
    params: Optional[dict] = None,
    where: Optional[list[str]] = None,
) -> Task:
    """A [`Task`] from records; `kind` is inferred when all records agree.

    When every record names its `split`, those splits are kept (test and validation questions that repeat an earlier
    split's are dropped; `seed`, `max_examples` and `fractions` are not used); otherwise the records are shuffled
    with `seed` and split by `fractions`.
    """
    records = list(records)
    if not records:
        raise ValueError(f"task {name!r} has no records")
    where = where or [f"record {i}" for i in range(len(records))]
    parsed = [example_from_record(r, i, w) for i, (r, w) in enumerate(zip(records, where))]
    kinds = {k for _, k in parsed}
    if kind is None:
        if len(kinds) > 1:
            raise ValueError(f"task {name!r} mixes record kinds {sorted(kinds)}; pass kind=")
        kind = kinds.pop()  # type: ignore[assignment]
    check_kind(kind)
    splits = [_record_split(r, w) for r, w in zip(records, where)]
    if all(s is not None for s in splits):
        by_split: dict[str, list[Example]] = {s: [] for s in SPLITS}
        for (example, _), split in zip(parsed, splits):
            by_split[split].append(example)  # type: ignore[index]
        seen = {example_content(ex) for ex in by_split["train"]}
        validation = drop_seen(by_split["validation"], seen)
        test = drop_seen(by_split["test"], seen)
        return Task(name, kind, by_split["train"], validation, test, description, spec, dict(params or {}))  # type: ignore[arg-type]
    if any(s is not None for s in splits):
        raise ValueError(f"task {name!r}: some records name a 'split' and some do not; name it in all or in none")
    return make_task(
        name,
        kind,  # type: ignore[arg-type]
        [e for e, _ in parsed],
        description=description,
        seed=seed,
        max_examples=max_examples,
        fractions=fractions,
        spec=spec,
        params=params,
    )


def read_jsonl(path: str | os.PathLike) -> tuple[list[dict], list[str]]:
    """The records of a JSONL file and their `path:line` locations (blank lines skipped).

    Raises:
        `FileNotFoundError`: when `path` is not a file. `ValueError`: on a line that is not JSON (line number given).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file not found: {path}")
    records, where = [], []
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({err})") from err
            where.append(f"{path}:{lineno}")
    if not records:
        raise ValueError(f"{path} holds no records")
    return records, where


def read_jsonl_examples(path: str | os.PathLike) -> list[Example]:
    """Every record of a JSONL file as an [`Example`], in file order (e.g. labelled shots for Transformer²'s CEM)."""
    records, where = read_jsonl(path)
    return [example_from_record(r, i, w)[0] for i, (r, w) in enumerate(zip(records, where))]


def load_jsonl_task(
    path: str | os.PathLike,
    *,
    name: Optional[str] = None,
    kind: Optional[TaskKind] = None,
    description: str = "",
    seed: int = 0,
    max_examples: Optional[int] = None,
    fractions=(0.6, 0.2, 0.2),
) -> Task:
    """A task from a JSONL file of records (see the module docstring).

    Args:
        name (`str`, *optional*): Task name; defaults to the file's stem (its spec is `jsonl:<path>`).
    """
    records, where = read_jsonl(path)
    spec = f"jsonl:{path}"
    return task_from_records(
        records,
        name=name or Path(path).stem,
        kind=kind,
        description=description or f"questions from {Path(path).name}",
        seed=seed,
        max_examples=max_examples,
        fractions=fractions,
        spec=spec,
        params={"path": str(path)},
        where=where,
    )


def task_from_dataset(
    dataset,
    *,
    name: str,
    kind: Optional[TaskKind] = None,
    description: str = "",
    seed: int = 0,
    max_examples: Optional[int] = None,
    fractions=(0.6, 0.2, 0.2),
) -> Task:
    """A task from a `datasets.Dataset` (or any iterable of dicts) of records."""
    return task_from_records(
        (dict(row) for row in dataset),
        name=name,
        kind=kind,
        description=description,
        seed=seed,
        max_examples=max_examples,
        fractions=fractions,
    )
