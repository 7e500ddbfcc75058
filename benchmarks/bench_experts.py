"""Benchmark: the committed SVF expert library against the base model, each on its own task's test split.

One command:

    python benchmarks/bench_experts.py                # evaluate benchmarks/experts/*/ -> docs/results/experts.*
    python benchmarks/bench_experts.py --train        # first (re)train the library from benchmarks/experts/recipes.json
    python benchmarks/bench_experts.py --smoke        # a tiny random model and a toy task, seconds

**Training** (`--train`) follows `benchmarks/experts/recipes.json`: for each task a list of stages, each one
`peft-spectral train-svf` run (e.g. SFT, then RL started from the SFT adapter with `--init-adapter`). Every stage runs
with `--resume` in `--work-dir/<task>/<stage>/`; a finished stage (its `training_log.json` written) is skipped, so
running the same command again after an interruption continues where it stopped. The last stage's adapter is copied
to `benchmarks/experts/<task>/` with a model card covering all stages.

**Evaluation** (always) scores every expert directory under `--experts-dir` (an adapter with an `expert.json` naming
its task) and the base model on the task's test split (`load_task(task, seed=0)`, at most `--max-test` examples),
with greedy generated answers (`peft_spectral.expert_eval`, the evaluation of `train-svf --eval-examples`).
Accuracies come with 95% Wilson intervals and the expert's difference to the base model with a paired bootstrap 95%
interval and the exact McNemar p (`peft_spectral.stats`). Goal per expert: Δ >= +8 points with the interval's lower
end above 0. Writes `docs/results/experts.json` (with per-example verdicts), `experts.md` and `experts.png`.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))  # tiny_model.py for the smoke run

from peft_spectral.model_card import read_expert_json  # noqa: E402
from peft_spectral.transformer2.library import expert_name, find_experts  # noqa: E402


logger = logging.getLogger("bench_experts")

RECIPES = ROOT / "benchmarks" / "experts" / "recipes.json"
EXPERTS = ROOT / "benchmarks" / "experts"
OUT = ROOT / "docs" / "results" / "experts"
#: The goal of the issue: at least +8 points over the base model with the paired interval's lower end above 0.
GOAL_DELTA = 0.08
#: Files of a finished stage copied into the library (not the checkpoints).
LIBRARY_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "validation.json",
    "training_log.json",
)
SMOKE_RECIPE = {
    "common": {"seed": 0},
    "tasks": {
        "smoke_mc": [
            {
                "name": "sft",
                "args": {"method": "sft", "steps": 2, "batch-size": 4, "val-examples": 4, "eval-every": 1},
            },
            {
                "name": "rl",
                "init_from": "sft",
                "args": {
                    "method": "rl",
                    "steps": 1,
                    "prompts-per-step": 2,
                    "num-generations": 2,
                    "max-completion-length": 4,
                },
            },
        ]
    },
}


# ------------------------------------------------------------------------------------------------------------ recipes


def load_recipes(path: Path) -> dict[str, Any]:
    """The recipe file, checked: `{"common": {...}, "tasks": {task: [stage, ...]}}`."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"--recipes {path}: cannot read it ({err})") from None
    tasks = data.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        raise SystemExit(f"--recipes {path}: needs a non-empty 'tasks' object (task -> list of stages)")
    for task, stages in tasks.items():
        names = []
        for stage in stages:
            if not isinstance(stage, dict) or "name" not in stage or not isinstance(stage.get("args"), dict):
                raise SystemExit(f"--recipes {path}: task {task!r}: every stage needs a 'name' and an 'args' object")
            if stage.get("init_from") and stage["init_from"] not in names:
                raise SystemExit(
                    f"--recipes {path}: task {task!r} stage {stage['name']!r}: init_from {stage['init_from']!r} is "
                    "not an earlier stage"
                )
            names.append(stage["name"])
    return data


def stage_argv(args: dict[str, Any]) -> list[str]:
    """`{"steps": 20, "no-progress": true, "target-modules": ["up_proj"]}` -> `["--steps", "20", ...]`."""
    argv: list[str] = []
    for key, value in args.items():
        if value is False or value is None:
            continue
        argv.append(f"--{key}")
        if value is True:
            continue
        argv += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    return argv


def stage_done(folder: Path) -> bool:
    return (folder / "training_log.json").is_file() and (folder / "adapter_model.safetensors").is_file()


