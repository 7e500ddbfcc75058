"""Benchmark: SVF experts trained with RL (TRL GRPO, ±1 rewards, KL) vs LoRA r=16 on BigBench tasks, on CPU.

For each task: greedy accuracy of the base model on the held-out test split, then the same after training
(a) an SVF adapter with the paper's RL recipe, (b) a LoRA r=16 adapter on the same MLP modules with the same data,
steps, batch and generation settings, and optionally (c) SVF with SFT. Reports trainable parameters and wall time
per step; saves the SVF-RL adapters as experts under `benchmarks/experts/<task>/`.

    python benchmarks/bench_svf_rl.py --probe general_knowledge,navigate,...   # base accuracy of candidate tasks
    python benchmarks/bench_svf_rl.py --tasks A,B,C --steps 20 --sft            # the benchmark
    python benchmarks/bench_svf_rl.py --smoke                                   # tiny random model, seconds
    # one process per task (each gets its own share of a busy CPU), then merge the per-task files:
    python benchmarks/bench_svf_rl.py --tasks A --threads 1 --out docs/results/svf_rl_A &  ...
    python benchmarks/bench_svf_rl.py --merge docs/results/svf_rl_A.json,... --out docs/results/svf_rl

Accuracy is measured by generation (what RL optimises): the model sees the question with lettered options and its
greedy answer is scored by letter or option text (`peft_spectral.evaluation.evaluate(mode="generate")`).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))  # tiny_model.py for the smoke runs

from peft_spectral import SVFConfig  # noqa: E402
from peft_spectral.evaluation import evaluate  # noqa: E402
from peft_spectral.tasks import Example, Task  # noqa: E402
from peft_spectral.training import train_svf, with_lettered_options  # noqa: E402


logger = logging.getLogger("bench_svf_rl")
MLP = ["gate_proj", "up_proj", "down_proj"]


def load(args) -> tuple[Any, Any, dict[str, Task]]:
    if args.smoke:
        from tiny_model import tiny_model as build_tiny_llama
        from tiny_model import tiny_tokenizer as build_tiny_tokenizer

        tok = build_tiny_tokenizer()
        tasks = {}
        for name in ("toy_a", "toy_b", "toy_c"):
            ex = [
                with_lettered_options(
                    Example(
                        prompt=f"{name} {i}: is {i} even?",
                        target="yes" if i % 2 == 0 else "no",
                        choices=("yes", "no"),
                        label=i % 2,
                    )
                )
                for i in range(24)
            ]
            tasks[name] = Task(name=name, kind="multiple_choice", train=ex[8:], validation=[], test=ex[:8])
        return build_tiny_llama(tok), tok, tasks
    from peft_spectral.assets import load_model
    from peft_spectral.tasks import load_task

    model, tok = load_model(None)
    names = args.probe or args.tasks
    tasks = {n: load_task(n, seed=args.seed) for n in names}
    for name, task in tasks.items():
        if task.kind != "multiple_choice":
            raise SystemExit(f"task {name!r} is {task.kind}; this benchmark uses multiple-choice tasks")
        # BigBench prompts from peft_spectral.tasks already letter their options; keep any other task uniform
        for split in ("train", "validation", "test"):
            setattr(task, split, [with_lettered_options(e) for e in task.split(split)])
    return model, tok, tasks


def accuracy(model, tok, examples, args) -> dict[str, float]:
    start = time.perf_counter()
    res = evaluate(
        model,
        tok,
        examples,
        kind="multiple_choice",
        mode="generate",
        max_new_tokens=args.max_completion_length,
        batch_size=args.eval_batch_size,
    )
    return {"accuracy": res.accuracy, "n": res.n, "eval_s": time.perf_counter() - start}


def run_method(base, tok, task: Task, method: str, peft_config, args, out_dir: Path, **kw) -> tuple[dict, Any]:
    model = copy.deepcopy(base)
    common: dict[str, Any] = {
        "output_dir": str(out_dir / "ckpt"),
        "max_steps": args.steps,
        "svf_config": peft_config,
        "seed": args.seed,
        "train_limit": args.train_examples,
    }
    if method == "rl":
        common.update(
            method="rl",
            algorithm=args.algorithm,
            beta=args.beta,
            prompts_per_step=args.prompts_per_step,
            num_generations=args.num_generations,
            max_completion_length=args.max_completion_length,
            temperature=args.temperature,
        )
    else:
        common.update(method="sft", per_device_train_batch_size=args.sft_batch_size)
    common.update(kw)
    result = train_svf(model, tok, task, printer=(print if args.verbose else None), **common)
    result.model.eval()
    acc = accuracy(result.model, tok, task.test[: args.n_test], args)
    rewards = [r["reward"] for r in result.logs if "reward" in r]
    losses = [r["loss"] for r in result.logs if "loss" in r]
    row = {
        "trainable_parameters": result.trainable_parameters,
        "train_s": result.train_runtime,
        "s_per_step": statistics.median(result.step_times) if result.step_times else None,
        "mean_s_per_step": result.train_runtime / args.steps,
        "reward_first_half": statistics.mean(rewards[: len(rewards) // 2]) if len(rewards) > 1 else None,
        "reward_second_half": statistics.mean(rewards[len(rewards) // 2 :]) if len(rewards) > 1 else None,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        **{f"test_{k}": v for k, v in acc.items()},
    }
    return row, result.model


def probe(base, tok, tasks, args) -> None:
    rows = {}
    for name, task in tasks.items():
        acc = accuracy(base, tok, task.test[: args.n_test], args)
        chance = statistics.mean(1 / len(e.choices) for e in task.test[: args.n_test])
        rows[name] = {**acc, "chance": chance, "n_train": len(task.train), "n_test_total": len(task.test)}
        print(
            f"{name}: base {acc['accuracy']:.3f} (chance {chance:.3f}, n={acc['n']}, train {len(task.train)}, "
            f"{acc['eval_s']:.1f} s)",
            flush=True,
        )
    if args.probe_out:
        Path(args.probe_out).write_text(json.dumps(rows, indent=1))


def write_expert(model, task: Task, row: dict, args, root: Path) -> None:
    out = root / task.name
    model.save_pretrained(str(out))
    desc = task.description or task.name
    (out / "README.md").write_text(
        f"# SVF expert: {task.name}\n\n{desc}\n\n"
        f"SVF (linear mode, MLP gate/up/down of all 30 layers, {row['trainable_parameters']} z values) on the embedded "
        f"SmolLM2-135M-Instruct, trained with `peft_spectral.training.train_svf(method='rl', algorithm="
        f"'{args.algorithm}')`: {args.steps} steps × {args.prompts_per_step} prompts × {args.num_generations} samples, "
        f"±1 rewards, beta={args.beta}, AdamW lr 2e-3, max grad norm 1e-3, seed {args.seed}. Test accuracy "
        f"(greedy, {row['test_n']} held-out examples of `load_task('{task.name}', seed={args.seed})`): "
        f"{row['test_accuracy']:.3f}. See docs/results/svf_rl.md.\n"
    )
    (out / "expert.json").write_text(
        json.dumps(
            {
                "task": task.name,
                "description": desc,
                "kind": task.kind,
                "test_accuracy": row["test_accuracy"],
                "steps": args.steps,
            },
            indent=1,
        )
    )


def markdown(results: dict) -> str:
    cfg = results["config"]
    lines = [
        "# SVF-RL vs LoRA on BigBench (SmolLM2-135M-Instruct, CPU)",
        "",
        f"Generated by `benchmarks/bench_svf_rl.py` on {results['machine']}; wall {results['total_wall_s'] / 60:.1f} min"
        + (
            f" ({results['parallel_processes']} tasks in parallel processes)."
            if results.get("parallel_processes")
            else "."
        ),
        (
            f"RL: TRL {cfg['algorithm'].upper()}, {cfg['steps']} steps × {cfg['prompts_per_step']} prompts × "
            f"{cfg['num_generations']} samples (temperature {cfg['temperature']}), max {cfg['max_completion_length']} new "
            f"tokens, ±1 rewards, beta {cfg['beta']}, AdamW, max grad norm 1e-3; SVF lr 2e-3, LoRA lr {cfg['lora_lr']}. "
            f"Accuracy: greedy generation on the first {cfg['n_test']} test examples."
        ),
        "",
        "| task | base | SVF-RL | LoRA-RL (r=16) | SVF-SFT | SVF params | LoRA params | ratio | s/step SVF-RL | s/step LoRA-RL |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["tasks"].items():
        svf, lora, sft = r.get("svf_rl", {}), r.get("lora_rl", {}), r.get("svf_sft", {})

        def a(x):
            return f"{x['test_accuracy']:.3f}" if x else "—"

        ratio = lora.get("trainable_parameters", 0) / max(svf.get("trainable_parameters", 1), 1) if lora and svf else 0
        lines.append(
            f"| {name} | {r['base']['accuracy']:.3f} | {a(svf)} | {a(lora)} | {a(sft)} | "
            f"{svf.get('trainable_parameters', '—')} | {lora.get('trainable_parameters', '—')} | "
            f"1/{ratio:.0f} | {svf.get('s_per_step') or 0:.2f} | {lora.get('s_per_step') or 0:.2f} |"
        )
    lines += ["", "Goal (issue 4): SVF-RL > base, and ≥ LoRA on ≥ 2 of 3 tasks with ≤ 1/50 of its parameters.", ""]
    lines += [f"- {k}: {v}" for k, v in results.get("verdict", {}).items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=lambda s: [x for x in s.split(",") if x], default=[])
    ap.add_argument("--probe", type=lambda s: [x for x in s.split(",") if x], default=None)
    ap.add_argument("--probe-out", default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--algorithm", choices=("grpo", "rloo"), default="grpo")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--prompts-per-step", type=int, default=2)
    ap.add_argument("--num-generations", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-completion-length", type=int, default=8)
    ap.add_argument("--lora-lr", type=float, default=5e-4)
    ap.add_argument("--sft", action="store_true", help="also train SVF with SFT")
    ap.add_argument("--sft-batch-size", type=int, default=8)
    ap.add_argument("--train-examples", type=int, default=None)
    ap.add_argument("--n-test", type=int, default=60)
    ap.add_argument("--eval-batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "svf_rl"))
    ap.add_argument("--experts", default=str(ROOT / "benchmarks" / "experts"))
    ap.add_argument("--work", default="/tmp/bench_svf_rl")
    ap.add_argument("--base-from", default=None, help="probe JSON whose base accuracies are reused (same n-test)")
    ap.add_argument(
        "--merge",
        type=lambda s: [x for x in s.split(",") if x],
        default=None,
        help="combine per-task result JSON files into --out",
    )
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.merge:
        return merge(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.smoke:
        args.tasks, args.steps, args.n_test, args.num_generations = ["toy_a", "toy_b", "toy_c"], 2, 8, 2
        args.out, args.experts = "/tmp/bench_svf_rl_smoke/svf_rl", "/tmp/bench_svf_rl_smoke/experts"
    t0 = time.perf_counter()
    base, tok, tasks = load(args)
    print(f"loaded model and {len(tasks)} tasks in {time.perf_counter() - t0:.1f} s", flush=True)
    if args.probe:
        probe(base, tok, tasks, args)
        return 0

    from peft import LoraConfig

    svf_cfg = SVFConfig(target_modules=MLP)
    work = Path(args.work)
    results: dict[str, Any] = {
        "machine": f"{platform.node()} ({torch.get_num_threads()} torch threads, torch {torch.__version__})",
        "model": "tiny random llama (smoke)" if args.smoke else "SmolLM2-135M-Instruct (embedded GGUF, fp32)",
        "config": {k: v for k, v in vars(args).items() if k not in ("probe", "probe_out")},
        "tasks": {},
    }
    for name, task in tasks.items():
        row: dict[str, Any] = {
            "n_train": len(task.train),
            "n_test": min(args.n_test, len(task.test)),
            "description": task.description,
        }
        results["tasks"][name] = row  # written after every method, so an interrupted run keeps what it measured

        def save() -> None:
            results["total_wall_s"] = time.perf_counter() - t0
            _write(results, args)

        probed = json.loads(Path(args.base_from).read_text()).get(name) if args.base_from else None
        if probed and probed.get("n") == row["n_test"]:
            row["base"] = {k: probed[k] for k in ("accuracy", "n", "eval_s")} | {"from_probe": True}
        else:
            row["base"] = accuracy(base, tok, task.test[: args.n_test], args)
        print(f"[{name}] base {row['base']['accuracy']:.3f}", flush=True)
        save()
        row["svf_rl"], svf_model = run_method(
            base, tok, task, "rl", copy.deepcopy(svf_cfg), args, work / name / "svf_rl"
        )
        print(
            f"[{name}] SVF-RL {row['svf_rl']['test_accuracy']:.3f} ({row['svf_rl']['s_per_step']:.2f} s/step)",
            flush=True,
        )
        write_expert(svf_model, task, row["svf_rl"], args, Path(args.experts))
        del svf_model
        save()
        lora_cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=MLP, task_type="CAUSAL_LM")
        row["lora_rl"], _ = run_method(
            base, tok, task, "rl", lora_cfg, args, work / name / "lora_rl", learning_rate=args.lora_lr
        )
        print(
            f"[{name}] LoRA-RL {row['lora_rl']['test_accuracy']:.3f} ({row['lora_rl']['s_per_step']:.2f} s/step)",
            flush=True,
        )
        save()
        if args.sft:
            row["svf_sft"], _ = run_method(
                base, tok, task, "sft", copy.deepcopy(svf_cfg), args, work / name / "svf_sft"
            )
            print(f"[{name}] SVF-SFT {row['svf_sft']['test_accuracy']:.3f}", flush=True)
        save()
    verdict(results)
    results["total_wall_s"] = time.perf_counter() - t0
    _write(results, args)
    print(markdown(results))
    return 0


def verdict(results: dict) -> None:
    rows = [r for r in results["tasks"].values() if "svf_rl" in r and "lora_rl" in r]
    if not rows:
        return
    improved = sum(r["svf_rl"]["test_accuracy"] > r["base"]["accuracy"] for r in rows)
    ties_or_wins = sum(r["svf_rl"]["test_accuracy"] >= r["lora_rl"]["test_accuracy"] for r in rows)
    ratios = [r["lora_rl"]["trainable_parameters"] / r["svf_rl"]["trainable_parameters"] for r in rows]
    results["verdict"] = {
        "SVF-RL above base": f"{improved} of {len(rows)} tasks",
        "SVF-RL >= LoRA-RL": f"{ties_or_wins} of {len(rows)} tasks",
        "LoRA/SVF parameter ratio": f"{min(ratios):.1f}",
        "goal met": bool(improved == len(rows) and ties_or_wins >= 2 and min(ratios) >= 50),
    }
    if any("svf_sft" in r for r in rows):
        sft_up = sum(r["svf_sft"]["test_accuracy"] > r["base"]["accuracy"] for r in rows if "svf_sft" in r)
        results["verdict"]["SVF-SFT above base"] = f"{sft_up} of {sum('svf_sft' in r for r in rows)} tasks"


def merge(args) -> int:
    parts = [json.loads(Path(p).read_text()) for p in args.merge]
    results = dict(parts[0])
    results["tasks"] = {}
    for part in parts:
        results["tasks"].update(part["tasks"])
    results["total_wall_s"] = max(p.get("total_wall_s", 0.0) for p in parts)
    results["parallel_processes"] = len(parts)
    verdict(results)
    _write(results, args)
    print(markdown(results))
    return 0


def _write(results: dict, args) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(markdown(results))


if __name__ == "__main__":
    sys.exit(main())
