"""`benchmarks/bench_transformer2.py --smoke` runs end to end on a tiny random model, writes the report it promises,
resumes from its state file without redoing work, and refuses overlapping task sets."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_transformer2.py"


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--smoke",
        "--output",
        str(tmp_path / "out"),
        "--work-dir",
        str(tmp_path / "w"),
        "--answer-mode",  # the option-scoring path; the generated-answer path has its own test below
        "loglik",
    ]
    return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=300, check=False)


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_transformer2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("bench_t2")
    first = _run(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    return tmp_path, first


def test_smoke_run_writes_the_report(smoke):
    tmp_path, _ = smoke
    r = json.loads((tmp_path / "out" / "transformer2.json").read_text())
    assert set(r["unseen"]) == {"u1", "u2", "u3", "u4"} and set(r["expert_tasks"]) == {"alpha_task", "beta_task"}
    for row in r["unseen"].values():
        for s in ("base", "prompt_dispatch", "classifier_dispatch", "cem"):
            e = row[s]
            assert e["n"] == 8 and e["low"] <= e["accuracy"] <= e["high"]
        for s in ("prompt_dispatch", "classifier_dispatch", "cem"):
            c = row[f"{s}_vs_base"]
            assert c["low"] <= c["delta"] <= c["high"] and 0 <= c["p"] <= 1
            assert c["delta"] == pytest.approx(row[s]["accuracy"] - row["base"]["accuracy"])
        assert row["cem_search"]["evaluations"] > 0 and row["cem_search"]["evaluations_per_second"] > 0
    for label in ("prompt_dispatch", "classifier_dispatch"):
        for mode in ("fitted", "argmax"):
            d = r["dispatch_accuracy"][label][mode]
            assert set(d["per_task"]) == {"alpha_task", "beta_task", "u1", "u2", "u3", "u4"}
            assert d["per_task"]["u1"]["right"] == "others" and d["per_task"]["alpha_task"]["right"] == "alpha_task"
            assert d["overall"]["n"] == 2 * 6 + 4 * 8
        assert r["calibration"][label]["threshold"] >= 0
    assert set(r["goals"]) == {
        "never_significantly_below_base",
        "best_mean_delta_at_least_3_points",
        "dispatch_recovers_80pct_of_oracle",
    }
    assert all(isinstance(g["met"], bool) for g in r["goals"].values())
    for key in ("multiple_choice_prompt_dispatch", "generation_classifier_dispatch"):
        assert r["timing"][key]["pass1_seconds"] > 0 and r["timing"][key]["pass2_seconds"] > 0
    assert r["timing"]["multiple_choice_prompt_dispatch"]["n"] == 6 * 2  # 2 examples of each of the 6 tasks
    md = (tmp_path / "out" / "transformer2.md").read_text()
    for heading in ("## Goals", "## Accuracy on unseen tasks", "## Dispatch accuracy", "## Time", "oracle"):
        assert heading in md
    assert (tmp_path / "out" / "transformer2.png").stat().st_size > 0
    assert (tmp_path / "out" / "cem_fitness.png").stat().st_size > 0


def test_smoke_base_accuracy_matches_plain_evaluation(smoke, tmp_path):
    """The cached per-example answers of the base model give the accuracy `evaluation.evaluate` gives."""
    from peft_spectral.evaluation import evaluate

    out_dir, _ = smoke
    r = json.loads((out_dir / "out" / "transformer2.json").read_text())
    model, tok, _, get_task = _bench_module().smoke_setup(tmp_path, seed=0)
    for name in ("u1", "u3"):
        exs = get_task(name).test[:8]
        reference = evaluate(model, tok, exs, kind="multiple_choice", mode="loglik")
        assert r["unseen"][name]["base"]["accuracy"] == pytest.approx(reference.accuracy)
        assert reference.accuracy not in (0.0, 1.0, 0.5)  # the labels are uneven: a constant answer is not 0.5


def test_generated_answer_mode_matches_plain_generation(tmp_path):
    """`--answer-mode generate` (the default) scores greedy generated answers as `evaluate(mode="generate")` does."""
    from peft_spectral.evaluation import evaluate
    from peft_spectral.expert_eval import DEFAULT_MAX_NEW_TOKENS

    proc = _run(tmp_path, "--answer-mode", "generate")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "out" / "transformer2.json").read_text())
    model, tok, _, get_task = _bench_module().smoke_setup(tmp_path / "ref", seed=0)
    differs = []
    for name in ("u1", "u3"):
        exs = get_task(name).test[:8]
        generated = evaluate(
            model, tok, exs, kind="multiple_choice", mode="generate", max_new_tokens=DEFAULT_MAX_NEW_TOKENS
        )
        loglik = evaluate(model, tok, exs, kind="multiple_choice", mode="loglik")
        assert r["unseen"][name]["base"]["accuracy"] == pytest.approx(generated.accuracy)
        differs.append(generated.accuracy != loglik.accuracy)
    assert any(differs)  # the two modes score these tasks differently, so the match above is the generated path
    assert _bench_module().gold_pick(get_task("u1").test[0], True) == get_task("u1").test[0].label
    assert _bench_module().gold_pick(get_task("u1").test[0], False) == -1


def test_rerun_resumes_from_the_state_file(smoke):
    tmp_path, _ = smoke
    state_file = tmp_path / "w" / "state.json"
    before = json.loads(state_file.read_text())
    again = _run(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stderr
    assert "pass 2 " not in log and "pass 1 " not in log and "classifier expert trained" not in log
    assert "CEM on" not in log and "timing runs" not in log
    after = json.loads(state_file.read_text())
    assert after["answers"] == before["answers"] and after["cem"] == before["cem"]


def test_overlapping_task_sets_are_refused(tmp_path):
    proc = _run(tmp_path, "--unseen", "alpha_task", "u2", "u3", "u4")
    assert proc.returncode != 0
    assert "the expert and unseen task sets share ['alpha_task']" in proc.stderr
    proc = _run(tmp_path, "--others-tasks", "u1", "o2")
    assert proc.returncode != 0 and "the unseen and others task sets share ['u1']" in proc.stderr


def test_disjointness_checks():
    bench = _bench_module()
    from peft_spectral.tasks import Example

    bench.check_disjoint(["a"], ["b"], ["c"])
    with pytest.raises(SystemExit, match="expert and others"):
        bench.check_disjoint(["a"], ["b"], ["a"])
    same = Example(prompt="What is  2+2?", target="4")
    with pytest.raises(SystemExit, match="both in train and in test"):
        bench.check_splits_disjoint("t", {"train": [same], "test": [Example(prompt="What is 2+2?", target="4")]})