def train_library(
    recipes: dict[str, Any],
    tasks: list[str],
    work: Path,
    library: Path,
    *,
    sources: dict[str, str],
    model: Optional[str],
    extra: list[str],
) -> dict[str, list[dict]]:
    """Run every stage of every task (skipping finished ones), then copy each task's last adapter into `library`."""
    from peft_spectral.cli import main as cli

    todo = [(task, i, stage) for task in tasks for i, stage in enumerate(recipes["tasks"][task])]
    done_stages: dict[str, list[dict]] = {task: [] for task in tasks}
    started, durations = time.perf_counter(), []
    for k, (task, index, stage) in enumerate(todo, 1):
        folder = work / task / stage["name"]
        argv = ["train-svf", "--task", sources.get(task, task), "--output", str(folder), "--resume"]
        argv += stage_argv({**recipes.get("common", {}), **stage["args"]})
        if stage.get("init_from"):
            argv += ["--init-adapter", str(work / task / stage["init_from"])]
        if model is not None:
            argv += ["--model", model]
        argv += extra
        folder.mkdir(parents=True, exist_ok=True)
        recorded = folder / "stage_args.json"
        if recorded.is_file() and json.loads(recorded.read_text()) != argv:
            raise SystemExit(
                f"{folder} was started with other arguments ({recorded}); delete the directory to retrain the stage"
            )
        recorded.write_text(json.dumps(argv, indent=1))
        label = f"[{k}/{len(todo)}] {task} / {stage['name']}"
        if stage_done(folder):
            print(f"{label}: done already ({folder}), skipped", flush=True)
        else:
            eta = ""
            if durations:
                remaining = sum(1 for t, i, s in todo[k - 1 :] if not stage_done(work / t / s["name"]))
                eta = f", ETA {remaining * sum(durations) / len(durations) / 60:.0f} min"
            print(f"{label}: training{eta} ({time.perf_counter() - started:.0f} s elapsed)", flush=True)
            t0 = time.perf_counter()
            code = cli(argv)
            if code != 0:
                raise SystemExit(f"{label}: train-svf exited with {code}")
            durations.append(time.perf_counter() - t0)
        log = json.loads((folder / "training_log.json").read_text())
        meta = read_expert_json(folder)
        done_stages[task].append(
            {
                "name": stage["name"],
                "method": log.get("method"),
                "steps_run": meta.get("steps"),
                "wall_seconds": log.get("wall_s"),
                "init_from": stage.get("init_from"),
                "args": stage["args"],
                "validation": _stage_validation(folder),
            }
        )
    for task in tasks:
        install_expert(
            task, work / task / recipes["tasks"][task][-1]["name"], library / expert_name(task), done_stages[task]
        )
    return done_stages


def _stage_validation(folder: Path) -> Optional[dict]:
    """A stage's validation summary and curve (`validation.json`), for the expert's card; `None` without one."""
    path = folder / "validation.json"
    return json.loads(path.read_text()) if path.is_file() else None


def install_expert(task: str, stage_dir: Path, target: Path, stages: list[dict]) -> None:
    """Copy a finished stage's adapter into the library (`target`, one level below it: `expert_name(task)`, where
    `find_experts` looks) and write its card over all stages."""
    target.mkdir(parents=True, exist_ok=True)
    for name in LIBRARY_FILES:
        if (stage_dir / name).is_file():
            shutil.copy2(stage_dir / name, target / name)
    meta = json.loads((stage_dir / "expert.json").read_text())
    recipe = meta.get("recipe") or {}
    if recipe.get("init_adapter") and stages[-1].get("init_from"):
        recipe["init_adapter"] = f"stage {stages[-1]['init_from']}"  # not the trainer's local path
    write_card(target, task, meta, wall_seconds=sum(s["wall_seconds"] or 0.0 for s in stages), stages=stages)


def write_card(
    folder: Path,
    task: str,
    meta: dict,
    *,
    wall_seconds: Optional[float],
    stages: Optional[list],
    test_eval: Optional[dict] = None,
) -> None:
    """(Re)write the model card and `expert.json` of an expert directory from an `expert.json` (`meta`) and the
    directory's `adapter_config.json` and `validation.json`."""
    from peft_spectral.model_card import write_expert_files

    validation_path = folder / "validation.json"
    write_expert_files(
        folder,
        task=task,
        description=meta.get("description"),
        kind=meta.get("kind"),
        base_model=json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path"),
        recipe=meta.get("recipe"),
        wall_seconds=wall_seconds,
        validation=json.loads(validation_path.read_text()) if validation_path.is_file() else None,
        test_eval=test_eval,
        stages=stages,
        folder_hint=folder.relative_to(ROOT).as_posix() if folder.resolve().is_relative_to(ROOT) else None,
    )


