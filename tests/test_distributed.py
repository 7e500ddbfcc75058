"""Data-parallel SVF training: 2 CPU processes (gloo, launched with `accelerate launch --multi_gpu`,
which on a machine without GPUs starts torchrun workers that Accelerate runs as MULTI_CPU over gloo; `--cpu` alone
would start a single process) reach the same z as 1 process
on the same global batch.

The run is deterministic: SFT (no sampling), fp32, same seed, every example with the same number of completion tokens
(so the per-process token-mean losses average to the global token-mean loss), global batch 4 = 1 × 4 = 2 × 2.
This file is also the worker script (`python -m accelerate.commands.launch ... test_distributed.py OUT BATCH`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch


HERE = Path(__file__).resolve().parent
STEPS = 3
GLOBAL_BATCH = 4


def _worker(out_dir: str, per_device_batch: int) -> None:
    sys.path.insert(0, str(HERE))
    from safetensors.torch import save_file
    from testing_utils import build_tiny_llama, build_tiny_tokenizer

    from peft_spectral import SVFConfig
    from peft_spectral.tasks import Example, Task
    from peft_spectral.training import svf_parameters, train_svf

    torch.set_num_threads(1)
    examples = [
        Example(prompt=f"Item {i:02d}: which word?", target=word, choices=(), label=None)
        for i, word in enumerate(["alpha", "bravo", "delta", "gamma", "kappa", "omega", "sigma", "theta"])
    ]
    task = Task(name="toy", kind="generation", train=examples, validation=[], test=[])
    tok = build_tiny_tokenizer()
    model = build_tiny_llama(tok)
    result = train_svf(
        model,
        tok,
        task,
        method="sft",
        output_dir=os.path.join(out_dir, "run"),
        max_steps=STEPS,
        svf_config=SVFConfig(target_modules=["gate_proj", "up_proj", "down_proj"], use_svd_cache=False),
        per_device_train_batch_size=per_device_batch,
        learning_rate=0.05,
        disable_tqdm=True,
    )
    state = result.trainer.accelerator.state
    if state.is_main_process:
        z = {k: v.contiguous() for k, v in svf_parameters(result.model).items()}
        z["__world_size__"] = torch.tensor([state.num_processes])
        plugin = state.deepspeed_plugin if result.trainer.is_deepspeed_enabled else None
        z["__zero_stage__"] = torch.tensor([plugin.zero_stage if plugin is not None else 0])
        weight = result.model.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight
        z["__zero3_param__"] = torch.tensor([int(hasattr(weight, "ds_id"))])
        save_file(z, os.path.join(out_dir, "z.safetensors"))


def _launch(tmp_path: Path, num_processes: int, zero_stage: int = 0) -> dict[str, torch.Tensor]:
    from distributed_utils import accelerate_launch
    from safetensors.torch import load_file

    out = tmp_path / f"np{num_processes}-zero{zero_stage}"
    out.mkdir()
    launch = ["--use_deepspeed", "--zero_stage", str(zero_stage), "--zero3_init_flag", "false"] if zero_stage else []
    accelerate_launch(Path(__file__), [str(out), str(GLOBAL_BATCH // num_processes)], num_processes, launch)
    z = load_file(str(out / "z.safetensors"))
    assert int(z.pop("__world_size__")) == num_processes
    assert int(z.pop("__zero_stage__")) == zero_stage, "the Trainer did not run under the requested DeepSpeed stage"
    # the (frozen) base weights became ZeRO-3 parameters (this tiny model's stay gathered: they are below DeepSpeed's
    # persistence threshold; the merge test in test_deepspeed_zero3.py covers empty shards)
    assert int(z.pop("__zero3_param__")) == int(zero_stage == 3)
    return z


def test_two_cpu_processes_match_one(tmp_path):
    single = _launch(tmp_path, 1)
    double = _launch(tmp_path, 2)
    assert set(single) == set(double) and len(single) == 6
    moved = max(float((v - 1).abs().max()) for v in single.values())
    assert moved > 1e-3, "z did not move: the comparison would be vacuous"
    for name in single:
        torch.testing.assert_close(double[name], single[name], atol=1e-6, rtol=1e-5, msg=name)


def test_accelerate_deepspeed_zero3_trainer_matches_one_process(tmp_path):
    """`accelerate launch --use_deepspeed --zero_stage 3` + `train_svf` (TRL's SFTTrainer) on 2 CPU processes."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install --no-build-isolation deepspeed)")
    single = _launch(tmp_path, 1)
    zero3 = _launch(tmp_path, 2, zero_stage=3)
    assert set(single) == set(zero3) and len(single) == 6
    assert max(float((v - 1).abs().max()) for v in single.values()) > 1e-3, "z did not move"
    for name in single:
        torch.testing.assert_close(zero3[name], single[name], atol=1e-6, rtol=1e-5, msg=name)


if __name__ == "__main__":
    from distributed_utils import end_worker  # the script's folder is on sys.path

    _worker(sys.argv[1], int(sys.argv[2]))
    end_worker()
