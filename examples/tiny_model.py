"""A tiny random Llama and an offline byte-level tokenizer, so that every example runs in seconds with `--tiny`.

Nothing is downloaded: the tokenizer maps each UTF-8 byte to one token (plus ChatML special tokens and a chat
template, like SmolLM2-Instruct's) and the model is a 2-layer `LlamaForCausalLM` with random weights. Its answers are
noise; the point is to exercise the exact code path a real model takes.
"""

from __future__ import annotations

import torch


CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer():
    """A byte-level `PreTrainedTokenizerFast` (256 byte tokens + 4 special tokens) with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for tok in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"):
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
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_model(tokenizer, seed: int = 0):
    """A random `LlamaForCausalLM`: hidden 32, 2 layers, MLP 64, 4 heads / 2 KV heads, tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.3,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


def load(tiny: bool, model_id=None, seed: int = 0):
    """`(model, tokenizer)`: the tiny random model with `tiny`, else `peft_spectral.assets.load_model(model_id)`
    (the embedded SmolLM2-135M-Instruct when `model_id` is `None`, or a Hub id / local directory)."""
    if tiny:
        tokenizer = tiny_tokenizer()
        return tiny_model(tokenizer, seed=seed), tokenizer
    from peft_spectral.assets import load_model
    from peft_spectral.training import as_plain_fp32

    model, tokenizer = load_model(model_id)
    return as_plain_fp32(model), tokenizer  # the embedded GGUF model is dequantised; let Trainer train it
