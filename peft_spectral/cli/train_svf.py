"""`peft-spectral train-svf`: train an SVF expert on a task with TRL (RL: GRPO/RLOO with ±1 rewards, or SFT)."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

from ._common import (
    add_command,
    add_model_options,
    add_output_option,
    add_progress_option,
    add_push_option,
    add_seed_option,
    load_model_or_exit,
    non_negative_float,
    positive_float,
    positive_int,
    push_adapter_if_requested,
)


logger = logging.getLogger(__name__)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = add_command(
        subparsers,
        "train-svf",
        help="train an SVF expert (only singular-value scales z) on a task with TRL: RL or SFT",
        description=(
            "Train an SVF adapter on a task's train split. 'rl' is Transformer²'s recipe: REINFORCE-style policy "
            "gradient (TRL GRPO or RLOO) with +1/-1 rewards for right/wrong answers, AdamW lr 2e-3, grad-norm clip "
            "1e-3 and a KL weight --beta to the base model. 'sft' trains on the gold answers with TRL SFT. Shows "
            "progress and the logged reward/KL/loss, and saves a PEFT adapter (only the z vectors) to --output."
        ),
    )
    p.add_argument("--task", required=True, help="task name (e.g. a BigBench task such as elementary_math_qa)")
    add_model_options(p)
    add_output_option(p, "the adapter, training_log.json and checkpoints/")
    p.add_argument("--method", choices=("rl", "sft"), default="rl", help="training objective")
    p.add_argument("--algorithm", choices=("grpo", "rloo"), default="grpo", help="RL algorithm (--method rl)")
    p.add_argument("--steps", type=positive_int, default=40, help="optimizer steps")
    p.add_argument(
        "--time-budget",
        type=positive_float,
        default=None,
        metavar="SECONDS",
        help="stop once training has taken SECONDS (validation excluded) or at --steps, whichever comes first",
    )
    p.add_argument("--beta", type=non_negative_float, default=0.0, help="KL weight lambda (RL; paper 0-0.3)")
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate (the paper's)")
    p.add_argument("--prompts-per-step", type=positive_int, default=2, help="RL: prompts per step")
    p.add_argument("--num-generations", type=positive_int, default=4, help="RL: samples per prompt")
    p.add_argument("--max-completion-length", type=positive_int, default=8, help="RL: new tokens per sample")
    p.add_argument("--batch-size", type=positive_int, default=8, help="SFT: examples per step")
    p.add_argument(
        "--target-modules", nargs="+", default=None, help="module names to adapt; left out: the MLP projections"
    )
    p.add_argument(
        "--svf-mode", choices=("linear", "sigmoid"), default="linear", help="SVF scale function of z (SVFConfig.mode)"
    )
    p.add_argument(
        "--train-examples", type=positive_int, default=None, help="use only the first N train examples; left out: all"
    )
    p.add_argument(
        "--eval-examples",
        type=int,
        default=0,
        help="evaluate base and adapter on the first N test examples (generated answers); 0 skips",
    )
    p.add_argument(
        "--save-steps",
        type=positive_int,
        default=None,
        help="write a resumable checkpoint every N steps; left out: none (every 10 with --resume)",
    )
    p.add_argument(
        "--val-examples",
        type=positive_int,
        default=None,
        help="checkpoint selection: score the first N validation examples before training and every --eval-every "
        "steps, keep the best z (restored at the end) and write validation.json",
    )
    p.add_argument("--eval-every", type=positive_int, default=10, help="steps between validations")
    p.add_argument("--patience", type=positive_int, default=None, help="stop after N validations without improvement")
    p.add_argument(
        "--val-metric",
        choices=("accuracy", "balanced_accuracy"),
        default="accuracy",
        help="validation score (balanced_accuracy: mean per-label accuracy)",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="last",
        default=None,
        help="make the run resumable: continue from the newest checkpoint under --output when there is one (run "
        "the same command again after an interruption); or give a checkpoint directory",
    )
    add_progress_option(p)
    add_push_option(p)
    add_seed_option(p)
    p.set_defaults(func=run)
    return p


def _load_task(name: str, seed: int):
    from ..tasks import load_task

    return load_task(name, seed=seed)


def _resume_kwargs(value: Optional[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if value == "last":
        return {"resume": True}
    if not Path(value).is_dir():
        raise SystemExit(f"--resume {value!r}: no such checkpoint directory")
    return {"resume_from_checkpoint": value}


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from ..evaluation import evaluate
    from ..training import train_svf
    from ..tuners.svf import SVFConfig

    torch.manual_seed(args.seed)
    task = _load_task(args.task, args.seed)
    model, tokenizer = load_model_or_exit(args)
    train = task.train[: args.train_examples] if args.train_examples else task.train
    if not train:
        raise SystemExit(f"--task {args.task!r} has no train examples")
    test = task.test[: args.eval_examples] if args.eval_examples > 0 else []
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"train-svf: task {task.name} ({task.kind}), {len(train)} train examples, method {args.method}"
        + (f"/{args.algorithm} beta={args.beta}" if args.method == "rl" else "")
        + f", {args.steps} steps"
    )

    report: dict[str, Any] = {"task": task.name, "kind": task.kind, "method": args.method, "steps": args.steps}
    eval_kwargs = {"kind": task.kind, "mode": "generate", "max_new_tokens": max(args.max_completion_length, 8)}
    if test:
        before = evaluate(model, tokenizer, test, progress=not args.no_progress, **eval_kwargs)
        print(f"base test accuracy ({len(test)} examples, generated answers): {before.accuracy:.3f}")
        report["base_accuracy"] = before.accuracy

    config = SVFConfig(target_modules=args.target_modules, mode=args.svf_mode)
    preset: dict[str, Any] = {
        "learning_rate": args.lr,
        "seed": args.seed,
        "save_steps": args.save_steps,
        "disable_tqdm": args.no_progress,
        "use_cpu": next(model.parameters()).device.type == "cpu",
    }
    if args.val_examples and not task.validation:
        raise SystemExit(f"--val-examples: task {args.task!r} has no validation examples")
    if args.method == "rl":
        preset.update(
            prompts_per_step=args.prompts_per_step,
            num_generations=args.num_generations,
            max_completion_length=args.max_completion_length,
        )
    else:
        preset.update(per_device_train_batch_size=args.batch_size)
    start = time.perf_counter()
    result = train_svf(
        model,
        tokenizer,
        train,
        method=args.method,
        algorithm=args.algorithm,
        kind=task.kind,
        output_dir=str(out / "checkpoints"),
        max_steps=args.steps,
        beta=args.beta,
        svf_config=config,
        printer=tqdm.write,
        eval_examples=task.validation[: args.val_examples] if args.val_examples else None,
        eval_every=args.eval_every,
        early_stopping_patience=args.patience,
        eval_metric=args.val_metric,
        eval_max_new_tokens=max(args.max_completion_length, 8),
        max_train_seconds=args.time_budget,
        **_resume_kwargs(args.resume),
        **preset,
    )
    wall = time.perf_counter() - start
    peft_model = result.model
    peft_model.save_pretrained(str(out))
    steps_run = len(result.step_times)
    print(
        f"trained {result.trainable_parameters} parameters in {wall:.1f} s ({steps_run} steps in this run, "
        f"{result.train_runtime / max(steps_run, 1):.2f} s/step); adapter saved to {out}"
    )
    report.update(trainable_parameters=result.trainable_parameters, wall_s=wall, logs=result.logs)
    if result.resumed_from:
        report["resumed_from"] = result.resumed_from
    if result.time_budget is not None:
        report["time_budget"] = result.time_budget
    if result.validation is not None:
        result.save_validation(out)
        report["validation"] = {k: v for k, v in result.validation.items() if k != "curve"}
        print(
            f"validation: best {result.validation['best_score']:.3f} at step {result.validation['best_step']}"
            + (
                f", stopped early at step {result.validation['stopped_early_at']}"
                if result.validation["stopped_early_at"]
                else ""
            )
            + f"; curve in {out / 'validation.json'}"
        )
    if test:
        after = evaluate(peft_model, tokenizer, test, progress=not args.no_progress, **eval_kwargs)
        print(f"SVF test accuracy: {after.accuracy:.3f}")
        report["svf_accuracy"] = after.accuracy
    (out / "training_log.json").write_text(json.dumps(report, indent=1))
    push_adapter_if_requested(args, out)
    return 0
