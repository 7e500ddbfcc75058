"""`peft-spectral cpi`: CPI-FT (core parameter isolation) multi-task fine-tuning of several tasks."""

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
    load_model_or_exit,
    non_negative_float,
    non_negative_int,
    number,
    output_directory,
    positive_float,
    positive_int,
    push_adapter_if_requested,
)


logger = logging.getLogger(__name__)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(
        subparsers,
        "cpi",
        help="multi-task SFT with core parameter isolation (CPI-FT): probe, cores, grouping, fusion, staged SFT",
        description=(
            "Fine-tune on several tasks with CPI-FT. Each task is first fine-tuned alone (probe); its core region is "
            "the top p of parameters by |delta|; tasks whose cores overlap (Jaccard >= tau) are grouped; the probes "
            "are fused (cores transplanted, the rest merged by SLERP); then one SFT stage per group runs with the "
            "earlier groups' cores frozen. The state directory (--output) makes the run resumable: run the same "
            "command again to continue. The result is a CoreIsolation PEFT adapter in OUTPUT/final (or a full model "
            "with --train-params full) and a report (report.json/.md, jaccard.png)."
        ),
    )
    p.add_argument(
        "--tasks", nargs="+", default=[], metavar="SPEC", help="task specs, e.g. 'rg:gcd?max_value=30' (docs/data.md)"
    )
    p.add_argument("--jsonl", nargs="+", default=[], metavar="PATH", help="task files in the package's JSONL format")
    add_model_options(p)
    add_output_option(p, "the run's state (resumed when it exists), final/ and the report")
    p.add_argument("--steps", type=positive_int, default=50, help="optimizer steps of each probe")
    p.add_argument(
        "--stage-steps", type=positive_int, default=None, help="optimizer steps of each stage; left out: --steps"
    )
    p.add_argument(
        "--p",
        "--core-fraction",
        dest="core_fraction",
        type=number,
        default=0.01,
        help="core fraction p in (0, 1)",
    )
    p.add_argument(
        "--tau",
        "--similarity-threshold",
        dest="tau",
        type=number,
        default=0.1,
        help="Jaccard threshold tau in [0, 1] for grouping tasks",
    )
    p.add_argument("--scope", choices=("global", "per_tensor"), default="global", help="top-p scope of the cores")
    p.add_argument(
        "--train-params",
        choices=("adapter", "full"),
        default="adapter",
        help="'adapter': CoreIsolation deltas of --target-modules; 'full': every parameter",
    )
    p.add_argument(
        "--target-modules",
        nargs="+",
        default=["all-linear"],
        help="modules adapted in adapter mode, e.g. gate_proj up_proj down_proj",
    )
    p.add_argument("--lr", type=positive_float, default=1e-4, help="learning rate (> 0)")
    p.add_argument("--stage-lr", type=positive_float, default=None, help="stage learning rate; left out: --lr")
    p.add_argument("--weight-decay", type=non_negative_float, default=0.0, help="AdamW weight decay (>= 0)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="examples per optimizer micro-step")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="gradient accumulation steps")
    p.add_argument("--max-length", type=positive_int, default=256, help="token limit of a training sequence")
    p.add_argument(
        "--train-examples",
        dest="max_train",
        type=positive_int,
        default=None,
        help="training examples per task; left out: all",
    )
    p.add_argument(
        "--stage-order",
        choices=("random", "input", "difficulty", "dependency", "core_overlap", "small_first"),
        default="random",
        help="order of the stages: 'random' (seeded by --seed), 'input', 'difficulty' (lowest probe loss "
        "first), 'dependency' (see --stage-dependencies), 'core_overlap' (least core overlap first), 'small_first'",
    )
    p.add_argument(
        "--stage-dependencies",
        nargs="+",
        default=None,
        metavar="BEFORE:AFTER",
        help="with --stage-order dependency: task pairs, the group of BEFORE trains before the group of AFTER",
    )
    p.add_argument(
        "--fusion",
        choices=("slerp_params", "slerp_task_vectors"),
        default="slerp_params",
        help="merge of non-core entries: SLERP of the fine-tuned parameters (the paper) or of the task vectors",
    )
    p.add_argument(
        "--slerp-t", type=number, default=None, help="fixed SLERP weight in [0, 1]; left out: equal task weights"
    )
    p.add_argument(
        "--until",
        choices=("probe", "cores", "grouping", "fusion", "staged"),
        default=None,
        help="stop after this step (run again without it to continue); left out: run to the end",
    )
    p.add_argument(
        "--eval-examples",
        dest="max_eval",
        type=non_negative_int,
        default=50,
        help="test examples per task in the report; 0: all",
    )
    p.add_argument("--no-eval", action="store_true", help="do not score the final model")
    add_progress_option(p)
    add_push_option(p)
    add_seed_option(p)
    p.set_defaults(func=run)
    return p


def load_tasks(names: list[str], jsonl: list[str], seed: int = 0) -> list:
    """The tasks of the task specs, then of the JSONL files, in the order given; all split with `seed`."""
    from ..data import load_task

    return [load_task(spec, seed=seed) for spec in [*names, *(f"jsonl:{path}" for path in jsonl)]]


def make_eval_fn(max_eval: int | None, batch_size: int = 8):
    """An `eval_fn` for [`CPIPipeline`]: accuracy on (the first `max_eval` of) each task's test split."""

    def eval_fn(model, tokenizer, task) -> dict:
        from ..evaluation import evaluate

        examples = task.test[:max_eval] if max_eval else task.test
        if not examples:
            return {"n": 0}
        res = evaluate(model, tokenizer, examples, kind=task.kind, batch_size=batch_size)
        return {"accuracy": res.accuracy, "n": res.n, "mean_loglik": res.mean_loglik}

    return eval_fn


def run(args: argparse.Namespace) -> int:
    from ..cpi import CPIConfig, CPIPipeline
    from ..tuners.core_isolation import CoreIsolationConfig

    if not args.tasks and not args.jsonl:
        raise CommandError("give at least one task with --tasks and/or --jsonl")
    try:
        dependencies = None
        if args.stage_dependencies is not None:
            dependencies = [pair.split(":", 1) for pair in args.stage_dependencies]
            if any(len(pair) != 2 for pair in dependencies):
                raise ValueError(f"--stage-dependencies takes BEFORE:AFTER pairs, got {args.stage_dependencies}")
        adapter = CoreIsolationConfig(
            target_modules=args.target_modules[0] if args.target_modules == ["all-linear"] else args.target_modules,
            core_fraction=args.core_fraction,
            similarity_threshold=args.tau,
            core_scope=args.scope,
            slerp_t=args.slerp_t,
        )
        config = CPIConfig(
            adapter=adapter,
            train_params=args.train_params,
            probe_steps=args.steps,
            stage_steps=args.stage_steps,
            learning_rate=args.lr,
            stage_learning_rate=args.stage_lr,
            weight_decay=args.weight_decay,
            batch_size=args.batch_size,
            grad_accum=args.grad_accum,
            max_length=args.max_length,
            max_train_examples=args.max_train,
            stage_order=args.stage_order,
            stage_dependencies=dependencies,
            fusion=args.fusion,
            seed=args.seed,
        )
    except ValueError as err:
        raise CommandError(str(err)) from err
    output_directory(args.output)
    tasks = load_tasks(args.tasks, args.jsonl, seed=args.seed)
    model, tok = load_model_or_exit(args)
    pipe = CPIPipeline(
        model,
        tok,
        tasks,
        config,
        args.output,
        progress=not args.no_progress,
        eval_fn=None if args.no_eval else make_eval_fn(args.max_eval),
    )
    report = pipe.run(until=args.until)
    print(f"completed: {', '.join(report['completed'])}")
    if report.get("groups") is not None:
        print(f"groups (tau={config.adapter.similarity_threshold}): {report['groups']}")
        print(f"stage order: {report['stage_order']}")
    for name, score in (report.get("scores") or {}).items():
        print(f"  {name}: {json.dumps(score)}")
    if args.until is None:
        print(f"wrote {Path(args.output) / 'final'} and {Path(args.output) / 'report.md'}")
        push_adapter_if_requested(args, Path(args.output) / "final")
    return 0
