"""`benchmarks/bench_distributed.py`: its smoke run (tiny model, random experts, CEM shots from a reasoning-gym task)
on 1 and 2 launched processes gives the same choices and α and resumes from its state file; its comparison of the
runs and its report; too few experts exit 2 before anything is launched."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_distributed.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_distributed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _smoke(out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, str(SCRIPT), "--smoke", "--no-progress", "--output", str(out)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)


def test_smoke_run_on_1_and_2_processes_makes_the_same_choices(tmp_path):
    from peft_spectral.data import DEFAULT_TASK

    proc = _smoke(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "distributed.json").read_text())
    assert report["config"]["smoke"] is True and report["config"]["model"] == "tiny"
    assert report["same_choices"] is True and report["same_alpha"] is True and report["max_grad_diff"] < 1e-5
    one, two = report["runs"]
    assert (one["processes"], two["processes"]) == (1, 2) and "grads" not in one
    assert one["n_calibration"] == 16 and one["n_candidates"] == 4 * 5  # up/down of 2 layers x 5 rhos
    assert one["laser_chosen"] == two["laser_chosen"] and one["top5"] == two["top5"]
    assert one["cem_task"] == DEFAULT_TASK and one["cem_kind"] == "generation" and one["n_shots"] == 12
    assert one["cem_experts"] == ["random_0", "random_1", "random_2"]
    assert any(a > 0 for a in one["cem_alpha"])  # not the base model: the equality across processes means something
    assert one["cem_evaluations"] == 4 * 2 + 1 + 2  # the population, the base model, one champion per generation
    assert two["cem_scored_by_main"] < one["cem_scored_by_main"]  # the population was shared out
    assert all(r[k] > 0 for r in (one, two) for k in ("gradient_pass_s", "laser_grid_s", "cem_s", "launch_total_s"))
    text = (tmp_path / "distributed.md").read_text()
    assert "smoke run, not a result" in text and "| 1 | " in text and "| 2 | " in text and "1.00×" in text
    assert "CEM α the same (exactly, and its history): True" in text

    # both launches are in the state file: a second run launches nothing and writes the same runs
    again = _smoke(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "distributed.json").read_text())["runs"] == report["runs"]


def test_too_few_experts_exit_2_before_launching(bench, tmp_path, capsys):
    from peft_spectral.benchmarking.experts import random_svf_experts

    random_svf_experts(tmp_path / "lib", 1)
    capsys.readouterr()
    assert (
        bench.main(["--no-progress", "--experts-dir", str(tmp_path / "lib"), "--output", str(tmp_path / "out")]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "1 expert(s)" in err and "at least 2" in err
    assert not (tmp_path / "out" / "distributed_state.json").exists()


def _run(processes: int, alpha: list[float], seconds: float) -> dict:
    return {
        "processes": processes,
        "gradient_pass_s": seconds,
        "laser_grid_s": 2 * seconds,
        "cem_s": 3 * seconds,
        "launch_total_s": 10.0,
        "n_calibration": 4,
        "n_validation": 2,
        "n_candidates": 2,
        "top5": ["a"],
        "laser_chosen": ["a"],
        "laser_table": {"a": 1.0},
        "grads": {"m": [1.0, 2.0]},
        "cem_task": "rg:gcd",
        "cem_kind": "generation",
        "cem_experts": ["x", "y"],
        "n_shots": 5,
        "cem_split": [3, 2],
        "cem_alpha": alpha,
        "cem_holdout_fitness": [0.5, -1.0],
        "cem_history": [],
        "cem_evaluations": 7,
        "cem_scored_by_main": 7 if processes == 1 else 4,
    }


def test_compare_and_report(bench):
    runs = [_run(1, [0.5, 0.0], 1.0), _run(2, [0.5, 0.0], 0.5)]
    checks = bench.compare(runs)
    assert checks == {"same_choices": True, "same_alpha": True, "max_grad_diff": 0.0}
    assert bench.compare([runs[0], _run(2, [0.5, 0.1], 0.5)])["same_alpha"] is False
    other = {**_run(2, [0.5, 0.0], 0.5), "laser_chosen": ["b"]}
    assert bench.compare([runs[0], other])["same_choices"] is False
    report = {
        "batch_size": 8,
        "threads": 1,
        "experts": "random",
        "cem": {"population": 8, "generations": 2, "seed": 3, "max_new_tokens": 8},
        "note": "",
        "runs": runs,
        **checks,
    }
    md = bench.markdown(report, "python benchmarks/bench_distributed.py")
    # processes | gradient pass | speed-up | LASER grid | speed-up | CEM | speed-up | scored by main | launch
    assert "| 2 | 0.50 | 2.00× | 1.00 | 2.00× | 1.50 | 2.00× | 4 | 10.0 |" in md
    assert "x=0.500, y=0.000" in md and "`rg:gcd` (generation, at most 8 new tokens; 3 fit + 2 hold-out)" in md
