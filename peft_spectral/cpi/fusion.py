"""Fusion of the probes: core entries transplanted from their task, the rest merged by (iterative) SLERP."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional, Union

import torch

from ..linalg import slerp
from .config import FUSION_MODES


__all__ = ["fuse_deltas", "slerp_merge"]

TensorSource = Union[Callable[[str], torch.Tensor], dict[str, torch.Tensor]]


def slerp_merge(vectors: Sequence[torch.Tensor], t: Optional[float] = None, eps: float = 1e-4) -> torch.Tensor:
    """Iterative SLERP of several vectors: m_1 = v_1, m_k = slerp(m_{k-1}, v_k, t_k).

    Args:
        vectors (`Sequence[torch.Tensor]`): Tensors of one shape (at least one).
        t (`float`, *optional*): Fixed weight of the newcomer at each step. `None` uses t_k = 1/k, which weights
            every vector equally (it is exactly the mean when all vectors are parallel).
        eps (`float`): Linear-interpolation threshold on `1 - |cos Ω|` (see [`~peft_spectral.linalg.slerp`]).
    """
    if not vectors:
        raise ValueError("slerp_merge needs at least one vector")
    merged = vectors[0]
    for k, vec in enumerate(vectors[1:], start=2):
        merged = slerp(merged, vec, (1.0 / k) if t is None else t, eps=eps)
    return merged


def _get(source: TensorSource, name: str) -> torch.Tensor:
    return source(name) if callable(source) else source[name]


def fuse_deltas(
    deltas: Sequence[TensorSource],
    masks: Sequence[TensorSource],
    names: Sequence[str],
    *,
    base: Optional[TensorSource] = None,
    fusion: str = "slerp_params",
    slerp_t: Optional[float] = None,
    slerp_eps: float = 1e-4,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Fuse the tasks' fine-tuned models into one, returned as a delta from θ0, tensor by tensor.

    Entries in the union of the cores take Δ_t of the task whose core holds them (the task's fine-tuned value
    θ_t = θ0 + Δ_t is transplanted; an entry in several cores takes the task with the largest |Δ|, ties to the
    earlier task). The other entries of each tensor are merged with [`slerp_merge`], restricted to those entries:

    * `fusion="slerp_params"` (the paper): SLERP of the fine-tuned parameters θ_t, minus θ0;
    * `fusion="slerp_task_vectors"`: SLERP of the task vectors Δ_t.

    The two differ because SLERP depends on the angle and norms of what it interpolates: SLERP(θ0 + Δ_a, θ0 + Δ_b)
    − θ0 ≠ SLERP(Δ_a, Δ_b) in general. Only one tensor of every task is in memory at a time.

    Args:
        deltas (`Sequence[dict | Callable]`): Per task, Δ_t by tensor name (a dict or a lazy `name -> tensor`).
        masks (`Sequence[dict | Callable]`): Per task, the bool core mask by tensor name.
        names (`Sequence[str]`): The tensor names to fuse.
        base (`dict | Callable`, *optional*): θ0 by tensor name; required by `"slerp_params"`.
        fusion (`str`): `"slerp_params"` or `"slerp_task_vectors"`.
        slerp_t (`float`, *optional*): Fixed SLERP weight; `None` weights every task equally.
        slerp_eps (`float`): Linear-interpolation threshold on `1 - |cos Ω|`.
        progress (`bool`): Show a progress bar over the tensors.

    Returns:
        `dict[str, torch.Tensor]`: The fused delta (fused θ − θ0) by tensor name.
    """
    if len(deltas) != len(masks) or not deltas:
        raise ValueError("fuse_deltas needs one delta source and one mask source per task (at least one task)")
    if fusion not in FUSION_MODES:
        raise ValueError(f"`fusion` must be one of {FUSION_MODES}, got {fusion!r}")
    if fusion == "slerp_params" and base is None:
        raise ValueError("fusion='slerp_params' needs `base` (θ0 by tensor name)")
    from tqdm.auto import tqdm

    out = {}
    for name in tqdm(names, desc="fusion", disable=not progress):
        ds = [_get(d, name) for d in deltas]
        ms = [_get(m, name).to(torch.bool) for m in masks]
        union = torch.zeros_like(ms[0])
        for m in ms:
            union |= m
        fused = torch.empty_like(ds[0])
        free = ~union
        if free.any():
            if fusion == "slerp_params":
                theta0 = _get(base, name).to(torch.float64)[free]  # float64: θ − θ0 keeps Δ's precision
                merged = slerp_merge([theta0 + d[free].to(torch.float64) for d in ds], t=slerp_t, eps=slerp_eps)
                fused[free] = (merged - theta0).to(fused.dtype)
            else:
                fused[free] = slerp_merge([d[free] for d in ds], t=slerp_t, eps=slerp_eps)
        if union.any():
            stacked = torch.stack([torch.where(m, d.abs(), torch.full_like(d, -1.0)) for d, m in zip(ds, ms)])
            winner = stacked.argmax(dim=0)  # first maximum on ties
            values = torch.gather(torch.stack(ds), 0, winner.unsqueeze(0)).squeeze(0)
            fused[union] = values[union]
        out[name] = fused
    return out
