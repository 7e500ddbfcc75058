"""Deterministic train / validation / test splits without leaks, and few-shot draws from the train split."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence

from .types import Example, Task


__all__ = [
    "cap_answer_share",
    "check_fractions",
    "draw_shots",
    "example_content",
    "make_task",
    "split_examples",
    "split_sizes",
]


def check_fractions(fractions) -> tuple[float, float, float]:
    """`fractions` as three non-negative floats summing to 1, else a `ValueError`."""
    try:
        values = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        raise ValueError(f"fractions must be three numbers summing to 1, got {fractions!r}") from None
    if len(values) != 3 or any(not math.isfinite(f) or f < 0 for f in values):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions!r}")
    if not math.isclose(sum(values), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions!r}")
    return values  # type: ignore[return-value]


def split_sizes(total: int, fractions) -> tuple[int, int, int]:
    """Train / validation / test sizes of `total` examples: `round(f * total)` for train and validation, the rest
    for test."""
    fractions = check_fractions(fractions)
    n_train = min(total, round(fractions[0] * total))
    n_val = min(total - n_train, round(fractions[1] * total))
    return n_train, n_val, total - n_train - n_val


def example_content(example: Example) -> str:
    """What makes two examples the same question: `meta["question"]` (the question before options were shuffled into
    the prompt) when known, else the prompt."""
    return str(example.meta.get("question", example.prompt)).strip()


def drop_seen(examples: Iterable[Example], seen: set[str]) -> list[Example]:
    """The examples whose [`example_content`] is not in `seen` (nor earlier in `examples`); `seen` is updated."""
    kept = []
    for ex in examples:
        key = example_content(ex)
        if key not in seen:
            seen.add(key)
            kept.append(ex)
    return kept


def split_examples(
    examples: Sequence[Example], *, seed: int = 0, max_examples: int | None = None, fractions=(0.6, 0.2, 0.2)
) -> tuple[list[Example], list[Example], list[Example]]:
    """Shuffle `examples` with `random.Random(seed)`, keep the first `max_examples`, and cut train/validation/test.

    The split sizes are [`split_sizes`], less the duplicates: a validation example whose [`example_content`] is
    already in train, and a test example whose content is in train or validation (or earlier in test), is dropped, so
    that no split leaks into a later one. Train itself is left as cut.
    """
    check_fractions(fractions)
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1 or None, got {max_examples}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    if max_examples is not None:
        order = order[:max_examples]
    n_train, n_val, _ = split_sizes(len(order), fractions)
    chosen = [examples[i] for i in order]
    train = chosen[:n_train]
    seen = {example_content(ex) for ex in train}
    validation = drop_seen(chosen[n_train : n_train + n_val], seen)
    test = drop_seen(chosen[n_train + n_val :], seen)
    return train, validation, test


def make_task(
    name: str,
    kind: str,
    examples: Sequence[Example],
    *,
    description: str = "",
    seed: int = 0,
    max_examples: int | None = None,
    fractions=(0.6, 0.2, 0.2),
    spec: str = "",
    params: dict | None = None,
) -> Task:
    """A [`Task`] from a finite list of examples, split by [`split_examples`]."""
    if not examples:
        raise ValueError(f"task {name!r} has no examples")
    train, validation, test = split_examples(examples, seed=seed, max_examples=max_examples, fractions=fractions)
    return Task(
        name=name,
        kind=kind,  # type: ignore[arg-type]
        train=train,
        validation=validation,
        test=test,
        description=description,
        spec=spec,
        params=dict(params or {}),
    )


def draw_shots(task: Task, n: int) -> list[Example]:
    """`n` labelled examples of `task` for few-shot adaptation (Transformer²'s CEM): the first `n` of its train
    split, so they never overlap its validation or test examples."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n > len(task.train):
        raise ValueError(f"task {task.name!r} has {len(task.train)} train examples, fewer than n={n} shots")
    return list(task.train[:n])


def cap_answer_share(examples: Sequence[Example], max_share: float, *, seed: int = 0) -> list[Example]:
    """The largest subset of `examples` in which no gold answer (`target`) is more than `max_share` of the whole.

    Generators whose answers are mostly one value (letter counting: two thirds "1"; gcd of small numbers: "1") teach
    that value to a model trained on them; capped, a constant answer no longer pays. Over-represented answers lose
    examples drawn with `random.Random(seed)`; every kept example keeps its place in the order.

    Args:
        examples (`Sequence[Example]`): Usually a train split.
        max_share (`float`): In (0, 1]; 1 keeps everything.
        seed (`int`, defaults to 0): Which examples of an over-represented answer are dropped.

    Returns:
        `list[Example]`: The kept examples, in their order.

    Raises:
        `ValueError`: `max_share` out of range, or too few distinct answers to meet it (fewer than `1 / max_share`).
    """
    if not isinstance(max_share, (int, float)) or not 0 < max_share <= 1:
        raise ValueError(f"max_answer_share must be in (0, 1], got {max_share!r}")
    by_answer: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_answer.setdefault(ex.target, []).append(i)
    counts = sorted((len(v) for v in by_answer.values()), reverse=True)
    # The largest per-answer cap m with m <= max_share * sum(min(count, m)); the right side grows slower than m.
    cap = 0
    for m in range(counts[0] if counts else 0, 0, -1):
        if m <= max_share * sum(min(c, m) for c in counts) + 1e-9:
            cap = m
            break
    if counts and cap == 0:
        raise ValueError(
            f"max_answer_share={max_share} needs at least {math.ceil(1 / max_share)} distinct answers; "
            f"the examples have {len(counts)}"
        )
    rng = random.Random(seed)
    kept: set[int] = set()
    for answer in sorted(by_answer):
        indices = by_answer[answer]
        kept.update(indices if len(indices) <= cap else rng.sample(indices, cap))
    return [ex for i, ex in enumerate(examples) if i in kept]
