"""Spectral factors of layer weights (the package's one SVD implementation) and their trusted on-disk cache.

For a weight `W` of shape `(out, in)` with `m = min(out, in)`, the factors kept are the singular values `S` (length
`m`, descending) and the singular vectors of the *smaller* side, `Q` (`m × m`): the right singular vectors `V` when
`in <= out`, the left ones `U` otherwise. That is all SVF needs, because for a square orthogonal `Q`

    U diag(σ ⊙ s) Vᵀ = W · V diag(s) Vᵀ        (in <= out)
    U diag(σ ⊙ s) Vᵀ = U diag(s) Uᵀ · W        (out < in)

and it is the smaller half of a full SVD (for SmolLM2's MLP, 0.375× the weight instead of 1.375×). The other half is
recovered when needed by [`svd_from_factors`] (`U = W V / σ` or `V = Wᵀ U / σ`), and any truncation is recovered the
same way: `W V_k V_kᵀ` is the best rank-k approximation. [`~peft_spectral.linalg.thin_svd`] and SpectralCompress's
SVDs are built on these two functions.

Factors are computed in float64 on the weight's device (on the CPU for Apple's MPS, which has no float64) from the
eigen-decomposition of the `m × m` Gram matrix, returned in float32 on the weight's device, and stored on disk as CPU
tensors, whatever the weight's dtype (float32, bfloat16, float16) or device. A weight with NaN or inf values is
refused with a `ValueError` naming it.

The cache holds one safetensors file per weight, named by an xxh3-128 hash of the weight's bytes, shape and dtype.
Each file's metadata holds that weight hash and a digest of its own tensors (xxh3-128 over the shapes, dtypes and
bytes of `S` and `Q`). An entry is used only when the format, the weight hash, the digest, the shapes and dtypes all
match, its values are finite and a probe holds (for 16 fresh Gaussian probes `R`, `(Q R)ᵀ(Q R) = RᵀR` and
`(W Q R)ᵀ(W Q R) = Rᵀ diag(S²) R` to 1e-6, which catches two swapped columns of `Q` whenever their `σ²` differ by more
than 1e-6 of `Σσ²`); otherwise it is ignored with an [`SVDCacheWarning`] naming the file, recomputed and rewritten. Writes are atomic
(temporary file + `os.replace`). A cache directory that cannot be written degrades to computing in memory, with one
warning per directory and process. The digests detect corruption and edits; they are not signatures: whoever can
write to the cache directory can also write entries that pass them, so the cache directory must be the user's own
(see "Trusted caches" in the SVF guide).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, Optional, Union

import torch
import xxhash
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .paths import svd_cache_dir


logger = logging.getLogger(__name__)

#: Version of the file contents (tensors and metadata). Entries of another version are recomputed and rewritten.
CACHE_FORMAT_VERSION = "2"
# Version mixed into the weight hash, i.e. the file names; kept stable so that entries of an older format are found
# and overwritten instead of left behind.
_WEIGHT_KEY_VERSION = "1"
#: Gaussian probe vectors drawn for each cache read ([`SVDCache._probe_ok`]).
PROBE_VECTORS = 16
#: Largest relative Frobenius error of the probe's Gram matrices for an entry to be used.
PROBE_TOLERANCE = 1e-6

Side = Literal["right", "left"]

__all__ = [
    "CACHE_FORMAT_VERSION",
    "SVDCache",
    "SVDCacheWarning",
    "SpectralFactors",
    "compute_factors",
    "factors_digest",
    "side_for_shape",
    "svd_from_factors",
    "tensor_bytes",
    "weight_hash",
]


class SVDCacheWarning(UserWarning):
    """An SVD cache entry was rejected (corrupt, edited, not finite) or the cache directory cannot be used."""


@dataclass
class SpectralFactors:
    """Singular values and the smaller side's singular vectors of one weight.

    Attributes:
        S (`torch.Tensor`): Singular values, shape `(m,)`, descending, float32.
        Q (`torch.Tensor`): Singular vectors of the smaller side, shape `(m, m)`, one per column, float32.
        side (`str`): `"right"` when `Q = V` (`in <= out`), `"left"` when `Q = U` (`out < in`).
        weight_hash (`str`): [`weight_hash`] of the weight the factors were computed from.
    """

    S: torch.Tensor
    Q: torch.Tensor
    side: Side
    weight_hash: str


def side_for_shape(out_features: int, in_features: int) -> Side:
    """Which side's singular vectors are the smaller matrix for a weight of shape `(out, in)`.

    Args:
        out_features (`int`): Rows of the weight.
        in_features (`int`): Columns of the weight.
    """
    return "right" if in_features <= out_features else "left"


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (copied to the CPU if needed), for hashing; works for dtypes numpy lacks."""
    t = tensor.detach().contiguous().cpu()
    if t.dim() == 0:
        t = t.reshape(1)
    return t.view(torch.uint8).numpy().data


