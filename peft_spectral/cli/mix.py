"""`peft-spectral mix` and `peft-spectral eval-two-pass`: Transformer² with saved SVF experts.

* `mix` searches mixing weights α of the experts on a few-shot JSONL file with the cross-entropy method and saves
  the mixture as an ordinary SVF adapter.
* `eval-two-pass` evaluates a task with the two passes (pass 1: base / prompt dispatch / classifier expert /
  a saved mixture; pass 2: the answer), printing accuracy, the chosen experts and the time of each pass.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ._common import (
    CommandError,
    add_command,
    add_model_options,
    add_output_option,
    add_progress_option,
    add_push_option,
    add_seed_option,
    finite_number,
    load_model_or_exit,
    non_negative_float,
    non_negative_int,
    number_in,
    output_directory,
    positive_float,
    positive_int,
    push_adapter_if_requested,
)


logger = logging.getLogger(__name__)

#: The results file `eval-two-pass` writes into `--output`.
TWO_PASS_RESULTS = "two_pass.json"


def _add_expert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--experts", nargs="+", required=True, metavar="DIR", help="saved SVF expert adapters (directories or Hub ids)"
    )
    p.add_argument("--names", nargs="+", default=None, help="one name per expert; left out: the directory names")
    p.add_argument(
        "--descriptions", nargs="+", default=None, help="one description per expert (for dispatch); left out: none"
    )
    add_model_options(p, inference=True)
    p.add_argument("--batch-size", type=positive_int, default=8, help="prompts per forward pass")


def add_parser(subparsers) -> None:
    p = add_command(
        subparsers,
        "mix",
        help="few-shot Transformer² mixing: search expert weights by CEM and save the mixed SVF adapter",
        description=(
            "Search mixing weights alpha (one per expert, or per expert per layer with --per-layer) of saved SVF "
            "experts with the cross-entropy method, scoring accuracy on the labelled shots (mean log-likelihood "
            "breaks ties), and save the mixture as an ordinary SVF adapter in --output. By default the search is "
            "regularised (shots split into fit/hold-out parts, the result chosen on the hold-out part with the base "
            "model as a candidate, mixing around the base model z' = z0 + sum_k alpha_k (z_k - z0), early "
            "stopping); --no-regularize runs the reference CEM (z' = sum_k alpha_k z_k on all shots)."
        ),
    )
    _add_expert_args(p)
    p.add_argument(
        "--shots",
        required=True,
        metavar="FILE.jsonl",
        help="labelled examples: {prompt, choices, label} or {prompt, target} per line",
    )
    add_output_option(p, "the mixed SVF adapter and transformer2_mixture.json (weights, search history)")
    p.add_argument(
        "--kind",
        choices=("multiple_choice", "generation", "code"),
        default=None,
        help="task kind; left out: multiple_choice when the shots have choices, else generation",
    )
    p.add_argument("--per-layer", action="store_true", help="one alpha per expert per transformer block")
    p.add_argument(
        "--population",
        type=positive_int,
        default=None,
        help="CEM: candidates per generation (at least 2); left out: 16 (reference, --no-regularize: 32)",
    )
    p.add_argument(
        "--elite-fraction",
        type=number_in(0, 1, low_open=True),
        default=None,
        help="CEM: share of candidates refitted on, in (0, 1]; left out: 0.25 (reference: 0.2)",
    )
    p.add_argument("--init-std", type=positive_float, default=0.5, help="CEM: initial standard deviation of alpha")
    p.add_argument(
        "--init-mean",
        type=finite_number,
        default=None,
        help="CEM: initial mean of alpha; left out: 0 (reference: 1/K)",
    )
    p.add_argument(
        "--generations", type=positive_int, default=None, help="CEM: generations at most; left out: 12 (reference: 50)"
    )
    p.add_argument(
        "--no-regularize", action="store_true", help="the plain reference CEM (population 32, 50 generations)"
    )
    p.add_argument(
        "--holdout-fraction",
        type=number_in(0, 1, low_open=True, high_open=True),
        default=0.4,
        help="share of the shots held out to select the mixture, in (0, 1)",
    )
    p.add_argument(
        "--l1-penalty", type=non_negative_float, default=0.01, help="fit fitness pays this times mean |alpha|"
    )
    p.add_argument(
        "--patience",
        type=non_negative_int,
        default=4,
        help="generations without hold-out progress before stopping (0: never stop early)",
    )
    add_progress_option(p)
    add_push_option(p)
    add_seed_option(p)
    p.set_defaults(func=run_mix)

    e = add_command(
        subparsers,
        "eval-two-pass",
        help="evaluate a task with Transformer² two-pass inference (dispatch, classifier expert or mixture)",
        description=(
            "Pass 1 picks an adaptation per prompt (base, prompt dispatch, a classifier expert, or a saved "
            "mixture), pass 2 answers with it, prompts grouped by expert. Prints accuracy, expert choices and the "
            "time of both passes, and writes them to OUTPUT/two_pass.json."
        ),
    )
    _add_expert_args(e)
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", metavar="SPEC", help="a task spec, e.g. 'rg:gcd?max_value=30' (docs/data.md)")
    src.add_argument("--task-file", metavar="FILE.jsonl", help="a JSONL task file (same format as mix --shots)")
    add_output_option(e, f"{TWO_PASS_RESULTS} (accuracy, expert choices, timings)")
    e.add_argument("--split", choices=("train", "validation", "test"), default="test", help="split to evaluate")
    e.add_argument(
        "--eval-examples",
        type=positive_int,
        default=None,
        help="evaluate the first N examples only; left out: the whole split",
    )
    e.add_argument(
        "--strategy",
        choices=("base", "dispatch", "classifier", "mixture"),
        default="dispatch",
        help="pass 1: the base model, prompt dispatch, a classifier expert or a saved mixture",
    )
    e.add_argument(
        "--classifier", default=None, metavar="DIR", help="classifier expert adapter (needed by --strategy classifier)"
    )
    e.add_argument("--mixture", default=None, metavar="DIR", help="saved mixed adapter (needed by --strategy mixture)")
    e.add_argument(
        "--dispatch-mode",
        choices=("loglik", "generate"),
        default="loglik",
        help="pass 1: score each category name, or generate and parse the answer",
    )
    e.add_argument(
        "--max-question-tokens", type=positive_int, default=96, help="pass 1: question tokens shown in the prompt"
    )
    e.add_argument(
        "--answer-mode",
        choices=("auto", "loglik", "generate"),
        default="auto",
        help="pass 2: score the options (loglik), generate, or pick by task kind (auto)",
    )
    e.add_argument(
        "--threshold",
        type=non_negative_float,
        default=None,
        help="dispatch to 'others' (the base model) unless the top category wins by this confidence (>= 0; at most "
        "1 with --confidence probability)",
    )
    e.add_argument("--confidence", choices=("margin", "probability"), default="margin", help="with --threshold")
    e.add_argument(
        "--content-free",
        nargs="+",
        metavar="TEXT",
        default=None,
        help="pass 1: contextual calibration, subtract each category's prior on these content-free questions "
        "(e.g. --content-free N/A '' ?); loglik dispatch only",
    )
    e.add_argument(
        "--prefix-sharing",
        choices=("prompts", "instruction"),
        default="prompts",
        help="pass-1 prefix run once: the category questions' common prefix, or the instruction only (old)",
    )
    e.add_argument(
        "--no-mixed-batch", action="store_true", help="pass 2 grouped by expert instead of mixed-adapter batches"
    )
    e.add_argument("--compare-paths", action="store_true", help="also time the other pass-2 path")
    e.add_argument("--max-new-tokens", type=positive_int, default=32, help="pass 2: generation budget")
    add_progress_option(e)
    add_seed_option(e)
    e.set_defaults(func=run_eval_two_pass)


def _check_experts(args):
    """Every expert option, before the model loads: counts, names, the adapter directories and their fit."""
    from ..transformer2.library import prepare_experts

    for option, values in (("--names", args.names), ("--descriptions", args.descriptions)):
        if values is not None and len(values) != len(args.experts):
            raise CommandError(f"{option}: {len(values)} given for {len(args.experts)} experts (one per --experts)")
    return prepare_experts(args.experts, names=args.names, descriptions=args.descriptions)


def _library(args, experts):
    from ..transformer2 import ExpertLibrary

    model, tok = load_model_or_exit(args)
    return ExpertLibrary.load(model, tok, experts)


def _cem_config(args):
    from ..transformer2 import CEMConfig

    given = {
        "population": args.population,
        "elite_fraction": args.elite_fraction,
        "init_mean": args.init_mean,
        "generations": args.generations,
    }
    settings = {k: v for k, v in given.items() if v is not None}
    settings.update(
        init_std=args.init_std,
        seed=args.seed,
        progress=not args.no_progress,
        holdout_fraction=args.holdout_fraction,
        l1_penalty=args.l1_penalty,
        patience=args.patience,
    )
    try:
        return CEMConfig.reference(**settings) if args.no_regularize else CEMConfig(**settings)
    except ValueError as err:  # e.g. --population 1
        field = str(err).split(" ", 1)[0].removeprefix("CEMConfig.")
        raise CommandError(f"--{field.replace('_', '-')}: {err}") from err


def _shots(path):
    from ..transformer2 import load_shots

    try:
        shots = load_shots(path)
    except (OSError, ValueError) as err:
        raise CommandError(f"--shots {path}: {err}") from err
    if not shots:
        raise CommandError(f"--shots {path}: no examples")
    return shots


def run_mix(args: argparse.Namespace) -> int:
    from ..distributed import launched_state
    from ..transformer2 import FewShotMixer

    shots = _shots(args.shots)
    kind = args.kind or ("multiple_choice" if all(s.choices for s in shots) else "generation")
    config = _cem_config(args)
    output_directory(args.output)
    experts = _check_experts(args)
    library = _library(args, experts)
    try:
        mixer = FewShotMixer(library, shots, kind=kind, per_layer=args.per_layer, batch_size=args.batch_size)
    except ValueError as err:  # shots that do not fit --kind (no choices, no label, no target)
        raise CommandError(f"--shots {args.shots}: {err}") from err
    result = mixer.search(config)
    processes = launched_state()
    if processes is not None and not processes.is_main_process:
        return 0  # under `accelerate launch` every process has the same α; the main one reports and saves it
    out = mixer.save(args.output, result=result, extra={"cem": dict(vars(config).items())})
    print(f"experts: {', '.join(mixer.experts)}")
    alpha = result.best_alpha
    if alpha.ndim == 1:
        print("alpha: " + ", ".join(f"{n}={a:.3f}" for n, a in zip(mixer.experts, alpha.tolist())))
    else:
        print(
            f"alpha: per layer, shape {tuple(alpha.shape)}; mean per expert: "
            + ", ".join(f"{n}={a:.3f}" for n, a in zip(mixer.experts, alpha.mean(1).tolist()))
        )
    acc, ll = result.best_fitness[:2]
    print(
        f"best fitness on {len(shots)} shots: accuracy {acc:.3f}, mean log-likelihood {ll:.4f} "
        f"({result.evaluations} evaluations, {result.seconds:.1f}s, {result.evaluations_per_second:.2f}/s)"
    )
    if result.regularized:
        print(
            f"hold-out ({len(result.split['holdout'])} shots): accuracy {result.holdout_fitness[0]:.3f}, "
            f"base model {result.base_holdout_fitness[0]:.3f}" + (" (stopped early)" if result.stopped_early else "")
        )
    print(f"saved mixed SVF adapter to {out}")
    push_adapter_if_requested(args, out)
    return 0


def _load_examples(args):
    if args.task_file:
        from ..transformer2 import load_shots

        examples = load_shots(args.task_file)
        kind = "multiple_choice" if all(e.choices for e in examples) else "generation"
        return examples, kind, Path(args.task_file).stem
    from ..data import load_task

    task = load_task(args.task, seed=args.seed)
    return task.split(args.split), task.kind, task.name


def _check_two_pass(args) -> None:
    """Option combinations of `eval-two-pass` and the adapter directories they name, before the model loads."""
    from ..adapter_io import validate_adapter_dir

    if args.threshold is not None and args.confidence == "probability" and args.threshold > 1:
        raise CommandError(
            f"--threshold {args.threshold:g}: a probability margin is at most 1 (--confidence probability)"
        )
    needs = {"classifier": args.classifier, "mixture": args.mixture}
    for strategy, value in needs.items():
        if args.strategy == strategy and not value:
            raise CommandError(f"--strategy {strategy} needs --{strategy} DIR")
        if value and args.strategy != strategy:
            raise CommandError(
                f"--{strategy} is only used with --strategy {strategy} (got --strategy {args.strategy})"
            )
        if value:
            validate_adapter_dir(value, expected_type="SVF")
    for option, value in (("--threshold", args.threshold), ("--content-free", args.content_free)):
        if value is not None and args.strategy not in ("dispatch", "classifier"):
            raise CommandError(
                f"{option} applies to dispatch (--strategy dispatch or classifier), not {args.strategy}"
            )
    if args.content_free is not None and args.dispatch_mode != "loglik":
        raise CommandError(f"--content-free needs --dispatch-mode loglik (got {args.dispatch_mode})")


def run_eval_two_pass(args: argparse.Namespace) -> int:
    from ..transformer2 import DispatchPrompt, FixedDispatcher, PromptDispatcher, two_pass_evaluate

    _check_two_pass(args)
    output_directory(args.output)
    examples, kind, name = _load_examples(args)
    if args.eval_examples is not None:
        examples = examples[: args.eval_examples]
    if not examples:
        raise CommandError(f"no examples to evaluate in {name!r} ({args.split})")
    experts = _check_experts(args)
    library = _library(args, experts)
    prompt = DispatchPrompt(max_question_tokens=args.max_question_tokens)
    dispatch_options = {
        "mode": args.dispatch_mode,
        "prompt": prompt,
        "batch_size": args.batch_size,
        "threshold": args.threshold,
        "confidence": args.confidence,
        "prefix_sharing": args.prefix_sharing,
        "content_free": args.content_free,
    }
    if args.strategy == "base":
        dispatcher = FixedDispatcher(None)
    elif args.strategy == "dispatch":
        dispatcher = PromptDispatcher(None, **dispatch_options)
    elif args.strategy == "classifier":
        adapter = library.load_extra_adapter(args.classifier, "t2_classifier", "classifier")
        dispatcher = PromptDispatcher(adapter, **dispatch_options)
    else:
        dispatcher = FixedDispatcher(library.load_extra_adapter(args.mixture, "t2_mixture", "mixture"))
    result = two_pass_evaluate(
        library,
        dispatcher,
        examples,
        kind=kind,
        mode=args.answer_mode,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        mixed_batch=not args.no_mixed_batch,
        compare_paths=args.compare_paths,
    )
    summary = {
        "task": name,
        "split": args.split,
        "strategy": args.strategy,
        **result.to_dict(),
        "choices": ["base" if c is None else c for c in result.choices],
    }
    print(f"{name} ({args.split}, n={len(examples)}), strategy {args.strategy}: accuracy {result.accuracy:.3f}")
    print("experts chosen: " + ", ".join(f"{k}={v}" for k, v in summary["group_sizes"].items()))
    print(
        f"pass 1 {result.pass1_seconds:.2f}s, pass 2 {result.pass2_seconds:.2f}s "
        f"(pass1/pass2 {result.pass1_over_pass2:.1%}), switching {result.switch_seconds * 1e3:.2f} ms, "
        f"pass 2 {result.pass2_path}"
    )
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / TWO_PASS_RESULTS).write_text(json.dumps(summary, indent=2))
    print(f"wrote {out / TWO_PASS_RESULTS}")
    return 0
