"""`peft_spectral.benchmarking.reporting`: stats results as JSON entries, task labels."""

from __future__ import annotations

import pytest

from peft_spectral.benchmarking.reporting import stat_entry, task_label
from peft_spectral.stats import accuracy_ci, compare_balanced, compare_paired


def test_stat_entry_keeps_fields_text_and_significance():
    acc = stat_entry(accuracy_ci([1, 1, 0, 1]))
    assert acc["accuracy"] == 0.75 and acc["n"] == 4 and acc["text"] == "0.750 [0.30, 0.95] (n=4)"
    assert "significant" not in acc
    cmp = compare_paired([0] * 30, [1] * 30)
    entry = stat_entry(cmp)
    assert entry["delta"] == 1.0 and entry["significant"] is True and entry["text"] == str(cmp)
    bal = stat_entry(compare_balanced([1, 0, 1, 0], [1, 1, 1, 1], ["a", "b", "a", "b"]))
    assert bal["b"] == 1.0 and "significant" in bal and bal["text"].startswith("bal ")


def test_task_label():
    assert task_label("rg:gcd?max_value=100") == "gcd"
    assert task_label("bigbench:navigate") == "navigate"
    assert task_label("rg:gcd?max_value=30;rg:lcm?max_value=30") == "gcd+lcm"
    assert task_label("parity") == "parity"


def test_majority_baseline_exposes_a_constant_answer():
    from types import SimpleNamespace

    from peft_spectral.benchmarking.reporting import majority_baseline

    def ex(answer):
        return SimpleNamespace(target=answer)

    train = [ex("1"), ex("1"), ex("1"), ex("2")]
    test = [ex("1"), ex("2"), ex("3"), ex("1"), ex("5"), ex("5")]
    base = [False] * 6
    other = [True, False, False, True, False, False]  # right only where the answer is "1": a constant "1"
    out = majority_baseline(train, test, base, other)
    assert out["answer"] == "1" and out["share"] == pytest.approx(2 / 6)
    assert out["minus_constant"]["delta"] == 0 and out["right_on_majority"] == 2
    assert out["rest_n"] == 4 and out["rest_delta"]["delta"] == 0
    top = out["top_right"]
    assert (top["answer"], top["right"], top["of_right"], top["rest_n"]) == ("1", 2, 2, 4)
    # a method right on "5" (not the train's majority) is caught by top_right only
    other = [False, False, False, False, True, True]
    out = majority_baseline(train, test, base, other)
    assert out["rest_delta"]["delta"] == pytest.approx(2 / 4)
    assert out["top_right"]["answer"] == "5" and out["top_right"]["rest_delta"]["delta"] == 0
    with pytest.raises(ValueError, match="6 test questions for 6 base and 5"):
        majority_baseline(train, test, base, other[:5])
