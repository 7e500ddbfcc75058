"""`benchmarks/bench_mixed_batch.py --smoke`: mixed-adapter and grouped pass 2 give the same logits, both are timed;
a smoke run never writes to docs/results; a library without experts exits 2 in one line."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_mixed_batch", ROOT / "benchmarks" / "bench_mixed_batch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_assign_puts_the_base_share_first_and_spreads_the_rest(bench):
    assert bench.assign(8, ["a", "b", "c"], 0.5) == ["__base__"] * 4 + ["a", "b", "c", "a"]
    assert bench.assign(4, ["a"], 0.0) == ["a"] * 4 and bench.assign(4, ["a"], 1.0) == ["__base__"] * 4


def test_smoke_run_times_both_paths_on_equal_outputs(bench, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a smoke run without --output must not write docs/results here
    argv = ["--smoke", "--no-progress", "--threads", "1", "--base-shares", "0", "0.5"]
    assert bench.main(argv) == 0
    assert not (tmp_path / "docs").exists()

    out = tmp_path / "out"
    assert bench.main([*argv, "--output", str(out)]) == 0
    data = json.loads((out / "mixed_batch.json").read_text())
    assert data["config"]["smoke"] is True and data["config"]["model"] == "tiny" and data["machine"]["cpu_count"]
    assert data["experts"] == ["random_0", "random_1", "random_2"]
    assert data["prompt_task"] == bench.PROMPT_TASK and data["batch_size"] == 8 and data["tokens"] > 20
    assert [row["base_share"] for row in data["rows"]] == [0.0, 0.5]
    for row in data["rows"]:
        assert row["max_abs_diff"] < 1e-4  # the same answers both ways
        assert len(row["times"]["mixed"]) == len(row["times"]["grouped"]) == 2 and row["mixed_s"] > 0
        assert row["mixed_over_grouped"] == row["mixed_s"] / row["grouped_s"]
    assert data["rows"][0]["groups"] == 3 and data["rows"][1]["groups"] == 4  # 3 experts (+ the base model)
    text = (out / "mixed_batch.md").read_text()
    assert "| 50% | 4 |" in text and "smoke run, not a result" in text and "rg:family_relationships" in text
    # resumed: the recorded shares are read back, not measured again
    assert bench.main([*argv, "--output", str(out)]) == 0
    assert json.loads((out / "mixed_batch.json").read_text())["rows"] == data["rows"]


def test_empty_library_exits_2_in_one_line(bench, tmp_path, capsys):
    assert bench.main(["--no-progress", "--experts-dir", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "0 expert(s)" in err and str(tmp_path) in err
    assert not (tmp_path / "out" / "mixed_batch.json").exists()
