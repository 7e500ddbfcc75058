"""Evaluations and results of the searches: [`EvalSummary`], [`ScoredCandidate`], [`SearchResult`]."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ..data import Example
from .candidates import Intervention


__all__ = ["EvalFn", "EvalSummary", "ScoredCandidate", "SearchResult", "apply_result", "default_eval_fn", "timed_eval"]


@dataclass
class EvalSummary:
    """One evaluation of a model on a list of examples (the comparison key of every search).

    Args:
        accuracy (`float`): Fraction correct.
        mean_loglik (`float`): Mean gold per-token log-likelihood (the tie-breaker of the plain comparison).
        n (`int`): Number of examples.
        seconds (`float`): Wall time of the evaluation.
        correct (`list[bool]`, *optional*): Per-example verdicts, in input order (needed by the selection guard).
        margins (`list[float]`, *optional*): Per-example log-likelihood margin of the right answer: for multiple
            choice, summed log-likelihood of the gold option minus that of the best other option; for generation, the
            gold answer's mean per-token log-likelihood.
    """

    accuracy: float
    mean_loglik: float
    n: int = 0
    seconds: float = 0.0
    correct: Optional[list[bool]] = None
    margins: Optional[list[float]] = None

    def key(self) -> tuple[float, float]:
        """`(accuracy, mean_loglik)`."""
        return (self.accuracy, self.mean_loglik)

    def beats(self, other: EvalSummary) -> bool:
        """Strictly better: higher accuracy, or equal accuracy and higher mean log-likelihood."""
        return self.key() > other.key()

    def to_dict(self, per_example: bool = True) -> dict:
        """As a JSON-ready dict (`per_example=False` leaves out the per-example lists)."""
        out = asdict(self)
        if not per_example:
            out.pop("correct")
            out.pop("margins")
        return out


EvalFn = Callable[[nn.Module, Sequence[Example]], EvalSummary]
LossFn = Callable[[nn.Module, Sequence[Example]], torch.Tensor]


def _multiple_choice_summary(model, tokenizer, examples: Sequence[Example], batch_size: int) -> EvalSummary:
    from ..evaluation import evaluate, option_logliks
    from ..option_scoring import multiple_choice_metrics, score_examples

    labels = [ex.label for ex in examples]
    try:
        scores = score_examples(model, tokenizer, examples, batch_size=batch_size)
        correct, mean_loglik = multiple_choice_metrics(scores, labels)
        sums = scores.sums
    except TypeError:  # a forward without a KV cache: score prompt+option sequences instead
        r = evaluate(
            model, tokenizer, examples, kind="multiple_choice", batch_size=batch_size, shared_prompt_scoring=False
        )
        correct, mean_loglik = r.correct, r.mean_loglik
        sums = option_logliks(model, tokenizer, examples, batch_size=batch_size)
    margins = []
    for row, label in zip(sums, labels):
        others = [s for j, s in enumerate(row) if j != label]
        margins.append(float(row[label] - max(others)) if label is not None and others else float("nan"))
    n = len(examples)
    return EvalSummary(sum(correct) / n, float(mean_loglik), n, 0.0, [bool(c) for c in correct], margins)


def default_eval_fn(tokenizer, kind: str, *, mode: str = "auto", batch_size: int = 8) -> EvalFn:
    """An [`EvalFn`] giving the same accuracy as [`peft_spectral.evaluation.evaluate`], plus per-example results.

    Args:
        tokenizer: The tokenizer.
        kind (`str`): `"multiple_choice"`, `"generation"` or `"code"`.
        mode (`str`, defaults to `"auto"`): As in `evaluate` (`"loglik"` for multiple choice, `"generate"` else).
        batch_size (`int`, defaults to 8): Sequences per forward pass.
    """
    from ..evaluation import answer_logliks, evaluate

    scored_by_loglik = kind == "multiple_choice" and mode in ("auto", "loglik")

    def run(model, examples):
        t = time.perf_counter()
        examples = list(examples)
        if scored_by_loglik and examples:
            summary = _multiple_choice_summary(model, tokenizer, examples, batch_size)
        else:
            r = evaluate(model, tokenizer, examples, kind=kind, mode=mode, batch_size=batch_size)
            golds = answer_logliks(model, tokenizer, examples, batch_size=batch_size).tolist()
            summary = EvalSummary(float(r.accuracy), float(r.mean_loglik), int(r.n), 0.0, list(r.correct), golds)
        summary.seconds = time.perf_counter() - t
        return summary

    return run


def timed_eval(eval_fn: EvalFn, model: nn.Module, examples: Sequence[Example]) -> EvalSummary:
    """`eval_fn(model, examples)` as an [`EvalSummary`] whose `seconds` is the measured wall time.

    Args:
        eval_fn (`EvalFn`): Returns an `EvalSummary`, or any object with `accuracy`, `mean_loglik` (and optionally
            `n`, `correct`, `margins`).
        model (`nn.Module`): The model.
        examples (`Sequence[Example]`): The examples.
    """
    t = time.perf_counter()
    r = eval_fn(model, examples)
    if not isinstance(r, EvalSummary):
        r = EvalSummary(
            float(r.accuracy),
            float(r.mean_loglik),
            int(getattr(r, "n", len(examples))),
            0.0,
            getattr(r, "correct", None),
            getattr(r, "margins", None),
        )
    r.seconds = time.perf_counter() - t
    return r


@dataclass
class ScoredCandidate:
    """A candidate with its predicted loss change (negative = predicted to help) and, if evaluated, its outcome.

    Args:
        intervention ([`Intervention`]): The candidate.
        score (`float`): C2I's predicted loss change (`nan` for LASER).
        result ([`EvalSummary`], *optional*): Its evaluation, when it got one.
        decision ([`~peft_spectral.compress.selection.SelectionDecision`], *optional*): Why it was kept or rejected.
    """

    intervention: Intervention
    score: float
    result: Optional[EvalSummary] = None
    decision: Optional[Any] = None

    def to_dict(self) -> dict:
        """As a JSON-ready dict (without per-example lists)."""
        return {
            **asdict(self.intervention),
            "score": self.score,
            "result": self.result.to_dict(per_example=False) if self.result else None,
            "decision": self.decision.to_dict() if self.decision is not None else None,
        }


@dataclass
class SearchResult:
    """The outcome of a search.

    Args:
        method (`str`): `"laser"`, `"c2i-standard"`, `"c2i-clustered"` (or `"c2i"`).
        chosen (`list[Intervention]`): The kept interventions (empty if nothing beat the base model).
        base (`EvalSummary`): The unmodified model on the search's evaluation examples.
        best (`EvalSummary`): The chosen interventions on them (equals `base` when nothing was kept).
        evaluations (`int`): Model evaluations run (passes over the evaluation examples), base included.
        evaluated_examples (`int`): Sum of the sizes of those passes.
        wall_time_s (`float`): Wall time of the whole search (summed over resumed runs for LASER).
        timings (`dict`): Seconds per phase.
        candidates (`list[ScoredCandidate]`): Every candidate, with its score (C2I), its evaluation if it got one,
            and the selection decision (gain, confidence interval, kept or not, why).
        seed (`int`): Clustering seed of the truncations.
        selection (`dict`): How candidates were kept (`"rule"`: `"plain"` or `"paired_bootstrap"`, and the settings).
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
    selection: dict = field(default_factory=dict)

    def to_config(self, **kwargs):
        """A [`SpectralCompressConfig`] holding the chosen interventions (raises if nothing was chosen)."""
        from ..tuners.spectral_compress import SpectralCompressConfig

        if not self.chosen:
            raise ValueError(f"the {self.method} search kept no intervention (none beat the unmodified model)")
        modules = {iv.module: {"rho": iv.rho, "clusters": iv.clusters} for iv in self.chosen}
        return SpectralCompressConfig(modules=modules, seed=self.seed, **kwargs)

    def to_dict(self) -> dict:
        """As a JSON-ready dict (per-example lists only for `base` and `best`)."""
        return {
            "method": self.method,
            "chosen": [asdict(iv) for iv in self.chosen],
            "base": self.base.to_dict(),
            "best": self.best.to_dict(),
            "evaluations": self.evaluations,
            "evaluated_examples": self.evaluated_examples,
            "wall_time_s": self.wall_time_s,
            "timings": self.timings,
            "selection": self.selection,
            "candidates": [c.to_dict() for c in self.candidates],
        }


def apply_result(model: nn.Module, result: SearchResult, adapter_name: str = "default"):
    """Wrap `model` in a `PeftModel` holding `result`'s interventions as a SpectralCompress adapter.

    Args:
        model (`nn.Module`): The base model.
        result ([`SearchResult`]): A search that chose at least one intervention.
        adapter_name (`str`, defaults to `"default"`): The adapter's name.
    """
    from peft import get_peft_model

    return get_peft_model(model, result.to_config(), adapter_name=adapter_name)
