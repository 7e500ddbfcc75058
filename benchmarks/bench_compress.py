"""Benchmark: LASER exhaustive search vs Compress to Impress (C2I) on BigBench tasks, with intervals and paired tests.

For each task, on the same candidate set (matrices × layers × rho, see --matrices/--layers/--rhos):

1. base model: its verdict on every test example;
2. LASER: every candidate evaluated on the first --n-val validation examples (resumable state in --state-dir);
3. C2I standard ("100 grads + standard eval"): one gradient pass on --n-grad training examples ranks the candidates,
   the --top-k best are evaluated on the first --n-eval validation examples, once per scoring rule of --scores
   (`first_order`: ΔL ≈ −Σ σ_i g_i over the dropped directions; `raw`: −Σ g_i). Both rules rank the candidates from
   the *same* gradient pass (`c2i_scores` once, then `c2i_search(scores=...)`, which only re-ranks): the SVDs and
   gradients are computed once per task, and each method's reported time still counts that scoring in full, plus
   its own evaluations (a candidate that both rules pick is evaluated by each, as each would on its own);
4. C2I clustered ("100G-100E"): the same gradient pass, multi-subspace truncation (--clusters row clusters), top-k
   evaluated on the same --n-eval examples; ranked with `first_order` only (the clustered mode is not run per rule);

then each search's chosen adapter (a real SpectralCompress PEFT adapter) is scored on the first --n-test test examples
(the whole test split when it is smaller), the same examples for every method. A method that keeps no intervention
*is* the base model, so its test verdicts are the base model's (Δ exactly 0).

Reported for every method (`peft_spectral.stats`): test accuracy with its 95% Wilson interval and n; Δ vs the base
model on the same test examples with the paired bootstrap 95% interval and the exact McNemar p (`*` when the interval
excludes 0); for multiple-choice tasks balanced accuracy and its paired Δ (`compare_balanced`). Per task, the issue's
two goals: is any method significantly below the base model (the failure case: C2I lowering test accuracy on an
unseen task), and is C2I's test accuracy ≥ LASER's (paired Δ C2I − LASER with its interval). How well each scoring
rule predicts what LASER measured (Spearman correlation of the score with every candidate's validation loss and
accuracy change, and the rank it gives LASER's best candidate) is reported too. The per-example verdicts are kept in
the JSON, so every number can be recomputed. Writes `compress.json`, `compress.md` (tables) and `compress.png`
(per-matrix C2I scores by layer) to --out.

Defaults follow the issue's protocol: 100 gradient examples, C2I and LASER both select on the same 100 validation
examples, 200 test examples; 4 two-option BigBench tasks, two of the previous run (`sports_understanding`,
`navigate`) and two it never used (`winowhy`, `strategyqa`); 40 candidates (up_proj, down_proj × layers 18, 21, 24,
27, 29 × rho 0.2, 0.1, 0.05, 0.01). The script prints its time estimate at the start (from the previous run's 2–4 s
per evaluation of 20 examples, i.e. 0.1–0.2 s per evaluated example on a 2-core CPU) and progress lines with an ETA
from the speed measured so far. It is resumable after a kill: LASER writes every finished candidate to
`--state-dir/laser_<task>.json`, every finished task is written to `--state-dir/compress_<task>.partial.json`, and
re-running the same command skips both (`--fresh` starts over; `--from-partials` only rebuilds the report from the
finished tasks). Timings are wall-clock on whatever machine runs it (all in the same run, so ratios are comparable).

    python benchmarks/bench_compress.py --threads 2   # the documented default setting (~40–80 min on 2 cores)
    python benchmarks/bench_compress.py --estimate-only   # the time estimate alone (loads the tasks' data only)
    python benchmarks/bench_compress.py --smoke       # tiny random model, planted task + a task nothing can improve
    python benchmarks/bench_compress.py --from-partials   # report from the finished tasks of an unfinished run
    python benchmarks/bench_compress.py --profile --smoke   # phase times of the gradient pass (tiny model)
    python benchmarks/bench_compress.py --profile --n-grad 100 --batch-size 8   # ... on the embedded model

C2I keeps a candidate only when it passes the paired-bootstrap guard (`--c2i-selection plain` turns it off); LASER
keeps its best candidate when it beats the unmodified model, as published (`--laser-guard` applies the guard too).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from peft_spectral import compress as C  # noqa: E402
from peft_spectral.evaluation import evaluate  # noqa: E402
from peft_spectral.expert_eval import paired_report  # noqa: E402
from peft_spectral.stats import compare_paired  # noqa: E402


logger = logging.getLogger("bench_compress")

DEFAULT_TASKS = ["sports_understanding", "navigate", "winowhy", "strategyqa"]
DEFAULT_MATRICES = ["up_proj", "down_proj"]
DEFAULT_LAYERS = [18, 21, 24, 27, 29]
DEFAULT_RHOS = [0.2, 0.1, 0.05, 0.01]
SCORE_RULES = ("first_order", "raw")
FULL_GRID = 30 * 7 * 7  # SmolLM2-135M: 30 layers × 7 matrix types × 7 rho
EMBEDDED_MODEL = "SmolLM2-135M-Instruct (embedded GGUF, fp32)"
SMOKE_MODEL = "tiny random Llama (smoke test)"
#: Seconds per evaluated example on the embedded model, 2-core CPU: the previous run measured 2–4 s per evaluation
#: of 20 examples (log-likelihood scoring of two options).
SECONDS_PER_EXAMPLE = (0.1, 0.2)
#: The gradient pass costs about this many evaluated examples per calibration example (previous run: 35–66 s for
#: 100 gradient examples against 9–17 s for an evaluation of 100 examples).
GRADIENT_UNITS_PER_EXAMPLE = 4.0


# ------------------------------------------------------------------------------------------- plan, progress, state


def method_names(scores) -> list[str]:
    """The methods of a run, in table order."""
    return ["laser"] + [f"c2i-standard ({rule})" for rule in scores] + ["c2i-clustered (first_order)"]


def c2i_methods(row: dict) -> list[str]:
    return [m for m in row["methods"] if m.startswith("c2i")]


def split_sizes(task, args) -> dict:
    """How many examples each phase of `task` uses (a split smaller than asked is used whole)."""
    return {
        "n_val": min(args.n_val, len(task.validation)),
        "n_eval": min(args.n_eval, len(task.validation)),
        "n_grad": min(args.n_grad, len(task.train)),
        "n_test": min(args.n_test, len(task.test)),
    }


def candidates_count(args, n_layers: int) -> int:
    return len(args.matrices) * n_layers * len(args.rhos)


def task_plan(sizes: dict, n_candidates: int, args) -> dict:
    """Planned work of one task in evaluated examples ("units"); the test phase assumes every method keeps a
    different intervention (an upper bound: a method that keeps nothing, or the same as another, costs nothing)."""
    top_k = min(args.top_k, n_candidates)
    n_rules = len(args.scores)
    return {
        "base_test": sizes["n_test"],
        "base_val": sizes["n_val"],
        "laser": n_candidates * sizes["n_val"],
        "gradient": GRADIENT_UNITS_PER_EXAMPLE * sizes["n_grad"],
        "base_eval": 0 if sizes["n_eval"] == sizes["n_val"] else sizes["n_eval"],
        "c2i": (n_rules + 1) * top_k * sizes["n_eval"],
        "test": (n_rules + 2) * sizes["n_test"],
    }


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


class Progress:
    """Planned work in evaluated examples, the seconds per example measured in this run, and the ETA lines."""

    def __init__(self, planned_units: float, prior_s_per_unit: float):
        self.planned = float(planned_units)
        self.prior = prior_s_per_unit
        self.done = 0.0
        self.work_s = 0.0
        self.start = time.perf_counter()

    def skip(self, units: float) -> None:
        """Planned work that turned out not to be needed (found in the state, or a test evaluation shared)."""
        self.planned = max(0.0, self.planned - units)

    def did(self, units: float, seconds: float, what: str) -> None:
        self.done += units
        self.work_s += seconds
        self.planned = max(0.0, self.planned - units)
        spu = self.work_s / self.done if self.done else self.prior
        elapsed = time.perf_counter() - self.start
        print(
            f"[{_minutes(elapsed)} elapsed, ETA ~{_minutes(self.planned * spu)} at {spu:.3f} s/example] {what}",
            flush=True,
        )


def _safe(name: str) -> str:
    return name.replace("/", "__")


def partial_path(state_dir: Path, name: str) -> Path:
    return state_dir / f"compress_{_safe(name)}.partial.json"


def laser_state_path(state_dir: Path, name: str) -> Path:
    return state_dir / f"laser_{_safe(name)}.json"


def run_settings(args, model_name: str) -> dict:
    """What defines a task's results: a finished task is reused only by a run with the same settings."""
    return {
        "model": model_name,
        "matrices": list(args.matrices),
        "layers": list(args.layers),
        "rhos": list(args.rhos),
        "n_val": args.n_val,
        "n_eval": args.n_eval,
        "n_grad": args.n_grad,
        "n_test": args.n_test,
        "top_k": args.top_k,
        "clusters": args.clusters,
        "scores": list(args.scores),
        "c2i_selection": args.c2i_selection,
        "laser_guard": bool(args.laser_guard),
        "batch_size": args.batch_size,
    }


