"""`benchmarks/bench_budget.py --smoke`: both parts (race, ablation) on the tiny model, the report built from their
states checked against the raw measurements, resuming without retraining, and the time-to-target arithmetic."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
SPEC = importlib.util.spec_from_file_location("bench_budget", ROOT / "benchmarks" / "bench_budget.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


def _state(out: Path, part: str) -> dict:
    return json.loads((out / f"budget_{part}_state.json").read_text())["results"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Both parts, one after the other, into one output folder (as the real benchmark is run)."""
    out = tmp_path_factory.mktemp("budget")
    for part in ("race", "ablation"):
        assert bench.main(["--part", part, "--smoke", "--output", str(out), "--no-progress"]) == 0
    return out, json.loads((out / "budget.json").read_text()), (out / "budget.md").read_text()


def test_race_chooses_rates_on_validation_and_compares_on_test(smoke):
    out, report, text = smoke
    results, race = _state(out, "race"), report["parts"]["race"]
    assert list(race["tasks"]) == bench.SMOKE_TASKS
    trained = [k for k in results if k.startswith("train|")]
    assert len(trained) == len(bench.SMOKE_TASKS) * (len(bench.SMOKE["svf_lrs"]) + len(bench.SMOKE["lora_lrs"]))
    for key in trained:
        record = results[key]
        assert [s["name"] for s in record["stages"]] == ["sft", "rl"], key
        for stage in record["stages"]:  # both stages ended by their time budget
            assert stage["train_seconds"] >= bench.SMOKE["sft_seconds"] and stage["steps_run"] >= 1, key
            times = [p["train_seconds"] for p in stage["curve"]]
            assert times[0] < 0.05 and times == sorted(times) and times[-1] <= stage["train_seconds"], key
        points = bench.curve(record)
        assert [t for t, _ in points] == sorted(t for t, _ in points)  # the RL stage continues the SFT clock
    svf_params = 2 * 3 * 32  # 2 layers x (gate, up, down), min(32, 64) singular values each
    lora_params = 2 * 3 * 16 * (32 + 64)
    for spec, info in race["tasks"].items():
        assert info["target"] == pytest.approx(info["base_validation"] + race["config"]["target_gain"])
        base = results[bench.job_key("base", spec)]["lenient"]
        assert len(base) == bench.SMOKE["n_test"]
        for method, grid in (("svf", bench.SMOKE["svf_lrs"]), ("lora", bench.SMOKE["lora_lrs"])):
            chosen = info["methods"][method]
            finals = {
                f"{lr:g}": bench.final_score(results[bench.job_key("train", spec, method, f"{lr:g}")]) for lr in grid
            }
            assert max(finals.values()) == chosen["final_validation"] == finals[f"{chosen['lr']:g}"]
            assert list(finals)[list(finals.values()).index(max(finals.values()))] == f"{chosen['lr']:g}"  # tie: first
            record = results[bench.job_key("train", spec, method, f"{chosen['lr']:g}")]
            reached = [t for t, acc in bench.curve(record) if acc >= info["target"] - 1e-9]
            assert chosen["time_to_target"] == (reached[0] if reached else None)
            test = results[bench.job_key("test", spec, method, f"{chosen['lr']:g}")]["lenient"]
            assert chosen["test_accuracy"] == pytest.approx(sum(test) / len(test))
            assert chosen["vs_base"]["delta"] == pytest.approx((sum(test) - sum(base)) / len(base))
            assert chosen["trainable_parameters"] == (svf_params if method == "svf" else lora_params)
        svf, lora = (results[bench.job_key("test", spec, m, f"{info['methods'][m]['lr']:g}")] for m in ("svf", "lora"))
        delta = info["svf_minus_lora"]
        assert delta["delta"] == pytest.approx((sum(svf["lenient"]) - sum(lora["lenient"])) / len(base))
        assert delta["low"] <= delta["delta"] <= delta["high"] and delta["n"] == len(base)
        assert f"### `{spec}`" in text
    goals = {g["goal"]: g for g in report["goals"]}
    firsts = []
    for info in race["tasks"].values():
        t_svf, t_lora = info["methods"]["svf"]["time_to_target"], info["methods"]["lora"]["time_to_target"]
        firsts.append(t_svf is not None and (t_lora is None or t_svf <= t_lora))
    assert goals["SVF time to target ≤ LoRA's on at least 2 of 3 tasks"]["met"] == (sum(firsts) >= 2)
    assert "| SVF, lr " in text and "| LoRA r=16, lr " in text and "paper's claim" in text
    assert (out / "budget.png").stat().st_size > 1000 and "![validation accuracy" in text


