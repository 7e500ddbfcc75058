"""Benchmark: LASER's exhaustive search vs Compress to Impress (C2I) on reasoning-gym tasks, with paired tests.

Per task (`--tasks`), on one candidate set (`--matrices` × `--layers` × `--rhos`): LASER evaluates every candidate
on the first `--n-val` validation examples and keeps the best if it beats the unmodified model (as published);
C2I standard ranks the candidates by one gradient pass on `--n-grad` training examples and evaluates the `--top-k`
best on the first `--n-eval` validation examples, once per scoring rule (`--scores`: `first_order` −Σ σ_i g_i,
`raw` −Σ g_i) from the *same* pass, whose time each method counts in full; C2I clustered does the same with
multi-subspace truncation (`--clusters`), ranked by `first_order`. C2I keeps a candidate only when it passes the
paired-bootstrap guard (`--c2i-selection plain`: when better on the evaluation examples). Each chosen adapter is
scored on the first `--n-test` test examples; a method that keeps nothing is the base model (Δ exactly 0).

Evaluation: **answer ranking**. The embedded model almost never gives the bare answer the prompts ask for (strict
accuracy ~0) and generating answers for every candidate costs minutes on 2 cores, so each question gets `--options`
candidate answers (the gold one and near misses: gold ± 1, 2, 3, 10, 20 for integers, other answers of the split
otherwise) and is right when the gold one has the highest log-likelihood, one forward pass per question. That is
what the gradient pass's loss (the gold answer's NLL) optimises; the guard tests the accuracy gain and the
gold-minus-best-other margin. Whether a change reaches generated answers: the base model and each chosen adapter
also answer the first `--n-generate` test questions greedily, scored by the task's verifier (lenient and strict).

Reported with `peft_spectral.stats`: accuracy [Wilson 95%], Δ vs base (paired bootstrap, exact McNemar p), the
goals (no C2I method significantly below base; C2I − LASER on test), the time ratio, and how each scoring rule ranks
what LASER measured (Spearman correlations, the rank of LASER's pick).

    python benchmarks/bench_compress.py --threads 2     # -> docs/results/compress.{json,md,png}
    python benchmarks/bench_compress.py --report-only   # the report of the tasks finished so far
    python benchmarks/bench_compress.py --smoke         # tiny model: a planted task and one nothing can improve

Resumable: finished tasks stay in the state file (`--state`), LASER's evaluations in `--work-dir`.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from peft_spectral import compress as C
from peft_spectral.benchmarking import BenchmarkRun, add_benchmark_arguments, markdown_table, tiny_model
from peft_spectral.benchmarking.reporting import stat_entry, task_label
from peft_spectral.compress.ranking import ranking_task
from peft_spectral.compress.results import timed_eval
from peft_spectral.data import Example, Task, load_task
from peft_spectral.evaluation import evaluate, option_logliks, rescore
from peft_spectral.plots import ci_bar_chart
from peft_spectral.state import StateFileError, fingerprint
from peft_spectral.stats import accuracy_ci, compare_balanced, compare_paired, spearman


DEFAULT_TASKS = ["rg:gcd?max_value=100", "rg:lcm?max_value=30", "rg:products?max_digits=2"]
SCORE_RULES = ("first_order", "raw")
FULL_GRID = 30 * 7 * 7  # SmolLM2-135M: 30 layers × 7 matrix types × LASER's 7 rho


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_arguments(p, name="compress")
    p.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS, metavar="SPEC", help="task specs")
    p.add_argument("--matrices", nargs="+", default=["up_proj", "down_proj"])
    p.add_argument("--layers", type=int, nargs="+", default=[18, 21, 24, 27, 29])
    p.add_argument("--rhos", type=float, nargs="+", default=[0.2, 0.1, 0.05, 0.01])
    p.add_argument("--scores", nargs="+", choices=SCORE_RULES, default=list(SCORE_RULES), help="C2I standard rules")
    p.add_argument("--n-val", type=int, default=100, help="LASER's validation examples (the first of the split)")
    p.add_argument("--n-eval", type=int, default=100, help="C2I's evaluation examples (the first of validation)")
    p.add_argument("--n-grad", type=int, default=100, help="C2I's gradient examples (the first of train)")
    p.add_argument("--n-test", type=int, default=200, help="test examples (the first of the split)")
    p.add_argument("--options", type=int, default=4, help="candidate answers per question (gold + near misses)")
    p.add_argument("--n-generate", type=int, default=100, help="test questions also answered by generation")
    p.add_argument("--max-new-tokens", type=int, default=16, help="generation budget of that check")
    p.add_argument("--top-k", type=int, default=2, help="candidates C2I evaluates")
    p.add_argument("--clusters", type=int, default=2, help="row clusters of C2I clustered")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--c2i-selection", choices=("guard", "plain"), default="guard", help="C2I's keep rule")
    p.add_argument("--laser-guard", action="store_true", help="apply the guard to LASER too (default: as published)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--work-dir", default=None, help="LASER states (default runs/bench_compress; smoke: OUTPUT/work)")
    p.add_argument("--report-only", action="store_true", help="only write the report from the state")
    args = p.parse_args(argv)
    args.scores = list(dict.fromkeys(args.scores))
    if args.smoke:
        args.tasks, args.layers, args.rhos = ["planted", "agreeing"], [1], [0.9, 0.2]
        args.n_val = args.n_eval = args.n_test = 20
        args.n_grad, args.n_generate, args.max_new_tokens = 40, 8, 4
    return args


def run_config(args) -> dict:
    """What defines a task's results (the task list is not part of it: each task is its own job)."""
    keys = ("matrices", "layers", "rhos", "scores", "n_val", "n_eval", "n_grad", "n_test", "options", "n_generate")
    keys += ("max_new_tokens", "top_k", "clusters", "batch_size", "c2i_selection", "laser_guard")
    return {k: getattr(args, k) for k in keys}


