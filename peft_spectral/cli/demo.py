"""`peft-spectral demo`: the main job (see `peft_spectral.demo`)."""

from __future__ import annotations

import argparse

from ._common import (
    add_command,
    add_model_options,
    add_output_option,
    add_progress_option,
    add_seed_option,
    output_directory,
    positive_int,
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..demo import DemoConfig

    d = DemoConfig()
    p = add_command(
        subparsers,
        "demo",
        help="adapt the embedded model with SVF/Transformer², SpectralCompress and CoreIsolation; print a summary",
        description=(
            "Runs the three methods on reasoning-gym tasks (offline, from PyPI): the SVF expert library shipped with "
            "the package (or experts trained briefly, SFT then GRPO, with --train-experts), Transformer² few-shot CEM "
            "mixing and prompt dispatch on a task no expert saw, a Compress-to-Impress search, and a small CPI-FT "
            "run. Prints one summary table (accuracies with 95%% CIs, Δ vs base) and writes report.md with plots "
            "to --output. Re-running continues from what is cached there. Tasks are task specs "
            "(`peft-spectral tasks`)."
        ),
    )
    add_model_options(p)
    add_output_option(p, "the report, the plots and every step's cached result (re-runs resume)", default=d.output_dir)
    p.add_argument(
        "--expert-tasks",
        nargs="+",
        default=None,
        metavar="SPEC",
        help="task specs of the SVF experts; left out: those of the expert library, or three defaults when training",
    )
    p.add_argument(
        "--experts-dir",
        metavar="DIR",
        default=None,
        help="the SVF expert library (directories with an adapter and expert.json); left out: the one shipped with "
        "the package",
    )
    p.add_argument(
        "--train-experts",
        action="store_true",
        help="train the SVF experts (SFT then GRPO, briefly) instead of using the library (also done when there is "
        "no library or --model is given)",
    )
    p.add_argument(
        "--unseen-task",
        metavar="SPEC",
        default=None,
        help=f"Transformer² task no expert saw; left out: {d.unseen_task}",
    )
    p.add_argument(
        "--compress-task", metavar="SPEC", default=None, help=f"task of the C2I search; left out: {d.compress_task}"
    )
    p.add_argument(
        "--cpi-tasks",
        nargs="+",
        metavar="SPEC",
        default=None,
        help=f"tasks of the CPI-FT run; left out: {' '.join(d.cpi_tasks)}",
    )
    p.add_argument("--eval-examples", type=positive_int, default=d.eval_examples, help="test questions per accuracy")
    p.add_argument(
        "--quick",
        action="store_true",
        help="the smaller settings of DemoConfig.quick (same model, fewer steps and examples), for a smoke run",
    )
    add_progress_option(p)
    add_seed_option(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..data import check_task_spec
    from ..demo import DemoConfig, run_demo

    defaults = DemoConfig()
    args.unseen_task = args.unseen_task or defaults.unseen_task
    args.compress_task = args.compress_task or defaults.compress_task
    args.cpi_tasks = args.cpi_tasks or list(defaults.cpi_tasks)
    kwargs = {
        "model": args.model,
        "output_dir": args.output,
        "expert_tasks": tuple(args.expert_tasks) if args.expert_tasks else None,
        "experts_dir": args.experts_dir,
        "train_experts": args.train_experts,
        "unseen_task": args.unseen_task,
        "compress_task": args.compress_task,
        "cpi_tasks": tuple(args.cpi_tasks),
        "seed": args.seed,
        "device": args.device,
        "dtype": args.dtype,
        "progress": not args.no_progress,
    }
    for spec in [*(args.expert_tasks or []), args.unseen_task, args.compress_task, *args.cpi_tasks]:
        check_task_spec(spec)  # a bad spec: one line (TaskSpecError, reported by cli.main), before the model loads
    output_directory(args.output)
    config = DemoConfig.quick(**kwargs) if args.quick else DemoConfig(eval_examples=args.eval_examples, **kwargs)
    run_demo(config)
    return 0
