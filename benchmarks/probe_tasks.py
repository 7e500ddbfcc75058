"""Probe the embedded base model on candidate BigBench tasks: where is there headroom for an SVF expert?

For every task: the base model's accuracy on the first `--n` validation examples (with a 95% Wilson interval), the
chance level, the label balance, the split sizes. Multiple choice is scored twice: by option log-likelihood (what
Transformer²'s few-shot search scores) and by the greedy generated answer (what RL rewards score: the letter or the
option text). Generation tasks are scored by their greedy answer. Writes `<out>.json` and `<out>.md` after every
task, so an interrupted run keeps what it measured, and ends with a recommendation.

    python benchmarks/probe_tasks.py                         # the default candidates, 100 validation examples each
    python benchmarks/probe_tasks.py --tasks navigate,snarks --n 50 --out /tmp/probe
    python benchmarks/probe_tasks.py --smoke                 # tiny random model, seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))  # tiny_model.py for the smoke runs

from peft_spectral.evaluation import evaluate  # noqa: E402
from peft_spectral.stats import accuracy_ci, balanced_accuracy, label_balance  # noqa: E402
from peft_spectral.tasks import Example, Task, load_task  # noqa: E402


CANDIDATES = [
    # generation
    "arithmetic/1_digit_addition",
    "arithmetic/2_digit_addition",
    "elementary_math_qa",
    "object_counting",
    # multiple choice, 2-4 options, >= 1000 examples
    "navigate",
    "sports_understanding",
    "epistemic_reasoning",
    "strategyqa",
    "winowhy",
    "logical_fallacy_detection",
    "timedial",
    "social_iqa",
    "temporal_sequences",
]
MIN_TEST = 200  # test examples a task needs for an expert to show a difference (20% of >= 1000 examples)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(CANDIDATES), help="comma-separated task names")
    p.add_argument("--n", type=int, default=100, help="validation examples per task (default 100)")
    p.add_argument("--max-new-tokens", type=int, default=10, help="generation budget of generation tasks (default 10)")
    p.add_argument(
        "--mc-new-tokens", type=int, default=4, help="generation budget of multiple choice (the letter; default 4)"
    )
    p.add_argument(
        "--mc-generate-n",
        type=int,
        default=None,
        help="score only the first N multiple-choice validation examples by generation (default: all --n)",
    )
    p.add_argument("--resume", action="store_true", help="keep the tasks already in <out>.json")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "probe"), help="output path without suffix")
    p.add_argument("--smoke", action="store_true", help="tiny random model and toy tasks (checks the script)")
    return p.parse_args(argv)


def _toy_task(name: str) -> Task:
    from peft_spectral.tasks import multiple_choice_prompt

    if name.endswith("gen"):
        ex = [Example(prompt=f"{i} + 1 =", target=str(i + 1)) for i in range(30)]
        return Task(name=name, kind="generation", train=ex[:10], validation=ex[10:20], test=ex[20:])
    ex = [
        Example(
            multiple_choice_prompt(f"is {i} even?", ("yes", "no")), "yes" if i % 2 == 0 else "no", ("yes", "no"), i % 2
        )
        for i in range(30)
    ]
    return Task(name=name, kind="multiple_choice", train=ex[:10], validation=ex[10:20], test=ex[20:])


def _label_key(ex: Example) -> str:
    return ex.target.strip().lower()


def probe_task(model, tokenizer, task: Task, args) -> dict[str, Any]:
    val = task.validation[: args.n]
    if not val:
        raise SystemExit(f"task {task.name!r} has no validation examples")
    labels = [_label_key(ex) for ex in val]
    balance = label_balance(labels)
    row: dict[str, Any] = {
        "kind": task.kind,
        "n": len(val),
        "n_train": len(task.train),
        "n_validation": len(task.validation),
        "n_test": len(task.test),
        "n_total": len(task.train) + len(task.validation) + len(task.test),
        "majority_label_fraction": next(iter(balance.values())),
        "distinct_targets": len(balance),
    }
    if task.kind == "multiple_choice":
        row["options"] = dict(Counter(len(ex.choices) for ex in val))
        row["chance"] = sum(1 / len(ex.choices) for ex in val) / len(val)
        row["gold_position_balance"] = {
            chr(65 + k): v for k, v in sorted(label_balance([ex.label for ex in val]).items())
        }
        if len(balance) <= 6:
            row["label_balance"] = balance
        start = time.perf_counter()
        ll = evaluate(model, tokenizer, val, kind=task.kind, mode="loglik", batch_size=args.batch_size)
        row["loglik"] = _scores(ll.correct, labels, time.perf_counter() - start)
    else:
        row["chance"] = 0.0
    start = time.perf_counter()
    budget = args.mc_new_tokens if task.kind == "multiple_choice" else args.max_new_tokens
    row["max_new_tokens"] = budget
    n_gen = args.mc_generate_n if task.kind == "multiple_choice" and args.mc_generate_n else len(val)
    gen = evaluate(
        model,
        tokenizer,
        val[:n_gen],
        kind=task.kind,
        mode="generate",
        batch_size=args.batch_size,
        max_new_tokens=budget,
    )
    row["generate"] = _scores(gen.correct, labels[:n_gen], time.perf_counter() - start)
    return row


def _scores(correct: list[bool], labels: list[str], seconds: float) -> dict[str, Any]:
    ci = accuracy_ci(correct)
    return {
        "accuracy": ci.accuracy,
        "ci95": [ci.low, ci.high],
        "text": str(ci),
        "balanced_accuracy": balanced_accuracy(correct, labels),
        "seconds": seconds,
    }


def recommend(rows: dict[str, dict]) -> dict[str, Any]:
    """Tasks with headroom for an RL-trained expert (the greedy generated accuracy is what RL rewards judge).

    Both kinds need a test split of >= 200 examples. Multiple choice also needs a generated accuracy not far above
    chance (<= chance + 0.2) and below the ceiling (upper Wilson bound < 0.9); generation needs an accuracy in
    [0.1, 0.85] (below 0.1 nearly every RL reward is −1 and the policy gradient vanishes).
    """
    qualifying = []
    for name, r in rows.items():
        acc, high = r["generate"]["accuracy"], r["generate"]["ci95"][1]
        if r["n_test"] < MIN_TEST:
            continue
        if r["kind"] == "multiple_choice":
            ok = high < 0.9 and acc <= r["chance"] + 0.2
        else:
            ok = 0.1 <= acc <= 0.85
        if ok:
            qualifying.append(name)
    return {"qualifying": qualifying}


def write(rows: dict[str, dict], meta: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    rec = recommend(rows) if rows else {"qualifying": []}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "tasks": rows, "recommendation": rec}, indent=1))
    lines = [
        "# Base-model probe of candidate tasks",
        "",
        (
            f"Model: {meta['model']}. First {meta['n']} validation examples of `load_task(name, seed=0)` per task; "
            "95% Wilson intervals; greedy generation (new tokens per task in the JSON: the letter for multiple choice, "
            f"{meta['max_new_tokens']} for generation); {meta['threads']} torch threads. Written by "
            "`benchmarks/probe_tasks.py`."
        ),
        "",
        (
            "| task | kind | examples (train/val/test) | chance | majority label | loglik acc | generated acc | "
            "balanced (gen) |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        ll = r.get("loglik", {}).get("text", "—")
        lines.append(
            f"| `{name}` | {r['kind']} | {r['n_train']}/{r['n_validation']}/{r['n_test']} | {r['chance']:.2f} | "
            f"{r['majority_label_fraction']:.2f} | {ll} | {r['generate']['text']} | "
            f"{r['generate']['balanced_accuracy']:.3f} |"
        )
    lines += [
        "",
        "Tasks with headroom by the rule of `recommend()` (test split >= 200; multiple choice: generated accuracy "
        "<= chance + 0.2 and upper bound < 0.9; generation: accuracy in [0.1, 0.85]): "
        + (", ".join(f"`{t}`" for t in rec["qualifying"]) or "none")
        + ".",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.smoke:
        from tiny_model import tiny_model as build_tiny_llama
        from tiny_model import tiny_tokenizer as build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer()
        model, model_name = build_tiny_llama(tokenizer).eval(), "tiny random Llama (smoke test)"
        names = ["toy_mc", "toy_gen"]
    else:
        from peft_spectral.assets import DEFAULT_MODEL_ID, load_default_model

        model = tokenizer = None  # loaded when a task is still to be probed
        model_name = DEFAULT_MODEL_ID
    meta = {
        "model": model_name,
        "n": args.n,
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    rows: dict[str, dict] = {}
    out = Path(args.out)
    if args.resume and out.with_suffix(".json").is_file():
        rows = json.loads(out.with_suffix(".json").read_text())["tasks"]
    for name in names:
        if name in rows:
            continue
        if model is None:
            model, tokenizer = load_default_model()
        start = time.perf_counter()
        task = _toy_task(name) if args.smoke else load_task(name, seed=0)
        rows[name] = probe_task(model, tokenizer, task, args)
        gen = rows[name]["generate"]["text"]
        ll = rows[name].get("loglik", {}).get("text", "-")
        print(
            f"{name}: generated {gen}, loglik {ll}, chance {rows[name]['chance']:.2f} "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
        write(rows, meta, out)
    write(rows, meta, out)
    print(json.dumps(recommend(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
