"""`benchmarks/bench_cpi.py`: the smoke run's report (scenarios, reduced data, CIs, normalised score, forgetting,
goals), every number recomputed from the stored per-example verdicts, probes outside the SFT budget, resuming, the
settings check, the time budget, and the analysis functions on known verdicts."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_cpi.py"
METHODS = ("reference", "multitask", "naive_multistage", "cpi_ft")
S, P, T = 12, 4, 3  # the smoke defaults: SFT budget, probe steps, tasks per scenario


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_cpi", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


def _run(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, str(SCRIPT), "--smoke", "--out", str(out), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run of both scenarios, full and half training data; returns (out dir, report, stdout)."""
    out = tmp_path_factory.mktemp("bench_cpi")
    proc = _ok(_run(out, "--train-fraction", "1", "0.5"))
    return out, json.loads((out / "cpi.json").read_text()), proc.stdout


def _settings(report):
    for scen_name, scen in report["scenarios"].items():
        for fk, setting in scen["settings"].items():
            yield scen_name, fk, scen, setting


def test_smoke_report_has_the_new_fields(smoke):
    out, report, stdout = smoke
    assert "ETA" in stdout and "Planned: 18 of 18 part(s)" in stdout
    assert set(report["scenarios"]) == {"compatible", "conflicting"}
    assert report["missing"] == []
    assert report["setup"]["budget_steps"] == S and report["setup"]["probe_steps"] == P
    assert report["rates"]["s_per_step"] > 0 and "multiple_choice" in report["rates"]["s_per_eval_example"]
    for _, fk, scen, setting in _settings(report):
        assert fk in ("1", "0.5") and setting["complete"]
        names = [t["name"] for t in scen["tasks"]]
        assert scen["base"] is not None and scen["base"]["sft_steps"] == 0
        for m in METHODS:
            r = setting["methods"][m]
            for n in names:
                e = r["final"][n]
                assert e["n"] == 10 and e["low"] <= e["accuracy"] <= e["high"] and e["text"].endswith("(n=10)")
                assert e["accuracy"] == np.mean(r["verdicts"]["final"][n])
            assert r["average"] == pytest.approx(np.mean([r["final"][n]["accuracy"] for n in names]))
            assert r["pooled"]["n"] == 10 * len(names)
            assert set(r["timings_s"]) >= {"train_s", "probe_s", "eval_s", "total_s"}
            assert r["normalised"] is not None
        assert setting["methods"]["cpi_ft"]["timings_s"]["probe_s"] > 0
        assert set(setting["goals"]) == {"forgetting", "average"}
        assert setting["goals"]["average"]["met"] in (True, False)
    text = (out / "cpi.md").read_text()
    assert "## Scenario: compatible" in text and "## Scenario: conflicting" in text
    assert "reduced data: 0.5 of each task's training examples" in text
    assert "Goal: CPI-FT forgetting ≤ ½ naive" in text and "Goal: CPI-FT average ≥ multi-task" in text
    assert "| single-task SFT (reference) |" in text and "probe time" in text
    assert (out / "cpi.png").stat().st_size > 1000


def test_normalised_score_is_the_score_over_the_reference(smoke):
    _, report, _ = smoke
    checked = undefined = 0
    for _, _, scen, setting in _settings(report):
        names = [t["name"] for t in scen["tasks"]]
        ref = setting["methods"]["reference"]["verdicts"]["final"]
        for m in METHODS:
            norm = setting["methods"][m]["normalised"]
            ratios = []
            for n in names:
                acc = np.mean(setting["methods"][m]["verdicts"]["final"][n])
                ref_acc = np.mean(ref[n])
                if ref_acc == 0:
                    assert norm["per_task"][n] is None and n in norm["undefined_for"]
                    undefined += 1
                    continue
                assert norm["per_task"][n] == pytest.approx(acc / ref_acc)
                ratios.append(acc / ref_acc)
                checked += 1
            assert norm["average"] == pytest.approx(np.mean(ratios))
        base_norm = setting["base_normalised"]
        for n in names:
            ref_acc = np.mean(ref[n])
            if ref_acc > 0:
                assert base_norm["per_task"][n] == pytest.approx(
                    np.mean(scen["base"]["verdicts"]["final"][n]) / ref_acc
                )
    assert checked > 0


