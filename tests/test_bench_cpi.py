"""`benchmarks/bench_cpi.py` on its smoke run: the report (scenarios, reduced data, CIs, normalised score,
forgetting, goals), every number recomputed from the stored per-example verdicts, probes outside the SFT budget,
resuming, the settings check, and the analysis functions on known verdicts."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from peft_spectral.stats import bootstrap_mean_ci


SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cpi.py"
METHODS = ("reference", "multitask", "naive_multistage", "cpi_ft")
S, P, T = 12, 4, 3  # the smoke defaults: SFT budget, probe steps, tasks per scenario


def _load():
    spec = importlib.util.spec_from_file_location("bench_cpi", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load()


def _main(out: Path, *args: str) -> int:
    threads = torch.get_num_threads()
    try:
        return bench.main(["--smoke", "--no-progress", "--output", str(out), *args])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run of both scenarios, full and half training data; returns (out dir, report)."""
    out = tmp_path_factory.mktemp("bench_cpi")
    assert _main(out, "--train-fraction", "1", "0.5") == 0
    return out, json.loads((out / "cpi.json").read_text())


def _settings(report):
    for scen_name, scen in report["scenarios"].items():
        for fk, setting in scen["settings"].items():
            yield scen_name, fk, scen, setting


def test_smoke_report_has_every_part(smoke):
    out, report = smoke
    assert set(report["scenarios"]) == {"compatible", "conflicting"} and report["missing"] == []
    assert report["config"]["budget"] == S and report["config"]["probe_steps"] == P
    assert report["machine"]["cpu_count"] >= 1 and report["config"]["smoke"] is True
    for scen_name, fk, scen, setting in _settings(report):
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
            assert set(r["timings_s"]) == {"train_s", "probe_s", "eval_s", "total_s"}
            assert r["normalised"] is not None
            other = r["verdicts"]["other"]["final"]
            if scen_name == "conflicting":  # generated answers also read with the other extraction
                assert other["inc"] is not None and len(other["inc"]) == 10 and other["parity"] is None
                readings = [other["inc"], r["verdicts"]["final"]["parity"], other["rev"]]  # parity: one reading
                assert r["average_other"] == pytest.approx(np.mean([np.mean(v) for v in readings]))
            else:
                assert "average_other" not in r
        assert setting["methods"]["cpi_ft"]["timings_s"]["probe_s"] > 0
        assert set(setting["goals"]) == {"forgetting", "average"}
    text = (out / "cpi.md").read_text()
    assert (
        "smoke run, not a result" in text and "## Scenario: compatible" in text and "## Scenario: conflicting" in text
    )
    assert "reduced data: 0.5 of each task's training examples" in text and "**strict** extraction" in text
    assert "Goal: CPI-FT forgetting ≤ ½ naive" in text and "Goal: CPI-FT average ≥ multi-task" in text
    assert "| single-task SFT (reference) |" in text and "| average (lenient) |" in text
    assert (out / "cpi.png").stat().st_size > 1000


def test_normalised_score_is_the_score_over_the_reference(smoke):
    _, report = smoke
    checked = 0
    for _, _, scen, setting in _settings(report):
        names = [t["name"] for t in scen["tasks"]]
        ref = setting["methods"]["reference"]["verdicts"]["final"]
        for m in METHODS:
            norm = setting["methods"][m]["normalised"]
            ratios = []
            for n in names:
                acc, ref_acc = np.mean(setting["methods"][m]["verdicts"]["final"][n]), np.mean(ref[n])
                if ref_acc == 0:
                    assert norm["per_task"][n] is None and n in norm["undefined_for"]
                    continue
                assert norm["per_task"][n] == pytest.approx(acc / ref_acc)
                ratios.append(acc / ref_acc)
                checked += 1
            assert norm["average"] == pytest.approx(np.mean(ratios))
        for n in names:
            if np.mean(ref[n]) > 0:
                base = np.mean(scen["base"]["verdicts"]["final"][n])
                assert setting["base_normalised"]["per_task"][n] == pytest.approx(base / np.mean(ref[n]))
    assert checked > 0


