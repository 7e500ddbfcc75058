"""The evaluation protocol (`peft_spectral.stats`) against hand-computed values, and split disjointness."""

from __future__ import annotations

import math
import random

import pytest

from peft_spectral.evaluation import EvalResult
from peft_spectral.stats import (
    accuracy_ci,
    balanced_accuracy,
    bootstrap_mean_ci,
    compare_balanced,
    compare_paired,
    format_accuracy,
    label_balance,
    mcnemar_exact,
    paired_bootstrap_ci,
    spearman,
    wilson_interval,
)
from peft_spectral.tasks import (
    draw_shots,
    example_content,
    load_bigbench_task,
    parse_bigbench_examples,
    split_examples,
)


def test_wilson_hand_computed():
    # 8/10: centre (0.8 + z²/20)/(1 + z²/10), half-width z·sqrt(0.016 + z²/400)/(1 + z²/10), z = 1.959964
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    z2 = 1.959964**2
    assert wilson_interval(0, 10) == (0.0, pytest.approx(z2 / (10 + z2), abs=1e-6))  # 0.2775
    assert wilson_interval(10, 10) == (pytest.approx(10 / (10 + z2), abs=1e-6), 1.0)  # 0.7225
    assert wilson_interval(8, 10, confidence=0.99)[0] < low  # wider at 99%


def test_accuracy_ci_and_format():
    ci = accuracy_ci([True] * 8 + [False] * 2)
    assert ci.accuracy == 0.8 and ci.n == 10
    assert str(ci) == format_accuracy(ci) == "0.800 [0.49, 0.94] (n=10)"
    assert str(accuracy_ci([1] * 124 + [0] * 76)) == "0.620 [0.55, 0.68] (n=200)"  # Wilson: 0.5510, 0.6844


def test_mcnemar_exact_hand_computed():
    assert mcnemar_exact(1, 6) == pytest.approx(0.125)  # 2 * (1 + 7) / 2**7
    assert mcnemar_exact(6, 1) == pytest.approx(0.125)
    assert mcnemar_exact(0, 5) == pytest.approx(0.0625)  # 2 / 2**5
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(2, 10) == pytest.approx(2 * (1 + 12 + 66) / 2**12)


def test_paired_comparison():
    a = [True] * 10 + [False] * 10 + [True] * 5 + [False] * 75  # A right on 15
    b = [True] * 10 + [True] * 10 + [False] * 5 + [False] * 75  # B right on 20: only_a = 5, only_b = 10
    cmp = compare_paired(a, b)
    assert cmp.delta == pytest.approx(0.05) and (cmp.only_a, cmp.only_b, cmp.n) == (5, 10, 100)
    assert cmp.p_value == pytest.approx(mcnemar_exact(5, 10))
    assert cmp.low <= cmp.delta <= cmp.high
    assert not cmp.significant and str(cmp).startswith("Δ +0.050 [") and not str(cmp).endswith("*")
    # a clear win: significant, starred, reproducible (fixed seed)
    strong = compare_paired([False] * 60 + [True] * 40, [True] * 100)
    assert strong.significant and strong.low > 0 and str(strong).endswith("p<0.001 *")
    assert compare_paired(a, b) == cmp


def test_bootstrap_interval_shrinks_with_n():
    rng = random.Random(0)
    widths = []
    for n in (50, 800):
        a = [rng.random() < 0.5 for _ in range(n)]
        b = [x if rng.random() < 0.7 else not x for x in a]
        low, high = paired_bootstrap_ci(a, b, n_resamples=2000)
        delta = (sum(b) - sum(a)) / n
        assert low <= delta <= high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2  # ~1/sqrt(16) = 1/4


def test_bootstrap_mean_ci_is_the_paired_bootstrap_of_real_values():
    rng = random.Random(1)
    a = [rng.random() < 0.5 for _ in range(120)]
    b = [rng.random() < 0.6 for _ in range(120)]
    diff = [float(y) - float(x) for x, y in zip(a, b)]
    assert bootstrap_mean_ci(diff, n_resamples=3000, seed=4) == paired_bootstrap_ci(a, b, n_resamples=3000, seed=4)
    # a difference of differences (values in -2..2), as the CPI-FT benchmark's forgetting goal uses it
    values = [rng.choice([-2, -1, 0, 0, 1, 2]) for _ in range(200)]
    low, high = bootstrap_mean_ci(values, n_resamples=2000)
    assert low <= sum(values) / len(values) <= high and high - low < 0.5
    assert bootstrap_mean_ci([0.5] * 10) == (0.5, 0.5)
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_mean_ci([])


