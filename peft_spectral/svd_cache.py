"""Spectral factors of layer weights and their on-disk cache.

For a weight `W` of shape `(out, in)` with `m = min(out, in)`, the factors kept are the singular values `S` (length
`m`, descending) and the singular vectors of the *smaller* side, `Q` (`m × m`): the right singular vectors `V` when
`in <= out`, the left ones `U` otherwise. That is all SVF needs, because for a square orthogonal `Q`

    U diag(σ ⊙ s) Vᵀ = W · V diag(s) Vᵀ        (in <= out)
    U diag(σ ⊙ s) Vᵀ = U diag(s) Uᵀ · W        (out < in)

and it is the smaller half of a full SVD (for SmolLM2's MLP, 0.375× the weight instead of 1.375×). Any truncation is
recovered the same way: `W V_k V_kᵀ` is the best rank-k approximation.

Factors are computed in float64 from the eigen-decomposition of the `m × m` Gram matrix and stored in float32.

The cache holds one safetensors file per weight, named by an xxh3-128 hash of the weight's bytes, shape and dtype. On
load the hash in the file's metadata must match, the shapes must fit, and a probe must hold (`‖W q₁‖ = σ₁` for the top singular
vector); otherwise the entry is stale or corrupt and is recomputed, never used.
Writes are atomic (temporary file + `os.replace`).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import xxhash
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .paths import cache_subdir


logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = "1"
Side = Literal["right", "left"]


@dataclass
class SpectralFactors:
    """Singular values and the smaller side's singular vectors of one weight.

    Attributes:
        S (`torch.Tensor`): Singular values, shape `(m,)`, descending, float32.
        Q (`torch.Tensor`): Singular vectors of the smaller side, shape `(m, m)`, one per column, float32.
        side (`str`): `"right"` when `Q = V` (`in <= out`), `"left"` when `Q = U` (`out < in`).
        weight_hash (`str`): Hash of the weight the factors were computed from.
    """

    S: torch.Tensor
    Q: torch.Tensor
    side: Side
    weight_hash: str


def side_for_shape(out_features: int, in_features: int) -> Side:
    """Which side's singular vectors are the smaller matrix for a weight of shape `(out, in)`."""
    return "right" if in_features <= out_features else "left"


def weight_hash(weight: torch.Tensor) -> str:
    """xxh3-128 hash of a weight's values, shape and dtype (hex)."""
    w = weight.detach().contiguous().cpu()
    h = xxhash.xxh3_128()
    h.update(f"{tuple(w.shape)}|{w.dtype}|v{CACHE_FORMAT_VERSION}".encode())
    if w.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the raw bits
        w = w.view(torch.int16)
    h.update(w.numpy().data)
    return h.hexdigest()


def compute_factors(weight: torch.Tensor, digest: Optional[str] = None) -> SpectralFactors:
    """Compute [`SpectralFactors`] of a 2-D weight `(out, in)` in float64.

    Args:
        weight (`torch.Tensor`): The weight matrix, `(out, in)` orientation (transpose `Conv1D` weights first).
        digest (`str`, *optional*): Its [`weight_hash`], if already known.
    """
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    side = side_for_shape(out_f, in_f)
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    gram = w.T @ w if side == "right" else w @ w.T
    evals, evecs = torch.linalg.eigh(gram)
    order = torch.argsort(evals, descending=True)
    s = evals[order].clamp_min(0).sqrt()
    q = evecs[:, order]
    return SpectralFactors(
        S=s.float().contiguous(), Q=q.float().contiguous(), side=side, weight_hash=digest or weight_hash(weight)
    )


