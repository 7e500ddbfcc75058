"""Keeping an intervention only when its gain on the evaluation examples is beyond noise.

On a two-option task a truncation can raise accuracy just by moving the model's preference from one label to the
other. If the evaluation examples lean towards that label (say 28 of 40) the "gain" is an artefact and reverses on
a test split that leans the other way. [`SelectionGuard`] makes the searches demand more than "better on these
examples":

- the comparison is **paired**: candidate and unmodified model are judged on the same examples, and the per-example
  differences are resampled together ([`paired_bootstrap_gain`], fixed seed);
- two per-example quantities are tested: correctness and the log-likelihood margin of the right answer (gold
  option minus best other option); both gains must have a bootstrap lower bound above zero (the accuracy gain above
  `min_gain`);
- with unbalanced labels (by default when the class shares differ by more than `imbalance`) both are **balanced**:
  every gold class counts equally, so shifting the preference towards the majority class gains nothing;
- the level is Bonferroni-corrected for the number of candidates tested.

Every tested candidate gets a [`SelectionDecision`] (gain, interval, kept or not, and why) in the search result.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from ..data import Example


__all__ = [
    "PAPER_N_EVAL",
    "SelectionDecision",
    "SelectionGuard",
    "answer_classes",
    "compare",
    "is_imbalanced",
    "paired_bootstrap_gain",
]

#: The number of evaluation examples of the paper's CL-100G-100E setting.
PAPER_N_EVAL = 100

_METRICS = ("auto", "accuracy", "balanced_accuracy")


@dataclass
class SelectionGuard:
    """Settings of the paired-bootstrap test that decides whether a candidate is kept.

    Args:
        metric (`str`, defaults to `"auto"`): `"accuracy"`, `"balanced_accuracy"` (mean per-class recall; the margin
            is averaged per class likewise), or `"auto"`: balanced when the gold answers are unbalanced (see
            `imbalance`), plain otherwise.
        confidence (`float`, defaults to 0.95): One-sided confidence of the lower bounds, before the correction for
            several candidates.
        n_bootstrap (`int`, defaults to 2000): Bootstrap resamples.
        min_gain (`float`, defaults to 0.0): The accuracy gain's lower bound must exceed this (an explicit margin,
            e.g. 0.02 for "at least two points").
        require_margin_gain (`bool`, defaults to `True`): Also demand a positive lower bound of the mean gain in the
            right answer's log-likelihood margin.
        bonferroni (`bool`, defaults to `True`): Divide `1 - confidence` by the number of candidates tested.
        imbalance (`float`, defaults to 0.1): With `metric="auto"`, balanced accuracy is used when the largest and
            the smallest class share differ by more than this.
        seed (`int`, defaults to 0): Seed of the resampling (fixed, so that a search is reproducible).
    """

    metric: str = "auto"
    confidence: float = 0.95
    n_bootstrap: int = 2000
    min_gain: float = 0.0
    require_margin_gain: bool = True
    bonferroni: bool = True
    imbalance: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if self.metric not in _METRICS:
            raise ValueError(f"SelectionGuard.metric must be one of {_METRICS}, got {self.metric!r}")
        if not 0.5 <= self.confidence < 1.0:
            raise ValueError(f"SelectionGuard.confidence must be in [0.5, 1), got {self.confidence}")
        if self.n_bootstrap < 100:
            raise ValueError(f"SelectionGuard.n_bootstrap must be >= 100, got {self.n_bootstrap}")


@dataclass
class SelectionDecision:
    """Why a candidate was kept or rejected.

    Args:
        kept (`bool`): Whether it passed.
        reason (`str`): One line for humans.
        rule (`str`): `"paired_bootstrap"` or `"plain"` (better accuracy, ties broken by mean log-likelihood).
        metric (`str`): `"accuracy"` or `"balanced_accuracy"`.
        gain (`float`): Metric of the candidate minus that of the reference, on the evaluation examples.
        ci (`tuple[float, float]`, *optional*): Bootstrap interval of `gain` (lower end = the tested bound).
        margin_gain (`float`, *optional*): Mean (per-class mean when balanced) gain of the right answer's margin.
        margin_ci (`tuple[float, float]`, *optional*): Its bootstrap interval.
        level (`float`, *optional*): One-sided level of each bound after the Bonferroni correction.
    """

    kept: bool
    reason: str
    rule: str
    metric: str
    gain: float
    ci: Optional[tuple[float, float]] = None
    margin_gain: Optional[float] = None
    margin_ci: Optional[tuple[float, float]] = None
    level: Optional[float] = None

    def sort_key(self) -> tuple[float, float]:
        """Larger is better: `(gain, margin_gain)`."""
        return (self.gain, self.margin_gain if self.margin_gain is not None else 0.0)

    def to_dict(self) -> dict:
        """As a JSON-ready dict."""
        return asdict(self)


def answer_classes(examples: Sequence[Example]) -> list[Hashable]:
    """The class of each example for balanced metrics: its gold answer text (the label index if there is none)."""
    return [ex.target or ex.label for ex in examples]


def is_imbalanced(classes: Sequence[Hashable], threshold: float = 0.1) -> bool:
    """Whether a classification-like split (classes repeat) has class shares differing by more than `threshold`.

    Args:
        classes (`Sequence[Hashable]`): The class of each example (see [`answer_classes`]).
        threshold (`float`, defaults to 0.1): Largest minus smallest class share above which the split is unbalanced.
    """
    n = len(classes)
    _, counts = np.unique(np.asarray([str(c) for c in classes]), return_counts=True)
    if n == 0 or len(counts) < 2 or len(counts) > n / 2:
        return False  # one class, or (nearly) one class per example: nothing to balance
    return float(counts.max() - counts.min()) / n > threshold


def _class_mean(values: np.ndarray, class_ids: np.ndarray, n_classes: int, balanced: bool) -> np.ndarray:
    """Mean of `values` over the last axis, or the mean of per-class means (`class_ids` has the shape of `values`)."""
    if not balanced:
        return values.mean(axis=-1)
    rows = values.reshape(-1, values.shape[-1])
    ids = class_ids.reshape(-1, values.shape[-1])
    offset = (np.arange(rows.shape[0]) * n_classes)[:, None]
    flat = (ids + offset).ravel()
    sums = np.bincount(flat, weights=rows.ravel(), minlength=rows.shape[0] * n_classes).reshape(-1, n_classes)
    counts = np.bincount(flat, minlength=rows.shape[0] * n_classes).reshape(-1, n_classes)
    present = counts > 0
    means = np.where(present, sums / np.maximum(counts, 1), 0.0)
    return (means.sum(axis=1) / present.sum(axis=1)).reshape(values.shape[:-1])


def paired_bootstrap_gain(
    reference: Sequence[float],
    candidate: Sequence[float],
    classes: Optional[Sequence[Hashable]] = None,
    *,
    level: float = 0.05,
    n_bootstrap: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Paired bootstrap of the mean per-example gain `candidate − reference` on the same examples.

    Examples are resampled with replacement (the same indices for both), `n_bootstrap` times with a fixed seed.

    Args:
        reference (`Sequence[float]`): Per-example values of the reference (e.g. 0/1 correctness, or margins).
        candidate (`Sequence[float]`): The candidate's values on the same examples, same order.
        classes (`Sequence[Hashable]`, *optional*): When given, the gain is the mean of per-class mean gains
            (balanced accuracy for 0/1 values); classes missing from a resample are left out of its mean.
        level (`float`, defaults to 0.05): Tail probability of each end of the returned interval.
        n_bootstrap (`int`, defaults to 2000): Resamples.
        seed (`int`, defaults to 0): Seed of the resampling.

    Returns:
        `tuple[float, float, float]`: `(gain, low, high)`: the gain on the examples themselves and the `level` and
        `1 - level` quantiles of its bootstrap distribution.

    Raises:
        `ValueError`: if the two lists differ in length or are empty.
    """
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if ref.shape != cand.shape or ref.ndim != 1 or len(ref) == 0:
        raise ValueError(f"reference and candidate need the same non-zero length, got {ref.shape} and {cand.shape}")
    diff = cand - ref
    balanced = classes is not None
    if balanced:
        if len(classes) != len(diff):
            raise ValueError(f"classes has {len(classes)} entries for {len(diff)} examples")
        _, ids = np.unique(np.asarray([str(c) for c in classes]), return_inverse=True)
        n_classes = int(ids.max()) + 1
    else:
        ids, n_classes = np.zeros(len(diff), dtype=np.int64), 1
    gain = float(_class_mean(diff, ids, n_classes, balanced))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(n_bootstrap, len(diff)))
    boot = _class_mean(diff[idx], ids[idx], n_classes, balanced)
    low, high = np.quantile(boot, [level, 1.0 - level])
    return gain, float(low), float(high)


