"""Supervised fine-tuning for CPI-FT: tokenized prompt/answer datasets, balanced task mixes, one TRL SFT run."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import torch
from transformers.trainer_callback import PrinterCallback

from ..data import Example
from ..prompting import encode_prompt
from ..training import sft_preset
from .config import CPIConfig


__all__ = ["build_sft_dataset", "encode_example", "mixed_examples", "sft_train"]


def encode_example(tokenizer, example: Example, *, max_length: int = 256, chat: Optional[bool] = None) -> dict:
    """Token ids of prompt + answer + EOS and the completion mask (1 on answer tokens), as the evaluation sees them.

    The prompt is [`~peft_spectral.prompting.format_prompt`]'s text; the answer is the tokenizer's encoding of
    `example.target` alone. When too long, the prompt is cut from the left so that the answer stays.
    """
    prompt = encode_prompt(tokenizer, example, chat)
    answer = list(tokenizer(example.target, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        answer.append(tokenizer.eos_token_id)
    answer = answer[: max(1, max_length - 1)]
    keep = max_length - len(answer)
    if len(prompt) > keep:
        prompt = prompt[len(prompt) - keep :]
    return {"input_ids": prompt + answer, "completion_mask": [0] * len(prompt) + [1] * len(answer)}


def build_sft_dataset(tokenizer, examples: Sequence[Example], *, max_length: int = 256, chat: Optional[bool] = None):
    """A pre-tokenized `datasets.Dataset` (`input_ids`, `completion_mask`) that TRL's `SFTTrainer` uses as is."""
    from datasets import Dataset

    rows = [encode_example(tokenizer, ex, max_length=max_length, chat=chat) for ex in examples]
    return Dataset.from_dict(
        {"input_ids": [r["input_ids"] for r in rows], "completion_mask": [r["completion_mask"] for r in rows]}
    )


def mixed_examples(per_task: Sequence[Sequence[Example]], seed: int = 0) -> list[Example]:
    """Balanced mix: each task's (shuffled) examples are cycled up to the largest task's count, then all shuffled."""
    if not per_task or any(len(x) == 0 for x in per_task):
        raise ValueError("mixed_examples: every task needs at least one example")
    rng = random.Random(seed)
    n = max(len(x) for x in per_task)
    out = []
    for examples in per_task:
        order = list(examples)
        rng.shuffle(order)
        out.extend(order[i % len(order)] for i in range(n))
    rng.shuffle(out)
    return out


@contextlib.contextmanager
def _quiet_datasets():
    """Silence `datasets`' per-map progress bars while TRL prepares a dataset."""
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()


def sft_train(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Example],
    config: CPIConfig,
    *,
    steps: int,
    learning_rate: Optional[float] = None,
    output_dir: Union[str, Path] = "cpi_trainer",
    callbacks: Optional[list] = None,
) -> list[float]:
    """One supervised fine-tuning run with TRL's `SFTTrainer` (loss on the answer tokens only).

    The examples are tokenized with [`encode_example`] (the prompt exactly as the evaluation formats it), so what is
    trained is what is scored. The `SFTConfig` is the package's [`~peft_spectral.training.sft_preset`] with the
    optimizer, batch size, schedule, weight decay and seed of `config`. Used for every probe and stage of
    [`CPIPipeline`] and by the benchmark's baselines, so all methods share one training path.

    Args:
        model (`torch.nn.Module`): The model to train in place (e.g. a CoreIsolation `PeftModel`).
        tokenizer: Its tokenizer.
        examples (`Sequence[Example]`): The training examples.
        config ([`CPIConfig`]): Batch size, optimizer, schedule, length and seed.
        steps (`int`): Optimizer steps.
        learning_rate (`float`, *optional*): Overrides `config.learning_rate`.
        output_dir (`str` or `Path`): The trainer's output directory (nothing is saved there).
        callbacks (`list[TrainerCallback]`, *optional*): Extra callbacks.

    Returns:
        `list[float]`: The logged training losses.
    """
    from trl import SFTTrainer

    if not examples:
        raise ValueError("sft_train: no training examples")
    cfg = config
    dataset = build_sft_dataset(tokenizer, examples, max_length=cfg.max_length, chat=cfg.chat)
    args = sft_preset(
        str(output_dir),
        max_steps=int(steps),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate if learning_rate is None else learning_rate,
        max_length=cfg.max_length,
        seed=cfg.seed,
        logging_steps=max(1, int(steps) // 10),
        weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps,
        optim=cfg.optim,
        activation_checkpointing=False,
        disable_tqdm=True,
    )
    with _quiet_datasets():
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=list(callbacks or [])
        )
    trainer.remove_callback(PrinterCallback)  # losses are returned (and recorded by the pipeline) instead
    trainer.train()
    return [round(float(h["loss"]), 6) for h in trainer.state.log_history if "loss" in h]