def test_ablation_reuses_the_race_run_and_compares_recipes(smoke):
    out, report, text = smoke
    results, ablation = _state(out, "ablation"), report["parts"]["ablation"]
    race = _state(out, "race")
    spec, lr = ablation["config"]["task"], ablation["config"]["lr"]
    assert spec == bench.SMOKE_TASKS[0] and f"{lr:g}" in [f"{x:g}" for x in bench.SMOKE["svf_lrs"]]
    runs = {arm: results[bench.job_key("train", arm)] for arm in ("rl_only", "sft_only", "sft_rl")}
    assert [s["name"] for s in runs["rl_only"]["stages"]] == ["rl"]
    assert [s["name"] for s in runs["sft_only"]["stages"]] == ["sft"]
    total = bench.SMOKE["sft_seconds"] + bench.SMOKE["rl_seconds"]
    assert min(runs[arm]["stages"][0]["train_seconds"] for arm in ("rl_only", "sft_only")) >= total
    from_race = race[bench.job_key("train", spec, "svf", f"{lr:g}")]
    assert runs["sft_rl"]["path"] == from_race["path"] and runs["sft_rl"]["stages"] == from_race["stages"]  # reused
    for name, comparison in ablation["comparisons"].items():
        other, ref = name.split(" - ")
        a, b = (results[bench.job_key("test", arm)]["lenient"] for arm in (ref, other))
        assert comparison["delta"] == pytest.approx((sum(b) - sum(a)) / len(a)), name
    assert len(ablation["comparisons"]) == 3 and "| SFT → RL − RL only |" in text
    assert "## RL only, SFT only, SFT → RL" in text


def test_a_second_run_trains_nothing_and_the_report_part_only_writes(smoke, tmp_path):
    out, report, _ = smoke
    before = {k: v for k, v in _state(out, "race").items() if k != "machine"}
    assert bench.main(["--part", "race", "--smoke", "--output", str(out), "--no-progress"]) == 0
    assert {k: v for k, v in _state(out, "race").items() if k != "machine"} == before  # no job ran again
    assert json.loads((out / "budget.json").read_text())["goals"] == report["goals"]
    assert bench.main(["--part", "report", "--smoke", "--output", str(tmp_path), "--no-progress"]) == 0
    assert "No part run yet." in (tmp_path / "budget.md").read_text()


def test_time_to_target_runs_on_training_seconds_across_stages():
    record = {
        "stages": [
            {"train_seconds": 100.0, "best_score": 0.3, "curve": [{"train_seconds": 0.0, "accuracy": 0.1},
                                                                  {"train_seconds": 100.0, "accuracy": 0.3}]},
            {"train_seconds": 50.0, "best_score": 0.45, "curve": [{"train_seconds": 0.0, "accuracy": 0.3},
                                                                  {"train_seconds": 49.0, "accuracy": 0.45}]},
        ]
    }  # fmt: skip
    assert bench.curve(record) == [(0.0, 0.1), (100.0, 0.3), (100.0, 0.3), (149.0, 0.45)]
    assert bench.time_to_target(record, 0.3) == 100.0 and bench.time_to_target(record, 0.4) == 149.0
    assert bench.time_to_target(record, 0.5) is None and bench.final_score(record) == 0.45
    results = {bench.job_key("train", "t", "svf", lr): record for lr in ("0.001", "0.002")}
    assert bench.choose(results, "t", "svf") == "0.001" and bench.choose(results, "t", "lora") is None
