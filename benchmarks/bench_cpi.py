"""Benchmark: CPI-FT vs multi-task SFT vs naive multi-stage SFT at one training budget.

On the embedded SmolLM2-135M-Instruct with three BigBench tasks of different kinds (default: the arithmetic subtask
`2_digit_addition`, scored by generation; the multiple-choice `epistemic_reasoning`, scored by option log-likelihood;
the generation task `object_counting`), every method trains the same CoreIsolation deltas of the MLP projections with
the same optimizer, batch, learning rate and total number of optimizer steps S:

- **multi-task SFT**: S steps on the balanced mix of all tasks;
- **naive multi-stage SFT**: S / T steps on each task, one after another;
- **CPI-FT**: T probes of P steps, then S − T·P steps shared by the staged-SFT stages (one per group).

Reported per method: per-task test accuracy and the average; forgetting = the score of a task right after the stage
that trained it minus its final score, averaged over the tasks trained before the last stage (CPI-FT: tasks of the
groups before the last one). Results go to `docs/results/cpi.{json,md,png}`.

Run: `python benchmarks/bench_cpi.py` (about 20-30 min on 2 CPU cores); `--smoke` runs a tiny random model on
synthetic tasks in seconds to check the script.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))  # tiny_model.py for the smoke runs

from peft_spectral.assets import load_default_model  # noqa: E402
from peft_spectral.cpi import (  # noqa: E402
    FUSION_MODES,
    STAGE_ORDERS,
    CPIConfig,
    CPIPipeline,
    mixed_examples,
    sft_train,
)
from peft_spectral.tasks import (  # noqa: E402
    Example,
    Task,
    load_task,
)
from peft_spectral.tuners.core_isolation import CoreIsolationConfig  # noqa: E402


logger = logging.getLogger("bench_cpi")
MLP = ["gate_proj", "up_proj", "down_proj"]
DEFAULT_TASKS = ["arithmetic/2_digit_addition", "epistemic_reasoning", "object_counting"]


# ------------------------------------------------------------------------------------------------ loading


def load_tasks(names: list[str], seed: int) -> list[Task]:
    return [load_task(n, seed=seed) for n in names]


def load_model():
    return load_default_model()  # the GGUF quantizer flag is already dropped there, so Trainer trains it


def smoke_setup():
    from tiny_model import tiny_model as build_tiny_llama
    from tiny_model import tiny_tokenizer as build_tiny_tokenizer

    tok = build_tiny_tokenizer()

    def task(name, fn, kind="generation"):
        ex = [Example(prompt=f"{name}: {i}", target=fn(i)) for i in range(40)]
        if kind == "multiple_choice":
            ex = [
                Example(prompt=e.prompt, target=e.target, choices=("yes", "no"), label=0 if e.target == "yes" else 1)
                for e in ex
            ]
        return Task(name=name, kind=kind, train=ex[10:], validation=[], test=ex[:10])

    tasks = [
        task("inc", lambda i: str(i + 1)),
        task("parity", lambda i: "yes" if i % 2 else "no", "multiple_choice"),
        task("rev", lambda i: str(i)[::-1]),
    ]
    return build_tiny_llama(tok), tok, tasks


# ------------------------------------------------------------------------------------------------ scoring


def make_scorer(tok, tasks: list[Task], n_test: int, batch_size: int, max_new_tokens: int):
    from peft_spectral.evaluation import evaluate

    def score(model, names=None) -> dict[str, float]:
        out = {}
        for t in tasks:
            if names is not None and t.name not in names:
                continue
            res = evaluate(
                model, tok, t.test[:n_test], kind=t.kind, batch_size=batch_size, max_new_tokens=max_new_tokens
            )
            out[t.name] = round(float(res.accuracy), 4)
        return out

    return score


def forgetting(after_own: dict[str, float], final: dict[str, float]) -> dict:
    per = {k: round(after_own[k] - final[k], 4) for k in after_own}
    return {"per_task": per, "mean": round(sum(per.values()) / len(per), 4) if per else None}


def baseline_settings(args) -> dict:
    """The settings that the baselines' results depend on (recorded in `setup`, compared by `--baselines-from`)."""
    return {
        "budget_steps": args.budget,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "n_train_cap": args.n_train,
        "n_test": args.n_test,
        "seed": args.seed,
    }


