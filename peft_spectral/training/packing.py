"""Padding-free SFT batches: whether a model supports them, and the truncation TRL leaves to the caller.

The experts' SFT examples are short and of very different lengths, so a padded batch is largely padding (a third of
the tokens for 8 examples of 40-250 tokens). TRL's padding-free collator (`SFTConfig(padding_free=True)`) puts the
examples of a batch one after the other in a single row with restarting `position_ids` and no attention mask;
transformers then builds a block-causal mask from the position ids (`masking_utils.find_packed_sequence_indices`, for
the eager, sdpa and flash kernels), so no example attends to another and the loss is the padded batch's (the same
examples per step, the same tokens counted). Unlike packing (`packing=True`), it does not regroup examples across
batches, so the optimisation is the same run.

Two things around it:

* [`supports_padding_free`]: a model that does not build that mask (an attention implementation that ignores
  `position_ids`) would let examples attend to each other; one probe forward of two short sequences, packed and
  separately, tells.
* TRL refuses `max_length` with padding-free batches (it does not truncate in that mode); [`truncate_tokenized`]
  applies TRL's own truncation (keep the start, drop examples left without a label) to a prepared dataset.
"""

from __future__ import annotations

import logging

import torch


__all__ = ["MAX_LENGTH_ATTRIBUTE", "supports_padding_free", "truncate_tokenized"]

logger = logging.getLogger(__name__)

#: Attribute of an `SFTConfig` from [`sft_preset`] holding the truncation length of padding-free batches (TRL's own
#: `max_length` must then be `None`); [`build_trainer`] truncates the prepared datasets to it.
MAX_LENGTH_ATTRIBUTE = "svf_max_length"


def supports_padding_free(model: torch.nn.Module) -> bool:
    """Whether `model` keeps examples packed into one row apart (given `position_ids` that restart at 0, no mask).

    Runs two short random sequences (3 and 5 tokens) through `model` once packed into one row and once each alone,
    without gradient and in eval mode, and compares the logits: an example that attends to the one before it
    changes them by O(1), rounding by 1e-6 (float32) or 1e-2 (16-bit) of their magnitude. Weights partitioned by
    DeepSpeed ZeRO-3 (not gathered outside a forward of the engine) are not probed: `True`, as TRL assumes.

    Args:
        model (`torch.nn.Module`): A causal LM (or a `PeftModel` around one).
    """
    params = list(model.parameters())
    if not params or any(hasattr(p, "ds_id") for p in params):
        return True
    device = params[0].device
    vocab = int(model.get_input_embeddings().num_embeddings)
    gen = torch.Generator().manual_seed(0)
    first, second = (torch.randint(0, vocab, (1, n), generator=gen).to(device) for n in (3, 5))
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]], device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = torch.cat([model(input_ids=x, use_cache=False).logits[0] for x in (first, second)]).float()
            packed = model(input_ids=torch.cat([first, second], 1), position_ids=positions, use_cache=False)
            packed = packed.logits[0].float()
    finally:
        model.train(was_training)
    half = params[0].dtype in (torch.float16, torch.bfloat16)
    tolerance = (3e-2 if half else 1e-3) * (1.0 + float(alone.abs().max()))
    ok = bool(torch.isfinite(packed).all()) and float((packed - alone).abs().max()) <= tolerance
    if not ok:
        logger.info("padding-free batches: %s attends across packed examples", type(model).__name__)
    return ok


def truncate_tokenized(dataset, max_length: int):
    """TRL's truncation of a prepared SFT dataset (`input_ids`, `labels`): keep the first `max_length` tokens, then
    drop the examples left without a label token (they carry no loss), as `SFTTrainer` does without padding-free.

    Args:
        dataset (`datasets.Dataset`): The tokenized dataset (`trainer.train_dataset` after `SFTTrainer.__init__`).
        max_length (`int`): Tokens kept per example (>= 1).
    """
    from datasets import Dataset

    if isinstance(dataset, Dataset) and max((len(ids) for ids in dataset["input_ids"]), default=0) <= max_length:
        return dataset  # nothing to cut: keep TRL's prepared (and cached) dataset as it is

    def truncate(example):
        return {"input_ids": example["input_ids"][:max_length], "labels": example["labels"][:max_length]}

    dataset = dataset.map(truncate)
    return dataset.filter(lambda example: any(label != -100 for label in example["labels"]))
