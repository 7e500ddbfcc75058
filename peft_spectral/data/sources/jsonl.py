"""`jsonl:` — a JSON Lines file of the package's records (see [`peft_spectral.data.records`])."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..records import load_jsonl_task
from ..spec import TaskSpec
from ..types import Task, check_kind
from .base import TaskSource


__all__ = ["JsonlSource"]

_PARAMS = ("kind", "name", "description")


class JsonlSource(TaskSource):
    """`jsonl:<path>[?kind=...&name=...&description=...]` — records from a file; a bare `*.jsonl` path works too."""

    prefix = "jsonl"
    description = "your own JSON Lines file: prompt + target, choices + label, or test + entry_point per line"
    example = "jsonl:data/my_task.jsonl"

    def owns(self, name: str) -> bool:
        return name.endswith(".jsonl") or Path(name).is_file()

    def check(self, spec: TaskSpec) -> None:
        unknown = [k for k, _ in spec.params if k not in _PARAMS]
        if unknown:
            raise self.error(spec, f"unknown parameter(s) {unknown}; a jsonl task takes {', '.join(_PARAMS)}")
        kind = spec.param_dict.get("kind")
        if kind is not None:
            try:
                check_kind(kind, "kind")
            except ValueError as err:
                raise self.error(spec, str(err)) from None
        if not Path(spec.name).is_file():
            raise self.error(spec, f"no such file: {spec.name}")

    def load(self, spec: TaskSpec, *, seed: int, max_examples: Optional[int], fractions) -> Task:
        self.check(spec)
        params = spec.param_dict
        try:
            return load_jsonl_task(
                spec.name,
                name=params.get("name"),
                kind=params.get("kind"),
                description=str(params.get("description", "")),
                seed=seed,
                max_examples=max_examples,
                fractions=fractions,
            )
        except (ValueError, FileNotFoundError) as err:
            raise self.error(spec, str(err)) from None
