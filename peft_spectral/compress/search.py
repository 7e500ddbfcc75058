"""Compress to Impress: one gradient pass ranks every candidate, the best few are evaluated and kept if they help."""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from ..data import Example, Task
from .candidates import LASER_RHOS, Intervention, take_examples
from .distributed import launched_state, map_across_processes
from .results import EvalFn, EvalSummary, LossFn, SearchResult, default_eval_fn, timed_eval
from .scoring import C2IScores, c2i_scores, score_candidates
from .selection import PAPER_N_EVAL, SelectionGuard, compare
from .weights import TruncationCache, apply_interventions


__all__ = ["C2ISearchConfig", "c2i_search", "compress_to_impress"]


@dataclass
class C2ISearchConfig:
    """Settings of a C2I search (everything but the model, the data and the functions).

    Args:
        rhos (`Sequence[float]`, defaults to `LASER_RHOS`): Candidate rank fractions.
        clusters (`int`, defaults to 1): Row clusters of the evaluated truncations (1 = plain, >1 = multi-subspace).
        top_k (`int`, defaults to 5): How many of the best-ranked candidates to evaluate.
        score (`str`, defaults to `"first_order"`): `"first_order"` or `"raw"` (see [`score_candidates`]).
        combine (`bool`, defaults to `False`): Greedily stack kept interventions on different modules while the
            combination passes the same test against the current best.
        only_predicted_gains (`bool`, defaults to `False`): Evaluate only candidates whose predicted ΔL is negative.
        n_eval (`int`, *optional*, defaults to 100): Evaluation examples used (the first `n_eval` of `evaluation`;
            the paper's 100). Fewer available: a warning naming `n_eval`, and all are used. `None`: all. Any
            evaluation set under 100 examples gives a warning (gains on few examples are mostly noise).
        guard ([`SelectionGuard`], *optional*): The paired-bootstrap test a candidate must pass to be kept (the
            default one). `None`: the plain rule, kept when better on the evaluation examples (accuracy, ties
            broken by mean log-likelihood), which overfits small evaluation sets.
        kind (`str`, defaults to `"multiple_choice"`): Task kind for the default evaluation.
        batch_size (`int`, defaults to 8): Batch size of the gradient pass and of the default evaluation.
        project_each_batch (`bool`, defaults to `False`): Memory-lean gradient pass (see [`gradient_pass`]).
        seed (`int`, defaults to 0): Clustering seed.
        method (`str`, *optional*): Name recorded in the result (default `"c2i-standard"` / `"c2i-clustered"`).
        progress (`bool`, defaults to `False`): Show progress bars.
    """

    rhos: Sequence[float] = LASER_RHOS
    clusters: int = 1
    top_k: int = 5
    score: str = "first_order"
    combine: bool = False
    only_predicted_gains: bool = False
    n_eval: Optional[int] = PAPER_N_EVAL
    guard: Optional[SelectionGuard] = field(default_factory=SelectionGuard)
    kind: str = "multiple_choice"
    batch_size: int = 8
    project_each_batch: bool = False
    seed: int = 0
    method: Optional[str] = None
    progress: bool = False

    def __post_init__(self):
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.score not in ("first_order", "raw"):
            raise ValueError(f"score must be 'first_order' or 'raw', got {self.score!r}")
        if self.n_eval is not None and self.n_eval < 1:
            raise ValueError(f"n_eval must be >= 1 or None, got {self.n_eval}")

    def selection_record(self) -> dict:
        """How candidates are kept, for the result."""
        if self.guard is None:
            return {"rule": "plain"}
        return {"rule": "paired_bootstrap", "guard": dataclasses.asdict(self.guard)}


