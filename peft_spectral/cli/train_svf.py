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
        help="write a resumable checkpoint every N steps; left out: no checkpoints",
    )
    p.add_argument("--resume", default=None, help="checkpoint directory to resume from ('last' for the newest)")
    add_progress_option(p)
    add_push_option(p)
    add_seed_option(p)
    p.set_defaults(func=run)
    return p


def _load_task(name: str, seed: int):
    from ..tasks import load_task

    return load_task(name, seed=seed)


def _resume_arg(value: Optional[str]) -> Any:
    if value is None:
        return None
    return True if value == "last" else value


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
        resume_from_checkpoint=_resume_arg(args.resume),
        **preset,
    )
    wall = time.perf_counter() - start
    peft_model = result.model
    peft_model.save_pretrained(str(out))
    print(
        f"trained {result.trainable_parameters} parameters in {wall:.1f} s "
        f"({wall / args.steps:.2f} s/step); adapter saved to {out}"
    )
    report.update(trainable_parameters=result.trainable_parameters, wall_s=wall, logs=result.logs)
    if test:
        after = evaluate(peft_model, tokenizer, test, progress=not args.no_progress, **eval_kwargs)
        print(f"SVF test accuracy: {after.accuracy:.3f}")
        report["svf_accuracy"] = after.accuracy
    (out / "training_log.json").write_text(json.dumps(report, indent=1))
    push_adapter_if_requested(args, out)
    return 0
