"""TRL configurations for SVF: Transformer²'s RL hyper-parameters ([`paper_rl_preset`]) and SFT ([`sft_preset`]).

[`sft_preset`] is the one builder of `trl.SFTConfig` in this package: every SFT path (experts, the Transformer²
classifier, benchmarks) goes through it.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

import torch


__all__ = [
    "PAPER_BATCH_SIZE",
    "PAPER_BETA",
    "PAPER_LEARNING_RATE",
    "PAPER_MAX_GRAD_NORM",
    "PAPER_STEPS",
    "Algorithm",
    "Method",
    "paper_rl_preset",
    "sft_preset",
]

Method = Literal["rl", "sft"]
Algorithm = Literal["grpo", "rloo"]

#: Paper hyper-parameters (Transformer² reference code): AdamW, lr 2e-3, grad-norm clip 1e-3, batch 256, 200 steps.
PAPER_LEARNING_RATE = 2e-3
PAPER_MAX_GRAD_NORM = 1e-3
PAPER_BATCH_SIZE = 256
PAPER_STEPS = 200
#: Default KL weight λ: 0.1, from the paper's grid {0, 0.1, 0.2, 0.3} (0 would let z drift with nothing pulling it
#: back to the base model).
PAPER_BETA = 0.1


def _common_args(output_dir: str, max_steps: int, seed: int, save_steps: Optional[int], logging_steps: int) -> dict:
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    return {
        "output_dir": output_dir,
        "max_steps": max_steps,
        "seed": seed,
        "data_seed": seed,
        "optim": "adamw_torch",
        "weight_decay": 0.0,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "logging_steps": logging_steps,
        "save_strategy": "steps" if save_steps else "no",
        "save_steps": save_steps or 500,
        "save_only_model": False,
        "report_to": [],
        "bf16": False,
        "fp16": False,
        "disable_tqdm": False,
        "use_cpu": not torch.cuda.is_available(),
        "dataloader_num_workers": 0,
    }


def paper_rl_preset(
    output_dir: str,
    *,
    algorithm: Algorithm = "grpo",
    max_steps: int = 40,
    beta: float = PAPER_BETA,
    prompts_per_step: int = 2,
    num_generations: int = 4,
    gradient_accumulation_steps: int = 1,
    max_completion_length: int = 8,
    temperature: float = 1.0,
    learning_rate: float = PAPER_LEARNING_RATE,
    max_grad_norm: float = PAPER_MAX_GRAD_NORM,
    seed: int = 0,
    save_steps: Optional[int] = None,
    logging_steps: int = 1,
    **overrides: Any,
):
    """TRL arguments with Transformer²'s RL hyper-parameters, scaled down for a CPU run.

    Paper: REINFORCE, AdamW lr 2e-3, max grad norm 1e-3, batch 256 prompts, 200 steps, ±1 rewards, KL weight λ ∈ {0,
    0.1, 0.2, 0.3}. Kept here: optimizer, learning rate (constant), clipping, `beta` = λ. Scaled down: the batch is
    `prompts_per_step × num_generations` completions per process per optimizer step (× `gradient_accumulation_steps`)
    and `max_steps`. The reference code uses one greedy rollout per prompt and no baseline; GRPO/RLOO need a group of
    sampled completions per prompt (`temperature`) to form their baseline, which also lowers the variance.

    For GRPO `scale_rewards="none"` keeps the advantage a centred ±1 reward (REINFORCE with a group-mean baseline) and
    `loss_type="grpo"` averages over each completion's tokens; RLOO is REINFORCE with a leave-one-out baseline and
    applies the KL as a reward penalty, as the paper's objective does.

    Args:
        output_dir (`str`): Where checkpoints go.
        algorithm (`str`): `"grpo"` ([`trl.GRPOConfig`]) or `"rloo"` ([`trl.RLOOConfig`]).
        max_steps (`int`): Optimizer steps.
        beta (`float`, defaults to 0.1): KL coefficient λ ([`PAPER_BETA`], from the paper's grid); `0` skips the
            reference pass.
        prompts_per_step (`int`): Distinct prompts per process per micro-batch.
        num_generations (`int`): Sampled completions per prompt (≥ 2).
        max_completion_length (`int`): Generation budget in tokens (short answers: a letter, a number).
        overrides: Any other field of the TRL config (they win over the preset).

    Returns:
        `trl.GRPOConfig` or `trl.RLOOConfig`.
    """
    from trl import GRPOConfig, RLOOConfig

    if algorithm not in ("grpo", "rloo"):
        raise ValueError(f"algorithm must be 'grpo' or 'rloo', got {algorithm!r}")
    if num_generations < 2:
        raise ValueError(f"num_generations must be >= 2 (GRPO/RLOO baselines need a group), got {num_generations}")
    if prompts_per_step < 1:
        raise ValueError(f"prompts_per_step must be >= 1, got {prompts_per_step}")
    if beta < 0 or not math.isfinite(beta):
        raise ValueError(f"beta must be a finite number >= 0, got {beta}")
    if max_completion_length < 1:
        raise ValueError(f"max_completion_length must be >= 1, got {max_completion_length}")
    kwargs = _common_args(output_dir, max_steps, seed, save_steps, logging_steps)
    kwargs.update(
        learning_rate=learning_rate,
        max_grad_norm=max_grad_norm,
        adam_beta1=0.9,
        adam_beta2=0.999,
        per_device_train_batch_size=prompts_per_step * num_generations,
        gradient_accumulation_steps=gradient_accumulation_steps,
        num_generations=num_generations,
        max_completion_length=max_completion_length,
        temperature=temperature,
        beta=beta,
        disable_dropout=True,
        remove_unused_columns=False,
        log_completions=False,
    )
    if algorithm == "grpo":
        kwargs.update(scale_rewards="none", loss_type="grpo")
        kwargs.update(overrides)
        return GRPOConfig(**kwargs)
    kwargs.update(normalize_advantages=False)
    kwargs.update(overrides)
    return RLOOConfig(**kwargs)


def sft_preset(
    output_dir: str,
    *,
    max_steps: int = 40,
    per_device_train_batch_size: int = 8,
    gradient_accumulation_steps: int = 1,
    learning_rate: float = PAPER_LEARNING_RATE,
    max_grad_norm: float = 1.0,
    max_length: Optional[int] = 512,
    padding_free: bool = True,
    seed: int = 0,
    save_steps: Optional[int] = None,
    logging_steps: int = 1,
    **overrides: Any,
):
    """[`trl.SFTConfig`] for SVF: AdamW at the paper's lr 2e-3 (SVF's z needs a larger lr than LoRA), constant
    schedule, loss on the completion only (prompt-completion datasets), padding-free batches, no packing, and no
    gradient checkpointing.

    TRL turns gradient checkpointing on by default; it recomputes every forward during the backward. On the embedded
    SmolLM2-135M on 2 CPU cores an SFT step took 1.24× as long with it (3 rounds, per-round ratios 0.69–0.81 without
    over with), and the model's activations fit anyway; pass `gradient_checkpointing=True` for long sequences on a
    large model.

    Padding-free batches (TRL's `padding_free=True`) put a batch's examples one after the other in one row, with no
    padding: the same examples per step and the same loss as padded batches (to float rounding; tested), fewer tokens
    through the model (see [`peft_spectral.training.packing`]). Packing (`packing=True`) is left off: it regroups
    examples into other batches, so a run would not be the padded run. TRL does not truncate padding-free batches
    (it refuses `max_length` there), so the returned config has `max_length=None` and keeps `max_length` in its
    `svf_max_length` attribute, which [`build_trainer`] applies to the tokenized datasets; a plain `SFTTrainer` given
    this config does not truncate (pass examples already cut, or `padding_free=False`). [`build_trainer`] also
    turns padding-free batches off, with a warning, for a model that does not keep packed examples apart
    ([`~peft_spectral.training.packing.supports_padding_free`]).

    Args:
        max_length (`int`, *optional*, defaults to 512): Tokens kept per example (the start); `None` keeps all.
        padding_free (`bool`, defaults to `True`): Padding-free batches; `False` pads every batch to its longest
            example (TRL truncates at `max_length` itself).
        overrides: Any other field of `trl.SFTConfig` (they win over the preset).
    """
    from trl import SFTConfig

    from .packing import MAX_LENGTH_ATTRIBUTE

    kwargs = _common_args(output_dir, max_steps, seed, save_steps, logging_steps)
    kwargs.update(
        learning_rate=learning_rate,
        max_grad_norm=max_grad_norm,
        per_device_train_batch_size=per_device_train_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        max_length=None if padding_free else max_length,
        padding_free=padding_free,
        packing=False,
        gradient_checkpointing=False,
        completion_only_loss=True,
        remove_unused_columns=True,
    )
    kwargs.update(overrides)
    config = SFTConfig(**kwargs)
    if config.padding_free and not config.packing and config.max_length is None:
        setattr(config, MAX_LENGTH_ATTRIBUTE, max_length)
    return config
