"""`benchmarks/bench_transformer2.py --smoke`: random tiny-model experts, reasoning-gym unseen tasks of each role,
both dispatchers with fitted thresholds, CEM, oracle; the report's numbers come from the recorded verdicts."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_transformer2", ROOT / "benchmarks" / "bench_transformer2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _job(state: dict, prefix: str, name: str):
    """The one job `prefix:name@<task digest>` of the state (keys name the digests of what the job used)."""
    (key,) = [k for k in state if k.startswith(prefix) and k.endswith(f":{name}@{k.rsplit('@', 1)[-1]}")]
    return state[key]


def test_smoke_run_reports_every_strategy_and_resumes(tmp_path):
    from peft_spectral.stats import compare_paired

    bench = _bench()
    argv = ["--smoke", "--output", str(tmp_path), "--no-progress"]
    assert bench.main(argv) == 0
    saved = json.loads((tmp_path / "transformer2.json").read_text())
    rows = saved["rows"]
    assert {r["role"] for r in rows.values()} == {"related", "two_skill", "control"}
    state = json.loads((tmp_path / "transformer2_state.json").read_text())["results"]
    for name, row in rows.items():
        base = _job(state, "answers:base:", name)["correct"]
        cem = _job(state, "answers:cem@", name)["correct"]
        assert row["n"] == len(base) == 6
        assert row["cem"]["delta"] == pytest.approx(compare_paired(base, cem).delta)
        for label in bench.DISPATCHERS:
            assert sum(row[label]["chosen"].values()) == 6
    # the majority-answer baseline: the train split's most frequent answer, scored on the same test questions
    from collections import Counter

    from peft_spectral.data import load_task

    for name, row in rows.items():
        task = load_task(row["spec"], seed=0, max_examples=1000)
        answer = Counter(e.target for e in task.train).most_common(1)[0][0]
        constant = [e.target == answer for e in task.test[:6]]
        cem = _job(state, "answers:cem@", name)["correct"]
        majority = row["majority"]
        assert majority["answer"] == answer and majority["share"] == pytest.approx(sum(constant) / 6)
        entry = majority["strategies"]["cem"]
        assert entry["minus_constant"]["delta"] == pytest.approx(compare_paired(constant, cem).delta)
        assert entry["right_on_majority"] == sum(c and k for c, k in zip(constant, cem))
        assert entry["rest_n"] == 6 - sum(constant)
        top = entry["top_right"]
        assert top["of_right"] == sum(cem) and top["right"] == max(
            sum(ok for e, ok in zip(task.test[:6], cem) if e.target == a) for a in {e.target for e in task.test[:6]}
        )
    two = next(r for r in rows.values() if r["role"] == "two_skill")
    assert len(two["experts"]) == 3  # every single expert is scored on the two-skill task
    goals = saved["goals"]
    assert set(goals["mean_delta_related"]) == {"prompt_dispatch", "calibrated_dispatch", "classifier_dispatch", "cem"}
    text = (tmp_path / "transformer2.md").read_text()
    assert "## Goals (issue #25 §3)" in text and "smoke run, not a result" in text
    assert "## Beyond the majority answer" in text
    assert (tmp_path / "transformer2.png").read_bytes()[:4] == b"\x89PNG"
    # resumable: a second run answers nothing again and reports the same rows
    assert bench.main(argv) == 0
    assert json.loads((tmp_path / "transformer2.json").read_text())["rows"] == rows


def test_a_retrained_expert_reruns_only_the_jobs_that_used_it(tmp_path, monkeypatch):
    bench = _bench()
    argv = ["--smoke", "--output", str(tmp_path), "--no-progress"]
    assert bench.main(argv) == 0
    path = tmp_path / "transformer2_state.json"
    first = json.loads(path.read_text())["results"]
    build = bench.random_svf_experts

    def retrained(root, n, **kwargs):  # the same library, but random_0 with other weights
        build(root, n, **kwargs)
        build(tmp_path / "other", 1, scale=0.9)
        shutil.copy(tmp_path / "other" / "random_0" / "adapter_model.safetensors", Path(root, "random_0"))
        return Path(root)

    monkeypatch.setattr(bench, "random_svf_experts", retrained)
    assert bench.main(argv) == 0
    second = json.loads(path.read_text())["results"]
    added = set(second) - set(first)
    assert added, "the retrained expert's jobs must run again"
    assert all(k.startswith(("answers:random_0@", "answers:cem@", "cem@")) for k in added), sorted(added)
    assert any(k.startswith("answers:random_0@") for k in added) and any(k.startswith("cem@") for k in added)
    assert {k: second[k] for k in first} == first  # nothing recorded before is changed or re-run


def test_task_sets_are_disjoint():
    bench = _bench()
    specs = [s for _, s, _ in bench.UNSEEN.values()]
    assert len(set(specs)) == len(specs) and not set(specs) & set(bench.OTHERS_TASKS)
    roles = [r for r, _, _ in bench.UNSEEN.values()]
    assert roles.count("two_skill") >= 1 and roles.count("control") >= 2
    related = [e for r, _, e in bench.UNSEEN.values() if r == "related"]
    assert all(related.count(e) >= 2 for e in set(related))  # two related tasks per family expert
    recipes = json.loads((ROOT / "peft_spectral" / "library" / "recipes.json").read_text())["experts"]
    assert set(related) <= set(recipes)
    families = {recipes[e]["family"] for e in related}
    assert families == {r["family"] for r in recipes.values()}  # every skill family of the library has related tasks
    expert_specs = {part for r in recipes.values() for part in r["config"]["task"].split(";")}
    assert not expert_specs & set(specs) and not expert_specs & set(bench.OTHERS_TASKS)


def test_goals_leave_out_tasks_with_too_few_questions():
    bench = _bench()

    def row(n, delta, low):
        cell = {"accuracy": 0.5, "delta": delta, "delta_low": low, "delta_high": delta + 0.05}
        return {"role": "related", "n": n, "oracle": cell, "cem": cell, **{d: cell for d in bench.DISPATCHERS}}

    results = {"big": row(200, 0.10, 0.02), "small": row(12, -0.50, -0.9)}
    goals = bench.evaluate_goals(results, 200)
    assert goals["left_out_too_few_questions"] == ["small"]
    assert goals["mean_delta_related"]["cem"] == pytest.approx(0.10)  # "small" would pull it to -0.20
    assert goals["best_mean_delta_met"] and goals["best_significant_tasks"] == "1 of 1"
