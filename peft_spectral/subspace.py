"""Rank-fraction truncation and multi-subspace (projective clustering) truncation of a weight matrix.

Plain truncation (LASER) replaces `W` (`out × in`) by its best rank-`k` approximation `U_k diag(σ_k) V_kᵀ` with
`k = rank_for(ρ, min(out, in))`.

Multi-subspace truncation (Compress to Impress, after Maalouf et al., "Deep Learning Meets Projective Clustering",
ICLR 2021) treats the rows of `W` as points in `R^in` that may lie near several low-dimensional subspaces. The rows
are split into `c` clusters by alternating

1. *assign*: each row goes to the cluster whose current subspace leaves the smallest residual, and
2. *refit*: each cluster's subspace is the span of the top right singular vectors of its block,

starting from seeded k-means++-style local-subspace seeds on the normalised rows (several restarts, the best kept). Each cluster's block `W[rows_c]` is then replaced by its own
rank-`k_c` truncation, `k_c = rank_for(ρ, min(|rows_c|, in))`. With `c = 1` this is exactly plain truncation.

The result is kept in factored form: per cluster the row indices, `U_c diag(σ_c)` and `V_c`, so that
`W'[rows_c] = (U_c diag(σ_c)) V_cᵀ`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .linalg import thin_svd


__all__ = [
    "ClusterFactor",
    "check_rho",
    "cluster_rows",
    "multi_subspace_factors",
    "multi_subspace_truncate",
    "rank_for",
    "reconstruct",
    "truncation_factors",
]


@dataclass
class ClusterFactor:
    """The truncated factors of one row cluster.

    Attributes:
        rows (`torch.LongTensor`): Row indices of the cluster in the original matrix, shape `(n_c,)`, ascending.
        us (`torch.Tensor`): `U_c diag(σ_c)`, shape `(n_c, k_c)`.
        v (`torch.Tensor`): `V_c`, shape `(in, k_c)`.
    """

    rows: torch.Tensor
    us: torch.Tensor
    v: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.us.shape[1])


def check_rho(rho: float, name: str = "rho") -> float:
    """Validate a rank fraction: a number in `(0, 1]`. Returns it as `float`."""
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or not 0 < rho <= 1:
        raise ValueError(f"{name} must be a number in (0, 1] (the fraction of the rank kept), got {rho!r}")
    return float(rho)


def rank_for(rho: float, full_rank: int) -> int:
    """Number of singular triplets kept for rank fraction `rho`: `round(rho · full_rank)`, clamped to `[1, full_rank]`."""
    check_rho(rho)
    if full_rank < 1:
        raise ValueError(f"full_rank must be >= 1, got {full_rank}")
    return int(min(full_rank, max(1, math.floor(rho * full_rank + 0.5))))


def _seed_labels(x: torch.Tensor, clusters: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++-style seeding with local subspaces, on the normalised rows.

    Cluster j's seed is a row drawn with probability proportional to its squared residual w.r.t. the seeds so far
    (uniformly for the first); its subspace is spanned by the top `k` directions of that row and its `2k - 1`
    nearest rows by |cosine| (sign-invariant). Rows are then assigned to the seed subspace with smallest residual.
    """
    n = x.shape[0]
    xn = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    m = min(n, max(2 * k, 2))
    bases: list[torch.Tensor] = []
    for j in range(clusters):
        if j == 0:
            pick = int(torch.randint(n, (1,), generator=generator))
        else:
            res = _residuals(xn, bases).min(dim=1).values.clamp_min(0) + 1e-12
            pick = int(torch.multinomial(res, 1, generator=generator))
        neighbours = (xn @ xn[pick]).abs().topk(m).indices
        _, _, vh = torch.linalg.svd(xn[neighbours], full_matrices=False)
        bases.append(vh[: min(k, vh.shape[0])].T)
    return _residuals(xn, bases).argmin(dim=1)


def _subspace_bases(x: torch.Tensor, labels: torch.Tensor, clusters: int, rho: float) -> list[torch.Tensor | None]:
    bases: list[torch.Tensor | None] = []
    for j in range(clusters):
        block = x[labels == j]
        if len(block) == 0:
            bases.append(None)
            continue
        k = rank_for(rho, min(block.shape))
        _, _, vh = torch.linalg.svd(block, full_matrices=False)
        bases.append(vh[:k].T)  # (in, k)
    return bases


def _residuals(x: torch.Tensor, bases: list[torch.Tensor | None]) -> torch.Tensor:
    sq = (x * x).sum(dim=1)
    cols = []
    for basis in bases:
        if basis is None:
            cols.append(torch.full_like(sq, float("inf")))
        else:
            cols.append(sq - ((x @ basis) ** 2).sum(dim=1))
    return torch.stack(cols, dim=1)


