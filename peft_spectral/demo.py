"""The main job: adapt one model with all three methods on reasoning-gym tasks and report the numbers.

`peft-spectral demo` runs, on the embedded SmolLM2-135M-Instruct (or `--model`):

1. **SVF experts**: the expert library shipped with the package (`peft_spectral/library/`, trained by
   `benchmarks/bench_experts.py --train`), evaluated on their tasks; with `train_experts=True`, another model, or no
   library, one expert per task is trained briefly with [`peft_spectral.training.train_expert`] (SFT then GRPO);
2. **Transformer²**: the experts composed for a task none of them saw (a harder setting of an expert's skill):
   few-shot CEM mixing weights and two-pass prompt dispatch, with the time of each pass;
3. **SpectralCompress**: a Compress-to-Impress search (one gradient pass) on one task, accuracy before and after;
4. **CoreIsolation**: a small CPI-FT run on three tasks.

Every accuracy is greedy generation scored with lenient answer extraction (the answer may sit in a sentence, see
[`peft_spectral.data.answers`]), on the first `eval_examples` test questions; each comes with its 95% Wilson interval
and Δ vs the base model on the same questions with a paired 95% interval ([`peft_spectral.stats`]). Each step's
result is kept in `<output_dir>/demo_state.json` and read back when the same command runs again.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from .plots import pyplot, save_figure


MLP = ["gate_proj", "up_proj", "down_proj"]
_SUMS = "allow_negation=false&allow_parentheses=false&operators=+,-"
#: Expert tasks trained when there is no library (or `train_experts=True`) and none are named.
DEFAULT_EXPERT_TASKS = (
    f"rg:basic_arithmetic?max_digits=2&max_terms=2&min_terms=2&{_SUMS}",
    "rg:word_sequence_reversal?max_words=3&min_words=2",
    "rg:letter_counting?max_words=3&min_words=1",
)


@dataclass
class DemoConfig:
    """Settings of [`run_demo`].

    Args:
        model (`str`, *optional*): Hub id or local path; the embedded SmolLM2-135M-Instruct when `None`.
        output_dir (`str`): Where results are written (and resumed from).
        experts_dir (`str`, *optional*): The expert library; `None`: the library shipped with the package. Used only
            with the embedded model (the shipped experts were trained on it).
        expert_tasks (`Sequence[str]`, *optional*): Task specs of the experts; `None`: the library's, or
            [`DEFAULT_EXPERT_TASKS`] when training.
        train_experts (`bool`): Train the experts (`expert_sft_steps` SFT + `expert_rl_steps` GRPO steps each).
        unseen_task (`str`): Task spec for Transformer² that no expert was trained on.
        compress_task (`str`): Task spec of the C2I search.
        cpi_tasks (`Sequence[str]`): Task specs of the CPI-FT run.
        eval_examples (`int`): Test questions per accuracy.
        max_new_tokens (`int`): Generation budget of every evaluation.
        cem_shots, cem_population, cem_generations (`int`): Few-shot CEM settings (reference: 32 / 50 generations).
        c2i_layer_stride, c2i_grad_examples, c2i_eval_examples, c2i_top_k (`int`): The C2I search: MLP and `o_proj`
            matrices of every `c2i_layer_stride`-th layer, gradient and evaluation samples, candidates evaluated.
        cpi_probe_steps, cpi_stage_steps (`int`): SFT steps of each CPI probe and each stage.
        seed (`int`), device (`str`), dtype (`str`), progress (`bool`): As everywhere.
    """

    model: Optional[str] = None
    output_dir: str = "runs/demo"
    experts_dir: Optional[str] = None
    expert_tasks: Optional[Sequence[str]] = None
    train_experts: bool = False
    expert_sft_steps: int = 30
    expert_rl_steps: int = 4
    unseen_task: str = "rg:chain_sum?max_digits=1&max_terms=3&min_terms=3"
    compress_task: str = f"rg:basic_arithmetic?max_digits=1&max_terms=2&min_terms=2&{_SUMS}"
    cpi_tasks: Sequence[str] = (
        f"rg:basic_arithmetic?max_digits=1&max_terms=2&min_terms=2&{_SUMS}",
        "rg:word_sequence_reversal?max_words=3&min_words=2",
        "rg:letter_counting?max_words=3&min_words=1",
    )
    eval_examples: int = 50
    max_new_tokens: int = 16
    cem_shots: int = 12
    cem_population: int = 10
    cem_generations: int = 5
    c2i_layer_stride: int = 3
    c2i_grad_examples: int = 100
    c2i_eval_examples: int = 40
    c2i_top_k: int = 3
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
            "expert_sft_steps": 2,
            "expert_rl_steps": 1,
            "eval_examples": 8,
            "max_new_tokens": 6,
            "cem_shots": 4,
            "cem_population": 4,
            "cem_generations": 2,
            "c2i_layer_stride": 10,
            "c2i_grad_examples": 8,
            "c2i_eval_examples": 8,
            "c2i_top_k": 2,
            "cpi_probe_steps": 2,
            "cpi_stage_steps": 2,
        }
        return cls(**{**small, **overrides})


@dataclass
class Row:
    """One line of the summary table (per-example verdicts of base and adapted model on the same questions)."""

    method: str
    task: str
    base_correct: list[bool]
    adapted_correct: list[bool]
    trainable_params: int
    wall_time_s: float
    note: str = ""


@dataclass
class DemoReport:
    rows: list[Row] = field(default_factory=list)
    plots: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


def _evaluate(model, tokenizer, task, config: DemoConfig) -> list[bool]:
    from .evaluation import evaluate

    test = task.test[: config.eval_examples]
    return evaluate(model, tokenizer, test, kind=task.kind, max_new_tokens=config.max_new_tokens).correct


def _experts(config: DemoConfig, printer) -> tuple[list[str], dict[str, Path]]:
    """The expert task specs and, when the library is used, `spec -> adapter directory` (empty: train them)."""
    from .paths import library_dir
    from .transformer2.library import find_experts

    if config.train_experts or config.model is not None:
        if config.model is not None and not config.train_experts:
            printer("[demo] --model given: the shipped experts were trained on the embedded model; training new ones")
        return list(config.expert_tasks or DEFAULT_EXPERT_TASKS), {}
    folder = Path(config.experts_dir) if config.experts_dir else library_dir()
    found = {(e.meta.get("task_spec") or e.task): e.path for e in find_experts(folder)}
    tasks = list(config.expert_tasks or [t for t in found if t != config.unseen_task])
    missing = [t for t in tasks if t not in found]
    if not found or missing:
        printer(f"[demo] no shipped expert for {missing or 'any task'} in {folder}: training the experts")
        return list(config.expert_tasks or DEFAULT_EXPERT_TASKS), {}
    return tasks, {t: found[t] for t in tasks}


def run_demo(config: DemoConfig, *, printer: Callable[[str], None] = print) -> DemoReport:
    """Run (or resume) the demo and return its report; see the module docstring."""
    from .assets import load_model
    from .benchmarking import BenchmarkRun
    from .data import check_task_spec, load_task

    expert_tasks, library = _experts(config, printer)
    names = list(dict.fromkeys([*expert_tasks, config.unseen_task, config.compress_task, *config.cpi_tasks]))
    for name in names:
        check_task_spec(name)  # a bad spec fails here, before the model loads
    out = Path(config.output_dir)
    run = BenchmarkRun("demo", out, asdict(config) | {"expert_tasks": expert_tasks}, progress=config.progress)
    t0 = time.perf_counter()
    base, tok = load_model(config.model, dtype=config.dtype, device=config.device)
    printer(f"[demo] model loaded in {time.perf_counter() - t0:.1f}s")
    tasks = {n: load_task(n, seed=config.seed) for n in names}
    base_correct = {n: run.cached(f"base:{n}", lambda n=n: _evaluate(base, tok, tasks[n], config)) for n in names}
    printer("[demo] base accuracy: " + ", ".join(f"{n} {sum(c) / len(c):.3f}" for n, c in base_correct.items()))

    report = DemoReport()
    svf = run.cached("svf_experts", lambda: _svf_experts(base, tok, tasks, expert_tasks, library, config, printer))
    for name in expert_tasks:
        r = svf[name]
        report.rows.append(
            Row(r["method"], name, base_correct[name], r["correct"], r["trainable_params"], r["seconds"], r["note"])
        )
    t2 = run.cached("transformer2", lambda: _transformer2(base, tok, tasks, svf, config, out / "transformer2"))
    unseen = config.unseen_task
    cem_note = f"{config.cem_shots} shots, {t2['cem_evaluations']} evaluations"
    pass_note = f"pass 1 = {100 * t2['pass1_over_pass2']:.0f}% of pass 2; chose {t2['dispatch_choices']}"
    report.rows += [
        Row(
            "Transformer² few-shot CEM",
            unseen,
            base_correct[unseen],
            t2["cem_correct"],
            0,
            t2["cem_seconds"],
            cem_note,
        ),
        Row(
            "Transformer² prompt dispatch",
            unseen,
            base_correct[unseen],
            t2["dispatch_correct"],
            0,
            t2["pass1_seconds"] + t2["pass2_seconds"],
            pass_note,
        ),
    ]
    report.plots["cem_fitness"] = t2["plot"]
    c2i = run.cached("compress", lambda: _compress(base, tok, tasks[config.compress_task], config, out / "compress"))
    after = c2i["after_correct"] or base_correct[config.compress_task]
    note = f"{c2i['evaluations']} evaluations, kept {len(c2i['chosen'])}"
    report.rows.append(
        Row("C2I (SpectralCompress)", config.compress_task, base_correct[config.compress_task], after, 0,
            c2i["search_seconds"], note)
    )  # fmt: skip
    report.plots["c2i_scores"] = c2i["plot"]
    cpi = run.cached("cpi", lambda: _cpi(base, tok, {n: tasks[n] for n in config.cpi_tasks}, config, out / "cpi"))
    for name in config.cpi_tasks:
        report.rows.append(
            Row("CPI-FT (CoreIsolation)", name, base_correct[name], cpi["correct"][name], cpi["trainable_params"],
                cpi["seconds"], f"groups {cpi['groups']}")
        )  # fmt: skip
    report.plots["cpi_jaccard"] = cpi["plot"]
    report.details = {"svf": svf, "transformer2": t2, "compress": c2i, "cpi": cpi}
    table = format_table(report.rows)
    printer("\n" + table)
    run.write({"rows": [asdict(r) for r in report.rows], "details": report.details}, table, title="peft_spectral demo")
    write_report(report, out / "report.md", run.header(), table)
    printer(f"\n[demo] report: {out / 'report.md'}")
    return report


# ------------------------------------------------------------------------------------------------------------ steps


def _svf_experts(base, tok, tasks, expert_tasks, library: dict[str, Path], config: DemoConfig, printer) -> dict:
    from peft import PeftModel

    from .model_card import read_expert_json
    from .training import SVFTrainingConfig, train_expert

    experts = {}
    for name in expert_tasks:
        t = time.perf_counter()
        if name in library:
            folder = library[name]
            model = PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
            meta = read_expert_json(folder)
            seconds = float((meta.get("metrics") or {}).get("train_seconds") or 0.0)
            stages = " → ".join(f"{s.get('method')} {s.get('steps_run')}" for s in meta.get("stages") or [])
            method, note = "SVF expert (shipped)", f"trained {stages} steps, {seconds / 60:.0f} min"
        else:
            folder = Path(config.output_dir) / "experts" / name.replace(":", "_").replace("?", "_")[:80]
            job = SVFTrainingConfig(
                task=name,
                output_dir=str(folder),
                seed=config.seed,
                sft_steps=config.expert_sft_steps,
                rl_steps=config.expert_rl_steps,
                prompts_per_step=4,
                max_completion_length=config.max_new_tokens,
                eval_max_new_tokens=config.max_new_tokens,
                progress=config.progress,
            )
            trained = train_expert(job, base, tok, task=tasks[name], printer=printer)
            model, seconds = trained.model.eval(), sum(s["wall_seconds"] for s in trained.stages)
            method = "SVF (SFT → GRPO)"
            note = f"{config.expert_sft_steps} SFT + {config.expert_rl_steps} GRPO steps"
        correct = _evaluate(model, tok, tasks[name], config)
        printer(
            f"[demo] SVF expert {name}: accuracy {sum(correct) / len(correct):.3f} ({time.perf_counter() - t:.0f}s)"
        )
        experts[name] = {
            "name": _expert_name(tasks[name]),
            "path": str(folder),
            "method": method,
            "correct": correct,
            "seconds": seconds,
            "trainable_params": sum(p.numel() for n, p in model.named_parameters() if "svf_z" in n),
            "note": note,
            "description": tasks[name].description,
        }
    return experts


def _expert_name(task) -> str:
    """A short adapter name for a task's expert: the generator of a reasoning-gym task, else the task name."""
    from .transformer2.library import expert_name

    return expert_name(str(task.params.get("generator") or task.name))[:48]


