"""Benchmark: SVF-RL, SVF-SFT, SVF-SFT→RL and LoRA r=16 (RL, SFT) at the same wall-clock training budget.

Issue 12 asks two questions of one budget: is an SFT warm start followed by RL better per CPU minute than RL or SFT
alone, and does SVF match LoRA at equal cost? Every run here gets the same training time (`--budget` seconds,
validation excluded: `train_svf(max_train_seconds=...)`) and the same recipe:

* RL: TRL GRPO with ±1 rewards, KL weight `--beta` (0.1), AdamW lr 2e-3 constant, max grad norm 1e-3 (the paper's
  preset, `paper_rl_preset`), `--prompts-per-step` × `--num-generations` completions of ≤ `--max-completion-length`
  tokens per step;
* SFT: `sft_preset` (lr 2e-3, completion-only loss), `--sft-batch-size` examples per step;
* SFT→RL: SFT for half the budget, then RL from the SFT adapter for the other half;
* SVF on the MLP projections (gate/up/down) against LoRA r=16 (alpha 32) on the same modules, same learning rate
  unless `--lora-lr` is given;
* checkpoint selection on the first `--n-val` validation examples every `--eval-every` steps (and at the step the
  budget ends), the best adapter restored;
* test accuracy on the first `--n-test` test examples by greedy generation (the evaluation of `train-svf
  --eval-examples`), with 95% Wilson intervals; Δ vs the base model (evaluated once on the same examples) and SVF vs
  LoRA for the same method as paired differences with 95% CIs and exact McNemar p (`peft_spectral.stats`).

Each run (and the base evaluation) runs in a fresh process, one after the other, so that its peak memory (VmHWM) is
its own; the processes fork from one server that imported torch/transformers/TRL once. Every finished run is written
to a state file and skipped when the same command (same settings) runs again, so an interrupted benchmark continues;
runs of other tasks and subsets accumulate in the same state and report.

    python benchmarks/bench_budget.py --tasks navigate --budget 240                       # all five runs
    python benchmarks/bench_budget.py --tasks navigate --runs svf_rl svf_sft svf_sft_rl   # a subset
    python benchmarks/bench_budget.py --report-only                                       # tables from the state
    python benchmarks/bench_budget.py --smoke                                             # tiny random model, seconds

Writes `docs/results/budget.json`, `budget.md`, `budget.png` (`--out`) and the state `docs/results/budget_state.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))  # tiny_model.py for --smoke

from peft_spectral.state import fingerprint, load_state, write_json_atomic  # noqa: E402
from peft_spectral.stats import accuracy_ci, format_accuracy  # noqa: E402


logger = logging.getLogger("bench_budget")

MLP = ["gate_proj", "up_proj", "down_proj"]
#: run name -> (adapter, phases as (method, fraction of the budget))
RUNS: dict[str, tuple[str, tuple[tuple[str, float], ...]]] = {
    "svf_rl": ("svf", (("rl", 1.0),)),
    "svf_sft": ("svf", (("sft", 1.0),)),
    "svf_sft_rl": ("svf", (("sft", 0.5), ("rl", 0.5))),
    "lora_rl": ("lora", (("rl", 1.0),)),
    "lora_sft": ("lora", (("sft", 1.0),)),
}
LABELS = {
    "base": "base",
    "svf_rl": "SVF-RL",
    "svf_sft": "SVF-SFT",
    "svf_sft_rl": "SVF-SFT→RL",
    "lora_rl": "LoRA-RL (r=16)",
    "lora_sft": "LoRA-SFT (r=16)",
}
#: SVF vs LoRA pairs compared per task: (method, SVF run, LoRA run)
PAIRS = (("rl", "svf_rl", "lora_rl"), ("sft", "svf_sft", "lora_sft"))
#: SVF recipes compared per task at the same budget: (reference run, other run); Δ = other − reference
RECIPE_PAIRS = (("svf_sft", "svf_rl"), ("svf_rl", "svf_sft_rl"), ("svf_sft", "svf_sft_rl"))
#: The hand-written reading of the committed results (the numbers above it are generated)
READING = ROOT / "benchmarks" / "budget_reading.md"
PRELOAD = ["torch", "transformers", "trl", "peft", "peft_spectral.training", "peft_spectral.evaluation"]


# ------------------------------------------------------------------------------------------------------ the worker


def _toy_task(name: str):
    """A multiple-choice toy task for --smoke (a random model answers it at chance at best)."""
    from peft_spectral.tasks import Example, Task
    from peft_spectral.training import with_lettered_options

    examples = [
        with_lettered_options(
            Example(
                prompt=f"{name} {i}: is {i} even?", target=("yes", "no")[i % 2], choices=("yes", "no"), label=i % 2
            )
        )
        for i in range(40)
    ]
    return Task(name=name, kind="multiple_choice", train=examples[16:], validation=examples[8:16], test=examples[:8])


def _load(spec: dict):
    if spec["smoke"]:
        from tiny_model import tiny_model, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        return tiny_model(tokenizer), tokenizer, _toy_task(spec["task"])
    from peft_spectral.assets import load_model
    from peft_spectral.tasks import load_task

    model, tokenizer = load_model(spec["model"])
    return model, tokenizer, load_task(spec["task"], seed=spec["seed"])


def _memory_mb(field: str) -> float:
    """`VmHWM` (peak resident memory) or `VmRSS` of this process, in MiB."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_memory() -> bool:
    """Set this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0), so that the peak measured later is
    that of training and evaluation, not of loading the model; `False` where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _adapter_config(adapter: str):
    from peft import LoraConfig

    from peft_spectral import SVFConfig

    if adapter == "svf":
        return SVFConfig(target_modules=MLP)
    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=MLP, task_type="CAUSAL_LM")


def _train(model, tokenizer, task, spec: dict, work: Path) -> tuple[Any, dict]:
    from peft_spectral.training import train_svf

    adapter, phases = RUNS[spec["run"]]
    lr = spec["lora_lr"] if adapter == "lora" and spec["lora_lr"] is not None else spec["lr"]
    out: dict[str, Any] = {"phases": []}
    for index, (method, fraction) in enumerate(phases):
        preset: dict[str, Any] = {
            "learning_rate": lr,
            "seed": spec["seed"],
            "disable_tqdm": True,
            "logging_steps": spec["eval_every"],  # one line of metrics per validation, not per step
        }
        if method == "rl":
            preset.update(
                algorithm="grpo",
                beta=spec["beta"],
                prompts_per_step=spec["prompts_per_step"],
                num_generations=spec["num_generations"],
                max_completion_length=spec["max_completion_length"],
            )
        else:
            preset.update(per_device_train_batch_size=spec["sft_batch_size"])
        result = train_svf(
            model,
            tokenizer,
            task,
            method=method,
            output_dir=str(work / f"phase{index}_{method}"),
            max_steps=spec["max_steps"],
            svf_config=_adapter_config(adapter) if index == 0 else None,  # phase 2 trains the same adapter on
            printer=print if spec["verbose"] else _quiet_printer,
            eval_examples=spec["n_val"],
            eval_every=spec["eval_every"],
            eval_max_new_tokens=spec["max_new_tokens"],
            max_train_seconds=spec["budget"] * fraction,
            **preset,
        )
        model = result.model
        budget = result.time_budget
        out["phases"].append(
            {
                "method": method,
                "budget_s": spec["budget"] * fraction,
                "steps": budget["steps"],
                "train_s": budget["train_seconds"],
                "validation_s": budget["validation_seconds"],
                "stopped_by_budget": budget["stopped_at"] is not None,
                "best_step": result.validation["best_step"],
                "best_val_accuracy": result.validation["best_score"],
                "curve": [{k: row[k] for k in ("step", "score") if k in row} for row in result.validation["curve"]],
                "reward_last": result.final("reward"),
                "loss_last": result.final("loss"),
            }
        )
        out["trainable_parameters"] = result.trainable_parameters
    phases_out = out["phases"]
    out["steps"] = sum(p["steps"] for p in phases_out)
    out["train_s"] = sum(p["train_s"] for p in phases_out)
    out["validation_s"] = sum(p["validation_s"] for p in phases_out)
    out["s_per_step"] = out["train_s"] / out["steps"] if out["steps"] else None
    return model, out


def _quiet_printer(line: str) -> None:
    """Validation and budget lines only (every step's metrics line is left out)."""
    if not line.startswith("step "):
        print(f"    {line}", flush=True)


def _worker(spec: dict, result_path: str) -> None:
    """One run in a fresh process: load, train (unless `run == "base"`), evaluate, write the result JSON."""
    try:
        import torch

        from peft_spectral.expert_eval import evaluate_generated

        torch.set_num_threads(spec["threads"])
        torch.manual_seed(spec["seed"])
        start = time.perf_counter()
        load_before = os.getloadavg()[0]
        model, tokenizer, task = _load(spec)
        load_peak_mb = _memory_mb("VmHWM")
        peak_reset = _reset_peak_memory()
        loaded_mb = _memory_mb("VmRSS")
        test = task.test[: spec["n_test"]]
        if not test:
            raise ValueError(f"task {spec['task']!r} has no test examples")
        row: dict[str, Any] = {
            "load_s": time.perf_counter() - start,
            "rss_loaded_mb": loaded_mb,
            "load_peak_mb": load_peak_mb,
            "peak_reset_after_load": peak_reset,
        }
        if spec["run"] != "base":
            if len(task.validation) < 1:
                raise ValueError(f"task {spec['task']!r} has no validation examples for checkpoint selection")
            model, trained = _train(model, tokenizer, task, spec, Path(spec["work"]))
            row.update(trained)
        model.eval()
        t0 = time.perf_counter()
        result = evaluate_generated(
            model,
            tokenizer,
            test,
            kind=task.kind,
            max_new_tokens=spec["max_new_tokens"],
            batch_size=spec["eval_batch_size"],
        )
        row.update(
            test_accuracy=result.accuracy,
            test_n=result.n,
            correct=[bool(c) for c in result.correct],
            eval_s=time.perf_counter() - t0,
            kind=task.kind,
            peak_rss_mb=_memory_mb("VmHWM"),
        )
        row["peak_over_loaded_mb"] = row["peak_rss_mb"] - loaded_mb
        if torch.cuda.is_available():
            row["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        row["wall_s"] = time.perf_counter() - start
        # other work on the machine takes steps from a wall-clock budget: keep the 1-minute load average with the run
        row["load_average"] = [load_before, os.getloadavg()[0]]
        write_json_atomic(result_path, row)
    except BaseException:
        write_json_atomic(result_path, {"error": traceback.format_exc()})
        raise


# ------------------------------------------------------------------------------------------------------ the driver


def _spec(args, task: str, run: str) -> dict:
    spec = {
        "task": task,
        "run": run,
        "smoke": args.smoke,
        "model": args.model,
        "seed": args.seed,
        "n_test": args.n_test,
        "max_new_tokens": max(args.max_completion_length, 8),
        "eval_batch_size": args.eval_batch_size,
        "threads": args.threads,
        "verbose": args.verbose,
    }
    if run != "base":
        adapter = RUNS[run][0]
        spec.update(
            budget=args.budget,
            max_steps=args.max_steps,
            n_val=args.n_val,
            eval_every=args.eval_every,
            lr=args.lr,
            lora_lr=args.lora_lr if adapter == "lora" else None,
            beta=args.beta,
            prompts_per_step=args.prompts_per_step,
            num_generations=args.num_generations,
            max_completion_length=args.max_completion_length,
            sft_batch_size=args.sft_batch_size,
        )
    # what defines the result (verbosity does not)
    spec["fingerprint"] = fingerprint({k: v for k, v in spec.items() if k != "verbose"})
    spec["work"] = str(Path(args.work) / task.replace("/", "_") / run)
    return spec


def _run_in_subprocess(ctx, spec: dict) -> dict:
    result_path = Path(spec["work"]) / "result.json"
    result_path.unlink(missing_ok=True)
    process = ctx.Process(target=_worker, args=(spec, str(result_path)))
    process.start()
    process.join()
    row = json.loads(result_path.read_text()) if result_path.exists() else {}
    if process.exitcode != 0 or "error" in row:
        detail = row.get("error", "").strip().splitlines()[-1:] or [f"exit code {process.exitcode}"]
        raise RuntimeError(f"{spec['task']}/{spec['run']} failed: {detail[0]}")
    return row


def _estimate(spec: dict, overheads: list[float], base_walls: list[float]) -> float:
    """Expected wall seconds of a run: its budget plus the mean overhead (load, validation, test) seen so far."""
    if spec["run"] == "base":
        return sum(base_walls) / len(base_walls) if base_walls else 30.0
    guess = sum(overheads) / len(overheads) if overheads else 0.3 * spec["budget"] + 20.0
    return spec["budget"] + guess


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def run_benchmark(args) -> dict:
    state_path = Path(args.state)
    state = load_state(state_path, what="budget benchmark state") or {"runs": {}}
    todo, kept = [], 0
    for task in args.tasks:
        for run in ["base", *args.runs]:
            spec = _spec(args, task, run)
            done = state["runs"].get(f"{task}/{run}")
            if done is not None and done.get("fingerprint") == spec["fingerprint"]:
                kept += 1
                continue
            if done is not None:
                print(f"{task}/{run}: settings changed since the stored result, running it again", flush=True)
            todo.append(spec)
    print(f"{len(todo)} run(s) to do, {kept} already in {state_path}", flush=True)
    if todo:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        start = time.perf_counter()
        overheads: list[float] = []
        base_walls: list[float] = []
        for index, spec in enumerate(todo):
            remaining = sum(_estimate(s, overheads, base_walls) for s in todo[index:])
            budget = f", {spec['budget']:g} s budget" if spec["run"] != "base" else ""
            print(
                f"[{index + 1}/{len(todo)}] {spec['task']} {LABELS[spec['run']]}{budget} | elapsed "
                f"{_clock(time.perf_counter() - start)}, ETA {_clock(remaining)}",
                flush=True,
            )
            Path(spec["work"]).mkdir(parents=True, exist_ok=True)
            row = _run_in_subprocess(ctx, spec)
            if spec["run"] == "base":
                base_walls.append(row["wall_s"])
            else:
                overheads.append(row["wall_s"] - spec["budget"])
            settings = {k: v for k, v in spec.items() if k not in ("fingerprint", "work", "verbose")}
            state["runs"][f"{spec['task']}/{spec['run']}"] = {
                "fingerprint": spec["fingerprint"],
                "settings": settings,
                **row,
            }
            state["machine"] = _machine(args)
            write_json_atomic(state_path, state)
            steps = f", {row['steps']} steps in {row['train_s']:.0f} s" if "steps" in row else ""
            print(
                f"    -> test accuracy {row['test_accuracy']:.3f} (n={row['test_n']}){steps}, "
                f"peak {row['peak_rss_mb']:.0f} MiB, {row['wall_s']:.0f} s wall",
                flush=True,
            )
    return state


def _machine(args) -> str:
    import torch

    return f"{platform.node()} ({os.cpu_count()} CPUs, {args.threads} torch threads, torch {torch.__version__})"


# ------------------------------------------------------------------------------------------------------ the report


def _test_labels(base: Optional[dict]) -> Optional[list]:
    """Gold labels of the base run's test examples (multiple choice only), loaded as the worker loaded them."""
    if base is None or base.get("kind") != "multiple_choice":
        return None
    spec = base["settings"]
    if spec["smoke"]:
        task = _toy_task(spec["task"])
    else:
        from peft_spectral.tasks import load_task

        task = load_task(spec["task"], seed=spec["seed"])
    labels = [e.label for e in task.test[: spec["n_test"]]]
    return labels if len(labels) == len(base["correct"]) else None


def _balanced(reference: list, other: list, labels: list) -> dict:
    from dataclasses import asdict

    from peft_spectral.stats import compare_balanced

    result = compare_balanced(reference, other, labels)
    return {**asdict(result), "significant": result.significant, "above_chance": result.b_above_chance}


def summarize(state: dict) -> dict:
    """Per task: every run's numbers with its accuracy CI, Δ vs base (and balanced accuracy for multiple choice), SVF
    vs LoRA for the same method, and the SVF recipes against each other."""
    tasks: dict[str, dict] = {}
    for key, row in state["runs"].items():
        task, run = key.rsplit("/", 1)
        tasks.setdefault(task, {"runs": {}})["runs"][run] = row
    out: dict[str, Any] = {"machine": state.get("machine"), "tasks": {}}
    for task, entry in sorted(tasks.items()):
        runs = entry["runs"]
        base = runs.get("base")
        labels = _test_labels(base)
        rows: dict[str, dict] = {}
        for run in ["base", *RUNS]:
            row = runs.get(run)
            if row is None:
                continue
            ci = accuracy_ci(row["correct"])
            summary = {k: v for k, v in row.items() if k not in ("correct", "fingerprint")}
            summary["accuracy_ci"] = {"accuracy": ci.accuracy, "low": ci.low, "high": ci.high, "n": ci.n}
            summary["accuracy_text"] = format_accuracy(ci)
            if run != "base" and base is not None and len(base["correct"]) == len(row["correct"]):
                summary["vs_base"] = _comparison(base["correct"], row["correct"])
                if labels is not None:
                    summary["balanced_vs_base"] = _balanced(base["correct"], row["correct"], labels)
            rows[run] = summary
        pairs = []
        for method, svf, lora in PAIRS:
            if svf in runs and lora in runs and len(runs[svf]["correct"]) == len(runs[lora]["correct"]):
                pairs.append(
                    {
                        "method": method,
                        "svf": svf,
                        "lora": lora,
                        "svf_minus_lora": _comparison(runs[lora]["correct"], runs[svf]["correct"]),
                        "parameter_ratio": runs[lora]["trainable_parameters"] / runs[svf]["trainable_parameters"],
                    }
                )
        recipes = [
            {
                "reference": ref,
                "other": other,
                "other_minus_reference": _comparison(runs[ref]["correct"], runs[other]["correct"]),
            }
            for ref, other in RECIPE_PAIRS
            if ref in runs and other in runs and len(runs[ref]["correct"]) == len(runs[other]["correct"])
        ]
        out["tasks"][task] = {"runs": rows, "svf_vs_lora": pairs, "svf_recipes": recipes}
    return out


def _comparison(reference: list, other: list) -> dict:
    """`other` minus `reference` on the same examples (`expert_eval.paired_report`: paired bootstrap CI, exact
    McNemar p, `significant`) with its text."""
    from peft_spectral.expert_eval import paired_report

    report = paired_report(reference, other)
    return {**report["delta"], "text": report["text"]["delta"]}


def _load_text(row: dict) -> str:
    load = row.get("load_average")
    return f"{load[0]:.1f}→{load[1]:.1f}" if load else "—"


def _num(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def markdown(summary: dict, smoke: bool, reading: Optional[str] = None) -> str:
    lines = [
        "# The same wall clock: SVF-RL, SVF-SFT, SVF-SFT→RL and LoRA r=16",
        "",
        (
            f"Generated by `benchmarks/bench_budget.py`{' --smoke (tiny random model)' if smoke else ''} on "
            f"{summary.get('machine')}. Every run has the same training time (validation excluded, the last step may "
            "overrun it), the paper's RL preset (GRPO, ±1 rewards, AdamW, max grad norm 1e-3) or the SFT preset, SVF and "
            "LoRA r=16 on the MLP projections (gate/up/down); the best checkpoint on the validation split is restored. "
            "Test accuracy: greedy generation with 95% Wilson intervals; Δ: paired difference with a 95% bootstrap "
            "interval and exact McNemar p (`*`: the interval excludes 0). Peak memory: peak RSS (VmHWM) of the run's own "
            "process during training and test evaluation (reset after loading the model), and above the RSS after "
            "loading. Load avg: the machine's 1-minute load average at the start and end of the run (other work on "
            "the machine takes steps from a wall-clock budget)."
        ),
        "",
    ]
    for task, entry in summary["tasks"].items():
        rows = entry["runs"]
        base = rows.get("base")
        lines += [f"## {task}", ""]
        if base is not None:
            lines += [f"Base model: {base['accuracy_text']}.", ""]
        first = next((r for name, r in rows.items() if name != "base"), None)
        if first is not None:
            s = first["settings"]
            lines += [
                (
                    f"Settings: RL {s['prompts_per_step']} prompts × {s['num_generations']} samples, ≤ "
                    f"{s['max_completion_length']} new tokens, beta {s['beta']}; SFT batch {s['sft_batch_size']}; lr "
                    f"{s['lr']:g}; validation: first {s['n_val']} examples every {s['eval_every']} steps."
                ),
                "",
            ]
        lines += [
            (
                "| run | budget s | steps | train s | s/step | validation s | trainable params | peak MiB (over loaded) "
                "| load avg | test accuracy [95% CI] | Δ vs base [95% CI] |"
            ),
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for run, r in rows.items():
            if run == "base":
                continue
            phases = r.get("phases", [])
            steps = " + ".join(f"{p['steps']} {p['method'].upper()}" for p in phases) if len(phases) > 1 else None
            lines.append(
                f"| {LABELS[run]} | {r['settings']['budget']:g} | {steps or r['steps']} | {r['train_s']:.1f} | "
                f"{_num(r['s_per_step'], '.2f')} | {r['validation_s']:.0f} | {r['trainable_parameters']:,} | "
                f"{r['peak_rss_mb']:.0f} ({r['peak_over_loaded_mb']:+.0f}) | {_load_text(r)} | {r['accuracy_text']} | "
                f"{r.get('vs_base', {}).get('text', '—')} |"
            )
        balanced = {run: r["balanced_vs_base"] for run, r in rows.items() if r.get("balanced_vs_base")}
        if balanced:
            any_row = next(iter(balanced.values()))
            lines += [
                "",
                (
                    f"Balanced accuracy (mean over gold labels; chance {any_row['chance']:.2f}, majority label "
                    f"{any_row['majority_share']:.0%} of the test examples; a run that always gives one answer scores "
                    "chance): base "
                    f"{any_row['a']:.3f}; "
                    + "; ".join(
                        f"{LABELS[run]} {b['b']:.3f} [{b['b_low']:.2f}, {b['b_high']:.2f}]"
                        + ("" if b["above_chance"] else " (not above chance)")
                        for run, b in balanced.items()
                    )
                    + "."
                ),
            ]
        if entry["svf_vs_lora"]:
            lines += [
                "",
                "SVF vs LoRA, same method and budget:",
                "",
                "| method | SVF | LoRA | Δ SVF − LoRA [95% CI] | LoRA / SVF parameters |",
                "|---|---|---|---|---|",
            ]
            for pair in entry["svf_vs_lora"]:
                lines.append(
                    f"| {pair['method'].upper()} | {rows[pair['svf']]['accuracy_text']} | "
                    f"{rows[pair['lora']]['accuracy_text']} | {pair['svf_minus_lora']['text']} | "
                    f"{pair['parameter_ratio']:.0f} |"
                )
        if entry.get("svf_recipes"):
            lines += [
                "",
                "SVF recipes against each other, same budget:",
                "",
                "| comparison | Δ [95% CI] |",
                "|---|---|",
            ]
            for pair in entry["svf_recipes"]:
                lines.append(
                    f"| {LABELS[pair['other']]} − {LABELS[pair['reference']]} | {pair['other_minus_reference']['text']} |"
                )
        curves = [
            f"{LABELS[run]} {p['method'].upper()}: best step {p['best_step']} of {p['steps']}"
            for run, r in rows.items()
            for p in r.get("phases", [])
        ]
        if curves:
            lines += ["", "Checkpoint selection: " + "; ".join(curves) + ".", ""]
    lines += ["## Reading", "", (reading or "_No reading given (`--reading`)._").strip(), ""]
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> Optional[Path]:
    """Test accuracy per task and run with 95% CI error bars; `None` (and a warning) without matplotlib."""
    from peft_spectral.plots import ci_bar_chart

    tasks = list(summary["tasks"])
    series = {}
    for name in ["base", *RUNS]:
        rows = [summary["tasks"][task]["runs"].get(name) for task in tasks]
        series[LABELS[name]] = [row and row["accuracy_ci"] for row in rows]
    return ci_bar_chart(
        path,
        tasks,
        series,
        ylabel="test accuracy (95% Wilson CI)",
        title="Same wall-clock training budget",
        ylim=(0, 1),
        figsize=(max(6.0, 2.8 * len(tasks)), 4.0),
        legend={"fontsize": 8, "ncol": 3, "loc": "upper center", "bbox_to_anchor": (0.5, -0.12)},
        dpi=120,
    )


def write_report(state: dict, args) -> dict:
    summary = summarize(state)
    summary["smoke"] = args.smoke
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out.with_suffix(".json"), summary)
    reading = Path(args.reading).read_text() if args.reading and Path(args.reading).exists() else None
    out.with_suffix(".md").write_text(markdown(summary, args.smoke, reading))
    plot(summary, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')}, .md and .png", flush=True)
    return summary


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["navigate"], help="task names (peft_spectral.tasks.load_task)")
    ap.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS), help="which runs (base always)")
    ap.add_argument("--budget", type=float, default=300.0, help="training seconds per run (validation excluded)")
    ap.add_argument("--max-steps", type=int, default=100_000, help="step cap (the budget normally ends training)")
    ap.add_argument("--n-test", type=int, default=200, help="first N test examples")
    ap.add_argument("--n-val", type=int, default=50, help="first N validation examples (checkpoint selection)")
    ap.add_argument("--eval-every", type=int, default=10, help="steps between validations")
    ap.add_argument("--lr", type=float, default=2e-3, help="learning rate (the paper's, for SVF and LoRA)")
    ap.add_argument("--lora-lr", type=float, default=None, help="LoRA learning rate; left out: --lr")
    ap.add_argument("--beta", type=float, default=0.1, help="KL weight (RL)")
    ap.add_argument("--prompts-per-step", type=int, default=4, help="RL: prompts per step")
    ap.add_argument("--num-generations", type=int, default=4, help="RL: samples per prompt")
    ap.add_argument("--max-completion-length", type=int, default=8, help="RL: new tokens per sample")
    ap.add_argument("--sft-batch-size", type=int, default=8, help="SFT: examples per step")
    ap.add_argument("--eval-batch-size", type=int, default=8)
    ap.add_argument("--model", default=None, help="Hub id or directory; left out: the embedded SmolLM2-135M")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per run; left out: all CPUs")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "budget"), help="report path without suffix")
    ap.add_argument("--state", default=None, help="state JSON; left out: <out>_state.json")
    ap.add_argument("--work", default="/tmp/bench_budget", help="scratch directory of the runs")
    ap.add_argument("--report-only", action="store_true", help="write the report from the state, run nothing")
    ap.add_argument(
        "--reading",
        default=str(READING),
        help="markdown file with the reading of the results, put under '## Reading' (none with --smoke)",
    )
    ap.add_argument("--smoke", action="store_true", help="tiny random model and toy tasks, seconds")
    ap.add_argument("--verbose", action="store_true", help="print every training step")
    args = ap.parse_args(argv)
    for name in ("budget", "n_test", "n_val", "eval_every", "max_steps"):
        if not getattr(args, name) > 0:
            ap.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.smoke:
        if args.tasks == ["navigate"]:
            args.tasks = ["toy_a"]
        if args.budget == 300.0:
            args.budget = 0.5
        args.n_test, args.n_val, args.eval_every = min(args.n_test, 8), min(args.n_val, 4), min(args.eval_every, 2)
        args.prompts_per_step, args.num_generations, args.sft_batch_size = 2, 2, 4
        args.max_completion_length = 4
        if args.out == ap.get_default("out"):
            args.out = "/tmp/bench_budget_smoke/budget"
        if args.work == ap.get_default("work"):
            args.work = "/tmp/bench_budget_smoke/work"
        if args.reading == ap.get_default("reading"):
            args.reading = None  # the committed reading is about the committed results
    if args.threads is None:
        args.threads = 1 if args.smoke else (os.cpu_count() or 1)
    if args.state is None:
        args.state = args.out + "_state.json"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.report_only:
        state = load_state(args.state, what="budget benchmark state")
        if state is None:
            raise SystemExit(f"--report-only: no state file {args.state}")
    else:
        state = run_benchmark(args)
    write_report(state, args)
    print(Path(args.out).with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