def cluster_rows(
    weight: torch.Tensor, clusters: int, rho: float, *, seed: int = 0, n_iter: int = 10, n_init: int = 4
) -> torch.Tensor:
    """Projective clustering of the rows of `weight` into `clusters` groups for rank fraction `rho`.

    Args:
        weight (`torch.Tensor`): Matrix of shape `(out, in)`.
        clusters (`int`): Number of clusters `c >= 1` (at most `out`).
        rho (`float`): Rank fraction in `(0, 1]` used for each cluster's subspace.
        seed (`int`, defaults to 0): Seed of the k-means initialisation; the result is deterministic given it.
        n_iter (`int`, defaults to 10): Maximum number of assign/refit rounds.
        n_init (`int`, defaults to 4): Number of seeded restarts; the one with the smallest summed residual wins.

    Returns:
        `torch.LongTensor` of shape `(out,)`: cluster label of each row; every cluster is non-empty.
    """
    check_rho(rho)
    out = weight.shape[0]
    if not isinstance(clusters, int) or clusters < 1:
        raise ValueError(f"clusters must be a positive integer, got {clusters!r}")
    if clusters > out:
        raise ValueError(f"clusters ({clusters}) cannot exceed the number of rows ({out})")
    if clusters == 1:
        return torch.zeros(out, dtype=torch.long)
    x = weight.detach().to(torch.float32).cpu()
    generator = torch.Generator().manual_seed(seed)
    k_seed = rank_for(rho, min(max(1, out // clusters), x.shape[1]))
    best_labels, best_cost = None, float("inf")
    for _ in range(max(1, n_init)):
        labels, cost = _lloyd(x, _seed_labels(x, clusters, k_seed, generator), clusters, rho, n_iter)
        if best_labels is None or cost < best_cost:
            best_labels, best_cost = labels, cost
    return best_labels


def _lloyd(
    x: torch.Tensor, labels: torch.Tensor, clusters: int, rho: float, n_iter: int
) -> tuple[torch.Tensor, float]:
    """Alternate refit / reassign while the summed residual decreases; return the best labels and their cost."""
    best_labels, best_cost = None, float("inf")
    for _ in range(n_iter + 1):
        labels = _fill_empty(labels, x, clusters)
        res = _residuals(x, _subspace_bases(x, labels, clusters, rho))
        cost = float(res.gather(1, labels[:, None]).sum())
        if best_labels is None or cost < best_cost - 1e-9 * max(1.0, abs(best_cost)):
            best_labels, best_cost = labels.clone(), cost
        else:
            break
        new_labels = res.argmin(dim=1)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return best_labels, best_cost


def _fill_empty(labels: torch.Tensor, x: torch.Tensor, clusters: int) -> torch.Tensor:
    """Give every empty cluster one row (the row with the largest norm among the largest cluster's rows)."""
    labels = labels.clone()
    for j in range(clusters):
        if (labels == j).any():
            continue
        counts = torch.bincount(labels, minlength=clusters)
        donor = int(counts.argmax())
        members = (labels == donor).nonzero().squeeze(1)
        pick = members[x[members].norm(dim=1).argmax()]
        labels[pick] = j
    return labels


def truncation_factors(weight: torch.Tensor, rho: float, svd=None) -> list[ClusterFactor]:
    """Plain rank-fraction truncation as a single [`ClusterFactor`] (all rows).

    Args:
        weight (`torch.Tensor`): Matrix `(out, in)`.
        rho (`float`): Rank fraction in `(0, 1]`.
        svd (`tuple`, *optional*): Precomputed `(U, S, V)` from [`~peft_spectral.linalg.thin_svd`] (reused, no SVD).
    """
    u, s, v = svd if svd is not None else thin_svd(weight)
    k = rank_for(rho, min(weight.shape))
    rows = torch.arange(weight.shape[0])
    return [ClusterFactor(rows=rows, us=(u[:, :k] * s[:k]).contiguous(), v=v[:, :k].contiguous())]


def multi_subspace_factors(
    weight: torch.Tensor, rho: float, clusters: int = 1, *, seed: int = 0, n_iter: int = 10, svd=None
) -> list[ClusterFactor]:
    """Truncated factors of `weight` with its rows split into `clusters` subspaces.

    Args:
        weight (`torch.Tensor`): Matrix `(out, in)`.
        rho (`float`): Rank fraction in `(0, 1]`, applied to each cluster's block.
        clusters (`int`, defaults to 1): Number of row clusters; 1 is plain truncation.
        seed (`int`, defaults to 0): Clustering seed.
        n_iter (`int`, defaults to 10): Maximum clustering rounds.
        svd (`tuple`, *optional*): Precomputed `(U, S, V)` of `weight`, used when `clusters == 1`.

    Returns:
        `list[ClusterFactor]`, one per cluster, float32, on CPU.
    """
    check_rho(rho)
    if clusters == 1:
        return truncation_factors(weight, rho, svd=svd)
    labels = cluster_rows(weight, clusters, rho, seed=seed, n_iter=n_iter)
    factors = []
    for j in range(clusters):
        rows = (labels == j).nonzero().squeeze(1)
        block = weight.detach()[rows.to(weight.device)]
        k = rank_for(rho, min(block.shape))
        u, s, v = thin_svd(block, k)
        factors.append(ClusterFactor(rows=rows.cpu(), us=(u * s).cpu().contiguous(), v=v.cpu().contiguous()))
    return factors


def reconstruct(factors: list[ClusterFactor], shape: tuple[int, int]) -> torch.Tensor:
    """Dense matrix of shape `shape` from cluster factors (float32)."""
    out = torch.zeros(shape, dtype=factors[0].us.dtype, device=factors[0].us.device)
    for f in factors:
        out[f.rows.to(out.device)] = f.us @ f.v.T
    return out


def multi_subspace_truncate(weight: torch.Tensor, rho: float, clusters: int = 1, *, seed: int = 0) -> torch.Tensor:
    """Dense multi-subspace truncation of `weight`, in its dtype."""
    factors = multi_subspace_factors(weight, rho, clusters, seed=seed)
    return reconstruct(factors, tuple(weight.shape)).to(device=weight.device, dtype=weight.dtype)
