"""Benchmark: CPI-FT vs multi-task SFT vs naive multi-stage SFT, as the paper runs it (issue #16).

On the embedded SmolLM2-135M-Instruct every method trains the same CoreIsolation deltas of the MLP projections
(gate/up/down_proj) with the same optimizer (AdamW), batch, learning rate and the same number S of SFT optimizer
steps (`--budget`):

- **single-task SFT (reference)**: each of the T tasks alone from the base model, S/T steps each (the per-task
  budget of the multi-stage methods); the reference of the normalised score;
- **multi-task SFT**: S steps on the balanced mix of all tasks;
- **naive multi-stage SFT**: S/T steps on each task, one after another;
- **CPI-FT**: T probes of P steps (`--probe-steps`), *outside* the budget as in the paper, then S steps shared by
  the staged-SFT stages (one per group of tasks, earlier groups' cores frozen). Probe time is reported on its own.

Reported per method, per scenario and training-data setting: per-task test accuracy with its 95% Wilson interval and
n (the first `--n-test` test examples, the whole split when smaller); the raw average and the **normalised average
score** (per task, the method's accuracy divided by the single-task SFT reference's accuracy on that task, averaged
over tasks: the seed names an "Avg. Norm. Score" but gives no formula, see `docs/core_isolation.md`); **forgetting**
(accuracy right after the stage that trained a task minus its final accuracy, over the test examples of the tasks
trained before the last stage) with a paired bootstrap CI (`compare_paired` on the same examples); SFT and probe
steps actually taken; probe, training, evaluation and total wall time. The per-example verdicts are in the JSON, so
every number can be recomputed.

Goals, per setting: CPI-FT's forgetting ≤ ½ naive multi-stage SFT's with the paired bootstrap CI of (naive − CPI-FT)
excluding 0, on the tasks both methods trained before their last stage; CPI-FT's accuracy ≥ multi-task SFT's, paired
over the pooled test examples of all tasks.

Scenarios (`--scenario`, default both): **compatible** — three two-option multiple-choice BigBench tasks scored by
option log-likelihood (`strategyqa`, `sports_understanding`, `navigate`: every answer is one of the listed options);
**conflicting** — answer formats that fight (`arithmetic/2_digit_addition`: digits by generation,
`epistemic_reasoning`: multiple choice, `object_counting`: number words by generation). `--train-fraction 1 0.25`
adds the seed's reduced-data setting (every method trains on the first 25% of each task's training examples),
reported as its own rows.

Resumable: every finished part (scenario × data setting × method) is saved in `--state-dir` and never recomputed; a
state made with other settings stops the script with a one-line error (`--fresh` clears it). `--max-minutes` (default
45) is the wall-time budget of one invocation: a part that would not fit in what is left is left for the next
invocation (run the same command again), and a part's training is capped so that the invocation ends in time (it
stops early and the report says so). Progress lines carry an ETA. Writes `cpi.{json,md,png}` to `--out` from every
finished part in the state.

    python benchmarks/bench_cpi.py --train-fraction 1 0.25   # the whole benchmark; rerun until "all parts done"
    python benchmarks/bench_cpi.py --estimate-only --train-fraction 1 0.25   # expected duration (task data only)
    python benchmarks/bench_cpi.py --report-only              # rebuild cpi.{json,md,png} from the state
    python benchmarks/bench_cpi.py --smoke                    # tiny random model, synthetic tasks, seconds
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from transformers import TrainerCallback


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))  # tiny_model.py for the smoke runs

from peft_spectral.cpi import (  # noqa: E402
    FUSION_MODES,
    STAGE_ORDERS,
    CPIConfig,
    CPIPipeline,
    mixed_examples,
    sft_train,
)
from peft_spectral.state import StateFileError, fingerprint, load_state, write_json_atomic  # noqa: E402
from peft_spectral.stats import accuracy_ci, compare_paired, format_accuracy, format_comparison  # noqa: E402
from peft_spectral.tasks import Example, Task  # noqa: E402
from peft_spectral.tuners.core_isolation import CoreIsolationConfig  # noqa: E402


logger = logging.getLogger("bench_cpi")
MLP = ["gate_proj", "up_proj", "down_proj"]
SCENARIOS = ("compatible", "conflicting")
DEFAULT_TASKS = {
    "compatible": ["strategyqa", "sports_understanding", "navigate"],
    "conflicting": ["arithmetic/2_digit_addition", "epistemic_reasoning", "object_counting"],
}
SCENARIO_TEXT = {
    "compatible": "compatible answer formats (every answer is one of the listed options, scored by log-likelihood)",
    "conflicting": "conflicting answer formats (digits vs number words vs multiple choice)",
}
METHODS = ("reference", "multitask", "naive_multistage", "cpi_ft")
LABELS = {
    "base": "base (no training)",
    "reference": "single-task SFT (reference)",
    "multitask": "multi-task SFT (mixed)",
    "naive_multistage": "naive multi-stage SFT",
    "cpi_ft": "CPI-FT",
}
STATE_FILE = "bench_cpi_state.json"
STATE_VERSION = 1
EMBEDDED_MODEL = "SmolLM2-135M-Instruct (embedded GGUF, fp32)"
SMOKE_MODEL = "tiny random llama (smoke)"
SMOKE_OUT = Path(tempfile.gettempdir()) / "bench_cpi_smoke_out"
COMMITTED_JSON = ROOT / "docs" / "results" / "cpi.json"

# Time constants of the estimate when no measured rates exist (2-core CPU, one process, 2 threads, embedded model,
# batch 4, max length 160), from the committed runs of the previous protocol (docs/results/cpi*.json): multi-task SFT
# 120 steps in 482.7 s (4.0 s/step on a mix with epistemic_reasoning's long prompts); naive multi-stage 120 steps
# plus 300 evaluated examples in 374.9 s (about 2 s/step on single short-prompt tasks); base evaluation of 150
# examples (100 generated with 10-16 new tokens, 50 option-scored) in 68-79 s, i.e. about 0.65 s per generated
# example; docs/DESIGN: 40 two-option examples scored in 3.4 s (about 0.1 s per option-scored example). CPI-FT's
# cores, grouping and fusion of the 80M tracked entries: about a minute. Low / point / high:
PRIOR_RATES = {
    "low": {"s_per_step": 2.0, "generation": 0.5, "multiple_choice": 0.08, "cpi_overhead_s": 30.0, "load_s": 15.0},
    "point": {"s_per_step": 3.0, "generation": 0.65, "multiple_choice": 0.12, "cpi_overhead_s": 60.0, "load_s": 20.0},
    "high": {"s_per_step": 4.0, "generation": 0.8, "multiple_choice": 0.15, "cpi_overhead_s": 90.0, "load_s": 30.0},
}


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def fraction_key(fraction: float) -> str:
    return f"{fraction:g}"


def per_task_steps(total: int, n: int) -> list[int]:
    """`total` steps split over `n` tasks: `total // n` each, the first `total % n` one more."""
    base, extra = divmod(total, n)
    return [base + (1 if k < extra else 0) for k in range(n)]


# ------------------------------------------------------------------------------------------------ parts of the run


@dataclass(frozen=True)
class Part:
    """One unit of work that is saved when finished: the base model of a scenario, or one method in one setting."""

    scenario: str
    method: str  # "base" or one of METHODS
    fraction: Optional[float] = None  # None for "base"

    @property
    def key(self) -> str:
        if self.method == "base":
            return f"{self.scenario}/base"
        return f"{self.scenario}/{fraction_key(self.fraction)}/{self.method}"


def planned_parts(scenarios: list[str], fractions: list[float]) -> list[Part]:
    parts = []
    for s in scenarios:
        parts.append(Part(s, "base"))
        for f in fractions:
            parts.extend(Part(s, m, f) for m in METHODS)
    return parts


def part_work(part: Part, tasks: list[dict], args) -> dict:
    """Planned optimizer steps and evaluated examples (per kind) of a part; CPI-FT counted with one group per task."""
    T = len(tasks)
    steps = {"base": 0, "cpi_ft": args.budget + T * args.probe_steps}.get(part.method, args.budget)
    evals: dict[str, int] = {}

    def add(ts):
        for t in ts:
            evals[t["kind"]] = evals.get(t["kind"], 0) + t["n_test"]

    add(tasks)  # every method ends with (or is) one evaluation of every task
    if part.method in ("naive_multistage", "cpi_ft"):
        add(tasks[:-1])  # each earlier task right after its stage
    return {"steps": steps, "evals": evals, "cpi": part.method == "cpi_ft"}


# ------------------------------------------------------------------------------------------------ rates and estimate


@dataclass
class Rates:
    s_per_step: float
    s_per_eval: dict
    cpi_overhead_s: float
    load_s: float
    source: str

    @classmethod
    def prior(cls, which: str = "point") -> Rates:
        r = PRIOR_RATES[which]
        return cls(
            r["s_per_step"],
            {"generation": r["generation"], "multiple_choice": r["multiple_choice"]},
            r["cpi_overhead_s"],
            r["load_s"],
            f"constants in bench_cpi.py ({which})",
        )

    @classmethod
    def measured(cls, records: list[dict], source: str) -> Optional[Rates]:
        """Rates from finished parts (`None` when there are none); what they did not measure keeps the constants."""
        if not records:
            return None
        steps = sum(r["sft_steps"] + r.get("probe_steps", 0) for r in records)
        train_s = sum(r["timings_s"]["train_s"] + r["timings_s"].get("probe_s", 0.0) for r in records)
        prior = cls.prior()
        per_eval = dict(prior.s_per_eval)
        for kind in ("generation", "multiple_choice"):
            n = sum(r["eval"].get(kind, {}).get("examples", 0) for r in records)
            s = sum(r["eval"].get(kind, {}).get("seconds", 0.0) for r in records)
            if n:
                per_eval[kind] = s / n
        overheads = [r["timings_s"]["overhead_s"] for r in records if r["method"] == "cpi_ft"]
        return cls(
            train_s / steps if steps else prior.s_per_step,
            per_eval,
            sum(overheads) / len(overheads) if overheads else prior.cpi_overhead_s,
            prior.load_s,
            source,
        )

    def scaled(self, factor: float) -> Rates:
        return Rates(
            self.s_per_step * factor,
            {k: v * factor for k, v in self.s_per_eval.items()},
            self.cpi_overhead_s * factor,
            self.load_s,
            self.source,
        )

    def as_dict(self) -> dict:
        return {
            "s_per_step": round(self.s_per_step, 4),
            "s_per_eval_example": {k: round(v, 4) for k, v in self.s_per_eval.items()},
            "cpi_overhead_s": round(self.cpi_overhead_s, 1),
            "source": self.source,
        }

    def eval_seconds(self, work: dict) -> float:
        return sum(n * self.s_per_eval.get(kind, self.s_per_eval["generation"]) for kind, n in work["evals"].items())

    def seconds(self, work: dict) -> float:
        return work["steps"] * self.s_per_step + self.eval_seconds(work) + (self.cpi_overhead_s if work["cpi"] else 0)


def committed_rates() -> Optional[Rates]:
    """Rates measured by the committed real run (docs/results/cpi.json of this protocol), if it has them."""
    try:
        data = json.loads(COMMITTED_JSON.read_text())
        r = data["rates"]
        return Rates(
            float(r["s_per_step"]),
            {k: float(v) for k, v in r["s_per_eval_example"].items()},
            float(r["cpi_overhead_s"]),
            PRIOR_RATES["point"]["load_s"],
            f"measured by the run in {COMMITTED_JSON.relative_to(ROOT)}",
        )
    except (OSError, KeyError, TypeError, ValueError):
        return None


def print_estimate(parts: list[Part], done: dict, task_meta: dict, args, rates: Rates) -> dict:
    """The planned work and its duration; returns the numbers (also used by the progress lines)."""
    todo = [p for p in parts if p.key not in done]
    by_setting: dict[str, list[Part]] = {}
    for p in todo:
        by_setting.setdefault(p.key.rsplit("/", 1)[0], []).append(p)
    low_r, high_r = Rates.prior("low"), Rates.prior("high")
    if not rates.source.startswith("constants"):  # measured: ±20% around it
        low_r, high_r = rates.scaled(0.8), rates.scaled(1.2)
    total = {"point": 0.0, "low": 0.0, "high": 0.0, "steps": 0, "examples": 0}
    lines = []
    for setting, ps in by_setting.items():
        tasks = task_meta[setting.split("/")[0]]
        works = [part_work(p, tasks, args) for p in ps]
        point = sum(rates.seconds(w) for w in works)
        steps = sum(w["steps"] for w in works)
        examples = sum(sum(w["evals"].values()) for w in works)
        total["point"] += point
        total["low"] += sum(low_r.seconds(w) for w in works)
        total["high"] += sum(high_r.seconds(w) for w in works)
        total["steps"] += steps
        total["examples"] += examples
        lines.append(
            f"  {setting}: {', '.join(p.method for p in ps)}: {steps} optimizer steps, {examples} evaluated "
            f"examples: ~{_minutes(point)}"
        )
    per_inv = 60 * args.max_minutes - rates.load_s  # each invocation loads the model first
    n_inv = max(1, math.ceil(total["point"] / per_inv)) if todo and per_inv > 0 else 0
    print(
        f"Planned: {len(todo)} of {len(parts)} part(s) to run ({len(parts) - len(todo)} finished in the state): "
        f"{total['steps']} optimizer steps, {total['examples']} evaluated examples; estimated "
        f"~{_minutes(total['point'])} (range {_minutes(total['low'])}–{_minutes(total['high'])}) at "
        f"{rates.s_per_step:.2f} s/step, {rates.s_per_eval['generation']:.2f} s per generated and "
        f"{rates.s_per_eval['multiple_choice']:.2f} s per option-scored example ({rates.source})"
        + (f"; about {n_inv} invocation(s) of --max-minutes {args.max_minutes:g}" if n_inv else ""),
        flush=True,
    )
    if lines:
        print("\n".join(lines), flush=True)
    return {**total, "invocations": n_inv, "parts_todo": len(todo)}


# ------------------------------------------------------------------------------------------------ loading


def load_real_tasks(names: list[str], args) -> list[Task]:
    from peft_spectral.tasks import load_task

    tasks = [load_task(n, seed=args.seed) for n in names]
    for t in tasks:
        if len(t.test) < args.n_test:
            print(f"{t.name}: {len(t.test)} test examples (< --n-test {args.n_test}): the whole split is used")
    return tasks


def smoke_tasks() -> dict[str, list[Task]]:
    def task(name, fn, choices=None):
        ex = []
        for i in range(40):
            target = fn(i)
            if choices:
                ex.append(Example(prompt=f"{name}: {i}", target=target, choices=choices, label=choices.index(target)))
            else:
                ex.append(Example(prompt=f"{name}: {i}", target=target))
        kind = "multiple_choice" if choices else "generation"
        return Task(name=name, kind=kind, train=ex[10:], validation=[], test=ex[:10])

    return {
        "compatible": [
            task("parity", lambda i: "yes" if i % 2 else "no", ("yes", "no")),
            task("big", lambda i: "high" if i >= 20 else "low", ("high", "low")),
            task("third", lambda i: "true" if i % 3 == 0 else "false", ("true", "false")),
        ],
        "conflicting": [
            task("inc", lambda i: str(i + 1)),
            task("parity", lambda i: "yes" if i % 2 else "no", ("yes", "no")),
            task("rev", lambda i: str(i)[::-1]),
        ],
    }


def smoke_model():
    from tiny_model import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    return tiny_model(tok), tok


def setting_tasks(tasks: list[Task], fraction: float) -> list[Task]:
    """The tasks with the first `fraction` of their (capped) training examples (at least one)."""
    out = []
    for t in tasks:
        n = max(1, round(fraction * len(t.train)))
        out.append(dataclasses.replace(t, train=list(t.train[:n]), test=list(t.test)))
    return out


# ------------------------------------------------------------------------------------------------ state


def run_settings(args) -> dict:
    """What defines the results: a state is reused only by a run with the same settings."""
    return {
        "model": SMOKE_MODEL if args.smoke else EMBEDDED_MODEL,
        "tasks": {s: list(args.tasks[s]) for s in SCENARIOS},
        "budget_steps": args.budget,
        "probe_steps": args.probe_steps,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "p": args.p,
        "tau": args.tau,
        "stage_order": args.stage_order,
        "fusion": args.fusion,
        "n_train_cap": args.n_train,
        "n_test": args.n_test,
        "eval_batch": args.eval_batch,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
    }


def load_bench_state(path: Path, settings: dict) -> dict:
    fp = fingerprint(settings)
    try:
        state = load_state(path, what="bench_cpi state")
    except StateFileError as err:
        raise SystemExit(f"{err} (or pass --fresh)") from None
    if state is None:
        return {"version": STATE_VERSION, "fingerprint": fp, "settings": settings, "parts": {}}
    if state.get("fingerprint") != fp:
        old = state.get("settings", {})
        differ = ", ".join(f"{k}: {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v)
        raise SystemExit(
            f"{path} holds a run with other settings ({differ or 'unknown'}); pass --fresh to start over or another "
            "--state-dir"
        )
    return state


def clear_state(state_dir: Path) -> None:
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    for p in list(state_dir.glob("cpi_*")) + [state_dir / "trainer"]:
        if p.is_dir():
            shutil.rmtree(p)


# ------------------------------------------------------------------------------------------------ training


class RunMeter(TrainerCallback):
    """Per SFT run: the optimizer steps taken, the training set's size and the time; stops training at `deadline`."""

    def __init__(self, deadline: Optional[float] = None, on_run_end=None):
        self.deadline = deadline
        self.on_run_end = on_run_end
        self.records: list[dict] = []
        self.stopped = False
        self._t0 = 0.0
        self._size = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0 = time.time()
        loader = kwargs.get("train_dataloader")
        dataset = getattr(loader, "dataset", None)
        self._size = len(dataset) if dataset is not None else None

    def on_step_end(self, args, state, control, **kwargs):
        if self.deadline is not None and time.time() >= self.deadline:
            control.should_training_stop = True
            self.stopped = True

    def on_train_end(self, args, state, control, **kwargs):
        rec = {
            "steps": int(state.global_step),
            "dataset_size": self._size,
            "seconds": round(time.time() - self._t0, 2),
        }
        self.records.append(rec)
        if self.on_run_end is not None:
            self.on_run_end(rec)


