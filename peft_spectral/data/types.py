"""The source-neutral contract every pipeline codes against: an [`Example`] and a [`Task`] with its splits.

Loaders (one per source, see [`peft_spectral.data.sources`]) fill them; training, evaluation, Transformer²,
SpectralCompress and CoreIsolation read them. Each example carries the [`~peft_spectral.data.scoring.Scorer`] that
judges an answer to it, so a new source or answer kind needs no change anywhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Optional


if TYPE_CHECKING:
    from .scoring import Scorer


__all__ = [
    "MC_INSTRUCTION",
    "SPLITS",
    "TASK_KINDS",
    "Example",
    "Task",
    "TaskKind",
    "check_kind",
    "format_options",
    "multiple_choice_prompt",
]

TaskKind = Literal["multiple_choice", "generation", "code"]
#: How a task asks for its answer: pick an option, write a short answer, or write code that is run against tests.
TASK_KINDS: tuple[str, ...] = ("multiple_choice", "generation", "code")
SPLITS: tuple[str, ...] = ("train", "validation", "test")

#: The instruction closing every multiple-choice prompt (after the lettered options).
MC_INSTRUCTION = "Answer with the correct option."


def check_kind(kind: Any, what: str = "kind") -> str:
    """`kind` if it is one of [`TASK_KINDS`], else a `ValueError` naming `what`."""
    if kind not in TASK_KINDS:
        raise ValueError(f"{what} must be one of {TASK_KINDS}, got {kind!r}")
    return kind


@dataclass(frozen=True)
class Example:
    """One labelled example.

    Args:
        prompt (`str`): The question as plain text, without any chat template (the evaluation code applies it).
        target (`str`): The gold answer text (the SFT target). For multiple choice, the gold option's text.
        choices (`tuple[str, ...]`): Option texts for multiple-choice examples; empty otherwise.
        label (`int`, *optional*): Index of the gold option in `choices`.
        meta (`dict`): Extra fields, e.g. HumanEval's `test` and `entry_point`, or a reasoning-gym `entry`.
        scorer ([`~peft_spectral.data.scoring.Scorer`], *optional*): What judges an answer to this example; `None`
            means the default scorer of the task's kind ([`~peft_spectral.data.scoring.scorer_for`]).
    """

    prompt: str
    target: str
    choices: tuple[str, ...] = ()
    label: Optional[int] = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    scorer: Optional[Scorer] = field(default=None, compare=False, hash=False, repr=False)


@dataclass
class Task:
    """A task with deterministic train / validation / test splits.

    Args:
        name (`str`): The task's name (for a loaded task, its canonical spec, e.g. `"rg:gcd?max_value=30"`).
        kind (`str`): `"multiple_choice"`, `"generation"` or `"code"`.
        train, validation, test (`list[Example]`): The splits.
        description (`str`): A one-line description (used by Transformer² dispatch prompts and model cards).
        spec (`str`): The canonical task spec it was loaded from (`""` for a task built in code).
        params (`dict`): The parameters that define the data (a generator's difficulty settings, a file, ...), as
            recorded in results, `expert.json` and model cards.
    """

    name: str
    kind: TaskKind
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    description: str = ""
    spec: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> list[Example]:
        """Return the split called `name` (`"train"`, `"validation"` or `"test"`)."""
        if name not in SPLITS:
            raise ValueError(f"split must be 'train', 'validation' or 'test', got {name!r}")
        return getattr(self, name)

    def info(self) -> dict[str, Any]:
        """What identifies the data: `name`, `spec`, `kind`, `description`, `params` and the split sizes (JSON-ready,
        for results files, `expert.json` and model cards)."""
        return {
            "name": self.name,
            "spec": self.spec or self.name,
            "kind": self.kind,
            "description": self.description,
            "params": dict(self.params),
            "sizes": {s: len(self.split(s)) for s in SPLITS},
        }


def format_options(choices: Sequence[str]) -> str:
    r"""`"A. first\\nB. second\\n..."` (at most 26 options)."""
    if len(choices) > 26:
        raise ValueError(f"at most 26 options can be lettered, got {len(choices)}")
    return "\n".join(f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(choices))


def multiple_choice_prompt(question: str, choices: Sequence[str], instruction: str = MC_INSTRUCTION) -> str:
    """The question, the lettered options and the instruction, separated by blank lines."""
    return f"{question.rstrip()}\n\nOptions:\n{format_options(choices)}\n\n{instruction}".rstrip()