def _transformer2(base, tok, tasks, svf: dict, config: DemoConfig, work: Path) -> dict:
    from .evaluation import evaluate
    from .transformer2 import CEMConfig, ExpertLibrary, FewShotMixer, PromptDispatcher, two_pass_evaluate

    task = tasks[config.unseen_task]
    specs = [{"name": e["name"], "source": e["path"], "description": e["description"]} for e in svf.values()]
    library = ExpertLibrary.load(copy.deepcopy(base), tok, specs)
    test = task.test[: config.eval_examples]
    mixer = FewShotMixer(library, task.train[: config.cem_shots], kind=task.kind, max_new_tokens=config.max_new_tokens)
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
        cem_result = evaluate(library.model, tok, test, kind=task.kind, max_new_tokens=config.max_new_tokens)
    dispatch = two_pass_evaluate(
        library, PromptDispatcher(), test, kind=task.kind, max_new_tokens=config.max_new_tokens
    )
    plot = plot_fitness(cem.history, work / "cem_fitness.png", title=f"Few-shot CEM on {task.name}")
    return {
        "cem_correct": [bool(c) for c in cem_result.correct],
        "cem_alpha": cem.best_alpha.tolist(),
        "cem_fitness_curve": cem.fitness_curve,
        "cem_evaluations": cem.evaluations,
        "cem_seconds": cem.seconds,
        "dispatch_correct": [bool(c) for c in dispatch.correct or []],
        "dispatch_choices": {k: len(v) for k, v in dispatch.groups.items()},
        "pass1_seconds": dispatch.pass1_seconds,
        "pass2_seconds": dispatch.pass2_seconds,
        "pass1_over_pass2": dispatch.pass1_over_pass2,
        "plot": str(plot),
    }


