"""The main job: adapt one model with all three methods on real tasks and report the numbers.

`peft-spectral demo` runs, on the embedded SmolLM2-135M-Instruct (or `--model`) and BigBench tasks:

1. **SVF experts**: the committed expert library (`benchmarks/experts/`, trained by `benchmarks/bench_experts.py`)
   when the demo runs from the repository on the embedded model; otherwise (or with `train_experts=True`) one SVF
   adapter per expert task, trained briefly with RL (GRPO, ±1 rewards) through TRL;
2. **Transformer²**: the experts composed for a task none of them saw — few-shot CEM mixing weights, and the
   two-pass prompt dispatch, with the time of each pass;
3. **SpectralCompress**: a Compress-to-Impress search (one gradient pass) on one task, accuracy before and after;
4. **CoreIsolation**: a small CPI-FT run on three tasks.

Every step writes its result (JSON, adapters, plots) under the output directory and is skipped when that result
exists, so an interrupted run continues where it stopped. The summary table (accuracies with n and 95% Wilson
intervals, Δ vs the base model on the same examples with a paired 95% interval and McNemar p, see
[`peft_spectral.stats`]) is printed and written to `report.md` next to the plots (CEM fitness curve, C2I scores by
layer, CPI Jaccard heat map).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from .model_card import read_expert_json
from .plots import pyplot, save_figure
from .state import load_state, write_json_atomic


logger = logging.getLogger(__name__)

MLP = ["gate_proj", "up_proj", "down_proj"]
#: Where the committed expert library lives in a checkout of the repository.
LIBRARY_SUBDIR = Path("benchmarks") / "experts"


def find_expert_library(start: Optional[Path] = None) -> Optional[Path]:
    """The committed expert library (`benchmarks/experts/`): under the current directory, else next to the package
    (an editable install of the repository); `None` when there is none (e.g. an installed wheel)."""
    candidates = [Path(start or Path.cwd()) / LIBRARY_SUBDIR, Path(__file__).resolve().parents[1] / LIBRARY_SUBDIR]
    for folder in candidates:
        if folder.is_dir() and library_tasks(folder):
            return folder
    return None


def library_tasks(folder: Path) -> dict[str, Path]:
    """`task -> adapter directory` of the experts in a library (`<folder>/<name>/` with an adapter and an
    `expert.json`, see [`peft_spectral.transformer2.find_experts`])."""
    from .transformer2.library import find_experts

    return {expert.task: expert.path for expert in find_experts(folder)}


@dataclass
class DemoConfig:
    """Settings of [`run_demo`].

    Args:
        model (`str`, *optional*): Hub id or local path; the embedded SmolLM2-135M-Instruct when `None`.
        output_dir (`str`): Where results are written (and resumed from).
        expert_tasks (`Sequence[str]`, *optional*): BigBench tasks of the SVF experts; `None`: the tasks of the
            committed library (except `unseen_task`), or the three defaults of [`DEFAULT_EXPERT_TASKS`] when training.
        experts_dir (`str`, *optional*): The expert library to use; `None`: `benchmarks/experts/` found by
            [`find_expert_library`]. Only used with the embedded model (`model=None`): the committed experts were
            trained on it.
        train_experts (`bool`): Train the SVF experts (briefly, `svf_steps` GRPO steps each) instead of using the
            library. Also done when there is no library, or `model` is given.
        unseen_task (`str`): Task for Transformer² that no expert was trained on.
        compress_task (`str`): Task of the C2I search.
        cpi_tasks (`Sequence[str]`): Tasks of the CPI-FT run.
        svf_steps (`int`): GRPO steps per expert.
        eval_examples (`int`): Test examples per task for every accuracy in the table.
        cem_shots, cem_population, cem_generations (`int`): Few-shot CEM settings (reference: 32 / 50 generations).
        c2i_layers (`Sequence[int]`, *optional*): Layers whose MLP and `o_proj` matrices are C2I candidates; when
            `None`, every `c2i_layer_stride`-th layer of the model.
        c2i_grad_examples, c2i_eval_examples (`int`): Gradient and evaluation samples of the C2I search.
        cpi_probe_steps, cpi_stage_steps (`int`): SFT steps of each CPI probe and each stage.
        seed (`int`): Seed of splits, sampling and searches.
        device (`str`): Where the model runs: `"auto"` (cuda when available, else cpu), `"cpu"`, `"cuda"`, ...
        dtype (`str`): Weight dtype: `"float32"`, `"bfloat16"`, `"float16"` or `"auto"` (the checkpoint's).
        progress (`bool`): Show progress bars.
    """

    model: Optional[str] = None
    output_dir: str = "runs/demo"
    expert_tasks: Optional[Sequence[str]] = None
    experts_dir: Optional[str] = None
    train_experts: bool = False
    unseen_task: str = "navigate"
    compress_task: str = "epistemic_reasoning"
    cpi_tasks: Sequence[str] = ("arithmetic/2_digit_addition", "epistemic_reasoning", "object_counting")
    svf_steps: int = 6
    eval_examples: int = 60
    cem_shots: int = 16
    cem_population: int = 12
    cem_generations: int = 6
    c2i_layers: Optional[Sequence[int]] = None
    c2i_layer_stride: int = 3
    c2i_grad_examples: int = 100
    c2i_eval_examples: int = 40
    cpi_probe_steps: int = 8
    cpi_stage_steps: int = 8
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    progress: bool = True

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """A smaller setting for smoke runs (minutes instead of a quarter of an hour)."""
        small = {
            "svf_steps": 2,
            "eval_examples": 16,
            "cem_shots": 8,
            "cem_population": 6,
            "cem_generations": 3,
            "c2i_layer_stride": 10,
            "c2i_grad_examples": 16,
            "c2i_eval_examples": 12,
            "cpi_probe_steps": 2,
            "cpi_stage_steps": 2,
        }
        small.update(overrides)
        return cls(**small)


#: Expert tasks trained when there is no library (or `train_experts=True`) and none are named.
DEFAULT_EXPERT_TASKS = ("sports_understanding", "strategyqa", "anachronisms")


@dataclass
class Row:
    """One line of the summary table; with the per-example verdicts (`base_correct`, `adapted_correct`, same
    examples) the table shows 95% intervals and the paired Δ vs base."""

    method: str
    task: str
    base_accuracy: float
    adapted_accuracy: float
    trainable_params: int
    wall_time_s: float
    note: str = ""
    base_correct: Optional[list[bool]] = None
    adapted_correct: Optional[list[bool]] = None


@dataclass
class DemoReport:
    rows: list[Row] = field(default_factory=list)
    plots: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


class _Steps:
    """Result cache of the demo: one JSON file per step under the output directory, written atomically."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def run(self, name: str, fn: Callable[[Path], dict]) -> dict:
        path = self.root / f"{name}.json"
        cached = load_state(path, what=f"demo step {name!r}")
        if cached is not None:
            print(f"[demo] {name}: cached ({path})")
            return cached
        work = self.root / name
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        result = fn(work)
        result.setdefault("wall_time_s", time.perf_counter() - t0)
        write_json_atomic(path, result)
        return result


def _evaluate(model, tokenizer, task, n: int) -> dict:
    """`{"accuracy", "correct"}` on the first `n` test examples."""
    from .evaluation import evaluate

    result = evaluate(model, tokenizer, task.test[:n], kind=task.kind)
    return {"accuracy": float(result.accuracy), "correct": [bool(c) for c in result.correct]}


def _accuracy(model, tokenizer, task, n: int) -> float:
    return _evaluate(model, tokenizer, task, n)["accuracy"]


def _expert_plan(config: DemoConfig, printer) -> tuple[list[str], Optional[dict[str, Path]]]:
    """The expert tasks and, when the committed library is used, `task -> adapter directory` (else `None`: train)."""
    library = None
    if not config.train_experts:
        if config.model is not None:
            printer(
                "[demo] --model given: the committed experts were trained on the embedded model, training new ones"
            )
        else:
            folder = Path(config.experts_dir) if config.experts_dir else find_expert_library()
            library = library_tasks(folder) if folder is not None and folder.is_dir() else {}
            if not library:
                printer(f"[demo] no expert library found ({folder or LIBRARY_SUBDIR}): training the experts")
                library = None
    if library is not None:
        tasks = list(config.expert_tasks or [t for t in library if t != config.unseen_task])
        missing = [t for t in tasks if t not in library]
        if missing:
            printer(f"[demo] the expert library has no expert for {missing}: training the experts")
            library = None
        else:
            return tasks, {t: library[t] for t in tasks}
    return list(config.expert_tasks or DEFAULT_EXPERT_TASKS), None


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_demo(config: DemoConfig, *, printer: Callable[[str], None] = print) -> DemoReport:
    """Run (or resume) the demo and return its report; see the module docstring."""
    from .assets import load_model
    from .tasks import load_task

    out = Path(config.output_dir)
    steps = _Steps(out)
    (out / "config.json").write_text(json.dumps(asdict(config), indent=1, default=list))
    t0 = time.perf_counter()
    base, tok = load_model(config.model, dtype=config.dtype, device=config.device)
    base.eval()
    printer(f"[demo] model loaded in {time.perf_counter() - t0:.1f}s")

    expert_tasks, library = _expert_plan(config, printer)
    names = sorted({*expert_tasks, config.unseen_task, config.compress_task, *config.cpi_tasks})
    tasks = {n: load_task(n, seed=config.seed) for n in names}

    def base_step(work):
        scored = {n: _evaluate(base, tok, tasks[n], config.eval_examples) for n in names}
        return {
            "accuracy": {n: r["accuracy"] for n, r in scored.items()},
            "correct": {n: r["correct"] for n, r in scored.items()},
        }

    base_state = steps.run("base", base_step)
    base_acc, base_correct = base_state["accuracy"], base_state.get("correct", {})
    printer("[demo] base accuracy: " + ", ".join(f"{n} {a:.3f}" for n, a in base_acc.items()))

    report = DemoReport()
    svf = steps.run(
        "svf_experts", lambda work: _svf_experts(base, tok, tasks, expert_tasks, library, config, work, printer)
    )
    for name in expert_tasks:
        r = svf["experts"][name]
        report.rows.append(
            Row(
                "SVF expert" if r.get("library") else "SVF (GRPO)",
                name,
                base_acc[name],
                r["accuracy"],
                r["trainable_params"],
                r["seconds"],
                r.get("note") or f"{config.svf_steps} RL steps",
                base_correct.get(name),
                r.get("correct"),
            )
        )

    t2 = steps.run(
        "transformer2", lambda work: _transformer2(base, tok, tasks, svf, config, work, base_acc[config.unseen_task])
    )
    unseen = config.unseen_task
    report.rows.append(
        Row(
            "Transformer² few-shot CEM",
            unseen,
            t2["base_accuracy"],
            t2["cem_accuracy"],
            0,
            t2["cem_seconds"],
            f"{config.cem_shots} shots, {t2['cem_evaluations']} evaluations",
            base_correct.get(unseen),
            t2.get("cem_correct"),
        )
    )
    report.rows.append(
        Row(
            "Transformer² prompt dispatch",
            unseen,
            t2["base_accuracy"],
            t2["dispatch_accuracy"],
            0,
            t2["pass1_seconds"] + t2["pass2_seconds"],
            f"pass 1 = {100 * t2['pass1_over_pass2']:.0f}% of pass 2",
            base_correct.get(unseen),
            t2.get("dispatch_correct"),
        )
    )
    report.plots["cem_fitness"] = t2["plot"]

    c2i = steps.run(
        "compress",
        lambda work: _compress(base, tok, tasks[config.compress_task], config, work, base_acc[config.compress_task]),
    )
    report.rows.append(
        Row(
            "C2I (SpectralCompress)",
            config.compress_task,
            c2i["before"],
            c2i["after"],
            0,
            c2i["search_seconds"],
            f"{c2i['evaluations']} evaluations, kept {len(c2i['chosen'])}",
            base_correct.get(config.compress_task),
            c2i.get("after_correct", base_correct.get(config.compress_task)),
        )
    )
    report.plots["c2i_scores"] = c2i["plot"]

    cpi = steps.run("cpi", lambda work: _cpi(base, tok, [tasks[n] for n in config.cpi_tasks], config, work))
    for name in config.cpi_tasks:
        report.rows.append(
            Row(
                "CPI-FT (CoreIsolation)",
                name,
                base_acc[name],
                cpi["accuracy"][name],
                cpi["trainable_params"],
                cpi["seconds"],
                f"groups {cpi['groups']}",
                base_correct.get(name),
                cpi.get("correct", {}).get(name),
            )
        )
    report.plots["cpi_jaccard"] = cpi["plot"]
    report.details = {"base": base_acc, "svf": svf, "transformer2": t2, "compress": c2i, "cpi": cpi}

    table = format_table(report.rows)
    printer("\n" + table)
    write_report(report, out / "report.md", table)
    printer(f"\n[demo] report: {out / 'report.md'}")
    return report


# ------------------------------------------------------------------------------------------------------------ steps


def _library_experts(base, tok, tasks, library: dict[str, Path], config: DemoConfig, printer) -> dict:
    """The committed experts, evaluated on the demo's test examples (nothing is trained)."""
    from peft import PeftModel

    experts = {}
    for name, folder in library.items():
        t = time.perf_counter()
        model = PeftModel.from_pretrained(copy.deepcopy(base), str(folder))
        model.eval()
        scored = _evaluate(model, tok, tasks[name], config.eval_examples)
        meta = read_expert_json(folder)
        recipe = meta.get("recipe") or {}
        stages = meta.get("stages")
        how = " → ".join(f"{s.get('method')} {s.get('steps_run')}" for s in stages) if stages else None
        minutes = (meta.get("metrics") or {}).get("train_seconds")
        note = f"committed expert ({how or recipe.get('method', 'trained')} steps"
        note += f", {minutes / 60:.0f} min)" if minutes else ")"
        printer(f"[demo] SVF expert {name} (committed, {folder}): accuracy {scored['accuracy']:.3f}")
        experts[name] = {
            "path": str(folder),
            "library": True,
            **scored,
            "seconds": float(minutes or 0.0),
            "trainable_params": sum(p.numel() for n, p in model.named_parameters() if "svf_z" in n),
            "note": note,
        }
        del model
        printer(f"[demo]   loaded and evaluated in {time.perf_counter() - t:.0f}s")
    return {"experts": experts}


def _svf_experts(base, tok, tasks, expert_tasks, library, config: DemoConfig, work: Path, printer) -> dict:
    if library is not None:
        return _library_experts(base, tok, tasks, library, config, printer)
    from tqdm.auto import tqdm

    from .training import train_svf

    experts = {}
    for name in expert_tasks:
        task = tasks[name]
        target = work / name
        t = time.perf_counter()
        result = train_svf(
            copy.deepcopy(base),
            tok,
            task,
            method="rl",
            algorithm="grpo",
            max_steps=config.svf_steps,
            output_dir=str(work / f"{name}_checkpoints"),
            printer=tqdm.write,
            seed=config.seed,
            disable_tqdm=not config.progress,
        )
        seconds = time.perf_counter() - t
        model = result.model
        model.save_pretrained(target)
        (target / "transformer2_expert.json").write_text(json.dumps({"name": name, "description": task.description}))
        shutil.rmtree(work / f"{name}_checkpoints", ignore_errors=True)
        scored = _evaluate(model, tok, task, config.eval_examples)
        acc = scored["accuracy"]
        printer(f"[demo] SVF expert {name}: accuracy {acc:.3f} after {config.svf_steps} steps ({seconds:.0f}s)")
        experts[name] = {
            "path": str(target),
            **scored,
            "seconds": seconds,
            "trainable_params": result.trainable_parameters,
            "reward": result.final("reward"),
        }
    return {"experts": experts}


def _transformer2(base, tok, tasks, svf: dict, config: DemoConfig, work: Path, base_acc: float) -> dict:
    from .evaluation import evaluate
    from .transformer2 import CEMConfig, ExpertLibrary, FewShotMixer, PromptDispatcher, two_pass_evaluate
    from .transformer2.library import expert_name

    task = tasks[config.unseen_task]
    specs = [  # adapter names allow letters, digits, "_" and "-": "arithmetic/2_digit_addition" needs a new name
        {"name": expert_name(n), "source": e["path"], "description": tasks[n].description}
        for n, e in svf["experts"].items()
    ]
    library = ExpertLibrary.load(copy.deepcopy(base), tok, specs)
    test = task.test[: config.eval_examples]  # the base model's accuracy on it is `base_acc` (step "base")
    mixer = FewShotMixer(library, task.train[: config.cem_shots], kind=task.kind)
    cem = mixer.search(
        CEMConfig(
            population=config.cem_population,
            generations=config.cem_generations,
            seed=config.seed,
            progress=config.progress,
        )
    )
    mixer.save(work / "mixture", result=cem)
    with library.use(mixer.adapter_name):
        cem_result = evaluate(library.model, tok, test, kind=task.kind)
    cem_acc = float(cem_result.accuracy)
    dispatch = two_pass_evaluate(library, PromptDispatcher(), test, kind=task.kind)
    plot = plot_fitness(cem.history, work / "cem_fitness.png", title=f"Few-shot CEM on {task.name}")
    return {
        "base_accuracy": base_acc,
        "cem_accuracy": cem_acc,
        "cem_correct": [bool(c) for c in cem_result.correct],
        "cem_alpha": cem.best_alpha.tolist(),
        "cem_fitness_curve": cem.fitness_curve,
        "cem_evaluations": cem.evaluations,
        "cem_seconds": cem.seconds,
        "dispatch_accuracy": float(dispatch.accuracy),
        "dispatch_correct": [bool(c) for c in dispatch.correct or []] or None,
        "dispatch_choices": {k: len(v) for k, v in dispatch.groups.items()},
        "pass1_seconds": dispatch.pass1_seconds,
        "pass2_seconds": dispatch.pass2_seconds,
        "pass1_over_pass2": dispatch.pass1_over_pass2,
        "plot": str(plot),
    }


def _compress(base, tok, task, config: DemoConfig, work: Path, before: float) -> dict:
    from . import compress as C
    from .evaluation import evaluate

    model = copy.deepcopy(base)
    layers = config.c2i_layers
    if layers is None:
        layers = range(0, model.config.num_hidden_layers, config.c2i_layer_stride)
    modules = C.find_target_modules(model, ["o_proj", *MLP], list(layers))
    calibration = C.take_examples(task.train, config.c2i_grad_examples, "calibration (train)")
    search = C.C2ISearchConfig(  # kept only when the gain is beyond a paired bootstrap's noise (the default guard)
        n_eval=config.c2i_eval_examples, kind=task.kind, clusters=1, seed=config.seed, progress=True
    )
    result = C.c2i_search(model, calibration, task.validation, modules, search, tokenizer=tok)
    test = task.test[: config.eval_examples]  # `before` is the base model's accuracy on it (step "base")
    after, after_correct = before, None
    if result.chosen:
        adapted = C.apply_result(model, result)
        scored = evaluate(adapted, tok, test, kind=task.kind)
        after, after_correct = float(scored.accuracy), [bool(c) for c in scored.correct]
        adapted.save_pretrained(work / "adapter")
    plot = plot_c2i_scores(result.candidates, work / "c2i_scores.png", title=f"C2I scores on {task.name}")
    return {
        "before": before,
        "after": after,
        "after_correct": after_correct,
        "chosen": [str(iv) for iv in result.chosen],
        "evaluations": result.evaluations,
        "search_seconds": result.wall_time_s,
        "search_base": result.base.accuracy,
        "search_best": result.best.accuracy,
        "plot": str(plot),
    }


def _cpi(base, tok, tasks, config: DemoConfig, work: Path) -> dict:
    from .cpi import CPIConfig, CPIPipeline
    from .tuners.core_isolation import CoreIsolationConfig

    cpi_config = CPIConfig(
        adapter=CoreIsolationConfig(target_modules=MLP),
        probe_steps=config.cpi_probe_steps,
        stage_steps=config.cpi_stage_steps,
        batch_size=4,
        max_length=128,
        seed=config.seed,
    )
    accuracy: dict[str, float] = {}
    correct: dict[str, list[bool]] = {}

    def eval_fn(model, tokenizer, task):
        scored = _evaluate(model, tokenizer, task, config.eval_examples)
        accuracy[task.name], correct[task.name] = scored["accuracy"], scored["correct"]
        return {"accuracy": accuracy[task.name]}

    t = time.perf_counter()
    pipe = CPIPipeline(copy.deepcopy(base), tok, tasks, cpi_config, work / "state", eval_fn=eval_fn)
    result = pipe.run()
    seconds = time.perf_counter() - t
    if not accuracy:  # resumed past the final evaluation: evaluate the final model again
        for task in tasks:
            eval_fn(pipe.model, tok, task)
    jaccard = work / "state" / "jaccard.png"
    return {
        "accuracy": accuracy,
        "correct": correct,
        "groups": result.get("groups"),
        "jaccard": result.get("jaccard"),
        "trainable_params": _trainable(pipe.model),
        "seconds": seconds,
        "plot": str(jaccard) if jaccard.exists() else "",
    }


# ------------------------------------------------------------------------------------------------------------ output


def _accuracy_cells(row: Row) -> tuple[str, str, str]:
    """Base and adapted accuracy with n and 95% intervals and the paired Δ, when both verdict lists are there and
    match; else the plain accuracies and `—`."""
    from .stats import accuracy_ci, compare_paired, format_accuracy, format_comparison

    a, b = row.base_correct, row.adapted_correct
    if a and b and len(a) == len(b):
        return (
            format_accuracy(accuracy_ci(a)),
            format_accuracy(accuracy_ci(b)),
            format_comparison(compare_paired(a, b)).removeprefix("Δ "),
        )
    return f"{row.base_accuracy:.3f}", f"{row.adapted_accuracy:.3f}", "—"


def format_table(rows: Sequence[Row]) -> str:
    """The summary as a markdown table (also readable in a terminal): accuracies as `0.620 [0.55, 0.69] (n=200)`
    (95% Wilson interval) and `Δ vs base` as `+0.045 [+0.01, +0.08] p=0.02 *` (paired bootstrap interval, exact
    McNemar p, `*` when the interval excludes 0), see [`peft_spectral.stats`]."""
    lines = [
        (
            "| method | task | base acc [95% CI] | adapted acc [95% CI] | Δ vs base [95% CI] | trainable params | "
            "wall time (s) | note |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        base, adapted, delta = _accuracy_cells(r)
        lines.append(
            f"| {r.method} | {r.task} | {base} | {adapted} | {delta} | {r.trainable_params:,} | {r.wall_time_s:.0f} "
            f"| {r.note} |"
        )
    lines += ["", SCORING_NOTE]
    return "\n".join(lines)


#: How the demo scores, printed under its table.
SCORING_NOTE = (
    "Scoring: multiple-choice answers by the highest log-likelihood option, generation tasks by the greedy answer, "
    "on the first test examples of each task. The experts' model cards and docs/results/experts.md judge greedy "
    "generated answers on up to 400 test examples instead, where learning the answer format counts; the two can "
    "differ (the logical_fallacy_detection expert gains there and not here: it learned the format, not the task)."
)


def write_report(report: DemoReport, path: Path, table: str) -> None:
    parts = ["# peft_spectral demo", "", table, ""]
    titles = {
        "cem_fitness": "Transformer² few-shot CEM: best fitness per generation",
        "c2i_scores": "Compress to Impress: first-order score of each matrix by layer",
        "cpi_jaccard": "CPI-FT: Jaccard similarity of task core regions",
    }
    for key, plot in report.plots.items():
        if plot:
            rel = Path(os.path.relpath(Path(plot).resolve(), path.parent.resolve()))
            parts += [f"## {titles.get(key, key)}", "", f"![{key}]({rel.as_posix()})", ""]
    path.write_text("\n".join(parts))


def plot_fitness(history: Sequence[dict], path: Path, title: str = "CEM") -> Path:
    """Best-so-far, generation-best and generation-mean fitness per CEM generation."""
    plt = pyplot("the demo's plots")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    gens = list(range(1, len(history) + 1))
    for key, label in (
        ("best", "best so far"),
        ("generation_best", "generation best"),
        ("generation_mean", "generation mean"),
    ):
        ax.plot(gens, [h[key] for h in history], marker="o", label=label)
    ax.set_xlabel("generation")
    ax.set_ylabel("accuracy on the shots")
    ax.set_title(title)
    ax.legend()
    return save_figure(fig, path, dpi=110)


def plot_c2i_scores(candidates: Sequence[Any], path: Path, title: str = "C2I") -> Path:
    """For each matrix type, the best (lowest) first-order score over ρ, by layer."""
    plt = pyplot("the demo's plots")
    best: dict[str, dict[int, float]] = {}
    for c in candidates:
        iv = c.intervention
        if iv.layer is None or c.score is None:
            continue
        per = best.setdefault(iv.matrix, {})
        per[iv.layer] = min(per.get(iv.layer, float("inf")), float(c.score))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for matrix, per in sorted(best.items()):
        layers = sorted(per)
        ax.plot(layers, [per[layer] for layer in layers], marker="o", label=matrix)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("layer")
    ax.set_ylabel("estimated Δloss of the best ρ (lower = helps)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=110)
