"""`benchmarks/bench_distributed.py`: its CEM phase on one process (no launch; the launched runs are the benchmark's
own job, and `tests/test_transformer2_cem_distributed.py` checks 2 processes), its random experts, its comparison of
the runs and its report."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_distributed", ROOT / "benchmarks" / "bench_distributed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_random_experts_and_the_cem_phase_on_one_process(bench, tmp_path):
    from safetensors.torch import load_file

    from peft_spectral.transformer2 import CEMConfig, ExpertLibrary, FewShotMixer, find_experts

    root = bench.save_random_experts(tmp_path / "experts", 3)
    found = find_experts(root)
    assert [e.task for e in found] == ["random_0", "random_1", "random_2"]
    zs = [load_file(str(e.path / "adapter_model.safetensors")) for e in found]
    assert zs[0].keys() == zs[1].keys() and len(zs[0]) == 6  # gate/up/down of 2 layers
    for key in zs[0]:
        assert not torch.allclose(zs[0][key], torch.ones_like(zs[0][key]))  # not the identity
        assert not torch.allclose(zs[0][key], zs[1][key])  # not the same expert twice

    args = bench._parser().parse_args(["--experts-dir", str(root)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = bench._cem_phase(args, None)
        # the plain reference: `peft-spectral mix --population 8 --generations 2 --seed 3` on the same experts/shots
        config = CEMConfig(population=8, generations=2, seed=3, progress=False)
        assert bench.cem_config(args) == config
        base, tok = bench._base_model("tiny")
        library = ExpertLibrary.load(base, tok, [str(e.path) for e in found])
        _, shots = bench._shots(args, found)
        reference = FewShotMixer(library, shots, batch_size=8).search(config)
    finally:
        torch.set_num_threads(threads)
    assert out["cem_experts"] == ["random_0", "random_1", "random_2"]
    assert out["n_shots"] == 24 and out["cem_split"] == [14, 10]
    assert out["cem_alpha"] == reference.best_alpha.tolist()
    assert any(a > 0 for a in out["cem_alpha"])  # not the base model: the equality across processes means something
    assert out["cem_evaluations"] == 8 * 2 + 1 + 2  # the population, the base model, one champion per generation
    assert 0 < out["cem_scored_by_main"] <= out["cem_evaluations"] + 1  # + the final score on all shots
    assert out["cem_s"] > 0


def test_too_few_experts_exit_before_launching(bench, tmp_path):
    bench.save_random_experts(tmp_path, 1)
    with pytest.raises(SystemExit, match=r"--experts-dir .*: 1 expert"):
        bench.library_experts(tmp_path, 3)


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
        "cem_task": "t",
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
    report = {
        "model": "m",
        "batch_size": 8,
        "threads": 1,
        "machine": "cpu",
        "experts": "random",
        "cem": {"population": 8, "generations": 2, "seed": 3},
        "note": "",
        "runs": runs,
        **checks,
    }
    md = bench._markdown(report)
    # processes | gradient pass | speed-up | LASER grid | speed-up | CEM | speed-up | scored by main | launch
    assert "| 2 | 0.50 | 2.00× | 1.00 | 2.00× | 1.50 | 2.00× | 4 | 10.0 |" in md
    assert "x=0.500, y=0.000" in md


def test_shots_of_the_first_experts_task_with_the_default_model(bench, fake_bigbench, tmp_path):
    from peft_spectral.tasks import load_task
    from peft_spectral.transformer2 import SavedExpert

    experts = [SavedExpert("mc_task", tmp_path, {}), SavedExpert("gen_task", tmp_path, {})]
    args = bench._parser().parse_args(["--model", "default", "--shots", "3"])
    name, shots = bench._shots(args, experts)
    assert name == "mc_task" and shots == load_task("mc_task", seed=0).train[:3]
    args = bench._parser().parse_args(["--model", "default", "--cem-task", "gen_task"])
    with pytest.raises(SystemExit, match="--cem-task: gen_task is generation"):
        bench._shots(args, experts)


def test_shots_come_from_the_first_multiple_choice_expert_task(bench, fake_bigbench):
    """With the embedded model and no --cem-task, a generation expert first in the library is passed over."""
    from types import SimpleNamespace

    experts = [SimpleNamespace(task="gen_task"), SimpleNamespace(task="mc_task")]
    args = bench._parser().parse_args(["--model", "default", "--shots", "4"])
    name, shots = bench._shots(args, experts)
    assert name == "mc_task" and len(shots) == 4 and all(len(ex.choices) == 3 for ex in shots)
    with pytest.raises(SystemExit, match="none of the experts' tasks"):
        bench._shots(args, experts[:1])
    with pytest.raises(SystemExit, match="gen_task is generation"):
        bench._shots(bench._parser().parse_args(["--model", "default", "--cem-task", "gen_task"]), experts)
