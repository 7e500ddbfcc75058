"""TRL reward functions: answers scored by the task's own scorer, turned into rewards.

The reward functions follow TRL's reward-function signature: `fn(completions, **kwargs) -> list[float]`, where
`completions` are strings (standard datasets) or lists of chat messages (conversational datasets), and the dataset's
other columns arrive as lists in `kwargs`. Transformer² rewards a correct answer with +1 and a wrong one with -1.

* [`task_reward`] scores each completion with its example's [`~peft_spectral.data.scoring.Scorer`] (the dataset's
  `example_index` column, see [`peft_spectral.training.examples_to_dataset`]): any task of any source, partial credit
  where the scorer gives it.
* [`make_reward`] builds a reward for a task kind from plain columns (`target`, `choices` + `label`, `test` +
  `entry_point`), for datasets built without this package.

```python
from peft_spectral.rewards import make_reward
trainer = GRPOTrainer(..., reward_funcs=[make_reward("generation", negative=0.0)])
```
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

from .data.answers import (
    Extraction,
    check_extraction,
    extract_choice,
    extract_code,
    extract_number,
    normalize_answer,
    to_number,
)
from .data.scoring import (
    build_candidate,
    build_program,
    score_code,
    score_example,
    score_generation,
    score_multiple_choice,
)
from .data.types import Example


__all__ = [
    "build_candidate",
    "build_program",
    "checked_reward",
    "code_reward",
    "completion_text",
    "exact_match_reward",
    "extract_choice",
    "extract_code",
    "extract_number",
    "make_reward",
    "multiple_choice_reward",
    "normalize_answer",
    "numeric_match_reward",
    "score_code",
    "score_generation",
    "score_multiple_choice",
    "task_reward",
]

RewardFunc = Callable[..., list[float]]


def completion_text(completion: Any) -> str:
    """The text of one completion: a string, or the last message content of a conversational completion."""
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if isinstance(completion, (list, tuple)):
        contents = [completion_text(m) for m in completion]
        return contents[-1] if contents else ""
    return str(completion)


def _target_number(text: str):
    value = to_number(text)
    return value if value is not None else extract_number(text)


def _numbers_equal(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# TRL reward functions
# --------------------------------------------------------------------------------------------------------------------


def _column(kwargs: dict, name: str, n: int, fn_name: str) -> list:
    if name not in kwargs or kwargs[name] is None:
        raise ValueError(f"{fn_name} needs the dataset column {name!r} (got columns {sorted(kwargs)})")
    values = list(kwargs[name])
    if len(values) != n:
        raise ValueError(f"{fn_name}: column {name!r} has {len(values)} values for {n} completions")
    return values


def _reward(ok: bool, positive: float, negative: float) -> float:
    return float(positive if ok else negative)


def _targets_of(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def numeric_match_reward(
    completions: list, *, target: list | None = None, positive: float = 1.0, negative: float = -1.0, **kwargs
):
    """+1 when the completion's final number (`#### x`, else the last number; commas allowed) equals `target`."""
    targets = _column({"target": target}, "target", len(completions), "numeric_match_reward")
    out = []
    for completion, gold in zip(completions, targets):
        predicted = extract_number(completion_text(completion))
        values = [v for v in (_target_number(t) for t in _targets_of(gold)) if v is not None]
        out.append(
            _reward(predicted is not None and any(_numbers_equal(predicted, v) for v in values), positive, negative)
        )
    return out


def multiple_choice_reward(completions: list, *, positive: float = 1.0, negative: float = -1.0, **kwargs):
    """+1 when the completion picks the gold option, by letter or by text (columns `choices` and `label`)."""
    n = len(completions)
    choices = _column(kwargs, "choices", n, "multiple_choice_reward")
    labels = _column(kwargs, "label", n, "multiple_choice_reward")
    return [
        _reward(score_multiple_choice(completion_text(c), list(opts), lab), positive, negative)
        for c, opts, lab in zip(completions, choices, labels)
    ]


def exact_match_reward(
    completions: list, *, target: list | None = None, positive: float = 1.0, negative: float = -1.0, **kwargs
):
    """+1 on a normalised exact match with `target` (a string or a list of accepted strings), or equal numbers."""
    targets = _column({"target": target}, "target", len(completions), "exact_match_reward")
    return [
        _reward(score_generation(completion_text(c), _targets_of(t)), positive, negative)
        for c, t in zip(completions, targets)
    ]


def code_reward(
    completions: list,
    *,
    positive: float = 1.0,
    negative: float = -1.0,
    timeout: float = 5.0,
    memory_mb: int = 512,
    **kwargs,
):
    """+1 when the completion passes its HumanEval tests, judged by [`score_code`] (two sandboxes, see
    `docs/security.md`).

    Columns: `test`, `entry_point`, and optionally `code_prompt` (the function stub the completion continues; else
    TRL's `prompts` when they are plain strings).
    """
    n = len(completions)
    tests = _column(kwargs, "test", n, "code_reward")
    entry_points = _column(kwargs, "entry_point", n, "code_reward")
    prompts = kwargs.get("code_prompt") or kwargs.get("prompts") or [""] * n
    out = []
    for completion, test, entry, prompt in zip(completions, tests, entry_points, prompts):
        prompt = prompt if isinstance(prompt, str) else ""  # conversational prompts carry no code stub
        ok = score_code(
            completion_text(completion),
            test=test,
            entry_point=entry,
            prompt=prompt,
            timeout=timeout,
            memory_mb=memory_mb,
        )
        out.append(_reward(ok, positive, negative))
    return out