def test_forgetting_is_recomputed_from_the_stored_verdicts(smoke):
    _, report = smoke
    nonzero = 0
    for _, _, scen, setting in _settings(report):
        names = [t["name"] for t in scen["tasks"]]
        naive, cpi = setting["methods"]["naive_multistage"], setting["methods"]["cpi_ft"]
        assert naive["earlier_tasks"] == names[:-1]
        for r in (naive, cpi):
            fg, v = r["forgetting"], r["verdicts"]
            assert fg["tasks"] == r["earlier_tasks"] and set(v["after_own"]) == set(r["earlier_tasks"])
            after = np.concatenate([v["after_own"][n] for n in fg["tasks"]])
            final = np.concatenate([v["final"][n] for n in fg["tasks"]])
            assert (
                fg["pooled"]["delta"] == pytest.approx(after.mean() - final.mean()) and fg["pooled"]["n"] == after.size
            )
            assert fg["pooled"]["low"] <= fg["pooled"]["delta"] <= fg["pooled"]["high"]
            for n in fg["tasks"]:
                assert fg["per_task"][n]["delta"] == pytest.approx(np.mean(v["after_own"][n]) - np.mean(v["final"][n]))
            nonzero += fg["pooled"]["delta"] != 0
        goal = setting["goals"]["forgetting"]
        common = [n for n in naive["earlier_tasks"] if n in cpi["earlier_tasks"]]
        forgot = [
            np.concatenate([np.array(r["verdicts"]["after_own"][n]) - r["verdicts"]["final"][n] for n in common])
            for r in (naive, cpi)
        ]
        nf, cf = (float(f.mean()) for f in forgot)
        assert goal["tasks"] == common and goal["naive"] == pytest.approx(nf) and goal["cpi"] == pytest.approx(cf)
        low, high = bootstrap_mean_ci(forgot[0] - forgot[1])
        assert goal["naive_minus_cpi"] == {"delta": pytest.approx(nf - cf), "low": low, "high": high}
        assert goal["met"] == (None if nf <= 0 else bool(cf <= 0.5 * nf and low > 0))
        avg = setting["goals"]["average"]["cpi_minus_multitask"]
        pooled_c = np.concatenate([cpi["verdicts"]["final"][n] for n in names])
        pooled_m = np.concatenate([setting["methods"]["multitask"]["verdicts"]["final"][n] for n in names])
        assert avg["delta"] == pytest.approx(pooled_c.mean() - pooled_m.mean()) and avg["n"] == pooled_c.size
        assert setting["goals"]["average"]["met"] == bool(avg["delta"] >= 0)
    assert nonzero > 0  # the smoke run does forget somewhere, so the recomputation is not of zeros only


