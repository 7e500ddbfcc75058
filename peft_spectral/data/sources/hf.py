"""`hf:` — any dataset `datasets.load_dataset` reads: a Hub id (needs a network) or a builder with local files.

`hf:<path>[:<config>[:<split>]]?<parameters>`:

* `path`: a Hub id (`openai/gsm8k`), a local dataset directory, or a builder (`json`, `csv`, `parquet`) with
  `data_files=<file>`;
* `prompt=`, `target=`, `choices=`, `label=`, `test=`, `entry_point=`: which column holds each field of the
  package's record (see [`peft_spectral.data.records`]); by default the columns of the same names (and `input` /
  `question` for the prompt, `options` for the choices);
* any other parameter is passed to `load_dataset` (`data_files`, `revision`, ...).

With a split (`...:main:test`) that split is shuffled and cut by `fractions` (`max_examples` first); without one the
dataset's own `train` / `validation` / `test` splits are used where present (validation a seeded fifth of train when
missing), else all its rows are split like one.
"""

from __future__ import annotations

import random
from typing import Any, Optional

from ..records import task_from_records
from ..spec import TaskSpec
from ..types import Task
from .base import TaskSource


__all__ = ["HFSource"]

_FIELDS = ("prompt", "target", "choices", "label", "test", "entry_point")


def _records(rows, columns: dict[str, str]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        row = dict(row)
        for field, column in columns.items():
            if column not in row:
                raise ValueError(f"column {column!r} (for {field!r}) not in the dataset; columns: {sorted(row)}")
            row[field] = row.pop(column)
        out.append(row)
    return out


class HFSource(TaskSource):
    """`hf:<path>[:<config>[:<split>]]?...` through `datasets.load_dataset` (see the module docstring)."""

    prefix = "hf"
    description = "datasets.load_dataset: a Hub id (network) or json/csv/parquet with data_files=... (offline)"
    example = "hf:json?data_files=data/my_task.jsonl&prompt=question&target=answer"

    def _parts(self, spec: TaskSpec) -> tuple[str, Optional[str], Optional[str]]:
        parts = spec.name.split(":")
        if len(parts) > 3 or not parts[0]:
            raise self.error(spec, "expected hf:<path>[:<config>[:<split>]]")
        parts += [""] * (3 - len(parts))
        return parts[0], parts[1] or None, parts[2] or None

    def check(self, spec: TaskSpec) -> None:
        self._parts(spec)
        try:
            import datasets  # noqa: F401
        except ImportError as err:  # pragma: no cover - datasets is a dependency
            raise self.error(spec, f"needs the datasets package ({err})") from None

    def load(self, spec: TaskSpec, *, seed: int, max_examples: Optional[int], fractions) -> Task:
        from datasets import DatasetDict, load_dataset

        path, config, split = self._parts(spec)
        params = spec.param_dict
        columns = {f: str(params.pop(f)) for f in _FIELDS if f in params}
        try:
            loaded = load_dataset(path, config, split=split, **params)
        except Exception as err:
            raise self.error(spec, f"datasets.load_dataset failed: {type(err).__name__}: {err}") from None
        kwargs = {"description": f"{path} ({split or 'all splits'})", "spec": str(spec), "params": spec.param_dict}
        try:
            if isinstance(loaded, DatasetDict) and "train" in loaded and ("test" in loaded or "validation" in loaded):
                return task_from_records(self._own_splits(loaded, columns, seed), name=str(spec), **kwargs)
            rows = (
                [r for name in loaded for r in _records(loaded[name], columns)]
                if isinstance(loaded, DatasetDict)
                else _records(loaded, columns)
            )
            return task_from_records(
                rows, name=str(spec), seed=seed, max_examples=max_examples, fractions=fractions, **kwargs
            )
        except ValueError as err:
            raise self.error(spec, str(err)) from None

    @staticmethod
    def _own_splits(loaded, columns: dict[str, str], seed: int) -> list[dict[str, Any]]:
        """The dataset's own splits as records tagged with `split`; a missing validation split is a seeded fifth of
        train, a missing test split is the dataset's validation split."""
        train = [dict(r, split="train") for r in _records(loaded["train"], columns)]
        if "test" in loaded and "validation" in loaded:
            test = [dict(r, split="test") for r in _records(loaded["test"], columns)]
            return train + test + [dict(r, split="validation") for r in _records(loaded["validation"], columns)]
        held_out = [
            dict(r, split="test") for r in _records(loaded["test" if "test" in loaded else "validation"], columns)
        ]
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        for i in order[: len(train) // 5]:
            train[i]["split"] = "validation"
        return train + held_out