class Progress:
    """ETA lines: the parts not started yet at the current rates, plus what the running part should still take."""

    def __init__(self, works: list[dict], rates: Rates):
        self.start = time.time()
        self.waiting = list(works)
        self.rates = rates  # replaced by measured rates as parts finish
        self.current: Optional[dict] = None
        self.current_start = self.start

    def begin(self, work: dict) -> None:
        if work in self.waiting:
            self.waiting.remove(work)
        self.current, self.current_start = work, time.time()

    def eta_s(self) -> float:
        left = sum(self.rates.seconds(w) for w in self.waiting)
        if self.current is not None:
            left += max(0.0, self.rates.seconds(self.current) - (time.time() - self.current_start))
        return left

    def line(self, what: str) -> None:
        print(f"[{_minutes(time.time() - self.start)} elapsed, ETA ~{_minutes(self.eta_s())}] {what}", flush=True)


class PartRun:
    """Bookkeeping of one part while it runs: SFT runs, evaluations and their times."""

    def __init__(self, ctx, part: Part, deadline: Optional[float]):
        self.ctx, self.part = ctx, part
        self.meter = RunMeter(deadline, on_run_end=self._run_done)
        self.eval: dict[str, dict] = {}
        self.eval_s = 0.0
        self.start = time.time()

    def _run_done(self, rec: dict) -> None:
        self.ctx.progress.line(
            f"{self.part.key}: SFT run {len(self.meter.records)} done, {rec['steps']} steps in {rec['seconds']:.0f} s"
            + (" (stopped by the time budget)" if self.meter.stopped else "")
        )

    def train(self, model, examples: list[Example], steps: int, label: str) -> dict:
        t0 = time.time()
        sft_train(
            model,
            self.ctx.tok,
            examples,
            self.ctx.cfg,
            steps=steps,
            output_dir=self.ctx.state_dir / "trainer",
            callbacks=[self.meter],
        )
        rec = dict(self.meter.records[-1], label=label, planned=steps, seconds=round(time.time() - t0, 2))
        self.meter.records[-1] = rec
        return rec

    def score(self, model, task: Task) -> list[int]:
        from peft_spectral.evaluation import evaluate

        t0 = time.time()
        res = evaluate(
            model,
            self.ctx.tok,
            task.test,
            kind=task.kind,
            batch_size=self.ctx.args.eval_batch,
            max_new_tokens=self.ctx.args.max_new_tokens,
        )
        seconds = time.time() - t0
        kind = "multiple_choice" if task.kind == "multiple_choice" else "generation"
        e = self.eval.setdefault(kind, {"examples": 0, "seconds": 0.0})
        e["examples"] += len(task.test)
        e["seconds"] = round(e["seconds"] + seconds, 2)
        self.eval_s += seconds
        self.ctx.progress.line(
            f"{self.part.key}: {task.name} scored {res.accuracy:.3f} on {len(task.test)} examples ({seconds:.0f} s)"
        )
        return [int(bool(c)) for c in res.correct]