def test_forgetting_is_recomputed_from_the_stored_verdicts(smoke):
    _, report, _ = smoke
    nonzero = 0
    for _, _, scen, setting in _settings(report):
        names = [t["name"] for t in scen["tasks"]]
        naive = setting["methods"]["naive_multistage"]
        assert naive["earlier_tasks"] == names[:-1]
        for m in ("naive_multistage", "cpi_ft"):
            r = setting["methods"][m]
            fg, v = r["forgetting"], r["verdicts"]
            assert fg["tasks"] == r["earlier_tasks"] and set(v["after_own"]) == set(r["earlier_tasks"])
            after = np.concatenate([v["after_own"][n] for n in fg["tasks"]])
            final = np.concatenate([v["final"][n] for n in fg["tasks"]])
            assert fg["pooled"]["delta"] == pytest.approx(after.mean() - final.mean())
            assert fg["pooled"]["low"] <= fg["pooled"]["delta"] <= fg["pooled"]["high"]
            assert fg["pooled"]["n"] == after.size
            for n in fg["tasks"]:
                assert fg["per_task"][n]["delta"] == pytest.approx(np.mean(v["after_own"][n]) - np.mean(v["final"][n]))
            nonzero += fg["pooled"]["delta"] != 0
        goal = setting["goals"]["forgetting"]
        c = setting["methods"]["cpi_ft"]
        common = [n for n in naive["earlier_tasks"] if n in c["earlier_tasks"]]
        assert goal["tasks"] == common

        nf, cf = (
            np.concatenate(
                [np.array(r["verdicts"]["after_own"][n]) - r["verdicts"]["final"][n] for n in common]
            ).mean()
            for r in (naive, c)
        )
        assert goal["naive"] == pytest.approx(nf) and goal["cpi"] == pytest.approx(cf)
        assert goal["naive_minus_cpi"]["delta"] == pytest.approx(nf - cf)
        low, high = goal["naive_minus_cpi"]["low"], goal["naive_minus_cpi"]["high"]
        assert low <= nf - cf + 1e-12 and nf - cf <= high + 1e-12
        expected = None if nf <= 0 else bool(cf <= 0.5 * nf and low > 0)
        assert goal["met"] == expected
        avg = setting["goals"]["average"]["cpi_minus_multitask"]
        pooled_c = np.concatenate([c["verdicts"]["final"][n] for n in names])
        pooled_m = np.concatenate([setting["methods"]["multitask"]["verdicts"]["final"][n] for n in names])
        assert avg["delta"] == pytest.approx(pooled_c.mean() - pooled_m.mean()) and avg["n"] == pooled_c.size
        assert setting["goals"]["average"]["met"] == bool(avg["delta"] >= 0)
    assert nonzero > 0  # the smoke run does forget somewhere, so the recomputation is not of zeros only


