"""`benchmarks/bench_experts.py --smoke`: trains a two-stage (SFT → RL) expert library on a tiny random model, skips
finished stages when run again, and writes the results JSON/Markdown with intervals and paired differences."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_experts", ROOT / "benchmarks" / "bench_experts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_trains_resumes_and_reports(tmp_path, capsys):
    from peft_spectral.stats import accuracy_ci, balanced_accuracy, compare_paired
    from peft_spectral.tasks import load_task

    bench = _bench()
    threads = torch.get_num_threads()
    try:
        results = bench.main(["--smoke", "--work-dir", str(tmp_path)])
        first = capsys.readouterr().out
        again = bench.main(["--smoke", "--work-dir", str(tmp_path)])
        second = capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
    assert "[1/2] smoke_mc / sft: training" in first and "[2/2] smoke_mc / rl: training" in first
    assert second.count("done already") == 2  # resumable: finished stages are skipped

    saved = json.loads((tmp_path / "experts.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(again["rows"]))
    (row,) = saved["rows"]
    assert row["task"] == "smoke_mc" and row["kind"] == "multiple_choice" and row["n"] == 8
    assert row["recipe"] == "sft(2) → rl(1)" and row["trainable_parameters"] > 0 and row["train_minutes"] > 0
    base, expert = row["base"]["correct"], row["expert_accuracy"]["correct"]
    assert len(base) == len(expert) == 8
    ci = accuracy_ci(expert)
    assert (row["expert_accuracy"]["low"], row["expert_accuracy"]["high"]) == (ci.low, ci.high)
    delta = compare_paired(base, expert)
    assert row["delta"]["delta"] == delta.delta and row["delta"]["p_value"] == delta.p_value
    assert row["goal_met"] == (delta.delta >= 0.08 and delta.low > 0)
    assert again["rows"][0]["delta"] == results["rows"][0]["delta"]  # the same expert evaluated again
    labels = [e.label for e in load_task(str(tmp_path / "smoke_mc.jsonl"), seed=0).test[:8]]
    assert row["balanced"]["chance"] == 0.5 and row["balanced"]["n"] == 8
    assert row["balanced"]["b"] == balanced_accuracy(expert, labels)
    assert row["balanced"]["a"] == balanced_accuracy(base, labels)

    table = (tmp_path / "experts.md").read_text()
    assert "| task | kind | recipe | n | base acc [95% CI] | expert acc [95% CI] | Δ vs base [95% CI] | p |" in table
    assert "| smoke_mc | multiple_choice | sft(2) → rl(1) | 8 |" in table
    assert (tmp_path / "experts.png").read_bytes()[:4] == b"\x89PNG"
    assert "| tells labels apart |" in table

    # --report-only fills balanced accuracy into results saved without it, from the verdicts and the task's labels
    stripped = json.loads((tmp_path / "experts.json").read_text())
    stripped["rows"][0].pop("balanced")
    (tmp_path / "experts.json").write_text(json.dumps(stripped))
    rewritten = bench.main(["--smoke", "--work-dir", str(tmp_path), "--report-only"])
    assert rewritten["rows"][0]["balanced"] == saved["rows"][0]["balanced"]
    assert "| tells labels apart |" in (tmp_path / "experts.md").read_text()

    # the library copy: adapter, card over both stages, expert.json, the paired test evaluation
    library = tmp_path / "library" / "smoke_mc"
    config = json.loads((library / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["peft_type"] == "SVF"
    card = (library / "README.md").read_text()
    assert "| sft | sft | 2 |" in card and "| rl | rl | 1 |" in card and "for all 2 stages" in card
    assert "## Test accuracy" in card and "8 test examples" in card
    meta = json.loads((library / "expert.json").read_text())
    assert [s["name"] for s in meta["stages"]] == ["sft", "rl"] and meta["metrics"]["test"]["n"] == 8
    assert json.loads((library / "test_eval.json").read_text())["adapter"]["correct"] == expert
    # the RL stage started from the SFT adapter
    assert "--init-adapter" in json.loads((tmp_path / "smoke_mc" / "rl" / "stage_args.json").read_text())


def test_recipe_file_is_checked(tmp_path):
    bench = _bench()
    committed = bench.load_recipes(bench.RECIPES)
    assert set(committed["tasks"]) == {
        "elementary_math_qa",
        "logical_fallacy_detection",
        "social_iqa",
        "arithmetic/2_digit_addition",
    }
    for stages in committed["tasks"].values():
        assert [s["args"]["method"] for s in stages] == ["sft", "rl"] and stages[1]["init_from"] == "sft"
        assert stages[1]["args"]["beta"] == 0.1
    assert bench.stage_argv({"steps": 2, "resume": True, "quiet": False, "target-modules": ["a", "b"]}) == [
        "--steps",
        "2",
        "--resume",
        "--target-modules",
        "a",
        "b",
    ]
    bad = tmp_path / "r.json"
    bad.write_text(json.dumps({"tasks": {"t": [{"name": "rl", "init_from": "sft", "args": {}}]}}))
    with pytest.raises(SystemExit, match="init_from 'sft' is not an earlier stage"):
        bench.load_recipes(bad)
