"""`peft_spectral.benchmarking.step_cost`: multiply-adds per token, against hand-computed values and a counted model."""

from __future__ import annotations

import pytest
from torch import nn

from peft_spectral.benchmarking.step_cost import linear_macs_per_token, matrix_macs


def test_matrix_macs_hand_computed():
    assert matrix_macs(1536, 576, "base") == 1536 * 576
    assert matrix_macs(1536, 576, "lora") == 1536 * 576 + 16 * (1536 + 576)
    assert matrix_macs(1536, 576, "svf") == 576 * (1536 + 576)  # two factors: 1.375x the base layer
    assert matrix_macs(1536, 576, "svf") / matrix_macs(1536, 576, "base") == pytest.approx(1.375)
    assert matrix_macs(64, 64, "svf") == 2 * matrix_macs(64, 64, "base")  # square: twice
    assert matrix_macs(64, 32, "svf_exact") == 64 * 32 + 2 * 32 * 32
    assert matrix_macs(64, 32, "lora", r=4) == 64 * 32 + 4 * 96
    with pytest.raises(ValueError, match="method must be one of"):
        matrix_macs(4, 4, "dora")
    with pytest.raises(ValueError, match="shape must be positive"):
        matrix_macs(0, 4, "base")


def test_linear_macs_per_token_counts_targets_only():
    model = nn.ModuleDict(
        {
            "block": nn.ModuleDict({"up_proj": nn.Linear(8, 32), "q_proj": nn.Linear(8, 8)}),
            "lm_head": nn.Linear(8, 100, bias=False),
        }
    )
    base = 8 * 32 + 8 * 8 + 8 * 100
    assert linear_macs_per_token(model, ["up_proj"], "base") == base
    assert linear_macs_per_token(model, ["up_proj"], "svf") == base - 8 * 32 + 8 * (32 + 8)
    assert linear_macs_per_token(model, ["up_proj", "q_proj"], "lora", r=2) == base + 2 * 40 + 2 * 16
    assert linear_macs_per_token(model, ["proj"], "svf") == base  # a suffix of a name is not a target
