"""Compress to Impress (C2I) search and the LASER exhaustive baseline.

Both searches choose *interventions* — (weight matrix, rank fraction ρ, number of row clusters) — that replace a
weight by its low-rank truncation (see [`peft_spectral.subspace`]) and help a task. Their result becomes an ordinary
[`SpectralCompressConfig`] adapter ([`SearchResult.to_config`], [`apply_result`]).

LASER (Sharma et al., 2023)
    evaluates every candidate of the grid (layers × matrix types × ρ) on a validation split and keeps the best one
    if it beats the unmodified model. [`laser_search`] is resumable from a JSON state file and shows a progress bar
    with an ETA.

C2I (arXiv 2510.20800)
    replaces most of that search by one gradient pass: forward and backward on N calibration examples (default
    100) with the task loss `L` (the gold answer's mean NLL), no optimiser step. For each candidate matrix
    `W = U diag(σ) Vᵀ` the singular-value gradients are `g_i = ∂L/∂σ_i = u_iᵀ (∂L/∂W) v_i` (no
    reparametrisation needed). Truncating to rank `k` sets `σ_i → 0` for `i > k`, so to first order

        ΔL_k ≈ −Σ_{i>k} σ_i g_i      ("first_order", the default)

    and the seed's rule — reduce the matrices whose dropped singular values have large positive loss gradients
    (large negative gradients of the task score) — is `−Σ_{i>k} g_i` ("raw"). Candidates are ranked by the score
    (most negative = most promising), the top ones are evaluated on N_eval examples and kept only if they beat the
    unmodified model (accuracy, ties broken by mean log-likelihood); kept ones can be combined greedily.
    Two modes after the paper: `"standard"` (100 gradients, plain truncation, evaluated on the standard
    validation split) and `"clustered"` (100 gradients, multi-subspace truncation, 100 evaluation examples).
    In clustered mode the ranking is the plain-truncation score of the same (matrix, ρ); the clustered truncation
    is what gets evaluated and kept.

Memory: the gradient pass keeps only the SVD factors of the candidate matrices; each weight's gradient is turned
into its `g` by a post-accumulate-grad hook as soon as it is ready and then freed, so no two full gradients need to
be alive at once beyond what autograd itself holds.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .linalg import thin_svd
from .subspace import check_rho, multi_subspace_factors, rank_for, reconstruct
from .tasks import Example, Task


logger = logging.getLogger(__name__)

__all__ = [
    "LASER_RHOS",
    "MATRIX_TYPES",
    "C2IScores",
    "EvalSummary",
    "Intervention",
    "ScoredCandidate",
    "SearchResult",
    "apply_interventions",
    "apply_result",
    "c2i_scores",
    "c2i_search",
    "candidate_grid",
    "compress_to_impress",
    "compute_svds",
    "find_target_modules",
    "laser_search",
    "score_candidates",
    "singular_value_gradients",
    "take_examples",
]

#: The matrix types of a Llama-style decoder layer.
MATRIX_TYPES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: LASER's rank fractions.
LASER_RHOS: tuple[float, ...] = (0.9, 0.8, 0.6, 0.2, 0.1, 0.05, 0.01)

_LAYER_RE = re.compile(r"\.(\d+)\.")

EvalFn = Callable[[nn.Module, Sequence[Example]], "EvalSummary"]
LossFn = Callable[[nn.Module, Sequence[Example]], torch.Tensor]


# --------------------------------------------------------------------------------------------------------------------
# Candidates
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Intervention:
    """Replace the weight of `module` by its truncation to rank fraction `rho` with `clusters` row clusters."""

    module: str
    rho: float
    clusters: int = 1

    def __post_init__(self):
        check_rho(self.rho)
        if not isinstance(self.clusters, int) or self.clusters < 1:
            raise ValueError(f"clusters must be a positive integer, got {self.clusters!r}")

    @property
    def layer(self) -> Optional[int]:
        """The decoder layer index parsed from the module name (`None` if there is none)."""
        found = _LAYER_RE.findall("." + self.module + ".")
        return int(found[-1]) if found else None

    @property
    def matrix(self) -> str:
        """The matrix type, i.e. the last component of the module name (e.g. `"down_proj"`)."""
        return self.module.rsplit(".", 1)[-1]

    @property
    def key(self) -> str:
        return f"{self.module}|rho={self.rho:g}|c={self.clusters}"

    def __str__(self) -> str:
        c = f", {self.clusters} clusters" if self.clusters > 1 else ""
        return f"{self.module} @ rho={self.rho:g}{c}"


@dataclass
class EvalSummary:
    """Accuracy and mean gold log-likelihood of one evaluation (the comparison key of every search)."""

    accuracy: float
    mean_loglik: float
    n: int = 0
    seconds: float = 0.0

    def key(self) -> tuple[float, float]:
        return (self.accuracy, self.mean_loglik)

    def beats(self, other: EvalSummary) -> bool:
        """Strictly better: higher accuracy, or equal accuracy and higher mean log-likelihood."""
        return self.key() > other.key()


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def find_target_modules(
    model: nn.Module, matrices: Iterable[str] = MATRIX_TYPES, layers: Optional[Iterable[int]] = None
) -> list[str]:
    """Names of the linear modules whose matrix type matches one of `matrices` (and whose layer is in `layers`).

    Args:
        model (`nn.Module`): The model (a plain transformers model, not a `PeftModel`).
        matrices (`Iterable[str]`): Matrix types or glob patterns matched against the last name component, or
            against the full module name (e.g. `"down_proj"`, `"*_proj"`, `"model.layers.3.mlp.*"`).
        layers (`Iterable[int]`, *optional*): Layer indices to keep (default: all).

    Raises:
        `ValueError`: if a pattern or a layer index matches nothing.
    """
    linear = [(n, m) for n, m in model.named_modules() if n and _is_linear(m)]
    patterns = list(matrices)
    if not patterns:
        raise ValueError("no matrix patterns given")
    layer_set = None if layers is None else {int(i) for i in layers}
    chosen, used_patterns, used_layers = [], set(), set()
    for name, _ in linear:
        last = name.rsplit(".", 1)[-1]
        hits = [p for p in patterns if fnmatch.fnmatchcase(last, p) or fnmatch.fnmatchcase(name, p)]
        if not hits:
            continue
        found = _LAYER_RE.findall("." + name + ".")
        layer = int(found[-1]) if found else None
        if layer_set is not None and layer not in layer_set:
            used_patterns.update(hits)  # the pattern exists, just not in these layers
            continue
        used_patterns.update(hits)
        if layer is not None:
            used_layers.add(layer)
        chosen.append(name)
    missing = [p for p in patterns if p not in used_patterns]
    if missing:
        types = sorted({n.rsplit(".", 1)[-1] for n, _ in linear})
        raise ValueError(f"candidate pattern(s) {missing} match no linear module; matrix types in this model: {types}")
    if layer_set is not None:
        missing_layers = sorted(layer_set - used_layers)
        if missing_layers:
            raise ValueError(f"layer(s) {missing_layers} have no module matching {patterns}")
    if not chosen:
        raise ValueError(f"no linear module matches {patterns} in layers {sorted(layer_set or [])}")
    return chosen


def candidate_grid(
    modules: Sequence[str], rhos: Sequence[float] = LASER_RHOS, clusters: int = 1
) -> list[Intervention]:
    """All `(module, rho)` pairs as [`Intervention`]s (module-major order)."""
    if not rhos:
        raise ValueError("no rank fractions given")
    for rho in rhos:
        check_rho(rho)
    return [Intervention(m, float(rho), clusters) for m in modules for rho in rhos]


def take_examples(examples: Sequence[Example], n: Optional[int], what: str, *, strict: bool = False) -> list[Example]:
    """The first `n` examples; with fewer available, warn and use them all (or raise if `strict`).

    Raises:
        `ValueError`: if there are no examples at all, or fewer than `n` and `strict` is set.
    """
    examples = list(examples)
    if not examples:
        raise ValueError(f"no {what} examples available")
    if n is None:
        return examples
    if n < 1:
        raise ValueError(f"the number of {what} examples must be >= 1, got {n}")
    if len(examples) < n:
        msg = f"asked for {n} {what} examples but only {len(examples)} exist"
        if strict:
            raise ValueError(msg)
        warnings.warn(msg + f"; using all {len(examples)}")
        logger.warning("%s; using all %d", msg, len(examples))
        return examples
    return examples[:n]


# --------------------------------------------------------------------------------------------------------------------
# Weights, SVDs and truncations
# --------------------------------------------------------------------------------------------------------------------


def _weight_matrix(module: nn.Module) -> torch.Tensor:
    """`(out, in)` view of a Linear/Conv1D weight."""
    w = module.weight
    return w.T if type(module).__name__ == "Conv1D" else w


def compute_svds(model: nn.Module, modules: Sequence[str], *, cache=None, progress: bool = False) -> dict[str, tuple]:
    """Thin SVDs `(U, S, V)` (float32, CPU) of the named modules' weights, computed once and reused across ρ.

    Args:
        model: The model.
        modules: Module names.
        cache ([`~peft_spectral.svd_cache.SVDCache`] or `bool`, *optional*): Take the factors from the on-disk SVD
            cache (`True` = the default cache directory). The cache keeps `S` and the smaller side's singular vectors;
            the other side is recovered in float64 as `U = W V / σ` (or `V = Wᵀ U / σ`). Without a cache every
            SVD is computed with [`~peft_spectral.linalg.thin_svd`].
    """
    from tqdm.auto import tqdm

    weights = [(name, _weight_matrix(model.get_submodule(name)).detach().cpu()) for name in modules]
    if cache is None or cache is False:
        return {name: thin_svd(w) for name, w in tqdm(weights, desc="SVD", disable=not progress)}
    if cache is True:
        from .svd_cache import SVDCache

        cache = SVDCache()
    factors = cache.get_many(weights, progress=progress)
    return {name: _full_svd_from_factors(w, factors[name]) for name, w in weights}


def _full_svd_from_factors(weight: torch.Tensor, factors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    w = weight.to(torch.float64)
    s = factors.S.to(torch.float64)
    q = factors.Q.to(torch.float64)
    floor = float(s[0]) * 1e-12 if len(s) and float(s[0]) > 0 else 1e-30
    safe = s.clamp_min(floor)
    if factors.side == "right":
        v, u = q, (w @ q) / safe
    else:
        u, v = q, (w.T @ q) / safe
    return u.float().contiguous(), s.float().contiguous(), v.float().contiguous()


class _TruncationCache:
    """Dense truncated weights per intervention, built from cached SVD factors (plain) or by clustering."""

    def __init__(self, model: nn.Module, svds: dict[str, tuple], seed: int = 0, max_items: int = 8):
        self.model, self.svds, self.seed, self.max_items = model, svds, seed, max_items
        self._items: dict[str, torch.Tensor] = {}

    def dense(self, iv: Intervention) -> torch.Tensor:
        if iv.key in self._items:
            return self._items[iv.key]
        module = self.model.get_submodule(iv.module)
        weight = _weight_matrix(module).detach()
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
    model: nn.Module, interventions: Sequence[Intervention], *, cache: Optional[_TruncationCache] = None
) -> Iterator[nn.Module]:
    """Temporarily replace the weights named by `interventions` by their truncations (restored exactly on exit).

    This is the fast path the searches use (no adapter is built per candidate).
    """
    modules = [iv.module for iv in interventions]
    if len(set(modules)) != len(modules):
        raise ValueError(f"several interventions on one module: {modules}")
    cache = cache or _TruncationCache(model, {})
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


# --------------------------------------------------------------------------------------------------------------------
# Gradient scoring
# --------------------------------------------------------------------------------------------------------------------


def _default_loss(tokenizer) -> LossFn:
    from .evaluation import answer_nll

    def loss(model, batch):
        return answer_nll(model, tokenizer, batch)

    return loss


def _target_token_counts(tokenizer, examples: Sequence[Example]) -> list[int]:
    return [len(tokenizer(ex.target, add_special_tokens=False)["input_ids"]) for ex in examples]


def singular_value_gradients(
    model: nn.Module,
    examples: Sequence[Example],
    modules: Sequence[str],
    *,
    svds: dict[str, tuple],
    tokenizer=None,
    loss_fn: Optional[LossFn] = None,
    batch_size: int = 8,
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], float]:
    """`g_i = u_iᵀ (∂L/∂W) v_i` for every named module, from one forward/backward pass over `examples`.

    The loss `L` is the mean NLL of the gold targets over all target tokens of all examples (the default, via
    [`peft_spectral.evaluation.answer_nll`], batches weighted by their target-token counts so that batching does not
    change `L`), or `loss_fn(model, batch)` averaged over batches weighted by batch size.

    Each weight's gradient is projected onto its singular pairs by a post-accumulate-grad hook as soon as it is
    computed and then freed, so memory stays at the SVD factors plus what autograd holds for one batch.

    Args:
        model: The model (its parameters' `requires_grad` flags are restored afterwards; no optimiser step).
        examples: Calibration examples.
        modules: Names of the modules to score.
        svds: `(U, S, V)` per module (see [`compute_svds`]).
        tokenizer: Needed for the default loss.
        loss_fn: `loss_fn(model, batch) -> scalar` (mean over the batch).
        batch_size: Examples per forward/backward.

    Returns:
        `(grads, loss)`: `g` per module (float32, length `min(out, in)`), and the value of `L`.
    """
    from tqdm.auto import tqdm

    if not examples:
        raise ValueError("no calibration examples")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if loss_fn is None:
        if tokenizer is None:
            raise ValueError("pass a tokenizer (for the default answer-NLL loss) or a loss_fn")
        loss_fn = _default_loss(tokenizer)
        counts = _target_token_counts(tokenizer, examples)
    else:
        counts = [1] * len(examples)
    total = float(sum(counts))

    grads = {name: torch.zeros(len(svds[name][1]), dtype=torch.float64) for name in modules}
    params = {name: model.get_submodule(name).weight for name in modules}
    flags = {p: p.requires_grad for p in model.parameters()}
    handles = []

    def make_hook(name: str, conv1d: bool):
        u, _, v = svds[name]

        def hook(param: torch.Tensor) -> None:
            grad = param.grad.detach()
            grad = grad.T if conv1d else grad
            grad = grad.to(device=u.device, dtype=u.dtype)
            grads[name] += ((grad @ v) * u).sum(dim=0).double()
            param.grad = None

        return hook

    was_training = model.training
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for name, p in params.items():
            p.requires_grad_(True)
            p.grad = None
            conv1d = type(model.get_submodule(name)).__name__ == "Conv1D"
            handles.append(p.register_post_accumulate_grad_hook(make_hook(name, conv1d)))
        loss_value = 0.0
        batches = [list(range(i, min(i + batch_size, len(examples)))) for i in range(0, len(examples), batch_size)]
        with torch.enable_grad():
            for idx in tqdm(batches, desc="gradients", disable=not progress):
                weight = sum(counts[i] for i in idx) / total
                loss = loss_fn(model, [examples[i] for i in idx]) * weight
                loss.backward()
                loss_value += float(loss.detach())
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    return {k: g.float() for k, g in grads.items()}, loss_value


@dataclass
class ScoredCandidate:
    """A candidate with its predicted loss change (negative = predicted to help)."""

    intervention: Intervention
    score: float
    result: Optional[EvalSummary] = None


def score_candidates(
    grads: dict[str, torch.Tensor],
    svds: dict[str, tuple],
    rhos: Sequence[float] = LASER_RHOS,
    *,
    score: str = "first_order",
    clusters: int = 1,
) -> list[ScoredCandidate]:
    """Rank every `(module, rho)` by its predicted loss change, most negative first.

    Args:
        score (`str`): `"first_order"`: `ΔL_k ≈ −Σ_{i>k} σ_i g_i`; `"raw"`: `−Σ_{i>k} g_i` (the seed's
            "large negative gradient of the task score" rule).
        clusters (`int`): Cluster count recorded in the returned interventions.
    """
    if score not in ("first_order", "raw"):
        raise ValueError(f"score must be 'first_order' or 'raw', got {score!r}")
    out = []
    for name, g in grads.items():
        s = svds[name][1].to(g.dtype)
        for rho in rhos:
            k = rank_for(rho, len(s))
            dropped = g[k:] * s[k:] if score == "first_order" else g[k:]
            out.append(ScoredCandidate(Intervention(name, float(rho), clusters), float(-dropped.sum())))
    out.sort(key=lambda c: c.score)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Evaluation and results
# --------------------------------------------------------------------------------------------------------------------


def default_eval_fn(tokenizer, kind: str, *, mode: str = "auto", batch_size: int = 8) -> EvalFn:
    """An [`EvalFn`] built on [`peft_spectral.evaluation.evaluate`]."""
    from .evaluation import evaluate

    def run(model, examples):
        t = time.perf_counter()
        r = evaluate(model, tokenizer, examples, kind=kind, mode=mode, batch_size=batch_size)
        return EvalSummary(float(r.accuracy), float(r.mean_loglik), int(r.n), time.perf_counter() - t)

    return run


def _timed_eval(eval_fn: EvalFn, model, examples) -> EvalSummary:
    t = time.perf_counter()
    r = eval_fn(model, examples)
    if not isinstance(r, EvalSummary):
        r = EvalSummary(float(r.accuracy), float(r.mean_loglik), int(getattr(r, "n", len(examples))))
    r.seconds = time.perf_counter() - t
    return r


@dataclass
class SearchResult:
    """The outcome of a search.

    Attributes:
        method (`str`): `"laser"`, `"c2i-standard"`, `"c2i-clustered"` (or `"c2i"`).
        chosen (`list[Intervention]`): The kept interventions (empty if nothing beat the base model).
        base (`EvalSummary`): The unmodified model on the search's evaluation examples.
        best (`EvalSummary`): The chosen interventions on them (equals `base` when nothing was kept).
        evaluations (`int`): Model evaluations run (passes over the evaluation examples), base included.
        evaluated_examples (`int`): Sum of the sizes of those passes.
        wall_time_s (`float`): Wall time of the whole search (summed over resumed runs for LASER).
        timings (`dict`): Seconds per phase.
        candidates (`list[ScoredCandidate]`): Every candidate, with its score (C2I) and evaluation if it got one.
    """

    method: str
    chosen: list[Intervention]
    base: EvalSummary
    best: EvalSummary
    evaluations: int
    evaluated_examples: int
    wall_time_s: float
    timings: dict = field(default_factory=dict)
    candidates: list[ScoredCandidate] = field(default_factory=list)
    seed: int = 0

    def to_config(self, **kwargs):
        """A [`SpectralCompressConfig`] holding the chosen interventions (raises if nothing was chosen)."""
        from .tuners.spectral_compress import SpectralCompressConfig

        if not self.chosen:
            raise ValueError(f"the {self.method} search kept no intervention (none beat the unmodified model)")
        modules = {iv.module: {"rho": iv.rho, "clusters": iv.clusters} for iv in self.chosen}
        return SpectralCompressConfig(modules=modules, seed=self.seed, **kwargs)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "chosen": [asdict(iv) for iv in self.chosen],
            "base": asdict(self.base),
            "best": asdict(self.best),
            "evaluations": self.evaluations,
            "evaluated_examples": self.evaluated_examples,
            "wall_time_s": self.wall_time_s,
            "timings": self.timings,
            "candidates": [
                {**asdict(c.intervention), "score": c.score, "result": asdict(c.result) if c.result else None}
                for c in self.candidates
            ],
        }


def apply_result(model: nn.Module, result: SearchResult, adapter_name: str = "default"):
    """Wrap `model` in a `PeftModel` holding `result`'s interventions as a SpectralCompress adapter."""
    from peft import get_peft_model

    return get_peft_model(model, result.to_config(), adapter_name=adapter_name)


# --------------------------------------------------------------------------------------------------------------------
# C2I
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class C2IScores:
    """The product of C2I's gradient pass, reusable by several searches (e.g. both paper modes).

    Attributes:
        grads (`dict[str, torch.Tensor]`): `g` per module.
        svds (`dict[str, tuple]`): `(U, S, V)` per module.
        loss (`float`): The calibration loss `L`.
        n_calibration (`int`): Number of calibration examples.
        timings (`dict`): `svd_s` and `gradient_s`.
    """

    grads: dict
    svds: dict
    loss: float
    n_calibration: int
    timings: dict

    @property
    def seconds(self) -> float:
        return float(self.timings.get("svd_s", 0.0) + self.timings.get("gradient_s", 0.0))


def c2i_scores(
    model: nn.Module,
    calibration: Sequence[Example],
    modules: Sequence[str],
    *,
    tokenizer=None,
    loss_fn: Optional[LossFn] = None,
    batch_size: int = 8,
    svds: Optional[dict[str, tuple]] = None,
    svd_cache=None,
    progress: bool = False,
) -> C2IScores:
    """C2I's scoring phase: SVDs of the candidate matrices and one gradient pass over `calibration`.

    `svd_cache` is passed to [`compute_svds`] (an `SVDCache`, or `True` for the default one).
    """
    t = time.perf_counter()
    svds = dict(svds or {})
    missing = [m for m in modules if m not in svds]
    svds.update(compute_svds(model, missing, cache=svd_cache, progress=progress))
    t_svd = time.perf_counter() - t
    t = time.perf_counter()
    grads, loss = singular_value_gradients(
        model,
        calibration,
        modules,
        svds=svds,
        tokenizer=tokenizer,
        loss_fn=loss_fn,
        batch_size=batch_size,
        progress=progress,
    )
    return C2IScores(grads, svds, loss, len(calibration), {"svd_s": t_svd, "gradient_s": time.perf_counter() - t})


def c2i_search(
    model: nn.Module,
    calibration: Sequence[Example],
    evaluation: Sequence[Example],
    modules: Sequence[str],
    *,
    tokenizer=None,
    kind: str = "multiple_choice",
    rhos: Sequence[float] = LASER_RHOS,
    clusters: int = 1,
    top_k: int = 5,
    score: str = "first_order",
    combine: bool = False,
    only_predicted_gains: bool = False,
    batch_size: int = 8,
    eval_fn: Optional[EvalFn] = None,
    loss_fn: Optional[LossFn] = None,
    svds: Optional[dict[str, tuple]] = None,
    scores: Optional[C2IScores] = None,
    base: Optional[EvalSummary] = None,
    seed: int = 0,
    method: Optional[str] = None,
    progress: bool = False,
) -> SearchResult:
    """Compress to Impress: one gradient pass ranks all candidates; the top `top_k` are evaluated.

    Args:
        model: The model (left unchanged).
        calibration: Examples for the gradient pass (the paper uses 100).
        evaluation: Examples on which candidates are evaluated against the unmodified model.
        modules: Candidate module names (see [`find_target_modules`]).
        tokenizer: The tokenizer (for the default loss and evaluation).
        kind: Task kind for the default evaluation.
        rhos: Candidate rank fractions.
        clusters: Row clusters of the evaluated truncations (1 = plain, >1 = multi-subspace).
        top_k: How many of the best-ranked candidates to evaluate.
        score: `"first_order"` or `"raw"` (see [`score_candidates`]).
        combine: Greedily stack kept interventions on different modules while the evaluation improves.
        only_predicted_gains: Evaluate only candidates whose predicted ΔL is negative.
        batch_size: Batch size of the gradient pass and of the default evaluation.
        eval_fn, loss_fn: Override the evaluation / loss (tests, custom tasks).
        svds: Precomputed SVDs of `modules` (computed if missing).
        scores: A finished scoring phase ([`c2i_scores`]) to reuse instead of running the gradient pass; its
            time is still counted in the result's `wall_time_s` (so two modes sharing it report honest times).
        base: A finished evaluation of the unmodified model on `evaluation`, reused likewise (counted as one
            evaluation and its seconds added to the wall time).
        seed: Clustering seed.

    Returns:
        [`SearchResult`] whose `wall_time_s` = scoring time + evaluation time.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    t_start = time.perf_counter()
    eval_fn = eval_fn or default_eval_fn(tokenizer, kind, batch_size=batch_size)
    timings: dict[str, float] = {}

    if scores is None:
        scores = c2i_scores(
            model,
            calibration,
            modules,
            tokenizer=tokenizer,
            loss_fn=loss_fn,
            batch_size=batch_size,
            svds=svds,
            progress=progress,
        )
        timings["scoring_shared"] = False
    else:
        unknown = [m for m in modules if m not in scores.grads]
        if unknown:
            raise ValueError(f"the given C2I scores do not cover {unknown}")
        timings["scoring_shared"] = True
    timings.update(scores.timings)
    timings["calibration_loss"] = scores.loss
    svds = scores.svds
    ranked = score_candidates({m: scores.grads[m] for m in modules}, svds, rhos, score=score, clusters=clusters)
    to_eval = [c for c in ranked if c.score < 0] if only_predicted_gains else list(ranked)
    to_eval = to_eval[:top_k]

    t = time.perf_counter()
    cache = _TruncationCache(model, svds, seed=seed)
    reused_base_s = 0.0
    if base is None:
        base = _timed_eval(eval_fn, model, evaluation)
    else:
        reused_base_s = base.seconds
    evaluations, n_examples = 1, len(evaluation)
    kept: list[ScoredCandidate] = []
    from tqdm.auto import tqdm

    for cand in tqdm(to_eval, desc="C2I evaluation", disable=not progress):
        with apply_interventions(model, [cand.intervention], cache=cache):
            cand.result = _timed_eval(eval_fn, model, evaluation)
        evaluations, n_examples = evaluations + 1, n_examples + len(evaluation)
        if cand.result.beats(base):
            kept.append(cand)
    kept.sort(key=lambda c: c.result.key(), reverse=True)
    chosen, best = ([kept[0].intervention], kept[0].result) if kept else ([], base)
    if combine and len(kept) > 1:
        for cand in kept[1:]:
            if cand.intervention.module in {iv.module for iv in chosen}:
                continue
            trial = chosen + [cand.intervention]
            with apply_interventions(model, trial, cache=cache):
                r = _timed_eval(eval_fn, model, evaluation)
            evaluations, n_examples = evaluations + 1, n_examples + len(evaluation)
            if r.beats(best):
                chosen, best = trial, r
    timings["evaluation_s"] = time.perf_counter() - t + reused_base_s
    name = method or ("c2i-clustered" if clusters > 1 else "c2i-standard")
    wall = time.perf_counter() - t_start + reused_base_s + (scores.seconds if timings["scoring_shared"] else 0.0)
    return SearchResult(
        method=name,
        chosen=chosen,
        base=base,
        best=best,
        evaluations=evaluations,
        evaluated_examples=n_examples,
        wall_time_s=wall,
        timings=timings,
        candidates=ranked,
        seed=seed,
    )


def compress_to_impress(
    model: nn.Module,
    tokenizer,
    task: Task,
    modules: Sequence[str],
    *,
    mode: str = "standard",
    n_grad: int = 100,
    n_eval: int = 100,
    clusters: int = 2,
    strict: bool = False,
    **kwargs,
) -> SearchResult:
    """C2I with the paper's two settings on a [`Task`].

    - `mode="standard"` ("100 grads, standard eval"): `n_grad` training examples for the gradient, plain
      truncation, candidates evaluated on the whole validation split.
    - `mode="clustered"` ("CL-100G-100E"): `n_grad` gradient examples, multi-subspace truncation with `clusters`
      row clusters, candidates evaluated on `n_eval` validation examples.

    Fewer examples than asked: a warning and all available are used (`strict=True` raises instead).
    """
    if mode not in ("standard", "clustered"):
        raise ValueError(f"mode must be 'standard' or 'clustered', got {mode!r}")
    calibration = take_examples(task.train, n_grad, "calibration (train)", strict=strict)
    if mode == "standard":
        evaluation = take_examples(task.validation, None, "validation")
        return c2i_search(
            model,
            calibration,
            evaluation,
            modules,
            tokenizer=tokenizer,
            kind=task.kind,
            clusters=1,
            method="c2i-standard",
            **kwargs,
        )
    evaluation = take_examples(task.validation, n_eval, "evaluation (validation)", strict=strict)
    return c2i_search(
        model,
        calibration,
        evaluation,
        modules,
        tokenizer=tokenizer,
        kind=task.kind,
        clusters=clusters,
        method="c2i-clustered",
        **kwargs,
    )


# --------------------------------------------------------------------------------------------------------------------
# LASER
# --------------------------------------------------------------------------------------------------------------------


def _fingerprint(candidates: Sequence[Intervention], examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for iv in candidates:
        h.update(iv.key.encode())
    for ex in examples:
        h.update(ex.prompt.encode())
        h.update(ex.target.encode())
    return h.hexdigest()[:16]


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def laser_search(
    model: nn.Module,
    validation: Sequence[Example],
    candidates: Sequence[Intervention],
    *,
    tokenizer=None,
    kind: str = "multiple_choice",
    batch_size: int = 8,
    eval_fn: Optional[EvalFn] = None,
    state_path: Optional[str | os.PathLike] = None,
    base: Optional[EvalSummary] = None,
    progress: bool = True,
) -> SearchResult:
    """LASER's exhaustive search: evaluate every candidate on `validation`, keep the best if it beats the base.

    Resumable: with `state_path`, every finished evaluation is written to a JSON file (atomically); a later call with
    the same candidates and validation examples skips the ones already done. The progress bar shows an ETA.

    Args:
        model: The model (left unchanged).
        validation: The validation examples.
        candidates: The grid (see [`candidate_grid`]).
        eval_fn: Overrides the default evaluation ([`peft_spectral.evaluation.evaluate`]).
        state_path: JSON state file for resuming.
        base: A finished evaluation of the unmodified model on `validation` to reuse (still counted as one
            evaluation, its seconds added to the wall time).

    Raises:
        `ValueError`: if the state file belongs to another search (other candidates or examples).
    """
    from tqdm.auto import tqdm

    validation = take_examples(validation, None, "validation")
    if not candidates:
        raise ValueError("no LASER candidates")
    keys = [iv.key for iv in candidates]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate LASER candidates")
    eval_fn = eval_fn or default_eval_fn(tokenizer, kind, batch_size=batch_size)
    fingerprint = _fingerprint(candidates, validation)
    state = {"version": 1, "fingerprint": fingerprint, "base": None, "results": {}, "evaluations": 0, "elapsed_s": 0.0}
    path = Path(state_path) if state_path else None
    if path is not None and path.exists():
        loaded = json.loads(path.read_text())
        if loaded.get("fingerprint") != fingerprint:
            raise ValueError(
                f"LASER state file {path} belongs to another search (fingerprint {loaded.get('fingerprint')} != "
                f"{fingerprint}: other candidates or validation examples); delete it or pass another state_path"
            )
        state = loaded
        logger.info("resuming LASER search: %d/%d done", len(state["results"]), len(candidates))
    run_start = time.perf_counter()
    elapsed_before = float(state["elapsed_s"])

    def save():
        state["elapsed_s"] = elapsed_before + time.perf_counter() - run_start
        if path is not None:
            _write_json_atomic(path, state)

    cache = _TruncationCache(model, {})
    if state["base"] is None:
        if base is not None:
            state["base"] = asdict(base)
            elapsed_before += base.seconds
        else:
            state["base"] = asdict(_timed_eval(eval_fn, model, validation))
        state["evaluations"] += 1
        save()
    todo = [iv for iv in candidates if iv.key not in state["results"]]
    bar = tqdm(
        total=len(candidates), initial=len(candidates) - len(todo), desc="LASER", disable=not progress, unit="eval"
    )
    try:
        for iv in todo:
            with apply_interventions(model, [iv], cache=cache):
                r = _timed_eval(eval_fn, model, validation)
            cache._items.clear()  # every candidate is used once
            state["results"][iv.key] = asdict(r)
            state["evaluations"] += 1
            save()
            bar.update(1)
            bar.set_postfix(acc=f"{r.accuracy:.3f}")
    finally:
        bar.close()
        save()
    base = EvalSummary(**state["base"])
    scored = [ScoredCandidate(iv, float("nan"), EvalSummary(**state["results"][iv.key])) for iv in candidates]
    best_cand = max(scored, key=lambda c: c.result.key())
    chosen, best = ([best_cand.intervention], best_cand.result) if best_cand.result.beats(base) else ([], base)
    return SearchResult(
        method="laser",
        chosen=chosen,
        base=base,
        best=best,
        evaluations=int(state["evaluations"]),
        evaluated_examples=int(state["evaluations"]) * len(validation),
        wall_time_s=float(state["elapsed_s"]),
        timings={"evaluation_s": float(state["elapsed_s"])},
        candidates=scored,
    )
