"""Small helpers about a model that every pipeline uses: its device, its pad token id, eval mode for a block, and a
progress bar that can be switched off."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


__all__ = ["eval_mode", "model_device", "pad_token_id", "progress_bar"]


def pad_token_id(tokenizer, model=None) -> int:
    """The id used for padding: the tokenizer's pad token, else its EOS, else the model's generation config, else 0."""
    for candidate in (
        getattr(tokenizer, "pad_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
        getattr(getattr(model, "generation_config", None), "pad_token_id", None),
    ):
        if isinstance(candidate, int):
            return candidate
    return 0


def model_device(model) -> torch.device:
    """The device of `model`'s first parameter (CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - parameter-less model
        return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """Put `model` in eval mode and restore the mode it had."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def progress_bar(iterable, total: int, enabled: bool, desc: str):
    """`iterable` wrapped in a tqdm bar when `enabled`."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc)