def _compress(base, tok, task, config: DemoConfig, work: Path) -> dict:
    from . import compress as C

    model = copy.deepcopy(base)
    layers = range(0, model.config.num_hidden_layers, config.c2i_layer_stride)
    modules = C.find_target_modules(model, ["o_proj", *MLP], list(layers))
    calibration = C.take_examples(task.train, config.c2i_grad_examples, "calibration (train)")
    search = C.C2ISearchConfig(  # kept only when the gain is beyond a paired bootstrap's noise (the default guard)
        n_eval=config.c2i_eval_examples, kind=task.kind, clusters=1, top_k=config.c2i_top_k, seed=config.seed
    )
    eval_fn = _short_eval_fn(tok, task.kind, config.max_new_tokens)
    result = C.c2i_search(model, calibration, task.validation, modules, search, tokenizer=tok, eval_fn=eval_fn)
    after_correct = None
    if result.chosen:
        adapted = C.apply_result(model, result)
        after_correct = _evaluate(adapted, tok, task, config)
        adapted.save_pretrained(work / "adapter")
    plot = plot_c2i_scores(result.candidates, work / "c2i_scores.png", title=f"C2I scores on {task.name}")
    return {
        "after_correct": after_correct,
        "chosen": [str(iv) for iv in result.chosen],
        "evaluations": result.evaluations,
        "search_seconds": result.wall_time_s,
        "plot": str(plot),
    }


