"""Composed rollouts under `accelerate launch` with 2 CPU processes (gloo): plain TRL GRPO with
`SVFConfig(compose_inference=True)` reaches the z of a run with `False` on every rank, and both replicas end equal.

`trl.GRPOTrainer(..., peft_config=SVFConfig(...))` on the tiny random Llama, 2 optimizer steps, 2 prompts × 2 sampled
completions of ≤ 6 tokens per process, float32, SGD (see `test_svf_composed.py` for why). Each rank trains twice, with
and without the composed weight, and saves both z. This file is also the worker script
(`python -m accelerate.commands.launch --multi_gpu --num_processes 2 test_svf_composed_distributed.py OUT`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch


HERE = Path(__file__).resolve().parent
STEPS = 2
TARGETS = ["gate_proj", "up_proj", "down_proj"]


def _reward(completions, **kwargs):
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum(ord(ch) % 2 for ch in t) / max(len(t), 1) for t in texts]


def _train(out_dir: str, compose: bool):
    sys.path.insert(0, str(HERE))
    from datasets import Dataset
    from testing_utils import build_tiny_llama, build_tiny_tokenizer
    from trl import GRPOConfig, GRPOTrainer

    from peft_spectral import SVFConfig
    from peft_spectral.tuners.svf.composed import composed_weight_bytes

    tok = build_tiny_tokenizer()
    model = build_tiny_llama(tok)
    dataset = Dataset.from_list([{"prompt": f"Q{i}: pick a colour. Answer:"} for i in range(16)])
    args = GRPOConfig(
        output_dir=os.path.join(out_dir, f"run-{compose}"),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=6,
        learning_rate=2.0,
        optim="sgd",
        bf16=False,
        beta=0.1,
        report_to=[],
        use_cpu=True,
        seed=0,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[_reward],
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        peft_config=SVFConfig(target_modules=TARGETS, use_svd_cache=False, compose_inference=compose),
    )
    peak = {"bytes": 0}
    generate = trainer._generate_single_turn

    def recording(*a, **k):  # the composed weights exist right after sampling (and only with the option on)
        out = generate(*a, **k)
        peak["bytes"] = max(peak["bytes"], composed_weight_bytes(trainer.model))
        return out

    trainer._generate_single_turn = recording
    trainer.train()
    z = {n: p.detach().contiguous().clone() for n, p in trainer.model.named_parameters() if "svf_z" in n}
    return z, peak["bytes"], trainer.accelerator.state


def _worker(out_dir: str) -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    out = {}
    for compose in (True, False):
        z, composed_bytes, state = _train(out_dir, compose)
        out.update({f"{compose}/{k}": v for k, v in z.items()})
        out[f"{compose}/__composed_bytes__"] = torch.tensor([composed_bytes])
    out["__world_size__"] = torch.tensor([state.num_processes])
    save_file(out, os.path.join(out_dir, f"z{state.process_index}.safetensors"))


def test_composed_grpo_two_cpu_processes_matches_factored(tmp_path):
    from distributed_utils import accelerate_launch
    from safetensors.torch import load_file

    accelerate_launch(Path(__file__), [str(tmp_path)], 2)
    replicas = [load_file(str(tmp_path / f"z{rank}.safetensors")) for rank in range(2)]
    for z in replicas:
        assert int(z.pop("__world_size__")) == 2
        assert int(z.pop("True/__composed_bytes__")) > 0
        assert int(z.pop("False/__composed_bytes__")) == 0
    first, second = replicas
    names = [k.split("/", 1)[1] for k in first if k.startswith("True/")]
    assert len(names) == 6
    assert max(float((first[f"True/{n}"] - 1).abs().max()) for n in names) > 1e-3
    for n in names:
        torch.testing.assert_close(first[f"True/{n}"], first[f"False/{n}"], atol=1e-6, rtol=1e-5, msg=n)
        for key in (f"True/{n}", f"False/{n}"):
            torch.testing.assert_close(second[key], first[key], atol=0, rtol=0, msg=key)


if __name__ == "__main__":
    from distributed_utils import end_worker  # the script's folder is on sys.path

    _worker(sys.argv[1])
    end_worker()
