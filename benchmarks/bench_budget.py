"""Time to an expert: SVF against LoRA r=16 at the same wall clock, on reasoning-gym tasks (issues #25 §2, #26 §3).

Two parts, each resumable (its finished jobs are kept in `budget_<part>_state.json` next to the report); the cost of
one GRPO step, SVF against LoRA, is `bench_grpo_step.py`.

* `race`: for each of `--tasks`, SVF and LoRA at every learning rate of their grids (`--svf-lrs`, `--lora-lrs`;
  one rate for both stages): SFT for `--sft-seconds`, then GRPO for `--rl-seconds` of training time (validation
  excluded), through `train_expert`, validation accuracy (lenient, greedy, the first `--n-val` examples every
  `--eval-every` steps) recorded with the training seconds of each point. Per method the rate with the best final
  validation score is chosen; for it: training minutes until validation first reaches base + `--target-gain`, test
  accuracy on the first `--n-test` examples against the base model, SVF against LoRA (paired, 95% CIs), and
  trainable parameters.
* `ablation`: on `--ablation-task` (default: the first task), SVF at `--ablation-lr`: RL only, SFT only and SFT → RL
  with the same total training time (the SFT → RL run is the race's run with the same settings: reused, not rerun).

Each part rewrites `budget.json`, `budget.md` (each goal met or not) and `budget.png` (validation accuracy against
training minutes, SVF and LoRA, per task) from the states of all parts in the output folder.

    python benchmarks/bench_budget.py --part race         # ~70 min: 3 tasks x 2 methods x 2 rates x ~5 min, + tests
    python benchmarks/bench_budget.py --part race --tasks 'rg:gcd?max_value=50'   # one task; tasks add up
    python benchmarks/bench_budget.py --part ablation     # ~15 min after the race (its SFT -> RL run is reused)
    python benchmarks/bench_budget.py --part report       # rewrite the report from the states
    python benchmarks/bench_budget.py --part race --smoke # tiny random model, under a minute (each part)

Training runs go to `--work` (default `runs/bench_budget`, git-ignored); an interrupted run continues from its last
checkpoint when the same command runs again.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from peft_spectral.benchmarking import BenchmarkRun, add_benchmark_arguments, markdown_table
from peft_spectral.state import fingerprint, load_state
from peft_spectral.stats import accuracy_ci, compare_paired, format_accuracy, format_comparison


#: Three of the library experts' tasks (docs/results/probe.md: learnable by short SFT), 400 test questions each.
DEFAULT_TASKS = [
    "rg:basic_arithmetic?allow_negation=false&allow_parentheses=false&max_digits=2&max_terms=2&operators=+,-",
    "rg:letter_counting?max_words=3&min_words=1",
    "rg:word_sequence_reversal?max_words=4&min_words=2",
]
SMOKE_TASKS = ["rg:spell_backward?min_word_len=3&max_word_len=4", "rg:gcd?max_value=50"]
PARTS = ("race", "ablation")
LABELS = {"lora": "LoRA r=16", "base": "base model", "svf": "SVF", "rl_only": "RL only", "sft_only": "SFT only"}
LABELS["sft_rl"] = "SFT → RL"
#: Options that define a part's runs (its state is bound to them); tasks and rate grids are in the job keys.
OPTIONS = ["sft_seconds", "rl_seconds", "rl_new_tokens", "n_val", "eval_every", "eval_max_new_tokens", "n_test"]
OPTIONS += ["target_gain", "prompts_per_step", "num_generations", "sft_batch_size", "max_examples"]
SMOKE = {
    "prompts_per_step": 2, "num_generations": 2, "sft_batch_size": 4, "rl_new_tokens": 4, "eval_max_new_tokens": 4,
    "sft_seconds": 0.5, "rl_seconds": 0.5, "n_val": 4, "eval_every": 1, "n_test": 8, "max_examples": 120,
    "svf_lrs": [2e-3, 5e-3], "lora_lrs": [1e-4, 1e-3],
}  # fmt: skip


def job_key(*parts) -> str:
    """A job key: its parts joined by `|` (task specs hold `:`)."""
    return "|".join(str(p) for p in parts)


# ------------------------------------------------------------------------------------------------------- race


def expert_config(args, spec: str, method: str, lr: float, sft_seconds: float, rl_seconds: float):
    """The `SVFTrainingConfig` of one run. Its folder under `--work` is named after a hash of the settings, so the
    same run (e.g. the race's SFT → RL in the ablation) is found again and resumed, not trained twice."""
    from peft_spectral.training import SVFTrainingConfig

    fields = {
        "task": spec, "peft_method": method, "seed": args.seed, "max_examples": args.max_examples,
        "sft_steps": 100_000 if sft_seconds else 0, "sft_learning_rate": lr, "sft_max_seconds": sft_seconds or None,
        "sft_batch_size": args.sft_batch_size, "rl_steps": 100_000 if rl_seconds else 0, "rl_learning_rate": lr,
        "rl_max_seconds": rl_seconds or None, "prompts_per_step": args.prompts_per_step,
        "num_generations": args.num_generations, "max_completion_length": args.rl_new_tokens,
        "val_examples": args.n_val, "eval_every": args.eval_every, "eval_max_new_tokens": args.eval_max_new_tokens,
        "test_examples": 0, "progress": False,
    }  # fmt: skip
    name = f"{spec.removeprefix('rg:').split('?')[0]}-{method}-lr{lr:g}-{fingerprint(fields, args.model_name)[:10]}"
    return SVFTrainingConfig(output_dir=str(Path(args.work) / name), **fields)


def train_run(config, model, tokenizer, task) -> dict[str, Any]:
    """Train (or finish) one run with `train_expert`: per stage the steps, training seconds and validation curve."""
    from peft_spectral.training import train_expert

    def printer(line: str) -> None:
        if line.startswith(("[expert]", "validation", "time budget")):
            print(f"  {line}", flush=True)

    load, start = os.getloadavg()[0], time.perf_counter()
    result = train_expert(config, model, tokenizer, task=task, printer=printer)
    stages = []
    for stage in result.stages:
        validation, budget = stage["validation"], stage["time_budget"]
        stages.append({
            "name": stage["name"], "steps_run": stage["steps_run"], "train_seconds": budget["train_seconds"],
            "validation_seconds": budget["validation_seconds"], "best_step": validation["best_step"],
            "best_score": validation["best_score"],
            "curve": [{k: p[k] for k in ("step", "accuracy", "train_seconds")} for p in validation["curve"]],
        })  # fmt: skip
    return {
        "path": str(result.path), "stages": stages, "wall_seconds": time.perf_counter() - start,
        "trainable_parameters": result.stages[-1]["recipe"]["trainable_parameters"],
        "load_average": [load, os.getloadavg()[0]],
    }  # fmt: skip


def curve(record: dict) -> list[tuple[float, float]]:
    """`(training seconds since the run's start, validation accuracy)` of every point, stage after stage."""
    points, offset = [], 0.0
    for stage in record["stages"]:
        points += [(offset + p["train_seconds"], p["accuracy"]) for p in stage["curve"]]
        offset += stage["train_seconds"]
    return points


def time_to_target(record: dict, target: float) -> Optional[float]:
    """Training seconds until validation accuracy first reaches `target`; `None`: not reached."""
    return next((t for t, acc in curve(record) if acc >= target - 1e-9), None)


def final_score(record: dict) -> float:
    """The validation score of the run's result (the last stage's selected checkpoint)."""
    return record["stages"][-1]["best_score"]


def score_test(model, tokenizer, task, n: int, path: Optional[str], max_new_tokens: int) -> dict[str, list[bool]]:
    """Lenient and strict verdicts on the first `n` test examples (of the base model when `path` is `None`)."""
    from peft import PeftModel

    from peft_spectral.evaluation import evaluate, rescore

    net = model if path is None else PeftModel.from_pretrained(copy.deepcopy(model), path)
    lenient = evaluate(net, tokenizer, task.test[:n], kind=task.kind, max_new_tokens=max_new_tokens)
    strict = rescore(lenient, task.test[:n], kind=task.kind, extraction="strict")
    return {"lenient": lenient.correct, "strict": strict.correct}


def choose(results: dict, spec: str, method: str) -> Optional[str]:
    """The learning rate (as in the job keys) with the best final validation score; a tie keeps the first run."""
    runs = [(k.split("|")[3], v) for k, v in results.items() if k.startswith(job_key("train", spec, method, ""))]
    return max(runs, key=lambda kv: final_score(kv[1]))[0] if runs else None


def minutes(seconds: Optional[float]) -> str:
    return "not reached" if seconds is None else f"{seconds / 60:.1f}"


def paired(a: dict, b: dict) -> tuple[dict, str]:
    """B − A on the same test examples (lenient): the numbers and the table text."""
    diff = compare_paired(a["lenient"], b["lenient"])
    data = {"delta": diff.delta, "low": diff.low, "high": diff.high, "p_value": diff.p_value, "n": diff.n}
    return {**data, "significant": diff.significant}, format_comparison(diff)


HEAD = ["run", "trainable params", "steps", "training (wall) min", "final val", "min to target", "test [95% CI]"]
HEAD += ["Δ vs base [95% CI]"]


def run_row(label: str, record: dict, test: Optional[dict], base: Optional[dict], target: float) -> list:
    train = sum(s["train_seconds"] for s in record["stages"]) / 60
    return [
        label, f"{record['trainable_parameters']:,}", " + ".join(str(s["steps_run"]) for s in record["stages"]),
        f"{train:.1f} ({record['wall_seconds'] / 60:.1f})", f"{final_score(record):.3f}",
        minutes(time_to_target(record, target)), format_accuracy(accuracy_ci(test["lenient"])) if test else "—",
        paired(base, test)[1] if test and base else "—",
    ]  # fmt: skip


def race_summary(results: dict, config: dict) -> tuple[dict, str]:
    """Per task: the chosen runs, their curves, time to target and test comparisons; the goals; the markdown."""
    specs = dict.fromkeys(k.split("|")[1] for k in results if k.startswith("train|"))
    tasks, sections, firsts, claims = {}, [], [], []
    for spec in specs:
        runs = {tuple(k.split("|")[2:]): v for k, v in results.items() if k.startswith(job_key("train", spec, ""))}
        base_val = curve(next(iter(runs.values())))[0][1]  # step 0 of every run: the base model
        target, base = base_val + config["target_gain"], results.get(job_key("base", spec))
        info: dict[str, Any] = {"base_validation": base_val, "target": target, "methods": {}}
        rows, grid, tests = [], [], {}
        for method in ("svf", "lora"):
            if (lr := choose(results, spec, method)) is None:
                continue
            record, test = runs[(method, lr)], results.get(job_key("test", spec, method, lr))
            tests[method] = test
            info["methods"][method] = {
                "lr": float(lr), "time_to_target": time_to_target(record, target), "curve": curve(record),
                "final_validation": final_score(record), "trainable_parameters": record["trainable_parameters"],
                "test_accuracy": accuracy_ci(test["lenient"]).accuracy if test else None,
                "vs_base": paired(base, test)[0] if test and base else None,
                "grid": {r: {"final_validation": final_score(v), "time_to_target": time_to_target(v, target)}
                         for (m, r), v in runs.items() if m == method},
            }  # fmt: skip
            rows.append(run_row(f"{LABELS[method]}, lr {lr}", record, test, base, target))
            for r, g in info["methods"][method]["grid"].items():
                grid.append(f"{LABELS[method]} {r}: {g['final_validation']:.3f}, {minutes(g['time_to_target'])}")
        text = f"### `{spec}`\n\nBase model: validation {base_val:.3f} (target {target:.3f})"
        text += f", test {format_accuracy(accuracy_ci(base['lenient']))}" if base else ""
        text += ".\n\n" + markdown_table(HEAD, rows)
        text += "\n\nEvery rate (final validation, minutes to target): " + "; ".join(grid) + "."
        svf, lora = info["methods"].get("svf"), info["methods"].get("lora")
        if svf and lora:
            t_svf, t_lora = svf["time_to_target"], lora["time_to_target"]
            svf_first = t_svf is not None and (t_lora is None or t_svf <= t_lora)
            first = "SVF" if svf_first else "LoRA" if t_lora is not None else "neither"
            firsts.append((spec, svf_first, f"{minutes(t_svf)} vs {minutes(t_lora)}"))
            text += f"\n\nMinutes to target, SVF vs LoRA: {firsts[-1][2]} ({first} first)."
        if tests.get("svf") and tests.get("lora"):
            info["svf_minus_lora"], diff = paired(tests["lora"], tests["svf"])
            delta, significant = info["svf_minus_lora"]["delta"], info["svf_minus_lora"]["significant"]
            claims.append(not (significant and delta < 0))
            verdict = "holds (no significant difference)"
            if significant:
                verdict = "holds (SVF better)" if delta > 0 else "does not hold (LoRA better)"
            ratio = lora["trainable_parameters"] / svf["trainable_parameters"]
            text += f" Test, SVF − LoRA: {diff}, with 1/{ratio:.0f} of LoRA's parameters: the paper's claim "
            text += f"{verdict}."
        tasks[spec] = info
        sections.append(text)
    goals = []
    if firsts:
        wins = sum(f[1] for f in firsts)
        per_task = "; ".join(f"{name.removeprefix('rg:').split('?')[0]} {t}" for name, _, t in firsts)
        value = f"SVF first on {wins} of {len(firsts)} task(s); minutes, SVF vs LoRA: {per_task}"
        goals.append(
            {"goal": "SVF time to target ≤ LoRA's on at least 2 of 3 tasks", "met": wins >= 2, "value": value}
        )
    if claims:
        value = f"holds on {sum(claims)} of {len(claims)} task(s)"
        text = "SVF matches or beats LoRA on test (not significantly worse; the paper's claim)"
        goals.append({"goal": text, "met": all(claims), "value": value})
    head = (
        f"Each run: SFT for {config['sft_seconds']:g} s, then GRPO for {config['rl_seconds']:g} s of training "
        f"(validation excluded); validation on the first {config['n_val']} examples every {config['eval_every']} "
        "steps (greedy, lenient); each stage keeps its best checkpoint; per method the rate with the best final "
        f"validation score is chosen. Target: base validation accuracy + {config['target_gain']:.2f}; minutes are "
        f"training minutes (wall minutes, validation included, in parentheses). Test: the first {config['n_test']} "
        "test examples; Δ: paired bootstrap 95% CI, exact McNemar p.\n\n"
    )
    return {"tasks": tasks, "goals": goals}, head + "\n\n".join(sections)


def ablation_summary(results: dict, config: dict) -> tuple[dict, str]:
    """RL only, SFT only and SFT → RL on one task: the rows and the paired test comparisons."""
    arms = [a for a in ("rl_only", "sft_only", "sft_rl") if job_key("train", a) in results]
    if not arms:
        return {}, ""
    records = {a: results[job_key("train", a)] for a in arms}
    tests, base = {a: results.get(job_key("test", a)) for a in arms}, results.get("base")
    base_val = curve(records[arms[0]])[0][1]
    rows = [run_row(LABELS[a], records[a], tests[a], base, base_val + config["target_gain"]) for a in arms]
    comparisons, lines = {}, []
    for ref, other in (("rl_only", "sft_rl"), ("sft_only", "sft_rl"), ("sft_only", "rl_only")):
        if tests.get(ref) and tests.get(other):
            comparisons[f"{other} - {ref}"], text = paired(tests[ref], tests[other])
            lines.append([f"{LABELS[other]} − {LABELS[ref]}", text])
    text = (
        f"`{config['task']}`, SVF at lr {config['lr']:g}, {config['sft_seconds'] + config['rl_seconds']:g} s of "
        f"training each (SFT → RL: {config['sft_seconds']:g} + {config['rl_seconds']:g} s). Base model: validation "
        f"{base_val:.3f}.\n\n" + markdown_table(HEAD, rows)
    )
    text += "\n\n" + markdown_table(["comparison (test)", "Δ [95% CI]"], lines) if lines else ""
    arms_data = {a: {"curve": curve(records[a]), "final_validation": final_score(records[a])} for a in arms}
    return {"arms": arms_data, "comparisons": comparisons}, text


# ------------------------------------------------------------------------------------------------------- report


def plot(path: Path, tasks: dict) -> None:
    """Validation accuracy against training minutes, the chosen SVF and LoRA runs, one panel per task."""
    from peft_spectral.plots import pyplot, save_figure

    plt = pyplot("the budget plot")
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, (spec, info) in zip(axes[0], tasks.items()):
        for method, style in (("svf", "-o"), ("lora", "--s")):
            if method in info["methods"]:
                xs, ys = zip(*info["methods"][method]["curve"])
                label = f"{LABELS[method]}, lr {info['methods'][method]['lr']:g}"
                ax.plot([x / 60 for x in xs], ys, style, ms=3, label=label)
        ax.axhline(info["target"], color="grey", lw=0.8, ls=":", label="target")
        ax.set(title=spec.removeprefix("rg:").split("?")[0], xlabel="training minutes", ylabel="validation accuracy")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def write_report(run: BenchmarkRun) -> None:
    """`budget.{json,md,png}` from the states of every part found in the run's output folder."""
    data, sections, goals = {}, [], []
    titles = {"race": "Race to an expert", "ablation": "RL only, SFT only, SFT → RL"}
    for part in PARTS:
        state = load_state(run.output_dir / f"budget_{part}_state.json", what=f"budget {part} state")
        results = (state or {}).get("results", {})
        summary_of = {"race": race_summary, "ablation": ablation_summary}[part]
        summary, text = summary_of(results, state["config"]) if results else ({}, "")
        if not summary:
            continue
        machine = results.get("machine", {})
        where = f"Last invocation: {machine.get('date', '?')[:16]} UTC, {machine.get('torch_threads')} torch threads, "
        where += f"load average {machine.get('load_average')} at its start, commit {machine.get('git_commit')}.\n\n"
        data[part] = {"config": state["config"], "machine": machine, **summary}
        goals += summary.get("goals", [])
        sections.append(f"## {titles[part]} (`--part {part}`)\n\n{where}{text}")
        if part == "race":
            plot(run.path(".png"), summary["tasks"])
            sections[-1] += f"\n\n![validation accuracy against training minutes]({run.name}.png)"
    rows = [[g["goal"], "met" if g["met"] else "**not met**", g["value"]] for g in goals]
    top = "## Goals\n\n" + (markdown_table(["goal", "met", "measured"], rows, "lll") if goals else "No part run yet.")
    run.write({"parts": data, "goals": goals}, "\n\n".join([top, *sections]), title="Time to an expert: SVF vs LoRA")


# ------------------------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_arguments(p, name="budget")
    p.add_argument("--part", required=True, choices=[*PARTS, "report"], help="what to run ('report': only write)")
    p.add_argument("--tasks", nargs="+", default=None, metavar="SPEC", help="task specs (default: DEFAULT_TASKS)")
    p.add_argument("--work", default=None, help="training runs (default: runs/bench_budget)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--max-examples", type=int, default=None, help="examples per task before the splits")
    p.add_argument("--prompts-per-step", type=int, default=4, help="GRPO prompts per step")
    p.add_argument("--num-generations", type=int, default=4, help="GRPO samples per prompt")
    p.add_argument("--sft-batch-size", type=int, default=8, help="SFT examples per step")
    p.add_argument("--rl-new-tokens", type=int, default=8, help="GRPO new tokens per sample")
    p.add_argument("--svf-lrs", type=float, nargs="+", default=[2e-3, 5e-3], help="race: SVF rate grid")
    p.add_argument("--lora-lrs", type=float, nargs="+", default=[3e-4, 1e-3], help="race: LoRA rate grid")
    p.add_argument("--sft-seconds", type=float, default=150, help="SFT training seconds per run")
    p.add_argument("--rl-seconds", type=float, default=60, help="GRPO training seconds per run")
    p.add_argument("--n-val", type=int, default=48, help="validation examples")
    p.add_argument("--eval-every", type=int, default=10, help="steps between validations")
    p.add_argument("--eval-max-new-tokens", type=int, default=16, help="validation and test generation budget")
    p.add_argument("--n-test", type=int, default=200, help="test examples (paired comparisons)")
    p.add_argument("--target-gain", type=float, default=0.10, help="target: base validation accuracy + this")
    p.add_argument("--ablation-task", default=None, help="ablation task (default: the first of --tasks)")
    p.add_argument("--ablation-lr", type=float, default=2e-3, help="ablation: SVF learning rate")
    args = p.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    args.tasks = args.tasks or (SMOKE_TASKS if args.smoke else DEFAULT_TASKS)
    args.output = args.output or (tempfile.mkdtemp(prefix="budget-smoke-") if args.smoke else "docs/results")
    args.work = args.work or (str(Path(args.output) / "runs") if args.smoke else "runs/bench_budget")
    args.state = args.state or str(Path(args.output) / f"budget_{args.part}_state.json")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    part = args.part
    config = {k: getattr(args, k) for k in OPTIONS} if part in PARTS else {}
    if part == "ablation":
        config.update(task=args.ablation_task or args.tasks[0], lr=args.ablation_lr)
    run = BenchmarkRun.from_args(args, config)
    if part == "report":
        write_report(run)
        return 0
    args.model_name = run.model_name
    model, tokenizer = run.load_model()
    run.record("machine", run.machine)  # where and when this invocation ran
    from peft_spectral.data import load_task

    tasks = {}

    def task_of(spec):
        if spec not in tasks:
            tasks[spec] = load_task(spec, seed=args.seed, max_examples=args.max_examples)
            if len(tasks[spec].test) < args.n_test:
                raise SystemExit(f"{spec}: {len(tasks[spec].test)} test examples, fewer than --n-test {args.n_test}")
        return tasks[spec]

    def test_job(job, spec, path=None):
        run.record(job, score_test(model, tokenizer, task_of(spec), args.n_test, path, args.eval_max_new_tokens))

    def train_job(job, spec, method, lr, sft_seconds, rl_seconds):
        config = expert_config(args, spec, method, float(lr), sft_seconds, rl_seconds)
        run.record(job, train_run(config, model, tokenizer, task_of(spec)))

    if part == "race":
        grids = {"svf": args.svf_lrs, "lora": args.lora_lrs}
        jobs = [job_key("base", s) for s in args.tasks]
        for spec in args.tasks:  # SVF and LoRA alternate, so that a partial run has both
            for i in range(max(map(len, grids.values()))):
                jobs += [job_key("train", spec, m, f"{g[i]:g}") for m, g in grids.items() if i < len(g)]
        for job in run.jobs(jobs, desc="race"):
            _, spec, *rest = job.split("|")
            if rest:
                train_job(job, spec, *rest, args.sft_seconds, args.rl_seconds)
            else:
                test_job(job, spec)
        chosen = [job_key("test", s, m, choose(run.results(), s, m)) for s in args.tasks for m in grids]
        for job in run.jobs(chosen, desc="race tests"):
            _, spec, method, lr = job.split("|")
            test_job(job, spec, run.result(job_key("train", spec, method, lr))["path"])
    else:
        spec, total = config["task"], args.sft_seconds + args.rl_seconds
        budgets = {"rl_only": (0, total), "sft_only": (total, 0), "sft_rl": (args.sft_seconds, args.rl_seconds)}
        for job in run.jobs(["base", *[job_key(k, a) for a in budgets for k in ("train", "test")]], desc="ablation"):
            kind, _, arm = job.partition("|")
            if kind == "base":
                test_job(job, spec)
            elif kind == "train":
                train_job(job, spec, "svf", args.ablation_lr, *budgets[arm])
            else:
                test_job(job, spec, run.result(job_key("train", arm))["path"])
    write_report(run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