def weight_hash(weight: torch.Tensor) -> str:
    """xxh3-128 hash (hex) of a weight's values, shape and dtype: the name of its cache entry.

    Args:
        weight (`torch.Tensor`): The weight, on any device, in any dtype.
    """
    h = xxhash.xxh3_128()
    h.update(f"{tuple(weight.shape)}|{weight.dtype}|v{_WEIGHT_KEY_VERSION}".encode())
    h.update(tensor_bytes(weight))
    return h.hexdigest()


def factors_digest(S: torch.Tensor, Q: torch.Tensor, side: str) -> str:
    """xxh3-128 digest (hex) of a cache entry's own tensors: shapes, dtypes and bytes of `S` and `Q`, and the side.

    Args:
        S (`torch.Tensor`): Singular values.
        Q (`torch.Tensor`): Singular vectors of the smaller side.
        side (`str`): `"right"` or `"left"`.
    """
    h = xxhash.xxh3_128()
    h.update(f"S{tuple(S.shape)}{S.dtype}|Q{tuple(Q.shape)}{Q.dtype}|{side}|v{CACHE_FORMAT_VERSION}".encode())
    h.update(tensor_bytes(S))
    h.update(tensor_bytes(Q))
    return h.hexdigest()


def _compute_device(weight: torch.Tensor) -> torch.device:
    """The weight's device, unless it cannot compute in float64 (MPS): then the CPU."""
    return torch.device("cpu") if weight.device.type == "mps" else weight.device


def _describe(name: Optional[str], weight: torch.Tensor) -> str:
    label = f"weight {name!r}" if name else "weight"
    return f"{label} of shape {tuple(weight.shape)}"


def compute_factors(
    weight: torch.Tensor, digest: Optional[str] = None, *, name: Optional[str] = None
) -> SpectralFactors:
    """Compute the [`SpectralFactors`] of a 2-D weight `(out, in)`: float64 on the weight's device, float32 out.

    Args:
        weight (`torch.Tensor`): The weight matrix, `(out, in)` orientation (transpose `Conv1D` weights first), in any
            floating dtype.
        digest (`str`, *optional*): Its [`weight_hash`], if already known.
        name (`str`, *optional*): The weight's name (e.g. the module's), used in error messages.

    Returns:
        [`SpectralFactors`] with `S` and `Q` in float32 on the weight's device.

    Raises:
        `ValueError`: If `weight` is not 2-D or has NaN/inf values.
    """
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight `(out, in)`, got the {_describe(name, weight)}")
    if not bool(torch.isfinite(weight.detach()).all()):
        raise ValueError(
            f"{_describe(name, weight)} has NaN or inf values: its SVD is undefined. Check the checkpoint it was "
            "loaded from (or the training step that produced it)."
        )
    out_f, in_f = weight.shape
    side = side_for_shape(out_f, in_f)
    w = weight.detach().to(device=_compute_device(weight), dtype=torch.float64)
    gram = w.T @ w if side == "right" else w @ w.T
    evals, evecs = torch.linalg.eigh(gram)
    order = torch.argsort(evals, descending=True)
    s = evals[order].clamp_min(0).sqrt()
    q = evecs[:, order]
    return SpectralFactors(
        S=s.to(device=weight.device, dtype=torch.float32).contiguous(),
        Q=q.to(device=weight.device, dtype=torch.float32).contiguous(),
        side=side,
        weight_hash=digest or weight_hash(weight),
    )


