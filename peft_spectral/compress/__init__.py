"""Compress to Impress (C2I) search and the LASER exhaustive baseline.

Both searches choose *interventions* — (weight matrix, rank fraction ρ, number of row clusters) — that replace a
weight by its low-rank truncation (see [`peft_spectral.subspace`]) and help a task. Their result becomes an ordinary
[`SpectralCompressConfig`] adapter ([`SearchResult.to_config`], [`apply_result`]).

LASER (Sharma et al., 2023)
    evaluates every candidate of the grid (layers × matrix types × ρ) on a validation split and keeps the best one
    if it beats the unmodified model. [`laser_search`] is resumable from a JSON state file (fingerprinted by the
    model's weights, the candidates, the validation examples and the scoring settings) and shows a progress bar.

C2I (arXiv 2510.20800)
    replaces most of that search by one gradient pass: forward and backward on N calibration examples (default
    100) with the task loss `L` (the gold answer's mean NLL), no optimiser step. For each candidate matrix
    `W = U diag(σ) Vᵀ` the singular-value gradients are `g_i = ∂L/∂σ_i = u_iᵀ (∂L/∂W) v_i` (no
    reparametrisation needed). Truncating to rank `k` sets `σ_i → 0` for `i > k`, so to first order

        ΔL_k ≈ −Σ_{i>k} σ_i g_i      ("first_order", the default)

    and the seed's rule — reduce the matrices whose dropped singular values have large positive loss gradients
    (large negative gradients of the task score) — is `−Σ_{i>k} g_i` ("raw"). Candidates are ranked by the score
    (most negative = most promising), the top ones are evaluated on N_eval examples (default 100) and kept only if
    their gain over the unmodified model is beyond noise ([`SelectionGuard`]: paired bootstrap of per-example
    correctness and answer margin, balanced over labels when they are unbalanced); kept ones can be combined
    greedily. Two modes after the paper: `"standard"` (100 gradients, plain truncation, evaluated on the standard
    validation split) and `"clustered"` (100 gradients, multi-subspace truncation, 100 evaluation examples).
    In clustered mode the ranking is the plain-truncation score of the same (matrix, ρ); the clustered truncation
    is what gets evaluated and kept.

Modules: [`candidates`] (interventions, grid, examples), [`weights`] (SVDs, truncations), [`scoring`] (the gradient
pass), [`selection`] (the guard), [`search`] (C2I), [`laser`] (LASER), [`results`] (evaluations and results),
[`planted`] (a problem with a known answer, for tests and demos), [`distributed`] (sharing the work across
`accelerate launch` processes).
"""

from ..subspace import rank_for
from .candidates import LASER_RHOS, MATRIX_TYPES, Intervention, candidate_grid, find_target_modules, take_examples
from .laser import laser_fingerprint, laser_search
from .planted import PlantedProblem, planted_problem, random_choice_examples
from .results import EvalFn, EvalSummary, LossFn, ScoredCandidate, SearchResult, apply_result, default_eval_fn
from .scoring import (
    C2IScores,
    GradientPass,
    c2i_scores,
    gradient_pass,
    score_candidates,
    singular_value_gradients,
    target_nll,
)
from .search import C2ISearchConfig, c2i_search, compress_to_impress
from .selection import (
    PAPER_N_EVAL,
    SelectionDecision,
    SelectionGuard,
    answer_classes,
    is_imbalanced,
    paired_bootstrap_gain,
)
from .weights import TruncationCache, apply_interventions, compute_svds


__all__ = [
    "LASER_RHOS",
    "MATRIX_TYPES",
    "PAPER_N_EVAL",
    "C2IScores",
    "C2ISearchConfig",
    "EvalFn",
    "EvalSummary",
    "GradientPass",
    "Intervention",
    "LossFn",
    "PlantedProblem",
    "ScoredCandidate",
    "SearchResult",
    "SelectionDecision",
    "SelectionGuard",
    "TruncationCache",
    "answer_classes",
    "apply_interventions",
    "apply_result",
    "c2i_scores",
    "c2i_search",
    "candidate_grid",
    "compress_to_impress",
    "compute_svds",
    "default_eval_fn",
    "find_target_modules",
    "gradient_pass",
    "is_imbalanced",
    "laser_fingerprint",
    "laser_search",
    "paired_bootstrap_gain",
    "planted_problem",
    "random_choice_examples",
    "rank_for",
    "score_candidates",
    "singular_value_gradients",
    "take_examples",
    "target_nll",
]
