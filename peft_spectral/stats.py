"""The evaluation protocol: accuracies with confidence intervals and paired comparisons of two methods.

Every table of results reports an accuracy as `0.620 [0.55, 0.69] (n=200)` (a 95% Wilson score interval) and a
comparison of two methods scored on the same examples as `Δ +0.045 [+0.01, +0.08] p=0.02 *`:

- Δ is the difference of accuracies (method B minus method A) and its interval a **paired percentile bootstrap**
  (examples resampled with replacement, both methods' verdicts kept together, a fixed seed so tables are
  reproducible);
- p is the **exact McNemar test**: the two-sided binomial test (success probability 1/2) on the discordant pairs,
  `b` = examples only A gets right and `c` = examples only B gets right;
- `*` marks a significant difference: the interval excludes 0.

Small splits with unbalanced labels fool selection (a method can gain by shifting its preference towards the majority
label): [`balanced_accuracy`] and [`label_balance`] are here to check that.

```python
from peft_spectral.stats import accuracy_ci, compare_paired

print(accuracy_ci(base.correct))                      # 0.620 [0.55, 0.69] (n=200)
print(compare_paired(base.correct, expert.correct))   # Δ +0.045 [+0.01, +0.08] p=0.02 *
```
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np


__all__ = [
    "AccuracyCI",
    "BalancedComparison",
    "PairedComparison",
    "accuracy_ci",
    "balanced_accuracy",
    "bootstrap_mean_ci",
    "compare_balanced",
    "compare_paired",
    "format_accuracy",
    "format_comparison",
    "label_balance",
    "mcnemar_exact",
    "paired_bootstrap_ci",
    "spearman",
    "wilson_interval",
]


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def _verdicts(correct: Sequence, name: str) -> np.ndarray:
    values = np.asarray([bool(c) for c in correct], dtype=bool)
    if values.size == 0:
        raise ValueError(f"{name} is empty: an accuracy needs at least one example (n=0)")
    return values


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion.

    Unlike the normal-approximation interval it stays inside [0, 1] and is not degenerate at 0/n or n/n.

    Args:
        successes (`int`): Number of correct examples `k` (0 <= k <= n).
        n (`int`): Number of examples (>= 1).
        confidence (`float`, defaults to 0.95): Coverage of the interval.

    Returns:
        `tuple[float, float]`: `(low, high)`.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1 to compute an interval, got n={n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be between 0 and n={n}, got {successes}")
    z = _z(confidence)
    p = successes / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low, high = max(0.0, center - half), min(1.0, center + half)
    # exact at the boundaries (rounding would otherwise leave 1e-17 away from 0 or 1)
    return (0.0 if successes == 0 else low), (1.0 if successes == n else high)


@dataclass(frozen=True)
class AccuracyCI:
    """An accuracy with its Wilson interval.

    Args:
        accuracy (`float`): Fraction correct.
        low (`float`), high (`float`): The interval.
        n (`int`): Number of examples.
        confidence (`float`): Coverage of the interval.
    """

    accuracy: float
    low: float
    high: float
    n: int
    confidence: float = 0.95

    def __str__(self) -> str:
        return format_accuracy(self)


def accuracy_ci(correct: Sequence[bool], confidence: float = 0.95) -> AccuracyCI:
    """Accuracy of per-example verdicts with a Wilson interval.

    Args:
        correct (`Sequence[bool]`): One verdict per example (e.g. [`peft_spectral.evaluation.EvalResult.correct`]).
        confidence (`float`, defaults to 0.95): Coverage.

    Returns:
        [`AccuracyCI`]; `str()` of it is the table format `0.620 [0.55, 0.69] (n=200)`.
    """
    values = _verdicts(correct, "correct")
    k, n = int(values.sum()), int(values.size)
    low, high = wilson_interval(k, n, confidence)
    return AccuracyCI(accuracy=k / n, low=low, high=high, n=n, confidence=confidence)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: the binomial test of `b` successes in `b + c` trials with probability 1/2.

    Args:
        b (`int`): Discordant pairs where only the first method is right.
        c (`int`): Discordant pairs where only the second method is right.

    Returns:
        `float`: `min(1, 2 · P[X <= min(b, c)])` with `X ~ Binomial(b + c, 1/2)`; 1.0 when there is no discordant
        pair.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def bootstrap_mean_ci(
    values: Sequence[float],
    *,
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-example values.

    The paired form for quantities that are not one verdict per method, e.g. a per-example difference of two
    differences (forgetting of method A minus forgetting of method B, each "right after training" minus "final"):
    pass the per-example values, computed on the same examples. Resampled with `numpy.random.default_rng(seed)`.

    Returns:
        `tuple[float, float]`: `(low, high)`.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"values must be a non-empty 1-d sequence, got shape {values.shape}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    _z(confidence)  # validates confidence
    rng = np.random.default_rng(seed)
    n = values.size
    means = np.empty(n_resamples)
    chunk = max(1, 2_000_000 // n)  # bounded memory for large n
    for start in range(0, n_resamples, chunk):
        stop = min(n_resamples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = values[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def paired_bootstrap_ci(
    correct_a: Sequence[bool],
    correct_b: Sequence[bool],
    *,
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of `accuracy(b) - accuracy(a)` over the same examples.

    Examples are resampled with replacement (both verdicts of an example travel together), with
    `numpy.random.default_rng(seed)`, so the interval is reproducible ([`bootstrap_mean_ci`] of the per-example
    differences).

    Returns:
        `tuple[float, float]`: `(low, high)`.
    """
    a, b = _paired(correct_a, correct_b)
    diff = b.astype(np.float64) - a.astype(np.float64)
    return bootstrap_mean_ci(diff, confidence=confidence, n_resamples=n_resamples, seed=seed)


