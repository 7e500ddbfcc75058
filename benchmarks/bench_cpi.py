"""Benchmark: CPI-FT vs multi-task SFT vs naive multi-stage SFT on reasoning-gym tasks, as the paper compares them.

Every method trains the CoreIsolation deltas of gate/up/down_proj with AdamW (same batch, learning rate) for the same
S SFT optimizer steps (`--budget`): the **single-task reference** trains each of the T tasks alone from the base model
for S/T steps; **multi-task SFT** S steps on the balanced mix; **naive multi-stage SFT** S/T steps per task in turn;
**CPI-FT** probes each task for P steps (`--probe-steps`, *outside* the budget as in the paper, timed on their own)
and spends S steps on its stages (earlier groups' cores frozen). Scoring: greedy answers (`--max-new-tokens`) to the
first `--n-test` test questions, judged by the task's verifier with `--extraction` (strict by default: SFT trains
the bare answer, and a later stage that changes an earlier task's answer format is forgetting too), the other
extraction from the same answers. Reported per scenario and data setting (`peft_spectral.stats`): accuracy [Wilson
95%], raw and normalised average, forgetting (right after a task's stage − final; paired bootstrap CI, McNemar p),
steps and times; goals: CPI-FT forgetting ≤ ½ naive's with the CI of naive − CPI-FT excluding 0, and CPI-FT ≥
multi-task SFT paired over the pooled test examples. Scenarios: **compatible** (arithmetic generators, every answer
a number) and **conflicting** (a number, Yes/No, a word list); `--train-fraction 1 0.25` adds reduced data.

    python benchmarks/bench_cpi.py --threads 2 --train-fraction 1 0.25   # -> docs/results/cpi.{json,md,png}
    python benchmarks/bench_cpi.py --report-only                         # the report of the parts finished so far
    python benchmarks/bench_cpi.py --smoke                               # tiny model, synthetic tasks, seconds

Resumable: every finished part (a scenario's base model; one method in one setting) stays in the state file.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

from peft_spectral import CoreIsolationConfig
from peft_spectral.benchmarking import BenchmarkRun, add_benchmark_arguments, markdown_table
from peft_spectral.benchmarking.reporting import stat_entry, task_label
from peft_spectral.benchmarking.tiny import tiny_tasks
from peft_spectral.cpi import FUSION_MODES, STAGE_ORDERS, CPIConfig, CPIPipeline, mixed_examples, sft_train
from peft_spectral.data import Task, load_task
from peft_spectral.evaluation import evaluate, rescore
from peft_spectral.plots import ci_bars, pyplot, save_figure
from peft_spectral.state import StateFileError
from peft_spectral.stats import accuracy_ci, bootstrap_mean_ci, compare_paired


ARITHMETIC = "rg:basic_arithmetic?allow_negation=false&allow_parentheses=false&max_digits=2&max_terms=2&operators=+,-"
SCENARIOS = {
    "compatible": (
        "related arithmetic generators, every answer a number",
        [ARITHMETIC, "rg:chain_sum?min_terms=3&max_terms=3&max_digits=1", "rg:products?max_digits=2"],
    ),
    "conflicting": (
        "answer formats that differ: a number, Yes or No, a comma-separated word list",
        [ARITHMETIC, "rg:syllogism?inversion_probability=0", "rg:word_sequence_reversal?min_words=2&max_words=3"],
    ),
}
LABELS = {
    "base": "base (no training)", "reference": "single-task SFT (reference)", "multitask": "multi-task SFT (mixed)",
    "naive_multistage": "naive multi-stage SFT", "cpi_ft": "CPI-FT",
}  # fmt: skip
METHODS = tuple(LABELS)[1:]
OTHER = {"strict": "lenient", "lenient": "strict"}
#: The options that define a run (its state is bound to them).
RUN_OPTIONS = ("tasks", "budget", "probe_steps", "lr", "weight_decay", "batch_size", "max_length", "p", "tau")
RUN_OPTIONS += ("n_train", "n_test", "eval_batch", "max_new_tokens", "extraction", "stage_order", "fusion")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_arguments(p, name="cpi")
    p.add_argument("--scenario", choices=("compatible", "conflicting", "both"), default="both")
    for name, (_, specs) in SCENARIOS.items():
        p.add_argument(f"--{name}-tasks", nargs="+", default=specs, metavar="SPEC", help=f"the {name} scenario")
    p.add_argument("--train-fraction", type=float, nargs="+", default=[1.0], help="data settings, e.g. 1 0.25")
    p.add_argument("--budget", type=int, default=120, help="SFT optimizer steps per method, S")
    p.add_argument("--probe-steps", type=int, default=40, help="CPI-FT probe steps per task, P, outside S")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--p", type=float, default=0.01, help="core fraction")
    p.add_argument("--tau", type=float, default=0.1, help="Jaccard threshold of the grouping")
    p.add_argument("--n-train", type=int, default=300, help="training examples per task (the first of the split)")
    p.add_argument("--n-test", type=int, default=100, help="test examples per task (the first of the split)")
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--extraction", choices=("strict", "lenient"), default="strict")
    p.add_argument("--stage-order", default="input", choices=STAGE_ORDERS)
    p.add_argument("--fusion", default="slerp_params", choices=FUSION_MODES)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--report-only", action="store_true", help="only write the report from the state")
    if "--smoke" in (argv if argv is not None else sys.argv[1:]):
        tasks = {f"{s}_tasks": [t.name for t in ts] for s, ts in tiny_tasks().items()}
        p.set_defaults(budget=12, probe_steps=4, lr=5e-2, n_test=10, max_new_tokens=4, **tasks)
    args = p.parse_args(argv)
    args.tasks = {"compatible": args.compatible_tasks, "conflicting": args.conflicting_tasks}
    args.scenarios = list(SCENARIOS) if args.scenario == "both" else [args.scenario]
    args.train_fraction = list(dict.fromkeys(args.train_fraction))
    if not all(0 < f <= 1 for f in args.train_fraction):
        p.error(f"--train-fraction must be in (0, 1], got {args.train_fraction}")
    for s, specs in args.tasks.items():
        if len(set(specs)) != len(specs) or not 2 <= len(specs) <= args.budget:
            p.error(f"--{s}-tasks needs 2 to --budget distinct tasks, got {specs}")
    return args


# ------------------------------------------------------------------------------------------------ training


class RunMeter(TrainerCallback):
    """Per SFT run: the optimizer steps the trainer really took, its training set's size and the time."""

    def __init__(self):
        self.records: list[dict] = []

    def on_train_begin(self, args, state, control, **kwargs):
        loader = kwargs.get("train_dataloader")
        self._size = len(loader.dataset) if loader is not None and hasattr(loader, "dataset") else None
        self._t0 = time.time()

    def on_train_end(self, args, state, control, **kwargs):
        seconds = round(time.time() - self._t0, 2)
        self.records.append({"steps": int(state.global_step), "dataset_size": self._size, "seconds": seconds})