# --------------------------------------------------------------------------------------------------------- evaluation


def recipe_text(meta: dict) -> str:
    stages = meta.get("stages")
    if stages:
        return " → ".join(f"{s.get('method')}({s.get('steps_run')})" for s in stages)
    recipe = meta.get("recipe") or {}
    method = recipe.get("method") or meta.get("method") or "?"
    return f"{method}({recipe.get('steps_run', meta.get('steps', '?'))})"


def evaluate_library(
    model, tokenizer, experts, *, sources: dict[str, str], max_test: int, progress: bool, update_cards: bool
) -> list[dict]:
    """Base and expert accuracy on each expert's test split, paired."""
    from peft import PeftModel

    import peft_spectral  # noqa: F401  (registers SVF)
    from peft_spectral.expert_eval import DEFAULT_MAX_NEW_TOKENS, evaluate_generated, paired_report, write_test_eval
    from peft_spectral.tasks import load_task

    rows, base_cache = [], {}
    for k, (task_name, folder, meta) in enumerate(experts, 1):
        task = load_task(sources.get(task_name, task_name), seed=0)
        test = task.test[:max_test]
        if not test:
            raise SystemExit(f"expert {folder}: task {task_name!r} has no test examples")
        recipe = meta.get("recipe") or {}
        max_new = max(int(recipe.get("max_completion_length") or 0), DEFAULT_MAX_NEW_TOKENS)
        key = (task_name, len(test), max_new)
        t0 = time.perf_counter()
        if key not in base_cache:
            base_cache[key] = evaluate_generated(
                model, tokenizer, test, kind=task.kind, max_new_tokens=max_new, progress=progress
            )
        expert_model = PeftModel.from_pretrained(copy.deepcopy(model), str(folder))
        expert_model.eval()
        adapted = evaluate_generated(
            expert_model, tokenizer, test, kind=task.kind, max_new_tokens=max_new, progress=progress
        )
        del expert_model
        settings = {"split": "test", "seed": 0, "mode": "generate", "max_new_tokens": max_new}
        labels = [e.label for e in test] if task.kind == "multiple_choice" else None
        report = paired_report(base_cache[key], adapted, task=task_name, settings=settings, labels=labels)
        delta = report["delta"]
        row = {
            "task": task_name,
            "kind": task.kind,
            "expert": str(folder.relative_to(ROOT)) if folder.is_relative_to(ROOT) else str(folder),
            "recipe": recipe_text(meta),
            "n": report["n"],
            "test_split_size": len(task.test),
            "base": report["base"],
            "expert_accuracy": report["adapter"],
            "delta": delta,
            "text": report["text"],
            "balanced": report.get("balanced"),
            "goal_met": bool(delta["delta"] >= GOAL_DELTA and delta["low"] > 0),
            "trainable_parameters": recipe.get("trainable_parameters")
            or meta.get("metrics", {}).get("trainable_parameters"),
            "train_minutes": (meta.get("metrics", {}).get("train_seconds") or 0) / 60 or None,
            "eval_seconds": time.perf_counter() - t0,
        }
        rows.append(row)
        print(
            f"[{k}/{len(experts)}] {task_name}: base {report['text']['base']}, expert {report['text']['adapter']}, "
            f"{report['text']['delta']}; goal {'met' if row['goal_met'] else 'not met'}",
            flush=True,
        )
        if update_cards and meta.get("recipe"):
            write_test_eval(folder, report)
            write_card(
                folder,
                task_name,
                meta,
                wall_seconds=meta.get("metrics", {}).get("train_seconds"),
                stages=meta.get("stages"),
                test_eval=report,
            )
    return rows


# ------------------------------------------------------------------------------------------------------------ output


def add_balanced(rows: list[dict], sources: dict[str, str], *, update_cards: bool) -> None:
    """Fill `balanced` of multiple-choice rows saved without it, from the stored verdicts and the task's labels; with
    `update_cards`, also into the expert's `test_eval.json` and model card when they hold the same verdicts."""
    from peft_spectral.expert_eval import paired_report, read_test_eval, write_test_eval
    from peft_spectral.tasks import load_task

    for row in rows:
        if row["kind"] != "multiple_choice" or row.get("balanced"):
            continue
        test = load_task(sources.get(row["task"], row["task"]), seed=0).test[: row["n"]]
        labels = [e.label for e in test]
        report = paired_report(row["base"]["correct"], row["expert_accuracy"]["correct"], labels=labels)
        row["balanced"] = report["balanced"]
        folder = ROOT / row["expert"] if not Path(row["expert"]).is_absolute() else Path(row["expert"])
        saved = read_test_eval(folder) if update_cards else None
        if saved and saved["adapter"]["correct"] == row["expert_accuracy"]["correct"]:
            saved["balanced"], saved["text"]["balanced"] = report["balanced"], report["text"]["balanced"]
            write_test_eval(folder, saved)
            meta = json.loads((folder / "expert.json").read_text())
            wall = meta.get("metrics", {}).get("train_seconds")
            write_card(folder, row["task"], meta, wall_seconds=wall, stages=meta.get("stages"), test_eval=saved)


