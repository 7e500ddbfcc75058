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
            "progress and the logged reward/KL/loss, and saves a PEFT adapter (only the z vectors) with a model card "
            "to --output."
        ),
    )
    p.add_argument("--task", required=True, help="task name (e.g. a BigBench task such as elementary_math_qa)")
    add_model_options(p)
    add_output_option(
        p, "the adapter, its model card README.md, expert.json, training_log.json, test_eval.json and checkpoints/"
    )
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
    p.add_argument(
        "--beta",
        type=non_negative_float,
        default=0.1,  # peft_spectral.training.PAPER_BETA (not imported here: --help stays fast)
        help="KL weight lambda to the starting model (RL; the paper's grid: 0, 0.1, 0.2, 0.3)",
    )
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate (the paper's)")
    p.add_argument("--prompts-per-step", type=positive_int, default=2, help="RL: prompts per step")
    p.add_argument("--num-generations", type=positive_int, default=4, help="RL: samples per prompt")
    p.add_argument("--max-completion-length", type=positive_int, default=8, help="RL: new tokens per sample")
    p.add_argument("--batch-size", type=positive_int, default=8, help="SFT: examples per step")
    p.add_argument(
        "--target-modules", nargs="+", default=None, help="module names to adapt; left out: the MLP projections"
    )
    p.add_argument(
        "--svf-mode",
        choices=("linear", "sigmoid"),
        default=None,
        help="SVF scale function of z (SVFConfig.mode); left out: linear",
    )
    p.add_argument(
        "--init-adapter",
        metavar="DIR",
        default=None,
        help="warm start: load this saved SVF adapter (e.g. an SFT expert) and train its z further with --method "
        "(its target modules and mode are kept); left out: z starts at 1",
    )
    p.add_argument(
        "--train-examples", type=positive_int, default=None, help="use only the first N train examples; left out: all"
    )
    p.add_argument(
        "--eval-examples",
        type=int,
        default=0,
        help="evaluate base and adapter on the first N test examples (generated answers): accuracies with 95%% "
        "CIs and the paired difference (95%% CI, McNemar p), written to test_eval.json and the model card; 0 skips",
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


def _recipe_from_args(args: argparse.Namespace, n_train: int) -> dict[str, Any]:
    recipe: dict[str, Any] = {"train_examples": n_train, "seed": args.seed}
    if args.init_adapter:
        recipe["init_adapter"] = args.init_adapter
    return recipe


def _check_init_adapter(args: argparse.Namespace) -> None:
    if not args.init_adapter:
        return
    if args.target_modules is not None or args.svf_mode is not None:
        raise SystemExit(
            "--init-adapter keeps the loaded adapter's target modules and mode: leave out --target-modules/--svf-mode"
        )
    if not Path(args.init_adapter).is_dir():
        raise SystemExit(f"--init-adapter {args.init_adapter!r}: no such adapter directory")


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from ..adapter_io import AdapterLoadError
    from ..expert_eval import evaluate_generated, paired_report, report_lines, write_test_eval
    from ..training import load_trainable_adapter, train_svf
    from ..tuners.svf import SVFConfig

    _check_init_adapter(args)
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
        + (f", starting from {args.init_adapter}" if args.init_adapter else "")
    )

    report: dict[str, Any] = {"task": task.name, "kind": task.kind, "method": args.method, "steps": args.steps}
    max_new_tokens = max(args.max_completion_length, 8)
    eval_kwargs = {"kind": task.kind, "max_new_tokens": max_new_tokens, "progress": not args.no_progress}
    before = None
    if test:
        before = evaluate_generated(model, tokenizer, test, **eval_kwargs)
        print(f"base test accuracy ({len(test)} examples, generated answers): {before.ci()}")
        report["base_accuracy"] = before.accuracy

    config = None
    if args.init_adapter:
        try:
            model = load_trainable_adapter(model, args.init_adapter)
        except AdapterLoadError as err:
            raise SystemExit(f"--init-adapter {args.init_adapter!r}: {err}") from None
    else:
        config = SVFConfig(target_modules=args.target_modules, mode=args.svf_mode or "linear", task_type="CAUSAL_LM")
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
        max_train_seconds=args.time_budget,
        eval_max_new_tokens=max_new_tokens,
        **_resume_kwargs(args.resume),
        **preset,
    )
    wall = time.perf_counter() - start
    peft_model = result.model
    steps_run = len(result.step_times)
    report.update(trainable_parameters=result.trainable_parameters, wall_s=wall, logs=result.logs)
    if args.init_adapter:
        report["init_adapter"] = args.init_adapter
    if result.resumed_from:
        report["resumed_from"] = result.resumed_from
    if result.time_budget is not None:
        report["time_budget"] = result.time_budget
    if result.validation is not None:
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
    card = {
        "task": task.name,
        "description": task.description,
        "kind": task.kind,
        "recipe": _recipe_from_args(args, len(train)),
        "wall_seconds": wall,
    }
    result.save(out, **card)  # the adapter first: a failing evaluation must not lose it
    print(
        f"trained {result.trainable_parameters} parameters in {wall:.1f} s ({steps_run} steps in this run, "
        f"{result.train_runtime / max(steps_run, 1):.2f} s/step); adapter saved to {out} with its model card"
    )
    if test:
        after = evaluate_generated(peft_model, tokenizer, test, **eval_kwargs)
        settings = {"split": "test", "mode": "generate", "max_new_tokens": max_new_tokens, "seed": args.seed}
        test_eval = paired_report(before, after, task=task.name, settings=settings)
        path = write_test_eval(out, test_eval)
        print("\n".join(["test accuracy (generated answers):", *report_lines(test_eval), f"written to {path}"]))
        report["svf_accuracy"] = after.accuracy
        report["test"] = {k: v for k, v in test_eval.items() if k not in ("base", "adapter")}
        result.save(out, test_eval=test_eval, **card)
    (out / "training_log.json").write_text(json.dumps(report, indent=1))
    push_adapter_if_requested(args, out)
    return 0