def _plain(reference, candidate) -> SelectionDecision:
    gain = candidate.accuracy - reference.accuracy
    kept = candidate.beats(reference)
    relation = "beats" if kept else "does not beat"
    reason = (
        f"{'kept' if kept else 'rejected'} (plain rule): accuracy {candidate.accuracy:.3f} / mean loglik "
        f"{candidate.mean_loglik:.3f} {relation} {reference.accuracy:.3f} / {reference.mean_loglik:.3f}"
    )
    return SelectionDecision(kept, reason, "plain", "accuracy", gain)


def _per_example(summary, what: str) -> tuple[list, list]:
    if summary.correct is None or summary.margins is None:
        raise ValueError(
            f"the selection guard needs per-example results of the {what} (EvalSummary.correct and .margins): let "
            "eval_fn return them, or pass guard=None for the plain rule"
        )
    return summary.correct, summary.margins


def compare(
    reference,
    candidate,
    examples: Sequence[Example],
    guard: Optional[SelectionGuard],
    n_tested: int = 1,
) -> SelectionDecision:
    """Decide whether `candidate` is better than `reference` on `examples`.

    Args:
        reference ([`~peft_spectral.compress.EvalSummary`]): The unmodified model (or the current best combination).
        candidate ([`~peft_spectral.compress.EvalSummary`]): The candidate, on the same examples in the same order.
        examples (`Sequence[Example]`): The evaluation examples (for their gold classes).
        guard ([`SelectionGuard`], *optional*): `None` for the plain rule (higher accuracy, ties broken by mean
            log-likelihood); otherwise the paired bootstrap test.
        n_tested (`int`, defaults to 1): Candidates tested in this search (for the Bonferroni correction).

    Returns:
        [`SelectionDecision`]
    """
    if guard is None:
        return _plain(reference, candidate)
    ref_correct, ref_margins = _per_example(reference, "unmodified model")
    cand_correct, cand_margins = _per_example(candidate, "candidate")
    classes = answer_classes(examples)
    balanced = guard.metric == "balanced_accuracy" or (
        guard.metric == "auto" and is_imbalanced(classes, guard.imbalance)
    )
    metric = "balanced_accuracy" if balanced else "accuracy"
    level = (1.0 - guard.confidence) / (max(1, n_tested) if guard.bonferroni else 1)
    opts = {"level": level, "n_bootstrap": guard.n_bootstrap, "seed": guard.seed}
    gain, low, high = paired_bootstrap_gain(ref_correct, cand_correct, classes if balanced else None, **opts)
    ok_metric = low > guard.min_gain
    why = [f"{metric} gain {gain:+.3f}, bound {low:+.3f} {'>' if ok_metric else '<='} {guard.min_gain:g}"]
    margin_gain = margin_ci = None
    ok_margin = True
    finite = all(math.isfinite(m) for m in list(ref_margins) + list(cand_margins))
    if guard.require_margin_gain and finite:
        margin_gain, m_low, m_high = paired_bootstrap_gain(
            ref_margins, cand_margins, classes if balanced else None, **opts
        )
        margin_ci = (m_low, m_high)
        ok_margin = m_low > 0.0
        why.append(f"margin gain {margin_gain:+.3f}, bound {m_low:+.3f} {'>' if ok_margin else '<='} 0")
    kept = ok_metric and ok_margin
    reason = f"{'kept' if kept else 'rejected'} (paired bootstrap, level {level:.3g}): " + "; ".join(why)
    return SelectionDecision(
        kept, reason, "paired_bootstrap", metric, gain, (low, high), margin_gain, margin_ci, level
    )
