"""`peft-spectral compress`: C2I or LASER search on a task, saved as a SpectralCompress adapter."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ._common import (
    CommandError,
    UnionAction,
    add_command,
    add_model_options,
    add_output_option,
    add_progress_option,
    add_push_option,
    add_seed_option,
    load_model_or_exit,
    output_directory,
    positive_int,
    push_adapter_if_requested,
    rank_fraction,
    state_file,
)


logger = logging.getLogger(__name__)


def parse_layers(text: str | None) -> list[int] | None:
    """One `--layers` value: `"all"`/`None` → all layers (`None`); `"24-29"`, `"0-29:3"` (range with step), `"3"`, or
    a comma-separated mix like `"0-5,27"` → the sorted layer indices."""
    if text is None or text.strip().lower() in ("", "all"):
        return None
    layers: list[int] = []
    for part in text.split(","):
        part = part.strip()
        step = 1
        if ":" in part:
            part, step_text = part.split(":", 1)
            step = int(step_text)
            if step < 1:
                raise argparse.ArgumentTypeError(f"layer step must be >= 1 in {text!r}")
        if "-" in part:
            lo, hi = (int(x) for x in part.split("-", 1))
            if hi < lo:
                raise argparse.ArgumentTypeError(f"empty layer range {part!r}")
            layers.extend(range(lo, hi + 1, step))
        else:
            layers.append(int(part))
    return sorted(set(layers))


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(
        subparsers,
        "compress",
        help="find helpful low-rank truncations (Compress to Impress or LASER) and save them as an adapter",
        description=(
            "Search which weight matrices to replace by low-rank truncations for a task. 'c2i' ranks every "
            "(matrix, rho) with one gradient pass on N calibration examples and evaluates the top ones; 'laser' "
            "evaluates the whole grid (resumable with --state). Prints the chosen interventions and the test "
            "accuracy before/after, and saves a SpectralCompress PEFT adapter (when an intervention helps) and "
            "search.json to --output."
        ),
    )
    p.add_argument(
        "--task", required=True, metavar="SPEC", help="task spec, e.g. 'rg:gcd?max_value=100' (docs/data.md)"
    )
    add_model_options(p)
    add_output_option(p, "the SpectralCompress adapter and search.json")
    p.add_argument("--method", choices=("c2i", "laser"), default="c2i", help="search: Compress to Impress or LASER")
    p.add_argument("--clustered", action="store_true", help="C2I clustered mode (CL-nG-nE): multi-subspace truncation")
    p.add_argument(
        "--clusters", type=positive_int, default=2, help="row clusters in clustered mode (at most the matrices' rows)"
    )
    p.add_argument("--n-grad", type=positive_int, default=100, help="calibration examples for the gradient")
    p.add_argument("--n-eval", type=positive_int, default=100, help="evaluation examples in clustered mode")
    p.add_argument(
        "--n-val",
        type=positive_int,
        default=None,
        help="validation examples for LASER / standard C2I; left out: the whole validation split",
    )
    p.add_argument(
        "--matrices",
        nargs="+",
        default=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        help="matrix types or globs",
    )
    p.add_argument(
        "--layers",
        nargs="+",
        type=parse_layers,
        action=UnionAction,
        default=None,
        help="layers: 'all', ranges '24-29' or '0-29:3' (with a step), or indices '3 7 11'; left out: all",
    )
    p.add_argument(
        "--rhos",
        nargs="+",
        type=rank_fraction,
        default=[0.9, 0.8, 0.6, 0.2, 0.1, 0.05, 0.01],
        help="rank fractions rho, each in (0, 1]",
    )
    p.add_argument("--top-k", type=positive_int, default=5, help="C2I: candidates evaluated")
    p.add_argument(
        "--score",
        choices=("first_order", "raw"),
        default="first_order",
        help="C2I: candidate score (first-order loss change, or the raw gradient inner product)",
    )
    p.add_argument("--combine", action="store_true", help="C2I: greedily stack kept interventions")
    p.add_argument(
        "--selection",
        choices=("auto", "guard", "plain"),
        default="auto",
        help=(
            "how a candidate is kept: 'guard' = only when its gain is beyond a paired bootstrap's noise (balanced "
            "over labels when they are unbalanced), 'plain' = when better on the evaluation examples; 'auto' "
            "(default) = guard for c2i, plain for laser (LASER as published)"
        ),
    )
    p.add_argument("--batch-size", type=positive_int, default=8, help="examples per forward pass")
    p.add_argument(
        "--state",
        default=None,
        metavar="FILE.json",
        help="LASER: state file to resume an interrupted search; left out: no resuming",
    )
    p.add_argument(
        "--eval-examples",
        dest="test_examples",
        type=positive_int,
        default=None,
        help="test examples for the accuracy before/after; left out: the whole test split",
    )
    p.add_argument("--strict", action="store_true", help="stop instead of warning when a split is smaller than asked")
    add_progress_option(p)
    add_push_option(p)
    add_seed_option(p)
    p.set_defaults(func=run)
    return p


def check_arguments(args: argparse.Namespace) -> None:
    """What can be checked before the task and the model load: option combinations, `--output`, `--state`.

    Raises:
        [`CommandError`] or [`~peft_spectral.state.StateFileError`]: naming the option.
    """
    if len(set(args.rhos)) != len(args.rhos):
        raise CommandError(f"--rhos {' '.join(map(str, args.rhos))}: a value is repeated (each rho is one candidate)")
    if args.method == "c2i" and args.state:
        raise CommandError("--state resumes a LASER search (--method laser); C2I would ignore it")
    if args.method == "laser" and args.clustered:
        raise CommandError("--clustered is a C2I mode (--method c2i); LASER evaluates plain truncations")
    output_directory(args.output)
    if args.state:
        state_file(args.state, what="LASER search state")


def _check_clusters(model, modules, clusters: int) -> None:
    from ..tuners._linear import weight_matrix

    rows = {name: weight_matrix(model.get_submodule(name)).shape[0] for name in modules}
    name = min(rows, key=rows.get)
    if clusters > rows[name]:
        raise CommandError(
            f"--clusters {clusters}: more than the {rows[name]} rows of {name}; use at most {rows[name]}"
        )


def run(args: argparse.Namespace) -> int:
    from .. import compress as C
    from ..compress.distributed import launched_state
    from ..data import load_task
    from ..evaluation import evaluate

    check_arguments(args)
    task = load_task(args.task, seed=args.seed)
    model, tok = load_model_or_exit(args)
    try:
        modules = C.find_target_modules(model, args.matrices, args.layers)
        if args.clustered:
            _check_clusters(model, modules, args.clusters)
        validation = C.take_examples(task.validation, args.n_val, "validation", strict=args.strict)
        test = C.take_examples(task.test, args.test_examples, "test", strict=args.strict)
        if args.method == "c2i":
            calibration = C.take_examples(task.train, args.n_grad, "calibration (train)", strict=args.strict)
            evaluation = validation
            if args.clustered:
                evaluation = C.take_examples(task.validation, args.n_eval, "evaluation", strict=args.strict)
    except CommandError:
        raise
    except ValueError as err:  # --matrices / --layers matching nothing, a split smaller than asked with --strict
        raise CommandError(str(err)) from err
    use_guard = args.selection == "guard" or (args.selection == "auto" and args.method == "c2i")
    guard = C.SelectionGuard(seed=args.seed) if use_guard else None
    if args.method == "laser":
        grid = C.candidate_grid(modules, args.rhos)
        print(
            f"LASER: {len(grid)} candidates ({len(modules)} matrices × {len(args.rhos)} rho) on "
            f"{len(validation)} validation examples"
        )
        result = C.laser_search(
            model,
            validation,
            grid,
            tokenizer=tok,
            kind=task.kind,
            batch_size=args.batch_size,
            state_path=args.state,
            guard=guard,
        )
    else:
        config = C.C2ISearchConfig(
            rhos=args.rhos,
            clusters=args.clusters if args.clustered else 1,
            top_k=args.top_k,
            score=args.score,
            combine=args.combine,
            n_eval=None,  # the evaluation examples were taken above (--n-eval / --n-val)
            guard=guard,
            kind=task.kind,
            batch_size=args.batch_size,
            seed=args.seed,
            progress=not args.no_progress,
        )
        result = C.c2i_search(model, calibration, evaluation, modules, config, tokenizer=tok)
    processes = launched_state()
    if processes is not None and not processes.is_main_process:
        return 0  # under `accelerate launch` every process has the same result; the main one reports and saves it
    print(f"{result.method}: {result.evaluations} evaluations, {result.wall_time_s:.1f} s")
    print(
        f"search set: base acc {result.base.accuracy:.3f} (loglik {result.base.mean_loglik:.3f}) -> "
        f"{result.best.accuracy:.3f} (loglik {result.best.mean_loglik:.3f})"
    )
    for cand in result.candidates:
        if cand.decision is not None and (args.method == "c2i" or cand.intervention in result.chosen):
            print(f"  {cand.intervention}: {cand.decision.reason}")
    if not result.chosen:
        print("no intervention beat the unmodified model; nothing to save")
    for iv in result.chosen:
        print(f"  chosen: {iv}")

    before = evaluate(model, tok, test, kind=task.kind, batch_size=args.batch_size)
    after = before
    adapted = None
    if result.chosen:
        adapted = C.apply_result(model, result)
        after = evaluate(adapted, tok, test, kind=task.kind, batch_size=args.batch_size)
    print(f"test accuracy ({len(test)} examples): before {before.accuracy:.3f} -> after {after.accuracy:.3f}")

    out = Path(args.output)  # checked writable before the search
    out.mkdir(parents=True, exist_ok=True)
    if adapted is not None:
        adapted.save_pretrained(out)
    summary = result.to_dict()
    summary["test"] = {"n": len(test), "before": before.accuracy, "after": after.accuracy}
    (out / "search.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {out}")
    push_adapter_if_requested(args, out)
    if adapted is not None:
        adapted.unload()  # leave the caller's model as it was
    return 0