def _short_eval_fn(tokenizer, kind: str, max_new_tokens: int):
    """The C2I evaluation: accuracy of greedy short answers, mean gold log-likelihood as the tie-breaker."""
    from .compress import EvalSummary
    from .evaluation import answer_logliks, evaluate

    def run(model, examples):
        examples = list(examples)
        r = evaluate(model, tokenizer, examples, kind=kind, max_new_tokens=max_new_tokens)
        margins = answer_logliks(model, tokenizer, examples).tolist()
        return EvalSummary(float(r.accuracy), float(r.mean_loglik), int(r.n), 0.0, list(r.correct), margins)

    return run


def _cpi(base, tok, by_spec: dict, config: DemoConfig, work: Path) -> dict:
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
    correct: dict[str, list[bool]] = {}

    def eval_fn(model, tokenizer, task):
        correct[task.name] = _evaluate(model, tokenizer, task, config)
        return {"accuracy": sum(correct[task.name]) / len(correct[task.name])}

    t = time.perf_counter()
    tasks = list(by_spec.values())
    pipe = CPIPipeline(copy.deepcopy(base), tok, tasks, cpi_config, work / "state", eval_fn=eval_fn)
    result = pipe.run()
    for task in tasks:  # resumed past the final evaluation: evaluate the final model again
        if task.name not in correct:
            eval_fn(pipe.model, tok, task)
    jaccard = work / "state" / "jaccard.png"
    return {
        "correct": {spec: correct[task.name] for spec, task in by_spec.items()},
        "groups": result.get("groups"),
        "jaccard": result.get("jaccard"),
        "trainable_params": sum(p.numel() for p in pipe.model.parameters() if p.requires_grad),
        "seconds": time.perf_counter() - t,
        "plot": str(jaccard) if jaccard.exists() else "",
    }


