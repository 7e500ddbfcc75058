"""Builders shared by the tests: tiny random models with an offline tokenizer, fake BigBench data, saved experts.

Test modules import these from here (`from testing_utils import ...`); fixtures built on them live in
`tests/conftest.py`. No test module imports another test module.

The tokenizer is a byte-level BPE with no merges (every UTF-8 byte is one token), so any text round-trips, plus
ChatML-style special tokens and a chat template, like SmolLM2-Instruct's.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import torch


CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>")


def build_tiny_tokenizer(chat_template: bool = True):
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


def build_tiny_llama(tokenizer, seed: int = 0):
    """A random `LlamaForCausalLM` (init std 0.3): hidden 32, 2 layers, MLP 64, 4 heads / 2 KV heads, tied embeddings."""
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
        initializer_range=0.3,  # large enough that greedy decoding does not repeat one token
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


def build_tiny_gpt2(tokenizer, seed: int = 0):
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
    model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


def save_svf_expert(path, seed: int, svd_dir, targets=("gate_proj", "up_proj", "down_proj"), base_name="tiny-llama"):
    """Save an SVF adapter of a fresh tiny Llama whose z vectors are random (`1 + 0.5 N(0, 1)`, seeded).

    Args:
        path: Directory of the adapter.
        seed (`int`): Seed of the z vectors.
        svd_dir: SVD cache directory of the adapter config.
        targets (`Sequence[str]`): Target modules.
        base_name (`str`): `name_or_path` recorded as the adapter's base model.

    Returns:
        The adapter directory `path`.
    """
    from peft import get_peft_model

    from peft_spectral import SVFConfig

    tok = build_tiny_tokenizer()
    base = build_tiny_llama(tok)
    base.name_or_path = base_name
    model = get_peft_model(base, SVFConfig(target_modules=list(targets), svd_cache_dir=str(svd_dir)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.base_model.svf_layers():
            z = layer.svf_z["default"]
            z.copy_(1 + 0.5 * torch.randn(z.shape, generator=gen))
    model.save_pretrained(str(path))
    return path


# BigBench's layout inside bigbench-1.0.0.tar.gz.
BIGBENCH_PREFIX = "bigbench-1.0.0/bigbench/benchmark_tasks/"


def _bigbench_task_json(name, examples=None, **extra):
    data = {"name": name, "description": f"{name} description", **extra}
    if examples is not None:
        data["examples"] = examples
    return json.dumps(data).encode()


def make_fake_bigbench(path: Path) -> Path:
    """A small archive laid out like bigbench-1.0.0.tar.gz."""
    files = {
        "mc_task/task.json": _bigbench_task_json(
            "mc_task",
            [{"input": f"Question {i}?", "target_scores": {"right": 1, "wrong": 0, "other": 0}} for i in range(10)],
            preferred_score="multiple_choice_grade",
            task_prefix="Pick the right answer.\n",
        ),
        "maths/task.json": _bigbench_task_json("maths"),
        "maths/add/task.json": _bigbench_task_json(
            "add",
            [
                {"input": f"What is {i} plus 1?", "target": str(i + 1), "target_scores": {str(i + 1): 1, "banana": 0}}
                for i in range(6)
            ],
            preferred_score="exact_str_match",
        ),
        "maths/sub/task.json": _bigbench_task_json(
            "sub",
            [{"input": f"What is {i} minus 1?", "target": [str(i - 1), f"minus {i - 1}"]} for i in range(4)],
            preferred_score="exact_str_match",
        ),
        "gen_task/task.json": _bigbench_task_json(
            "gen_task", [{"input": "The capital of France is", "target": "Paris"}] * 5
        ),
        "gen_task/README.md": b"not a task",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for rel, data in files.items():
            info = tarfile.TarInfo(BIGBENCH_PREFIX + rel)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path