def load_partial(state_dir: Path, name: str, settings: dict):
    """A finished task of an earlier run with the same settings, else `None`."""
    path = partial_path(state_dir, name)
    if not path.is_file():
        return None
    try:
        row = json.loads(path.read_text())
    except json.JSONDecodeError:
        print(f"{path}: unreadable, the task is run again", flush=True)
        return None
    if row.get("settings") != settings:
        print(f"{path}: made with other settings, the task is run again", flush=True)
        return None
    return row


def laser_done(path: Path) -> int:
    """Candidates already evaluated in a LASER state file (for the estimate; the search checks the fingerprint)."""
    try:
        return len(json.loads(path.read_text()).get("results", {}))
    except (OSError, json.JSONDecodeError):
        return 0


# ----------------------------------------------------------------------------------------------- test evaluation


def _test_eval(model, tok, task, test, result, batch_size, cache):
    """Per-example test verdicts of a search's chosen adapter (built as a PEFT adapter), plus its compressed-module
    memory; `(None, {}, 0)` when the search kept nothing (its verdicts are then the base model's).

    Results are cached by the chosen set, so two methods that chose the same interventions share one evaluation; the
    last element is the number of test examples evaluated by this call (0 when cached).
    """
    if not result.chosen:
        return None, {}, 0
    key = tuple(sorted(iv.key for iv in result.chosen))
    if key in cache:
        return (*cache[key], 0)
    adapted = C.apply_result(model, result)
    try:
        ev = evaluate(adapted, tok, test, kind=task.kind, batch_size=batch_size)
        report = adapted.base_model.compression_report()
    finally:
        adapted.unload()
        if hasattr(model, "peft_config"):
            del model.peft_config
    memory = {
        "dense_bytes": sum(r["dense_bytes"] for r in report.values()),
        "factor_bytes": sum(r["factor_bytes"] for r in report.values()),
        "modules": report,
    }
    cache[key] = (ev, memory)
    return ev, memory, len(test)


def test_entry(base_test, ev, labels) -> dict:
    """A method's test block: accuracy with its Wilson interval and verdicts, Δ vs base (paired bootstrap, exact
    McNemar), balanced accuracy Δ for multiple-choice tasks. `ev=None`: the method kept nothing, so it is the base."""
    kept_nothing = ev is None
    report = paired_report(base_test, base_test if kept_nothing else ev, labels=labels)
    entry = {**report["adapter"], "kept_nothing": kept_nothing, "delta": report["delta"]}
    if "balanced" in report:
        entry["balanced"] = report["balanced"]
    entry["text"] = {k: v for k, v in report["text"].items() if k != "base"}
    return entry


def _comparison_dict(c) -> dict:
    return {**asdict(c), "significant": c.significant}


def task_goals(row: dict) -> dict:
    """The issue's two goals on one task's test split.

    - `below_base`: methods whose test accuracy is significantly below the base model's (paired bootstrap interval
      of Δ entirely below 0); `below_base_balanced`: the same for balanced accuracy (multiple choice);
      `c2i_below_base`: the C2I ones among them (the issue's failure case);
    - `c2i_vs_laser`: per C2I method, the paired Δ C2I − LASER on the same test examples (interval, McNemar p),
      `at_least_laser` (point Δ ≥ 0) and `significantly_below_laser`.
    """
    methods = row["methods"]
    below = [m for m, e in methods.items() if e["test"]["delta"]["high"] < 0]
    below_bal = [m for m, e in methods.items() if "balanced" in e["test"] and e["test"]["balanced"]["high"] < 0]
    laser = methods["laser"]["test"]["correct"]
    vs = {}
    for m in c2i_methods(row):
        c = compare_paired(laser, methods[m]["test"]["correct"])
        vs[m] = {
            **_comparison_dict(c),
            "at_least_laser": c.delta >= 0,
            "significantly_below_laser": c.high < 0,
        }
    return {
        "below_base": below,
        "below_base_balanced": below_bal,
        "c2i_below_base": [m for m in below + below_bal if m.startswith("c2i")],
        "c2i_vs_laser": vs,
    }


