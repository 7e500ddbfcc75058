"""Compatibility names for code written against the package's first data layer; new code imports from
[`peft_spectral.data`], which holds every one of these.

`load_task` now takes task specs (`"rg:gcd?max_value=30"`, `"humaneval"`, `"jsonl:file.jsonl"`,
`"bigbench:navigate"`, ...); BigBench names work only where a copy of the BigBench data is configured (see
[`peft_spectral.data.sources.bigbench`]).
"""

from __future__ import annotations

from .data.loading import list_tasks, load_task
from .data.records import example_from_record, load_jsonl_task, task_from_dataset, task_from_records
from .data.sources.bigbench import load_bigbench_task, parse_bigbench_examples
from .data.sources.humaneval import HUMANEVAL_INSTRUCTION, humaneval_examples
from .data.splits import draw_shots, example_content, split_examples
from .data.types import MC_INSTRUCTION, Example, Task, TaskKind, format_options, multiple_choice_prompt


def load_humaneval(*, seed: int = 0, max_examples: int | None = None, fractions=(0.6, 0.2, 0.2)) -> Task:
    """HumanEval (164 problems, kind `"code"`): `load_task("humaneval", ...)`."""
    return load_task("humaneval", seed=seed, max_examples=max_examples, fractions=fractions)


__all__ = [
    "HUMANEVAL_INSTRUCTION",
    "MC_INSTRUCTION",
    "Example",
    "Task",
    "TaskKind",
    "draw_shots",
    "example_content",
    "example_from_record",
    "format_options",
    "humaneval_examples",
    "list_tasks",
    "load_bigbench_task",
    "load_humaneval",
    "load_jsonl_task",
    "load_task",
    "multiple_choice_prompt",
    "parse_bigbench_examples",
    "split_examples",
    "task_from_dataset",
    "task_from_records",
]
