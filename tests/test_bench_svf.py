"""`benchmarks/bench_svf.py --smoke`: the SVF cost benchmark runs end to end on a tiny model and compares the default."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def test_bench_svf_smoke_measures_default_and_exact(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_svf.py"), "--smoke", "--out", str(tmp_path)],
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )
    results = json.loads((tmp_path / "svf_cost.json").read_text())
    methods = results["methods"]
    assert {"svf_mlp", "svf_mlp_exact", "lora16_mlp", "svf_all", "svf_all_exact", "lora16_all"} <= set(methods)
    assert methods["svf_mlp"]["trainable_params"] == methods["svf_mlp_exact"]["trainable_params"] > 0
    # rank=16 adapts 16 singular values of each of the 2 layers x 3 MLP matrices (hidden 64: every m > 16)
    assert methods["svf_mlp_rank16"]["trainable_params"] == 2 * 3 * 16 < methods["svf_mlp"]["trainable_params"]
    expected = methods["svf_all_rank16"]["step_s_median"] / methods["lora16_all"]["step_s_median"]
    assert abs(results["ratios"]["svf_rank16_step_vs_lora_all"] - expected) < 1e-12
    ratios = results["ratios"]
    expected = methods["svf_mlp"]["step_s_median"] / methods["lora16_mlp"]["step_s_median"]
    assert abs(ratios["svf_step_vs_lora_mlp"] - expected) < 1e-12
    markdown = (tmp_path / "svf_cost.md").read_text()
    assert "default SVF step / LoRA r=16 step (all linear)" in markdown and "svf_all_exact" in markdown
    assert "SVF `rank=16` (top 16 singular values) step / LoRA r=16 step (MLP)" in markdown
    arithmetic = results["arithmetic"]["mlp"]
    macs = arithmetic["macs_per_token"]
    # the tiny model's MLP matrices are not square
    assert macs["base"] < macs["lora"] < macs["svf"] < macs["svf_exact"]
    assert arithmetic["svf_over_lora"] == macs["svf"] / macs["lora"]
    assert "| MLP |" in markdown and "predicted SVF / LoRA" in markdown
    paired = results["paired_step_ratios"]["svf_step_vs_lora_mlp"]
    rounds = [a / b for a, b in zip(methods["svf_mlp"]["step_s_all"], methods["lora16_mlp"]["step_s_all"])]
    assert paired["rounds"] == rounds and paired["min"] <= paired["median"] <= paired["max"]
    assert "| svf_step_vs_lora_mlp |" in markdown
