"""`benchmarks/bench_gpu.py --smoke` keeps working: the tiny model (on CUDA when present, else CPU) writes the JSON and
Markdown it promises, resumes from its state file, and without CUDA the real run exits 2 in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--no-progress", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_smoke_run_writes_results(tmp_path):
    proc = _run("--smoke", "--output", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "gpu.json").read_text())
    assert results["config"]["smoke"] is True and results["model"] == "tiny"
    assert results["steps"] == 2 and results["dtype"] == "bf16" and (results["batch"], results["seq_len"]) == (2, 16)
    assert results["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert set(results["methods"]) == {"svf_mlp", "lora16_mlp", "svf_all", "lora16_all"}
    for name, r in results["methods"].items():
        assert r["trainable_params"] > 0 and r["step_s_median"] > 0 and len(r["step_s_all"]) == 2, name
        assert r["merged_vs_unmerged_max_abs_logit_diff"] < 0.05 * r["logit_abs_max"] + 1e-2, name
    assert results["methods"]["svf_mlp"]["unmerge_restores_weights_bit_exact"]
    assert results["methods"]["svf_all"]["unmerge_restores_weights_bit_exact"]
    svf, lora = results["methods"]["svf_mlp"], results["methods"]["lora16_mlp"]
    assert svf["trainable_params"] < lora["trainable_params"]
    text = (tmp_path / "gpu.md").read_text()
    assert "| svf_all |" in text and "smoke run, not a result" in text
    state = json.loads((tmp_path / "gpu_state.json").read_text())
    assert set(state["results"]) == {f"method:{name}" for name in results["methods"]}

    # every method is read back from the state file
    again = _run("--smoke", "--output", str(tmp_path))
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "gpu.json").read_text())["methods"] == results["methods"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when no CUDA device is present")
def test_no_cuda_is_a_clear_error(tmp_path):
    proc = _run("--model", "tiny", "--steps", "1", "--output", str(tmp_path))
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "gpu.json").exists()