def overall_goals(rows: list) -> dict:
    """The goals over all tasks: no C2I method significantly below base anywhere; C2I ≥ LASER per task."""
    violations = [f"{m} on {r['task']}" for r in rows for m in dict.fromkeys(r["goals"]["c2i_below_base"])]
    others = [f"{m} on {r['task']}" for r in rows for m in r["goals"]["below_base"] if not m.startswith("c2i")]
    at_least = {}
    for r in rows:
        for m, c in r["goals"]["c2i_vs_laser"].items():
            at_least.setdefault(m, {"tasks": 0, "at_least_laser": 0, "significantly_below_laser": 0})
            at_least[m]["tasks"] += 1
            at_least[m]["at_least_laser"] += int(c["at_least_laser"])
            at_least[m]["significantly_below_laser"] += int(c["significantly_below_laser"])
    return {
        "c2i_never_significantly_below_base": {"met": not violations, "violations": violations},
        "other_methods_significantly_below_base": others,
        "c2i_at_least_laser": at_least,
    }


# ---------------------------------------------------------------------------------------------- scoring rules


def average_ranks(values) -> np.ndarray:
    """Ranks 1..n of `values`, ties sharing their average rank."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[order[j + 1]] == values[order[i]]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x, y):
    """Spearman rank correlation (`None` when either side is constant)."""
    rx, ry = average_ranks(x), average_ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def ranking_quality(ranked, laser) -> dict:
    """How well a C2I ranking (most promising first) predicts what LASER measured on every candidate.

    `spearman_loss`: rank correlation of the score (predicted ΔL) with the measured change of the validation loss
    (minus the change of the gold answer's mean per-token log-likelihood); `spearman_accuracy`: with minus the change
    of validation accuracy (positive = the score predicts well, for both); `laser_best_rank`: the rank (1 = first)
    the score gives LASER's best candidate on validation; `laser_best_in_top_k`: whether C2I evaluated it.
    """
    measured = {c.intervention.key: c.result for c in laser.candidates if c.result is not None}
    base = laser.base
    pairs = [(c.score, measured[c.intervention.key]) for c in ranked if c.intervention.key in measured]
    if len(pairs) < 2:
        return {"candidates": len(pairs)}
    scores = [s for s, _ in pairs]
    d_loss = [-(r.mean_loglik - base.mean_loglik) for _, r in pairs]
    d_err = [-(r.accuracy - base.accuracy) for _, r in pairs]
    best = max(laser.candidates, key=lambda c: c.result.key()).intervention.key
    order = [c.intervention.key for c in ranked]
    rank = order.index(best) + 1 if best in order else None
    return {
        "candidates": len(pairs),
        "spearman_loss": spearman(scores, d_loss),
        "spearman_accuracy": spearman(scores, d_err),
        "laser_best": best,
        "laser_best_rank": rank,
        "laser_best_in_top_k": None,  # filled by the caller, which knows top-k
    }


# ----------------------------------------------------------------------------------------------------- one task


def run_task(name, model, tok, task, args, state_dir, progress, settings):
    modules = C.find_target_modules(model, args.matrices, args.layers)
    grid = C.candidate_grid(modules, args.rhos)
    sizes = split_sizes(task, args)
    validation = C.take_examples(task.validation, sizes["n_val"], "validation (LASER)")
    evaluation = C.take_examples(task.validation, sizes["n_eval"], "evaluation (C2I)")
    calibration = C.take_examples(task.train, sizes["n_grad"], "calibration (train)")
    test = C.take_examples(task.test, sizes["n_test"], "test")
    labels = [ex.label for ex in test] if task.kind == "multiple_choice" else None
    plan = task_plan(sizes, len(grid), args)
    bs = args.batch_size
    row = {
        "task": name,
        "kind": task.kind,
        "settings": settings,
        "n_val": len(validation),
        "n_eval": len(evaluation),
        "n_grad": len(calibration),
        "n_test": len(test),
        "test_split_size": len(task.test),
        "candidates": len(grid),
        "modules": modules,
        "rhos": list(args.rhos),
    }
    print(
        f"\n=== {name}: {len(grid)} candidates; LASER selects on {len(validation)} validation examples, C2I on "
        f"{len(evaluation)}; {len(calibration)} gradient examples; test {len(test)} (of {len(task.test)})",
        flush=True,
    )

    t = time.perf_counter()
    base_test = evaluate(model, tok, test, kind=task.kind, batch_size=bs)
    row["test_eval_s"] = time.perf_counter() - t
    row["test_labels"] = labels
    row["test_base"] = paired_report(base_test, base_test)["base"]
    row["base_test_acc"] = base_test.accuracy
    progress.did(plan["base_test"], row["test_eval_s"], f"{name}: base test {row['test_base']['accuracy']:.3f}")

    # The unmodified model on the validation split: one evaluation, reused (and counted) by every search using it.
    eval_fn = C.default_eval_fn(tok, task.kind, batch_size=bs)
    base_val = eval_fn(model, validation)
    progress.did(plan["base_val"], base_val.seconds, f"{name}: base validation {base_val.accuracy:.3f}")

    state = laser_state_path(state_dir, name)
    done_before = laser_done(state)
    if done_before:
        print(f"{name}: LASER resumes from {state}: {done_before} of {len(grid)} candidates already evaluated")
    progress.skip(done_before * len(validation))
    t = time.perf_counter()
    laser = C.laser_search(
        model,
        validation,
        grid,
        tokenizer=tok,
        kind=task.kind,
        batch_size=bs,
        state_path=state,
        base=base_val,
        guard=C.SelectionGuard() if args.laser_guard else None,  # LASER as published unless asked
        progress=True,
    )
    progress.did(
        (len(grid) - done_before) * len(validation),
        time.perf_counter() - t,
        f"{name}: LASER {laser.evaluations} evals, {laser.wall_time_s:.0f} s, chosen {[str(i) for i in laser.chosen]}",
    )

    # One gradient pass serves every C2I method; each method's reported time includes it in full.
    scores = C.c2i_scores(model, calibration, modules, tokenizer=tok, batch_size=bs)
    progress.did(
        plan["gradient"],
        scores.seconds,
        f"{name}: C2I scoring: SVD {scores.timings['svd_s']:.0f} s, gradient {scores.timings['gradient_s']:.0f} s",
    )
    same_eval = [ex.prompt for ex in evaluation] == [ex.prompt for ex in validation]
    if same_eval:
        base_eval = base_val
    else:
        base_eval = eval_fn(model, evaluation)
        progress.did(plan["base_eval"], base_eval.seconds, f"{name}: base on the C2I evaluation examples")
    guard = None if args.c2i_selection == "plain" else C.SelectionGuard()
    config = C.C2ISearchConfig(
        rhos=args.rhos, top_k=args.top_k, n_eval=None, guard=guard, kind=task.kind, batch_size=bs
    )
    runs = [(f"c2i-standard ({rule})", rule, 1) for rule in args.scores]
    runs.append(("c2i-clustered (first_order)", "first_order", args.clusters))
    results, rules = [laser], {"laser": None}
    for method, rule, clusters in runs:
        rules[method] = rule
        res = C.c2i_search(
            model,
            calibration,
            evaluation,
            modules,
            dataclasses.replace(config, clusters=clusters, method=method, score=rule),
            tokenizer=tok,
            scores=scores,
            base=base_eval,
        )
        results.append(res)
        own = res.timings["evaluation_s"] - base_eval.seconds
        progress.did(
            (res.evaluations - 1) * len(evaluation),
            own,
            f"{name}: {method}: {res.evaluations} evals, {res.wall_time_s:.0f} s, chosen {[str(i) for i in res.chosen]}",
        )
        progress.skip(plan["c2i"] / len(runs) - (res.evaluations - 1) * len(evaluation))

    row["methods"] = {}
    cache = {}
    for res in results:
        t = time.perf_counter()
        ev, memory, n_evaluated = _test_eval(model, tok, task, test, res, bs, cache)
        entry = res.to_dict()
        entry["score_rule"] = rules[res.method]
        entry["test"] = test_entry(base_test, ev, labels)
        entry["test_acc"] = entry["test"]["accuracy"]
        entry["memory"] = {k: v for k, v in memory.items() if k != "modules"}
        entry["memory_modules"] = memory.get("modules", {})
        row["methods"][res.method] = entry
        what = f"{name}: {res.method}: test {entry['test']['text']['adapter']}, {entry['test']['text']['delta']}"
        if n_evaluated:
            progress.did(n_evaluated, time.perf_counter() - t, what)
            progress.skip(len(test) - n_evaluated)
        else:
            progress.skip(len(test))
            print(what + (" (kept nothing: the base model)" if not res.chosen else " (same choice as above)"))

    row["scoring_rules"] = {}
    for res in results[1 : 1 + len(args.scores)]:
        quality = ranking_quality(res.candidates, laser)
        if quality.get("laser_best_rank") is not None:
            quality["laser_best_in_top_k"] = quality["laser_best_rank"] <= res.selection["n_tested"]
        row["scoring_rules"][res.method] = quality
    eval_times = [c.result.seconds for c in laser.candidates if c.result is not None and c.result.seconds > 0]
    mean_eval = sum(eval_times) / max(1, len(eval_times))
    row["laser_mean_eval_s"] = mean_eval
    row["laser_full_grid_projected_s"] = (FULL_GRID + 1) * mean_eval
    row["c2i_scoring_s"] = scores.seconds
    for m in c2i_methods(row):
        e = row["methods"][m]
        e["speedup_vs_laser"] = laser.wall_time_s / max(e["wall_time_s"], 1e-9)
        e["eval_ratio_vs_laser"] = laser.evaluations / max(e["evaluations"], 1)
    row["goals"] = task_goals(row)
    from peft_spectral.state import write_json_atomic

    write_json_atomic(partial_path(state_dir, name), row)
    return row


def full_grid_scoring(model, tok, task, args):
    """Measured cost of C2I's scoring phase on the full grid (all linear matrices of all layers): SVD + gradient."""
    modules = C.find_target_modules(model, C.MATRIX_TYPES)
    calibration = C.take_examples(task.train, args.n_grad, "calibration (train)")
    from peft_spectral.svd_cache import SVDCache

    cache = SVDCache()
    t = time.perf_counter()
    svds = C.compute_svds(model, modules, cache=cache)
    t_svd = time.perf_counter() - t
    t = time.perf_counter()
    grads, _ = C.singular_value_gradients(
        model, calibration, modules, svds=svds, tokenizer=tok, batch_size=args.batch_size
    )
    t_grad = time.perf_counter() - t
    ranked = C.score_candidates(grads, svds, C.LASER_RHOS)
    n_grad = len(calibration)
    del svds, grads
    per_matrix = {}
    for c in ranked:
        iv = c.intervention
        per_matrix[iv.module] = min(per_matrix.get(iv.module, float("inf")), c.score)
    return {
        "modules": len(modules),
        "candidates": len(ranked),
        "svd_s": t_svd,
        "gradient_s": t_grad,
        "svd_cache_hits": cache.hits,
        "svd_cache_misses": cache.misses,
        "n_grad": n_grad,
        "per_matrix_best_score": per_matrix,
        "top10": [(str(c.intervention), c.score) for c in ranked[:10]],
    }


# ------------------------------------------------------------------------------------------------------- reports


def plot(rows, full, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    if full:
        panels.append(
            (
                f"{full['task']}: all {full['modules']} matrices (min over rho of predicted ΔL)",
                full["per_matrix_best_score"],
            )
        )
    for row in rows:
        standard = [m for m in row["methods"] if m.startswith("c2i-standard")]
        # first-order scores when they were computed (they are in loss units), else the first rule's
        method = "c2i-standard (first_order)" if "c2i-standard (first_order)" in standard else standard[0]
        per = {}
        for c in row["methods"][method]["candidates"]:
            per[c["module"]] = min(per.get(c["module"], float("inf")), c["score"])
        panels.append((f"{row['task']}: benchmark candidates, {method}", per))
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.2 * len(panels)), squeeze=False)
    for ax, (title, per) in zip(axes[:, 0], panels):
        by_type = {}
        for module, score in per.items():
            iv = C.Intervention(module, 1.0)
            by_type.setdefault(iv.matrix, []).append((iv.layer, score))
        for mtype in C.MATRIX_TYPES:
            if mtype in by_type:
                pts = sorted(by_type[mtype])
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, lw=1, label=mtype)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylabel("C2I score (lower = better)")
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def args_n_grad(full):
    return full.get("n_grad", "?")


