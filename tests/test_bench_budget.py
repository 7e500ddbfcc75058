"""`benchmarks/bench_budget.py --smoke`: every run in its own process at the same budget, the report's fields,
resuming from the state file and adding a task with a subset of runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_budget.py"
RUNS = ("svf_rl", "svf_sft", "svf_sft_rl", "lora_rl", "lora_sft")


def _run(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path / "budget"), "--work", str(tmp_path)]
    return subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=300, check=False)


def test_smoke_run_reports_every_run_and_resumes(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "6 run(s) to do, 0 already" in proc.stdout and "ETA" in proc.stdout
    report = json.loads((tmp_path / "budget.json").read_text())
    assert report["smoke"] is True
    runs = report["tasks"]["toy_a"]["runs"]
    assert set(runs) == {"base", *RUNS}
    base = runs["base"]
    assert base["test_n"] == 8 and base["accuracy_ci"]["low"] <= base["test_accuracy"] <= base["accuracy_ci"]["high"]
    for name in RUNS:
        row = runs[name]
        assert row["settings"]["budget"] == 0.5 and row["test_n"] == 8, name
        assert row["steps"] >= 1 and row["train_s"] >= 0.5 and row["s_per_step"] > 0, name  # stopped by the budget
        assert all(phase["stopped_by_budget"] for phase in row["phases"]), name
        assert row["s_per_step"] == row["train_s"] / row["steps"]
        assert row["peak_rss_mb"] >= row["rss_loaded_mb"] > 0 and row["peak_reset_after_load"], name
        assert len(row["load_average"]) == 2, name
        assert row["phases"][0]["curve"][0]["step"] == 0, name  # validation before the first step
        assert row["vs_base"]["n"] == 8 and row["vs_base"]["low"] <= row["vs_base"]["delta"] <= row["vs_base"]["high"]
        assert 0.0 <= row["vs_base"]["p_value"] <= 1.0 and row["vs_base"]["text"].startswith("Δ")
        bal = row["balanced_vs_base"]  # the toy task is multiple choice: balanced accuracy over its yes/no labels
        assert bal["chance"] == 0.5 and bal["n"] == 8 and bal["b_low"] <= bal["b"] <= bal["b_high"], name
    sft_rl = runs["svf_sft_rl"]["phases"]
    assert [(p["method"], p["budget_s"]) for p in sft_rl] == [("sft", 0.25), ("rl", 0.25)]
    assert runs["svf_sft_rl"]["steps"] == sft_rl[0]["steps"] + sft_rl[1]["steps"]
    svf, lora = runs["svf_rl"]["trainable_parameters"], runs["lora_rl"]["trainable_parameters"]
    assert svf == runs["svf_sft"]["trainable_parameters"] == runs["svf_sft_rl"]["trainable_parameters"]
    assert lora == 2 * 2 * 16 * (32 + 64) + 2 * 16 * (64 + 32)  # r=16 on gate/up (32->64) and down (64->32), 2 layers
    pairs = report["tasks"]["toy_a"]["svf_vs_lora"]
    assert [(p["method"], p["svf"], p["lora"]) for p in pairs] == [
        ("rl", "svf_rl", "lora_rl"),
        ("sft", "svf_sft", "lora_sft"),
    ]
    assert all(p["parameter_ratio"] == lora / svf and p["svf_minus_lora"]["n"] == 8 for p in pairs)
    recipes = report["tasks"]["toy_a"]["svf_recipes"]
    assert [(p["reference"], p["other"]) for p in recipes] == [
        ("svf_sft", "svf_rl"),
        ("svf_rl", "svf_sft_rl"),
        ("svf_sft", "svf_sft_rl"),
    ]
    for pair in recipes:
        ref, other = runs[pair["reference"]]["test_accuracy"], runs[pair["other"]]["test_accuracy"]
        assert abs(pair["other_minus_reference"]["delta"] - (other - ref)) < 1e-9
    text = (tmp_path / "budget.md").read_text()
    assert (
        "| SVF-SFT→RL | 0.5 |" in text and "| load avg |" in text and "Δ SVF − LoRA" in text and "## Reading" in text
    )
    assert "Balanced accuracy (mean over gold labels; chance 0.50" in text
    assert "| SVF-RL − SVF-SFT |" in text and "No reading given" in text  # --smoke never takes the committed reading
    assert (tmp_path / "budget.png").stat().st_size > 1000
    state = json.loads((tmp_path / "budget_state.json").read_text())
    assert len(state["runs"]["toy_a/svf_rl"]["correct"]) == 8

    # the same runs again are taken from the state; a second task with a subset of the runs is added to the report
    again = _run(tmp_path, "--tasks", "toy_a", "toy_b", "--runs", "svf_sft")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "2 run(s) to do, 2 already" in again.stdout
    report = json.loads((tmp_path / "budget.json").read_text())
    assert set(report["tasks"]["toy_b"]["runs"]) == {"base", "svf_sft"}
    assert set(report["tasks"]["toy_a"]["runs"]) == {"base", *RUNS}
    assert report["tasks"]["toy_b"]["svf_vs_lora"] == []
