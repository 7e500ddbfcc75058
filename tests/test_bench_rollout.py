"""`benchmarks/bench_rollout.py --smoke`: sampling, evaluations and SFT batches are measured on the tiny model, the
composed and factored runs give the same answers, and the ratios are those of the recorded times."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_rollout.py"


def test_bench_rollout_smoke(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(SCRIPT), "--smoke", "--no-progress", "--output", str(tmp_path)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "rollout.json").read_text())
    assert results["config"]["smoke"] is True and results["config"]["model"] == "tiny"
    assert set(results["sampling"]) == {"4", "8"}
    for part in results["sampling"].values():
        seconds, ratios = part["seconds"], part["ratios"]
        assert set(seconds) == {"base", "svf_factored", "svf_composed", "lora16"} and min(seconds.values()) > 0
        assert abs(ratios["composed/base"]["median"] - seconds["svf_composed"] / seconds["base"]) < 1e-9
    evaluations = results["evaluations"]
    assert set(evaluations) == {"validation", "pass2", "cem"}
    for part in evaluations.values():
        assert part["same_answers"] and part["before_s"] > 0 and part["after_s"] > 0
    sft = results["sft"]["tokens_per_s"]
    assert sft["padded"] > 0 and sft["padding_free"] > 0
    markdown = (tmp_path / "rollout.md").read_text()
    assert "smoke run, not a result" in markdown and "(c) CEM candidates" in markdown