class Part:
    """One part while it runs: its SFT runs (through one meter) and its evaluations."""

    def __init__(self, model, tok, cfg: CPIConfig, args, work: Path):
        self.model, self.tok, self.cfg, self.args, self.work = model, tok, cfg, args, work
        self.meter, self.eval_s = RunMeter(), 0.0
        self.scoring = {"batch_size": args.eval_batch, "max_new_tokens": args.max_new_tokens}

    def train(self, model, examples: list, steps: int, label: str) -> dict:
        sft_train(model, self.tok, examples, self.cfg, steps=steps, output_dir=self.work, callbacks=[self.meter])
        return dict(self.meter.records[-1], label=label)

    def score(self, model, task: Task) -> tuple[list[int], list[int] | None]:
        """Per-example verdicts with `--extraction`, and with the other extraction (generation tasks)."""
        start, extraction = time.time(), self.args.extraction
        r = evaluate(model, self.tok, task.test, kind=task.kind, extraction=extraction, **self.scoring)
        other = None
        if task.kind != "multiple_choice":
            other = [int(c) for c in rescore(r, task.test, kind=task.kind, extraction=OTHER[extraction]).correct]
        self.eval_s += time.time() - start
        return [int(c) for c in r.correct], other


@torch.no_grad()
def _reset(peft_model) -> None:
    for n, p in peft_model.named_parameters():
        if "core_isolation_delta" in n:
            p.zero_()


