"""Benchmark of Transformer² inference on the embedded model with saved SVF experts.

Measures, on BigBench tasks none of the experts was trained on: accuracy of the base model, prompt dispatch, the
classifier expert (each with the "others" threshold fitted on validation prompts, and as plain argmax) and few-shot
CEM (regularised by default, `--cem-reference` for the plain reference); dispatch accuracy on the experts' own test
splits and on unrelated ("others") tasks; pass-1 / pass-2 time, mixed-adapter vs grouped pass 2, and expert-switch
time / pass-2 time. Writes `docs/results/transformer2.json`, `docs/results/transformer2.md` and the
CEM fitness plot `docs/results/cem_fitness.png`.

Usage (defaults sized for a shared 2-core CPU, ~20 min; the defaults are the settings of docs/results)::

    python benchmarks/bench_transformer2.py --experts-dir benchmarks/experts
    python benchmarks/bench_transformer2.py --train-experts arithmetic date_understanding epistemic_reasoning \
        --experts-dir /tmp/t2-experts      # no experts yet: train three quick SVF-SFT experts first

Experts are the sub-directories of `--experts-dir` holding an `adapter_config.json`; the task of each is its path
relative to `--experts-dir` (e.g. `experts/arithmetic/`), its description the task's BigBench description (or the
line naming it in `experts/README.md`).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import re
import sys
import time
from pathlib import Path

import torch


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from peft_spectral.assets import load_default_model  # noqa: E402
from peft_spectral.tasks import load_task  # noqa: E402
from peft_spectral.transformer2 import (  # noqa: E402
    OTHERS,
    CEMConfig,
    DispatchPrompt,
    ExpertLibrary,
    FewShotMixer,
    FixedDispatcher,
    PromptDispatcher,
    build_classifier_examples,
    calibrate_threshold,
    dispatch_report,
    labelled_prompts,
    train_classifier_expert,
    two_pass_evaluate,
    two_pass_generate,
)
from peft_spectral.transformer2.two_pass import run_pass1  # noqa: E402


logger = logging.getLogger("bench_transformer2")
UNSEEN_PREFERENCE = [
    "sports_understanding",
    "navigate",
    "snarks",
    "causal_judgment",
    "date_understanding",
    "epistemic_reasoning",
    "logical_deduction",
]
REFERENCE_CEM = {"population": 32, "elite_fraction": 0.2, "init_std": 0.5, "generations": 50, "clamp": [0, 1]}


def short_description(text: str, limit: int = 90) -> str:
    """First sentence of a task description, at most `limit` characters."""
    text = " ".join(text.split())
    first = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    return first if len(first) <= limit else first[: limit - 3].rstrip() + "..."


def expert_name(task: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]", "_", task)


def find_experts(root: Path) -> list[tuple[str, Path]]:
    """(task, directory) of every saved adapter below `root`."""
    found = []
    for cfg in sorted(root.rglob("adapter_config.json")):
        task = str(cfg.parent.relative_to(root))
        if task == ".":
            continue
        found.append((task, cfg.parent))
    return found


def expert_metadata(folder: Path) -> dict:
    """`expert.json` (written by bench_svf_rl) or `transformer2_expert.json` of an expert directory, if any."""
    for name in ("expert.json", "transformer2_expert.json"):
        if (folder / name).is_file():
            return json.loads((folder / name).read_text())
    return {}


def readme_descriptions(root: Path) -> dict[str, str]:
    """`task -> description` read from lines of `README.md` that name a task in backticks or bold."""
    readme = root / "README.md"
    if not readme.is_file():
        return {}
    out = {}
    for line in readme.read_text().splitlines():
        m = re.match(r"^\s*[-*|]?\s*(?:`|\*\*)([\w/\-]+)(?:`|\*\*)\s*[:|—\-]+\s*(.+?)\s*\|?\s*$", line)
        if m:
            out[m.group(1)] = m.group(2).strip(" |")
    return out


def train_quick_experts(model, tok, tasks: list[str], out_root: Path, steps: int, batch_size: int) -> None:
    """Train one small SVF-SFT expert per task (fallback when the TRL experts are not there)."""
    import copy

    from peft_spectral import SVFConfig
    from peft_spectral.training import train_svf

    for name in tasks:
        target = out_root / name
        if (target / "adapter_config.json").is_file():
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
        (target / "transformer2_expert.json").write_text(
            json.dumps(
                {
                    "name": expert_name(name),
                    "description": short_description(task.description),
                    "trained": f"SVF-SFT, {steps} steps x {batch_size}, lr 5e-3 (quick fallback)",
                    "seconds": time.perf_counter() - start,
                }
            )
        )
        logger.info("trained fallback expert %s in %.0fs", name, time.perf_counter() - start)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts-dir", default=str(REPO / "benchmarks" / "experts"))
    p.add_argument(
        "--train-experts",
        nargs="*",
        default=None,
        metavar="TASK",
        help="first train quick SVF-SFT experts on these BigBench tasks into --experts-dir",
    )
    p.add_argument("--expert-steps", type=int, default=10)
    p.add_argument(
        "--unseen", nargs="+", default=None, help="unseen BigBench tasks (default: 2 from a preference list)"
    )
    p.add_argument("--n-test", type=int, default=32, help="test examples per unseen task")
    p.add_argument("--n-dispatch", type=int, default=16, help="test examples per expert task for dispatch accuracy")
    p.add_argument("--shots", type=int, default=8, help="few-shot examples (from the train split) for CEM")
    p.add_argument("--population", type=int, default=None, help="CEM population (default: CEMConfig's, 16)")
    p.add_argument("--generations", type=int, default=None, help="CEM generations (default: CEMConfig's, 12)")
    p.add_argument("--elite-fraction", type=float, default=None, help="default: CEMConfig's (0.25)")
    p.add_argument("--init-std", type=float, default=0.5)
    p.add_argument("--cem-reference", action="store_true", help="plain reference CEM instead of the regularised one")
    p.add_argument("--holdout-fraction", type=float, default=0.4, help="regularised CEM: shots held out")
    p.add_argument("--l1-penalty", type=float, default=0.01, help="regularised CEM: penalty on mean |alpha|")
    p.add_argument("--patience", type=int, default=4, help="regularised CEM: early-stopping patience")
    p.add_argument(
        "--others-tasks",
        nargs="*",
        default=None,
        help="unrelated BigBench tasks for the 'others' class (default: 2 unused ones from the preference list)",
    )
    p.add_argument("--others-per-task", type=int, default=8, help="'others' training examples per unrelated task")
    p.add_argument("--no-others", action="store_true", help="train the classifier on the experts' data only")
    p.add_argument("--n-calibrate", type=int, default=8, help="validation prompts per category to fit thresholds")
    p.add_argument("--threshold-target", choices=("accuracy", "balanced_accuracy"), default="balanced_accuracy")
    p.add_argument("--confidence", choices=("margin", "probability"), default="margin")
    p.add_argument("--no-threshold", action="store_true", help="dispatch by plain argmax only (no 'others' fit)")
    p.add_argument("--prefix-sharing", choices=("prompts", "instruction"), default="prompts")
    p.add_argument("--no-mixed-batch", action="store_true", help="pass 2 grouped by expert")
    p.add_argument(
        "--no-compare-paths", action="store_true", help="do not also time the other pass-2 path (mixed/grouped)"
    )
    p.add_argument("--classifier-steps", type=int, default=8)
    p.add_argument("--classifier-batch", type=int, default=4)
    p.add_argument("--classifier-per-task", type=int, default=16)
    p.add_argument("--classifier-lr", type=float, default=1e-2)
    p.add_argument(
        "--classifier-layers",
        type=int,
        default=0,
        help="the classifier adapts the MLPs of the last N blocks only (cheaper backward); 0 = all",
    )
    p.add_argument(
        "--no-lettered",
        action="store_true",
        help="do not add lettered options to prompts lacking them (load_task's prompts have them)",
    )
    p.add_argument("--max-question-tokens", type=int, default=32)
    p.add_argument("--gen-prompts", type=int, default=8, help="prompts for the two-pass generation timing")
    p.add_argument("--gen-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=str(REPO / "docs" / "results"))
    p.add_argument("--work-dir", default="/tmp/bench_transformer2")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    model, tok = load_default_model()
    model.eval()
    load_seconds = time.perf_counter() - t0
    experts_root = Path(args.experts_dir)
    if args.train_experts:
        experts_root.mkdir(parents=True, exist_ok=True)
        train_quick_experts(model, tok, args.train_experts, experts_root, args.expert_steps, 4)
    found = find_experts(experts_root)
    if not found:
        raise SystemExit(f"no experts under {experts_root}; pass --train-experts TASK TASK TASK")
    readme = readme_descriptions(experts_root)
    expert_tasks = {}
    specs = []
    for task_name, folder in found:
        meta = expert_metadata(folder)
        task_name = meta.get("task", task_name)
        task = load_task(task_name, seed=0)
        name = expert_name(task_name)
        desc = meta.get("description") or readme.get(task_name) or short_description(task.description) or task_name
        expert_tasks[name] = task
        specs.append({"name": name, "source": str(folder), "description": short_description(desc)})
    logger.info("experts: %s", [(s["name"], s["description"]) for s in specs])

    # count SVDs: loading K experts may compute (or read from the SVD cache) one per weight, once; nothing later may
    from peft_spectral import svd_cache

    svd_calls = {"n": 0}
    real_compute = svd_cache.compute_factors

    def counting_compute(*a, **k):
        svd_calls["n"] += 1
        return real_compute(*a, **k)

    svd_cache.compute_factors = counting_compute
    t0 = time.perf_counter()
    library = ExpertLibrary.load(model, tok, specs)
    library_seconds = time.perf_counter() - t0
    svd_at_load = svd_calls["n"]

    trained_on = {t.name for t in expert_tasks.values()}
    unseen_names = args.unseen or [t for t in UNSEEN_PREFERENCE if t not in trained_on][:2]
    unseen = {n: load_task(n, seed=0) for n in unseen_names}
    if not args.no_lettered:  # load_task's BigBench prompts list lettered options already; make sure of it
        from peft_spectral.training import with_lettered_options

        for t in list(unseen.values()) + list(expert_tasks.values()):
            if t.kind == "multiple_choice":
                t.train, t.test = ([with_lettered_options(e) for e in split] for split in (t.train, t.test))
    for n, t in unseen.items():
        if t.kind != "multiple_choice":
            raise SystemExit(f"unseen task {n} is {t.kind}; this benchmark scores multiple-choice tasks")
    if args.others_tasks is None:
        used = trained_on | set(unseen_names)
        others_names = [t for t in UNSEEN_PREFERENCE if t not in used][:2]
    else:
        others_names = args.others_tasks
    overlap = set(others_names) & (trained_on | set(unseen_names))
    if overlap:
        raise SystemExit(f"--others-tasks must differ from the expert and unseen tasks; both: {sorted(overlap)}")
    others_tasks = {n: load_task(n, seed=0) for n in others_names}
    prompt = DispatchPrompt(max_question_tokens=args.max_question_tokens)
    bs = args.batch_size
    results: dict = {"unseen": {}, "dispatch_accuracy": {}, "timing": {}}

    # ---------------------------------------------------------------- classifier expert
    t0 = time.perf_counter()
    clf_data = build_classifier_examples(
        library,
        {n: t.train for n, t in expert_tasks.items()},
        others=None
        if args.no_others or not others_tasks
        else {n: t.train[: args.others_per_task] for n, t in others_tasks.items()},
        per_category=args.classifier_per_task,
        prompt=prompt,
        seed=args.seed,
    )
    clf_config = None
    if args.classifier_layers:
        from peft_spectral import SVFConfig

        n_layers = library.num_layers
        clf_config = SVFConfig(
            target_modules=["gate_proj", "up_proj", "down_proj"],
            layers_to_transform=list(range(max(0, n_layers - args.classifier_layers), n_layers)),
        )
    clf_dir = train_classifier_expert(
        library,
        clf_data,
        work / "classifier",
        steps=args.classifier_steps,
        batch_size=args.classifier_batch,
        learning_rate=args.classifier_lr,
        seed=args.seed,
        svf_config=clf_config,
    )
    clf_name = library.load_extra_adapter(clf_dir, "t2_classifier", "classifier")
    classifier_seconds = time.perf_counter() - t0
    logger.info("classifier expert trained in %.0fs", classifier_seconds)

    options = {
        "prompt": prompt,
        "batch_size": bs,
        "confidence": args.confidence,
        "prefix_sharing": args.prefix_sharing,
    }
    dispatchers = {
        "prompt_dispatch": PromptDispatcher(None, **options),
        "classifier_expert": PromptDispatcher(clf_name, **options),
    }

    # ---------------------------------------------------------------- "others" thresholds on validation prompts
    results["calibration"] = {}
    if not args.no_threshold:
        labelled = labelled_prompts(
            {n: t.validation[: args.n_calibrate] for n, t in expert_tasks.items()},
            {n: t.validation[: args.n_calibrate] for n, t in others_tasks.items()},
        )
        for label, disp in list(dispatchers.items()):
            dispatchers[f"{label}_argmax"] = PromptDispatcher(disp.adapter, **options)
            entry = calibrate_threshold(disp, library, labelled, target=args.threshold_target)
            results["calibration"][label] = entry
            logger.info(
                "%s: threshold %.3f (%s), validation %s %.3f (argmax %.3f)",
                label,
                entry["threshold"],
                args.confidence,
                args.threshold_target,
                entry["report"][args.threshold_target],
                entry["argmax_report"][args.threshold_target],
            )
        library.save_manifest(work / "library")

    # ---------------------------------------------------------------- dispatch accuracy on expert and others tasks
    for label, disp in dispatchers.items():
        predicted, truth, seconds = [], [], 0.0
        for name, task in [*expert_tasks.items(), *((OTHERS, t) for t in others_tasks.values())]:
            exs = task.test[: args.n_dispatch]
            choices, secs = run_pass1(library, disp, exs)
            predicted += choices
            truth += [name] * len(exs)
            seconds += secs
        report = dispatch_report(predicted, truth)
        per_task = {
            k: {"n": v["n"], "accuracy": v["accuracy"], "correct": v["correct"], "chosen": v["predicted"]}
            for k, v in report["per_category"].items()
        }
        results["dispatch_accuracy"][label] = {
            "per_task": per_task,
            "overall": report["accuracy"],
            "balanced": report["balanced_accuracy"],
            "pass1_seconds": seconds,
        }
        logger.info("dispatch accuracy %s: %.3f", label, report["accuracy"])

    # ---------------------------------------------------------------- unseen tasks
    curves = {}
    pass2 = {"mixed_batch": not args.no_mixed_batch, "compare_paths": not args.no_compare_paths}
    for tname, task in unseen.items():
        test = task.test[: args.n_test]
        row: dict = {"n_test": len(test), "description": short_description(task.description)}
        for label, disp in [("base", FixedDispatcher(None)), *dispatchers.items()]:
            res = two_pass_evaluate(library, disp, test, kind="multiple_choice", batch_size=bs, **pass2)
            row[label] = res.to_dict()
            logger.info("%s %s: accuracy %.3f (groups %s)", tname, label, res.accuracy, row[label]["group_sizes"])
        shots = task.train[: args.shots]
        cem_config = cem_settings(args)
        mixer = FewShotMixer(library, shots, batch_size=bs, adapter_name=f"mix_{expert_name(tname)}")
        search = mixer.search(cem_config)
        res = two_pass_evaluate(
            library, FixedDispatcher(mixer.adapter_name), test, kind="multiple_choice", batch_size=bs
        )
        row["few_shot_cem"] = {
            **res.to_dict(),
            "n_shots": len(shots),
            "alpha": dict(zip(mixer.experts, search.best_alpha.tolist())),
            "best_fitness_on_shots": list(search.best_fitness),
            "search_seconds": search.seconds,
            "evaluations": search.evaluations,
            "seconds_per_evaluation": search.seconds / max(1, search.evaluations),
            "evaluations_per_second": search.evaluations_per_second,
            "regularized": search.regularized,
            "holdout_fitness": list(search.holdout_fitness) if search.holdout_fitness else None,
            "base_holdout_fitness": list(search.base_holdout_fitness) if search.base_holdout_fitness else None,
            "stopped_early": search.stopped_early,
            "cache_hits": search.cache_hits,
            "history": search.history,
        }
        curves[tname] = search.history
        logger.info("%s few-shot CEM: accuracy %.3f, alpha %s", tname, res.accuracy, row["few_shot_cem"]["alpha"])
        results["unseen"][tname] = row

    # ---------------------------------------------------------------- two-pass generation timing
    per = max(1, args.gen_prompts // len(unseen))
    gen_prompts = [ex for t in unseen.values() for ex in t.train[args.shots : args.shots + per]]  # not shots, not test
    timing = {}
    for label, disp in dispatchers.items():
        res = two_pass_generate(library, disp, gen_prompts, max_new_tokens=args.gen_tokens, batch_size=bs, **pass2)
        timing[f"generate_{label}"] = {**res.to_dict(), "max_new_tokens": args.gen_tokens}
    # switching cost alone: set_adapter / disable_adapter over all experts, averaged
    switches = []
    for _ in range(20):
        for name in [*library.names, None]:
            before = len(library.switch_seconds)
            with library.use(name):
                pass
            switches.extend(library.switch_seconds[before:])
    timing["mean_switch_seconds"] = sum(switches) / len(switches)
    results["timing"] = timing

    results["setup"] = {
        "model": "SmolLM2-135M-Instruct (embedded GGUF Q4_1, de-quantised to fp32)",
        "experts": specs,
        "expert_tasks": sorted(trained_on),
        "unseen_tasks": unseen_names,
        "n_test": args.n_test,
        "n_dispatch": args.n_dispatch,
        "n_shots": args.shots,
        "cem": {
            **{k: v for k, v in vars(cem_settings(args)).items() if k != "progress"},
            "clamp": [0, 1],
            "reference": REFERENCE_CEM,
        },
        "others_tasks": others_names,
        "others_per_task": 0 if args.no_others else args.others_per_task,
        "thresholds": {
            "fitted": not args.no_threshold,
            "target": args.threshold_target,
            "confidence": args.confidence,
            "n_calibrate_per_category": args.n_calibrate,
        },
        "pass2": pass2,
        "lettered_prompts": not args.no_lettered,
        "classifier": {
            "steps": args.classifier_steps,
            "last_layers": args.classifier_layers or "all",
            "batch_size": args.classifier_batch,
            "per_task": args.classifier_per_task,
            "learning_rate": args.classifier_lr,
            "n_examples": len(clf_data),
            "seconds": classifier_seconds,
        },
        "dispatch": {
            "mode": "loglik",
            "max_question_tokens": args.max_question_tokens,
            "prefix_sharing": args.prefix_sharing,
        },
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model_load_seconds": load_seconds,
        "library_load_seconds": library_seconds,
        "svd_computed_at_load": svd_at_load,
        "svd_computed_after_load": svd_calls["n"] - svd_at_load,
        "svf_layers": len(library.svf_layers),
        "total_seconds": time.perf_counter() - t_start,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    (out_dir / "transformer2.json").write_text(json.dumps(results, indent=2))
    plot(curves, out_dir / "cem_fitness.png")
    (out_dir / "transformer2.md").write_text(markdown(results))
    print(markdown(results))
    return 0


def cem_settings(args: argparse.Namespace) -> CEMConfig:
    """The CEM configuration of the command line (library defaults where an option is not given)."""
    given = {"population": args.population, "generations": args.generations, "elite_fraction": args.elite_fraction}
    settings = {k: v for k, v in given.items() if v is not None}
    settings.update(
        init_std=args.init_std,
        seed=args.seed,
        holdout_fraction=args.holdout_fraction,
        l1_penalty=args.l1_penalty,
        patience=args.patience,
        progress=False,
    )
    return CEMConfig.reference(**settings) if args.cem_reference else CEMConfig(**settings)


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, hist in curves.items():
        g = [h["generation"] + 1 for h in hist]
        (line,) = ax.plot(g, [h["best"] for h in hist], marker="o", label=f"{name}: best so far")
        ax.plot(
            g,
            [h["generation_mean"] for h in hist],
            ls="--",
            color=line.get_color(),
            alpha=0.6,
            label=f"{name}: population mean",
        )
    ax.set_xlabel("CEM generation")
    ax.set_ylabel("accuracy on the shots")
    ax.set_title("Few-shot CEM fitness per generation")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _paths(x: dict) -> str:
    """`(mixed 1.2 s, grouped 1.5 s)` when both pass-2 paths were timed."""
    by = x.get("pass2_seconds_by_path") or {}
    if len(by) < 2:
        return ""
    return "(" + ", ".join(f"{k} {v:.2f} s" for k, v in by.items()) + f"; agree: {x.get('paths_agree')})"


def _mean_eval_seconds(r: dict) -> float:
    rows = [row["few_shot_cem"]["seconds_per_evaluation"] for row in r["unseen"].values()]
    return sum(rows) / len(rows)


def markdown(r: dict) -> str:
    s = r["setup"]
    lines = [
        "# Transformer² inference benchmark",
        "",
        (
            f"Produced by `benchmarks/bench_transformer2.py` on {s['date']} ({s['model']}, CPU, {s['threads']} thread(s), "
            f"torch {s['torch']}). Total wall time {s['total_seconds'] / 60:.1f} min."
        ),
        "",
        "Experts: " + "; ".join(f"`{e['name']}` ({e['description']})" for e in s["experts"]) + ".",
        f"Unseen tasks (no expert trained on them): {', '.join('`' + t + '`' for t in s['unseen_tasks'])}; "
        f"first {s['n_test']} test examples each, scored by option log-likelihood"
        + (" (prompts list lettered options, as in the experts' training)." if s.get("lettered_prompts") else "."),
        "",
        "## Accuracy on unseen tasks",
        "",
    ]
    labels = [k for k in next(iter(r["unseen"].values())) if k.startswith(("prompt_dispatch", "classifier_expert"))]
    lines += [
        "| task | n | base | " + " | ".join(x.replace("_", " ") for x in labels) + " | few-shot CEM (n shots) |",
        "|---|---|---|" + "---|" * (len(labels) + 1),
    ]
    for t, row in r["unseen"].items():
        c = row["few_shot_cem"]
        lines.append(
            f"| {t} | {row['n_test']} | {row['base']['accuracy']:.3f} | "
            + " | ".join(f"{row[x]['accuracy']:.3f}" for x in labels)
            + f" | {c['accuracy']:.3f} ({c['n_shots']}) |"
        )
    lines += [
        "",
        (
            "Strategies without `argmax` answer `others` (the base model) unless the top category wins by the threshold "
            "fitted on validation prompts (see below)."
        ),
        "",
        "Experts chosen by pass 1 on the unseen tasks:",
        "",
    ]
    for t, row in r["unseen"].items():
        for label in labels:
            lines.append(f"- {t}, {label.replace('_', ' ')}: {row[label]['group_sizes']}")
    lines += ["", "CEM mixing weights α (best on the shots):", ""]
    for t, row in r["unseen"].items():
        c = row["few_shot_cem"]
        lines.append(
            f"- {t}: "
            + ", ".join(f"{k} {v:.2f}" for k, v in c["alpha"].items())
            + f" — shot fitness (accuracy, mean log-lik) {tuple(round(x, 3) for x in c['best_fitness_on_shots'])}, "
            f"{c['evaluations']} evaluations, {c['seconds_per_evaluation']:.1f} s each"
            + (
                f"; hold-out accuracy {c['holdout_fitness'][0]:.3f} vs base {c['base_holdout_fitness'][0]:.3f}"
                + (" (stopped early)" if c.get("stopped_early") else "")
                if c.get("regularized")
                else ""
            )
        )
    cem = s["cem"]
    lines += [
        "",
        (
            f"CEM settings here: population {cem['population']}, at most {cem['generations']} generations, elite "
            f"{cem['elite_fraction']}, initial std {cem['init_std']}, α in [0, 1], "
            + (
                f"regularised (hold-out fraction {cem['holdout_fraction']}, λ {cem['l1_penalty']}, patience "
                f"{cem['patience']}, α mixing around the base model, initial mean 0, base model a candidate)"
                if cem["regularize"]
                else "plain reference (initial mean 1/K, z' = Σ α_k z_k)"
            )
            + f". Reference: population 32, 50 generations = 1600 evaluations, at the measured "
            f"{_mean_eval_seconds(r):.1f} s per evaluation ≈ {1600 * _mean_eval_seconds(r) / 60:.0f} min per task on "
            "this shared CPU. Fitness curve: `cem_fitness.png`."
        ),
        "",
        "## Dispatch accuracy on the experts' own test splits and on unrelated tasks (right answer `others`)",
        "",
        "| strategy | " + " | ".join(r["dispatch_accuracy"]["prompt_dispatch"]["per_task"]) + " | overall |",
        "|---|" + "---|" * (len(r["dispatch_accuracy"]["prompt_dispatch"]["per_task"]) + 1),
    ]
    for label, d in r["dispatch_accuracy"].items():
        lines.append(
            f"| {label.replace('_', ' ')} | "
            + " | ".join(f"{v['accuracy']:.2f} (n={v['n']})" for v in d["per_task"].values())
            + f" | {d['overall']:.3f} |"
        )
    if r.get("calibration"):
        lines += ["", "Fitted 'others' thresholds:", ""]
    for label, entry in r.get("calibration", {}).items():
        lines.append(
            f"- {label.replace('_', ' ')}: threshold {entry['threshold']:.3f} ({entry['confidence']}), fitted for "
            f"{entry['target']} on {entry['n']} validation prompts: {entry['report'][entry['target']]:.3f} "
            f"(argmax {entry['argmax_report'][entry['target']]:.3f})"
        )
    cl = s["classifier"]
    lines += [
        "",
        (
            f"Classifier expert: SVF adapter (MLPs of {'all' if cl['last_layers'] == 'all' else 'the last ' + str(cl['last_layers'])} blocks) trained by SFT on "
            f"{cl['n_examples']} category questions "
            f"({cl['per_task']} per expert task, from their train splits), {cl['steps']} steps × batch {cl['batch_size']}, "
            f"lr {cl['learning_rate']}, {cl['seconds']:.0f} s. Dispatch scores the category names by log-likelihood; "
            f"the question is cut to its first {s['dispatch']['max_question_tokens']} tokens."
        ),
        "",
        "## Time",
        "",
        "| measurement | pass 1 (s) | pass 2 (s) | pass 1 / pass 2 | switch / pass 2 |",
        "|---|---|---|---|---|",
    ]
    for t, row in r["unseen"].items():
        for label in labels:
            x = row[label]
            lines.append(
                f"| {t}, {label.replace('_', ' ')}, option scoring (n={x['n']}), pass 2 {x.get('pass2_path')} "
                f"{_paths(x)} | {x['pass1_seconds']:.2f} | "
                f"{x['pass2_seconds']:.2f} | {x['pass1_over_pass2']:.1%} | {x['switch_over_pass2']:.3%} |"
            )
    for label, x in r["timing"].items():
        if not isinstance(x, dict):
            continue
        lines.append(
            f"| generation, {label.removeprefix('generate_').replace('_', ' ')} (n={x['n']}, "
            f"{x['max_new_tokens']} new tokens) | {x['pass1_seconds']:.2f} | {x['pass2_seconds']:.2f} | "
            f"{x['pass1_over_pass2']:.1%} | {x['switch_over_pass2']:.3%} |"
        )
    lines += [
        "",
        (
            f"Mean time of one expert switch (`set_adapter` / `disable_adapter`): {r['timing']['mean_switch_seconds'] * 1e3:.2f} ms. "
            "Goals: pass 1 / pass 2 ≤ 10% (paper: 13–47%), switch / pass 2 ≤ 1%."
        ),
        (
            f"Loading the {len(s['experts'])} experts onto the model took {s['library_load_seconds']:.1f} s; SVDs computed "
            f"while loading: {s['svd_computed_at_load']} (the rest read from the SVD cache, {s['svf_layers']} SVF layers), "
            f"and after loading — classifier training, {sum(x['few_shot_cem']['evaluations'] for x in r['unseen'].values())} CEM "
            f"evaluations, all dispatch and switching: {s['svd_computed_after_load']}."
        ),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
