"""SFT with padding-free batches (the default of `sft_preset`): the padded run's losses and z, without the padding.

On the tiny random Llama, prompt-completion examples of 5 to 90 tokens, batches of 8: per-step losses equal within
1e-5 (relative) and z within 1e-6 after 3 SGD steps (SGD: its step is proportional to the gradient, so rounding
differences stay rounding-sized; AdamW would turn a ~0 gradient's rounding into a full step of one sign or the other).
"""

from __future__ import annotations

import random

import pytest
import torch
from testing_utils import build_tiny_gpt2, build_tiny_llama, build_tiny_tokenizer

from peft_spectral import SVFConfig
from peft_spectral.training import build_trainer, sft_preset, svf_parameters
from peft_spectral.training.packing import MAX_LENGTH_ATTRIBUTE, supports_padding_free


def dataset(n: int = 24):
    from datasets import Dataset

    rng = random.Random(0)
    rows = [{"prompt": f"Q{i}: " + "x" * rng.randint(3, 60), "completion": "A" * rng.randint(1, 30)} for i in range(n)]
    return Dataset.from_list(rows)


def sft_run(tmp_path, padding_free: bool, max_length=512, steps: int = 3, **overrides):
    tok = build_tiny_tokenizer()
    model = build_tiny_llama(tok)
    args = sft_preset(
        str(tmp_path / f"sft-{padding_free}"),
        max_steps=steps,
        padding_free=padding_free,
        max_length=max_length,
        learning_rate=0.5,
        optim="sgd",
        disable_tqdm=True,
        **overrides,
    )
    trainer = build_trainer(
        model,
        tok,
        dataset(),
        method="sft",
        args=args,
        peft_config=SVFConfig(target_modules="all-linear", use_svd_cache=False),
    )
    return trainer


def test_padding_free_is_the_default_and_keeps_the_padded_loss(tmp_path):
    free = sft_run(tmp_path, True)
    padded = sft_run(tmp_path, False)
    assert free.args.padding_free and free.args.max_length is None and not free.args.packing
    assert not padded.args.padding_free and padded.args.max_length == 512
    batch = next(iter(free.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # one row, no padding
    padded_batch = next(iter(padded.get_train_dataloader()))
    assert batch["input_ids"].shape[1] == int(padded_batch["attention_mask"].sum()) < padded_batch["input_ids"].numel()
    for trainer in (free, padded):
        trainer.train()
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (free, padded)]
    assert len(losses[0]) == 3
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-5, atol=0)
    z_free, z_padded = svf_parameters(free.model), svf_parameters(padded.model)
    assert max(float((v - 1).abs().max()) for v in z_free.values()) > 1e-2
    for name in z_free:
        torch.testing.assert_close(z_free[name], z_padded[name], atol=1e-6, rtol=0, msg=name)


def test_padding_free_truncates_as_trl_does(tmp_path):
    free = sft_run(tmp_path, True, max_length=24)
    padded = sft_run(tmp_path, False, max_length=24)
    assert getattr(free.args, MAX_LENGTH_ATTRIBUTE) == 24
    assert free.train_dataset["input_ids"] == padded.train_dataset["input_ids"]
    assert free.train_dataset["labels"] == padded.train_dataset["labels"]
    assert max(len(ids) for ids in free.train_dataset["input_ids"]) == 24


def test_a_model_without_packed_masks_falls_back_to_padded_batches(tmp_path, monkeypatch):
    import peft_spectral.training.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "supports_padding_free", lambda model: False)
    with pytest.warns(UserWarning, match="attend to each other"):
        trainer = sft_run(tmp_path, True, max_length=24)
    assert not trainer.args.padding_free and trainer.args.max_length == 24
    assert max(len(ids) for ids in trainer.train_dataset["input_ids"]) == 24
    assert "attention_mask" in next(iter(trainer.get_train_dataloader()))


class _IgnoresPositions(torch.nn.Module):
    """A causal LM whose attention ignores `position_ids`: packed examples see each other."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, position_ids=None, use_cache=False):
        return self.inner(input_ids=input_ids, use_cache=use_cache)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_supports_padding_free_probe(attn):
    tok = build_tiny_tokenizer()
    for model in (build_tiny_llama(tok), build_tiny_gpt2(tok)):
        model.config._attn_implementation = attn
        model.train()
        assert supports_padding_free(model)
        assert model.training  # the mode is restored
    assert not supports_padding_free(_IgnoresPositions(build_tiny_llama(tok)))