def test_probes_are_outside_the_sft_budget(smoke):
    _, report, _ = smoke
    for _, _, _, setting in _settings(report):
        for m in METHODS:
            r = setting["methods"][m]
            assert r["sft_steps"] == S == r["planned_sft_steps"], m  # steps the trainer really took
            assert sum(run["steps"] for run in r["sft_runs"]) == S and not r["stopped_early"]
        assert [run["steps"] for run in setting["methods"]["reference"]["sft_runs"]] == [S // T] * T
        assert [run["steps"] for run in setting["methods"]["naive_multistage"]["sft_runs"]] == [S // T] * T
        cpi = setting["methods"]["cpi_ft"]
        assert [run["steps"] for run in cpi["probe_runs"]] == [P] * T and cpi["probe_steps"] == T * P
        assert all(run["label"].startswith("stage:") for run in cpi["sft_runs"])
        assert sum(run["steps"] for run in cpi["sft_runs"]) == S
        for m in ("reference", "multitask", "naive_multistage"):
            assert setting["methods"][m]["probe_steps"] == 0 and setting["methods"][m]["probe_runs"] == []


def test_reduced_data_trains_on_the_fraction(smoke):
    _, report, _ = smoke
    for _, fk, scen, setting in _settings(report):
        n = {"1": 30, "0.5": 15}[fk]  # the smoke tasks have 30 training examples
        assert setting["train_fraction"] == float(fk)
        assert setting["n_train"] == {t["name"]: n for t in scen["tasks"]}
        m = setting["methods"]
        # the size of the dataset each trainer was given
        for run in m["reference"]["sft_runs"] + m["naive_multistage"]["sft_runs"] + m["cpi_ft"]["probe_runs"]:
            assert run["dataset_size"] == n, run
        assert m["multitask"]["sft_runs"][0]["dataset_size"] == T * n  # the balanced mix of all tasks
        for run in m["cpi_ft"]["sft_runs"]:
            assert run["dataset_size"] % n == 0


def test_resume_skips_finished_parts_and_other_settings_are_refused(smoke, tmp_path):
    out, report, _ = smoke
    state_path = out / "cpi_smoke_state" / "bench_cpi_state.json"
    before = json.loads(state_path.read_text())["parts"]
    again = _ok(_run(out, "--train-fraction", "1", "0.5"))
    assert "Planned: 0 of 18 part(s)" in again.stdout and "all parts done: nothing to run" in again.stdout
    assert again.stdout.count("finished in an earlier run (reused)") == 18
    assert "SFT run" not in again.stdout and " scored " not in again.stdout and "elapsed, ETA" not in again.stdout
    after = json.loads(state_path.read_text())["parts"]
    assert {k: r["finished_at"] for k, r in after.items()} == {k: r["finished_at"] for k, r in before.items()}
    assert json.loads((out / "cpi.json").read_text())["scenarios"] == report["scenarios"]

    refused = _run(out, "--budget", "9")
    assert refused.returncode != 0
    message = refused.stderr.strip().splitlines()
    assert len(message) == 1 and "other settings" in message[0] and "budget_steps: 12 -> 9" in message[0]
    assert "--fresh" in message[0]
    assert json.loads(state_path.read_text())["parts"] == after  # untouched

    # --fresh clears it (in a copy, not to disturb the other tests)
    copy = tmp_path / "copy"
    (copy / "cpi_smoke_state").mkdir(parents=True)
    (copy / "cpi_smoke_state" / "bench_cpi_state.json").write_text(state_path.read_text())
    fresh = _ok(_run(copy, "--budget", "9", "--fresh", "--scenario", "compatible", "--max-minutes", "0"))
    assert "Planned: 5 of 5 part(s)" in fresh.stdout
    state = json.loads((copy / "cpi_smoke_state" / "bench_cpi_state.json").read_text())
    assert state["settings"]["budget_steps"] == 9 and list(state["parts"]) == ["compatible/base"]


def test_time_budget_defers_parts_and_caps_training(tmp_path):
    first = _ok(_run(tmp_path, "--scenario", "compatible", "--max-minutes", "0"))
    assert "time budget (--max-minutes 0) reached: 4 part(s) left" in first.stdout
    state_path = tmp_path / "cpi_smoke_state" / "bench_cpi_state.json"
    assert list(json.loads(state_path.read_text())["parts"]) == ["compatible/base"]
    report = json.loads((tmp_path / "cpi.json").read_text())
    assert len(report["missing"]) == 4 and report["invocation"]["stopped_by_budget"]

    second = _ok(_run(tmp_path, "--scenario", "compatible", "--max-minutes", "0"))
    assert "compatible/base: finished in an earlier run (reused)" in second.stdout
    ref = json.loads(state_path.read_text())["parts"]["compatible/1/reference"]
    assert ref["stopped_early"] and ref["sft_steps"] == T < S  # one step per run, then the deadline stops it
    assert [run["steps"] for run in ref["sft_runs"]] == [1] * T
    text = (tmp_path / "cpi.md").read_text()
    assert "Stopped early by the time budget" in text and "Unfinished" in text

    redo = _ok(_run(tmp_path, "--scenario", "compatible", "--redo-stopped", "--estimate-only"))
    assert "Planned: 4 of 5 part(s)" in redo.stdout  # the stopped part is planned again


def test_estimate_only_trains_nothing(tmp_path):
    proc = _ok(_run(tmp_path, "--estimate-only", "--train-fraction", "1", "0.25"))
    assert "Planned: 18 of 18 part(s) to run" in proc.stdout and "estimated ~" in proc.stdout
    assert "compatible/0.25: reference, multitask, naive_multistage, cpi_ft" in proc.stdout
    assert "SFT run" not in proc.stdout and not (tmp_path / "cpi.json").exists()
    assert not (tmp_path / "cpi_smoke_state" / "bench_cpi_state.json").exists()


def test_smoke_never_writes_the_committed_results():
    proc = _run(ROOT / "docs" / "results")
    assert proc.returncode != 0 and "never writes into docs/results" in proc.stderr
    assert bench.SMOKE_OUT != ROOT / "docs" / "results"


# ------------------------------------------------------------------------------------------------ analysis units


def _record(method, names, final, after=None, earlier=()):
    return {
        "method": method,
        "tasks": [{"name": n, "kind": "generation", "n_test": len(final[n]), "n_train": 5} for n in names],
        "verdicts": {"final": final, "after_own": after or {}},
        "earlier_tasks": list(earlier),
    }


def test_method_summary_normalises_by_the_reference():
    names = ["a", "b", "c"]
    ref = _record("reference", names, {"a": [1, 1, 0, 0], "b": [0, 0, 0, 0], "c": [1, 1, 1, 1]})
    rec = _record("multitask", names, {"a": [1, 0, 0, 0], "b": [1, 0, 0, 0], "c": [1, 1, 1, 0]})
    s = bench.method_summary(rec, ref)
    assert s["normalised"]["per_task"] == {"a": 0.5, "b": None, "c": 0.75}
    assert s["normalised"]["average"] == pytest.approx(0.625) and s["normalised"]["undefined_for"] == ["b"]
    assert s["average"] == pytest.approx((0.25 + 0.25 + 0.75) / 3) and s["forgetting"] is None


def test_forgetting_goal_on_known_verdicts():
    names = ["a", "b", "c"]
    n = 40
    ones, zeros = [1] * n, [0] * n
    naive = _record(
        "naive_multistage", names, {"a": zeros, "b": zeros, "c": ones}, {"a": ones, "b": ones}, earlier=["a", "b"]
    )
    half = [1] * (n // 2) + [0] * (n // 2)
    cpi_good = _record("cpi_ft", names, {"a": ones, "b": half, "c": ones}, {"a": ones, "b": ones}, ["a", "b"])
    g = bench.forgetting_goal(naive, cpi_good)
    assert g["naive"] == 1.0 and g["cpi"] == 0.25 and g["met"] is True and g["naive_minus_cpi"]["low"] > 0
    s = bench.method_summary(cpi_good, None)
    assert s["forgetting"]["pooled"]["delta"] == pytest.approx(0.25)
    assert s["forgetting"]["per_task"]["b"]["delta"] == pytest.approx(0.5)
    cpi_bad = _record("cpi_ft", names, {"a": half, "b": zeros, "c": ones}, {"a": ones, "b": ones}, ["a", "b"])
    g = bench.forgetting_goal(naive, cpi_bad)
    assert g["cpi"] == 0.75 and g["met"] is False  # forgot less, but more than half
    no_forgetting = _record(
        "naive_multistage", names, {"a": ones, "b": ones, "c": ones}, {"a": ones, "b": ones}, names[:2]
    )
    assert bench.forgetting_goal(no_forgetting, cpi_good)["met"] is None
    one_group = _record("cpi_ft", names, {"a": ones, "b": ones, "c": ones}, {}, [])
    assert bench.forgetting_goal(naive, one_group)["met"] is None


def test_estimate_counts_probes_outside_the_budget():
    class Args:
        budget, probe_steps = 120, 40

    tasks = [
        {"name": "a", "kind": "generation", "n_test": 100},
        {"name": "b", "kind": "multiple_choice", "n_test": 50},
    ]
    assert bench.part_work(bench.Part("x", "cpi_ft", 1.0), tasks, Args)["steps"] == 120 + 2 * 40
    assert bench.part_work(bench.Part("x", "multitask", 1.0), tasks, Args)["steps"] == 120
    naive = bench.part_work(bench.Part("x", "naive_multistage", 1.0), tasks, Args)
    assert naive["evals"] == {"generation": 200, "multiple_choice": 50}
    assert bench.per_task_steps(10, 3) == [4, 3, 3]


@pytest.mark.slow
def test_default_tasks_exist_with_100_test_examples():
    from peft_spectral.tasks import load_task

    for scenario, names in bench.DEFAULT_TASKS.items():
        kinds = set()
        for name in names:
            task = load_task(name, seed=0)
            assert len(task.test) >= 100, (scenario, name, len(task.test))
            assert len(task.train) >= 300, (scenario, name, len(task.train))
            kinds.add(task.kind)
        assert kinds == ({"multiple_choice"} if scenario == "compatible" else {"multiple_choice", "generation"})