def _p_text(p: float) -> str:
    if p < 0.001:
        return "p<0.001"
    return f"p={p:.3f}" if p < 0.01 else f"p={p:.2f}"


def fmt_acc(e: dict) -> str:
    """`0.620 [0.55, 0.69] (n=200)`."""
    return f"{e['accuracy']:.3f} [{e['low']:.2f}, {e['high']:.2f}] (n={e['n']})"


def fmt_delta(d: dict) -> str:
    """`+0.045 [+0.01, +0.08] p=0.02 *` (`*`: the interval excludes 0)."""
    star = " *" if d["low"] > 0 or d["high"] < 0 else ""
    return f"{d['delta']:+.3f} [{d['low']:+.2f}, {d['high']:+.2f}] {_p_text(d['p_value'])}{star}"


def fmt_balanced(b: dict) -> str:
    """`+0.030 [-0.02, +0.08] (bal 0.640)`: the paired Δ of balanced accuracy (`*`: the interval excludes 0), then
    the method's balanced accuracy."""
    star = " *" if b["low"] > 0 or b["high"] < 0 else ""
    return f"{b['delta']:+.3f} [{b['low']:+.2f}, {b['high']:+.2f}]{star} (bal {b['b']:.3f})"


def _chosen(e: dict) -> str:
    text = ", ".join(
        f"{c['module'].replace('model.layers.', 'L')}@{c['rho']:g}"
        + (f"×{c['clusters']}c" if c["clusters"] > 1 else "")
        for c in e["chosen"]
    )
    return text or "none (= base)"


