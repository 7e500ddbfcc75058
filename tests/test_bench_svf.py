"""`benchmarks/bench_svf.py --smoke`: the SVF cost benchmark runs end to end on the tiny model, compares the default
with LoRA, and resumes from its state file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_svf.py"


def _smoke(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(SCRIPT), "--smoke", "--no-progress", "--output", str(out)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_bench_svf_smoke_measures_default_and_exact(tmp_path):
    proc = _smoke(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "svf_cost.json").read_text())
    assert results["config"]["smoke"] is True and results["config"]["model"] == "tiny"
    assert results["machine"]["cpu_count"] and results["batch"] == "2 x 16 tokens"
    methods = results["methods"]
    assert set(methods) == {
        "svf_mlp",
        "svf_mlp_exact",
        "svf_mlp_rank16",
        "lora16_mlp",
        "svf_all",
        "svf_all_exact",
        "svf_all_rank16",
        "lora16_all",
        "ia3",
    }
    assert methods["svf_mlp"]["trainable_params"] == methods["svf_mlp_exact"]["trainable_params"] > 0
    # rank=16 adapts 16 singular values of each of the 2 layers x 3 MLP matrices (hidden 32: every m > 16)
    assert methods["svf_mlp_rank16"]["trainable_params"] == 2 * 3 * 16 < methods["svf_mlp"]["trainable_params"]
    assert all(len(m["step_s_all"]) == 1 and m["step_s_median"] > 0 for m in methods.values())
    # --smoke measures the peak memory of one pair, each in a fresh process
    assert {n for n, m in methods.items() if "peak_mb" in m} == {"svf_mlp", "lora16_mlp"}
    assert all(methods[n]["peak_mb"] >= methods[n]["peak_over_loaded_mb"] > 0 for n in ("svf_mlp", "lora16_mlp"))
    ratios = results["ratios"]
    for key, (num, den) in {
        "svf_step_vs_lora_mlp": ("svf_mlp", "lora16_mlp"),
        "svf_rank16_step_vs_lora_all": ("svf_all_rank16", "lora16_all"),
    }.items():
        assert abs(ratios[key] - methods[num]["step_s_median"] / methods[den]["step_s_median"]) < 1e-12
    assert ratios["svf_peak_mem_vs_lora_mlp"] == methods["svf_mlp"]["peak_mb"] / methods["lora16_mlp"]["peak_mb"]
    assert "svf_peak_mem_vs_lora_all" not in ratios
    inference = results["inference"]
    assert inference["merged_over_base"] == inference["svf_merged_forward_s"] / inference["base_forward_s"]
    assert inference["adapter_switch_s"] > 0
    cache = results["svd_cache"]
    assert cache["matrices"] == 2 * 7 and cache["speedup"] == cache["recompute_s"] / cache["warm_load_s"]
    arithmetic = results["arithmetic"]["mlp"]
    macs = arithmetic["macs_per_token"]
    assert macs["base"] < macs["lora"] and macs["base"] < macs["svf"] < macs["svf_exact"]
    assert arithmetic["svf_over_lora"] == macs["svf"] / macs["lora"]
    paired = results["paired_step_ratios"]["svf_step_vs_lora_mlp"]
    rounds = [a / b for a, b in zip(methods["svf_mlp"]["step_s_all"], methods["lora16_mlp"]["step_s_all"])]
    assert paired["rounds"] == rounds and paired["min"] <= paired["median"] <= paired["max"]

    markdown = (tmp_path / "svf_cost.md").read_text()
    assert "smoke run, not a result" in markdown and "python benchmarks/bench_svf.py --smoke" in markdown
    assert "default SVF step / LoRA r=16 step (all linear)" in markdown and "| svf_all_exact |" in markdown
    assert "SVF `rank=16` (top 16 singular values) step / LoRA r=16 step (MLP)" in markdown
    assert "| default SVF peak memory / LoRA (MLP) |" in markdown
    assert "| MLP |" in markdown and "predicted SVF / LoRA" in markdown and "| svf_step_vs_lora_mlp |" in markdown

    # every part is in the state file: a second run reads them back and writes the same numbers
    state = json.loads((tmp_path / "svf_cost_state.json").read_text())
    assert set(state["results"]) == {
        "load_s",
        "svd_cache",
        "trainable_params",
        "round:0",
        "inference",
        "memory:svf_mlp",
        "memory:lora16_mlp",
    }
    again = _smoke(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "svf_cost.json").read_text())["methods"] == methods