def load_baselines(path: Path, args, names: list[str]) -> dict:
    """Base, multi-task and naive multi-stage results of an earlier run, checked to share this run's settings."""
    earlier = json.loads(Path(path).read_text())
    setup = earlier["setup"]
    differ = {k: (setup.get(k), v) for k, v in baseline_settings(args).items() if setup.get(k) != v}
    if differ or list(earlier["base"]["final"]) != names:
        raise SystemExit(
            f"--baselines-from {path}: other settings or tasks (earlier vs now: {differ}, "
            f"tasks {list(earlier['base']['final'])} vs {names})"
        )
    return {
        "base": earlier["base"]["final"],
        "multitask": {"final": earlier["multitask"]["final"]},
        "naive_multistage": earlier["naive_multistage"],
        "baselines_from": str(path),
    }


def _reset(peft_model) -> None:
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "core_isolation_delta" in n:
                p.zero_()


# ------------------------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS)
    ap.add_argument("--budget", type=int, default=60, help="total optimizer steps per method (S)")
    ap.add_argument("--probe-steps", type=int, default=10, help="CPI-FT probe steps per task (P)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=160)
    ap.add_argument("--p", type=float, default=0.01)
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--n-train", type=int, default=300)
    ap.add_argument("--n-test", type=int, default=50)
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=10)
    ap.add_argument(
        "--stage-order",
        default="input",
        choices=STAGE_ORDERS,
        help="CPI-FT stage order (default 'input': the order naive multi-stage SFT trains the tasks in)",
    )
    ap.add_argument("--fusion", default="slerp_params", choices=FUSION_MODES, help="CPI-FT fusion of non-core entries")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--state-dir", type=Path, default=Path("/tmp/bench_cpi_state"))
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    ap.add_argument("--smoke", action="store_true", help="tiny random model + synthetic tasks (seconds)")
    ap.add_argument(
        "--baselines-from",
        type=Path,
        default=None,
        help="cpi.json of an earlier run with the same tasks, budget and training settings: reuse its base, "
        "multi-task and naive multi-stage results and run only CPI-FT (e.g. to vary --p or --tau)",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    t_start = time.time()

    if args.smoke:
        model, tok, tasks = smoke_setup()
        args.out = args.out if args.out != ROOT / "docs" / "results" else Path("/tmp/bench_cpi_smoke_out")
    else:
        model, tok = load_model()
        tasks = load_tasks(args.tasks, args.seed)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    for t in tasks:
        t.train = t.train[: args.n_train]
    T = len(tasks)
    names = [t.name for t in tasks]
    if args.budget - T * args.probe_steps < 1:
        raise SystemExit(f"--budget {args.budget} leaves no stage steps after {T} probes of {args.probe_steps}")
    cfg = CPIConfig(
        adapter=CoreIsolationConfig(target_modules=MLP, core_fraction=args.p, similarity_threshold=args.tau),
        probe_steps=args.probe_steps,
        total_stage_steps=args.budget - T * args.probe_steps,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        max_length=args.max_length,
        stage_order=args.stage_order,
        fusion=args.fusion,
        seed=args.seed,
    )
    score = make_scorer(tok, tasks, args.n_test, args.eval_batch, args.max_new_tokens)
    results: dict = {
        "tasks": {
            t.name: {"kind": t.kind, "n_train": len(t.train), "n_test": min(args.n_test, len(t.test))} for t in tasks
        }
    }
    timings: dict = {}
    args.out.mkdir(parents=True, exist_ok=True)

    def checkpoint() -> None:  # partial results, in case the run is cut short
        (args.out / "cpi.partial.json").write_text(json.dumps({"results": results, "timings_s": timings}, indent=1))

    if args.baselines_from:
        results.update(load_baselines(args.baselines_from, args, names))
        logger.info("base, multi-task and naive multi-stage results taken from %s", args.baselines_from)
    else:
        t0 = time.time()
        results["base"] = score(model)
        timings["eval_base_s"] = round(time.time() - t0, 1)
        logger.info("base: %s", results["base"])
        checkpoint()

        from peft import get_peft_model

        peft_model = get_peft_model(model, copy.deepcopy(cfg.adapter))
        trainer_dir = args.state_dir / "baselines"

        # multi-task SFT (mixed, balanced)
        t0 = time.time()
        _reset(peft_model)
        sft_train(
            peft_model,
            tok,
            mixed_examples([t.train for t in tasks], seed=args.seed),
            cfg,
            steps=args.budget,
            output_dir=trainer_dir,
        )
        timings["multitask_train_s"] = round(time.time() - t0, 1)
        results["multitask"] = {"final": score(peft_model)}
        logger.info("multi-task: %s (%.0f s)", results["multitask"]["final"], time.time() - t0)
        checkpoint()

        # naive multi-stage SFT: S/T steps per task, in order
        t0 = time.time()
        _reset(peft_model)
        per_stage = [args.budget // T + (1 if k < args.budget % T else 0) for k in range(T)]
        after_own, stages = {}, []
        for k, task in enumerate(tasks):
            sft_train(peft_model, tok, task.train, cfg, steps=per_stage[k], output_dir=trainer_dir)
            s = score(peft_model, names[: k + 1]) if k < T - 1 else score(peft_model)
            after_own[task.name] = s[task.name]
            stages.append(s)
            logger.info("naive stage %d (%s): %s", k, task.name, s)
            results["naive_partial"] = stages
            checkpoint()
        timings["naive_s"] = round(time.time() - t0, 1)
        results.pop("naive_partial", None)
        final = stages[-1]
        results["naive_multistage"] = {
            "final": final,
            "after_each_stage": stages,
            "steps_per_stage": per_stage,
            "forgetting": forgetting({k: v for k, v in after_own.items() if k != names[-1]}, final),
        }
        peft_model.unload()  # the base model is untouched: CoreIsolation never writes into it while unmerged

    # CPI-FT
    t0 = time.time()
    state_dir = args.state_dir / "cpi"
    if state_dir.exists():
        import shutil

        shutil.rmtree(state_dir)
    cpi_after_own: dict[str, float] = {}
    cpi_stages: list = []

    def on_stage_end(pipe, k, group):
        n_stages = len(pipe.state["stage_order"])
        if k < n_stages - 1:
            trained = [n for g in pipe.state["stage_order"][: k + 1] for n in g]
            s = score(pipe.model, trained)
            cpi_stages.append({"stage": k, "group": group, "scores": s})
            cpi_after_own.update({n: s[n] for n in group})
            logger.info("CPI stage %d %s: %s", k, group, s)
            results["cpi_partial"] = {
                "stages": cpi_stages,
                "jaccard": pipe.state.get("jaccard"),
                "groups": pipe.state.get("groups"),
            }
            checkpoint()

    pipe = CPIPipeline(model, tok, tasks, cfg, state_dir, progress=False, on_stage_end=on_stage_end)
    rep = pipe.run()
    timings["cpi_s"] = round(time.time() - t0, 1)
    results.pop("cpi_partial", None)
    final = score(pipe.model)
    cpi_stages.append({"stage": len(rep["stage_order"]) - 1, "group": rep["stage_order"][-1], "scores": final})
    results["cpi_ft"] = {
        "final": final,
        "after_each_stage": cpi_stages,
        "groups": rep["groups"],
        "stage_order": rep["stage_order"],
        "jaccard": rep["jaccard"],
        "core_sizes": rep["core_sizes"],
        "frozen_counts": rep["frozen_counts"],
        "forgetting": forgetting(cpi_after_own, final)
        if cpi_after_own
        else {"per_task": {}, "mean": None, "note": "one group: no later stage"},
        "stage_steps": [cfg.steps_for_stage(k, len(rep["stage_order"])) for k in range(len(rep["stage_order"]))],
        "pipeline_timings_s": rep["timings_s"],
    }
    logger.info("CPI-FT: %s groups=%s (%.0f s)", final, rep["groups"], time.time() - t0)

    for key in ("multitask", "naive_multistage", "cpi_ft"):
        f = results[key]["final"]
        results[key]["average"] = round(sum(f.values()) / len(f), 4)
    results["base"] = {"final": results["base"], "average": round(sum(results["base"].values()) / T, 4)}
    nf = results["naive_multistage"]["forgetting"]["mean"]
    cf = results["cpi_ft"]["forgetting"]["mean"]
    results["goals"] = {
        "forgetting_cpi_le_half_naive": None
        if cf is None or nf is None
        else bool(cf <= 0.5 * nf)
        if nf > 0
        else bool(cf <= 0),
        "average_cpi_ge_multitask": bool(results["cpi_ft"]["average"] >= results["multitask"]["average"]),
    }
    timings["total_s"] = round(time.time() - t_start, 1)
    results["setup"] = {
        "model": "tiny random llama (smoke)" if args.smoke else "SmolLM2-135M-Instruct (embedded GGUF, fp32)",
        **baseline_settings(args),
        "probe_steps": args.probe_steps,
        "p": args.p,
        "tau": args.tau,
        "stage_order": args.stage_order,
        "fusion": args.fusion,
        "trained": "CoreIsolation deltas of gate/up/down_proj (all methods)",
        "optimizer": "AdamW (torch)",
        "torch": torch.__version__,
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
    }
    results["timings_s"] = timings
    write_outputs(results, names, args.out)
    (args.out / "cpi.partial.json").unlink(missing_ok=True)
    logger.info("done in %.0f s -> %s", time.time() - t_start, args.out)
    return 0


def write_outputs(results: dict, names: list[str], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpi.json").write_text(json.dumps(results, indent=2))
    methods = [
        ("base (no training)", "base"),
        ("multi-task SFT (mixed)", "multitask"),
        ("naive multi-stage SFT", "naive_multistage"),
        ("CPI-FT", "cpi_ft"),
    ]
    s = results["setup"]
    lines = [
        "# CPI-FT benchmark",
        "",
        f"Model: {s['model']}. Trained: {s['trained']}; {s['optimizer']}, lr {s['lr']}, weight decay "
        f"{s['weight_decay']}, batch {s['batch_size']}, max length {s['max_length']}. Same budget for every method: "
        f"{s['budget_steps']} optimizer steps (CPI-FT: {len(names)} probes × {s['probe_steps']} + stages). "
        f"p = {s['p']}, τ = {s['tau']}, stage order {s.get('stage_order', 'input')}, fusion "
        f"{s.get('fusion', 'slerp_task_vectors')}. Test examples per task: {s['n_test']}."
        + (
            f" Base, multi-task and naive multi-stage rows reused from `{results['baselines_from']}` (same settings)."
            if results.get("baselines_from")
            else ""
        ),
        "",
        "| method | " + " | ".join(names) + " | average | forgetting (mean) |",
        "|---" * (len(names) + 3) + "|",
    ]
    for label, key in methods:
        r = results[key]
        fg = r.get("forgetting", {}).get("mean") if isinstance(r.get("forgetting"), dict) else None
        fg_text = "–" if fg is None else f"{fg:+.3f}"
        lines.append(
            f"| {label} | "
            + " | ".join(f"{r['final'][n]:.3f}" for n in names)
            + f" | {r['average']:.3f} | {fg_text} |"
        )
    c = results["cpi_ft"]
    lines += [
        "",
        (
            f"Forgetting = score right after the stage that trained a task − its final score (positive = forgot), averaged "
            f"over tasks trained before the last stage. Naive per task: {results['naive_multistage']['forgetting']['per_task']}; "
            f"CPI-FT per task: {c['forgetting']['per_task']}."
        ),
        "",
        (
            f"CPI-FT groups (τ = {s['tau']}): {c['groups']}; stage order {c['stage_order']}; stage steps {c['stage_steps']}; "
            f"core sizes {c['core_sizes']}; frozen entries per stage {c['frozen_counts']}."
        ),
        "",
        "Jaccard similarity of the core regions:",
        "",
        "| | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for n, row in zip(names, c["jaccard"]):
        lines.append(f"| {n} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    g = results["goals"]
    lines += [
        "",
        "Goals: CPI-FT forgetting ≤ ½ naive multi-stage: **"
        + (
            "met"
            if g["forgetting_cpi_le_half_naive"]
            else "not met"
            if g["forgetting_cpi_le_half_naive"] is not None
            else "n/a"
        )
        + "**; CPI-FT average ≥ multi-task SFT: **"
        + ("met" if g["average_cpi_ge_multitask"] else "not met")
        + "**.",
        "",
        f"Wall time: {results['timings_s']}",
        "",
    ]
    (out / "cpi.md").write_text("\n".join(lines))
    try:
        plot(results, names, out / "cpi.png")
    except ImportError:  # pragma: no cover
        logger.warning("matplotlib missing: no plot")


def plot(results: dict, names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    jac = np.array(results["cpi_ft"]["jaccard"])
    im = ax1.imshow(jac, vmin=0, vmax=1, cmap="viridis")
    short = [n.split("/")[-1] for n in names]
    ax1.set_xticks(range(len(names)), short, rotation=30, ha="right")
    ax1.set_yticks(range(len(names)), short)
    for i in range(len(names)):
        for j in range(len(names)):
            ax1.text(j, i, f"{jac[i, j]:.2f}", ha="center", va="center", color="w" if jac[i, j] < 0.6 else "k")
    ax1.set_title(
        f"Jaccard of core regions (p={results['setup']['p']})\ngroups: {results['cpi_ft']['groups']}", fontsize=9
    )
    fig.colorbar(im, ax=ax1, fraction=0.046)
    methods = [
        ("base", "base"),
        ("multi-task", "multitask"),
        ("naive multi-stage", "naive_multistage"),
        ("CPI-FT", "cpi_ft"),
    ]
    width = 0.2
    x = np.arange(len(names) + 1)
    for i, (label, key) in enumerate(methods):
        vals = [results[key]["final"][n] for n in names] + [results[key]["average"]]
        ax2.bar(x + (i - 1.5) * width, vals, width, label=label)
    ax2.set_xticks(x, short + ["average"], rotation=30, ha="right")
    ax2.set_ylabel("test accuracy")
    ax2.set_title(f"same budget: {results['setup']['budget_steps']} steps per method", fontsize=9)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
