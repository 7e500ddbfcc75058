"""Answer ranking: a generation task's questions as multiple choice among the gold answer and near misses.

A small model that never gives the bare answer a prompt asks for scores 0 by strict extraction whatever a
truncation does, and generating answers for every candidate of a search costs minutes on a CPU. Ranking candidate
answers by their log-likelihood needs one forward pass per question and measures what C2I's gradient pass optimises
(the gold answer's NLL):

```python
from peft_spectral.compress.ranking import ranking_task
from peft_spectral.data import load_task

task = ranking_task(load_task("rg:gcd?max_value=100"), n_options=4)
task.kind, task.test[0].choices, task.test[0].label   # "multiple_choice", ("9", "8", "10", "18"), 1
```
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

from ..data import Example, Task
from ..data.answers import to_number


__all__ = ["NEAR_MISSES", "answer_ranking", "ranking_task"]

#: Offsets of the wrong candidates of an integer answer, nearest first.
NEAR_MISSES = (1, -1, 2, -2, 3, -3, 10, -10, 20, -20)


def answer_ranking(examples: Sequence[Example], n_options: int = 4, seed: int = 0) -> list[Example]:
    """Each example with `n_options` candidate answers: its gold answer and `n_options - 1` wrong ones.

    The wrong ones of an integer answer are drawn from its `2 * n_options` nearest [`NEAR_MISSES`] (a non-negative
    answer keeps non-negative candidates); of any other answer, from the other gold answers of `examples`. The draw
    and the gold answer's position are seeded.

    Args:
        examples (`Sequence[Example]`): Generation examples (`target` is the gold answer).
        n_options (`int`, defaults to 4): Candidates per question (chance accuracy is `1 / n_options`).
        seed (`int`, defaults to 0): Seed of the draws.

    Returns:
        `list[Example]`: Multiple-choice examples (`choices`, `label`), same prompts, targets and `meta`.

    Raises:
        `ValueError`: fewer than two options, or fewer wrong answers to draw from than needed.
    """
    if n_options < 2:
        raise ValueError(f"n_options must be >= 2, got {n_options}")
    rng = random.Random(seed)
    pool = sorted({ex.target for ex in examples})
    out = []
    for ex in examples:
        value = to_number(ex.target)
        if value is not None and value == int(value):
            near = [int(value) + d for d in NEAR_MISSES if int(value) + d >= 0 or value < 0]
            wrong = [str(v) for v in near[: 2 * n_options]]
        else:
            wrong = [t for t in pool if t != ex.target]
        if len(wrong) < n_options - 1:
            raise ValueError(
                f"answer {ex.target!r} has {len(wrong)} wrong answers to draw, fewer than {n_options - 1}"
            )
        choices = [*rng.sample(wrong, n_options - 1), ex.target]
        rng.shuffle(choices)
        out.append(Example(ex.prompt, ex.target, tuple(choices), choices.index(ex.target), meta=ex.meta))
    return out


def ranking_task(task: Task, n_options: int = 4, seed: int = 0) -> Task:
    """A generation task as answer ranking ([`answer_ranking`] of each split, split seeds `seed`, `seed + 1`,
    `seed + 2`), recorded in `params["answer_ranking"]`; a multiple-choice task is returned as it is.

    Raises:
        `ValueError`: for a code task (no answer to rank).
    """
    if task.kind == "multiple_choice":
        return task
    if task.kind != "generation":
        raise ValueError(f"task {task.name!r} is a {task.kind} task: only generation tasks have answers to rank")
    splits = {
        s: answer_ranking(task.split(s), n_options, seed + i) for i, s in enumerate(("train", "validation", "test"))
    }
    params = {**task.params, "answer_ranking": {"options": n_options, "seed": seed}}
    return dataclasses.replace(task, kind="multiple_choice", params=params, **splits)