def goals_lines(row: dict) -> list[str]:
    """The per-task goals line(s)."""
    g = row["goals"]
    below = list(dict.fromkeys(g["below_base"] + g["below_base_balanced"]))
    line = f"- **{row['task']}**: " + (
        "no method significantly below base"
        if not below
        else "significantly below base: "
        + ", ".join(m + (" (balanced accuracy)" if m not in g["below_base"] else "") for m in below)
        + (" — **C2I lowers test accuracy here (the issue's failure case)**" if g["c2i_below_base"] else "")
    )
    parts = []
    for m, c in g["c2i_vs_laser"].items():
        verdict = "≥ LASER" if c["at_least_laser"] else "< LASER"
        if c["significantly_below_laser"]:
            verdict += ", significantly"
        parts.append(f"{m} − LASER {fmt_delta(c)} ({verdict})")
    return [line + "; " + "; ".join(parts) + "."]


def markdown(rows, full, meta):
    mc = any(r["kind"] == "multiple_choice" for r in rows)
    n_val = sorted({r["n_val"] for r in rows})
    n_eval = sorted({r["n_eval"] for r in rows})
    n_test = ", ".join(f"{r['task']} {r['n_test']}" for r in rows)
    lines = [
        "# SpectralCompress benchmark: LASER vs Compress to Impress",
        "",
        f"Model: {meta['model']}; machine: {meta['machine']}; run {meta['date']}; total "
        + (_minutes(meta["total_s"]) if meta["total_s"] == meta["total_s"] else "wall time: see per-method times")
        + (f" (estimated beforehand: {meta['estimate']})." if meta.get("estimate") else "."),
        f"Candidates (same for all methods): matrices {meta['matrices']}, layers {meta['layers']}, rho {meta['rhos']}.",
        (
            f"C2I: {meta['n_grad']} gradient examples (one pass per task, shared by all C2I methods and counted in full "
            f"in each one's time), top-{meta['top_k']} evaluated; scoring rules {meta['scores']} for the standard mode, "
            f"first_order for the clustered mode ({meta['clusters']} row clusters). LASER selects on the first "
            f"{'/'.join(map(str, n_val))} validation examples, C2I on the first {'/'.join(map(str, n_eval))}"
            + (" (the same examples)" if n_val == n_eval else "")
            + f". Test examples: {n_test} (the first of each test split, the same for every method). Selection: "
            f"C2I {meta.get('c2i_selection', 'guard')}, LASER {'guard' if meta.get('laser_guard') else 'plain (as published)'}."
            f" Accuracy = multiple-choice log-likelihood scoring; torch threads {meta['threads']}."
        ),
        "",
        (
            "Test accuracy with its 95% Wilson interval; Δ vs base = method minus base model on the same test examples, "
            "paired bootstrap 95% interval, exact McNemar p, `*` when the interval excludes 0"
            + ("; balanced Δ = the same for balanced accuracy (mean of per-label accuracies)." if mc else ".")
            + " A method that keeps nothing is the base model (Δ exactly 0)."
        ),
        "",
        "| task | method | selection acc (base → chosen, n) | test acc [95% CI] (n) | Δ vs base [95% CI] p |"
        + (" balanced Δ [95% CI] |" if mc else "")
        + " search time (s) | evaluations | speed-up vs LASER | compressed-module memory | chosen |",
        "|---|---|---|---|---|" + ("---|" if mc else "") + "---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['task']} | base | | {fmt_acc(row['test_base'])} | | " + ("| " if mc else "") + "| | | | |"
        )
        for m, e in row["methods"].items():
            mem = e["memory"]
            mem_s = (
                f"{mem['factor_bytes'] / 2**20:.2f} MiB vs {mem['dense_bytes'] / 2**20:.2f} MiB dense" if mem else "–"
            )
            speed = f"{e['speedup_vs_laser']:.1f}×" if "speedup_vs_laser" in e else "1×"
            t = e["test"]
            bal = (fmt_balanced(t["balanced"]) if "balanced" in t else "–") + " | " if mc else ""
            lines.append(
                f"| {row['task']} | {m} | {e['base']['accuracy']:.3f} → {e['best']['accuracy']:.3f} (n={e['base']['n']})"
                f" | {fmt_acc(t)} | {fmt_delta(t['delta'])} | {bal}{e['wall_time_s']:.1f} | {e['evaluations']} | "
                f"{speed} | {mem_s} | {_chosen(e)} |"
            )
    goals = meta.get("goals") or overall_goals(rows)
    v = goals["c2i_never_significantly_below_base"]
    lines += [
        "",
        "## Goals",
        "",
        (
            "- No C2I method significantly below the base model on any task's test split (Δ interval entirely below 0, "
            "accuracy or balanced accuracy): **"
            + ("met" if v["met"] else "not met: " + ", ".join(v["violations"]))
            + "**."
            + (
                f" Other methods significantly below base: {', '.join(goals['other_methods_significantly_below_base'])}."
                if goals["other_methods_significantly_below_base"]
                else ""
            )
        ),
        "- C2I test accuracy ≥ LASER's (paired Δ C2I − LASER on the same test examples): "
        + "; ".join(
            f"{m}: ≥ LASER on {c['at_least_laser']} of {c['tasks']} tasks, significantly below on "
            f"{c['significantly_below_laser']}"
            for m, c in goals["c2i_at_least_laser"].items()
        )
        + ".",
        "",
        "Per task:",
        "",
    ]
    for row in rows:
        lines += goals_lines(row)
    lines += [
        "",
        "## Scoring rules: first_order vs raw",
        "",
        (
            "Both rules rank the same candidates from the same gradient pass. Against LASER's measurement of every "
            "candidate on its validation examples: Spearman correlation of the score with the measured change of the "
            "validation loss (gold answer's mean per-token NLL) and with minus the accuracy change (positive = the "
            "score predicts well); the rank the rule gives LASER's best candidate (1 = first; evaluated when ≤ top-k)."
        ),
        "",
        "| task | rule | Spearman vs Δ loss | Spearman vs −Δ acc | rank of LASER's best | chosen | test Δ vs base [95% CI] p |",
        "|---|---|---|---|---|---|---|",
    ]

    def _num(x):
        return "–" if x is None else f"{x:+.2f}"

    for row in rows:
        for m, q in row.get("scoring_rules", {}).items():
            e = row["methods"][m]
            rank = q.get("laser_best_rank")
            rank_s = "–" if rank is None else f"{rank} of {q['candidates']}"
            lines.append(
                f"| {row['task']} | {m.split('(')[-1].rstrip(')')} | {_num(q.get('spearman_loss'))} | "
                f"{_num(q.get('spearman_accuracy'))} | {rank_s} | {_chosen(e)} | {fmt_delta(e['test']['delta'])} |"
            )
    lines += ["", "Projected LASER time on the full grid (1470 candidates + base) from its mean evaluation time:", ""]
    for row in rows:
        lines.append(
            f"- {row['task']}: {row['laser_mean_eval_s']:.1f} s/eval of {row['n_val']} examples → "
            f"{row['laser_full_grid_projected_s'] / 3600:.1f} h"
        )
    if full:
        scoring = full["svd_s"] + full["gradient_s"]
        lines += [
            "",
            (
                f"Measured C2I scoring of the full grid ({full['modules']} matrices, {full['candidates']} "
                f"candidates) on {full['task']}: SVD {full['svd_s']:.1f} s (on-disk SVD cache: {full['svd_cache_hits']} hits, "
                f"{full['svd_cache_misses']} computed) + gradient pass with {args_n_grad(full)} examples "
                f"{full['gradient_s']:.1f} s."
            ),
            f"Projected full-grid C2I standard = that scoring + (1 + top-{meta['top_k']}) evaluations:",
            "",
        ]
        for row in rows:
            c2i = scoring + (1 + meta["top_k"]) * row["laser_mean_eval_s"]
            lines.append(
                f"- {row['task']}: {c2i:.0f} s vs LASER {row['laser_full_grid_projected_s']:.0f} s → "
                f"{row['laser_full_grid_projected_s'] / c2i:.0f}× less search time (projection)"
            )
    return "\n".join(lines) + "\n"