def run_part(part: Part, scenario: str, method: str, fraction, tasks: list[Task]) -> dict:
    """Train and score one part; its record holds every per-example verdict, the SFT runs and the times."""
    from peft import get_peft_model
    from transformers import set_seed

    set_seed(part.args.seed)
    start = time.time()
    final, after, extra = {}, {}, {"earlier_tasks": [], "probe_runs": [], "sft_runs": []}
    budget, n = part.args.budget, len(tasks)
    steps = [budget // n + (k < budget % n) for k in range(n)]  # S/T each, the first S mod T one more
    if method == "base":
        final = {t.name: part.score(part.model, t) for t in tasks}
    elif method == "cpi_ft":
        final, after, extra = run_cpi(part, scenario, fraction, tasks)
    else:
        peft_model = get_peft_model(part.model, copy.deepcopy(part.cfg.adapter))
        runs = extra["sft_runs"]
        try:
            if method == "reference":  # each task alone from the base model, its share of S
                for k, t in enumerate(tasks):
                    _reset(peft_model)
                    runs.append(part.train(peft_model, t.train, steps[k], f"single:{t.name}"))
                    final[t.name] = part.score(peft_model, t)
            elif method == "multitask":
                mix = mixed_examples([t.train for t in tasks], seed=part.args.seed)
                runs.append(part.train(peft_model, mix, part.args.budget, "mixed"))
                final = {t.name: part.score(peft_model, t) for t in tasks}
            else:  # naive multi-stage: S/T steps per task, in order
                extra["earlier_tasks"] = [t.name for t in tasks[:-1]]
                for k, t in enumerate(tasks):
                    runs.append(part.train(peft_model, t.train, steps[k], f"stage:{k}:{t.name}"))
                    if k < len(tasks) - 1:
                        after[t.name] = part.score(peft_model, t)
                final = {t.name: part.score(peft_model, t) for t in tasks}
        finally:
            peft_model.unload()  # CoreIsolation never writes into the base weights while unmerged
    train_s = extra.pop("stage_train_s", None)
    train_s = sum(r["seconds"] for r in extra["sft_runs"]) if train_s is None else train_s
    primary = {"final": {n: v[0] for n, v in final.items()}, "after_own": {n: v[0] for n, v in after.items()}}
    other = {"final": {n: v[1] for n, v in final.items()}, "after_own": {n: v[1] for n, v in after.items()}}
    times = {"train_s": train_s, "probe_s": extra.pop("probe_s", 0.0), "eval_s": part.eval_s}
    times["total_s"] = time.time() - start
    return {
        "method": method, "scenario": scenario, "train_fraction": fraction,
        "tasks": [{"name": t.name, "kind": t.kind, "n_test": len(t.test), "n_train": len(t.train)} for t in tasks],
        "verdicts": {**primary, "other": other}, "sft_steps": sum(r["steps"] for r in extra["sft_runs"]),
        "planned_sft_steps": 0 if method == "base" else part.args.budget,
        "probe_steps": sum(r["steps"] for r in extra["probe_runs"]),
        "timings_s": {k: round(v, 1) for k, v in times.items()}, **extra,
    }  # fmt: skip


def run_cpi(part: Part, scenario: str, fraction: float, tasks: list[Task]):
    by_name = {t.name: t for t in tasks}
    pipe_dir = part.work / f"cpi_{scenario}_{fraction:g}"
    shutil.rmtree(pipe_dir, ignore_errors=True)  # an interrupted part starts over
    after: dict = {}
    stage_eval_s = [0.0]

    def on_stage_end(pipe, k, group):
        if k < len(pipe.state["stage_order"]) - 1:
            t0 = time.time()
            after.update({name: part.score(pipe.model, by_name[name]) for name in group})
            stage_eval_s[0] += time.time() - t0

    hooks = {"progress": False, "callbacks": [part.meter], "on_stage_end": on_stage_end}
    pipe = CPIPipeline(part.model, part.tok, tasks, part.cfg, pipe_dir, **hooks)
    try:
        rep = pipe.run()
        final = {t.name: part.score(pipe.model, t) for t in tasks}
    finally:
        pipe.model.unload()
    shutil.rmtree(pipe_dir, ignore_errors=True)  # a few hundred MB of deltas per task; the numbers are kept
    order, timings = rep["stage_order"], rep["timings_s"] or {}
    runs = [dict(rec, label=label) for label, rec in zip(pipe.trainer_runs, part.meter.records)]
    extra = {
        "earlier_tasks": [n for g in order[:-1] for n in g],
        "probe_runs": [r for r in runs if r["label"].startswith("probe:")],
        "sft_runs": [r for r in runs if r["label"].startswith("stage:")],
        "probe_s": float(timings.get("probe", 0.0)),
        "stage_train_s": float(timings.get("staged", 0.0)) - stage_eval_s[0],
        **{k: rep[k] for k in ("groups", "stage_order", "jaccard", "core_sizes", "frozen_counts")},
    }
    return final, after, extra


# ------------------------------------------------------------------------------------------------ analysis


def acc_entry(verdicts: list[int]) -> dict:
    return stat_entry(accuracy_ci(verdicts))


def pooled(verdicts: dict, names: list[str]) -> list[int]:
    return [v for n in names for v in verdicts[n]]


def forgetting_entry(record: dict):
    """Forgetting = accuracy right after the task's own stage − final accuracy, over the earlier tasks' examples."""
    earlier, v = record["earlier_tasks"], record["verdicts"]
    if not earlier:
        return None
    return {
        "tasks": list(earlier),
        "per_task": {n: stat_entry(compare_paired(v["final"][n], v["after_own"][n])) for n in earlier},
        "pooled": stat_entry(compare_paired(pooled(v["final"], earlier), pooled(v["after_own"], earlier))),
        "after_own": {n: acc_entry(v["after_own"][n]) for n in earlier},
    }


def method_summary(record: dict, reference) -> dict:
    names = [t["name"] for t in record["tasks"]]
    final_v = record["verdicts"]["final"]
    final = {n: acc_entry(final_v[n]) for n in names}
    out = dict(record, final=final, forgetting=forgetting_entry(record), normalised=None)
    out["average"] = sum(e["accuracy"] for e in final.values()) / len(final)
    out["pooled"] = acc_entry(pooled(record["verdicts"]["final"], names))
    other = record["verdicts"].get("other", {}).get("final", {})
    if any(other.get(n) is not None for n in names):  # multiple-choice tasks have one reading
        out["average_other"] = float(np.mean([np.mean(other.get(n) or final_v[n]) for n in names]))
    if reference is not None:
        ref = {n: float(np.mean(reference["verdicts"]["final"][n])) for n in names}
        ratios = {n: final[n]["accuracy"] / ref[n] if ref[n] > 0 else None for n in names}
        used = [r for r in ratios.values() if r is not None]
        out["normalised"] = {
            "per_task": ratios,
            "average": sum(used) / len(used) if used else None,
            "undefined_for": [n for n, r in ratios.items() if r is None],
        }
    return out


def forgetting_goal(naive: dict, cpi: dict) -> dict:
    common = [n for n in naive["earlier_tasks"] if n in cpi["earlier_tasks"]]
    if not common:
        return {"met": None, "note": "CPI-FT trained every task in its last stage (one group): nothing to compare"}
    nv, cv = naive["verdicts"], cpi["verdicts"]
    n_fg = np.array(pooled(nv["after_own"], common)) - np.array(pooled(nv["final"], common))
    c_fg = np.array(pooled(cv["after_own"], common)) - np.array(pooled(cv["final"], common))
    nf, cf = float(n_fg.mean()), float(c_fg.mean())
    diff, half = bootstrap_mean_ci(n_fg - c_fg), bootstrap_mean_ci(0.5 * n_fg - c_fg)
    out = {
        "tasks": common, "n": int(n_fg.size), "naive": nf, "cpi": cf, "ratio": cf / nf if nf > 0 else None,
        "naive_minus_cpi": {"delta": nf - cf, "low": diff[0], "high": diff[1]},
        "half_naive_minus_cpi": {"delta": 0.5 * nf - cf, "low": half[0], "high": half[1]},
    }  # fmt: skip
    if nf <= 0:
        return dict(out, met=None, note="naive multi-stage SFT forgot nothing on these tasks (≤ 0): nothing to halve")
    return dict(out, met=bool(cf <= 0.5 * nf and diff[0] > 0))


def average_goal(multitask: dict, cpi: dict) -> dict:
    names = [t["name"] for t in cpi["tasks"]]
    mt, cpi_v = pooled(multitask["verdicts"]["final"], names), pooled(cpi["verdicts"]["final"], names)
    cmp = stat_entry(compare_paired(mt, cpi_v))  # CPI-FT − multi-task, paired over the same examples
    return {"cpi_minus_multitask": cmp, "met": bool(cmp["delta"] >= 0)}


def build_results(parts: dict, args, missing: list) -> dict:
    scenarios: dict = {}
    for s in args.scenarios:
        base = parts.get(f"{s}/base")
        records = [r for k, r in parts.items() if k.startswith(f"{s}/")]
        if not records:
            continue
        scen = scenarios[s] = {"tasks": records[0]["tasks"], "settings": {}}
        scen["base"] = method_summary(base, None) if base else None
        for f in args.train_fraction:
            got = {m: parts[f"{s}/{f:g}/{m}"] for m in METHODS if f"{s}/{f:g}/{m}" in parts}
            if not got:
                continue
            ref = got.get("reference")
            first = next(iter(got.values()))
            setting = scen["settings"][f"{f:g}"] = {
                "train_fraction": f,
                "n_train": {t["name"]: t["n_train"] for t in first["tasks"]},
                "methods": {m: method_summary(r, ref) for m, r in got.items()},
                "complete": len(got) == len(METHODS),
                "goals": {},
            }
            if base and ref:
                setting["base_normalised"] = method_summary(base, ref)["normalised"]
            if "naive_multistage" in got and "cpi_ft" in got:
                setting["goals"]["forgetting"] = forgetting_goal(got["naive_multistage"], got["cpi_ft"])
            if "multitask" in got and "cpi_ft" in got:
                setting["goals"]["average"] = average_goal(got["multitask"], got["cpi_ft"])
    return {"scenarios": scenarios, "missing": missing}


# ------------------------------------------------------------------------------------------------ report

SETUP = """\
Trained by every method: CoreIsolation deltas of gate/up/down_proj; AdamW, lr {lr}, weight decay {weight_decay}, \
batch {batch_size}, max length {max_length}. **Same SFT budget for every method: S = {budget} optimizer steps** \
(reference and naive multi-stage: S/T per task; CPI-FT: S shared by its stages); CPI-FT's probes of P = \
{probe_steps} steps each are **outside** it. p = {p}, τ = {tau}, stage order {stage_order}, fusion {fusion}. At most \
{n_train} training and {n_test} test examples per task (the first of each split of `load_task(spec, seed={seed})`). \
Scoring: greedy answers (at most {max_new_tokens} new tokens) judged by the task's verifier with **{extraction}** \
extraction (*average ({other})*: the other extraction of the same answers). Cells: accuracy [95% Wilson interval] \
(n). *Norm. avg*: per task the accuracy over the single-task reference's, averaged (tasks where the reference scores \
0 left out). *Forgetting*: accuracy right after the stage that trained a task − final, over the tasks trained before \
the last stage, paired bootstrap 95% CI and exact McNemar p (positive = forgot).
"""


def _norm(norm) -> str:
    return "–" if not norm or norm.get("average") is None else f"{norm['average']:.3f}"


def _row(m: str, r: dict, names: list) -> list:
    fg, t, probes = r.get("forgetting"), r["timings_s"], r["probe_steps"]
    cells = [LABELS[m], *(r["final"][n]["text"] for n in names), f"{r['average']:.3f}"]
    cells += [f"{r['average_other']:.3f}" if "average_other" in r else "–", _norm(r.get("normalised"))]
    cells += ["–" if fg is None else fg["pooled"]["text"], r["sft_steps"], probes or "–"]
    return cells + [f"{t['probe_s']:.0f}" if probes else "–", f"{t['train_s']:.0f}", f"{t['total_s']:.0f}"]


def goal_lines(setting: dict) -> list[str]:
    g, ms, word = setting["goals"], setting["methods"], {None: "n/a", True: "met", False: "not met"}
    lines = []
    if "forgetting" in g:
        fg, detail = g["forgetting"], g["forgetting"].get("note", "")
        if "naive" in fg:
            d, h = fg["naive_minus_cpi"], fg["half_naive_minus_cpi"]
            detail = (
                f"CPI-FT {fg['cpi']:+.3f} vs naive {fg['naive']:+.3f} on {', '.join(map(task_label, fg['tasks']))} "
                f"(n={fg['n']}); naive − CPI-FT {d['delta']:+.3f} [{d['low']:+.2f}, {d['high']:+.2f}]; ½·naive − "
                f"CPI-FT {h['delta']:+.3f} [{h['low']:+.2f}, {h['high']:+.2f}]" + (f"; {detail}" if detail else "")
            )
        lines.append(f"- Goal: CPI-FT forgetting ≤ ½ naive multi-stage SFT's, CI of the difference excluding 0: "
                     f"**{word[fg['met']]}** ({detail}).")  # fmt: skip
    if "average" in g:
        c, norms = g["average"]["cpi_minus_multitask"], [_norm(ms[m]["normalised"]) for m in ("cpi_ft", "multitask")]
        lines.append(f"- Goal: CPI-FT average ≥ multi-task SFT's (paired over the {c['n']} pooled test examples): "
                     f"**{word[g['average']['met']]}** (CPI-FT − multi-task {c['text']}; normalised averages "
                     f"{norms[0]} vs {norms[1]}).")  # fmt: skip
    for m in ("naive_multistage", "cpi_ft"):
        fg = ms.get(m, {}).get("forgetting")
        if fg:
            per = [f"{task_label(n)}: {fg['after_own'][n]['accuracy']:.3f} → {ms[m]['final'][n]['accuracy']:.3f} "
                   f"({e['text']})" for n, e in fg["per_task"].items()]  # fmt: skip
            lines.append(f"- {LABELS[m]}, right after own stage → final: {'; '.join(per)}.")
    return lines


def setting_lines(s: str, scen: dict, setting: dict, args) -> list[str]:
    names, frac = [t["name"] for t in scen["tasks"]], setting["train_fraction"]
    title = "full training data" if frac == 1 else f"reduced data: {frac:g} of each task's training examples"
    rows = [_row("base", dict(scen["base"], normalised=setting.get("base_normalised")), names)] if scen["base"] else []
    rows += [_row(m, setting["methods"][m], names) for m in METHODS if m in setting["methods"]]
    headers = ["method", *map(task_label, names), "average", f"average ({OTHER[args.extraction]})", "norm. avg"]
    headers += ["forgetting", "SFT steps", "probe steps", "probe s", "SFT s", "total s"]
    sizes = ", ".join(f"{task_label(n)} {c}" for n, c in setting["n_train"].items())
    lines = [f"### {s}, {title}", "", f"Training examples per task: {sizes}.", ""]
    lines += [markdown_table(headers, rows, "l" + "r" * (len(headers) - 1)), "", *goal_lines(setting)]
    cpi = setting["methods"].get("cpi_ft")
    if cpi is not None:
        pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
        jac = "; ".join(f"{task_label(names[i])}–{task_label(names[j])} {cpi['jaccard'][i][j]:.3f}" for i, j in pairs)
        groups, order = ([[task_label(n) for n in g] for g in cpi[k]] for k in ("groups", "stage_order"))
        cores = {task_label(n): size for n, size in cpi["core_sizes"].items()}
        lines.append(f"- CPI-FT groups (τ = {args.tau}): {groups}; stage order {order}; core sizes {cores}; frozen "
                     f"entries per stage {cpi['frozen_counts']}; Jaccard {jac}.")  # fmt: skip
    return lines + [""]


def markdown(results: dict, args) -> str:
    lines = [SETUP.format(**vars(args), other=OTHER[args.extraction])]
    if results["missing"]:
        lines += [f"**Unfinished**: not run yet: {', '.join(results['missing'])}.", ""]
    for s, scen in results["scenarios"].items():
        lines += [f"## Scenario: {s} — {SCENARIOS[s][0] if not args.smoke else 'smoke tasks'}", ""]
        lines += ["Tasks: " + ", ".join(f"`{t['name']}` ({t['kind']}, n={t['n_test']})" for t in scen["tasks"]), ""]
        for setting in scen["settings"].values():
            lines += setting_lines(s, scen, setting, args)
    return "\n".join(lines)


def plot(results: dict, path: Path, budget: int) -> None:
    plt = pyplot("the CPI-FT benchmark's plot", required=False)
    panels = [(s, fk) for s, scen in results["scenarios"].items() for fk in scen["settings"]]
    if plt is None or not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.6 * len(panels)), squeeze=False)
    for ax, (s, fk) in zip(axes[:, 0], panels):
        scen, setting = results["scenarios"][s], results["scenarios"][s]["settings"][fk]
        names = [t["name"] for t in scen["tasks"]]
        rows = ([("base", scen["base"])] if scen["base"] else []) + list(setting["methods"].items())
        ci_bars(ax, [*names, "pooled"], {LABELS[m]: [r["final"][n] for n in names] + [r["pooled"]] for m, r in rows})
        ax.set_xticks(range(len(names) + 1), [*map(task_label, names), "pooled"])
        title = f"{s}, train fraction {fk}: same SFT budget S = {budget}"
        ax.set(ylim=(0, 1.25), ylabel="test accuracy (95% CI)", title=title)  # ylim: room for the legend
        ax.legend(fontsize=7, ncol=5, loc="upper center")
    save_figure(fig, path)