def svd_from_factors(
    weight: torch.Tensor, factors: SpectralFactors, rank: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD `weight = U diag(S) Vᵀ` from its [`SpectralFactors`]: the other side is `W V / σ` or `Wᵀ U / σ`.

    Computed in float64, returned in float32 on the weight's device. Singular vectors whose singular value is at the
    noise level of the Gram matrix (`σ ≤ σ₁ · 10 · sqrt(m · ε₆₄)`) cannot be recovered by that division; they are
    replaced by an orthonormal completion, so `U` and `V` always have orthonormal columns (the product changes by no
    more than those tiny singular values).

    Args:
        weight (`torch.Tensor`): The weight `(out, in)` the factors were computed from.
        factors ([`SpectralFactors`]): Its factors, e.g. from [`compute_factors`] or [`SVDCache.get`].
        rank (`int`, *optional*): Keep only the top `rank` singular triplets (all `m` when `None` or larger).

    Returns:
        `(U, S, V)` with shapes `(out, r)`, `(r,)`, `(in, r)` (note: `V`, not `V.T`), singular values descending.
    """
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    m = min(weight.shape)
    if tuple(factors.S.shape) != (m,) or tuple(factors.Q.shape) != (m, m):
        raise ValueError(
            f"factors S{tuple(factors.S.shape)}, Q{tuple(factors.Q.shape)} do not fit a weight of shape "
            f"{tuple(weight.shape)}"
        )
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive integer or None, got {rank!r}")
    r = m if rank is None else min(rank, m)
    device = _compute_device(weight)
    w = weight.detach().to(device=device, dtype=torch.float64)
    s = factors.S[:r].to(device=device, dtype=torch.float64)
    q = factors.Q[:, :r].to(device=device, dtype=torch.float64)
    other = (w @ q) if factors.side == "right" else (w.T @ q)
    sigma_1 = float(factors.S[0]) if m else 0.0
    floor = sigma_1 * 10.0 * (m * torch.finfo(torch.float64).eps) ** 0.5
    good = int((s > floor).sum()) if sigma_1 > 0 else 0
    other[:, :good] /= s[:good]
    if good < r:  # null-space directions: complete with orthonormal vectors orthogonal to the recovered ones
        gen = torch.Generator().manual_seed(0)
        fill = torch.randn(other.shape[0], r - good, generator=gen, dtype=torch.float64).to(device)
        basis, _ = torch.linalg.qr(torch.cat([other[:, :good], fill], dim=1))
        other[:, good:] = basis[:, good:r]
    u, v = (other, q) if factors.side == "right" else (q, other)
    out_device = weight.device
    return (
        u.to(out_device, torch.float32).contiguous(),
        s.to(out_device, torch.float32).contiguous(),
        v.to(out_device, torch.float32).contiguous(),
    )


class SVDCache:
    """On-disk cache of [`SpectralFactors`], one safetensors file per weight, checked on every read.

    The directory comes only from the caller: `cache_dir`, else `$PEFT_SPECTRAL_SVD_CACHE`, else
    `$PEFT_SPECTRAL_CACHE/svd` (see [`peft_spectral.paths.svd_cache_dir`]); it is created on the first write.

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*): Directory of the cache.
        enabled (`bool`, defaults to `True`): When `False`, factors are always computed in memory and the disk is
            never touched (nothing read, created or written).

    Attributes:
        hits (`int`): Entries read and accepted.
        misses (`int`): Factors computed.
        stale (`int`): Entries found but rejected (older format, unreadable, edited, not finite, not matching).
    """

    _warned_dirs: ClassVar[set[str]] = set()

    def __init__(self, cache_dir: Optional[Union[str, os.PathLike]] = None, enabled: bool = True):
        self.cache_dir = svd_cache_dir(cache_dir)
        self.enabled = enabled
        self.hits = 0
        self.misses = 0
        self.stale = 0
        self._writable = True

    def path_for(self, digest: str) -> Path:
        """The file of the entry whose [`weight_hash`] is `digest`.

        Args:
            digest (`str`): A [`weight_hash`].
        """
        return self.cache_dir / f"{digest}.safetensors"

    def get(self, weight: torch.Tensor, name: Optional[str] = None) -> SpectralFactors:
        """The factors of `weight`: from the cache when a valid entry exists, else computed (and stored).

        Args:
            weight (`torch.Tensor`): The weight `(out, in)`.
            name (`str`, *optional*): Its name, for messages.

        Returns:
            [`SpectralFactors`] on the weight's device.
        """
        digest = weight_hash(weight)
        cached = self._load(digest, weight) if self.enabled else None
        if cached is not None:
            self.hits += 1
            return cached
        return self._compute_and_store(weight, digest, name)

    def get_many(
        self, weights: Iterable[tuple[str, torch.Tensor]], *, desc: str = "SVD", progress: bool = True
    ) -> dict[str, SpectralFactors]:
        """Factors for several named weights, with a progress bar over the ones that must be computed.

        Args:
            weights (`Iterable[tuple[str, torch.Tensor]]`): `(name, weight)` pairs.
            desc (`str`, defaults to `"SVD"`): Progress bar label.
            progress (`bool`, defaults to `True`): Show the progress bar.

        Returns:
            `dict[str, SpectralFactors]` keyed by name.
        """
        out: dict[str, SpectralFactors] = {}
        todo = []
        for name, w in weights:
            digest = weight_hash(w)
            cached = self._load(digest, w) if self.enabled else None
            if cached is not None:
                self.hits += 1
                out[name] = cached
            else:
                todo.append((name, w, digest))
        for name, w, digest in tqdm(todo, desc=desc, disable=not progress or not todo, leave=False):
            out[name] = self._compute_and_store(w, digest, name)
        return out

    # ------------------------------------------------------------------ internals

    def _compute_and_store(self, weight: torch.Tensor, digest: str, name: Optional[str]) -> SpectralFactors:
        self.misses += 1
        factors = compute_factors(weight, digest, name=name)
        if self.enabled and self._writable:
            self._store(factors)
        return factors

    def _warn_once(self, message: str) -> None:
        key = str(self.cache_dir)
        if key not in SVDCache._warned_dirs:
            SVDCache._warned_dirs.add(key)
            warnings.warn(message, SVDCacheWarning, stacklevel=4)

    def _reject(self, path: Path, reason: str) -> None:
        self.stale += 1
        warnings.warn(
            f"SVD cache entry {path} {reason}; it is ignored, recomputed and rewritten.", SVDCacheWarning, stacklevel=4
        )

    def _load(self, digest: str, weight: torch.Tensor) -> Optional[SpectralFactors]:
        path = self.path_for(digest)
        try:
            if not path.is_file():
                return None
        except OSError as err:  # e.g. a directory we may not list
            self._warn_once(f"SVD cache directory {self.cache_dir} cannot be read ({err}); computing in memory.")
            return None
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                keys = set(f.keys())
                tensors = {k: f.get_tensor(k) for k in keys} if keys == {"S", "Q"} else {}
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            self._reject(path, f"is unreadable ({err})")
            return None
        if meta.get("format") != CACHE_FORMAT_VERSION:
            logger.info("SVD cache entry %s has format %r; recomputing.", path, meta.get("format"))
            self.stale += 1
            return None
        reason = self._problem(meta, tensors, digest, weight)
        if reason is not None:
            self._reject(path, reason)
            return None
        s, q = tensors["S"].to(weight.device), tensors["Q"].to(weight.device)
        side = side_for_shape(*weight.shape)
        if not self._probe_ok(weight, s, q, side):
            self._reject(
                path, "does not match its weight (the probe finds (W Q)ᵀ(W Q) ≠ diag(S²) or Q not orthogonal)"
            )
            return None
        return SpectralFactors(S=s, Q=q, side=side, weight_hash=digest)

    @staticmethod
    def _problem(meta: dict, tensors: dict, digest: str, weight: torch.Tensor) -> Optional[str]:
        """Why an entry read from disk cannot be used for `weight`, or `None` when its metadata and tensors check out."""
        out_f, in_f = weight.shape
        side = side_for_shape(out_f, in_f)
        m = min(out_f, in_f)
        if set(tensors) != {"S", "Q"}:
            return "does not hold exactly the tensors S and Q"
        s, q = tensors["S"], tensors["Q"]
        if meta.get("weight_hash") != digest:
            return "was written for another weight (weight hash in its metadata differs from its name)"
        if meta.get("side") != side or s.dtype != torch.float32 or q.dtype != torch.float32:
            return "has the wrong side or dtype"
        if tuple(s.shape) != (m,) or tuple(q.shape) != (m, m):
            return f"has shapes S{tuple(s.shape)}, Q{tuple(q.shape)}, not ({m},), ({m}, {m})"
        if meta.get("digest") != factors_digest(s, q, side):
            return "was modified (digest of S and Q does not match)"
        # Finite values need no pass of their own: only finite factors are written, and NaN/inf in an entry with a
        # matching digest would make the probe fail.
        return None

    @staticmethod
    def _probe_ok(weight: torch.Tensor, s: torch.Tensor, q: torch.Tensor, side: Side) -> bool:
        """Whether `(S, Q)` is an SVD of the weight, tested with [`PROBE_VECTORS`] fresh Gaussian probes.

        For a probe block `R` (`m × k`), `X = Q R` and `Y = W X` (or `Wᵀ X`) must satisfy `XᵀX = RᵀR` (orthonormal
        `Q`) and `YᵀY = Rᵀ diag(S²) R` (`(W Q)ᵀ(W Q) = diag(S²)`), each to a relative Frobenius error of
        [`PROBE_TOLERANCE`], computed in float64. An honest entry is off by about 1e-8 (float32 factors). Two swapped
        columns `i, j` of `Q` give an error of about `|σ_i² - σ_j²| / Σσ²` times 1.6 or more, so the swap is caught
        whenever `|σ_i² - σ_j²| > 1e-6 · Σσ²`. The probes come from the operating system's randomness on every read
        (never torch's global generator), so an edit cannot be fitted to them. NaN or inf anywhere fails.
        """
        device = _compute_device(weight)
        m = len(s)
        seed = int.from_bytes(os.urandom(8), "little") & (2**63 - 1)
        r = torch.randn(m, PROBE_VECTORS, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        r = r.to(device)
        s = s.to(device=device, dtype=torch.float64)
        x = q.to(device=device, dtype=torch.float64) @ r
        w = weight.detach()
        # float64 in row blocks: a float64 copy of a large weight would cost 8 bytes per entry at once
        rows = max(1, (1 << 22) // max(1, w.shape[1]))
        if side == "right":
            y = torch.cat([w[i : i + rows].to(device, torch.float64) @ x for i in range(0, w.shape[0], rows)])
        else:
            y = sum(w[i : i + rows].to(device, torch.float64).T @ x[i : i + rows] for i in range(0, w.shape[0], rows))
        checks = ((x.T @ x, r.T @ r), (y.T @ y, r.T @ (s[:, None] ** 2 * r)))
        for got, want in checks:
            scale = float(torch.linalg.matrix_norm(want))
            error = float(torch.linalg.matrix_norm(got - want))
            if not error <= PROBE_TOLERANCE * scale + 1e-30:  # `not <=`: NaN fails
                return False
        return True

    def _store(self, factors: SpectralFactors) -> None:
        s = factors.S.detach().to("cpu", torch.float32).contiguous()
        q = factors.Q.detach().to("cpu", torch.float32).contiguous()
        if not (bool(torch.isfinite(s).all()) and bool(torch.isfinite(q).all())):
            logger.warning("not caching non-finite SVD factors of weight %s", factors.weight_hash)
            return
        metadata = {
            "format": CACHE_FORMAT_VERSION,
            "weight_hash": factors.weight_hash,
            "side": factors.side,
            "digest": factors_digest(s, q, factors.side),
        }
        tmp = None
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.cache_dir, suffix=".tmp")
            os.close(fd)
            save_file({"S": s, "Q": q}, tmp, metadata=metadata)
            os.replace(tmp, self.path_for(factors.weight_hash))
            tmp = None
        except (OSError, SafetensorError) as err:  # a read-only or full disk must not break training
            self._writable = False
            self._warn_once(
                f"SVD cache directory {self.cache_dir} cannot be written ({err}); SVD factors are computed in memory "
                "and not cached. Set $PEFT_SPECTRAL_SVD_CACHE (or $PEFT_SPECTRAL_CACHE) to a writable directory."
            )
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
