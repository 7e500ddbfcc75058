"""`benchmarks/bench_compress.py` and `benchmarks/bench_compress_profile.py` on their smoke runs: the planted
truncation is found and helps on test, nothing is kept where nothing can help, every reported number is recomputed
from the stored per-example verdicts, both scoring rules rank the same candidates, and a killed run resumes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from peft_spectral import compress
from peft_spectral.stats import accuracy_ci, compare_paired


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
METHODS = ["laser", "c2i-standard (first_order)", "c2i-standard (raw)", "c2i-clustered (first_order)"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def threads():
    """The benchmarks may set torch's threads; give them back."""
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run, killed after the first task's LASER grid of the second, reported, then resumed."""
    bench = _load("bench_compress")
    out = tmp_path_factory.mktemp("bench_compress")
    argv = ["--smoke", "--no-progress", "--output", str(out)]
    real, calls = compress.c2i_scores, []

    def killed_on_the_second_task(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    threads = torch.get_num_threads()
    compress.c2i_scores = killed_on_the_second_task
    try:
        with pytest.raises(KeyboardInterrupt):
            bench.main(argv)
        state = json.loads((out / "compress_state.json").read_text())
        laser_states = sorted((out / "work").glob("laser_*.json"))
        partial = {
            "done": list(state["results"]),
            "laser_candidates": [len(json.loads(p.read_text())["results"]) for p in laser_states],
        }
        assert bench.main(argv + ["--report-only"]) == 0
        partial["report"] = (out / "compress.md").read_text()
        assert bench.main(argv) == 0
    finally:
        compress.c2i_scores = real
        torch.set_num_threads(threads)
    return out, json.loads((out / "compress.json").read_text()), partial, len(calls)


def test_a_killed_run_resumes_where_it_stopped(smoke):
    out, report, partial, calls = smoke
    assert partial["done"] == ["task:planted"]  # the first task is recorded, the second was not
    assert sorted(partial["laser_candidates"]) == [4, 4]  # the second task's LASER grid was saved before the kill
    assert "**Unfinished**: not run yet: agreeing." in partial["report"] and "| planted | laser |" in partial["report"]
    assert calls == 3  # the resumed run scored the unfinished task only
    assert [row["task"] for row in report["tasks"]] == ["planted", "agreeing"]
    assert "Unfinished" not in (out / "compress.md").read_text()
    assert (out / "compress.png").stat().st_size > 1000


def test_every_number_is_recomputed_from_the_stored_verdicts(smoke):
    _, report, _, _ = smoke
    kept_nothing = changed = 0
    for row, summary in zip(report["tasks"], report["summary"]):
        assert list(row["methods"]) == METHODS == list(summary["methods"])
        base = row["base"]["correct"]
        assert len(base) == row["sizes"]["test"] == 20
        assert summary["base"]["accuracy"] == pytest.approx(np.mean(base))
        laser = row["methods"]["laser"]["test"] or row["base"]
        for name, method in row["methods"].items():
            e = summary["methods"][name]
            verdicts = (method["test"] or row["base"])["correct"]
            ci = accuracy_ci(verdicts)
            assert (e["test"]["accuracy"], e["test"]["low"], e["test"]["high"]) == (ci.accuracy, ci.low, ci.high)
            d = compare_paired(base, verdicts)
            assert (e["delta"]["delta"], e["delta"]["low"], e["delta"]["high"]) == (d.delta, d.low, d.high)
            assert e["delta"]["p_value"] == d.p_value and e["delta"]["significant"] == d.significant
            assert e["kept_nothing"] == (method["test"] is None) == (not method["search"]["chosen"])
            if e["kept_nothing"]:  # no intervention: the base model's verdicts, Δ exactly 0
                kept_nothing += 1
                assert (d.delta, d.low, d.high, d.p_value) == (0.0, 0.0, 0.0, 1.0)
            changed += d.delta != 0
            if name != "laser":
                v = compare_paired(laser["correct"], verdicts)
                assert e["vs_laser"]["delta"] == pytest.approx(v.delta) and e["vs_laser"]["p_value"] == v.p_value
                assert e["speedup_vs_laser"] == pytest.approx(
                    row["methods"]["laser"]["search"]["wall_time_s"] / method["search"]["wall_time_s"]
                )
            generated = (method["test"] or row["base"])["generated"]
            assert len(generated["lenient"]) == len(generated["strict"]) == row["n_generate"] == 8
            assert e["generated"]["accuracy"] == pytest.approx(np.mean(generated["lenient"]))
        assert summary["below_base"] == [n for n, e in summary["methods"].items() if e["delta"]["high"] < 0]
    assert kept_nothing >= 3 and changed >= 1
    assert report["goals"]["c2i_never_significantly_below_base"]["met"] is True


def test_the_planted_truncation_is_found_and_nothing_is_kept_where_nothing_helps(smoke):
    _, report, _, _ = smoke
    planted, agreeing = report["summary"]
    for name in ("laser", "c2i-standard (first_order)"):
        assert planted["methods"][name]["chosen"] == ["L1.mlp.down_proj@0.2"]
        assert planted["methods"][name]["delta"]["delta"] > 0.3 and planted["methods"][name]["delta"]["significant"]
        assert "balanced" in planted["methods"][name]  # a multiple-choice task with labels
    assert all(agreeing["methods"][m]["kept_nothing"] for m in METHODS[1:])
    row = report["tasks"][1]
    assert row["info"]["params"]["answer_ranking"] == {"options": 4, "seed": 0} and row["labels"] is None
    assert agreeing["base"]["accuracy"] == 1.0  # relabelled with the model's own preference


def test_both_scoring_rules_rank_the_same_candidates_from_one_gradient_pass(smoke):
    _, report, _, _ = smoke
    for row in report["tasks"]:
        first, raw = (row["methods"][f"c2i-standard ({r})"]["search"]["candidates"] for r in ("first_order", "raw"))
        assert sorted((c["module"], c["rho"]) for c in first) == sorted((c["module"], c["rho"]) for c in raw)
        assert [c["score"] for c in first] != [c["score"] for c in raw]  # −Σ σ_i g_i vs −Σ g_i
        assert [row["methods"][m]["score_rule"] for m in METHODS] == [None, "first_order", "raw", "first_order"]
        assert row["methods"]["c2i-standard (raw)"]["search"]["timings"]["scoring_shared"]
        for quality in row["scoring_rules"].values():
            assert quality["candidates"] == 4 and 1 <= quality["laser_best_rank"] <= 4


def test_the_markdown_report(smoke):
    out, _, _, _ = smoke
    md = (out / "compress.md").read_text()
    assert "smoke run, not a result" in md and "**answer ranking**, 4 candidate answers" in md
    header = next(line for line in md.splitlines() if line.startswith("| task | method |"))
    for column in ("test acc [95% CI]", "Δ vs base [95% CI] p", "generated, lenient", "balanced Δ", "speed-up"):
        assert column in header
    laser = next(line for line in md.splitlines() if line.startswith("| planted | laser |"))
    assert "1.000 [0.84, 1.00] (n=20)" in laser and "p<0.001 *" in laser
    assert "## Goals" in md and "**met**" in md and "## Scoring rules: first_order vs raw" in md


def test_other_settings_do_not_reuse_the_state(smoke):
    out, _, _, _ = smoke
    bench = _load("bench_compress")
    with pytest.raises(SystemExit, match="belongs to another job"):
        bench.main(["--smoke", "--no-progress", "--output", str(out), "--top-k", "1"])


def test_profile_smoke(tmp_path, threads):
    profile = _load("bench_compress_profile")
    argv = ["--smoke", "--output", str(tmp_path), "--n-grad", "16", "--batch-size", "8", "--repeats", "1"]
    report = profile.main(argv)
    once = report["gradient_pass"]["once"]
    assert report["n_examples"] == 16 and once["batches"] == 2 and report["modules"] == 4
    assert once["forward_s"] > 0 and once["backward_s"] > 0 and report["forward_only_s"] > 0
    assert report["fb_over_forward"] == pytest.approx(
        (once["forward_s"] + once["backward_s"]) / report["forward_only_s"]
    )
    saved = json.loads((tmp_path / "compress_profile.json").read_text())
    assert saved["modules"] == 4 and saved["machine"]["cpu_count"] >= 1
    markdown = (tmp_path / "compress_profile.md").read_text()
    assert f"| forward + backward / forward | {report['fb_over_forward']:.2f}× |" in markdown
    assert (tmp_path / "compress_profile.png").stat().st_size > 0
