"""Small pieces of the benchmarks' reports: a [`peft_spectral.stats`] result as a JSON entry that also carries its
table text, the short label of a task spec for table headers, the spread of a timing over round-robin rounds, and
the majority-answer baseline (a constant answer against which a gain must also count).

```python
from peft_spectral.benchmarking.reporting import stat_entry, task_label
from peft_spectral.stats import compare_paired

entry = stat_entry(compare_paired(base, adapter))  # {"delta": ..., "low": ..., "significant": ..., "text": "Δ +0.045 ..."}
task_label("rg:gcd?max_value=100")                 # "gcd"
format_spread(round_spread([1.02, 0.97, 1.10]), 2, "×")  # "1.02× [0.97–1.10]"
```
"""

from __future__ import annotations

import dataclasses
import statistics
from collections import Counter
from collections.abc import Sequence
from typing import Any

from ..stats import accuracy_ci, compare_paired


__all__ = ["format_spread", "majority_baseline", "majority_by_strategy", "round_spread", "stat_entry", "task_label"]


def stat_entry(stat: Any) -> dict[str, Any]:
    """A `peft_spectral.stats` result (`AccuracyCI`, `PairedComparison`, `BalancedComparison`) as a JSON-ready dict:
    its fields, `"text"` (the table format, `str(stat)`) and, for a comparison, `"significant"` (its interval
    excludes 0)."""
    out = {**dataclasses.asdict(stat), "text": str(stat)}
    if hasattr(stat, "significant"):
        out["significant"] = bool(stat.significant)
    return out


def task_label(spec: str) -> str:
    """A task spec without its source prefix and parameters (`"rg:gcd?max_value=100"` -> `"gcd"`); a mixture keeps
    each part's label (`"gcd+lcm"`)."""
    return "+".join(part.split("?", maxsplit=1)[0].split(":", maxsplit=1)[-1] for part in str(spec).split(";"))


def round_spread(values: Sequence[float]) -> dict[str, float]:
    """`{"median", "min", "max", "n"}` of a measurement taken once per round-robin round (timings are reported as
    the median and the range over rounds, never as one number)."""
    if not values:
        raise ValueError("round_spread needs at least one value")
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def format_spread(spread: dict[str, float], digits: int = 2, unit: str = "") -> str:
    """`"median [min–max]"` of a [`round_spread`], each with `digits` decimals and `unit` appended to the median."""
    return f"{spread['median']:.{digits}f}{unit} [{spread['min']:.{digits}f}–{spread['max']:.{digits}f}]"


def majority_baseline(train: Sequence[Any], test: Sequence[Any], base: Sequence[bool], other: Sequence[bool]) -> dict:
    """The constant that answers every test question with the training split's most frequent answer, against a
    method's verdicts on the same questions: a gain that this constant also gets is not a skill.

    Args:
        train (`Sequence[Example]`): The training split (its `target`s give the majority answer).
        test (`Sequence[Example]`): The scored test questions, in the order of the verdicts.
        base (`Sequence[bool]`): The base model's verdicts.
        other (`Sequence[bool]`): The method's verdicts.

    Returns:
        `dict`: `answer`, `share` (of the test questions whose answer it is), `constant` (its accuracy, a
        [`stat_entry`]), `minus_constant` (method − constant, paired), `rest_n` and `rest_delta` (method − base on the
        questions whose answer is another one; `None` when there are none), `right_on_majority` (the method's right
        answers on the majority answer's questions), and `top_right`: the gold answer on which the method is right
        most often, how many of its right answers are on it, and method − base on the other questions (a method that
        learned to give one answer, whichever it is, has all its right answers on one; chosen on the test
        questions themselves, so a diagnostic, not a selection).
    """
    if not len(test) == len(base) == len(other):
        raise ValueError(f"{len(test)} test questions for {len(base)} base and {len(other)} method verdicts")
    answer, _ = Counter(ex.target for ex in train).most_common(1)[0]
    constant = [ex.target == answer for ex in test]
    rest = [i for i, hit in enumerate(constant) if not hit]
    hits = Counter(ex.target for ex, ok in zip(test, other) if ok)
    top, top_n = hits.most_common(1)[0] if hits else (None, 0)
    besides = [i for i, ex in enumerate(test) if ex.target != top]
    return {
        "answer": answer,
        "share": sum(constant) / len(test) if test else 0.0,
        "constant": stat_entry(accuracy_ci(constant)),
        "minus_constant": stat_entry(compare_paired(constant, list(other))),
        "rest_n": len(rest),
        "rest_delta": stat_entry(compare_paired([base[i] for i in rest], [other[i] for i in rest])) if rest else None,
        "right_on_majority": sum(1 for hit, ok in zip(constant, other) if hit and ok),
        "top_right": {
            "answer": top,
            "right": top_n,
            "of_right": sum(bool(ok) for ok in other),
            "rest_n": len(besides),
            "rest_delta": stat_entry(compare_paired([base[i] for i in besides], [other[i] for i in besides]))
            if besides
            else None,
        },
    }


def majority_by_strategy(train: Sequence[Any], test: Sequence[Any], base: Sequence[bool], verdicts: dict) -> dict:
    """[`majority_baseline`] of one task against every strategy's verdicts: the constant (`answer`, `share`,
    `constant`) once, and per strategy what sets its gain beside the constant."""
    rows = {s: majority_baseline(train, test, base, v) for s, v in verdicts.items()}
    first = next(iter(rows.values()))
    keep = ("minus_constant", "rest_n", "rest_delta", "right_on_majority", "top_right")
    return {
        "answer": first["answer"],
        "share": first["share"],
        "constant": first["constant"],
        "strategies": {s: {k: r[k] for k in keep} for s, r in rows.items()},
    }
