"""Task grouping: tasks whose core regions overlap (Jaccard J ≥ τ) are joined; groups are connected components."""

from __future__ import annotations

import numpy as np

from ..tuners.core_isolation.config import validate_similarity_threshold


__all__ = ["connected_groups"]


def connected_groups(similarity: np.ndarray, tau: float) -> list[list[int]]:
    """Groups of tasks: connected components of the graph with an edge wherever `similarity[i, j] >= tau` (i ≠ j).

    Returns:
        `list[list[int]]`: Groups as sorted task indices, ordered by their smallest index.
    """
    tau = validate_similarity_threshold(tau, "similarity_threshold")
    sim = np.asarray(similarity)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"similarity must be a square matrix, got shape {sim.shape}")
    n = sim.shape[0]
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            if sim[i, j] >= tau:
                parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return sorted((sorted(g) for g in groups.values()), key=lambda g: g[0])
