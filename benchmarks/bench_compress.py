"""Benchmark: LASER exhaustive search vs Compress to Impress (standard and clustered) on BigBench tasks.

For each task, on the same candidate set (matrices × layers × rho, see --matrices/--layers/--rhos):

1. base model: test accuracy;
2. LASER: every candidate evaluated on the validation split (resumable state in --state-dir);
3. C2I "100 grads + standard eval": one gradient pass on --n-grad training examples, the --top-k best-ranked
   candidates evaluated on the same validation split as LASER;
4. C2I clustered "100G-100E": same gradient pass, multi-subspace truncation (--clusters), top-k evaluated on
   --n-eval validation examples;

then each search's chosen adapter (a real SpectralCompress PEFT adapter) is evaluated on the test split. Writes
`compress.json`, `compress.md` (table) and `compress.png` (per-matrix C2I scores by layer) to --out.

Timings are wall-clock on whatever machine runs it (all in the same run, so ratios are comparable).

    python benchmarks/bench_compress.py                 # the documented default setting
    python benchmarks/bench_compress.py --smoke         # tiny random model, planted task: checks the pipeline
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
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from peft_spectral import compress as C  # noqa: E402
from peft_spectral.evaluation import evaluate  # noqa: E402


logger = logging.getLogger("bench_compress")

DEFAULT_TASKS = ["epistemic_reasoning", "sports_understanding", "navigate"]
FULL_GRID = 30 * 7 * 7  # SmolLM2-135M: 30 layers × 7 matrix types × 7 rho


def _test_eval(model, tok, task, test, result, batch_size, cache):
    """Test accuracy of a search's chosen adapter (built as a PEFT adapter), plus its compressed-module memory.

    Results are cached by the chosen set, so two methods that chose the same interventions share one evaluation.
    """
    if not result.chosen:
        return None, {}
    key = tuple(sorted(iv.key for iv in result.chosen))
    if key in cache:
        return cache[key]
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
    cache[key] = (ev.accuracy, memory)
    return cache[key]


def run_task(name, model, tok, task, args, out_dir):
    modules = C.find_target_modules(model, args.matrices, args.layers)
    grid = C.candidate_grid(modules, args.rhos)
    validation = C.take_examples(task.validation, args.n_val, "validation")
    calibration = C.take_examples(task.train, args.n_grad, "calibration (train)")
    evaluation_cl = C.take_examples(task.validation, args.n_eval, "evaluation (validation)")
    test = C.take_examples(task.test, args.n_test, "test")
    bs = args.batch_size
    row = {
        "task": name,
        "kind": task.kind,
        "n_val": len(validation),
        "n_grad": len(calibration),
        "n_eval_clustered": len(evaluation_cl),
        "n_test": len(test),
        "candidates": len(grid),
        "modules": modules,
        "rhos": list(args.rhos),
    }
    print(
        f"\n=== {name}: {len(grid)} candidates, val {len(validation)}, grad {len(calibration)}, test {len(test)}",
        flush=True,
    )

    t = time.perf_counter()
    base_test = evaluate(model, tok, test, kind=task.kind, batch_size=bs)
    row["base_test_acc"] = base_test.accuracy
    row["test_eval_s"] = time.perf_counter() - t
    print(f"base test acc {base_test.accuracy:.3f} ({row['test_eval_s']:.0f} s)", flush=True)

    # The unmodified model on the validation split: one evaluation, reused (and counted) by every search using it.
    base_val = C.default_eval_fn(tok, task.kind, batch_size=bs)(model, validation)
    print(f"base val acc {base_val.accuracy:.3f} ({base_val.seconds:.0f} s)", flush=True)

    state = Path(args.state_dir) / f"laser_{name}.json" if args.state_dir else None
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
    print(
        f"LASER: {laser.evaluations} evals, {laser.wall_time_s:.0f} s, chosen {[str(i) for i in laser.chosen]}",
        flush=True,
    )

    # One gradient pass serves both C2I modes; each mode's reported time includes it in full.
    scores = C.c2i_scores(model, calibration, modules, tokenizer=tok, batch_size=bs)
    print(
        f"C2I scoring: SVD {scores.timings['svd_s']:.0f} s, gradient {scores.timings['gradient_s']:.0f} s", flush=True
    )
    guard = None if args.c2i_selection == "plain" else C.SelectionGuard()
    config = C.C2ISearchConfig(
        rhos=args.rhos, top_k=args.top_k, n_eval=None, guard=guard, kind=task.kind, batch_size=bs
    )
    std = C.c2i_search(
        model,
        calibration,
        validation,
        modules,
        dataclasses.replace(config, clusters=1, method="c2i-standard"),
        tokenizer=tok,
        scores=scores,
        base=base_val,
    )
    print(
        f"C2I standard: {std.evaluations} evals, {std.wall_time_s:.0f} s, chosen {[str(i) for i in std.chosen]}",
        flush=True,
    )
    same_eval = [ex.prompt for ex in evaluation_cl] == [ex.prompt for ex in validation]
    cl = C.c2i_search(
        model,
        calibration,
        evaluation_cl,
        modules,
        dataclasses.replace(config, clusters=args.clusters, method="c2i-clustered"),
        tokenizer=tok,
        scores=scores,
        base=base_val if same_eval else None,
    )
    print(
        f"C2I clustered: {cl.evaluations} evals, {cl.wall_time_s:.0f} s, chosen {[str(i) for i in cl.chosen]}",
        flush=True,
    )

    row["methods"] = {}
    cache = {}
    for res in (laser, std, cl):
        acc, memory = _test_eval(model, tok, task, test, res, bs, cache)
        entry = res.to_dict()
        entry["test_acc"] = base_test.accuracy if acc is None else acc
        entry["memory"] = {k: v for k, v in memory.items() if k != "modules"}
        entry["memory_modules"] = memory.get("modules", {})
        row["methods"][res.method] = entry
        print(f"{res.method}: test acc {entry['test_acc']:.3f}", flush=True)
    eval_times = [c.result.seconds for c in laser.candidates if c.result is not None and c.result.seconds > 0]
    mean_eval = sum(eval_times) / max(1, len(eval_times))
    row["laser_mean_eval_s"] = mean_eval
    row["laser_full_grid_projected_s"] = (FULL_GRID + 1) * mean_eval
    row["c2i_scoring_s"] = scores.seconds
    for m in ("c2i-standard", "c2i-clustered"):
        e = row["methods"][m]
        e["speedup_vs_laser"] = laser.wall_time_s / max(e["wall_time_s"], 1e-9)
        e["eval_ratio_vs_laser"] = laser.evaluations / max(e["evaluations"], 1)
    (out_dir / f"compress_{name}.partial.json").write_text(json.dumps(row, indent=1))
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
        per = {}
        for c in row["methods"]["c2i-standard"]["candidates"]:
            per[c["module"]] = min(per.get(c["module"], float("inf")), c["score"])
        panels.append((f"{row['task']}: benchmark candidates", per))
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
        ax.set_ylabel("C2I score ΔL (lower = better)")
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def args_n_grad(full):
    return full.get("n_grad", "?")


def markdown(rows, full, meta):
    lines = [
        "# SpectralCompress benchmark: LASER vs Compress to Impress",
        "",
        f"Model: {meta['model']}; machine: {meta['machine']}; run {meta['date']}; total "
        + (f"{meta['total_s']:.0f} s." if meta["total_s"] == meta["total_s"] else "wall time: see per-method times."),
        f"Candidates (same for all methods): matrices {meta['matrices']}, layers {meta['layers']}, rho {meta['rhos']}.",
        (
            f"C2I: {meta['n_grad']} gradient examples, top-{meta['top_k']} evaluated; clustered mode with "
            f"{meta['clusters']} row clusters. Validation {meta['n_val']}, clustered evaluation {meta['n_eval']}, test "
            f"{meta['n_test']} examples per task. Accuracy = multiple-choice log-likelihood scoring; torch threads "
            f"{meta['threads']}."
        ),
        "",
        (
            "| task | method | val/eval acc (base → chosen) | test acc | search time (s) | evaluations | speed-up vs LASER |"
            " compressed-module memory | chosen |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['task']} | base | | {row['base_test_acc']:.3f} | | | | | |")
        for m in ("laser", "c2i-standard", "c2i-clustered"):
            e = row["methods"][m]
            mem = e["memory"]
            mem_s = (
                f"{mem['factor_bytes'] / 2**20:.2f} MiB vs {mem['dense_bytes'] / 2**20:.2f} MiB dense" if mem else "–"
            )
            speed = f"{e['speedup_vs_laser']:.1f}×" if "speedup_vs_laser" in e else "1×"
            chosen = (
                ", ".join(
                    f"{c['module'].replace('model.layers.', 'L')}@{c['rho']:g}"
                    + (f"×{c['clusters']}c" if c["clusters"] > 1 else "")
                    for c in e["chosen"]
                )
                or "none"
            )
            lines.append(
                f"| {row['task']} | {m} | {e['base']['accuracy']:.3f} → {e['best']['accuracy']:.3f} (n={e['base']['n']})"
                f" | {e['test_acc']:.3f} | {e['wall_time_s']:.1f} | {e['evaluations']} | {speed} | {mem_s} | {chosen} |"
            )
    lines += ["", "Projected LASER time on the full grid (1470 candidates + base) from its mean evaluation time:", ""]
    for row in rows:
        lines.append(
            f"- {row['task']}: {row['laser_mean_eval_s']:.1f} s/eval → "
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


def rebuild_from_partials(args, out_dir):
    rows = [
        json.loads((out_dir / f"compress_{n}.partial.json").read_text())
        for n in args.tasks
        if (out_dir / f"compress_{n}.partial.json").exists()
    ]
    if not rows:
        raise SystemExit("no partial results found")
    meta = {
        "model": "SmolLM2-135M-Instruct (embedded GGUF, fp32)",
        "machine": f"{platform.machine()} CPU, shared with other jobs",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        + f" (partial: {len(rows)} of {len(args.tasks)} tasks)",
        "total_s": float("nan"),
        "matrices": args.matrices,
        "layers": args.layers,
        "rhos": args.rhos,
        "n_grad": rows[0]["n_grad"],
        "top_k": args.top_k,
        "clusters": args.clusters,
        "n_val": rows[0]["n_val"],
        "n_eval": rows[0]["n_eval_clustered"],
        "n_test": rows[0]["n_test"],
        "threads": args.threads,
    }
    (out_dir / "compress.json").write_text(
        json.dumps({"meta": meta, "tasks": rows, "full_grid_scoring": None}, indent=1)
    )
    (out_dir / "compress.md").write_text(markdown(rows, None, meta))
    plot(rows, None, out_dir / "compress.png")
    print((out_dir / "compress.md").read_text())


def tiny_model_and_tokenizer(seed: int = 1):
    """The tiny random Llama and byte-level tokenizer of `examples/tiny_model.py` (no download)."""
    sys.path.insert(0, str(ROOT / "examples"))
    from tiny_model import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    return tiny_model(tok, seed=seed), tok


def smoke_setup():
    """A tiny model with a planted helpful truncation ([`peft_spectral.compress.planted_problem`])."""
    from peft_spectral.tasks import Task

    model, tok = tiny_model_and_tokenizer(seed=1)
    problem = C.planted_problem(model, tok, "model.layers.1.mlp.down_proj")
    validation, train = problem.validation, problem.train
    task = Task("planted", "multiple_choice", train=train, validation=validation, test=validation)
    return problem.model, tok, {"planted": task}


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS)
    p.add_argument("--matrices", nargs="+", default=["up_proj", "down_proj"])
    p.add_argument("--layers", type=int, nargs="+", default=[27, 29])
    p.add_argument("--rhos", type=float, nargs="+", default=[0.1, 0.01])
    p.add_argument("--n-val", type=int, default=12)
    p.add_argument(
        "--n-grad",
        type=int,
        default=32,
        help="gradient examples (the paper uses 100; the default is cut to fit a shared 2-core CPU)",
    )
    p.add_argument("--n-eval", type=int, default=12)
    p.add_argument("--n-test", type=int, default=24)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument(
        "--budget-min",
        type=float,
        default=30.0,
        help="skip the optional full-grid scoring when it would not fit in this total wall time",
    )
    p.add_argument("--clusters", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--full-grid-scoring", action="store_true", help="also time C2I scoring of all matrices (task 1)")
    p.add_argument("--state-dir", default=None)
    p.add_argument("--out", default=str(ROOT / "docs" / "results"))
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: 1 when the machine is loaded, else all cores)",
    )
    p.add_argument("--smoke", action="store_true")
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
        "--from-partials",
        action="store_true",
        help="only rebuild compress.json/md/png from the per-task partial files of an unfinished run",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads is None:
        args.threads = 1 if os.getloadavg()[0] > 1.5 else (os.cpu_count() or 1)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.from_partials:
        return rebuild_from_partials(args, out_dir)
    if args.profile:
        return run_profile(args, out_dir)
    t0 = time.perf_counter()
    if args.smoke:
        model, tok, tasks = smoke_setup()
        args.layers, args.matrices, args.tasks = [1], ["up_proj", "down_proj"], ["planted"]
        args.rhos = [0.9, 0.2]
        model_name = "tiny random Llama (smoke test)"
    else:
        from peft_spectral.assets import load_default_model
        from peft_spectral.tasks import load_task

        model, tok = load_default_model()
        model.eval()
        tasks = {name: load_task(name, seed=0) for name in args.tasks}
        model_name = "SmolLM2-135M-Instruct (embedded GGUF, fp32)"
    rows, full = [], None
    for name in args.tasks:
        rows.append(run_task(name, model, tok, tasks[name], args, out_dir))
    if args.full_grid_scoring:
        elapsed = time.perf_counter() - t0
        estimate = 3 * rows[0]["c2i_scoring_s"] + 60  # gradient pass + SVDs and projections of all matrices
        if elapsed + estimate < 60 * args.budget_min:
            name = args.tasks[0]
            full = full_grid_scoring(model, tok, tasks[name], args)
            full["task"] = name
            print(f"full-grid C2I scoring: SVD {full['svd_s']:.1f} s, gradient {full['gradient_s']:.1f} s", flush=True)
        else:
            print(f"skipping full-grid scoring: {elapsed:.0f} s elapsed, ~{estimate:.0f} s needed", flush=True)
    meta = {
        "model": model_name,
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "total_s": time.perf_counter() - t0,
        "matrices": args.matrices,
        "layers": args.layers,
        "rhos": args.rhos,
        "n_grad": args.n_grad,
        "top_k": args.top_k,
        "clusters": args.clusters,
        "n_val": args.n_val,
        "n_eval": args.n_eval,
        "n_test": args.n_test,
        "threads": args.threads,
    }
    stem = "compress_smoke" if args.smoke else "compress"
    (out_dir / f"{stem}.json").write_text(
        json.dumps({"meta": meta, "tasks": rows, "full_grid_scoring": full}, indent=1)
    )
    (out_dir / f"{stem}.md").write_text(markdown(rows, full, meta))
    plot(rows, full, out_dir / f"{stem}.png")
    for row in rows:
        (out_dir / f"compress_{row['task']}.partial.json").unlink(missing_ok=True)
    print((out_dir / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