def _paired(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    a, b = _verdicts(correct_a, "correct_a"), _verdicts(correct_b, "correct_b")
    if a.size != b.size:
        raise ValueError(
            f"a paired comparison needs verdicts on the same examples: correct_a has {a.size}, correct_b {b.size}"
        )
    return a, b


@dataclass(frozen=True)
class PairedComparison:
    """Method B against method A on the same examples.

    Args:
        delta (`float`): `accuracy(B) - accuracy(A)`.
        low (`float`), high (`float`): Paired bootstrap interval of `delta`.
        p_value (`float`): Exact McNemar p-value.
        n (`int`): Number of examples.
        only_a (`int`): Examples only A gets right (McNemar's `b`).
        only_b (`int`): Examples only B gets right (McNemar's `c`).
        confidence (`float`): Coverage of the interval.
    """

    delta: float
    low: float
    high: float
    p_value: float
    n: int
    only_a: int
    only_b: int
    confidence: float = 0.95

    @property
    def significant(self) -> bool:
        """Whether the interval of `delta` excludes 0."""
        return self.low > 0.0 or self.high < 0.0

    def __str__(self) -> str:
        return format_comparison(self)


def compare_paired(
    correct_a: Sequence[bool],
    correct_b: Sequence[bool],
    *,
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> PairedComparison:
    """Compare method B with method A scored on the same examples (same order).

    Args:
        correct_a (`Sequence[bool]`): Verdicts of the reference method (e.g. the base model).
        correct_b (`Sequence[bool]`): Verdicts of the method compared with it.
        confidence (`float`, defaults to 0.95): Coverage of the interval.
        n_resamples (`int`, defaults to 10000): Bootstrap resamples.
        seed (`int`, defaults to 0): Bootstrap seed.

    Returns:
        [`PairedComparison`]; `str()` of it is the table format `Δ +0.045 [+0.01, +0.08] p=0.02 *`.
    """
    a, b = _paired(correct_a, correct_b)
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    low, high = paired_bootstrap_ci(a, b, confidence=confidence, n_resamples=n_resamples, seed=seed)
    return PairedComparison(
        delta=float(b.mean() - a.mean()),
        low=low,
        high=high,
        p_value=mcnemar_exact(only_a, only_b),
        n=int(a.size),
        only_a=only_a,
        only_b=only_b,
        confidence=confidence,
    )


def balanced_accuracy(correct: Sequence[bool], labels: Sequence[Hashable]) -> float:
    """Mean over gold labels of the accuracy on the examples with that label.

    A model that always answers the majority label gets 1/(number of labels) here, whatever the imbalance.

    Args:
        correct (`Sequence[bool]`): Per-example verdicts.
        labels (`Sequence[Hashable]`): Per-example gold labels (e.g. `Example.label` or the target text).
    """
    values = _verdicts(correct, "correct")
    if len(labels) != values.size:
        raise ValueError(f"labels has {len(labels)} entries but correct has {values.size}")
    per_label: dict[Hashable, list[bool]] = {}
    for label, verdict in zip(labels, values):
        per_label.setdefault(label, []).append(bool(verdict))
    return float(np.mean([np.mean(v) for v in per_label.values()]))


@dataclass(frozen=True)
class BalancedComparison:
    """Balanced accuracy of two methods on the same examples and their paired difference (B minus A)."""

    a: float
    b: float
    delta: float
    low: float
    high: float
    n: int
    majority_share: float
    chance: float
    b_low: float
    b_high: float
    confidence: float = 0.95

    @property
    def significant(self) -> bool:
        """Whether the interval excludes 0."""
        return self.low > 0 or self.high < 0

    @property
    def b_above_chance(self) -> bool:
        """Whether B's balanced accuracy interval lies above chance (1 / number of labels): B tells labels apart."""
        return self.b_low > self.chance

    def __str__(self) -> str:
        text = f"bal {self.a:.3f} → {self.b:.3f} Δ {self.delta:+.3f} [{self.low:+.2f}, {self.high:+.2f}]"
        return text + (" *" if self.significant else "")


def compare_balanced(
    correct_a: Sequence[bool],
    correct_b: Sequence[bool],
    labels: Sequence[Hashable],
    *,
    confidence: float = 0.95,
    n_resamples: int = 2_000,
    seed: int = 0,
) -> BalancedComparison:
    """Paired comparison of balanced accuracy ([`balanced_accuracy`]): B minus A with a percentile bootstrap interval.

    A model that learns to answer one label every time gets plain accuracy equal to that label's share but balanced
    accuracy at chance (1 / number of labels); report this next to [`compare_paired`] for classification tasks, and
    whether B's interval (`b_low`, `b_high`) lies above `chance`. Resamples that lose a label
    average over the labels they hold.

    Args:
        correct_a, correct_b (`Sequence[bool]`): Per-example verdicts of the two methods, same examples, same order.
        labels (`Sequence[Hashable]`): Per-example gold labels.
        confidence (`float`, defaults to 0.95): Coverage of the interval.
        n_resamples (`int`, defaults to 2000): Bootstrap resamples (`numpy.random.default_rng(seed)`).
    """
    a, b = _paired(correct_a, correct_b)
    if len(labels) != a.size:
        raise ValueError(f"labels has {len(labels)} entries but the verdicts have {a.size}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    _z(confidence)
    _, ids = np.unique(np.asarray([str(x) for x in labels]), return_inverse=True)
    k = int(ids.max()) + 1

    def balanced(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
        # rows of idx are resamples; per-label sums by one-hot counting
        lab = ids[idx]
        hits = np.zeros((idx.shape[0], k))
        counts = np.zeros((idx.shape[0], k))
        rows = np.repeat(np.arange(idx.shape[0]), idx.shape[1])
        np.add.at(hits, (rows, lab.ravel()), x[idx].ravel())
        np.add.at(counts, (rows, lab.ravel()), 1.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.nanmean(np.where(counts > 0, hits / np.maximum(counts, 1), np.nan), axis=1)

    fa, fb = a.astype(np.float64), b.astype(np.float64)
    whole = np.arange(a.size)[None, :]
    bal_a, bal_b = float(balanced(fa, whole)[0]), float(balanced(fb, whole)[0])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(n_resamples, a.size))
    draws_b = balanced(fb, idx)
    diffs = draws_b - balanced(fa, idx)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(diffs, [alpha, 1.0 - alpha])
    b_low, b_high = np.quantile(draws_b, [alpha, 1.0 - alpha])
    return BalancedComparison(
        a=bal_a,
        b=bal_b,
        delta=bal_b - bal_a,
        low=float(low),
        high=float(high),
        n=int(a.size),
        majority_share=float(np.bincount(ids).max() / a.size),
        chance=1.0 / k,
        b_low=float(b_low),
        b_high=float(b_high),
        confidence=confidence,
    )


def label_balance(labels: Sequence[Hashable]) -> dict[Hashable, float]:
    """Fraction of examples per gold label, most frequent first."""
    if len(labels) == 0:
        raise ValueError("labels is empty (n=0)")
    counts = Counter(labels)
    return {label: count / len(labels) for label, count in counts.most_common()}


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation of two paired samples (ties share their average rank); `None` when either side is
    constant (the correlation is undefined)."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs paired samples: x has {len(x)} values, y {len(y)}")

    def ranks(values) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
        upper = np.cumsum(counts)  # rank of the last member of each group of ties
        return (upper - (counts - 1) / 2.0)[inverse]

    rx, ry = ranks(x), ranks(y)
    if rx.size < 2 or rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def _p_text(p: float) -> str:
    if p < 0.001:
        return "p<0.001"
    return f"p={p:.3f}" if p < 0.01 else f"p={p:.2f}"


def format_accuracy(result: AccuracyCI, digits: int = 3) -> str:
    """`"0.620 [0.55, 0.69] (n=200)"`: the accuracy with `digits` decimals, the interval with two."""
    return f"{result.accuracy:.{digits}f} [{result.low:.2f}, {result.high:.2f}] (n={result.n})"


def format_comparison(result: PairedComparison, digits: int = 3) -> str:
    """`"Δ +0.045 [+0.01, +0.08] p=0.02 *"`: `*` when the interval excludes 0."""
    text = f"Δ {result.delta:+.{digits}f} [{result.low:+.2f}, {result.high:+.2f}] {_p_text(result.p_value)}"
    return text + (" *" if result.significant else "")