@dataclass
class Context:
    model: torch.nn.Module
    tok: object
    args: argparse.Namespace
    cfg: CPIConfig
    state_dir: Path
    progress: Progress


def make_config(args) -> CPIConfig:
    return CPIConfig(
        adapter=CoreIsolationConfig(target_modules=MLP, core_fraction=args.p, similarity_threshold=args.tau),
        probe_steps=args.probe_steps,
        total_stage_steps=args.budget,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        max_length=args.max_length,
        stage_order=args.stage_order,
        fusion=args.fusion,
        seed=args.seed,
    )


def _wrap(ctx: Context):
    from peft import get_peft_model

    return get_peft_model(ctx.model, copy.deepcopy(ctx.cfg.adapter))


@torch.no_grad()
def _reset(peft_model) -> None:
    for n, p in peft_model.named_parameters():
        if "core_isolation_delta" in n:
            p.zero_()


def run_part(ctx: Context, part: Part, tasks: list[Task], deadline: Optional[float]) -> dict:
    """Train and score one part; returns its record (verdicts, SFT runs, times)."""
    from transformers import set_seed

    set_seed(ctx.args.seed)
    run = PartRun(ctx, part, deadline)
    names = [t.name for t in tasks]
    steps = per_task_steps(ctx.args.budget, len(tasks))
    final: dict[str, list[int]] = {}
    after: dict[str, list[int]] = {}
    earlier: list[str] = []
    probe_runs: list[dict] = []
    sft_runs: list[dict] = []
    extra: dict = {}
    probe_s = overhead_s = 0.0
    if part.method == "base":
        final = {t.name: run.score(ctx.model, t) for t in tasks}
    elif part.method in ("reference", "multitask", "naive_multistage"):
        peft_model = _wrap(ctx)
        try:
            if part.method == "reference":  # each task alone from the base model, its per-task share of S
                for k, t in enumerate(tasks):
                    _reset(peft_model)
                    sft_runs.append(run.train(peft_model, t.train, steps[k], f"single:{t.name}"))
                    final[t.name] = run.score(peft_model, t)
            elif part.method == "multitask":
                mix = mixed_examples([t.train for t in tasks], seed=ctx.args.seed)
                sft_runs.append(run.train(peft_model, mix, ctx.args.budget, "mixed"))
                final = {t.name: run.score(peft_model, t) for t in tasks}
            else:  # naive multi-stage: S/T steps per task, in order
                earlier = names[:-1]
                for k, t in enumerate(tasks):
                    sft_runs.append(run.train(peft_model, t.train, steps[k], f"stage:{k}:{t.name}"))
                    if k < len(tasks) - 1:
                        after[t.name] = run.score(peft_model, t)
                final = {t.name: run.score(peft_model, t) for t in tasks}
        finally:
            peft_model.unload()  # CoreIsolation never writes into the base weights while unmerged
    else:
        record_cpi = _run_cpi(ctx, run, part, tasks)
        final, after, earlier = record_cpi["final"], record_cpi["after"], record_cpi["earlier"]
        probe_runs, sft_runs, extra = record_cpi["probe_runs"], record_cpi["sft_runs"], record_cpi["extra"]
        probe_s, overhead_s = record_cpi["probe_s"], record_cpi["overhead_s"]
    total_s = time.time() - run.start
    train_s = sum(r["seconds"] for r in sft_runs) if part.method != "cpi_ft" else extra.pop("stage_train_s")
    return {
        "method": part.method,
        "scenario": part.scenario,
        "train_fraction": part.fraction,
        "tasks": [{"name": t.name, "kind": t.kind, "n_test": len(t.test), "n_train": len(t.train)} for t in tasks],
        "verdicts": {"final": final, "after_own": after},
        "earlier_tasks": earlier,
        "sft_runs": sft_runs,
        "probe_runs": probe_runs,
        "sft_steps": sum(r["steps"] for r in sft_runs),
        "planned_sft_steps": 0 if part.method == "base" else ctx.args.budget,
        "probe_steps": sum(r["steps"] for r in probe_runs),
        "stopped_early": bool(run.meter.stopped),
        "eval": run.eval,
        "timings_s": {
            "train_s": round(train_s, 1),
            "probe_s": round(probe_s, 1),
            "eval_s": round(run.eval_s, 1),
            "overhead_s": round(overhead_s, 1),
            "total_s": round(total_s, 1),
        },
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        **extra,
    }


