"""Arithmetic cost of SVF: multiply-adds per token of a targeted matrix, against the base layer and LoRA.

For a weight of shape `(out, in)`, `m = min(out, in)`, all `m` singular values adapted, one token costs

* the base layer: `out · in`;
* SVF, fast factored form (the default): `m · (out + in)` — the weight is applied as its two factors, `x Q` then
  `· (s ⊙ ·) Pᵀ`, and replaces the base matmul. For a square matrix that is twice the base layer; for SmolLM2's MLP
  matrices (576 × 1536) 1.375×;
* SVF, exact factored form (`fast_factored=False`): `out · in + 2 · m · m` (the base matmul plus the correction
  through `Q`);
* LoRA of rank `r`: `out · in + r · (out + in)`.

The backward pass repeats the same products for the input gradient (the base weight is frozen in all three), so the
ratios hold for a training step up to the parts that do not depend on the adapter (attention scores, norms, the
optimizer). No choice of kernel removes the difference: adapting every singular value of a matrix means applying a
rank-`m` factorisation of it, whereas LoRA adds a rank-`r` term to a matmul that is done anyway.

```python
from peft_spectral.benchmarking.step_cost import linear_macs_per_token

base, lora, svf = (linear_macs_per_token(model, targets, method=m) for m in ("base", "lora", "svf"))
print(f"predicted SVF / LoRA: {svf / lora:.2f}x")
```
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


__all__ = ["METHODS", "linear_macs_per_token", "matrix_macs"]

#: Methods [`matrix_macs`] knows.
METHODS = ("base", "lora", "svf", "svf_exact")


def matrix_macs(out_features: int, in_features: int, method: str, r: int = 16) -> int:
    """Multiply-adds per token of one `(out_features, in_features)` linear layer under `method`.

    Args:
        out_features, in_features (`int`): The weight's shape.
        method (`str`): One of [`METHODS`]: `"base"`, `"lora"` (rank `r`), `"svf"` (fast factored form, all singular
            values), `"svf_exact"` (exact factored form).
        r (`int`, defaults to 16): LoRA rank.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if out_features < 1 or in_features < 1:
        raise ValueError(f"shape must be positive, got ({out_features}, {in_features})")
    base = out_features * in_features
    m = min(out_features, in_features)
    if method == "base":
        return base
    if method == "lora":
        return base + r * (out_features + in_features)
    if method == "svf":
        return m * (out_features + in_features)
    return base + 2 * m * m


def linear_macs_per_token(model: nn.Module, targets: Sequence[str], method: str, r: int = 16) -> int:
    """Multiply-adds per token of every `nn.Linear` of `model` (the LM head included), the layers whose name ends in
    one of `targets` counted under `method` and the others as base layers.

    Attention scores, norms and activations are not counted: they are the same whatever the adapter.
    """
    total = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        targeted = any(name == t or name.endswith("." + t) for t in targets)
        total += matrix_macs(module.out_features, module.in_features, method if targeted else "base", r=r)
    return total
