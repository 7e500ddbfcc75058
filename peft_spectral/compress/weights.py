"""Weights, their SVDs and their truncations: what the searches apply to the model while they evaluate."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Optional

import torch
from torch import nn

from ..linalg import thin_svd
from ..subspace import multi_subspace_factors, rank_for, reconstruct
from ..tuners._linear import weight_matrix
from .candidates import Intervention


__all__ = ["TruncationCache", "apply_interventions", "compute_svds", "weight_matrix"]


def compute_svds(model: nn.Module, modules: Sequence[str], *, cache=None, progress: bool = False) -> dict[str, tuple]:
    """Thin SVDs `(U, S, V)` (float32, CPU) of the named modules' weights, computed once and reused across ρ.

    Args:
        model (`nn.Module`): The model.
        modules (`Sequence[str]`): Module names.
        cache ([`~peft_spectral.svd_cache.SVDCache`] or `bool`, *optional*): Take the factors from the on-disk SVD
            cache (`True` = the default cache directory). The cache keeps `S` and the smaller side's singular vectors;
            the other side is recovered by [`~peft_spectral.svd_cache.svd_from_factors`]. Without a cache every SVD
            is computed with [`~peft_spectral.linalg.thin_svd`].
        progress (`bool`, defaults to `False`): Show a progress bar.

    Returns:
        `dict[str, tuple]`: `(U, S, V)` per module name.
    """
    from tqdm.auto import tqdm

    weights = [(name, weight_matrix(model.get_submodule(name)).detach().cpu()) for name in modules]
    if cache is None or cache is False:
        return {name: thin_svd(w) for name, w in tqdm(weights, desc="SVD", disable=not progress)}
    from ..svd_cache import SVDCache, svd_from_factors

    if cache is True:
        cache = SVDCache()
    factors = cache.get_many(weights, progress=progress)
    return {name: tuple(t.cpu() for t in svd_from_factors(w, factors[name])) for name, w in weights}


class TruncationCache:
    """Dense truncated weights per intervention, built from SVD factors (plain) or by clustering (multi-subspace).

    Args:
        model (`nn.Module`): The model whose weights are truncated.
        svds (`dict[str, tuple]`): `(U, S, V)` per module; missing ones are computed on first use and added.
        seed (`int`, defaults to 0): Clustering seed.
        max_items (`int`, defaults to 8): Dense matrices kept (oldest dropped first).
    """

    def __init__(self, model: nn.Module, svds: dict[str, tuple], seed: int = 0, max_items: int = 8):
        self.model, self.svds, self.seed, self.max_items = model, svds, seed, max_items
        self._items: dict[str, torch.Tensor] = {}

    def clear(self) -> None:
        """Drop every cached dense matrix."""
        self._items.clear()

    def dense(self, iv: Intervention) -> torch.Tensor:
        """The truncated weight of `iv`, in the module's own layout, dtype and device."""
        if iv.key in self._items:
            return self._items[iv.key]
        module = self.model.get_submodule(iv.module)
        weight = weight_matrix(module).detach()
        if iv.clusters == 1:
            if iv.module not in self.svds:
                self.svds[iv.module] = thin_svd(weight.cpu())
            u, s, v = self.svds[iv.module]
            k = rank_for(iv.rho, len(s))
            mat = (u[:, :k] * s[:k]) @ v[:, :k].T
        else:
            mat = reconstruct(multi_subspace_factors(weight, iv.rho, iv.clusters, seed=self.seed), tuple(weight.shape))
        mat = mat.to(device=weight.device, dtype=weight.dtype)
        if type(module).__name__ == "Conv1D":
            mat = mat.T.contiguous()
        if len(self._items) >= self.max_items:
            self._items.pop(next(iter(self._items)))
        self._items[iv.key] = mat
        return mat


@contextlib.contextmanager
def apply_interventions(
    model: nn.Module, interventions: Sequence[Intervention], *, cache: Optional[TruncationCache] = None
) -> Iterator[nn.Module]:
    """Temporarily replace the weights named by `interventions` by their truncations (restored exactly on exit).

    This is the fast path the searches use (no adapter is built per candidate).

    Args:
        model (`nn.Module`): The model (changed in place inside the `with` block only).
        interventions (`Sequence[Intervention]`): At most one per module.
        cache ([`TruncationCache`], *optional*): Reuse truncations across calls.

    Raises:
        `ValueError`: if two interventions name the same module.
    """
    modules = [iv.module for iv in interventions]
    if len(set(modules)) != len(modules):
        raise ValueError(f"several interventions on one module: {modules}")
    cache = cache or TruncationCache(model, {})
    saved = []
    try:
        for iv in interventions:
            module = model.get_submodule(iv.module)
            saved.append((module, module.weight.data))
            module.weight.data = cache.dense(iv)
        yield model
    finally:
        for module, data in reversed(saved):
            module.weight.data = data