def _run_cpi(ctx: Context, run: PartRun, part: Part, tasks: list[Task]) -> dict:
    by_name = {t.name: t for t in tasks}
    pipe_dir = ctx.state_dir / f"cpi_{part.scenario}_{fraction_key(part.fraction)}"
    if pipe_dir.exists():  # an interrupted part starts over
        shutil.rmtree(pipe_dir)
    after: dict[str, list[int]] = {}
    stage_eval_s = [0.0]

    def on_stage_end(pipe, k, group):
        if k < len(pipe.state["stage_order"]) - 1:
            t0 = time.time()
            for name in group:
                after[name] = run.score(pipe.model, by_name[name])
            stage_eval_s[0] += time.time() - t0

    t_start = time.time()
    pipe = CPIPipeline(
        ctx.model, ctx.tok, tasks, ctx.cfg, pipe_dir, progress=False, callbacks=[run.meter], on_stage_end=on_stage_end
    )
    try:
        rep = pipe.run()
        final = {t.name: run.score(pipe.model, t) for t in tasks}
    finally:
        pipe.model.unload()
    wall = time.time() - t_start
    order = rep["stage_order"]
    runs = [dict(rec, label=label) for label, rec in zip(pipe.trainer_runs, run.meter.records)]
    G = len(order)
    probe_runs = [dict(r, planned=ctx.cfg.probe_steps) for r in runs if r["label"].startswith("probe:")]
    sft_runs = [
        dict(r, planned=ctx.cfg.steps_for_stage(int(r["label"].split(":")[1]), G))
        for r in runs
        if r["label"].startswith("stage:")
    ]
    tim = rep["timings_s"] or {}
    probe_s = float(tim.get("probe", 0.0))
    stage_train_s = float(tim.get("staged", 0.0)) - stage_eval_s[0]
    overhead_s = max(0.0, wall - probe_s - stage_train_s - run.eval_s)  # cores, grouping, fusion, saving
    shutil.rmtree(pipe_dir, ignore_errors=True)  # a few hundred MB of deltas per task; the numbers are kept
    return {
        "final": final,
        "after": after,
        "earlier": [n for g in order[:-1] for n in g],
        "probe_runs": probe_runs,
        "sft_runs": sft_runs,
        "probe_s": probe_s,
        "overhead_s": overhead_s,
        "extra": {
            "stage_train_s": stage_train_s,
            "groups": rep["groups"],
            "stage_order": order,
            "jaccard": rep["jaccard"],
            "core_sizes": rep["core_sizes"],
            "frozen_counts": rep["frozen_counts"],
            "pipeline_timings_s": {k: round(v, 1) for k, v in tim.items()},
        },
    }