class SVDCache:
    """On-disk cache of [`SpectralFactors`], one safetensors file per weight.

    Args:
        cache_dir (`str` or `Path`, *optional*): Directory of the cache. Defaults to `$PEFT_SPECTRAL_SVD_CACHE`, else
            `<peft_spectral cache>/svd` (see [`peft_spectral.paths.cache_root`]).
        enabled (`bool`): When `False`, factors are always computed and nothing is written.
    """

    def __init__(self, cache_dir: Optional[str | os.PathLike] = None, enabled: bool = True):
        env = os.environ.get("PEFT_SPECTRAL_SVD_CACHE")
        if cache_dir is None:
            cache_dir = env or cache_subdir("svd")
        self.cache_dir = Path(cache_dir).expanduser()
        self.enabled = enabled
        self.hits = 0
        self.misses = 0
        self.stale = 0

    def path_for(self, digest: str) -> Path:
        return self.cache_dir / f"{digest}.safetensors"

    def get(self, weight: torch.Tensor) -> SpectralFactors:
        """Return the factors of `weight`, from the cache when a valid entry exists, else computed (and stored)."""
        digest = weight_hash(weight)
        if self.enabled:
            cached = self._load(digest, weight)
            if cached is not None:
                self.hits += 1
                return cached
        self.misses += 1
        factors = compute_factors(weight, digest)
        if self.enabled:
            self._store(factors)
        return factors

    def get_many(
        self, weights: Iterable[tuple[str, torch.Tensor]], *, desc: str = "SVD", progress: bool = True
    ) -> dict[str, SpectralFactors]:
        """Factors for several named weights, with a progress bar over the ones that must be computed."""
        items = list(weights)
        out: dict[str, SpectralFactors] = {}
        todo = []
        for name, w in items:
            digest = weight_hash(w)
            cached = self._load(digest, w) if self.enabled else None
            if cached is not None:
                self.hits += 1
                out[name] = cached
            else:
                todo.append((name, w, digest))
        for name, w, digest in tqdm(todo, desc=desc, disable=not progress or not todo, leave=False):
            self.misses += 1
            out[name] = compute_factors(w, digest)
            if self.enabled:
                self._store(out[name])
        return out

    def _load(self, digest: str, weight: torch.Tensor) -> Optional[SpectralFactors]:
        path = self.path_for(digest)
        if not path.exists():
            return None
        try:
            tensors = load_file(str(path))
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as err:
            logger.warning("SVD cache entry %s is unreadable (%s); recomputing.", path, err)
            self.stale += 1
            return None
        out_f, in_f = weight.shape
        side = side_for_shape(out_f, in_f)
        m = min(out_f, in_f)
        ok = (
            meta.get("weight_hash") == digest
            and meta.get("format") == CACHE_FORMAT_VERSION
            and meta.get("side") == side
            and set(tensors) == {"S", "Q"}
            and tuple(tensors["S"].shape) == (m,)
            and tuple(tensors["Q"].shape) == (m, m)
            and self._probe_ok(weight, tensors["S"], tensors["Q"], side)
        )
        if not ok:
            logger.warning("SVD cache entry %s does not match its weight; recomputing.", path)
            self.stale += 1
            return None
        return SpectralFactors(S=tensors["S"], Q=tensors["Q"], side=side, weight_hash=digest)

    @staticmethod
    def _probe_ok(weight: torch.Tensor, s: torch.Tensor, q: torch.Tensor, side: Side) -> bool:
        """Cheap consistency check: for the top singular vector q₁, ‖W q₁‖ (or ‖Wᵀ q₁‖) must equal σ₁."""
        w = weight.detach().float().cpu()
        col = q[:, 0]
        norm = (w @ col).norm() if side == "right" else (w.T @ col).norm()
        return bool(torch.isfinite(s).all()) and bool(torch.isclose(norm, s[0], rtol=1e-3, atol=1e-6))

    def _store(self, factors: SpectralFactors) -> None:
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.cache_dir, suffix=".tmp")
            os.close(fd)
            save_file(
                {"S": factors.S.contiguous(), "Q": factors.Q.contiguous()},
                tmp,
                metadata={"weight_hash": factors.weight_hash, "side": factors.side, "format": CACHE_FORMAT_VERSION},
            )
            os.replace(tmp, self.path_for(factors.weight_hash))
        except OSError as err:  # a read-only or full disk must not break training
            logger.warning("could not write SVD cache entry to %s: %s", self.cache_dir, err)