def _ci(acc: dict) -> str:
    return f"{acc['accuracy']:.3f} [{acc['low']:.2f}, {acc['high']:.2f}]"


def markdown(results: dict) -> str:
    lines = [
        "# SVF expert library vs the base model",
        "",
        (
            f"Model: {results['model']}. Each expert on its own task's test split (`load_task(task, seed=0)`, at most "
            f"{results['max_test']} examples), greedy generated answers; accuracy with its 95% Wilson interval; Δ = expert "
            "minus base on the same examples with a paired bootstrap 95% interval and the exact McNemar p. Goal: Δ ≥ "
            f"+{100 * GOAL_DELTA:.0f} points and the interval's lower end > 0. Reproduce: "
            "`python benchmarks/bench_experts.py` (add `--train` to retrain from `benchmarks/experts/recipes.json`)."
        ),
        "",
        (
            "| task | kind | recipe | n | base acc [95% CI] | expert acc [95% CI] | Δ vs base [95% CI] | p | goal (+8 pts, CI low > 0) "
            "| trainable params | train minutes |"
        ),
        "|---|---|---|---:|---|---|---|---:|---|---:|---:|",
    ]
    for r in results["rows"]:
        d = r["delta"]
        params = f"{r['trainable_parameters']:,}" if r.get("trainable_parameters") else "—"
        minutes = f"{r['train_minutes']:.1f}" if r.get("train_minutes") else "—"
        lines.append(
            f"| {r['task']} | {r['kind']} | {r['recipe']} | {r['n']} | {_ci(r['base'])} | {_ci(r['expert_accuracy'])} "
            f"| {100 * d['delta']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]{' *' if d['significant'] else ''} "
            f"| {d['p_value']:.3g} | {'met' if r['goal_met'] else 'not met'} | {params} | {minutes} |"
        )
    met = sum(r["goal_met"] for r in results["rows"])
    lines += [
        "",
        f"Goal met by {met} of {len(results['rows'])} experts. `*`: the 95% interval of Δ excludes 0. Δ in points.",
        "",
    ]
    balanced = [r for r in results["rows"] if r.get("balanced")]
    if balanced:
        lines += [
            (
                "Multiple-choice tasks, balanced accuracy (the mean over gold labels of the accuracy on that label: a model "
                "that gives the same answer every time scores chance, 1 / number of labels, however the labels are "
                "distributed). An expert *tells the labels apart* when the 95% bootstrap interval of its balanced accuracy "
                "lies above chance; a plain-accuracy gain without it is an answer format and a preferred label, not the task."
            ),
            "",
            (
                "| task | majority label share | chance | base balanced | expert balanced [95% CI] | Δ balanced [95% CI] "
                "| tells labels apart |"
            ),
            "|---|---:|---:|---:|---|---|---|",
        ]
        for r in balanced:
            b = r["balanced"]
            lines.append(
                f"| {r['task']} | {b['majority_share']:.2f} | {b['chance']:.2f} | {b['a']:.3f} | "
                f"{b['b']:.3f} [{b['b_low']:.2f}, {b['b_high']:.2f}] | {100 * b['delta']:+.1f} "
                f"[{100 * b['low']:+.1f}, {100 * b['high']:+.1f}]{' *' if b['significant'] else ''} | "
                f"{'yes' if b['adapter_above_chance'] else 'no'} |"
            )
        lines.append("")
    lines += [
        "![accuracy with 95% CIs](experts.png)",
        "",
    ]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> Optional[Path]:
    """Base vs expert accuracy per task with 95% CI error bars; `None` (and a warning) without matplotlib."""
    from peft_spectral.plots import ci_bar_chart

    rows = results["rows"]
    return ci_bar_chart(
        path,
        [r["task"] for r in rows],
        {"base model": [r["base"] for r in rows], "SVF expert": [r["expert_accuracy"] for r in rows]},
        width=0.72,
        ylabel="test accuracy (95% CI)",
        ylim=(0, 1),
        figsize=(max(5, 1.4 * len(rows) + 2), 3.8),
        xticks={"rotation": 20, "ha": "right"},
    )


