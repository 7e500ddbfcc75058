"""Profile: where the time of C2I's gradient pass goes (SVD, forward, backward, singular-value projections).

The phases of one gradient pass over `--n-grad` training examples of `--task` (as answer ranking, see
`peft_spectral.compress.ranking`), with the gradients projected once at the end and after every batch
(`project_each_batch`), against a forward-only pass over the same batches and one evaluation of the same examples
(the unit of work LASER pays per candidate). Each time is the minimum of `--repeats` runs in this process, so the
ratios hold on a loaded machine; the goal is forward + backward ≈ 3× a forward.

    python benchmarks/bench_compress_profile.py --threads 2   # all 210 linear matrices of the embedded model
    python benchmarks/bench_compress_profile.py --smoke       # the tiny model, seconds
"""

from __future__ import annotations

import argparse
import time

import torch

from peft_spectral import compress as C
from peft_spectral.benchmarking import BenchmarkRun, add_benchmark_arguments, markdown_table, tiny_model
from peft_spectral.compress.ranking import ranking_task
from peft_spectral.data import load_task
from peft_spectral.plots import pyplot, save_figure
from peft_spectral.prompting import encode_answer, encode_prompt


PHASES = ("forward_s", "backward_s", "projection_s")


def forward_only_s(model, tok, examples, batch_size: int) -> float:
    """Seconds of the gradient pass's forward (same loss, same length-sorted batches) without autograd."""
    examples = sorted(examples, key=lambda ex: -(len(encode_prompt(tok, ex)) + len(encode_answer(tok, ex.target))))
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            C.target_nll(model, tok, examples[i : i + batch_size])
    return time.perf_counter() - start


def profile(model, tok, examples, modules, batch_size: int, repeats: int) -> dict:
    start = time.perf_counter()
    svds = C.compute_svds(model, modules)
    svd_s = time.perf_counter() - start
    runs = {}
    for mode in ("once", "each_batch"):
        passes = [
            C.gradient_pass(
                model, examples, modules, svds=svds, tokenizer=tok, batch_size=batch_size,
                project_each_batch=mode == "each_batch",
            )
            for _ in range(repeats)
        ]  # fmt: skip
        best = min(passes, key=lambda p: sum(p.timings[k] for k in PHASES))
        runs[mode] = {k: best.timings[k] for k in (*PHASES, "batches")}
        runs[mode]["total_s"] = sum(best.timings[k] for k in PHASES)
    forward_s = min(forward_only_s(model, tok, examples, batch_size) for _ in range(repeats))
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


def markdown(r: dict, task: str) -> str:
    once, each = r["gradient_pass"]["once"], r["gradient_pass"]["each_batch"]
    phases = [
        ("SVD of the candidate matrices (cached on disk after the first run)", r["svd_s"]),
        ("gradient pass: forward", once["forward_s"]),
        ("gradient pass: backward", once["backward_s"]),
        ("gradient pass: singular-value projections (once, after the last batch)", once["projection_s"]),
        ("the same projections after every batch", each["projection_s"]),
        ("forward pass only (no gradient)", r["forward_only_s"]),
        ("evaluation of the same examples (LASER's unit of work)", r["evaluation_s"]),
    ]
    ratios = [
        ("forward + backward / forward", r["fb_over_forward"], "≈ 3×"),
        ("whole gradient pass / forward", r["gradient_pass_over_forward"], "—"),
        ("whole gradient pass / one evaluation", r["gradient_pass_over_evaluation"], "—"),
        ("projections after every batch / once", r["per_batch_projection_over_once"], "—"),
    ]
    return (
        f"{r['n_examples']} training examples of `{task}`, {r['modules']} candidate matrices, batch "
        f"{r['batch_size']}; each time is the minimum of the repeats.\n\n"
        + markdown_table(["phase", "seconds"], [(p, f"{s:.2f}") for p, s in phases])
        + "\n\n"
        + markdown_table(["ratio", "value", "goal"], [(n, f"{v:.2f}×", g) for n, v, g in ratios], "lrl")
    )


def plot(r: dict, path) -> None:
    """One bar per measurement, the gradient pass split by phase."""
    plt = pyplot("the profile's plot", required=False)
    if plt is None:
        return
    once = r["gradient_pass"]["once"]
    bars = [
        ("gradient pass", [("forward", once["forward_s"]), ("backward", once["backward_s"]),
                           ("projections", once["projection_s"])]),
        ("forward only", [("forward", r["forward_only_s"])]),
        ("evaluation", [("evaluation", r["evaluation_s"])]),
        ("SVD", [("SVD", r["svd_s"])]),
    ]  # fmt: skip
    colours = {"forward": "C0", "backward": "C1", "projections": "C2", "evaluation": "C3", "SVD": "C4"}
    fig, ax = plt.subplots(figsize=(7, 2.8))
    seen = set()
    for y, (_, parts) in enumerate(bars):
        left = 0.0
        for phase, seconds in parts:
            ax.barh(y, seconds, left=left, color=colours[phase], label=None if phase in seen else phase)
            seen.add(phase)
            left += seconds
    ax.set_yticks(range(len(bars)), [b[0] for b in bars])
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title(f"C2I gradient pass, {r['n_examples']} examples, {r['modules']} matrices", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    save_figure(fig, path)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_arguments(p, name="compress_profile")
    p.add_argument("--task", default="rg:gcd?max_value=100", metavar="SPEC", help="task spec (its training split)")
    p.add_argument("--matrices", nargs="+", default=list(C.MATRIX_TYPES), help="candidate matrix types")
    p.add_argument("--layers", type=int, nargs="*", default=None, help="candidate layers (default: all)")
    p.add_argument("--n-grad", type=int, default=100, help="examples of the gradient pass")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement (the minimum is reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.task, args.matrices = "planted", ["up_proj", "down_proj"]
    config = {k: getattr(args, k) for k in ("task", "matrices", "layers", "n_grad", "batch_size", "repeats")}
    run = BenchmarkRun.from_args(args, config)
    if not run.done("profile"):
        if args.smoke:
            model, tok = tiny_model(seed=1)
            model = C.planted_problem(model, tok, "model.layers.1.mlp.down_proj").model
            examples = C.random_choice_examples(args.n_grad, seed=3)
        else:
            model, tok = run.load_model()
            task = ranking_task(load_task(args.task, seed=args.seed, max_examples=max(500, 2 * args.n_grad)))
            examples = C.take_examples(task.train, args.n_grad, "profile (train)")
        modules = C.find_target_modules(model.eval(), args.matrices, args.layers)
        run.record("profile", profile(model, tok, examples, modules, args.batch_size, args.repeats))
    result = run.result("profile")
    run.write(result, markdown(result, args.task), title="C2I gradient pass: where the time goes")
    plot(result, run.path(".png"))
    return result


if __name__ == "__main__":
    main()