# ------------------------------------------------------------------------------------------------- evaluation


def test_verdicts(model, tok, test: list, generate: list, args) -> dict:
    """Per-example test verdicts: `correct` by answer ranking (option log-likelihood); `generated`: the greedy
    answers to `generate` scored with lenient and strict extraction."""
    out = {"correct": evaluate(model, tok, test, kind="multiple_choice", batch_size=args.batch_size).correct}
    out["generated"] = None
    if generate:
        budget = {"batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens}
        r = evaluate(model, tok, generate, kind="generation", **budget)
        strict = rescore(r, generate, kind="generation", extraction="strict")
        out["generated"] = {"lenient": r.correct, "strict": strict.correct, "predictions": r.predictions[:5]}
    return out


def adapter_test(model, tok, test, generate, result: C.SearchResult, args, cache: dict):
    """Test verdicts and compressed-module memory of a search's chosen adapter; `None` when it kept nothing. Two
    methods with the same choice share one evaluation."""
    if not result.chosen:
        return None, None
    key = tuple(sorted(iv.key for iv in result.chosen))
    if key not in cache:
        adapted = C.apply_result(model, result)
        try:
            verdicts = test_verdicts(adapted, tok, test, generate, args)
            report = adapted.base_model.compression_report()
        finally:
            adapted.unload()
            if hasattr(model, "peft_config"):
                del model.peft_config
        memory = {k: sum(r[k] for r in report.values()) for k in ("dense_bytes", "factor_bytes")}
        cache[key] = (verdicts, memory)
    return cache[key]


def ranking_quality(ranked, laser: C.SearchResult, n_tested: int) -> dict:
    """How a C2I ranking predicts what LASER measured on every candidate: Spearman correlation of the score with
    the measured loss change (minus the change of the gold answer's mean log-likelihood) and with minus the
    accuracy change (positive = predicts well), and the rank it gives LASER's best candidate."""
    measured = {c.intervention.key: c.result for c in laser.candidates if c.result is not None}
    pairs = [(c.score, measured[c.intervention.key]) for c in ranked if c.intervention.key in measured]
    if len(pairs) < 2:
        return {"candidates": len(pairs)}
    base, scores = laser.base, [s for s, _ in pairs]
    best = max(laser.candidates, key=lambda c: c.result.key()).intervention.key
    rank = 1 + [c.intervention.key for c in ranked].index(best)
    return {
        "candidates": len(pairs),
        "spearman_loss": spearman(scores, [base.mean_loglik - r.mean_loglik for _, r in pairs]),
        "spearman_accuracy": spearman(scores, [base.accuracy - r.accuracy for _, r in pairs]),
        "laser_best": best,
        "laser_best_rank": rank,
        "laser_best_evaluated": rank <= n_tested,
    }


# ------------------------------------------------------------------------------------------------- one task


def run_task(model, tok, task: Task, generate: list, args, laser_state: Path, progress: bool) -> dict:
    modules = C.find_target_modules(model, args.matrices, args.layers)
    grid = C.candidate_grid(modules, args.rhos)
    validation = C.take_examples(task.validation, args.n_val, "validation (LASER)")
    evaluation = C.take_examples(task.validation, args.n_eval, "evaluation (C2I)")
    calibration = C.take_examples(task.train, args.n_grad, "calibration (train)")
    test = C.take_examples(task.test, args.n_test, "test")
    eval_fn = C.default_eval_fn(tok, task.kind, batch_size=args.batch_size)  # option log-likelihood
    base_test = test_verdicts(model, tok, test, generate, args)
    base_val = timed_eval(eval_fn, model, validation)
    shared = {"tokenizer": tok, "eval_fn": eval_fn, "kind": task.kind, "progress": progress}
    guard = C.SelectionGuard() if args.laser_guard else None
    laser = C.laser_search(model, validation, grid, state_path=laser_state, base=base_val, guard=guard, **shared)
    scores = C.c2i_scores(model, calibration, modules, tokenizer=tok, batch_size=args.batch_size)
    same = [ex.prompt for ex in evaluation] == [ex.prompt for ex in validation]
    base_eval = base_val if same else timed_eval(eval_fn, model, evaluation)
    guard = None if args.c2i_selection == "plain" else C.SelectionGuard()
    config = C.C2ISearchConfig(rhos=args.rhos, top_k=args.top_k, n_eval=None, guard=guard, batch_size=args.batch_size)
    runs = [(f"c2i-standard ({rule})", rule, 1) for rule in args.scores]
    runs.append(("c2i-clustered (first_order)", "first_order", args.clusters))
    results, rules = [laser], {"laser": None}
    for method, rule, clusters in runs:
        rules[method] = rule
        cfg = dataclasses.replace(config, clusters=clusters, method=method, score=rule)
        results.append(
            C.c2i_search(model, calibration, evaluation, modules, cfg, scores=scores, base=base_eval, **shared)
        )
    cache: dict = {}
    methods = {}
    for res in results:
        verdicts, memory = adapter_test(model, tok, test, generate, res, args, cache)
        methods[res.method] = {"search": res.to_dict(), "score_rule": rules[res.method], "test": verdicts}
        methods[res.method]["memory"] = memory
    quality = {res.method: ranking_quality(res.candidates, laser, res.selection["n_tested"]) for res in results[1:-1]}
    eval_s = [c.result.seconds for c in laser.candidates if c.result is not None and c.result.seconds > 0]
    return {
        "task": task.name,
        "info": task.info(),
        "kind": task.kind,
        "sizes": {"val": len(validation), "eval": len(evaluation), "grad": len(calibration), "test": len(test)},
        "n_generate": len(generate),
        "candidates": len(grid),
        "labels": None if "answer_ranking" in task.params else [ex.label for ex in test],
        "base": base_test,
        "methods": methods,
        "scoring_rules": quality,
        "c2i_scoring_s": scores.seconds,
        "laser_mean_eval_s": sum(eval_s) / max(1, len(eval_s)),
    }


def summarise(row: dict) -> dict:
    """Every statistic of one task, from the verdicts stored in its row."""
    base, labels = row["base"], row["labels"]
    tested = {name: m["test"] or base for name, m in row["methods"].items()}  # kept nothing = the base model
    out = {"task": row["task"], "base": stat_entry(accuracy_ci(base["correct"])), "methods": {}}
    if base["generated"]:
        out["base_generated"] = stat_entry(accuracy_ci(base["generated"]["lenient"]))
    laser = row["methods"]["laser"]["search"]
    for name, m in row["methods"].items():
        v, s = tested[name], m["search"]
        e = {
            "test": stat_entry(accuracy_ci(v["correct"])),
            "delta": stat_entry(compare_paired(base["correct"], v["correct"])),
            "kept_nothing": m["test"] is None,
            "selection": {"base": s["base"]["accuracy"], "chosen": s["best"]["accuracy"], "n": s["base"]["n"]},
            "wall_time_s": s["wall_time_s"],
            "evaluations": s["evaluations"],
            "chosen": [_intervention(c) for c in s["chosen"]],
            "memory": m["memory"],
        }
        if v["generated"]:
            gen_base, gen = base["generated"]["lenient"], v["generated"]["lenient"]
            e["generated"] = stat_entry(accuracy_ci(gen))
            e["generated_delta"] = stat_entry(compare_paired(gen_base, gen))
        if labels is not None:
            e["balanced"] = stat_entry(compare_balanced(base["correct"], v["correct"], labels))
        if name != "laser":
            e["speedup_vs_laser"] = laser["wall_time_s"] / max(s["wall_time_s"], 1e-9)
            e["vs_laser"] = stat_entry(compare_paired(tested["laser"]["correct"], v["correct"]))
        out["methods"][name] = e
    below = [n for n, e in out["methods"].items() if e["delta"]["high"] < 0]
    below += [n for n, e in out["methods"].items() if "balanced" in e and e["balanced"]["high"] < 0 and n not in below]
    out["below_base"] = below
    out["c2i_below_base"] = [n for n in below if n.startswith("c2i")]
    return out


SETUP = """\
Candidates (the same for every method): matrices {matrices}, layers {layers}, rho {rhos}. C2I: {n_grad} gradient \
examples (one pass per task, counted in full in each C2I method's time), top-{top_k} evaluated, rules {scores} \
(clustered: first_order, {clusters} row clusters). LASER selects on the first {n_val} validation examples, C2I on the \
first {n_eval}. Keep rule: C2I {c2i_selection}, LASER {laser_rule}.

Evaluation (selection and test): **answer ranking**, {options} candidate answers per question (the gold one and near \
misses: gold ± 1, 2, 3, 10, 20 for integers, other answers of the split otherwise), right when the gold answer has \
the highest log-likelihood (chance {chance:.2f}); multiple-choice tasks by their options. *Generated*: greedy answers \
(at most {max_new_tokens} new tokens) to the first {n_generate} test questions, scored by the task's verifier with \
lenient extraction, Δ vs the base model's (strict extraction in the JSON). Test accuracy with its 95% Wilson \
interval; Δ vs base on the same test examples with the paired bootstrap 95% interval and exact McNemar p (`*`: the \
interval excludes 0). A method that keeps nothing is the base model (Δ exactly 0).
"""
RULES = """\
## Scoring rules: first_order vs raw

Against LASER's measurement of every candidate on its validation examples: Spearman correlation of the score with \
the measured loss change (minus the change of the gold answer's mean log-likelihood) and with minus the accuracy \
change (positive = the score predicts well); the rank the rule gives LASER's pick (evaluated when ≤ top-k).
"""


def _generated(e: dict) -> str:
    if "generated" not in e:
        return "–"
    return e["generated"]["text"] + ("" if "generated_delta" not in e else ", " + _delta(e["generated_delta"]))


def _memory(memory) -> str:
    return "–" if not memory else f"{memory['factor_bytes'] / 2**20:.2f} of {memory['dense_bytes'] / 2**20:.2f}"


def _intervention(c: dict) -> str:
    return f"{c['module'].replace('model.layers.', 'L')}@{c['rho']:g}" + (f"×{c['clusters']}c" * (c["clusters"] > 1))


#: The main table's columns after task and method: (header, cell of a method's summary).
COLUMNS = [
    ("selection acc (base → chosen, n)", lambda e: "{base:.3f} → {chosen:.3f} (n={n})".format(**e["selection"])),
    ("test acc [95% CI]", lambda e: e["test"]["text"]),
    ("Δ vs base [95% CI] p", lambda e: _delta(e["delta"])),
    ("generated, lenient: acc, Δ vs base", _generated),
    ("balanced Δ [95% CI]", lambda e: e["balanced"]["text"] if "balanced" in e else "–"),
    ("search time (s)", lambda e: f"{e['wall_time_s']:.1f}"),
    ("evaluations", lambda e: e["evaluations"]),
    ("speed-up vs LASER", lambda e: f"{e.get('speedup_vs_laser', 1.0):.1f}×"),
    ("compressed memory (MiB)", lambda e: _memory(e["memory"])),
    ("chosen", lambda e: ", ".join(e["chosen"]) or "none (= base)"),
]


def markdown(rows: list, summaries: list, args, missing: list) -> tuple[str, dict]:
    laser_rule = "guard" if args.laser_guard else "plain (as published)"
    lines = [SETUP.format(**vars(args), chance=1 / args.options, laser_rule=laser_rule)]
    if missing:
        lines += [f"**Unfinished**: not run yet: {', '.join(missing)}.", ""]
    lines += ["Tasks (`load_task(spec, seed)`, the first examples of each split):", ""]
    lines += [f"- `{r['task']}`: test n={r['sizes']['test']}, generated n={r['n_generate']}" for r in rows] + [""]
    columns = [c for c in COLUMNS if c[0] != "balanced Δ [95% CI]" or any(r["labels"] for r in rows)]
    table = []
    for s in summaries:
        base = {"test": s["base"], **({"generated": s["base_generated"]} if "base_generated" in s else {})}
        table.append(
            [task_label(s["task"]), "base"] + [f(base) if h[:4] in ("test", "gene") else "" for h, f in columns]
        )
        table += [[task_label(s["task"]), m] + [f(e) for _, f in columns] for m, e in s["methods"].items()]
    headers = ["task", "method"] + [h for h, _ in columns]
    lines += [markdown_table(headers, table, "ll" + "r" * (len(columns) - 1) + "l"), ""]
    goals = overall_goals(summaries)
    g = goals["c2i_never_significantly_below_base"]
    met = "met" if g["met"] else "not met: " + ", ".join(g["violations"])
    counts = [
        f"{m}: ≥ LASER on {c['at_least']} of {c['tasks']} tasks, significantly below on {c['below']}"
        for m, c in goals["c2i_at_least_laser"].items()
    ]
    lines += [
        "## Goals",
        "",
        f"- No C2I method significantly below the base model on any task's test split: **{met}**.",
    ]
    lines += [f"- C2I ≥ LASER on test (paired Δ C2I − LASER): {'; '.join(counts)}.", "", "Per task:", ""]
    for s in summaries:
        below = ", ".join(s["below_base"]) or "none"
        versus = "; ".join(f"{m} − LASER {_delta(e['vs_laser'])}" for m, e in s["methods"].items() if "vs_laser" in e)
        lines.append(f"- **{task_label(s['task'])}**: significantly below base: {below}; {versus}.")
    lines += ["", RULES]
    table = []
    for row, s in zip(rows, summaries):
        for m, q in row["scoring_rules"].items():
            corr = ["–" if q.get(k) is None else f"{q[k]:+.2f}" for k in ("spearman_loss", "spearman_accuracy")]
            rank = "–" if q.get("laser_best_rank") is None else f"{q['laser_best_rank']} of {q['candidates']}"
            table.append(
                [
                    task_label(s["task"]),
                    m,
                    *corr,
                    rank,
                    COLUMNS[-1][1](s["methods"][m]),
                    _delta(s["methods"][m]["delta"]),
                ]
            )
    headers = ["task", "rule", "Spearman vs Δ loss", "Spearman vs −Δ acc", "rank of LASER's pick", "chosen", "test Δ"]
    lines += [markdown_table(headers, table, "llrrrll"), ""]
    grid = [
        f"{task_label(r['task'])} {r['laser_mean_eval_s']:.1f} s per evaluation of {r['sizes']['val']} → "
        f"{(FULL_GRID + 1) * r['laser_mean_eval_s'] / 3600:.1f} h"
        for r in rows
    ]
    lines.append(f"Projected LASER time on the full grid ({FULL_GRID} candidates + base): {'; '.join(grid)}.")
    return "\n".join(lines), goals


def _delta(d: dict) -> str:
    return d["text"].removeprefix("Δ ")


def overall_goals(summaries: list) -> dict:
    violations = [f"{m} on {task_label(s['task'])}" for s in summaries for m in s["c2i_below_base"]]
    counts: dict = {}
    for s in summaries:
        for m, e in s["methods"].items():
            if "vs_laser" in e:
                c = counts.setdefault(m, {"tasks": 0, "at_least": 0, "below": 0})
                c["tasks"] += 1
                c["at_least"] += int(e["vs_laser"]["delta"] >= 0)
                c["below"] += int(e["vs_laser"]["high"] < 0)
    return {
        "c2i_never_significantly_below_base": {"met": not violations, "violations": violations},
        "c2i_at_least_laser": counts,
    }


def plot(summaries: list, path: Path) -> None:
    """Test Δ vs base with its paired 95% interval, per task and method."""
    series = {m: [s["methods"][m]["delta"] for s in summaries] for m in summaries[0]["methods"]}
    ci_bar_chart(
        path,
        [task_label(s["task"]) for s in summaries],
        series,
        value="delta",
        ylabel="test Δ vs base (95% CI)",
        zero_line=True,
        figsize=(8, 4),
        title="SpectralCompress: LASER vs C2I",
        legend={"fontsize": 7},
    )


# ------------------------------------------------------------------------------------------------- smoke and main


def smoke_setup():
    """The tiny model with a planted helpful truncation ([`peft_spectral.compress.planted_problem`]), and
    reasoning-gym questions as answer ranking relabelled with the noisy model's own preferences: nothing can improve
    those, so C2I must keep nothing there (its verdicts are then the base model's)."""
    model, tok = tiny_model(seed=1)
    problem = C.planted_problem(model, tok, "model.layers.1.mlp.down_proj")
    planted = Task("planted", "multiple_choice", problem.train, problem.validation, problem.validation)
    source = load_task("rg:gcd?max_value=100", seed=0, max_examples=150)
    ranked = ranking_task(source, 4, seed=0)
    own = {}
    for split in ("train", "validation", "test"):
        examples = ranked.split(split)
        scores = option_logliks(problem.model, tok, examples, batch_size=32)
        picks = [max(range(len(ll)), key=ll.__getitem__) for ll in scores]
        own[split] = [Example(ex.prompt, ex.choices[k], ex.choices, k) for ex, k in zip(examples, picks)]
    agreeing = dataclasses.replace(ranked, name="agreeing", **own)
    generate = [Example(ex.prompt, ex.target) for ex in problem.validation]  # exact match of the option text
    return problem.model, tok, {"planted": (planted, generate), "agreeing": (agreeing, source.test)}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        run = BenchmarkRun.from_args(args, run_config(args))
    except StateFileError as err:
        raise SystemExit(str(err)) from None
    keys = [f"task:{spec}" for spec in args.tasks]
    if not args.report_only and not all(run.done(k) for k in keys):
        work = Path(args.work_dir or (run.output_dir / "work" if args.smoke else Path("runs") / "bench_compress"))
        if args.smoke:
            model, tok, tasks = smoke_setup()
        else:
            (model, tok), tasks = run.load_model(), {}
        model.eval()
        n_total = max(5 * args.n_test, 5 * args.n_val, 5 * args.n_eval, 2 * args.n_grad)  # 0.6 / 0.2 / 0.2 splits
        for key in run.jobs(keys, desc="tasks"):
            spec = key.removeprefix("task:")
            if spec in tasks:
                task, generate = tasks[spec]
            else:
                source = load_task(spec, seed=args.seed, max_examples=n_total)
                task = ranking_task(source, args.options, args.seed)
                generate = source.test if source.kind == "generation" else []
            generate = generate[: args.n_generate]
            laser_state = work / f"laser_{fingerprint(spec, run.fingerprint)[:16]}.json"
            run.record(key, run_task(model, tok, task, generate, args, laser_state, run.progress))
    rows = [run.result(k) for k in keys if run.done(k)]
    if not rows:
        raise SystemExit(f"no finished task in {run.state_path}")
    summaries = [summarise(r) for r in rows]
    text, goals = markdown(rows, summaries, args, [k.removeprefix("task:") for k in keys if not run.done(k)])
    run.write(
        {"tasks": rows, "summary": summaries, "goals": goals},
        text,
        title="SpectralCompress benchmark: LASER vs Compress to Impress",
    )
    plot(summaries, run.path(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
