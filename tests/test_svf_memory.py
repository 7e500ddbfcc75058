"""The SVF memory model (`peft_spectral.benchmarking.svf_memory`) against hand arithmetic, real layers and its docs page."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from testing_utils import build_tiny_llama, build_tiny_tokenizer

from peft_spectral import SVFConfig
from peft_spectral.benchmarking.svf_memory import (
    LLAMA2_7B_BLOCK,
    LLAMA2_7B_PARAMS,
    MLP_TARGETS,
    lora_matrix_memory,
    memory_tables,
    model_memory,
    svf_matrix_memory,
)
from peft_spectral.tuners.svf.layer import SVFLinear


DOC = Path(__file__).resolve().parents[1] / "docs" / "svf_memory.md"


def test_one_matrix_by_hand():
    # SmolLM2 gate_proj: (out, in) = (1536, 576), m = 576, float32 factors and z, AdamW
    mem = svf_matrix_memory(1536, 576)
    assert mem.S == 576 * 4 == 2_304
    assert mem.Q == 576 * 576 * 4 == 1_327_104
    assert mem.P == 1536 * 576 * 4 == 3_538_944
    assert mem.z == 2_304 and mem.z_training == 3 * 2_304
    assert mem.total == 2_304 + 1_327_104 + 3_538_944 + 4 * 2_304 == 4_877_568
    half = svf_matrix_memory(1536, 576, factor_dtype="bfloat16")
    # 16-bit factors: Q and P halve, S stays float32
    assert (half.S, half.Q, half.P, half.z) == (2_304, 663_552, 1_769_472, 2_304)
    exact = svf_matrix_memory(1536, 576, fast_factored=False)
    assert exact.P == 0 and exact.buffers == 2_304 + 1_327_104
    # rank 200 of 576: 2k <= m, the exact form is cheaper and no P is kept
    low = svf_matrix_memory(1536, 576, rank=200)
    assert low.P == 0 and low.z == 800
    assert lora_matrix_memory(1536, 576) == 16 * (1536 + 576) * 4 * 4 == 540_672


def test_llama2_7b_mlp_by_hand():
    mem = model_memory(LLAMA2_7B_BLOCK, MLP_TARGETS, 32)
    assert mem.Q == 32 * 3 * 4096 * 4096 * 4
    assert mem.P == 32 * 3 * 11008 * 4096 * 4 == 17_314_086_912
    assert mem.S == 32 * 3 * 4096 * 4
    half = model_memory(LLAMA2_7B_BLOCK, MLP_TARGETS, 32, factor_dtype="bfloat16")
    assert half.Q == mem.Q // 2 and half.P == 32 * 3 * 11008 * 4096 * 2 == 8_657_043_456 and half.S == mem.S
    # what the default SVFConfig adds to a bf16 Llama-2-7B with MLP targets: about 0.88x its bf16 weights
    assert round(half.total / 1e9, 2) == 11.89 and 0.88 < half.total / (LLAMA2_7B_PARAMS * 2) < 0.89


@pytest.mark.parametrize(
    "base_dtype, factor_dtype, expected",
    [
        (torch.float32, "auto", "float32"),
        (torch.bfloat16, "auto", "bfloat16"),
        (torch.float16, "auto", "float16"),
        (torch.bfloat16, "float32", "float32"),
    ],
)
@pytest.mark.parametrize("fast_factored", [True, False])
def test_matches_the_buffers_of_real_layers(fast_factored, base_dtype, factor_dtype, expected):
    model = get_peft_model(
        build_tiny_llama(build_tiny_tokenizer()).to(base_dtype),
        SVFConfig(
            target_modules=["gate_proj", "up_proj", "down_proj"],
            fast_factored=fast_factored,
            factor_dtype=factor_dtype,
        ),
    )
    layers = [m for m in model.modules() if isinstance(m, SVFLinear)]
    assert layers
    for layer in layers:
        mem = svf_matrix_memory(
            layer.out_features, layer.in_features, fast_factored=fast_factored, factor_dtype=expected
        )
        kept = {n: b.numel() * b.element_size() for n, b in layer.named_buffers() if b is not None}
        assert kept["svf_S"] == mem.S and kept["svf_Q"] == mem.Q
        assert kept.get("svf_P", 0) == mem.P and (mem.P > 0) == fast_factored
        z = layer.svf_z["default"]
        assert z.numel() * z.element_size() == mem.z


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="factor_dtype"):
        svf_matrix_memory(4, 4, factor_dtype="int8")
    with pytest.raises(ValueError, match="rank"):
        svf_matrix_memory(4, 4, rank=0)
    with pytest.raises(ValueError, match="not among"):
        model_memory(LLAMA2_7B_BLOCK, ["lm_head"], 1)


def test_docs_page_is_current():
    text = DOC.read_text(encoding="utf-8")
    for table in memory_tables().strip().split("\n\n"):
        assert table.strip() in text, (
            "docs/svf_memory.md is stale: run python -m peft_spectral.benchmarking.svf_memory"
        )
