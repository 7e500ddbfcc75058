"""`benchmarks/bench_mixed_batch.py --smoke`: mixed-adapter and grouped pass 2 give the same logits, both are timed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_mixed_batch", ROOT / "benchmarks" / "bench_mixed_batch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_assign_puts_the_base_share_first_and_spreads_the_rest():
    bench = _bench()
    assert bench.assign(8, ["a", "b", "c"], 0.5) == ["__base__"] * 4 + ["a", "b", "c", "a"]
    assert bench.assign(4, ["a"], 0.0) == ["a"] * 4 and bench.assign(4, ["a"], 1.0) == ["__base__"] * 4


def test_smoke_run_times_both_paths_on_equal_outputs(tmp_path):
    bench = _bench()
    report = bench.main(["--smoke", "--threads", "1", "--out", str(tmp_path), "--base-shares", "0", "0.5"])
    assert [row["base_share"] for row in report["rows"]] == [0.0, 0.5]
    for row in report["rows"]:
        assert row["max_abs_diff"] < 1e-4  # the same answers both ways
        assert len(row["times"]["mixed"]) == len(row["times"]["grouped"]) == 2 and row["mixed_s"] > 0
        assert row["mixed_over_grouped"] == row["mixed_s"] / row["grouped_s"]
    assert report["rows"][0]["groups"] == 3 and report["rows"][1]["groups"] == 4  # 3 experts (+ the base model)
    assert json.loads((tmp_path / "mixed_batch.json").read_text())["rows"][1]["groups"] == 4
    assert "| 50% | 4 |" in (tmp_path / "mixed_batch.md").read_text()