# ------------------------------------------------------------------------------------------------------------ output


def format_table(rows: Sequence[Row]) -> str:
    """The summary as a markdown table: accuracies as `0.620 [0.55, 0.69] (n=200)` (95% Wilson interval) and
    `Δ vs base` as `+0.045 [+0.01, +0.08] p=0.02 *` (paired bootstrap interval, exact McNemar p, `*` when the interval
    excludes 0), see [`peft_spectral.stats`]."""
    from .stats import accuracy_ci, compare_paired, format_accuracy, format_comparison

    header = (
        "| method | task | base acc [95% CI] | adapted acc [95% CI] | Δ vs base [95% CI] | params | time (s) | note |"
    )
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        base, adapted = format_accuracy(accuracy_ci(r.base_correct)), format_accuracy(accuracy_ci(r.adapted_correct))
        delta = format_comparison(compare_paired(r.base_correct, r.adapted_correct)).removeprefix("Δ ")
        lines.append(
            f"| {r.method} | `{r.task}` | {base} | {adapted} | {delta} | {r.trainable_params:,} | "
            f"{r.wall_time_s:.0f} | {r.note} |"
        )
    return "\n".join([*lines, "", SCORING_NOTE])


#: How the demo scores, printed under its table.
SCORING_NOTE = (
    "Scoring: greedy answers on the first test questions of each task, read leniently (the answer may sit in a "
    "sentence: 'The GCD is 6.' counts as 6), by the task's own verifier; base and adapted model on the same questions. "
    "The experts' model cards also give strict accuracies (the bare answer only)."
)


def write_report(report: DemoReport, path: Path, header: str, table: str) -> None:
    """`report.md`: the header line, the table and the plots."""
    parts = ["# peft_spectral demo", "", header, "", table, ""]
    titles = {
        "cem_fitness": "Transformer² few-shot CEM: best fitness per generation",
        "c2i_scores": "Compress to Impress: first-order score of each matrix by layer",
        "cpi_jaccard": "CPI-FT: Jaccard similarity of task core regions",
    }
    for key, plot in report.plots.items():
        if plot:
            rel = Path(plot).resolve().relative_to(path.parent.resolve())
            parts += [f"## {titles.get(key, key)}", "", f"![{key}]({rel.as_posix()})", ""]
    path.write_text("\n".join(parts))


def plot_fitness(history: Sequence[dict], path: Path, title: str = "CEM") -> Path:
    """Best-so-far, generation-best and generation-mean fitness per CEM generation."""
    plt = pyplot("the demo's plots")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    gens = list(range(1, len(history) + 1))
    for key, label in (("best", "best so far"), ("generation_best", "generation best"), ("generation_mean", "mean")):
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
