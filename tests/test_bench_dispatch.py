"""`benchmarks/bench_dispatch.py --smoke`: raw and calibrated prompt dispatch on the tiny model and random experts,
the report's accuracies and paired difference recomputed from the recorded choices, and a bad `--related` pair."""

from __future__ import annotations

import pytest
from testing_utils import load_benchmark, run_smoke

from peft_spectral.transformer2 import OTHERS


bench = load_benchmark("bench_dispatch")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return run_smoke("dispatch", tmp_path_factory.mktemp("dispatch"))


def test_accuracies_come_from_the_recorded_choices(smoke):
    _, state, report, text = smoke
    groups = report["groups"]
    # two experts' own tasks, one related task, one `others` task, 4 prompts each
    assert [g["right"] for g in groups.values()] == ["random_0", "random_1", "random_0", OTHERS]
    truth = [g["right"] for g in groups.values() for _ in range(g["n"])]
    assert report["n"] == len(truth) == 16
    for label in ("raw", "calibrated"):
        chosen = state[label]["chosen"]
        assert len(chosen) == len(truth) and set(chosen) <= {"random_0", "random_1", OTHERS}
        right = sum(c == t for c, t in zip(chosen, truth))
        assert report["dispatchers"][label]["accuracy"] == pytest.approx(right / len(truth))
        start = 0
        for g in groups.values():
            part = chosen[start : start + g["n"]]
            assert g[label]["chosen"] == {c: part.count(c) for c in set(part)}
            assert g[label]["accuracy"] == pytest.approx(sum(c == g["right"] for c in part) / g["n"])
            start += g["n"]
    delta = report["calibrated_minus_raw"]
    expected = report["dispatchers"]["calibrated"]["accuracy"] - report["dispatchers"]["raw"]["accuracy"]
    assert delta["delta"] == pytest.approx(expected) and delta["n"] == 16
    assert delta["low"] <= delta["delta"] <= delta["high"]
    assert "Calibrated − raw, paired" in text and "| related: gcd → random_0 |" in text


def test_an_unknown_related_expert_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="no expert 'nobody'"):
        bench.main(["--smoke", "--output", str(tmp_path), "--no-progress", "--related", "rg:gcd?max_value=10@nobody"])