def test_probes_are_outside_the_sft_budget(smoke):
    _, report = smoke
    for _, _, _, setting in _settings(report):
        for m in METHODS:
            r = setting["methods"][m]
            assert r["sft_steps"] == S == r["planned_sft_steps"] == sum(run["steps"] for run in r["sft_runs"]), m
        assert [run["steps"] for run in setting["methods"]["reference"]["sft_runs"]] == [S // T] * T
        assert [run["steps"] for run in setting["methods"]["naive_multistage"]["sft_runs"]] == [S // T] * T
        cpi = setting["methods"]["cpi_ft"]
        assert [run["steps"] for run in cpi["probe_runs"]] == [P] * T and cpi["probe_steps"] == T * P
        assert all(run["label"].startswith("stage:") for run in cpi["sft_runs"])
        for m in ("reference", "multitask", "naive_multistage"):
            assert setting["methods"][m]["probe_steps"] == 0 and setting["methods"][m]["probe_runs"] == []


def test_reduced_data_trains_on_the_fraction(smoke):
    _, report = smoke
    for _, fk, scen, setting in _settings(report):
        n = {"1": 30, "0.5": 15}[fk]  # the smoke tasks have 30 training examples
        assert setting["train_fraction"] == float(fk) and setting["n_train"] == {t["name"]: n for t in scen["tasks"]}
        m = setting["methods"]
        for run in m["reference"]["sft_runs"] + m["naive_multistage"]["sft_runs"] + m["cpi_ft"]["probe_runs"]:
            assert run["dataset_size"] == n, run  # the size of the dataset each trainer was given
        assert m["multitask"]["sft_runs"][0]["dataset_size"] == T * n  # the balanced mix of all tasks
        assert all(run["dataset_size"] % n == 0 for run in m["cpi_ft"]["sft_runs"])


def test_resume_skips_finished_parts_and_other_settings_are_refused(smoke, tmp_path, monkeypatch):
    out, report = smoke
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    state = json.loads((copy / "cpi_state.json").read_text())
    assert len(state["results"]) == 18

    def no_training(*args, **kwargs):
        raise AssertionError("a finished part ran again")

    monkeypatch.setattr(bench, "run_part", no_training)
    assert _main(copy, "--train-fraction", "1", "0.5") == 0
    assert json.loads((copy / "cpi_state.json").read_text()) == state
    assert json.loads((copy / "cpi.json").read_text())["scenarios"] == report["scenarios"]

    assert _main(copy, "--report-only", "--train-fraction", "1", "0.5", "0.25") == 0  # a setting not run yet
    missing = json.loads((copy / "cpi.json").read_text())["missing"]
    assert missing == [f"{s}/0.25/{m}" for s in ("compatible", "conflicting") for m in METHODS]
    assert "**Unfinished**: not run yet: compatible/0.25/reference" in (copy / "cpi.md").read_text()

    with pytest.raises(SystemExit, match="belongs to another job"):
        _main(copy, "--tau", "0.2")
    assert json.loads((copy / "cpi_state.json").read_text()) == state  # untouched


def test_bad_options_are_refused():
    with pytest.raises(SystemExit):
        bench.parse_args(["--train-fraction", "1.5"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--compatible-tasks", "rg:gcd", "rg:gcd"])


def test_default_tasks_have_300_training_and_100_test_examples():
    from peft_spectral.data import load_task

    for _, specs in bench.SCENARIOS.values():
        for spec in specs:
            task = load_task(spec, seed=0, max_examples=500)
            assert task.kind == "generation" and len(task.train) >= 300 and len(task.test) >= 100, spec


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
    names, n = ["a", "b", "c"], 40
    ones, zeros, half = [1] * n, [0] * n, [1] * (n // 2) + [0] * (n // 2)
    naive = _record("naive_multistage", names, {"a": zeros, "b": zeros, "c": ones}, {"a": ones, "b": ones}, ["a", "b"])
    cpi_good = _record("cpi_ft", names, {"a": ones, "b": half, "c": ones}, {"a": ones, "b": ones}, ["a", "b"])
    g = bench.forgetting_goal(naive, cpi_good)
    assert g["naive"] == 1.0 and g["cpi"] == 0.25 and g["met"] is True and g["naive_minus_cpi"]["low"] > 0
    s = bench.method_summary(cpi_good, None)
    assert s["forgetting"]["pooled"]["delta"] == pytest.approx(0.25)
    assert s["forgetting"]["per_task"]["b"]["delta"] == pytest.approx(0.5)
    cpi_bad = _record("cpi_ft", names, {"a": half, "b": zeros, "c": ones}, {"a": ones, "b": ones}, ["a", "b"])
    g = bench.forgetting_goal(naive, cpi_bad)
    assert g["cpi"] == 0.75 and g["met"] is False  # forgot less, but more than half
    nothing = _record("naive_multistage", names, {"a": ones, "b": ones, "c": ones}, {"a": ones, "b": ones}, ["a", "b"])
    assert bench.forgetting_goal(nothing, cpi_good)["met"] is None
    one_group = _record("cpi_ft", names, {"a": ones, "b": ones, "c": ones}, {}, [])
    assert bench.forgetting_goal(naive, one_group)["met"] is None
