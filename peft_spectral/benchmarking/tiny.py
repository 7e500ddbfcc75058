"""The tiny random models every benchmark's `--smoke` mode and the test suite run on (no network), and toy tasks such a
model learns in a few steps.

The tokenizer is a byte-level BPE with no merges (every UTF-8 byte is one token), so any text round-trips, plus
ChatML-style special tokens and a chat template, like SmolLM2-Instruct's.
"""

from __future__ import annotations

import torch


__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "tiny_gpt2", "tiny_llama", "tiny_model", "tiny_tasks", "tiny_tokenizer"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>")


def tiny_tokenizer(chat_template: bool = True):
    """A byte-level `PreTrainedTokenizerFast` with 256 byte tokens + 4 special tokens (vocab size 260).

    Args:
        chat_template (`bool`, defaults to `True`): Attach a ChatML chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        unk_token="<|endoftext|>",
        pad_token="<pad>",
        additional_special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _finish(model, tokenizer):
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


def tiny_llama(tokenizer, seed: int = 0, **overrides):
    """A random `LlamaForCausalLM` (init std 0.3): hidden 32, 2 layers, MLP 64, 4 heads / 2 KV heads, tied
    embeddings; `overrides` change `LlamaConfig` fields."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "initializer_range": 0.3,  # large enough that greedy decoding does not repeat one token
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    settings.update(overrides)
    return _finish(LlamaForCausalLM(LlamaConfig(**settings)), tokenizer)


def tiny_gpt2(tokenizer, seed: int = 0):
    """A random `GPT2LMHeadModel` (init std 0.3): n_embd 32, 2 layers, 4 heads (Conv1D projections)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=512,
        initializer_range=0.3,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _finish(GPT2LMHeadModel(config), tokenizer)


def tiny_model(seed: int = 0, **overrides):
    """`(model, tokenizer)`: [`tiny_llama`] with its [`tiny_tokenizer`]; the model is named `"tiny-llama"`."""
    tokenizer = tiny_tokenizer()
    model = tiny_llama(tokenizer, seed=seed, **overrides)
    model.name_or_path = "tiny-llama"
    return model, tokenizer


def tiny_tasks() -> dict[str, list]:
    """Toy tasks a tiny model learns in a few steps (40 examples each: 30 train, 10 test, no validation), in two
    scenarios: `"compatible"` (three two-option multiple-choice tasks) and `"conflicting"` (short generated answers
    and a multiple-choice task), as the CPI-FT benchmark's smoke run uses them."""
    from ..data import Example, Task

    def task(name, fn, choices=()):
        ex = [Example(f"{name}: {i}", fn(i), choices, choices.index(fn(i)) if choices else None) for i in range(40)]
        return Task(name, "multiple_choice" if choices else "generation", train=ex[10:], validation=[], test=ex[:10])

    parity = task("parity", lambda i: "yes" if i % 2 else "no", ("yes", "no"))
    return {
        "compatible": [
            parity,
            task("big", lambda i: "high" if i >= 20 else "low", ("high", "low")),
            task("third", lambda i: "true" if i % 3 == 0 else "false", ("true", "false")),
        ],
        "conflicting": [task("inc", lambda i: str(i + 1)), parity, task("rev", lambda i: str(i)[::-1])],
    }
