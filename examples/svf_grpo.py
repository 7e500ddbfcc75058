"""SVF trained with TRL's GRPOTrainer through `peft_config=SVFConfig(...)` (Transformer²'s RL recipe).

The reward is +1/-1 for a right/wrong number (`peft_spectral.rewards.numeric_match_reward`), plus a small format
bonus so that even a weak model gets a learning signal. `beta` is the KL weight λ to the base model (TRL computes the
reference log-probs with the adapter disabled).

    python examples/svf_grpo.py                  # embedded SmolLM2-135M-Instruct (CPU, a few minutes)
    python examples/svf_grpo.py --tiny           # tiny random model, a few seconds
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from datasets import Dataset
from safetensors.torch import load_file
from tiny_model import load
from trl import GRPOConfig, GRPOTrainer

from peft_spectral import SVFConfig
from peft_spectral.rewards import numeric_match_reward
from peft_spectral.tasks import load_jsonl_task


DATA = Path(__file__).parent / "data" / "addition.jsonl"


def format_reward(completions, **kwargs):
    """+0.5 when the answer contains a number at all (a shaping term: the paper uses the ±1 reward alone)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [0.5 if re.search(r"\d", t) else 0.0 for t in texts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random model (no download), a few seconds")
    parser.add_argument("--model", default=None, help="Hub id or directory (default: the embedded SmolLM2-135M)")
    parser.add_argument("--data", default=str(DATA), help="JSONL task: {prompt, target} per line")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 20; 2 with --tiny)")
    parser.add_argument("--beta", type=float, default=0.1, help="KL weight lambda (paper: 0 to 0.3)")
    parser.add_argument("--output", default="runs/svf-grpo", help="where the adapter is saved")
    args = parser.parse_args()
    steps = args.steps or (2 if args.tiny else 20)

    model, tokenizer = load(args.tiny, args.model)
    task = load_jsonl_task(args.data)
    # Conversational prompts (TRL applies the chat template); extra columns reach the reward functions as kwargs.
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": ex.prompt}], "target": ex.target} for ex in task.train]
    )

    config = GRPOConfig(
        output_dir=args.output + "-checkpoints",
        max_steps=steps,
        learning_rate=2e-3,  # Transformer²: AdamW lr 2e-3 (constant) ...
        lr_scheduler_type="constant",
        max_grad_norm=1e-3,  # ... and grad-norm clipping at 1e-3
        beta=args.beta,  # KL weight lambda
        num_generations=4,  # completions per prompt (the group baseline)
        per_device_train_batch_size=4,  # = 1 prompt x 4 generations per step
        max_completion_length=8,
        temperature=1.0,
        scale_rewards="none",  # advantage = reward - group mean (REINFORCE with a baseline)
        loss_type="grpo",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=args.tiny,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[numeric_match_reward, format_reward],
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=SVFConfig(target_modules=["gate_proj", "up_proj", "down_proj"]),
    )
    trainer.model.print_trainable_parameters()
    trainer.train()

    for row in trainer.state.log_history:
        if "reward" in row:
            print(f"step {row['step']}: reward={row['reward']:.3f} kl={row.get('kl', 0.0):.2e}")
    trainer.model.save_pretrained(args.output)
    z = load_file(str(Path(args.output) / "adapter_model.safetensors"))
    moved = max(float((v - 1).abs().max()) for v in z.values())
    print(
        f"saved {len(z)} z vectors ({sum(v.numel() for v in z.values())} values) to {args.output}; "
        f"max |z - 1| = {moved:.3e}"
    )


if __name__ == "__main__":
    main()
