"""SVF GRPO under `accelerate launch` with 2 CPU processes (gloo): it runs, z moves, and both replicas end equal.

`train_svf(method="rl", algorithm="grpo")` on the tiny random Llama, 2 optimizer steps, 2 prompts × 2 sampled
completions of ≤ 6 tokens per process. Each rank saves its own z; DDP all-reduces the z gradients, so the two
replicas must hold the same z after training (even though each rank samples different completions). This file is also
the worker script (`python -m accelerate.commands.launch --multi_gpu --num_processes 2 test_distributed_grpo.py OUT`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch


HERE = Path(__file__).resolve().parent
STEPS = 2


def _varied_reward(completions, **kwargs):
    """A reward that differs between sampled completions of a random model (so that the policy gradient is not 0)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum(ord(ch) % 2 for ch in t) / max(len(t), 1) for t in texts]


def _worker(out_dir: str) -> None:
    sys.path.insert(0, str(HERE))
    from safetensors.torch import save_file
    from testing_utils import build_tiny_llama, build_tiny_tokenizer

    from peft_spectral import SVFConfig
    from peft_spectral.tasks import Example, Task
    from peft_spectral.training import svf_parameters, train_svf

    torch.set_num_threads(1)
    choices = ("red", "blue", "green")
    examples = [
        Example(
            prompt=f"Q{i}: pick a colour.\nA. red\nB. blue\nC. green\nAnswer with the letter.",
            target=choices[i % 3],
            choices=choices,
            label=i % 3,
        )
        for i in range(8)
    ]
    task = Task(name="toy_mc", kind="multiple_choice", train=examples, validation=[], test=[])
    tok = build_tiny_tokenizer()
    result = train_svf(
        build_tiny_llama(tok),
        tok,
        task,
        method="rl",
        algorithm="grpo",
        output_dir=os.path.join(out_dir, "run"),
        max_steps=STEPS,
        svf_config=SVFConfig(target_modules=["gate_proj", "up_proj", "down_proj"], use_svd_cache=False),
        reward_funcs=[_varied_reward],
        prompts_per_step=2,
        num_generations=2,
        max_completion_length=6,
        disable_tqdm=True,
    )
    state = result.trainer.accelerator.state
    z = {k: v.detach().contiguous().clone() for k, v in svf_parameters(result.model).items()}
    z["__world_size__"] = torch.tensor([state.num_processes])
    z["__steps__"] = torch.tensor([len(result.step_times)])
    save_file(z, os.path.join(out_dir, f"z{state.process_index}.safetensors"))


def test_grpo_two_cpu_processes_keep_replicas_equal(tmp_path):
    from distributed_utils import accelerate_launch
    from safetensors.torch import load_file

    accelerate_launch(Path(__file__), [str(tmp_path)], 2)
    replicas = [load_file(str(tmp_path / f"z{rank}.safetensors")) for rank in range(2)]
    for z in replicas:
        assert int(z.pop("__world_size__")) == 2
        assert int(z.pop("__steps__")) == STEPS
    first, second = replicas
    assert len(first) == 6 and set(first) == set(second)
    moved = max(float((v - 1).abs().max()) for v in first.values())
    assert moved > 1e-5, "z did not move from its initial value 1"
    for name in first:
        torch.testing.assert_close(second[name], first[name], atol=0, rtol=0, msg=name)


if __name__ == "__main__":
    from distributed_utils import end_worker  # the script's folder is on sys.path

    _worker(sys.argv[1])
    end_worker()
