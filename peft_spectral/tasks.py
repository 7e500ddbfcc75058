"""Offline tasks: real data turned into prompts, reference answers and scorers.

The data classes here are the contract every pipeline (TRL training, Transformer² mixing, SpectralCompress,
CoreIsolation) codes against. Loaders for BigBench, HumanEval and user JSONL fill them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

TaskKind = Literal["multiple_choice", "generation", "code"]


@dataclass(frozen=True)
class Example:
    """One labelled example.

    Args:
        prompt (`str`): The question as plain text, without any chat template (the evaluation code applies it).
        target (`str`): The gold answer text. For multiple choice, the gold option's text.
        choices (`tuple[str, ...]`): Option texts for multiple-choice examples; empty otherwise.
        label (`int`, *optional*): Index of the gold option in `choices`.
        meta (`dict`): Extra fields, e.g. HumanEval's `test` and `entry_point`.
    """

    prompt: str
    target: str
    choices: tuple[str, ...] = ()
    label: int | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class Task:
    """A task with deterministic train / validation / test splits.

    Args:
        name (`str`): The task name, e.g. BigBench's `"epistemic_reasoning"`.
        kind (`str`): `"multiple_choice"`, `"generation"` or `"code"`.
        train, validation, test (`list[Example]`): The splits.
        description (`str`): A one-line description (used by Transformer² dispatch prompts).
    """

    name: str
    kind: TaskKind
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    description: str = ""

    def split(self, name: str) -> list[Example]:
        """Return the split called `name` (`"train"`, `"validation"` or `"test"`)."""
        if name not in ("train", "validation", "test"):
            raise ValueError(f"split must be 'train', 'validation' or 'test', got {name!r}")
        return getattr(self, name)
