"""`benchmarks/bench_grpo_step.py --smoke`: the rounds on the tiny model, the report's ratios and goals checked against
the raw per-round times, resuming without re-running, and the spread helpers of the report."""

from __future__ import annotations

import json
import statistics

import pytest
from testing_utils import load_benchmark, run_smoke

from peft_spectral.benchmarking.reporting import format_spread, round_spread


bench = load_benchmark("bench_grpo_step")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return run_smoke("grpo_step", tmp_path_factory.mktemp("grpo_step"))


def test_ratios_and_goals_come_from_the_rounds(smoke):
    _, state, steps, text = smoke
    rounds = [v for k, v in sorted(state.items()) if k.startswith("round")]
    lengths = steps["config"]["new_tokens"]
    assert len(rounds) == steps["rounds"] == bench.SMOKE["rounds"] and len(lengths) == 2
    assert rounds[0]["order"] != rounds[1]["order"]  # the arms rotate
    for r in rounds:
        for n in lengths:
            for arm in bench.ARMS:
                grpo = r["grpo"][f"{arm}@{n}"]
                assert len(grpo["step_seconds"]) == bench.SMOKE["grpo_steps"] and min(grpo["step_seconds"]) > 0
                assert grpo["mean_length"] and set(grpo["mean_length"]) == {n}  # every sample exactly n tokens
            assert all(r["generate"][f"{arm}@{n}"] > 0 for arm in ("base", *bench.ARMS))
        for arm in ("svf", "lora"):
            sft = r["sft"][arm]
            assert min(sft["tokens"]) > 0 and sft["tokens_per_second"] == sft["tokens"][-1] / sft["step_seconds"][-1]
    n = lengths[-1]
    expected = [
        r["grpo"][f"svf_composed@{n}"]["step_seconds"][-1] / r["grpo"][f"lora@{n}"]["step_seconds"][-1] for r in rounds
    ]
    assert steps["per_round"][f"grpo:svf_composed/lora@{n}"] == pytest.approx(expected)
    sampling = [r["generate"][f"svf_composed@{n}"] / r["generate"][f"base@{n}"] for r in rounds]
    assert steps["per_round"][f"generate:svf_composed/base@{n}"] == pytest.approx(sampling)
    for key, values in steps["per_round"].items():
        s = steps["ratios"][key]
        assert len(values) == len(rounds) and s["min"] <= s["median"] <= s["max"], key
        assert s["median"] == pytest.approx(statistics.median(values)), key
    step_goal, sampling_goal = steps["goals"]
    assert f"at {n} new tokens" in step_goal["goal"]
    assert step_goal["met"] == (statistics.median(expected) <= 0.95)
    worst = max(statistics.median(steps["per_round"][f"generate:svf_composed/base@{m}"]) for m in lengths)
    assert sampling_goal["met"] == (worst <= 1.10) and f"of {len(rounds)} rounds" in sampling_goal["value"]
    assert "## Goals" in text and "## Step cost" in text and "| GRPO step, LoRA r=16 |" in text
    assert "SFT (4 examples per step" in text and bench.SMOKE_TASK in text


def test_a_second_run_runs_no_round_again(smoke):
    out, state, _, _ = smoke
    assert bench.main(["--smoke", "--output", str(out), "--no-progress"]) == 0
    again = json.loads((out / "grpo_step_state.json").read_text())["results"]
    assert again == state  # every round read back, none re-timed


def test_round_spread_and_its_text():
    s = round_spread([1.10, 0.97, 1.02])
    assert s == {"median": 1.02, "min": 0.97, "max": 1.10, "n": 3}
    assert format_spread(s, 2, "×") == "1.02× [0.97–1.10]"
    assert format_spread(round_spread([5.0, 4.0]), 1, " s") == "4.5 s [4.0–5.0]"
    with pytest.raises(ValueError, match="at least one value"):
        round_spread([])
