"""Benchmark of Transformer² inference with the committed SVF experts: does adaptation help on unseen tasks, and
does "others" keep it from hurting?

Strategies, each scored on the test splits of BigBench tasks that no expert covers (greedy generated answers judged as
in the experts' own evaluation, `--answer-mode generate`, the default; or the option with the highest log-likelihood,
`--answer-mode loglik`):

* **base**: the unadapted model;
* **prompt dispatch** and **classifier dispatch**: pass 1 (the base model, or the classifier expert trained with an
  `others` class) picks an expert or `others` (the base model) per prompt, with the `others` threshold fitted on
  validation prompts; pass 2 answers with that choice;
* **CEM**: few-shot mixing weights α found by the regularised CEM on shots from the task's train split.

Reported: accuracy [95% Wilson CI] (and balanced accuracy) per task and strategy; Δ vs base with a paired 95%
bootstrap CI and McNemar's p (`peft_spectral.stats.compare_paired`); dispatch accuracy with CIs on the experts' own
test splits and on the unseen tasks (right answer `others`); on the experts' own tasks, the oracle (always the right
expert) and how much of its gain dispatch recovers; time ratios (pass 1 / pass 2 for multiple choice and for
generation, grouped vs mixed-adapter pass 2); CEM evaluations per second; the issue's goals, each met or not. Writes
`transformer2.json`, `transformer2.md` and `transformer2.png` (and the CEM curves `cem_fitness.png`) to `--output`.

The experts are read from `--experts-dir/*/expert.json` (key `task`: the BigBench task; `description`); they are
never trained unless `--train-experts` asks for it. The three task sets — experts, unseen (scored), `others`
(classifier training and threshold fitting) — are disjoint (checked), and within a task the shots (train), the
validation prompts and the test examples never overlap (checked).

Resumable: every finished piece of work (classifier, pass-1 scores, per-example answers, CEM searches, timings) is
written to `--work-dir/state.json`; re-running the same command skips it. Progress lines give an ETA.

Usage::

    python benchmarks/bench_transformer2.py --threads 2          # the embedded model, ~25-30 min on 2 CPU cores
    python benchmarks/bench_transformer2.py --smoke --output /tmp/t2-smoke   # tiny random model, seconds

Sizing of the defaults (SmolLM2-135M, 1-2 CPU threads; docs/results/transformer2.md measured 0.47 s per base-model
example and 0.73 s per adapted example on a loaded machine): 4 unseen tasks × 100 test examples scored by the base
model and the CEM mixture, plus the experts chosen by dispatch; 4 expert tasks × 50 test examples scored by the base
model and the right expert; pass 1 on ~770 prompts per dispatcher (cut to 32 question tokens); the classifier (8 steps
× 4); CEM sized to `--cem-seconds` per task from the measured time per example; two short timing runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch


REPO = Path(__file__).resolve().parents[1]
#: The hand-written reading of the committed results (the tables are generated)
READING = REPO / "benchmarks" / "transformer2_reading.md"
sys.path.insert(0, str(REPO))

from peft_spectral import stats  # noqa: E402
from peft_spectral.evaluation import generate_answers, score_prediction  # noqa: E402
from peft_spectral.expert_eval import DEFAULT_MAX_NEW_TOKENS  # noqa: E402
from peft_spectral.option_scoring import encode_examples, score_option_ids  # noqa: E402
from peft_spectral.plots import ci_bar_chart, pyplot, save_figure  # noqa: E402
from peft_spectral.prompting import pad_token_id  # noqa: E402
from peft_spectral.state import fingerprint, load_state, write_json_atomic  # noqa: E402
from peft_spectral.tasks import Example, Task, load_task  # noqa: E402
from peft_spectral.transformer2 import (  # noqa: E402
    OTHERS,
    CEMConfig,
    DispatchPrompt,
    ExpertLibrary,
    FewShotMixer,
    PromptDispatcher,
    build_classifier_examples,
    decide_categories,
    dispatch_report,
    expert_name,
    find_experts,
    fit_threshold,
    train_classifier_expert,
    two_pass_evaluate,
    two_pass_generate,
)


logger = logging.getLogger("bench_transformer2")

#: Scored unseen tasks: docs/results/probe.md's "keep free of experts" list (multiple choice, test >= 193).
DEFAULT_UNSEEN = ["sports_understanding", "strategyqa", "winowhy", "epistemic_reasoning"]
#: Tasks for the classifier's `others` class and the threshold fit: yet other BigBench tasks (short prompts).
DEFAULT_OTHERS = ["anachronisms", "snarks", "hyperbaton", "date_understanding"]
STRATEGIES = ("base", "prompt_dispatch", "classifier_dispatch", "cem")
DISPATCHERS = ("prompt_dispatch", "classifier_dispatch")
CLASSIFIER = "t2_classifier"


# ------------------------------------------------------------------------------------------------ experts and tasks


def short_description(text: str, limit: int = 90) -> str:
    """First sentence of a task description, at most `limit` characters."""
    text = " ".join(text.split())
    first = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    return first if len(first) <= limit else first[: limit - 3].rstrip() + "..."


def train_quick_experts(model, tok, tasks: list[str], out_root: Path, steps: int, batch_size: int) -> None:
    """Train one small SVF-SFT expert per task into `out_root/<task>/` (only with `--train-experts`)."""
    import copy

    from peft_spectral import SVFConfig
    from peft_spectral.training import train_svf

    for name in tasks:
        target = out_root / expert_name(name)
        if (target / "expert.json").is_file():
            logger.info("expert %s exists, skipped", name)
            continue
        task = load_task(name, seed=0)
        start = time.perf_counter()
        result = train_svf(
            copy.deepcopy(model),
            tok,
            task,
            method="sft",
            output_dir=str(out_root / f".ckpt-{expert_name(name)}"),
            max_steps=steps,
            svf_config=SVFConfig(target_modules=["gate_proj", "up_proj", "down_proj"]),
            per_device_train_batch_size=batch_size,
            max_length=256,
            learning_rate=5e-3,
        )
        result.model.save_pretrained(str(target))
        meta = {
            "task": name,
            "description": short_description(task.description),
            "kind": task.kind,
            "trained": f"SVF-SFT, {steps} steps x {batch_size}, lr 5e-3 (bench_transformer2 --train-experts)",
        }
        (target / "expert.json").write_text(json.dumps(meta, indent=1))
        logger.info("trained expert %s in %.0fs", name, time.perf_counter() - start)


def check_disjoint(expert_tasks: Sequence[str], unseen: Sequence[str], others: Sequence[str]) -> None:
    """The expert, unseen and `others` task sets must not share a task (the benchmark's validity rests on it)."""
    sets = {"expert": set(expert_tasks), "unseen": set(unseen), "others": set(others)}
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            both = sets[a] & sets[b]
            if both:
                raise SystemExit(f"the {a} and {b} task sets share {sorted(both)}; they must be disjoint")
    assert not (sets["expert"] & sets["unseen"]) and not (sets["others"] & (sets["expert"] | sets["unseen"]))


def check_splits_disjoint(name: str, parts: dict[str, Sequence[Example]]) -> None:
    """No prompt is in two of the parts used from one task (shots/train, validation, test)."""
    seen: dict[str, str] = {}
    for part, exs in parts.items():
        for ex in exs:
            key = " ".join(ex.prompt.split())
            if key in seen and seen[key] != part:
                raise SystemExit(f"task {name}: a prompt is both in {seen[key]} and in {part}: {ex.prompt[:80]!r}")
            seen[key] = part


def smoke_setup(work: Path, seed: int):
    """Tiny random model, two random experts and synthetic tasks (no download, seconds)."""
    sys.path.insert(0, str(REPO / "examples"))
    from peft import get_peft_model
    from tiny_model import tiny_model, tiny_tokenizer

    from peft_spectral import SVFConfig

    tok = tiny_tokenizer()

    def make_task(name: str, n: int) -> Task:
        labels = [int((7 * i + len(name)) % 5 < 2) for i in range(3 * n)]  # ~40% "no": a constant pick is not 50%
        rows = [
            Example(
                prompt=f"{name}: is {i} a nice number? A. yes B. no",
                target=("yes", "no")[y],
                choices=("yes", "no"),
                label=y,
            )
            for i, y in enumerate(labels)
        ]
        return Task(name, "multiple_choice", rows[:n], rows[n : 2 * n], rows[2 * n :], f"{name} questions.")

    experts_root = work / "experts"
    for k, name in enumerate(("alpha_task", "beta_task"), start=1):
        folder = experts_root / name
        if (folder / "expert.json").is_file():
            continue
        base = tiny_model(tok, seed=seed)
        base.name_or_path = "tiny-llama"
        model = get_peft_model(base, SVFConfig(target_modules=["gate_proj", "up_proj", "down_proj"]))
        gen = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for _, layer in model.base_model.svf_layers():
                z = layer.svf_z["default"]
                z.copy_(1 + 0.5 * torch.randn(z.shape, generator=gen))
        model.save_pretrained(str(folder))
        (folder / "expert.json").write_text(json.dumps({"task": name, "description": f"{name} questions"}))
    tasks = {n: make_task(n, 24) for n in ("alpha_task", "beta_task", "u1", "u2", "u3", "u4", "o1", "o2")}
    model = tiny_model(tok, seed=seed)
    model.name_or_path = "tiny-llama"
    return model.eval(), tok, experts_root, tasks.__getitem__


# ----------------------------------------------------------------------------------------------- state and progress


class Progress:
    """The resumable state file and the progress/ETA lines.

    `units` are example forwards (pass 2 = 1, pass 1 = `PASS1_UNITS`); the ETA is the remaining units at the
    seconds per unit measured in this run, plus the remaining CEM budgets and classifier training.
    """

    PASS1_UNITS = 0.4

    def __init__(self, path: Path, fp: str, fresh: bool):
        self.path = path
        state = None if fresh else load_state(path, fp, what="transformer2 benchmark state")
        self.data: dict[str, Any] = state or {"fingerprint": fp, "answers": {}, "pass1": {}, "cem": {}, "steps": {}}
        self.start = time.perf_counter()
        self.done_units = 0.0
        self.work_seconds = 0.0
        self.planned_units = 0.0
        self.planned_seconds = 0.0

    def save(self) -> None:
        write_json_atomic(self.path, self.data)

    def skip(self, units: float) -> None:
        """Work found done in the state file: no longer planned."""
        self.planned_units = max(0.0, self.planned_units - units)

    def did(self, units: float, seconds: float) -> None:
        self.done_units += units
        self.work_seconds += seconds
        self.planned_units = max(0.0, self.planned_units - units)

    def report(self, what: str) -> None:
        spu = self.work_seconds / self.done_units if self.done_units else 0.4
        left = self.planned_units * spu + self.planned_seconds
        elapsed = time.perf_counter() - self.start
        logger.info("[%5.1f min elapsed, ~%4.1f min left] %s", elapsed / 60, left / 60, what)


# ------------------------------------------------------------------------------------------------------ the work


class Bench:
    """The benchmark's pieces of work, each cached in the state file."""

    def __init__(self, args, library: ExpertLibrary, progress: Progress, tasks: dict[str, Task]):
        self.args = args
        self.library = library
        self.progress = progress
        self.tasks = tasks
        self.tok = library.tokenizer
        self.pad = pad_token_id(self.tok, library.model)
        self.prompt = DispatchPrompt(max_question_tokens=args.max_question_tokens)
        self.adapter_seconds: dict[str, list[float]] = {"base": [0.0, 0], "adapter": [0.0, 0]}

    # ----------------------------------------------------------------- per-example answers (pass 2), cached
    def answers(self, adapter: Optional[str], key: str, task: str, split: str, exs: Sequence[Example], indices):
        """Picked option per example index for `adapter` (`None`: base); computes the missing ones in chunks."""
        store = self.progress.data["answers"].setdefault(f"{key}|{task}|{split}", {})
        missing = [i for i in sorted(set(indices)) if str(i) not in store]
        self.progress.skip(len(set(indices)) - len(missing))
        chunk = self.args.chunk
        generate = self.args.answer_mode == "generate" or not all(ex.choices for ex in exs)
        for start in range(0, len(missing), chunk):
            idx = missing[start : start + chunk]
            group = [exs[i] for i in idx]
            t0 = time.perf_counter()
            if generate:
                with self.library.use(adapter):
                    texts = generate_answers(
                        self.library.model,
                        self.tok,
                        group,
                        max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
                        batch_size=self.args.batch_size,
                    )
                kind = self.tasks[task].kind
                picks = [gold_pick(ex, score_prediction(kind, text, ex)) for ex, text in zip(group, texts)]
            else:
                prompts, options = encode_examples(self.tok, group)
                with self.library.use(adapter):
                    scores = score_option_ids(
                        self.library.model, prompts, options, pad_id=self.pad, batch_size=self.args.batch_size
                    )
                picks = [int(pick) for pick in scores.argmax()]
            seconds = time.perf_counter() - t0
            for i, pick in zip(idx, picks):
                store[str(i)] = pick
            acc = self.adapter_seconds["base" if adapter is None else "adapter"]
            acc[0] += seconds
            acc[1] += len(idx)
            self.progress.did(len(idx), seconds)
            self.progress.save()
            self.progress.report(f"pass 2 {key} on {task}/{split}: {len(store)} answers ({seconds:.1f} s)")
        return {i: store[str(i)] for i in indices}

    def seconds_per_example(self, adapted: bool) -> Optional[float]:
        secs, n = self.adapter_seconds["adapter" if adapted else "base"]
        return secs / n if n else None

    # ----------------------------------------------------------------- pass-1 category scores, cached
    def pass1(self, label: str, dispatcher: PromptDispatcher, task: str, split: str, exs: Sequence[Example]):
        key = f"{label}|{task}|{split}"
        store = self.progress.data["pass1"]
        if key not in store or len(store[key]["scores"]) < len(exs):
            t0 = time.perf_counter()
            scores = dispatcher.scores(self.library, exs)
            seconds = time.perf_counter() - t0
            store[key] = {"scores": scores, "seconds": seconds, "tokens": dispatcher.last_tokens_run}
            self.progress.did(self.progress.PASS1_UNITS * len(exs), seconds)
            self.progress.save()
            self.progress.report(f"pass 1 {label} on {task}/{split}: {len(exs)} prompts ({seconds:.1f} s)")
        else:
            self.progress.skip(self.progress.PASS1_UNITS * len(exs))
        return store[key]["scores"][: len(exs)]

    # ----------------------------------------------------------------- the classifier expert
    def classifier(self, expert_tasks: dict[str, Task], others: dict[str, Task]) -> tuple[str, dict]:
        args = self.args
        folder = Path(args.work_dir) / "classifier"
        steps = self.progress.data["steps"]
        if "classifier" not in steps or not (folder / "adapter_config.json").is_file():
            data = build_classifier_examples(
                self.library,
                {n: t.train for n, t in expert_tasks.items()},
                others={n: t.train[: args.others_per_task] for n, t in others.items()},
                per_category=args.classifier_per_task,
                prompt=self.prompt,
                seed=args.seed,
            )
            t0 = time.perf_counter()
            train_classifier_expert(
                self.library,
                data,
                folder,
                steps=args.classifier_steps,
                batch_size=args.classifier_batch,
                learning_rate=args.classifier_lr,
                seed=args.seed,
            )
            seconds = time.perf_counter() - t0
            steps["classifier"] = {"seconds": seconds, "n_examples": len(data), "steps": args.classifier_steps}
            self.progress.planned_seconds = max(0.0, self.progress.planned_seconds - classifier_estimate(args))
            self.progress.save()
            self.progress.report(f"classifier expert trained on {len(data)} questions ({seconds:.0f} s)")
        else:
            self.progress.planned_seconds = max(0.0, self.progress.planned_seconds - classifier_estimate(args))
        return self.library.load_extra_adapter(folder, CLASSIFIER, "classifier"), steps["classifier"]

    # ----------------------------------------------------------------- few-shot CEM
    def cem(self, tname: str, shots: list[Example]) -> tuple[FewShotMixer, dict]:
        args = self.args
        mixer = FewShotMixer(self.library, shots, batch_size=args.batch_size, adapter_name=f"mix_{expert_name(tname)}")
        store = self.progress.data["cem"]
        if tname in store:
            mixer.around_base = store[tname]["config"]["regularize"]
            mixer.apply(torch.tensor(store[tname]["best_alpha"], dtype=torch.float64))
            self.progress.planned_seconds = max(0.0, self.progress.planned_seconds - args.cem_seconds)
            return mixer, store[tname]
        config, sps = self.cem_config(len(shots))
        result = mixer.search(config)
        entry = {
            **result.to_dict(),
            "best_alpha": result.best_alpha.tolist(),
            "alpha": dict(zip(mixer.experts, result.best_alpha.tolist())),
            "config": {k: v for k, v in vars(config).items() if k != "progress"},
            "seconds_per_shot_estimate": sps,
            "n_shots": len(shots),
        }
        store[tname] = entry
        self.progress.planned_seconds = max(0.0, self.progress.planned_seconds - args.cem_seconds)
        self.progress.save()
        self.progress.report(
            f"CEM on {tname}: {result.evaluations} evaluations in {result.seconds:.0f} s "
            f"({result.evaluations_per_second:.2f}/s), alpha {entry['alpha']}"
        )
        return mixer, entry

    def cem_config(self, n_shots: int) -> tuple[CEMConfig, float]:
        """The CEM settings: population from the options, generations sized to `--cem-seconds` (at most
        `--generations`) from the measured seconds per adapted example."""
        args = self.args
        base = {
            "population": args.population,
            "elite_fraction": args.elite_fraction,
            "init_std": args.init_std,
            "seed": args.seed,
            "holdout_fraction": args.holdout_fraction,
            "l1_penalty": args.l1_penalty,
            "patience": args.patience,
            "progress": False,
        }
        if args.cem_reference:
            base["regularize"] = False
        sps = self.seconds_per_example(True) or 1.3 * (self.seconds_per_example(False) or 0.4)
        if args.cem_seconds <= 0:
            return CEMConfig(**base, generations=args.generations), sps
        try:
            config = CEMConfig.for_budget(n_shots, seconds=args.cem_seconds, seconds_per_shot=sps, **base)
            config.generations = max(1, min(config.generations, args.generations))
        except ValueError:
            config = CEMConfig(**base, generations=1)
        return config, sps


def classifier_estimate(args) -> float:
    """Rough seconds of classifier training: 2.5 s per example and step (SmolLM2-135M, forward + backward, CPU)."""
    return args.classifier_steps * args.classifier_batch * 2.5


def timing_units(args, n_dispatchers: int, n_tasks: int) -> float:
    """Planned units of the timing runs: pass 1 and both pass-2 paths on the multiple-choice mix, plus generation."""
    mc = args.timing_per_task * n_tasks * (Progress.PASS1_UNITS + 2)
    return n_dispatchers * (mc + 2 * args.gen_prompts * args.gen_tokens / 4)


# --------------------------------------------------------------------------------------------------- statistics


def gold_pick(example: Example, correct: bool):
    """What `Bench.answers` stores for a generated answer: the gold label (`None` for generation tasks) when the
    answer was judged right, else -1, so that `pick == example.label` is the verdict in both answer modes."""
    return example.label if correct else -1


def correct_of(picks: dict[int, int], exs: Sequence[Example], indices: Sequence[int]) -> list[bool]:
    return [picks[i] == exs[i].label for i in indices]


def balanced_delta_ci(a: Sequence[bool], b: Sequence[bool], labels: Sequence[int], seed: int = 0, n: int = 2000):
    """Δ balanced accuracy (b − a) with a paired bootstrap 95% CI."""
    a, b, labels = np.asarray(a, bool), np.asarray(b, bool), np.asarray(labels)
    rng = np.random.default_rng(seed)

    def bal(x, lab):
        return float(np.mean([x[lab == c].mean() for c in np.unique(lab)]))

    delta = bal(b, labels) - bal(a, labels)
    draws = []
    for _ in range(n):
        idx = rng.integers(0, len(a), len(a))
        draws.append(bal(b[idx], labels[idx]) - bal(a[idx], labels[idx]))
    low, high = np.percentile(draws, [2.5, 97.5])
    return {"delta": delta, "low": float(low), "high": float(high)}


def acc_entry(correct: Sequence[bool], labels: Sequence[int]) -> dict:
    ci = stats.accuracy_ci(correct)
    return {
        "accuracy": ci.accuracy,
        "low": ci.low,
        "high": ci.high,
        "n": ci.n,
        "balanced_accuracy": stats.balanced_accuracy(correct, labels),
    }


def cmp_entry(base: Sequence[bool], other: Sequence[bool], labels: Sequence[int], seed: int) -> dict:
    c = stats.compare_paired(base, other, seed=seed)
    return {
        "delta": c.delta,
        "low": c.low,
        "high": c.high,
        "p": c.p_value,
        "only_base": c.only_a,
        "only_strategy": c.only_b,
        "balanced": balanced_delta_ci(base, other, labels, seed=seed),
    }


def wilson_entry(correct: int, n: int) -> dict:
    low, high = stats.wilson_interval(correct, n)
    return {"correct": correct, "n": n, "accuracy": correct / n if n else float("nan"), "low": low, "high": high}


# ---------------------------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts-dir", default=str(REPO / "benchmarks" / "experts"), help="holds */expert.json")
    p.add_argument("--train-experts", nargs="*", default=None, metavar="TASK", help="train quick experts first")
    p.add_argument("--expert-steps", type=int, default=10)
    p.add_argument("--unseen", nargs="+", default=None, help=f"scored tasks (default {DEFAULT_UNSEEN})")
    p.add_argument("--others-tasks", nargs="+", default=None, help=f"'others' tasks (default {DEFAULT_OTHERS})")
    p.add_argument("--n-test", type=int, default=100, help="test examples per unseen task (>= 100 for the report)")
    p.add_argument("--n-expert-test", type=int, default=50, help="test examples per expert task (dispatch, oracle)")
    p.add_argument("--n-calibrate", type=int, default=16, help="validation prompts per task to fit the thresholds")
    p.add_argument("--threshold-target", choices=("accuracy", "balanced_accuracy"), default="balanced_accuracy")
    p.add_argument("--confidence", choices=("margin", "probability"), default="margin")
    p.add_argument("--max-question-tokens", type=int, default=32, help="pass 1 sees this many question tokens")
    p.add_argument("--shots", type=int, default=16, help="CEM shots from each unseen task's train split")
    p.add_argument("--population", type=int, default=8)
    p.add_argument("--generations", type=int, default=4, help="most CEM generations (fewer if --cem-seconds says)")
    p.add_argument("--cem-seconds", type=float, default=75.0, help="CEM budget per task (0: --generations exactly)")
    p.add_argument("--elite-fraction", type=float, default=0.25)
    p.add_argument("--init-std", type=float, default=0.5)
    p.add_argument("--holdout-fraction", type=float, default=0.4)
    p.add_argument("--l1-penalty", type=float, default=0.01)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--cem-reference", action="store_true", help="the plain reference CEM instead")
    p.add_argument("--others-per-task", type=int, default=8, help="classifier 'others' examples per others task")
    p.add_argument("--classifier-steps", type=int, default=8)
    p.add_argument("--classifier-batch", type=int, default=4)
    p.add_argument("--classifier-per-task", type=int, default=16)
    p.add_argument("--classifier-lr", type=float, default=1e-2)
    p.add_argument("--timing-per-task", type=int, default=4, help="examples per task in the two-pass timing run")
    p.add_argument("--gen-prompts", type=int, default=6, help="prompts of the two-pass generation timing")
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--answer-mode",
        choices=("generate", "loglik"),
        default="generate",
        help="how test answers are scored: greedy generated answers judged as in the experts' own evaluation "
        "(peft_spectral.expert_eval; what a user of two_pass_generate gets), or the option with the highest "
        "log-likelihood; generation tasks are always generated",
    )
    p.add_argument("--chunk", type=int, default=25, help="examples per saved step of pass 2")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=str(REPO / "docs" / "results"))
    p.add_argument("--work-dir", default="/tmp/bench_transformer2", help="state.json and the classifier live here")
    p.add_argument("--fresh", action="store_true", help="ignore an existing state file (start over)")
    p.add_argument("--smoke", action="store_true", help="tiny random model and synthetic tasks (checks the script)")
    p.add_argument("--report-only", action="store_true", help="rewrite transformer2.md from transformer2.json")
    p.add_argument(
        "--reading",
        default=str(READING),
        help="markdown file with the reading of the committed results, put under '## Reading' (not with --smoke)",
    )
    args = p.parse_args(argv)
    if args.smoke:
        for name, value in {
            "n_test": 8,
            "n_expert_test": 6,
            "n_calibrate": 4,
            "shots": 6,
            "population": 3,
            "generations": 2,
            "cem_seconds": 0.0,
            "others_per_task": 4,
            "classifier_steps": 2,
            "classifier_batch": 2,
            "classifier_per_task": 4,
            "timing_per_task": 2,
            "gen_prompts": 2,
            "gen_tokens": 4,
            "chunk": 5,
        }.items():
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
        args.unseen = args.unseen or ["u1", "u2", "u3", "u4"]
        args.others_tasks = args.others_tasks or ["o1", "o2"]
    return args


