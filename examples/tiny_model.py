"""The model every example runs on: the embedded SmolLM2-135M-Instruct, a Hub id, or with `--tiny` the package's tiny
random Llama (`peft_spectral.benchmarking.tiny`: an offline byte-level tokenizer and a 2-layer random model), so that
every example runs in seconds. The tiny model's answers are noise; the point is to exercise the real code path.
"""

from __future__ import annotations

from peft_spectral.benchmarking.tiny import tiny_llama, tiny_tokenizer


def tiny_model(tokenizer, seed: int = 0):
    """A random `LlamaForCausalLM`: hidden 32, 2 layers, MLP 64, 4 heads / 2 KV heads, tied embeddings."""
    return tiny_llama(tokenizer, seed=seed)


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


__all__ = ["load", "tiny_model", "tiny_tokenizer"]
