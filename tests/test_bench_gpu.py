"""`benchmarks/bench_gpu.py` keeps working: its `--tiny --device cpu` mode writes the JSON and Markdown it promises."""

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
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_tiny_cpu_run_writes_results(tmp_path):
    proc = _run("--tiny", "--device", "cpu", "--steps", "2", "--batch", "2", "--seq-len", "16", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "gpu.json").read_text())
    assert results["steps"] == 2 and results["dtype"] == "bf16"
    assert set(results["methods"]) == {"svf_mlp", "lora16_mlp", "svf_all", "lora16_all"}
    for name, r in results["methods"].items():
        assert r["trainable_params"] > 0 and r["step_s_median"] > 0 and len(r["step_s_all"]) == 2, name
        assert r["merged_vs_unmerged_max_abs_logit_diff"] < 0.05 * r["logit_abs_max"] + 1e-2, name
    assert results["methods"]["svf_mlp"]["unmerge_restores_weights_bit_exact"]
    assert results["methods"]["svf_all"]["unmerge_restores_weights_bit_exact"]
    svf, lora = results["methods"]["svf_mlp"], results["methods"]["lora16_mlp"]
    assert svf["trainable_params"] < lora["trainable_params"]
    assert "| svf_all |" in (tmp_path / "gpu.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when no CUDA device is present")
def test_no_cuda_is_a_clear_error(tmp_path):
    proc = _run("--tiny", "--steps", "1", "--out", str(tmp_path))
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
    assert not (tmp_path / "gpu.json").exists()