# --------------------------------------------------------------------------------------------------------------- main


def _smoke_setup(work: Path) -> tuple[str, dict[str, str]]:
    """A tiny random model saved under `work` and a toy multiple-choice JSONL task; `(model dir, sources)`."""
    from tiny_model import tiny_model, tiny_tokenizer

    model_dir = work / "tiny-model"
    if not (model_dir / "config.json").is_file():
        tok = tiny_tokenizer()
        tiny_model(tok).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    task_file = work / "smoke_mc.jsonl"
    records = [{"prompt": f"Q{i}: is {i} even?", "choices": ["yes", "no"], "label": i % 2} for i in range(40)]
    task_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(model_dir), {"smoke_mc": str(task_file)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--train", action="store_true", help="(re)train the library from --recipes first (resumable)")
    p.add_argument("--recipes", type=Path, default=RECIPES, help="recipe file: task -> stages of train-svf arguments")
    p.add_argument("--tasks", nargs="+", default=None, help="train only these tasks of the recipe file; default all")
    p.add_argument("--experts-dir", type=Path, default=EXPERTS, help="the expert library evaluated (and trained into)")
    p.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "experts", help="stage outputs and checkpoints")
    p.add_argument("--max-test", type=int, default=400, help="test examples per task (the whole split when smaller)")
    p.add_argument("--model", default=None, help="base model (Hub id or directory); default: the embedded SmolLM2")
    p.add_argument("--out", type=Path, default=OUT, help="results prefix: OUT.json, OUT.md, OUT.png")
    p.add_argument(
        "--no-update-cards",
        action="store_true",
        help="do not write test_eval.json and the card's test section into the expert directories",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument(
        "--report-only", action="store_true", help="rewrite OUT.md and OUT.png from OUT.json (adds balanced accuracy)"
    )
    p.add_argument("--smoke", action="store_true", help="tiny random model, toy task, 2+1 steps: a check in seconds")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    sources: dict[str, str] = {}
    model_id = args.model
    if args.smoke:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        model_id, sources = _smoke_setup(args.work_dir)
        if args.experts_dir == EXPERTS:
            args.experts_dir = args.work_dir / "library"
        if args.out == OUT:
            args.out = args.work_dir / "experts"
        args.train, args.max_test = True, min(args.max_test, 8)
        recipes = SMOKE_RECIPE
    else:
        recipes = load_recipes(args.recipes) if args.train else {}
    extra = ["--no-progress"] if (args.no_progress or args.smoke) else []
    if args.report_only:
        results = json.loads(args.out.with_suffix(".json").read_text())
        add_balanced(results["rows"], sources, update_cards=not args.no_update_cards)
        return write_results(results, args.out)
    t0 = time.perf_counter()
    if args.train:
        tasks = args.tasks or list(recipes["tasks"])
        unknown = [t for t in tasks if t not in recipes["tasks"]]
        if unknown:
            raise SystemExit(f"--tasks {unknown}: not in {args.recipes}")
        train_library(recipes, tasks, args.work_dir, args.experts_dir, sources=sources, model=model_id, extra=extra)

    experts = find_experts(args.experts_dir)
    if not experts:
        raise SystemExit(f"no experts (adapter + expert.json) under {args.experts_dir}; run with --train")
    from peft_spectral.assets import DEFAULT_HUB_ID, load_model

    model, tokenizer = load_model(model_id)
    rows = evaluate_library(
        model,
        tokenizer,
        experts,
        sources=sources,
        max_test=args.max_test,
        progress=not (args.no_progress or args.smoke),
        update_cards=not args.no_update_cards,
    )
    results = {
        "model": model_id or f"{DEFAULT_HUB_ID} (embedded Q4_1 GGUF copy, de-quantised)",
        "max_test": args.max_test,
        "goal": {"delta_at_least": GOAL_DELTA, "ci_low_above": 0.0},
        "goal_met": sum(r["goal_met"] for r in rows),
        "rows": rows,
        "seconds": time.perf_counter() - t0,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    return write_results(results, args.out)


def write_results(results: dict, out: Path) -> dict:
    """OUT.json, OUT.md and OUT.png; returns `results`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = (out.with_suffix(s) for s in (".json", ".md", ".png"))
    json_path.write_text(json.dumps(results, indent=1))
    md_path.write_text(markdown(results))
    plot(results, png_path)
    print(f"wrote {json_path}, {md_path}" + (f", {png_path}" if png_path.exists() else ""), flush=True)
    return results


if __name__ == "__main__":
    main()