def task_reward(
    examples: Sequence[Example],
    *,
    kind: str | None = None,
    extraction: Extraction = "strict",
    partial_credit: bool = False,
    positive: float = 1.0,
    negative: float = -1.0,
    name: str = "task_reward",
) -> RewardFunc:
    """A TRL reward scoring each completion with the scorer of its example
    ([`~peft_spectral.data.scoring.scorer_for`]).

    The dataset must carry an `example_index` column: the position of each row's example in `examples` (what
    [`peft_spectral.training.examples_to_dataset`] writes for the same list).

    Args:
        examples (`Sequence[Example]`): The examples the dataset was built from, in the same order.
        kind (`str`, *optional*): The task kind, for examples that carry no scorer.
        extraction (`str`, defaults to `"strict"`): How the answer is read ([`peft_spectral.data.answers`]): strict
            rewards the bare answer only, so RL also teaches the answer format.
        partial_credit (`bool`, defaults to `False`): Reward `negative + (positive - negative) * score` with the
            scorer's score in [0, 1] (partial credit of verifiers that give it), instead of `positive` only for a
            correct answer.
        positive, negative (`float`, defaults to 1.0 and -1.0): Rewards of a correct and a wrong answer.
        name (`str`): The name TRL logs the reward under.
    """
    examples = list(examples)
    check_extraction(extraction)
    if not examples:
        raise ValueError("task_reward needs the examples the dataset was built from")

    def reward(completions, **kwargs):
        indices = _column(kwargs, "example_index", len(completions), name)
        out = []
        for completion, index in zip(completions, indices):
            if not isinstance(index, int) or not 0 <= index < len(examples):
                raise ValueError(f"{name}: example_index {index!r} is not a position in the {len(examples)} examples")
            score = score_example(completion_text(completion), examples[index], kind=kind, extraction=extraction)
            if not partial_credit:
                score = 1.0 if score >= 1.0 - 1e-9 else 0.0
            out.append(float(negative + (positive - negative) * score))
        return out

    reward.__name__ = reward.__qualname__ = name
    return reward


_BY_KIND: dict[str, RewardFunc] = {
    "numeric": numeric_match_reward,
    "multiple_choice": multiple_choice_reward,
    "generation": exact_match_reward,
    "exact_match": exact_match_reward,
    "code": code_reward,
}


def make_reward(kind: str, *, positive: float = 1.0, negative: float = -1.0, **options) -> RewardFunc:
    """A TRL reward function for a task kind.

    Args:
        kind (`str`): `"numeric"`, `"multiple_choice"`, `"generation"` (= `"exact_match"`) or `"code"`.
        positive (`float`, defaults to 1.0): Reward for a correct completion.
        negative (`float`, defaults to -1.0): Reward for a wrong one (`0.0` gives 0/1 rewards).
        options: Extra keyword arguments for the reward (e.g. `timeout`, `memory_mb` for code).

    Returns:
        A callable `fn(completions, **kwargs) -> list[float]` with a `__name__` TRL can log.
    """
    if kind not in _BY_KIND:
        raise ValueError(f"kind must be one of {sorted(_BY_KIND)}, got {kind!r}")
    base = _BY_KIND[kind]

    def reward(completions, **kwargs):
        return base(completions, positive=positive, negative=negative, **options, **kwargs)

    reward.__name__ = reward.__qualname__ = base.__name__ if negative == -1.0 else f"{base.__name__}_{negative:g}"
    reward.__doc__ = base.__doc__
    return reward


def checked_reward(fn: RewardFunc) -> RewardFunc:
    """Wrap a reward function so that a `None`, NaN or infinite reward raises a `ValueError` naming the function.

    Wrapping twice is a no-op: an already checked function is returned as is.
    """
    if getattr(fn, "_peft_spectral_checked", False):
        return fn
    name = getattr(fn, "__name__", repr(fn))

    @functools.wraps(fn)
    def wrapper(completions, **kwargs):
        rewards = fn(completions, **kwargs)
        if rewards is None:
            raise ValueError(f"reward function {name!r} returned None instead of a list of floats")
        rewards = list(rewards)
        if len(rewards) != len(completions):
            raise ValueError(
                f"reward function {name!r} returned {len(rewards)} rewards for {len(completions)} completions"
            )
        for i, value in enumerate(rewards):
            if value is None:
                raise ValueError(f"reward function {name!r} returned None for completion {i}")
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ValueError(
                    f"reward function {name!r} returned a non-number {value!r} for completion {i}"
                ) from None
            if not math.isfinite(number):
                raise ValueError(f"reward function {name!r} returned {number} for completion {i}")
        return [float(v) for v in rewards]

    wrapper._peft_spectral_checked = True
    return wrapper