def make_meta(args, model_name, rows, total_s, date_note="", estimate=None) -> dict:
    return {
        "model": model_name,
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()) + date_note,
        "total_s": total_s,
        "estimate": estimate,
        "matrices": args.matrices,
        "layers": args.layers,
        "rhos": args.rhos,
        "scores": list(args.scores),
        "n_grad": args.n_grad,
        "top_k": args.top_k,
        "clusters": args.clusters,
        "n_val": args.n_val,
        "n_eval": args.n_eval,
        "n_test": args.n_test,
        "c2i_selection": args.c2i_selection,
        "laser_guard": bool(args.laser_guard),
        "threads": args.threads,
        "goals": overall_goals(rows),
    }


def write_report(out_dir, stem, rows, full, meta):
    (out_dir / f"{stem}.json").write_text(
        json.dumps({"meta": meta, "tasks": rows, "full_grid_scoring": full}, indent=1)
    )
    (out_dir / f"{stem}.md").write_text(markdown(rows, full, meta))
    plot(rows, full, out_dir / f"{stem}.png")


def rebuild_from_partials(args, out_dir, state_dir):
    paths = [partial_path(state_dir, n) for n in args.tasks]
    rows = [json.loads(p.read_text()) for p in paths if p.exists()]
    if not rows:
        raise SystemExit(f"no partial results found in {state_dir}")
    model_name = rows[0]["settings"]["model"]
    note = f" (partial: {len(rows)} of {len(args.tasks)} tasks)"
    meta = make_meta(args, model_name, rows, float("nan"), date_note=note)
    meta["machine"] = f"{platform.machine()} CPU"
    for key in ("matrices", "layers", "rhos", "scores", "n_grad", "top_k", "clusters", "n_val", "n_eval", "n_test"):
        meta[key] = rows[0]["settings"][key]  # the settings of the run that made the partial files
    stem = "compress_smoke" if model_name == SMOKE_MODEL else "compress"
    write_report(out_dir, stem, rows, None, meta)
    print((out_dir / f"{stem}.md").read_text())
    return rows


def tiny_model_and_tokenizer(seed: int = 1):
    """The tiny random Llama and byte-level tokenizer of `examples/tiny_model.py` (no download)."""
    sys.path.insert(0, str(ROOT / "examples"))
    from tiny_model import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    return tiny_model(tok, seed=seed), tok


def smoke_setup():
    """A tiny model with a planted helpful truncation ([`peft_spectral.compress.planted_problem`]), plus a task that
    the noisy model already answers perfectly, so no truncation can pass the selection guard there (C2I keeps
    nothing: its test verdicts must be the base model's)."""
    from peft_spectral.evaluation import option_logliks
    from peft_spectral.tasks import Example, Task

    model, tok = tiny_model_and_tokenizer(seed=1)
    problem = C.planted_problem(model, tok, "model.layers.1.mlp.down_proj")
    validation, train = problem.validation, problem.train
    planted = Task("planted", "multiple_choice", train=train, validation=validation, test=validation)
    pool = C.random_choice_examples(90, seed=11)
    logliks = option_logliks(problem.model, tok, pool, batch_size=32)
    own = []
    for ex, ll in zip(pool, logliks):
        label = int(torch.tensor(ll).argmax())
        own.append(Example(ex.prompt, ex.choices[label], ex.choices, label))
    agreeing = Task("agreeing", "multiple_choice", train=own[:50], validation=own[50:70], test=own[70:])
    return problem.model, tok, {"planted": planted, "agreeing": agreeing}


def _length_sorted(tok, examples):
    from peft_spectral.prompting import encode_answer, encode_prompt

    return sorted(examples, key=lambda ex: -(len(encode_prompt(tok, ex)) + len(encode_answer(tok, ex.target))))


def _forward_only_s(model, tok, examples, batch_size) -> float:
    """Seconds of the gradient pass's forward (same loss, same batches) without autograd."""
    examples = _length_sorted(tok, examples)
    t = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            C.target_nll(model, tok, examples[i : i + batch_size])
    return time.perf_counter() - t


def profile_gradient_pass(model, tok, examples, modules, batch_size, repeats=3) -> dict:
    """Phase times of C2I's scoring (SVD, forward, backward, projections) against a forward-only pass and an
    evaluation of the same examples. Each measurement is the minimum over `repeats` runs, all in this process, so
    the ratios are comparable even on a loaded machine."""
    t = time.perf_counter()
    svds = C.compute_svds(model, modules)
    svd_s = time.perf_counter() - t
    runs = {}
    for mode in ("once", "each_batch"):
        passes = [
            C.gradient_pass(
                model,
                examples,
                modules,
                svds=svds,
                tokenizer=tok,
                batch_size=batch_size,
                project_each_batch=mode == "each_batch",
            )
            for _ in range(repeats)
        ]
        best = min(passes, key=lambda p: p.timings["forward_s"] + p.timings["backward_s"] + p.timings["projection_s"])
        runs[mode] = {k: best.timings[k] for k in ("forward_s", "backward_s", "projection_s", "batches")}
        runs[mode]["total_s"] = sum(best.timings[k] for k in ("forward_s", "backward_s", "projection_s"))
    forward_s = min(_forward_only_s(model, tok, examples, batch_size) for _ in range(repeats))
    eval_fn = C.default_eval_fn(tok, "multiple_choice", batch_size=batch_size)
    eval_s = min(eval_fn(model, examples).seconds for _ in range(repeats))
    once = runs["once"]
    return {
        "n_examples": len(examples),
        "modules": len(modules),
        "batch_size": batch_size,
        "svd_s": svd_s,
        "gradient_pass": runs,
        "forward_only_s": forward_s,
        "evaluation_s": eval_s,
        "fb_over_forward": (once["forward_s"] + once["backward_s"]) / forward_s,
        "gradient_pass_over_forward": once["total_s"] / forward_s,
        "gradient_pass_over_evaluation": once["total_s"] / eval_s,
        "per_batch_projection_over_once": runs["each_batch"]["total_s"] / once["total_s"],
    }