# ------------------------------------------------------------------------------------------------ analysis


def acc_entry(verdicts: list[int]) -> dict:
    ci = accuracy_ci(verdicts)
    return {"accuracy": ci.accuracy, "low": ci.low, "high": ci.high, "n": ci.n, "text": format_accuracy(ci)}


def comparison_entry(a: list[int], b: list[int]) -> dict:
    """B − A on the same examples (paired bootstrap CI, exact McNemar p)."""
    c = compare_paired(a, b)
    return {
        "delta": c.delta,
        "low": c.low,
        "high": c.high,
        "p_value": c.p_value,
        "n": c.n,
        "only_a": c.only_a,
        "only_b": c.only_b,
        "significant": c.significant,
        "text": format_comparison(c),
    }


def bootstrap_mean_ci(values: np.ndarray, *, n_resamples: int = 10_000, seed: int = 0, confidence: float = 0.95):
    """Percentile bootstrap interval of the mean of per-example values (the resampling of `stats`)."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.size, size=(n_resamples, values.size))
    means = values[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def pooled(verdicts: dict[str, list[int]], names: list[str]) -> list[int]:
    return [v for n in names for v in verdicts[n]]


def forgetting_entry(record: dict) -> Optional[dict]:
    """Forgetting = accuracy right after the task's own stage − final accuracy, over the earlier tasks' examples."""
    earlier = record["earlier_tasks"]
    if not earlier:
        return None
    v = record["verdicts"]
    per_task = {n: comparison_entry(v["final"][n], v["after_own"][n]) for n in earlier}
    return {
        "tasks": list(earlier),
        "per_task": per_task,
        "pooled": comparison_entry(pooled(v["final"], earlier), pooled(v["after_own"], earlier)),
        "after_own": {n: acc_entry(v["after_own"][n]) for n in earlier},
    }


def method_summary(record: dict, reference: Optional[dict]) -> dict:
    names = [t["name"] for t in record["tasks"]]
    final = {n: acc_entry(record["verdicts"]["final"][n]) for n in names}
    out = dict(record)
    out["final"] = final
    out["average"] = sum(e["accuracy"] for e in final.values()) / len(final)
    out["pooled"] = acc_entry(pooled(record["verdicts"]["final"], names))
    if reference is not None:
        ratios = {}
        for n in names:
            ref = float(np.mean(reference["verdicts"]["final"][n]))
            ratios[n] = final[n]["accuracy"] / ref if ref > 0 else None
        used = [r for r in ratios.values() if r is not None]
        out["normalised"] = {
            "per_task": ratios,
            "average": sum(used) / len(used) if used else None,
            "undefined_for": [n for n, r in ratios.items() if r is None],
        }
    else:
        out["normalised"] = None
    out["forgetting"] = forgetting_entry(record)
    return out


def forgetting_goal(naive: dict, cpi: dict) -> dict:
    common = [n for n in naive["earlier_tasks"] if n in cpi["earlier_tasks"]]
    if not common:
        return {
            "met": None,
            "note": "CPI-FT trained every task in its last stage (one group): no forgetting to compare",
        }
    nv, cv = naive["verdicts"], cpi["verdicts"]
    n_fg = np.array(pooled(nv["after_own"], common)) - np.array(pooled(nv["final"], common))
    c_fg = np.array(pooled(cv["after_own"], common)) - np.array(pooled(cv["final"], common))
    nf, cf = float(n_fg.mean()), float(c_fg.mean())
    diff_low, diff_high = bootstrap_mean_ci(n_fg - c_fg)
    half_low, half_high = bootstrap_mean_ci(0.5 * n_fg - c_fg)
    out = {
        "tasks": common,
        "n": int(n_fg.size),
        "naive": nf,
        "cpi": cf,
        "ratio": cf / nf if nf > 0 else None,
        "naive_minus_cpi": {"delta": nf - cf, "low": diff_low, "high": diff_high},
        "half_naive_minus_cpi": {"delta": 0.5 * nf - cf, "low": half_low, "high": half_high},
    }
    if nf <= 0:
        out.update(met=None, note="naive multi-stage SFT forgot nothing on these tasks (≤ 0): nothing to halve")
    else:
        out["met"] = bool(cf <= 0.5 * nf and diff_low > 0)
    return out


def average_goal(multitask: dict, cpi: dict) -> dict:
    names = [t["name"] for t in cpi["tasks"]]
    cmp = comparison_entry(pooled(multitask["verdicts"]["final"], names), pooled(cpi["verdicts"]["final"], names))
    return {"cpi_minus_multitask": cmp, "met": bool(cmp["delta"] >= 0)}


def build_results(state: dict, plan: list[Part], invocation: dict, rates: Optional[Rates]) -> dict:
    parts = state["parts"]
    scenarios: dict = {}
    for rec in parts.values():
        scen = scenarios.setdefault(rec["scenario"], {"tasks": None, "base": None, "settings": {}})
        scen["tasks"] = scen["tasks"] or [{k: t[k] for k in ("name", "kind", "n_test")} for t in rec["tasks"]]
        if rec["method"] != "base":
            fk = fraction_key(rec["train_fraction"])
            scen["settings"].setdefault(
                fk,
                {
                    "train_fraction": rec["train_fraction"],
                    "n_train": {t["name"]: t["n_train"] for t in rec["tasks"]},
                    "methods": {},
                },
            )
    for name, scen in scenarios.items():
        if f"{name}/base" in parts:
            scen["base"] = method_summary(parts[f"{name}/base"], None)
        for fk, setting in scen["settings"].items():
            ref = parts.get(f"{name}/{fk}/reference")
            if scen["base"] is not None and ref is not None:
                setting["base_normalised"] = method_summary(parts[f"{name}/base"], ref)["normalised"]
            for m in METHODS:
                rec = parts.get(f"{name}/{fk}/{m}")
                if rec is not None:
                    setting["methods"][m] = method_summary(rec, ref)
            ms = setting["methods"]
            setting["complete"] = all(m in ms for m in METHODS)
            goals = {}
            if "naive_multistage" in ms and "cpi_ft" in ms:
                goals["forgetting"] = forgetting_goal(
                    parts[f"{name}/{fk}/naive_multistage"], parts[f"{name}/{fk}/cpi_ft"]
                )
            if "multitask" in ms and "cpi_ft" in ms:
                goals["average"] = average_goal(parts[f"{name}/{fk}/multitask"], parts[f"{name}/{fk}/cpi_ft"])
            setting["goals"] = goals
    measured = Rates.measured(list(parts.values()), "measured in this state")
    return {
        "setup": state["settings"],
        "rates": (measured or rates or Rates.prior()).as_dict(),
        "scenarios": scenarios,
        "missing": [p.key for p in plan if p.key not in parts],
        "invocation": invocation,
    }


# ------------------------------------------------------------------------------------------------ report


def _goal_word(met: Optional[bool]) -> str:
    return "n/a" if met is None else ("met" if met else "not met")


def markdown(results: dict) -> str:
    s = results["setup"]
    inv = results["invocation"]
    lines = [
        "# CPI-FT benchmark",
        "",
        (
            f"Model: {s['model']}. Trained by every method: CoreIsolation deltas of gate/up/down_proj; AdamW, lr "
            f"{s['lr']}, weight decay {s['weight_decay']}, batch {s['batch_size']}, max length {s['max_length']}. "
            f"**Same SFT budget for every method: S = {s['budget_steps']} optimizer steps** (single-task reference and "
            f"naive multi-stage: S/T per task; CPI-FT: S shared by its stages), CPI-FT's T probes of P = "
            f"{s['probe_steps']} steps **outside** the budget (timed separately). p = {s['p']}, τ = {s['tau']}, stage "
            f"order {s['stage_order']}, fusion {s['fusion']}. At most {s['n_train_cap']} training and {s['n_test']} test "
            f"examples per task; generation with {s['max_new_tokens']} new tokens, multiple choice by option "
            f"log-likelihood."
        ),
        "",
        (
            "Cells: test accuracy [95% Wilson interval] (n). *Norm. avg*: per task the method's accuracy divided by the "
            "single-task SFT reference's accuracy (same setting, same per-task budget), averaged over tasks (the seed "
            'names an "Avg. Norm. Score" without a formula; tasks where the reference scores 0 are left out and '
            "named). *Forgetting*: accuracy right after the stage that trained a task − its final accuracy over the test "
            "examples of the tasks trained before the last stage, paired bootstrap 95% CI and exact McNemar p "
            "(positive = forgot)."
        ),
        "",
    ]
    if results["missing"]:
        lines += [
            f"**Unfinished**: {len(results['missing'])} part(s) not run yet: {', '.join(results['missing'])}.",
            "",
        ]
    for scen_name in SCENARIOS:
        scen = results["scenarios"].get(scen_name)
        if scen is None:
            continue
        names = [t["name"] for t in scen["tasks"]]
        lines += [
            f"## Scenario: {scen_name} — {SCENARIO_TEXT[scen_name]}",
            "",
            "Tasks: " + ", ".join(f"`{t['name']}` ({t['kind']}, n={t['n_test']})" for t in scen["tasks"]) + ".",
            "",
        ]
        for fk in sorted(scen["settings"], key=lambda k: -float(k)):
            setting = scen["settings"][fk]
            frac = setting["train_fraction"]
            title = "full training data" if frac == 1 else f"reduced data: {frac:g} of each task's training examples"
            lines += [
                f"### {scen_name}, {title} (training examples per task: "
                + ", ".join(f"{n} {c}" for n, c in setting["n_train"].items())
                + ")",
                "",
                "| method | " + " | ".join(names) + " | average | norm. avg | forgetting | SFT steps | probe steps "
                "| probe time | SFT time | total wall |",
                "|---" * (len(names) + 9) + "|",
            ]
            rows = []
            if scen["base"] is not None:
                rows.append(("base", dict(scen["base"], normalised=setting.get("base_normalised"))))
            rows += [(m, setting["methods"][m]) for m in METHODS if m in setting["methods"]]
            for m, r in rows:
                norm = r.get("normalised") or {}
                fg = r.get("forgetting")
                t = r["timings_s"]
                steps = f"{r['sft_steps']}" + (" (stopped early)" if r.get("stopped_early") else "")
                lines.append(
                    f"| {LABELS[m]} | "
                    + " | ".join(r["final"][n]["text"] for n in names)
                    + f" | {r['average']:.3f} | "
                    + _fmt_norm(norm, len(names))
                    + " | "
                    + ("–" if fg is None else fg["pooled"]["text"])
                    + f" | {steps} | {r.get('probe_steps', 0) or '–'} | "
                    + (_minutes(t["probe_s"]) if r.get("probe_steps") else "–")
                    + f" | {_minutes(t['train_s'])} | {_minutes(t['total_s'])} |"
                )
            lines.append("")
            g = setting["goals"]
            fg_goal, avg_goal = g.get("forgetting"), g.get("average")
            if fg_goal is not None:
                if "naive" in fg_goal:
                    d, h = fg_goal["naive_minus_cpi"], fg_goal["half_naive_minus_cpi"]
                    detail = (
                        f"CPI-FT {fg_goal['cpi']:+.3f} vs naive {fg_goal['naive']:+.3f} on {', '.join(fg_goal['tasks'])} "
                        f"(n={fg_goal['n']}); naive − CPI-FT {d['delta']:+.3f} [{d['low']:+.2f}, {d['high']:+.2f}]; "
                        f"½·naive − CPI-FT {h['delta']:+.3f} [{h['low']:+.2f}, {h['high']:+.2f}]"
                        + (f"; {fg_goal['note']}" if fg_goal.get("note") else "")
                    )
                else:
                    detail = fg_goal["note"]
                lines.append(
                    f"- Goal: CPI-FT forgetting ≤ ½ naive multi-stage SFT's, CI of the difference excluding 0: "
                    f"**{_goal_word(fg_goal['met'])}** ({detail})."
                )
            if avg_goal is not None:
                c = avg_goal["cpi_minus_multitask"]
                ms = setting["methods"]
                na = ms["cpi_ft"]["normalised"] or {}
                nm = ms["multitask"]["normalised"] or {}
                lines.append(
                    f"- Goal: CPI-FT average ≥ multi-task SFT's (paired over the {c['n']} pooled test examples): "
                    f"**{_goal_word(avg_goal['met'])}** (CPI-FT − multi-task {c['text']}; normalised averages "
                    f"{_fmt_norm(na)} vs {_fmt_norm(nm)})."
                )
            for m in ("naive_multistage", "cpi_ft"):
                r = setting["methods"].get(m)
                if r is not None and r.get("forgetting"):
                    per = "; ".join(
                        f"{n}: {r['forgetting']['after_own'][n]['accuracy']:.3f} → {r['final'][n]['accuracy']:.3f} "
                        f"({e['text']})"
                        for n, e in r["forgetting"]["per_task"].items()
                    )
                    lines.append(f"- {LABELS[m]}, right after own stage → final: {per}.")
            cpi = setting["methods"].get("cpi_ft")
            if cpi is not None:
                lines.append(
                    f"- CPI-FT groups (τ = {s['tau']}): {cpi['groups']}; stage order {cpi['stage_order']}; core sizes "
                    f"{cpi['core_sizes']}; frozen entries per stage {cpi['frozen_counts']}; Jaccard "
                    + "; ".join(
                        f"{names[i]}–{names[j]} {cpi['jaccard'][i][j]:.3f}"
                        for i in range(len(names))
                        for j in range(i + 1, len(names))
                    )
                    + "."
                )
            stopped = [LABELS[m] for m, r in setting["methods"].items() if r.get("stopped_early")]
            if stopped:
                lines.append(
                    f"- **Stopped early by the time budget** (fewer SFT steps than S = {s['budget_steps']}; the "
                    f"comparison is not at one budget): {', '.join(stopped)}."
                )
            lines.append("")
    r = results["rates"]
    lines += [
        f"Measured rates: {r['s_per_step']:.2f} s per optimizer step (probes included), "
        f"{r['s_per_eval_example'].get('generation', float('nan')):.3f} s per generated and "
        f"{r['s_per_eval_example'].get('multiple_choice', float('nan')):.3f} s per option-scored example, CPI-FT "
        f"cores + grouping + fusion {r['cpi_overhead_s']:.0f} s ({r['source']}). Last invocation: "
        f"{inv.get('parts_run', 0)} part(s) in {_minutes(inv.get('wall_s', 0.0))}"
        + (" (stopped by --max-minutes)" if inv.get("stopped_by_budget") else "")
        + f"; {inv.get('machine', '')}.",
        "",
    ]
    return "\n".join(lines)


def _fmt_norm(norm: Optional[dict], n_tasks: Optional[int] = None) -> str:
    """The normalised average; with `n_tasks`, how many tasks it covers when the reference scored 0 on some."""
    if not norm or norm.get("average") is None:
        return "–"
    left_out = len(norm.get("undefined_for") or [])
    return f"{norm['average']:.3f}" + (f" ({n_tasks - left_out} of {n_tasks} tasks)" if n_tasks and left_out else "")


def plot(results: dict, path: Path) -> None:
    from peft_spectral.plots import ci_bars, pyplot, save_figure

    plt = pyplot("the CPI-FT benchmark's plot", required=False)
    if plt is None:
        return
    panels = [
        (scen_name, fk)
        for scen_name in SCENARIOS
        if scen_name in results["scenarios"]
        for fk in sorted(results["scenarios"][scen_name]["settings"], key=lambda k: -float(k))
    ]
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.6 * len(panels)), squeeze=False)
    for ax, (scen_name, fk) in zip(axes[:, 0], panels):
        scen = results["scenarios"][scen_name]
        setting = scen["settings"][fk]
        names = [t["name"] for t in scen["tasks"]]
        groups = [n.split("/")[-1] for n in names] + ["pooled"]
        series = {}
        rows = ([("base", scen["base"])] if scen["base"] is not None else []) + [
            (m, setting["methods"][m]) for m in METHODS if m in setting["methods"]
        ]
        for m, r in rows:
            series[LABELS[m]] = [r["final"][n] for n in names] + [r["pooled"]]
        ci_bars(ax, groups, series)
        ax.set_xticks(range(len(groups)), groups)
        ax.set_ylim(0, 1.25)  # room for the legend above the bars
        ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        ax.set_ylabel("test accuracy (95% CI)")
        ax.set_title(f"{scen_name}, train fraction {fk}: same SFT budget S = {results['setup']['budget_steps']}")
        ax.legend(fontsize=7, ncol=5, loc="upper center")
    save_figure(fig, path)


def write_outputs(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "cpi.json", results)
    (out / "cpi.md").write_text(markdown(results))
    try:
        plot(results, out / "cpi.png")
    except ImportError:  # pragma: no cover
        logger.warning("matplotlib missing: no plot")


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", choices=("compatible", "conflicting", "both"), default="both")
    ap.add_argument("--compatible-tasks", nargs="+", default=DEFAULT_TASKS["compatible"])
    ap.add_argument("--conflicting-tasks", nargs="+", default=DEFAULT_TASKS["conflicting"])
    ap.add_argument(
        "--train-fraction",
        type=float,
        nargs="+",
        default=[1.0],
        help="fractions of each task's training examples, each its own setting (e.g. 1 0.25)",
    )
    ap.add_argument("--budget", type=int, default=None, help="SFT optimizer steps per method, S (default 120)")
    ap.add_argument(
        "--probe-steps", type=int, default=None, help="CPI-FT probe steps per task, P, outside S (default 40 = S/T)"
    )
    ap.add_argument("--lr", type=float, default=None, help="learning rate (default 2e-4; --smoke: 5e-2)")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--p", type=float, default=0.01, help="core fraction")
    ap.add_argument("--tau", type=float, default=0.1, help="Jaccard threshold of the grouping")
    ap.add_argument("--n-train", type=int, default=300, help="cap on each task's training examples")
    ap.add_argument("--n-test", type=int, default=None, help="test examples per task (default 100)")
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--stage-order", default="input", choices=STAGE_ORDERS)
    ap.add_argument("--fusion", default="slerp_params", choices=FUSION_MODES)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-minutes", type=float, default=45.0, help="wall-time budget of this invocation")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="finished parts, for resuming (default runs/bench_cpi_state; --smoke: OUT/cpi_smoke_state)",
    )
    ap.add_argument("--out", type=Path, default=None, help=f"default docs/results; --smoke: {SMOKE_OUT}")
    ap.add_argument("--fresh", action="store_true", help="delete the state and start over")
    ap.add_argument("--redo-stopped", action="store_true", help="run again the parts stopped by the time budget")
    ap.add_argument("--estimate-only", action="store_true", help="print the expected duration (task data only)")
    ap.add_argument("--report-only", action="store_true", help="only rebuild cpi.{json,md,png} from the state")
    ap.add_argument("--smoke", action="store_true", help="tiny random model + synthetic tasks (seconds)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.budget = 12 if args.budget is None else args.budget
        args.probe_steps = 4 if args.probe_steps is None else args.probe_steps
        args.lr = 5e-2 if args.lr is None else args.lr
        args.n_test = 10 if args.n_test is None else args.n_test
        args.max_new_tokens = 4
        args.compatible_tasks = [t.name for t in smoke_tasks()["compatible"]]
        args.conflicting_tasks = [t.name for t in smoke_tasks()["conflicting"]]
        out = (args.out or SMOKE_OUT).resolve()
        if out == (ROOT / "docs" / "results").resolve():
            raise SystemExit("--smoke never writes into docs/results (the committed results); pass another --out")
        args.out = out
    else:
        args.budget = 120 if args.budget is None else args.budget
        args.lr = 2e-4 if args.lr is None else args.lr
        args.probe_steps = 40 if args.probe_steps is None else args.probe_steps
        args.n_test = 100 if args.n_test is None else args.n_test
        args.out = args.out or ROOT / "docs" / "results"
    args.tasks = {"compatible": args.compatible_tasks, "conflicting": args.conflicting_tasks}
    if args.state_dir is None:
        args.state_dir = args.out / "cpi_smoke_state" if args.smoke else ROOT / "runs" / "bench_cpi_state"
    fractions = []
    for f in args.train_fraction:
        if not 0 < f <= 1:
            raise SystemExit(f"--train-fraction must be in (0, 1], got {f}")
        if f not in fractions:
            fractions.append(f)
    args.train_fraction = fractions
    if args.max_minutes < 0:
        raise SystemExit(f"--max-minutes must be >= 0, got {args.max_minutes}")
    for s in SCENARIOS:
        if len(args.tasks[s]) < 2 or len(set(args.tasks[s])) != len(args.tasks[s]):
            raise SystemExit(f"--{s}-tasks needs at least two distinct tasks, got {args.tasks[s]}")
        if args.budget < len(args.tasks[s]):
            raise SystemExit(f"--budget {args.budget} is smaller than the {len(args.tasks[s])} tasks of {s}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.time()
    state_dir: Path = args.state_dir
    if args.fresh and state_dir.exists():
        clear_state(state_dir)
    settings = run_settings(args)
    state_path = state_dir / STATE_FILE
    state = load_bench_state(state_path, settings)
    if args.redo_stopped:
        for key in [k for k, r in state["parts"].items() if r.get("stopped_early")]:
            del state["parts"][key]
    scenarios = list(SCENARIOS) if args.scenario == "both" else [args.scenario]
    plan = planned_parts(scenarios, args.train_fraction)
    machine = f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}"

    if args.report_only:
        write_outputs(build_results(state, plan, {"report_only": True, "machine": machine}, None), args.out)
        print(f"report rebuilt from {state_path} -> {args.out}")
        return 0

    # tasks: data only (no model) until there is something to train
    if args.smoke:
        all_tasks = smoke_tasks()
        scenario_tasks = {s: all_tasks[s] for s in scenarios}
    else:
        scenario_tasks = {s: load_real_tasks(args.tasks[s], args) for s in scenarios}
    for tasks in scenario_tasks.values():
        for t in tasks:
            t.train = list(t.train[: args.n_train])
            t.test = list(t.test[: args.n_test])
    task_meta = {
        s: [{"name": t.name, "kind": t.kind, "n_test": len(t.test)} for t in ts] for s, ts in scenario_tasks.items()
    }
    state_rates = Rates.measured(list(state["parts"].values()), f"measured in {state_path}")
    rates = state_rates or (None if args.smoke else committed_rates()) or Rates.prior()
    estimate = print_estimate(plan, state["parts"], task_meta, args, rates)
    if args.estimate_only:
        return 0

    todo = [p for p in plan if p.key not in state["parts"]]
    for p in plan:
        if p.key in state["parts"]:
            print(f"{p.key}: finished in an earlier run (reused)", flush=True)
    invocation = {"parts_run": 0, "stopped_by_budget": False, "machine": machine, "estimate_s": estimate["point"]}
    if todo:
        if args.smoke:
            model, tok = smoke_model()
        else:
            from peft_spectral.assets import load_default_model

            model, tok = load_default_model()  # the GGUF quantizer flag is already dropped there, so Trainer trains it
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        budget_s = 60.0 * args.max_minutes
        progress = Progress([part_work(p, task_meta[p.scenario], args) for p in todo], rates)
        ctx = Context(model, tok, args, make_config(args), state_dir, progress)
        for i, part in enumerate(todo):
            work = part_work(part, task_meta[part.scenario], args)
            est = rates.seconds(work)
            remaining = budget_s - (time.time() - t_start)
            if invocation["parts_run"] and (remaining <= 0 or (est <= budget_s and est > remaining)):
                left = todo[i:]
                invocation["stopped_by_budget"] = True
                print(
                    f"time budget (--max-minutes {args.max_minutes:g}) reached: {len(left)} part(s) left "
                    f"(~{_minutes(sum(rates.seconds(part_work(p, task_meta[p.scenario], args)) for p in left))}); "
                    "run the same command again to continue",
                    flush=True,
                )
                break
            reserve = rates.eval_seconds(work) + (rates.cpi_overhead_s if work["cpi"] else 0.0)
            deadline = t_start + budget_s - reserve if work["steps"] else None
            progress.begin(work)
            progress.line(f"{part.key}: starting (~{_minutes(est)})")
            base_tasks = scenario_tasks[part.scenario]
            tasks = base_tasks if part.method == "base" else setting_tasks(base_tasks, part.fraction)
            record = run_part(ctx, part, tasks, deadline)
            state["parts"][part.key] = record
            write_json_atomic(state_path, state)
            invocation["parts_run"] += 1
            progress.line(
                f"{part.key}: done in {_minutes(record['timings_s']['total_s'])}"
                + (" (stopped early by the time budget)" if record["stopped_early"] else "")
            )
            measured = Rates.measured(list(state["parts"].values()), "measured in this run")
            rates = progress.rates = measured or rates
    else:
        print("all parts done: nothing to run", flush=True)
    invocation["wall_s"] = round(time.time() - t_start, 1)
    results = build_results(state, plan, invocation, rates)
    write_outputs(results, args.out)
    left = results["missing"]
    print(
        f"{'all parts done' if not left else f'{len(left)} part(s) left'}; report -> {args.out / 'cpi.md'}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
