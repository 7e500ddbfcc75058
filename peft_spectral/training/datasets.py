"""Training data for SVF experts: TRL prompt(-completion) datasets from tasks, SFT targets and ±1 rewards."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

from ..data import TASK_KINDS, Example, Task
from ..data.answers import Extraction
from ..prompting import format_prompt, uses_chat_template
from ..rewards import checked_reward, make_reward, task_reward


__all__ = ["examples_to_dataset", "reward_for_task", "sft_answer", "task_dataset", "with_lettered_options"]

_LETTERED = re.compile(r"(?m)^\s*\(?A[.):]\s")


def with_lettered_options(
    example: Example, instruction: str = "Answer with the letter of the correct option."
) -> Example:
    """A multiple-choice example whose prompt lists its options as `A. ...`, `B. ...` and asks for the letter.

    Multiple-choice prompts from some sources do not show the options; a policy that generates its answer (RL) must see them. A prompt
    that already lists lettered options is returned unchanged. The options, label and target are kept, so the
    letter (`"B"`) and the option text are both scored right by [`peft_spectral.rewards.extract_choice`].
    """
    if not example.choices:
        raise ValueError(
            f"with_lettered_options needs a multiple-choice example, got one without choices: {example.prompt[:60]!r}"
        )
    if len(example.choices) > 26:
        raise ValueError(f"with_lettered_options supports at most 26 options, got {len(example.choices)}")
    if _LETTERED.search(example.prompt):
        return example
    options = "\n".join(f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(example.choices))
    prompt = f"{example.prompt.rstrip()}\n\nOptions:\n{options}\n\n{instruction}".rstrip()
    return Example(
        prompt=prompt, target=example.target, choices=example.choices, label=example.label, meta=example.meta
    )


def sft_answer(example: Example, kind: str, target: str = "answer") -> str:
    """The supervised target text of `example`.

    Multiple choice: `"B. <option>"` when the prompt lists lettered options (`A. ...`, `(A) ...`), else the option
    text; both are what [`peft_spectral.rewards.extract_choice`] reads back. Generation and code: `example.target`;
    with `target="solution"`, the worked solution a generator provides (`meta["solution"]`, e.g. reasoning-gym's
    `gsm_symbolic`) where there is one.
    """
    if target not in ("answer", "solution"):
        raise ValueError(f"target must be 'answer' or 'solution', got {target!r}")
    if target == "solution" and example.meta.get("solution"):
        return str(example.meta["solution"])
    if kind == "multiple_choice":
        if example.label is None or not example.choices:
            raise ValueError(
                f"multiple-choice example without choices/label cannot be an SFT target: {example.prompt[:60]!r}"
            )
        option = example.choices[example.label]
        if _LETTERED.search(example.prompt):
            return f"{chr(ord('A') + example.label)}. {option}"
        return option
    return example.target


def examples_to_dataset(
    examples: Sequence[Example],
    kind: str,
    *,
    tokenizer=None,
    conversational: Optional[bool] = None,
    with_completion: bool = False,
    sft_target: str = "answer",
):
    """A `datasets.Dataset` in TRL's prompt(-completion) format, keeping the columns the rewards read.

    Args:
        examples (`Sequence[Example]`): The examples.
        kind (`str`): `"multiple_choice"`, `"generation"` or `"code"`.
        tokenizer (*optional*): Decides `conversational` when it is `None` (a chat template → conversational).
        conversational (`bool`, *optional*): `True`: `prompt` is `[{"role": "user", ...}]` (TRL applies the chat
            template, exactly as [`peft_spectral.prompting.format_prompt`] does); `False`: plain strings, the prompt
            ending with a newline.
        with_completion (`bool`): Add a `completion` column (the [`sft_answer`]) for SFT.
        sft_target (`str`, defaults to `"answer"`): `"answer"` or `"solution"` (see [`sft_answer`]).

    Returns:
        `datasets.Dataset` with `prompt` [, `completion`], `example_index` (the row's position in `examples`, read by
        [`peft_spectral.rewards.task_reward`]) and, by kind, `choices`/`label`/`target` (multiple choice), `target`
        (generation), `test`/`entry_point`/`code_prompt`/`target` (code), for the column rewards of
        [`peft_spectral.rewards.make_reward`].
    """
    from datasets import Dataset

    if kind not in TASK_KINDS:
        raise ValueError(f"kind must be one of {TASK_KINDS}, got {kind!r}")
    examples = list(examples)
    if not examples:
        raise ValueError("examples is empty: nothing to train on")
    if conversational is None:
        conversational = tokenizer is not None and uses_chat_template(tokenizer)
    rows = []
    for index, ex in enumerate(examples):
        prompt_text = ex.prompt if conversational else format_prompt(tokenizer, ex, chat=False)
        row: dict[str, Any] = {
            "prompt": [{"role": "user", "content": ex.prompt}] if conversational else prompt_text,
            "target": ex.target,
            "example_index": index,
        }
        if kind == "multiple_choice":
            if not ex.choices or ex.label is None:
                raise ValueError(f"multiple-choice example needs `choices` and `label`: {ex.prompt[:60]!r}")
            row["choices"] = list(ex.choices)
            row["label"] = int(ex.label)
        elif kind == "code":
            row["test"] = ex.meta.get("test", "")
            row["entry_point"] = ex.meta.get("entry_point", "")
            row["code_prompt"] = ex.prompt
        if with_completion:
            answer = sft_answer(ex, kind, sft_target)
            row["completion"] = [{"role": "assistant", "content": answer}] if conversational else answer
        rows.append(row)
    return Dataset.from_list(rows)


def task_dataset(
    task: Task,
    split: str = "train",
    *,
    tokenizer=None,
    conversational: Optional[bool] = None,
    with_completion: bool = False,
    limit: Optional[int] = None,
):
    """[`examples_to_dataset`] of one split of a [`~peft_spectral.tasks.Task`] (the first `limit` examples)."""
    examples = task.split(split)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {limit}")
        examples = examples[:limit]
    if not examples:
        raise ValueError(f"task {task.name!r} has no {split!r} examples")
    return examples_to_dataset(
        examples, task.kind, tokenizer=tokenizer, conversational=conversational, with_completion=with_completion
    )


def reward_for_task(
    task_or_kind: Union[Task, Sequence[Example], str],
    *,
    kind: Optional[str] = None,
    positive: float = 1.0,
    negative: float = -1.0,
    extraction: Extraction = "strict",
    partial_credit: bool = False,
    **options,
) -> Callable:
    """The paper's reward for a task: +1 for a right answer, -1 (or `negative`) for a wrong one.

    With a [`Task`] (its train split) or a list of examples, each completion is judged by its example's own scorer
    ([`peft_spectral.rewards.task_reward`]; the dataset must come from [`examples_to_dataset`] of the same examples,
    which writes the `example_index` column), with `extraction` and optional partial credit. With a kind string, the
    column reward of that kind ([`peft_spectral.rewards.make_reward`]). Either way the function is wrapped by
    [`~peft_spectral.rewards.checked_reward`], so a NaN or `None` reward stops training with an error naming it.
    """
    if isinstance(task_or_kind, str):
        return checked_reward(make_reward(task_or_kind, positive=positive, negative=negative, **options))
    examples = task_or_kind.train if isinstance(task_or_kind, Task) else list(task_or_kind)
    kind = task_or_kind.kind if isinstance(task_or_kind, Task) else kind
    if options:
        raise ValueError(f"unknown option(s) {sorted(options)} for a task reward")
    return checked_reward(
        task_reward(
            examples,
            kind=kind,
            extraction=extraction,
            partial_credit=partial_credit,
            positive=positive,
            negative=negative,
        )
    )