def run_profile(args, out_dir):
    """`--profile`: phase times of the gradient pass on the tiny model (`--smoke`) or the embedded model."""
    if args.smoke:
        model, tok, tasks = smoke_setup()
        task, matrices, layers, name = tasks["planted"], ["up_proj", "down_proj"], None, "tiny random Llama"
    else:
        from peft_spectral.assets import load_default_model
        from peft_spectral.tasks import load_task

        model, tok = load_default_model()
        model.eval()
        task, matrices, layers = load_task(args.tasks[0], seed=0), args.matrices, args.layers
        name = "SmolLM2-135M-Instruct (embedded GGUF, fp32)"
    modules = C.find_target_modules(model, matrices, layers)
    examples = C.take_examples(list(task.train) + list(task.validation), args.n_grad, "profile")
    report = profile_gradient_pass(model, tok, examples, modules, args.batch_size, repeats=args.profile_repeats)
    report.update({"model": name, "threads": torch.get_num_threads()})
    stem = "compress_profile_smoke" if args.smoke else "compress_profile"
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1))
    write_profile_report(report, out_dir, stem)
    once = report["gradient_pass"]["once"]
    print(
        f"{name}: {report['n_examples']} examples, {report['modules']} candidate matrices, batch {args.batch_size}\n"
        f"  SVD {report['svd_s']:.2f} s; gradient pass: forward {once['forward_s']:.2f} s, backward "
        f"{once['backward_s']:.2f} s, projections {once['projection_s']:.2f} s ({once['batches']} batches)\n"
        f"  forward only {report['forward_only_s']:.2f} s, evaluation {report['evaluation_s']:.2f} s\n"
        f"  forward+backward / forward = {report['fb_over_forward']:.2f}; whole pass / forward = "
        f"{report['gradient_pass_over_forward']:.2f}; per-batch projection costs "
        f"{report['per_batch_projection_over_once']:.2f}x projecting once"
    )
    return report


def write_profile_report(report: dict, out_dir: Path, stem: str) -> None:
    """`STEM.md` (the phases and ratios) and `STEM.png` (one bar per measurement, the gradient pass split by phase)."""
    once, each = report["gradient_pass"]["once"], report["gradient_pass"]["each_batch"]
    lines = [
        f"# C2I gradient pass: where the time goes ({report['model']})",
        "",
        (
            f"Generated by `python benchmarks/bench_compress.py --profile`: {report['n_examples']} examples, "
            f"{report['modules']} candidate matrices, batch {report.get('batch_size', '?')}, {report['threads']} "
            "threads; each time is the minimum of the repeats."
        ),
        "",
        "| phase | seconds |",
        "|---|---:|",
        f"| SVD of the candidate matrices (cached after the first run) | {report['svd_s']:.2f} |",
        f"| gradient pass: forward | {once['forward_s']:.2f} |",
        f"| gradient pass: backward | {once['backward_s']:.2f} |",
        f"| gradient pass: singular-value projections (once, after the last batch) | {once['projection_s']:.2f} |",
        f"| the same projections after every batch | {each['projection_s']:.2f} |",
        f"| forward pass only (no gradient) | {report['forward_only_s']:.2f} |",
        f"| evaluation of the same examples (the LASER unit of work) | {report['evaluation_s']:.2f} |",
        "",
        "| ratio | value | goal |",
        "|---|---:|---|",
        f"| forward + backward / forward | {report['fb_over_forward']:.2f}× | ≈ 3× |",
        f"| whole gradient pass / forward | {report['gradient_pass_over_forward']:.2f}× | — |",
        f"| whole gradient pass / one evaluation | {report['gradient_pass_over_evaluation']:.2f}× | — |",
    ]
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 2.8))
    bars = [
        (
            "gradient pass",
            [("forward", once["forward_s"]), ("backward", once["backward_s"]), ("projections", once["projection_s"])],
        ),
        ("forward only", [("forward", report["forward_only_s"])]),
        ("evaluation", [("evaluation", report["evaluation_s"])]),
        ("SVD", [("SVD", report["svd_s"])]),
    ]
    colours = {"forward": "C0", "backward": "C1", "projections": "C2", "evaluation": "C3", "SVD": "C4"}
    seen = set()
    for y, (label, parts) in enumerate(bars):
        left = 0.0
        for phase, seconds in parts:
            ax.barh(y, seconds, left=left, color=colours[phase], label=None if phase in seen else phase)
            seen.add(phase)
            left += seconds
    ax.set_yticks(range(len(bars)), [b[0] for b in bars])
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title(f"C2I gradient pass, {report['n_examples']} examples, {report['modules']} matrices", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out_dir / f"{stem}.png", dpi=120)
    plt.close(fig)


