"""Core regions: the top-p mask of a task vector, 1-bit packing, and the Jaccard similarity of two regions."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..tuners.core_isolation.config import validate_core_fraction


__all__ = ["core_masks", "jaccard_matrix", "pack_mask", "unpack_mask"]


def core_masks(deltas: dict[str, torch.Tensor], p: float, scope: str = "global") -> dict[str, torch.Tensor]:
    """The core region: the top `p` fraction of entries by |Δ|.

    Args:
        deltas (`dict[str, torch.Tensor]`): Task vector, by tensor name.
        p (`float`): Fraction in (0, 1). `"global"`: k = max(1, round(p·N)) entries over all tensors together;
            `"per_tensor"`: k_i = max(1, round(p·N_i)) entries of each tensor.
        scope (`str`): `"global"` or `"per_tensor"`.

    Returns:
        `dict[str, torch.Tensor]`: Bool masks shaped like the deltas, with exactly k (or k_i) `True` entries, every
        selected |Δ| ≥ every unselected one (ties broken by `torch.topk`).
    """
    p = validate_core_fraction(p, "core_fraction")
    if scope not in ("global", "per_tensor"):
        raise ValueError(f"`core_scope` must be 'global' or 'per_tensor', got {scope!r}")
    if not deltas:
        raise ValueError("core_masks: no tensors given")
    names = list(deltas)
    if scope == "per_tensor":
        out = {}
        for name in names:
            flat = deltas[name].detach().reshape(-1).abs().float()
            k = max(1, round(p * flat.numel()))
            mask = torch.zeros(flat.numel(), dtype=torch.bool)
            mask[torch.topk(flat, k, sorted=False).indices] = True
            out[name] = mask.reshape(deltas[name].shape)
        return out
    flat = torch.cat([deltas[n].detach().reshape(-1).abs().float() for n in names])
    k = max(1, round(p * flat.numel()))
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[torch.topk(flat, k, sorted=False).indices] = True
    del flat
    out, offset = {}, 0
    for name in names:
        n = deltas[name].numel()
        out[name] = mask[offset : offset + n].reshape(deltas[name].shape)
        offset += n
    return out


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor into a 1-D uint8 tensor, 8 entries per byte (numpy `packbits`, big-endian bit order).

    Args:
        mask (`torch.Tensor`): A bool tensor of any shape (flattened in row-major order).
    """
    return torch.from_numpy(np.packbits(mask.reshape(-1).cpu().numpy().astype(np.uint8)))


def unpack_mask(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of [`pack_mask`].

    Args:
        packed (`torch.Tensor`): The uint8 tensor from [`pack_mask`].
        shape (`Sequence[int]`): The shape of the original mask.
    """
    n = int(np.prod(shape)) if len(shape) else 1
    bits = np.unpackbits(packed.cpu().numpy(), count=n).astype(bool)
    return torch.from_numpy(bits).reshape(tuple(shape))


_POPCOUNT = np.array([(i).bit_count() for i in range(256)], dtype=np.int64)


def _popcount(packed: np.ndarray) -> int:
    return int(_POPCOUNT[packed].sum())


def jaccard_matrix(masks: Sequence[dict[str, torch.Tensor]]) -> np.ndarray:
    """Pairwise Jaccard similarity |A ∩ B| / |A ∪ B| of core regions (bool masks or packed uint8 masks by name).

    Masks are compared tensor by tensor over the union of names (a tensor missing from one mask counts as empty).
    Two empty regions have similarity 1 on the diagonal and 0 elsewhere.

    Args:
        masks (`Sequence[dict[str, torch.Tensor]]`): One core region per task, by tensor name.

    Returns:
        `np.ndarray`: The symmetric T × T matrix.
    """
    t = len(masks)
    packed = [
        {k: (v.cpu().numpy() if v.dtype == torch.uint8 else pack_mask(v).numpy()) for k, v in m.items()} for m in masks
    ]
    sizes = [sum(_popcount(v) for v in m.values()) for m in packed]
    out = np.eye(t, dtype=np.float64)
    for i in range(t):
        for j in range(i + 1, t):
            inter = 0
            for name in set(packed[i]) & set(packed[j]):
                inter += _popcount(np.bitwise_and(packed[i][name], packed[j][name]))
            union = sizes[i] + sizes[j] - inter
            out[i, j] = out[j, i] = inter / union if union else 0.0
    return out
