"""`benchmarks/bench_experts.py --smoke`: trains a two-expert library (SFT → RL) on a tiny random model through
`train_expert`, reads finished stages back when run again, and writes the results JSON/markdown with intervals."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_experts", ROOT / "benchmarks" / "bench_experts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_trains_resumes_and_reports(tmp_path, capsys):
    from peft_spectral.stats import accuracy_ci

    bench = _bench()
    argv = ["--smoke", "--output", str(tmp_path), "--no-progress"]
    assert bench.main(argv) == 0
    assert "[expert] stage sft" in capsys.readouterr().out
    first = json.loads((tmp_path / "experts.json").read_text())["rows"]
    assert bench.main(argv) == 0  # resumable: every finished expert is read back, nothing is trained again
    assert "[expert] stage" not in capsys.readouterr().out
    saved = json.loads((tmp_path / "experts.json").read_text())
    assert saved["rows"] == first
    rows = {r["name"]: r for r in saved["rows"]}
    assert set(rows) == {"gcd", "spell"}
    gcd = rows["gcd"]
    assert gcd["task"] == "rg:gcd?max_value=10" and gcd["n"] == 8 and gcd["stages"] == ["sft 2", "rl 1"]
    report = json.loads((tmp_path / "library" / "gcd" / "test_eval.json").read_text())
    ci = accuracy_ci(report["adapter"]["correct"])
    assert gcd["expert"]["accuracy"] == ci.accuracy and gcd["expert"]["low"] == pytest.approx(ci.low)
    assert gcd["goal_met"] is False  # n = 8 < 300: the goal cannot be met on a smoke run
    # the majority-answer constant: the training split's most frequent answer, scored on the same test questions
    from collections import Counter

    from peft_spectral.data import load_task

    task = load_task("rg:gcd?max_value=10", seed=0, max_examples=bench.SMOKE_SETTINGS["max_examples"])
    answer = Counter(ex.target for ex in task.train).most_common(1)[0][0]
    constant = [ex.target == answer for ex in task.test[:8]]
    majority = gcd["majority"]
    assert majority["answer"] == answer and majority["constant"]["accuracy"] == pytest.approx(sum(constant) / 8)
    expected = (sum(report["adapter"]["correct"]) - sum(constant)) / 8
    assert majority["expert_minus_constant"]["delta"] == pytest.approx(expected)
    assert majority["rest_n"] == 8 - sum(constant) and gcd["goal_met_beyond_majority"] is False
    text = (tmp_path / "experts.md").read_text()
    assert "smoke run, not a result" in text and "met by 0 of 2" in text and "`rg:gcd?max_value=10`" in text
    assert "**The majority answer.**" in text and f"| `gcd` | `{answer}` |" in text
    assert (tmp_path / "experts.png").read_bytes()[:4] == b"\x89PNG"


def test_recipe_file_is_checked(tmp_path):
    bench = _bench()
    bad = tmp_path / "recipes.json"
    bad.write_text(json.dumps({"experts": {"x": {"config": {"task": "rg:gcd", "steps": 3}}}}))
    with pytest.raises(SystemExit, match=r"expert 'x'.*unknown SVFTrainingConfig field"):
        bench.load_recipes(bad)
    bad.write_text("{")
    with pytest.raises(SystemExit, match="cannot read it"):
        bench.load_recipes(bad)
    shipped = json.loads((ROOT / "peft_spectral" / "library" / "recipes.json").read_text())
    assert bench.load_recipes(ROOT / "peft_spectral" / "library" / "recipes.json").keys() == shipped["experts"].keys()
