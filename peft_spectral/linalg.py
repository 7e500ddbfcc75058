"""Linear-algebra helpers shared by the tuners: thin SVD of a layer weight, truncation, SLERP."""

from __future__ import annotations

import torch

from . import svd_cache


__all__ = ["slerp", "thin_svd", "truncate"]


def thin_svd(weight: torch.Tensor, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD `weight = U @ diag(S) @ V.T`, computed in float64 and returned in float32 on the weight's device.

    This is the package's one SVD implementation: [`~peft_spectral.svd_cache.compute_factors`] (eigen-decomposition
    of the smaller Gram matrix) followed by [`~peft_spectral.svd_cache.svd_from_factors`] for the other side, the
    same numbers the SVF tuner and SpectralCompress take from the SVD cache.

    Args:
        weight (`torch.Tensor`): A 2-D matrix of shape `(out, in)`, finite.
        rank (`int`, *optional*): Keep only the top `rank` singular triplets.

    Returns:
        `(U, S, V)` with shapes `(out, r)`, `(r,)`, `(in, r)` (note: `V`, not `V.T`), singular values descending.

    Raises:
        `ValueError`: If `weight` is not 2-D or has NaN/inf values.
    """
    if weight.ndim != 2:
        raise ValueError(f"thin_svd expects a 2-D matrix, got shape {tuple(weight.shape)}")
    return svd_cache.svd_from_factors(weight, svd_cache.compute_factors(weight), rank)


def truncate(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """Best rank-`rank` approximation of `weight` (Eckart–Young), in the dtype of `weight`."""
    u, s, v = thin_svd(weight, rank)
    return ((u * s) @ v.T).to(weight.dtype)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, *, eps: float = 1e-4) -> torch.Tensor:
    """Spherical linear interpolation between `a` (t=0) and `b` (t=1), treating both as flat vectors.

    `slerp(a, b, t) = sin((1-t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b` with `cos Ω = <a, b> / (|a| |b|)`. When the vectors are
    nearly parallel (`1 - |cos Ω| < eps`) or either is zero, the formula is ill-conditioned and linear interpolation
    `(1-t)·a + t·b` is returned instead.

    Args:
        a, b (`torch.Tensor`): Tensors of the same shape.
        t (`float`): Interpolation weight in [0, 1].
        eps (`float`): Threshold on `1 - |cos Ω|` below which linear interpolation is used.
    """
    if a.shape != b.shape:
        raise ValueError(f"slerp needs tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a64, b64 = a.to(torch.float64).flatten(), b.to(torch.float64).flatten()
    na, nb = a64.norm(), b64.norm()
    if na == 0 or nb == 0:
        return ((1 - t) * a64 + t * b64).reshape(a.shape).to(a.dtype)
    cos = torch.clamp(a64 @ b64 / (na * nb), -1.0, 1.0)
    if 1 - cos.abs() < eps:
        out = (1 - t) * a64 + t * b64
    else:
        omega = torch.arccos(cos)
        so = torch.sin(omega)
        out = torch.sin((1 - t) * omega) / so * a64 + torch.sin(t * omega) / so * b64
    return out.reshape(a.shape).to(a.dtype)