def print_estimate(tasks, args, state_dir, settings) -> tuple[float, str]:
    """Planned work (evaluated examples) of the tasks still to run, printed with the time it should take."""
    total, lines = 0.0, []
    for name in args.tasks:
        if load_partial(state_dir, name, settings) is not None:
            lines.append(f"  {name}: finished in an earlier run (reused)")
            continue
        task = tasks[name]
        sizes = split_sizes(task, args)
        n_layers = len(args.layers) if args.layers else 0
        plan = task_plan(sizes, candidates_count(args, n_layers), args)
        done = laser_done(laser_state_path(state_dir, name)) * sizes["n_val"]
        units = sum(plan.values()) - done
        total += units
        lo, hi = (units * s for s in SECONDS_PER_EXAMPLE)
        lines.append(
            f"  {name}: LASER {plan['laser'] // max(1, sizes['n_val']) + 1} evals of {sizes['n_val']} examples"
            + (f" ({done // sizes['n_val']} already done)" if done else "")
            + f", C2I {len(args.scores) + 1} searches × top-{args.top_k} of {sizes['n_eval']}, gradient "
            f"{sizes['n_grad']}, test ≤ {len(args.scores) + 3} × {sizes['n_test']}: {units:.0f} evaluated examples, "
            f"{_minutes(lo)}–{_minutes(hi)}"
        )
    lo, hi = (total * s for s in SECONDS_PER_EXAMPLE)
    estimate = f"{_minutes(lo)}–{_minutes(hi)}"
    print(
        f"Estimated run time: {estimate} ({total:.0f} evaluated examples at {SECONDS_PER_EXAMPLE[0]}–"
        f"{SECONDS_PER_EXAMPLE[1]} s each: the embedded model on 2 CPU cores, as measured by the previous run; the "
        "test phase counted as if every method kept a different intervention)"
        + ("; the smoke test's tiny model is far faster" if args.smoke else ""),
        flush=True,
    )
    print("\n".join(lines), flush=True)
    return total, estimate


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS)
    p.add_argument("--matrices", nargs="+", default=DEFAULT_MATRICES)
    p.add_argument("--layers", type=int, nargs="+", default=DEFAULT_LAYERS)
    p.add_argument("--rhos", type=float, nargs="+", default=DEFAULT_RHOS)
    p.add_argument(
        "--scores",
        nargs="+",
        choices=SCORE_RULES,
        default=list(SCORE_RULES),
        help="C2I standard scoring rules, each a method ranked from the same gradient pass (clustered: first_order)",
    )
    p.add_argument("--n-val", type=int, default=100, help="LASER validation examples (the first of the split)")
    p.add_argument("--n-grad", type=int, default=100, help="C2I gradient examples (the paper's 100)")
    p.add_argument(
        "--n-eval",
        type=int,
        default=100,
        help="C2I evaluation examples, the first of the validation split (the paper's 100; = --n-val: the same as LASER)",
    )
    p.add_argument("--n-test", type=int, default=200, help="test examples (the whole test split when smaller)")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument(
        "--budget-min",
        type=float,
        default=90.0,
        help="skip the optional full-grid scoring when it would not fit in this total wall time",
    )
    p.add_argument("--clusters", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--full-grid-scoring", action="store_true", help="also time C2I scoring of all matrices (task 1)")
    p.add_argument(
        "--state-dir",
        default=None,
        help="LASER states and finished tasks, for resuming (default: runs/bench_compress_state; with --smoke: "
        "OUT/compress_smoke_state)",
    )
    p.add_argument("--fresh", action="store_true", help="ignore and delete the state of earlier runs of these tasks")
    p.add_argument("--out", default=str(ROOT / "docs" / "results"))
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: 1 when the machine is loaded, else all cores)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny random model: a planted task and a task it answers perfectly, 4 candidates, small splits",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="only time the phases of C2I's gradient pass (SVD, forward, backward, projections) against a forward "
        "pass and an evaluation of the same --n-grad examples; with --smoke on the tiny model, else on the embedded "
        "model (task: the first of --tasks; candidates: --matrices/--layers)",
    )
    p.add_argument("--profile-repeats", type=int, default=3, help="--profile: runs per measurement (the minimum)")
    p.add_argument(
        "--c2i-selection",
        choices=("guard", "plain"),
        default="guard",
        help="how C2I keeps a candidate: the paired-bootstrap guard (default) or better-on-the-evaluation-examples",
    )
    p.add_argument(
        "--laser-guard",
        action="store_true",
        help="apply the paired-bootstrap guard to LASER's choice too (default: LASER as published)",
    )
    p.add_argument(
        "--estimate-only",
        action="store_true",
        help="print the time estimate (tasks' data loaded, no model) and stop",
    )
    p.add_argument(
        "--from-partials",
        action="store_true",
        help="only rebuild compress.json/md/png from the finished tasks (--state-dir) of an unfinished run",
    )
    args = p.parse_args(argv)
    args.scores = list(dict.fromkeys(args.scores))
    logging.basicConfig(level=logging.WARNING)
    if args.threads is None:
        args.threads = 1 if os.getloadavg()[0] > 1.5 else (os.cpu_count() or 1)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.profile:
        return run_profile(args, out_dir)
    if args.smoke:
        args.layers, args.matrices, args.tasks = [1], ["up_proj", "down_proj"], ["planted", "agreeing"]
        args.rhos = [0.9, 0.2]
        args.n_val = args.n_eval = args.n_test = 20
        args.n_grad = 40
    default_state = out_dir / "compress_smoke_state" if args.smoke else ROOT / "runs" / "bench_compress_state"
    state_dir = Path(args.state_dir) if args.state_dir else default_state
    state_dir.mkdir(parents=True, exist_ok=True)
    if args.from_partials:
        return rebuild_from_partials(args, out_dir, state_dir)
    if args.fresh:
        for name in args.tasks:
            partial_path(state_dir, name).unlink(missing_ok=True)
            laser_state_path(state_dir, name).unlink(missing_ok=True)
    t0 = time.perf_counter()
    model_name = SMOKE_MODEL if args.smoke else EMBEDDED_MODEL
    settings = run_settings(args, model_name)
    if args.smoke:
        model, tok, tasks = smoke_setup()
    else:
        from peft_spectral.tasks import load_task

        tasks = {name: load_task(name, seed=0) for name in args.tasks}
    planned, estimate = print_estimate(tasks, args, state_dir, settings)
    if args.estimate_only:
        return {"planned_examples": planned, "estimate": estimate}
    if not args.smoke:
        from peft_spectral.assets import load_default_model

        model, tok = load_default_model()
        model.eval()
    progress = Progress(planned, sum(SECONDS_PER_EXAMPLE) / 2)
    rows, full = [], None
    for name in args.tasks:
        row = load_partial(state_dir, name, settings)
        if row is not None:
            print(f"\n=== {name}: finished in an earlier run, reused ({partial_path(state_dir, name)})", flush=True)
        else:
            row = run_task(name, model, tok, tasks[name], args, state_dir, progress, settings)
        rows.append(row)
    if args.full_grid_scoring:
        elapsed = time.perf_counter() - t0
        estimate_full = 3 * rows[0]["c2i_scoring_s"] + 60  # gradient pass + SVDs and projections of all matrices
        if elapsed + estimate_full < 60 * args.budget_min:
            name = args.tasks[0]
            full = full_grid_scoring(model, tok, tasks[name], args)
            full["task"] = name
            print(f"full-grid C2I scoring: SVD {full['svd_s']:.1f} s, gradient {full['gradient_s']:.1f} s", flush=True)
        else:
            print(f"skipping full-grid scoring: {elapsed:.0f} s elapsed, ~{estimate_full:.0f} s needed", flush=True)
    meta = make_meta(args, model_name, rows, time.perf_counter() - t0, estimate=estimate)
    stem = "compress_smoke" if args.smoke else "compress"
    write_report(out_dir, stem, rows, full, meta)
    for name in args.tasks:
        partial_path(state_dir, name).unlink(missing_ok=True)
    print((out_dir / f"{stem}.md").read_text())
    return {"meta": meta, "tasks": rows, "full_grid_scoring": full}


if __name__ == "__main__":
    main()
