"""Fitting the "no expert fits" threshold of a dispatcher, and reporting dispatch accuracy.

A [`PromptDispatcher`] with a threshold answers `others` (the base model) unless its top category wins by at least
that confidence. [`calibrate_threshold`] fits the threshold on labelled validation prompts — prompts of the experts'
tasks labelled with the expert's name, and prompts of unrelated tasks labelled `others` — and records it in the
library (`library.dispatch_thresholds`, saved by [`ExpertLibrary.save_manifest`]).

[`dispatch_report`] gives the raw counts (per true category: how many prompts, how many dispatched right, where the
others went) so confidence intervals can be added by the caller.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

from ..data import Example
from .dispatch import PromptDispatcher, category_confidence, decide_categories
from .library import OTHERS, ExpertLibrary


CALIBRATION_TARGETS = ("accuracy", "balanced_accuracy")

LabelledPrompt = tuple[Union[str, Example], str]


def labelled_prompts(
    task_examples: Mapping[str, Sequence[Example]], others: Optional[Mapping[str, Sequence[Example]]] = None
) -> list[tuple[Example, str]]:
    """Validation prompts with their right dispatch: `(example, expert name)` and `(example, "others")`.

    Args:
        task_examples (`Mapping[str, Sequence[Example]]`): Per expert name, examples of its task.
        others (`Mapping[str, Sequence[Example]]`, *optional*): Per unrelated task, examples that should go to the
            base model.
    """
    out = [(ex, name) for name, exs in task_examples.items() for ex in exs]
    for exs in (others or {}).values():
        out.extend((ex, OTHERS) for ex in exs)
    return out


def dispatch_report(predicted: Sequence[Optional[str]], truth: Sequence[str]) -> dict[str, Any]:
    """Dispatch accuracy with raw counts, overall and per true category.

    Args:
        predicted (`Sequence[str | None]`): The dispatcher's choices (`None` and `"others"` both mean the base model).
        truth (`Sequence[str]`): The right category of each prompt (an expert name or `"others"`).

    Returns:
        `dict`: `{"n", "correct", "accuracy", "balanced_accuracy", "per_category": {category: {"n", "correct",
        "accuracy", "predicted": {choice: count}}}}`.
    """
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predictions for {len(truth)} true categories")
    predicted = [OTHERS if p is None else p for p in predicted]
    per: dict[str, dict[str, Any]] = {}
    for p, t in zip(predicted, truth):
        row = per.setdefault(t, {"n": 0, "correct": 0, "predicted": Counter()})
        row["n"] += 1
        row["correct"] += int(p == t)
        row["predicted"][p] += 1
    for row in per.values():
        row["accuracy"] = row["correct"] / row["n"]
        row["predicted"] = dict(row["predicted"])
    n = len(truth)
    correct = sum(row["correct"] for row in per.values())
    return {
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else float("nan"),
        "balanced_accuracy": sum(r["accuracy"] for r in per.values()) / len(per) if per else float("nan"),
        "per_category": per,
    }


def _objective(report: dict[str, Any], target: str) -> float:
    return report[target]


def fit_threshold(
    scores: Sequence[Sequence[float]],
    categories: Sequence[str],
    truth: Sequence[str],
    *,
    target: str = "accuracy",
    confidence: str = "margin",
) -> tuple[float, dict[str, Any]]:
    """The threshold that maximises `target` on scored validation prompts.

    Candidates are `0` (plain argmax) and the midpoints between consecutive distinct confidences of the prompts,
    plus one above the largest (everything to `others`). The best candidate wins; among equally good ones the
    smallest threshold (the fewest prompts sent to `others`).

    Args:
        scores (`Sequence[Sequence[float]]`): Per prompt, the log-likelihood of each category.
        categories (`Sequence[str]`): Category names in score order (experts, then `others`).
        truth (`Sequence[str]`): The right category of each prompt.
        target (`str`): `"accuracy"` (fraction of prompts dispatched right) or `"balanced_accuracy"` (mean over
            true categories of their accuracy: `others` counts as much as each expert).
        confidence (`str`): `"margin"` or `"probability"`.

    Returns:
        `tuple[float, dict]`: The threshold and the [`dispatch_report`] it gives.
    """
    if target not in CALIBRATION_TARGETS:
        raise ValueError(f"target must be one of {CALIBRATION_TARGETS}, got {target!r}")
    if not scores:
        raise ValueError("no validation prompts to calibrate on")
    if len(scores) != len(truth):
        raise ValueError(f"{len(scores)} score rows for {len(truth)} true categories")
    conf = sorted({c for c in (category_confidence(row, confidence) for row in scores) if math.isfinite(c)})
    candidates = [0.0] + [(a + b) / 2 for a, b in itertools.pairwise(conf)] + ([conf[-1] + 1.0] if conf else [])
    best: Optional[tuple[float, float, dict[str, Any]]] = None
    for threshold in sorted(set(candidates)):
        picks = decide_categories(scores, categories, threshold=threshold, confidence=confidence)
        report = dispatch_report(picks, truth)
        value = _objective(report, target)
        if best is None or value > best[0]:
            best = (value, threshold, report)
    return best[1], best[2]


def calibrate_threshold(
    dispatcher: PromptDispatcher,
    library: ExpertLibrary,
    labelled: Sequence[LabelledPrompt],
    *,
    target: str = "accuracy",
    record: bool = True,
) -> dict[str, Any]:
    """Fit `dispatcher`'s "others" threshold on validation prompts and set it (and record it in the library).

    The category scores of every prompt are computed once; thresholds are then compared on them
    ([`fit_threshold`]). Afterwards `dispatcher.threshold` is the fitted value and, with `record=True`,
    `library.dispatch_thresholds[dispatcher.key]` holds it with its confidence measure, objective and validation
    report (saved by [`ExpertLibrary.save_manifest`]; use `PromptDispatcher(threshold="library")` to read it back).

    Args:
        dispatcher ([`PromptDispatcher`]): A `"loglik"` dispatcher (prompt dispatch or classifier expert).
        library ([`ExpertLibrary`]): The experts.
        labelled (`Sequence[tuple[str | Example, str]]`): Validation prompts with their right category (an expert
            name or `"others"`), e.g. from [`labelled_prompts`]. Use prompts not used to train a classifier.
        target (`str`): `"accuracy"` or `"balanced_accuracy"` (see [`fit_threshold`]).
        record (`bool`): Store the result in `library.dispatch_thresholds`.

    Returns:
        `dict`: `threshold`, `confidence`, `target`, `n`, the validation `report` at that threshold and the
        `argmax_report` (threshold 0) to compare.
    """
    if dispatcher.mode != "loglik":
        raise ValueError("calibrate_threshold needs a dispatcher with mode='loglik'")
    if not labelled:
        raise ValueError("labelled is empty: give validation prompts with their right category")
    categories = library.names + [OTHERS]
    examples, truth = [], []
    for i, (prompt, category) in enumerate(labelled):
        if category not in categories:
            raise ValueError(f"labelled[{i}] has category {category!r}; expected one of {categories}")
        examples.append(prompt if isinstance(prompt, Example) else Example(prompt=str(prompt), target=""))
        truth.append(category)
    scores = dispatcher.scores(library, examples)
    threshold, report = fit_threshold(scores, categories, truth, target=target, confidence=dispatcher.confidence)
    argmax = dispatch_report(decide_categories(scores, categories, confidence=dispatcher.confidence), truth)
    entry = {
        "threshold": threshold,
        "confidence": dispatcher.confidence,
        "target": target,
        "n": len(truth),
        "report": report,
        "argmax_report": argmax,
    }
    dispatcher.threshold = threshold
    if record:
        library.dispatch_thresholds[dispatcher.key] = entry
    return entry