def test_spearman_with_ties_and_constant_sides():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [5, 5, 5]) is None
    # ties share their average rank: ranks of [3, 1, 3, 2] are [3.5, 1, 3.5, 2]
    rx, ry = [3.5, 1.0, 3.5, 2.0], [1.0, 2.0, 3.0, 4.0]
    mx, my = sum(rx) / 4, sum(ry) / 4
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    expected = cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    assert spearman([3.0, 1.0, 3.0, 2.0], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(expected)
    with pytest.raises(ValueError, match="paired"):
        spearman([1, 2], [1])


def test_balanced_accuracy_and_label_balance():
    labels = ["yes"] * 8 + ["no"] * 2
    always_yes = [True] * 8 + [False] * 2
    assert sum(always_yes) / 10 == 0.8 and balanced_accuracy(always_yes, labels) == 0.5
    assert label_balance(labels) == {"yes": 0.8, "no": 0.2}


def test_compare_balanced_sees_a_constant_answer_for_what_it_is():
    labels = ["Valid"] * 108 + ["Invalid"] * 92
    garbage = [False] * 200  # a base model that never produces a label
    always_valid = [label == "Valid" for label in labels]
    plain = compare_paired(garbage, always_valid)
    assert plain.delta == pytest.approx(0.54) and plain.significant  # plain accuracy calls it a +54 point gain
    bal = compare_balanced(garbage, always_valid, labels)
    assert (bal.a, bal.b, bal.chance, bal.majority_share) == (0.0, 0.5, 0.5, 0.54)
    # every resample keeps both labels, so the constant answer's balanced accuracy is exactly chance in all of them
    assert bal.b_low == bal.b_high == 0.5 and not bal.b_above_chance


def test_compare_balanced_matches_a_plain_bootstrap():
    rng = random.Random(3)
    labels = [rng.choice("ABC") for _ in range(60)]
    a = [rng.random() < 0.4 for _ in labels]
    b = [rng.random() < 0.7 for _ in labels]
    result = compare_balanced(a, b, labels, n_resamples=500, seed=5)
    assert result.delta == pytest.approx(balanced_accuracy(b, labels) - balanced_accuracy(a, labels))
    assert result.low <= result.delta <= result.high and result.b_low <= result.b <= result.b_high
    assert result.chance == pytest.approx(1 / 3)
    # the same resamples done one by one with the plain per-label mean
    import numpy as np

    idx = np.random.default_rng(5).integers(0, 60, size=(500, 60))
    plain = [
        balanced_accuracy([b[i] for i in row], [labels[i] for i in row])
        - balanced_accuracy([a[i] for i in row], [labels[i] for i in row])
        for row in idx
    ]
    low, high = np.quantile(plain, [0.025, 0.975])
    assert result.low == pytest.approx(low) and result.high == pytest.approx(high)
    with pytest.raises(ValueError, match="labels has 3 entries"):
        compare_balanced(a, b, labels[:3])


def test_empty_and_mismatched_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="n=0"):
        accuracy_ci([])
    with pytest.raises(ValueError, match="n must be >= 1"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)
    with pytest.raises(ValueError, match="same examples"):
        compare_paired([True, False], [True])
    with pytest.raises(ValueError, match="n=0"):
        compare_paired([], [])
    with pytest.raises(ValueError, match="confidence"):
        accuracy_ci([True], confidence=95)


def test_eval_result_ci_and_compare():
    base = EvalResult(accuracy=0.5, mean_loglik=0.0, n=4, correct=[True, False, True, False])
    expert = EvalResult(accuracy=0.75, mean_loglik=0.0, n=4, correct=[True, True, True, False])
    assert base.ci().accuracy == 0.5 and base.ci().n == 4
    cmp = expert.compare(base)
    assert cmp.delta == pytest.approx(0.25) and cmp.only_b == 1 and cmp.only_a == 0
    with pytest.raises(ValueError, match="per-example"):
        EvalResult(accuracy=0.5, mean_loglik=0.0, n=4).ci()


# ---------------------------------------------------------------------------------------------------------------
# Splits: shots, validation and test never share an example (by content)
# ---------------------------------------------------------------------------------------------------------------


def _bigbench_json(n: int, repeats: int) -> dict:
    """A BigBench-style multiple-choice task.json where `repeats` questions appear twice (as in the real data)."""
    examples = [
        {"input": f"Is {i} even?", "target_scores": {"yes": int(i % 2 == 0), "no": int(i % 2)}} for i in range(n)
    ]
    examples += [dict(examples[i]) for i in range(repeats)]
    return {"name": "toy", "examples": examples, "preferred_score": "multiple_choice_grade"}


def _contents(examples) -> set[str]:
    return {example_content(ex) for ex in examples}


def test_bigbench_splits_and_shots_are_disjoint_by_content(monkeypatch):
    data = _bigbench_json(200, repeats=40)
    examples = parse_bigbench_examples(data, name="toy")
    # the repeated questions get differently shuffled options: the prompts differ but the content is the same
    assert len({ex.prompt for ex in examples}) > len(_contents(examples)) == 200
    train, val, test = split_examples(examples, seed=0)
    assert len(train) == round(0.6 * 240)  # train is cut as before
    assert not _contents(train) & _contents(val)
    assert not (_contents(train) | _contents(val)) & _contents(test)
    assert len(_contents(val)) == len(val) and len(_contents(test)) == len(test)
    assert len(_contents(train) | _contents(val) | _contents(test)) == 200

    from peft_spectral.data.sources import bigbench

    monkeypatch.setattr(bigbench, "bigbench_task_json", lambda name: data)
    task = load_bigbench_task("toy", seed=0)
    shots = draw_shots(task, 16)
    assert len(shots) == 16 and not _contents(shots) & (_contents(task.validation) | _contents(task.test))
    with pytest.raises(ValueError, match="n=10000"):
        draw_shots(task, 10_000)


def test_splits_without_duplicates_are_unchanged():
    from peft_spectral.tasks import Example

    examples = [Example(prompt=f"q{i}", target=str(i)) for i in range(50)]
    train, val, test = split_examples(examples, seed=3)
    order = list(range(50))
    random.Random(3).shuffle(order)
    assert [int(e.target) for e in train + val + test] == order
    assert (len(train), len(val), len(test)) == (30, 10, 10)
    assert math.isclose(len(val) / 50, 0.2)
