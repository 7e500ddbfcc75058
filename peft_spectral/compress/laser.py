"""LASER (Sharma et al., 2023): evaluate every candidate on a validation split, resumable from a state file."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

from torch import nn

from ..data import Example
from ..state import fingerprint, load_state, model_fingerprint, write_json_atomic
from .candidates import Intervention, take_examples
from .distributed import launched_state, map_across_processes
from .results import EvalFn, EvalSummary, ScoredCandidate, SearchResult, default_eval_fn, timed_eval
from .selection import SelectionGuard, compare
from .weights import TruncationCache, apply_interventions


logger = logging.getLogger(__name__)

__all__ = ["laser_fingerprint", "laser_search"]

_STATE_VERSION = 2


def laser_fingerprint(
    model: nn.Module, candidates: Sequence[Intervention], validation: Sequence[Example], scoring: dict
) -> str:
    """The fingerprint of a LASER search: the model's weights, the candidates, the validation examples, the scoring.

    Args:
        model (`nn.Module`): The model ([`~peft_spectral.state.model_fingerprint`]).
        candidates (`Sequence[Intervention]`): The grid, in order.
        validation (`Sequence[Example]`): The validation examples (prompt, target, choices, label), in order.
        scoring (`dict`): The settings that define a candidate's evaluation (task kind, evaluation mode, custom
            evaluation function's name).
    """
    examples = [[ex.prompt, ex.target, list(ex.choices or []), ex.label] for ex in validation]
    return fingerprint(
        _STATE_VERSION,
        model_fingerprint(model),
        [iv.key for iv in candidates],
        examples,
        dict(sorted(scoring.items())),
    )


def _scoring_settings(kind: str, eval_fn: Optional[EvalFn]) -> dict:
    custom = None if eval_fn is None else getattr(eval_fn, "__qualname__", type(eval_fn).__qualname__)
    return {"kind": kind, "mode": "auto", "eval_fn": custom}


class _StateFile:
    """The JSON state of one LASER search; elapsed time accumulates over resumed runs."""

    def __init__(self, path: Optional[Path], fp: str, n_candidates: int, writer: bool = True):
        self.path, self.writer = path, writer
        self.data = {"version": _STATE_VERSION, "fingerprint": fp, "base": None, "results": {}, "evaluations": 0}
        self.data["elapsed_s"] = 0.0
        if path is not None:
            loaded = load_state(path, fp, what="LASER search state")
            if loaded is not None:
                self.data = loaded
                logger.info("resuming LASER search: %d/%d done", len(loaded["results"]), n_candidates)
        self._start, self._before = time.perf_counter(), float(self.data["elapsed_s"])

    def add_seconds(self, seconds: float) -> None:
        self._before += seconds

    def save(self) -> None:
        self.data["elapsed_s"] = self._before + time.perf_counter() - self._start
        if self.path is not None and self.writer:
            write_json_atomic(self.path, self.data, digest=True)


def _choose(candidates, base, validation, guard) -> tuple[list[ScoredCandidate], list[Intervention], EvalSummary]:
    scored = [ScoredCandidate(iv, float("nan"), r) for iv, r in candidates]
    for c in scored:
        c.decision = compare(base, c.result, validation, guard, len(scored))
    if guard is None:  # LASER as published: the best on validation, if it beats the unmodified model
        best = max(scored, key=lambda c: c.result.key())
        return scored, ([best.intervention], best.result) if best.decision.kept else ([], base)
    kept = [c for c in scored if c.decision.kept]
    if not kept:
        return scored, ([], base)
    best = max(kept, key=lambda c: c.decision.sort_key())
    return scored, ([best.intervention], best.result)


def laser_search(
    model: nn.Module,
    validation: Sequence[Example],
    candidates: Sequence[Intervention],
    *,
    tokenizer=None,
    kind: str = "multiple_choice",
    batch_size: int = 8,
    eval_fn: Optional[EvalFn] = None,
    state_path: Optional[Union[str, os.PathLike]] = None,
    base: Optional[EvalSummary] = None,
    guard: Optional[SelectionGuard] = None,
    progress: bool = True,
) -> SearchResult:
    """LASER's exhaustive search: evaluate every candidate on `validation`, keep the best if it beats the base.

    Resumable: with `state_path`, every finished evaluation is written to a JSON file (atomically); a later call with
    the same model weights, candidates, validation examples and scoring settings skips the ones already done. The
    progress bar shows an ETA.

    Under `accelerate launch` with several processes (see [`~peft_spectral.compress.distributed`]) the candidates
    still to evaluate go in rounds of one per process; after each round the results are gathered on every process
    and the main process alone writes the state file. Results are keyed by candidate, so a search interrupted with
    one number of processes resumes with another.

    Args:
        model (`nn.Module`): The model (left unchanged).
        validation (`Sequence[Example]`): The validation examples.
        candidates (`Sequence[Intervention]`): The grid (see [`candidate_grid`]).
        tokenizer: The tokenizer (for the default evaluation).
        kind (`str`, defaults to `"multiple_choice"`): Task kind for the default evaluation.
        batch_size (`int`, defaults to 8): Batch size of the default evaluation.
        eval_fn (`EvalFn`, *optional*): Overrides the default evaluation (its name enters the state fingerprint).
        state_path (`str` or `os.PathLike`, *optional*): JSON state file for resuming.
        base ([`EvalSummary`], *optional*): A finished evaluation of the unmodified model on `validation` to reuse
            (still counted as one evaluation, its seconds added to the wall time).
        guard ([`SelectionGuard`], *optional*): Keep the best candidate only if it passes this paired-bootstrap
            test (Bonferroni-corrected for the whole grid). Default `None`: LASER as published, the best on
            validation if it beats the unmodified model, which is what a fair LASER-vs-C2I comparison runs.
        progress (`bool`, defaults to `True`): Show a progress bar.

    Raises:
        [`~peft_spectral.state.StateFileError`]: if the state file is empty, truncated, or belongs to another search
            (another model, other candidates, other validation examples or other scoring settings).
    """
    validation = take_examples(validation, None, "validation")
    if not candidates:
        raise ValueError("no LASER candidates")
    keys = [iv.key for iv in candidates]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate LASER candidates")
    fp = laser_fingerprint(model, candidates, validation, _scoring_settings(kind, eval_fn))
    eval_fn = eval_fn or default_eval_fn(tokenizer, kind, batch_size=batch_size)
    processes = launched_state()
    writer = processes is None or processes.is_main_process
    state = _StateFile(Path(state_path) if state_path else None, fp, len(candidates), writer=writer)
    if processes is not None:
        processes.wait_for_everyone()  # every process has read the state file before the main one rewrites it
    if state.data["base"] is None:
        if base is not None:
            state.add_seconds(base.seconds)
        else:
            base = timed_eval(eval_fn, model, validation)
        state.data["base"] = base.to_dict()
        state.data["evaluations"] += 1
        state.save()
    _run_grid(model, validation, candidates, eval_fn, state, progress and writer, processes)
    if processes is not None:
        processes.wait_for_everyone()  # the state file is complete before any process returns
    base = EvalSummary(**state.data["base"])
    results = [(iv, EvalSummary(**state.data["results"][iv.key])) for iv in candidates]
    scored, (chosen, best) = _choose(results, base, validation, guard)
    selection = (
        {"rule": "plain"} if guard is None else {"rule": "paired_bootstrap", "guard": dataclasses.asdict(guard)}
    )
    return SearchResult(
        method="laser",
        chosen=chosen,
        base=base,
        best=best,
        evaluations=int(state.data["evaluations"]),
        evaluated_examples=int(state.data["evaluations"]) * len(validation),
        wall_time_s=float(state.data["elapsed_s"]),
        timings={"evaluation_s": float(state.data["elapsed_s"])},
        candidates=scored,
        selection={**selection, "n_tested": len(scored)},
    )


def _run_grid(model, validation, candidates, eval_fn, state: _StateFile, progress: bool, processes=None) -> None:
    from tqdm.auto import tqdm

    cache = TruncationCache(model, {})
    todo = [iv for iv in candidates if iv.key not in state.data["results"]]
    done = len(candidates) - len(todo)
    bar = tqdm(total=len(candidates), initial=done, desc="LASER", disable=not progress, unit="eval")

    def evaluate(iv: Intervention) -> EvalSummary:
        with apply_interventions(model, [iv], cache=cache):
            r = timed_eval(eval_fn, model, validation)
        cache.clear()  # every candidate is used once
        return r

    def record(finished: list) -> None:
        for i, r in finished:
            state.data["results"][todo[i].key] = r.to_dict()
            state.data["evaluations"] += 1
        state.save()
        bar.update(len(finished))
        bar.set_postfix(acc=f"{finished[-1][1].accuracy:.3f}")

    try:
        map_across_processes(evaluate, todo, processes, on_round=record)
    finally:
        bar.close()
        state.save()