# ------------------------------------------------------------------------------------------------ main


def make_config(args) -> CPIConfig:
    mlp = ["gate_proj", "up_proj", "down_proj"]
    adapter = CoreIsolationConfig(target_modules=mlp, core_fraction=args.p, similarity_threshold=args.tau)
    steps = {"probe_steps": args.probe_steps, "total_stage_steps": args.budget, "learning_rate": args.lr}
    rest = ("weight_decay", "batch_size", "max_length", "stage_order", "fusion", "seed")
    return CPIConfig(adapter=adapter, **steps, **{k: getattr(args, k) for k in rest})


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        run = BenchmarkRun.from_args(args, {k: getattr(args, k) for k in RUN_OPTIONS})
    except StateFileError as err:
        raise SystemExit(str(err)) from None
    parts = ["base", *(f"{f:g}/{m}" for f in args.train_fraction for m in METHODS)]
    keys = [f"{s}/{part}" for s in args.scenarios for part in parts]  # "<scenario>/base", "<s>/<fraction>/<method>"
    if not args.report_only and not all(run.done(k) for k in keys):
        n_total = max(args.n_train * 5 // 3, args.n_test * 5)  # 0.6 / 0.2 / 0.2 splits
        tasks = tiny_tasks() if args.smoke else {
            s: [load_task(spec, seed=args.seed, max_examples=n_total) for spec in args.tasks[s]] for s in args.scenarios
        }  # fmt: skip
        for t in (t for ts in tasks.values() for t in ts):
            t.train, t.test = list(t.train[: args.n_train]), list(t.test[: args.n_test])
        model, tok = run.load_model()  # with a pad token
        cfg = make_config(args)
        work = run.output_dir / "cpi_work" if args.smoke else Path("runs") / "bench_cpi"  # trainer and CPI-FT scratch
        for key in run.jobs(keys, desc="parts"):
            scenario, *rest = key.split("/")
            method, fraction = rest[-1], None if rest == ["base"] else float(rest[0])
            ts = tasks[scenario]
            if fraction is not None:  # the first `fraction` of each task's training examples (at least one)
                ts = [dataclasses.replace(t, train=t.train[: max(1, round(fraction * len(t.train)))]) for t in ts]
            run.record(key, run_part(Part(model, tok, cfg, args, work), scenario, method, fraction, ts))
    results = build_results(run.results(), args, [k for k in keys if not run.done(k)])
    run.write(results, markdown(results, args), title="CPI-FT benchmark")
    plot(results, run.path(".png"), args.budget)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