def reading_section(args) -> str:
    """The hand-written reading (`--reading`) under a heading; empty with `--smoke` or without the file."""
    path = Path(args.reading) if args.reading and not args.smoke else None
    if path is None or not path.is_file():
        return ""
    return "\n## Reading\n\n" + path.read_text().strip() + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("peft_spectral", "transformers", "trl", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        text = markdown(json.loads((out_dir / "transformer2.json").read_text())) + reading_section(args)
        (out_dir / "transformer2.md").write_text(text)
        print(text)
        return 0

    t0 = time.perf_counter()
    if args.smoke:
        model, tok, experts_root, get_task = smoke_setup(work, args.seed)
        model_name = "tiny random Llama (smoke)"
    else:
        from peft_spectral.assets import load_default_model

        model, tok = load_default_model()
        model.eval()
        experts_root, model_name = Path(args.experts_dir), "SmolLM2-135M-Instruct (embedded GGUF Q4_1, fp32)"

        def get_task(name: str) -> Task:
            return load_task(name, seed=0)

    load_seconds = time.perf_counter() - t0
    if args.train_experts:
        experts_root.mkdir(parents=True, exist_ok=True)
        train_quick_experts(model, tok, args.train_experts, experts_root, args.expert_steps, 4)
    found = find_experts(experts_root)
    if not found:
        raise SystemExit(f"no */expert.json under {experts_root} (pass --train-experts TASK ... to train some)")
    expert_tasks, specs = {}, []
    for task_name, folder, meta in found:
        task = get_task(task_name)
        name = expert_name(task_name)
        expert_tasks[name] = task
        desc = meta.get("description") or short_description(task.description) or task_name
        specs.append({"name": name, "source": str(folder), "description": short_description(desc)})
    unseen_names = args.unseen or DEFAULT_UNSEEN
    others_names = args.others_tasks or DEFAULT_OTHERS
    check_disjoint([t.name for t in expert_tasks.values()], unseen_names, others_names)
    unseen = {n: get_task(n) for n in unseen_names}
    others = {n: get_task(n) for n in others_names}
    for n, t in unseen.items():  # CEM's fitness scores the options of the shots; experts' tasks may be generation
        if t.kind != "multiple_choice":
            raise SystemExit(f"unseen task {n} is {t.kind}; the unseen tasks must be multiple choice (CEM's fitness)")
    small = [n for n, t in unseen.items() if len(t.test) < args.n_test]
    if small:
        logger.warning("unseen task(s) %s have fewer than --n-test=%d test examples", small, args.n_test)
    gen_per = max(1, args.gen_prompts // len(unseen))
    for n, t in unseen.items():  # shots and generation prompts from train, thresholds never, test from test
        check_splits_disjoint(n, {"train": t.train[: args.shots + gen_per], "test": t.test[: args.n_test]})
    for n, t in {**expert_tasks, **others}.items():
        check_splits_disjoint(
            n, {"train": t.train, "validation": t.validation[: args.n_calibrate], "test": t.test[: args.n_expert_test]}
        )

    t0 = time.perf_counter()
    library = ExpertLibrary.load(model, tok, specs)
    library_seconds = time.perf_counter() - t0
    settings = {k: v for k, v in vars(args).items() if k not in ("output", "work_dir", "fresh", "threads", "chunk")}
    fp = fingerprint(model_name, specs, settings, [*unseen_names, *others_names])
    progress = Progress(work / "state.json", fp, args.fresh)
    bench = Bench(args, library, progress, {**expert_tasks, **unseen, **others})
    names = library.names
    n_exp = {n: min(args.n_expert_test, len(t.test)) for n, t in expert_tasks.items()}
    n_uns = {n: min(args.n_test, len(t.test)) for n, t in unseen.items()}
    n_pass1 = sum(n_exp.values()) + sum(n_uns.values()) + args.n_calibrate * (len(expert_tasks) + len(others))
    progress.planned_units = (
        2 * Progress.PASS1_UNITS * n_pass1
        + 2.5 * sum(n_exp.values())  # base, the right expert, some other choices
        + 2.6 * sum(n_uns.values())  # base, the CEM mixture, dispatch choices
        + timing_units(args, len(DISPATCHERS), len(expert_tasks) + len(unseen))
    )
    progress.planned_seconds = classifier_estimate(args) + args.cem_seconds * len(unseen)
    progress.report(f"experts {names}; unseen {unseen_names}; others {others_names}")

    # ------------------------------------------------------------------ classifier and pass-1 scores
    clf_name, clf_info = bench.classifier(expert_tasks, others)
    options = {"prompt": bench.prompt, "batch_size": args.batch_size, "confidence": args.confidence}
    dispatchers = {"prompt_dispatch": PromptDispatcher(None, **options), "classifier_dispatch": None}
    dispatchers["classifier_dispatch"] = PromptDispatcher(clf_name, **options)
    categories = names + [OTHERS]
    cal_sets = {**{n: (t, n) for n, t in expert_tasks.items()}, **{n: (t, OTHERS) for n, t in others.items()}}
    calibration, decisions = {}, {}
    for label, disp in dispatchers.items():
        scores, truth = [], []
        for tname, (task, right) in cal_sets.items():
            exs = task.validation[: args.n_calibrate]
            scores += bench.pass1(label, disp, tname, "validation", exs)
            truth += [right] * len(exs)
        threshold, report = fit_threshold(
            scores, categories, truth, target=args.threshold_target, confidence=args.confidence
        )
        argmax = dispatch_report(decide_categories(scores, categories), truth)
        disp.threshold = threshold
        library.dispatch_thresholds[disp.key] = {"threshold": threshold, "confidence": args.confidence}
        calibration[label] = {
            "threshold": threshold,
            "confidence": args.confidence,
            "target": args.threshold_target,
            "n": len(truth),
            "validation": {k: report[k] for k in ("accuracy", "balanced_accuracy")},
            "validation_argmax": {k: argmax[k] for k in ("accuracy", "balanced_accuracy")},
        }
        for tname, task in [*expert_tasks.items(), *unseen.items()]:
            n = n_exp.get(tname) or n_uns[tname]
            sc = bench.pass1(label, disp, tname, "test", task.test[:n])
            decisions[(label, tname)] = {
                "fitted": decide_categories(sc, categories, threshold=threshold, confidence=args.confidence),
                "argmax": decide_categories(sc, categories),
            }
    library.save_manifest(work / "library")

    # ------------------------------------------------------------------ experts' own tasks: base, oracle, dispatch
    results: dict[str, Any] = {"unseen": {}, "expert_tasks": {}, "dispatch_accuracy": {}, "calibration": calibration}
    pooled: dict[str, list[bool]] = {k: [] for k in ("base", "oracle", *DISPATCHERS)}
    for name, task in expert_tasks.items():
        exs, idx = task.test, list(range(n_exp[name]))
        labels = [0 if exs[i].label is None else exs[i].label for i in idx]  # generation tasks: one class
        base = correct_of(bench.answers(None, "base", name, "test", exs, idx), exs, idx)
        oracle = correct_of(bench.answers(name, name, name, "test", exs, idx), exs, idx)
        row = {"n": len(idx), "base": acc_entry(base, labels), "oracle": acc_entry(oracle, labels)}
        row["oracle_vs_base"] = cmp_entry(base, oracle, labels, args.seed)
        pooled["base"] += base
        pooled["oracle"] += oracle
        for label in DISPATCHERS:
            correct = dispatched_correct(bench, decisions[(label, name)]["fitted"], name, exs, idx, base)
            row[label] = acc_entry(correct, labels)
            row[f"{label}_vs_base"] = cmp_entry(base, correct, labels, args.seed)
            pooled[label] += correct
        results["expert_tasks"][name] = row
    results["oracle_recovery"] = oracle_recovery(pooled, args.seed)

    # ------------------------------------------------------------------ dispatch accuracy (with CIs)
    for label in DISPATCHERS:
        entry = {}
        for mode in ("fitted", "argmax"):
            predicted, truth = [], []
            for tname in [*expert_tasks, *unseen]:
                predicted += decisions[(label, tname)][mode]
                truth += [tname if tname in expert_tasks else OTHERS] * len(decisions[(label, tname)][mode])
            rep = dispatch_report(predicted, truth)
            per_task = {}
            for tname in [*expert_tasks, *unseen]:
                right = tname if tname in expert_tasks else OTHERS
                picks = decisions[(label, tname)][mode]
                per_task[tname] = {
                    "right": right,
                    **wilson_entry(sum(p == right for p in picks), len(picks)),
                    "chosen": {c: picks.count(c) for c in sorted(set(picks))},
                }
            entry[mode] = {
                "overall": wilson_entry(rep["correct"], rep["n"]),
                "balanced_accuracy": rep["balanced_accuracy"],
                "per_task": per_task,
            }
        results["dispatch_accuracy"][label] = entry

    # ------------------------------------------------------------------ unseen tasks: the four strategies
    curves = {}
    for tname, task in unseen.items():
        exs, idx = task.test, list(range(n_uns[tname]))
        labels = [exs[i].label for i in idx]
        base = correct_of(bench.answers(None, "base", tname, "test", exs, idx), exs, idx)
        correct = {"base": base}
        for label in DISPATCHERS:
            correct[label] = dispatched_correct(bench, decisions[(label, tname)]["fitted"], tname, exs, idx, base)
        mixer, cem = bench.cem(tname, task.train[: args.shots])
        picks = bench.answers(mixer.adapter_name, f"mix:{tname}", tname, "test", exs, idx)
        correct["cem"] = correct_of(picks, exs, idx)
        curves[tname] = cem["history"]
        shares = np.bincount(labels).max() / len(labels)
        row: dict[str, Any] = {
            "n": len(idx),
            "description": short_description(task.description),
            "majority_label_share": float(shares),
            "imbalanced": bool(shares >= 0.6),
        }
        for s in STRATEGIES:
            row[s] = acc_entry(correct[s], labels)
            if s != "base":
                row[f"{s}_vs_base"] = cmp_entry(base, correct[s], labels, args.seed)
        for label in DISPATCHERS:
            row[f"{label}_chosen"] = results["dispatch_accuracy"][label]["fitted"]["per_task"][tname]["chosen"]
        row["cem_search"] = {k: v for k, v in cem.items() if k not in ("history", "best_alpha")}
        results["unseen"][tname] = row
        progress.report(
            f"{tname}: " + ", ".join(f"{s} {row[s]['accuracy']:.3f}" for s in STRATEGIES) + f" (n={len(idx)})"
        )

    # ------------------------------------------------------------------ timing runs
    results["timing"] = timing_runs(bench, dispatchers, expert_tasks, unseen, args)
    results["goals"] = goals(results)
    results["setup"] = {
        "model": model_name,
        "experts_dir": str(experts_root),
        "experts": specs,
        "expert_tasks": {n: t.name for n, t in expert_tasks.items()},
        "unseen_tasks": unseen_names,
        "others_tasks": others_names,
        "n_test": n_uns,
        "n_expert_test": n_exp,
        "n_calibrate_per_task": args.n_calibrate,
        "shots": args.shots,
        "classifier": {
            **clf_info,
            "batch_size": args.classifier_batch,
            "per_task": args.classifier_per_task,
            "others_per_task": args.others_per_task,
            "learning_rate": args.classifier_lr,
        },
        "dispatch": {"max_question_tokens": args.max_question_tokens, "confidence": args.confidence},
        "seconds_per_example": {"base": bench.seconds_per_example(False), "adapter": bench.seconds_per_example(True)},
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model_load_seconds": load_seconds,
        "library_load_seconds": library_seconds,
        "run_seconds": time.perf_counter() - t_start,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python benchmarks/bench_transformer2.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    write_json_atomic(out_dir / "transformer2.json", results)
    plot(results, curves, out_dir)
    text = markdown(results) + reading_section(args)
    (out_dir / "transformer2.md").write_text(text)
    print(text)
    return 0


def dispatched_correct(bench: Bench, picks, task: str, exs, idx, base: list[bool]) -> list[bool]:
    """Correctness when each example is answered by the adapter pass 1 chose for it (base for `others`)."""
    out = list(base)
    for expert in sorted({p for p in picks if p != OTHERS}):
        rows = [i for i in idx if picks[i] == expert]
        answers = bench.answers(expert, expert, task, "test", exs, rows)
        for i in rows:
            out[i] = answers[i] == exs[i].label
    return out


def oracle_recovery(pooled: dict[str, list[bool]], seed: int) -> dict:
    """Dispatch gain / oracle gain over base on the experts' own test examples (pooled)."""
    base = float(np.mean(pooled["base"]))
    oracle_gain = float(np.mean(pooled["oracle"])) - base
    out = {"n": len(pooled["base"]), "base": base, "oracle_gain": oracle_gain}
    out["oracle_vs_base"] = cmp_entry(pooled["base"], pooled["oracle"], [0] * len(pooled["base"]), seed)
    for label in DISPATCHERS:
        gain = float(np.mean(pooled[label])) - base
        out[label] = {
            "gain": gain,
            "recovery": gain / oracle_gain if oracle_gain > 0 else None,
            "vs_base": cmp_entry(pooled["base"], pooled[label], [0] * len(pooled["base"]), seed),
        }
    return out


def timing_runs(bench: Bench, dispatchers, expert_tasks, unseen, args) -> dict:
    """Two-pass runs with the fitted dispatchers, timed: multiple choice (both pass-2 paths) and generation."""
    store = bench.progress.data["steps"]
    if "timing" in store:
        bench.progress.skip(timing_units(args, len(dispatchers), len(expert_tasks) + len(unseen)))
        return store["timing"]
    library = bench.library
    k = args.timing_per_task
    tasks = [*expert_tasks.values(), *unseen.values()]
    mc = [ex for t in tasks if t.kind == "multiple_choice" for ex in t.test[:k]]
    gen_per = max(1, args.gen_prompts // len(unseen))
    gen = [ex for t in unseen.values() for ex in t.train[args.shots : args.shots + gen_per]]
    out: dict[str, Any] = {}
    for label, disp in dispatchers.items():
        res = two_pass_evaluate(
            library, disp, mc, kind="multiple_choice", batch_size=args.batch_size, compare_paths=True
        )
        out[f"multiple_choice_{label}"] = res.to_dict()
        res = two_pass_generate(
            library, disp, gen, max_new_tokens=args.gen_tokens, batch_size=args.batch_size, compare_paths=True
        )
        out[f"generation_{label}"] = {**res.to_dict(), "max_new_tokens": args.gen_tokens}
        bench.progress.report(f"timing runs of {label} done")
    switches = []
    for _ in range(10):
        for name in [*library.names, None]:
            before = len(library.switch_seconds)
            with library.use(name):
                pass
            switches.extend(library.switch_seconds[before:])
    out["mean_switch_seconds"] = sum(switches) / len(switches)
    store["timing"] = out
    bench.progress.save()
    return out


# --------------------------------------------------------------------------------------------------------- goals


def goals(r: dict) -> dict:
    """The issue's three goals, each with `met` and the numbers behind it."""
    strategies = [s for s in STRATEGIES if s != "base"]
    below = []
    for t, row in r["unseen"].items():
        for s in strategies:
            c = row[f"{s}_vs_base"]
            significant = c["delta"] < 0 and c["p"] < 0.05
            if row["imbalanced"]:
                significant = significant or c["balanced"]["high"] < 0
            if significant:
                below.append(f"{s} on {t}")
    means = {s: float(np.mean([row[f"{s}_vs_base"]["delta"] for row in r["unseen"].values()])) for s in strategies}
    best = max(means, key=means.get)
    rec = r["oracle_recovery"]
    recoveries = {s: rec[s]["recovery"] for s in DISPATCHERS}
    valid = {s: v for s, v in recoveries.items() if v is not None}
    best_rec = max(valid, key=valid.get) if valid else None
    return {
        "never_significantly_below_base": {"met": not below, "violations": below},
        "best_mean_delta_at_least_3_points": {"met": means[best] >= 0.03, "best": best, "mean_deltas": means},
        "dispatch_recovers_80pct_of_oracle": {
            "met": bool(best_rec is not None and valid[best_rec] >= 0.8),
            "best": best_rec,
            "recoveries": recoveries,
            "oracle_gain": rec["oracle_gain"],
        },
    }


# ------------------------------------------------------------------------------------------------------- reports


def plot(r: dict, curves: dict, out_dir: Path) -> None:
    strategies = [s for s in STRATEGIES if s != "base"]
    tasks = list(r["unseen"])
    ci_bar_chart(
        out_dir / "transformer2.png",
        tasks,
        {s.replace("_", " "): [r["unseen"][t][f"{s}_vs_base"] for t in tasks] for s in strategies},
        value="delta",
        scale=100,
        zero_line=True,
        ylabel="Δ accuracy vs base (points)",
        title="Transformer² on unseen tasks: Δ vs base, paired 95% CI",
        figsize=(7, 3.6),
        xticks={"fontsize": 8},
        legend={"fontsize": 8},
        dpi=120,
        required=True,
    )
    plt = pyplot("the benchmark's plots")

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, hist in curves.items():
        g = [h["generation"] + 1 for h in hist]
        (line,) = ax.plot(g, [h["best"] for h in hist], marker="o", label=f"{name}: best hold-out")
        ax.plot(g, [h["generation_mean"] for h in hist], ls="--", color=line.get_color(), alpha=0.6)
    ax.set_xlabel("CEM generation")
    ax.set_ylabel("accuracy on the shots")
    ax.set_title("Few-shot CEM (dashed: population mean on the fit shots)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, out_dir / "cem_fitness.png", dpi=120)


def _acc(e: dict) -> str:
    return f"{e['accuracy']:.3f} [{e['low']:.2f}, {e['high']:.2f}]"


def _delta(c: dict) -> str:
    star = " *" if c["p"] < 0.05 else ""
    return f"{100 * c['delta']:+.1f} [{100 * c['low']:+.1f}, {100 * c['high']:+.1f}] p={c['p']:.2g}{star}"


def _ratio(x: dict) -> str:
    return f"{x['pass1_seconds']:.2f} / {x['pass2_seconds']:.2f} = {x['pass1_over_pass2']:.1%}"


def markdown(r: dict) -> str:
    s = r["setup"]
    strategies = [x for x in STRATEGIES if x != "base"]
    cem_any = next(iter(r["unseen"].values()))["cem_search"]
    lines = [
        "# Transformer² benchmark: unseen tasks, dispatch with `others`, oracle recovery, CEM, time",
        "",
        (
            f"Produced by `{s['command'].strip()}` on {s['date']} ({s['model']}, CPU, {s['threads']} thread(s), torch "
            f"{s['torch']}); this run's wall time {s['run_seconds'] / 60:.1f} min (a resumed run counts only its part)."
        ),
        "",
        f"Experts (from `{s['experts_dir']}/*/expert.json`): "
        + "; ".join(f"`{e['name']}` ({e['description']})" for e in s["experts"])
        + ".",
        (
            f"Unseen tasks (scored; no expert's, not used for any fit): {', '.join(f'`{t}`' for t in s['unseen_tasks'])}. "
            f"`others` tasks (classifier training and threshold fit only): {', '.join(f'`{t}`' for t in s['others_tasks'])}. "
            "The three sets are disjoint (checked); shots come from train, thresholds from validation, scores from test."
        ),
        "",
        "## Goals",
        "",
        "| goal | met | numbers |",
        "|---|---|---|",
    ]
    g = r["goals"]
    v = g["never_significantly_below_base"]
    lines.append(
        "| no strategy significantly below base on any unseen task (McNemar p < 0.05; balanced-accuracy CI for "
        f"imbalanced tasks) | {'met' if v['met'] else 'not met'} | "
        + (", ".join(v["violations"]) if v["violations"] else "none below")
        + " |"
    )
    v = g["best_mean_delta_at_least_3_points"]
    lines.append(
        f"| best strategy's mean Δ ≥ +3 points | {'met' if v['met'] else 'not met'} | "
        + ", ".join(f"{k.replace('_', ' ')} {100 * x:+.1f}" for k, x in v["mean_deltas"].items())
        + " |"
    )
    v = g["dispatch_recovers_80pct_of_oracle"]
    lines.append(
        f"| dispatch recovers ≥ 80% of the oracle gain on the experts' tasks | {'met' if v['met'] else 'not met'} | "
        f"oracle gain {100 * v['oracle_gain']:+.1f} points; "
        + ", ".join(
            f"{k.replace('_', ' ')} {'undefined' if x is None else f'{x:.0%}'}" for k, x in v["recoveries"].items()
        )
        + " |"
    )
    lines += [
        "",
        "## Accuracy on unseen tasks",
        "",
        "Accuracy [95% Wilson CI]; Δ vs base in points [paired bootstrap 95% CI], McNemar p (* < 0.05).",
        "",
        "| task | n | base | " + " | ".join(x.replace("_", " ") for x in strategies) + " |",
        "|---|---|---|" + "---|" * len(strategies),
    ]
    for t, row in r["unseen"].items():
        lines.append(
            f"| {t} | {row['n']} | {_acc(row['base'])} | "
            + " | ".join(f"{_acc(row[x])}<br>Δ {_delta(row[f'{x}_vs_base'])}" for x in strategies)
            + " |"
        )
    lines += [
        "",
        (
            "Balanced accuracy (mean recall over gold labels; the majority label's share of the test examples in brackets; "
            "Δ vs base [paired bootstrap 95% CI]):"
        ),
        "",
        "| task | base | " + " | ".join(x.replace("_", " ") for x in strategies) + " |",
        "|---|---|" + "---|" * len(strategies),
    ]
    for t, row in r["unseen"].items():
        flag = " — imbalanced" if row["imbalanced"] else ""
        lines.append(
            f"| {t} ({row['majority_label_share']:.0%}{flag}) | {row['base']['balanced_accuracy']:.3f} | "
            + " | ".join(
                f"{row[x]['balanced_accuracy']:.3f} (Δ {100 * row[f'{x}_vs_base']['balanced']['delta']:+.1f} "
                f"[{100 * row[f'{x}_vs_base']['balanced']['low']:+.1f}, "
                f"{100 * row[f'{x}_vs_base']['balanced']['high']:+.1f}])"
                for x in strategies
            )
            + " |"
        )
    lines += ["", "Where pass 1 sent the unseen prompts (`others` = the base model):", ""]
    for t, row in r["unseen"].items():
        for label in DISPATCHERS:
            lines.append(f"- {t}, {label.replace('_', ' ')}: {row[f'{label}_chosen']}")
    lines += ["", "CEM α (regularised: mixing around the base model, α = 0 is the base model):", ""]
    for t, row in r["unseen"].items():
        c = row["cem_search"]
        hold = c.get("holdout_fitness")
        lines.append(
            f"- {t}: "
            + ", ".join(f"{k} {x:.2f}" for k, x in c["alpha"].items())
            + f"; {c['evaluations']} evaluations ({c.get('cache_hits', 0)} cached) in {c['seconds']:.0f} s = "
            f"{c['evaluations_per_second']:.2f} evaluations/s ({c.get('shots_per_second', float('nan')):.1f} shots/s)"
            + (
                f"; hold-out accuracy {hold[0]:.3f} vs base {c['base_holdout_fitness'][0]:.3f}"
                + (" (stopped early)" if c.get("stopped_early") else "")
                if hold
                else ""
            )
        )
    cfg = cem_any["config"]
    lines += [
        "",
        f"CEM settings: {cem_any['n_shots']} shots, population {cfg['population']}, generations "
        + ", ".join(str(row["cem_search"]["config"]["generations"]) for row in r["unseen"].values())
        + f" (sized to the per-task budget from the measured time per example), elite {cfg['elite_fraction']}, "
        + (
            f"regularised (hold-out {cfg['holdout_fraction']}, λ {cfg['l1_penalty']}, patience {cfg['patience']})."
            if cfg["regularize"]
            else "plain reference CEM."
        )
        + " Curves: `cem_fitness.png`.",
        "",
        "## Experts' own tasks: oracle and dispatch",
        "",
        "| task | n | base | oracle (its expert) | " + " | ".join(x.replace("_", " ") for x in DISPATCHERS) + " |",
        "|---|---|---|---|" + "---|" * len(DISPATCHERS),
    ]
    for t, row in r["expert_tasks"].items():
        lines.append(
            f"| {t} | {row['n']} | {_acc(row['base'])} | {_acc(row['oracle'])}<br>Δ {_delta(row['oracle_vs_base'])} | "
            + " | ".join(f"{_acc(row[x])}<br>Δ {_delta(row[f'{x}_vs_base'])}" for x in DISPATCHERS)
            + " |"
        )
    rec = r["oracle_recovery"]
    lines += [
        "",
        f"Pooled (n = {rec['n']}): base {rec['base']:.3f}, oracle gain {100 * rec['oracle_gain']:+.1f} points "
        f"(Δ {_delta(rec['oracle_vs_base'])}); "
        + "; ".join(
            f"{x.replace('_', ' ')} gain {100 * rec[x]['gain']:+.1f} points, recovery "
            + (
                "undefined (the oracle does not beat base)"
                if rec[x]["recovery"] is None
                else f"{rec[x]['recovery']:.0%}"
            )
            for x in DISPATCHERS
        )
        + ".",
        "",
        "## Dispatch accuracy",
        "",
        (
            "Right answer: the task's expert on the experts' test splits, `others` on the unseen tasks. Accuracy "
            "[95% Wilson CI]; `fitted` uses the threshold fitted on validation prompts, `argmax` never says `others`."
        ),
        "",
    ]
    tasks = list(next(iter(r["dispatch_accuracy"].values()))["fitted"]["per_task"])
    lines += [
        "| strategy | " + " | ".join(tasks) + " | overall | balanced |",
        "|---|" + "---|" * (len(tasks) + 2),
    ]
    for label, entry in r["dispatch_accuracy"].items():
        for mode, d in entry.items():
            lines.append(
                f"| {label.replace('_', ' ')} ({mode}) | "
                + " | ".join(_acc(d["per_task"][t]) for t in tasks)
                + f" | {_acc(d['overall'])} | {d['balanced_accuracy']:.3f} |"
            )
    lines += ["", "Fitted thresholds:", ""]
    for label, c in r["calibration"].items():
        lines.append(
            f"- {label.replace('_', ' ')}: {c['threshold']:.3f} ({c['confidence']}) for {c['target']} on {c['n']} "
            f"validation prompts: {c['validation'][c['target']]:.3f} (argmax {c['validation_argmax'][c['target']]:.3f})"
        )
    cl = s["classifier"]
    lines += [
        "",
        (
            f"Classifier expert: SVF-SFT on {cl['n_examples']} category questions ({cl['per_task']} per category at most, "
            f"`others` from {cl['others_per_task']} train examples of each `others` task), {cl['steps']} steps × batch "
            f"{cl['batch_size']}, lr {cl['learning_rate']}, {cl['seconds']:.0f} s. Pass 1 sees the first "
            f"{s['dispatch']['max_question_tokens']} question tokens."
        ),
        "",
        "## Time",
        "",
        (
            "Two-pass runs with the fitted dispatchers on "
            "a mix of every task's first test examples (multiple choice, option scoring) and on train prompts of the unseen "
            "tasks (generation)."
        ),
        "",
        "| run | n | pass 1 / pass 2 (s) | pass 2 mixed-adapter batches (s) | pass 2 grouped by expert (s) | same answers |",
        "|---|---|---|---|---|---|",
    ]
    tm = r["timing"]
    for key, x in tm.items():
        if not isinstance(x, dict):
            continue
        by = x.get("pass2_seconds_by_path", {})
        lines.append(
            f"| {key.replace('_', ' ')} | {x['n']} | {_ratio(x)} | "
            + (f"{by['mixed']:.2f}" if "mixed" in by else "—")
            + " | "
            + (f"{by['grouped']:.2f}" if "grouped" in by else "—")
            + f" | {x.get('paths_agree')} |"
        )
    spe = s["seconds_per_example"]
    lines += [
        "",
        (
            f"Mean expert switch: {1e3 * tm['mean_switch_seconds']:.2f} ms. Pass 2 per example while scoring: base "
            f"{spe['base'] or float('nan'):.3f} s, adapted {spe['adapter'] or float('nan'):.3f} s. Model load "
            f"{s['model_load_seconds']:.1f} s, experts {s['library_load_seconds']:.1f} s."
        ),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
