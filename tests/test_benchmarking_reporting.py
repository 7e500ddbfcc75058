"""`peft_spectral.benchmarking.reporting`: stats results as JSON entries, task labels."""

from __future__ import annotations

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
