"""Dtypes of SVF's factors: which dtype a layer keeps `Q`/`P` in, and the scaled product the forward uses."""

from __future__ import annotations

import torch

from .config import SVF_FACTOR_DTYPES


_HALF_DTYPES = (torch.bfloat16, torch.float16)


def resolve_factor_dtype(factor_dtype: str, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype in which a layer keeps `Q` and `P` for `SVFConfig.factor_dtype` and its base weight's dtype.

    Args:
        factor_dtype (`str`): `"auto"` (the weight's dtype if bfloat16/float16, else float32), `"float32"`,
            `"bfloat16"` or `"float16"`.
        weight_dtype (`torch.dtype`): The dtype of the base weight.
    """
    if factor_dtype not in SVF_FACTOR_DTYPES:
        raise ValueError(f"SVFConfig.factor_dtype must be one of {list(SVF_FACTOR_DTYPES)}, got {factor_dtype!r}")
    if factor_dtype == "auto":
        return weight_dtype if weight_dtype in _HALF_DTYPES else torch.float32
    return getattr(torch, factor_dtype)


def scaled_matmul(h: torch.Tensor, scale: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """`(h ⊙ scale) @ factor`: the scaling in the wider of both dtypes (float32 scales), the matmul in `factor`'s.

    A 16-bit `h` times a float32 `scale` is computed in float32 and keeps `h` (not a float32 copy) for the
    backward; only the product is rounded to the factor's dtype.

    Args:
        h (`torch.Tensor`): Projections `x Q` (or `x Pᵀ`), `(..., k)`, in the factor dtype.
        scale (`torch.Tensor`): Scales `s` or corrections `s - 1`, broadcastable to `h`, float32 or wider.
        factor (`torch.Tensor`): The `(k, n)` factor to multiply with (`Pᵀ`, `Q_kᵀ`).
    """
    return (h * scale).to(factor.dtype) @ factor