def _resolve_config(config: Optional[C2ISearchConfig], settings: dict) -> C2ISearchConfig:
    config = config or C2ISearchConfig()
    known = {f.name for f in dataclasses.fields(C2ISearchConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(f"c2i_search got unknown setting(s) {unknown}; C2ISearchConfig fields are {sorted(known)}")
    return dataclasses.replace(config, **settings) if settings else config


def _scores_for(model, calibration, modules, scores, tokenizer, loss_fn, svds, config) -> tuple[C2IScores, bool]:
    if scores is None:
        return (
            c2i_scores(
                model,
                calibration,
                modules,
                tokenizer=tokenizer,
                loss_fn=loss_fn,
                batch_size=config.batch_size,
                svds=svds,
                project_each_batch=config.project_each_batch,
                progress=config.progress,
            ),
            False,
        )
    unknown = [m for m in modules if m not in scores.grads]
    if unknown:
        raise ValueError(f"the given C2I scores do not cover {unknown}")
    return scores, True


class _Evaluator:
    """Runs and counts the evaluations of one search."""

    def __init__(self, model, evaluation, eval_fn, cache):
        self.model, self.evaluation, self.eval_fn, self.cache = model, evaluation, eval_fn, cache
        self.count, self.examples = 0, 0

    def __call__(self, interventions: Sequence[Intervention]) -> EvalSummary:
        with apply_interventions(self.model, interventions, cache=self.cache):
            r = timed_eval(self.eval_fn, self.model, self.evaluation)
        self.count, self.examples = self.count + 1, self.examples + len(self.evaluation)
        return r


def _select(to_eval, base, run, evaluation, config) -> tuple[list[Intervention], EvalSummary, list[dict]]:
    """Evaluate `to_eval`, keep the ones that pass, optionally combine them greedily."""
    from tqdm.auto import tqdm

    n_tested = len(to_eval)
    processes = launched_state()  # with several processes, one candidate per process per round
    main = processes is None or processes.is_main_process
    count_before = run.count
    with tqdm(total=n_tested, desc="C2I evaluation", disable=not (config.progress and main)) as bar:
        results = map_across_processes(
            lambda cand: run([cand.intervention]), to_eval, processes, on_round=lambda done: bar.update(len(done))
        )
    if processes is not None:  # the evaluations that the other processes ran count too
        run.count = count_before + n_tested
        run.examples = run.count * len(evaluation)
    for cand, result in zip(to_eval, results):
        cand.result = result
        cand.decision = compare(base, cand.result, evaluation, config.guard, n_tested)
    kept = [c for c in to_eval if c.decision.kept]
    if config.guard is None:
        kept.sort(key=lambda c: c.result.key(), reverse=True)
    else:
        kept.sort(key=lambda c: c.decision.sort_key(), reverse=True)
    if not kept:
        return [], base, []
    chosen, best, combination = [kept[0].intervention], kept[0].result, []
    if config.combine:
        for cand in kept[1:]:
            if cand.intervention.module in {iv.module for iv in chosen}:
                continue
            trial = chosen + [cand.intervention]
            r = run(trial)
            decision = compare(best, r, evaluation, config.guard, n_tested)
            combination.append({"added": str(cand.intervention), "decision": decision.to_dict()})
            if decision.kept:
                chosen, best = trial, r
    return chosen, best, combination


def c2i_search(
    model: nn.Module,
    calibration: Sequence[Example],
    evaluation: Sequence[Example],
    modules: Sequence[str],
    config: Optional[C2ISearchConfig] = None,
    *,
    tokenizer=None,
    eval_fn: Optional[EvalFn] = None,
    loss_fn: Optional[LossFn] = None,
    svds: Optional[dict[str, tuple]] = None,
    scores: Optional[C2IScores] = None,
    base: Optional[EvalSummary] = None,
    **settings,
) -> SearchResult:
    """Compress to Impress: one gradient pass ranks all candidates; the top `config.top_k` are evaluated.

    A candidate is kept only when it passes `config.guard` against the unmodified model on the evaluation examples
    (see [`~peft_spectral.compress.selection`]); every evaluated candidate carries its decision in the result.

    Under `accelerate launch` with several processes (see [`~peft_spectral.compress.distributed`]) the gradient
    pass splits `calibration` across them and sums the gradients, and the top candidates are evaluated one per
    process; every process returns the same result.

    Args:
        model (`nn.Module`): The model (left unchanged).
        calibration (`Sequence[Example]`): Examples for the gradient pass (the paper uses 100).
        evaluation (`Sequence[Example]`): Examples on which candidates are evaluated (the first `config.n_eval`).
        modules (`Sequence[str]`): Candidate module names (see [`find_target_modules`]).
        config ([`C2ISearchConfig`], *optional*): The search settings (default: `C2ISearchConfig()`).
        tokenizer: The tokenizer (for the default loss and evaluation).
        eval_fn (`EvalFn`, *optional*): Overrides the evaluation (it must return per-example results for the guard).
        loss_fn (`LossFn`, *optional*): Overrides the gradient pass's loss.
        svds (`dict[str, tuple]`, *optional*): Precomputed SVDs of `modules` (computed if missing).
        scores ([`C2IScores`], *optional*): A finished scoring phase to reuse instead of running the gradient pass;
            its time is still counted in the result's `wall_time_s` (so two modes sharing it report honest times).
        base ([`EvalSummary`], *optional*): A finished evaluation of the unmodified model on the same evaluation
            examples, reused likewise (counted as one evaluation and its seconds added to the wall time).
        **settings: Fields of [`C2ISearchConfig`] overriding `config` (e.g. `top_k=3`).

    Returns:
        [`SearchResult`] whose `wall_time_s` = scoring time + evaluation time.
    """
    config = _resolve_config(config, settings)
    t_start = time.perf_counter()
    evaluation = take_examples(
        evaluation, config.n_eval, "evaluation", note="set C2ISearchConfig.n_eval: gains on few examples are noise"
    )
    if len(evaluation) < PAPER_N_EVAL and (config.n_eval is None or config.n_eval < PAPER_N_EVAL):
        warnings.warn(
            f"c2i_search evaluates candidates on {len(evaluation)} examples (`evaluation`, C2ISearchConfig.n_eval="
            f"{config.n_eval}); the paper uses {PAPER_N_EVAL}, and on fewer a gain is mostly noise",
            stacklevel=2,
        )
    if base is not None and base.n and base.n != len(evaluation):
        raise ValueError(f"base was evaluated on {base.n} examples but the evaluation set has {len(evaluation)}")
    eval_fn = eval_fn or default_eval_fn(tokenizer, config.kind, batch_size=config.batch_size)
    scores, shared = _scores_for(model, calibration, modules, scores, tokenizer, loss_fn, svds, config)
    timings: dict = {"scoring_shared": shared, **scores.timings, "calibration_loss": scores.loss}
    grads = {m: scores.grads[m] for m in modules}
    ranked = score_candidates(grads, scores.svds, config.rhos, score=config.score, clusters=config.clusters)
    to_eval = [c for c in ranked if c.score < 0] if config.only_predicted_gains else list(ranked)
    to_eval = to_eval[: config.top_k]

    t = time.perf_counter()
    run = _Evaluator(model, evaluation, eval_fn, TruncationCache(model, scores.svds, seed=config.seed))
    reused_base_s = 0.0 if base is None else base.seconds
    if base is None:
        base = timed_eval(eval_fn, model, evaluation)
    chosen, best, combination = _select(to_eval, base, run, evaluation, config)
    timings["evaluation_s"] = time.perf_counter() - t + reused_base_s
    wall = time.perf_counter() - t_start + reused_base_s + (scores.seconds if shared else 0.0)
    return SearchResult(
        method=config.method or ("c2i-clustered" if config.clusters > 1 else "c2i-standard"),
        chosen=chosen,
        base=base,
        best=best,
        evaluations=run.count + 1,
        evaluated_examples=run.examples + len(evaluation),
        wall_time_s=wall,
        timings=timings,
        candidates=ranked,
        seed=config.seed,
        selection={**config.selection_record(), "n_tested": len(to_eval), "combination": combination},
    )


def compress_to_impress(
    model: nn.Module,
    tokenizer,
    task: Task,
    modules: Sequence[str],
    *,
    mode: str = "standard",
    n_grad: int = 100,
    n_eval: int = PAPER_N_EVAL,
    clusters: int = 2,
    strict: bool = False,
    config: Optional[C2ISearchConfig] = None,
    **settings,
) -> SearchResult:
    """C2I with the paper's two settings on a [`Task`].

    - `mode="standard"` ("100 grads, standard eval"): `n_grad` training examples for the gradient, plain
      truncation, candidates evaluated on the whole validation split.
    - `mode="clustered"` ("CL-100G-100E"): `n_grad` gradient examples, multi-subspace truncation with `clusters`
      row clusters, candidates evaluated on `n_eval` validation examples.

    Args:
        model (`nn.Module`): The model (left unchanged).
        tokenizer: Its tokenizer.
        task ([`Task`]): Gradient examples come from `task.train`, evaluation examples from `task.validation`.
        modules (`Sequence[str]`): Candidate module names.
        mode (`str`, defaults to `"standard"`): `"standard"` or `"clustered"`.
        n_grad (`int`, defaults to 100): Gradient examples.
        n_eval (`int`, defaults to 100): Evaluation examples in clustered mode.
        clusters (`int`, defaults to 2): Row clusters in clustered mode.
        strict (`bool`, defaults to `False`): Raise instead of warning when a split is smaller than asked.
        config ([`C2ISearchConfig`], *optional*): Further settings; `kind`, `clusters`, `n_eval` and `method` are
            set by the mode.
        **settings: Fields of [`C2ISearchConfig`] overriding `config`.
    """
    if mode not in ("standard", "clustered"):
        raise ValueError(f"mode must be 'standard' or 'clustered', got {mode!r}")
    config = _resolve_config(config, settings)
    calibration = take_examples(task.train, n_grad, "calibration (train)", strict=strict)
    if mode == "standard":
        evaluation = take_examples(task.validation, None, "validation")
        mode_settings = {"clusters": 1, "method": "c2i-standard"}
    else:
        evaluation = take_examples(task.validation, n_eval, "evaluation (validation)", strict=strict)
        mode_settings = {"clusters": clusters, "method": "c2i-clustered"}
    config = dataclasses.replace(config, kind=task.kind, n_eval=None, **mode_settings)
    return c2i_search(model, calibration, evaluation, modules, config, tokenizer=tokenizer)
