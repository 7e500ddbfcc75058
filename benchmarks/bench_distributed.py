"""Benchmark: the training-free searches on 1 vs 2 processes (`accelerate launch`): C2I's gradient pass, a LASER
grid and a few-shot CEM.

Each setting runs this file as its worker: 1 process as a plain Python process (the one-process path, nothing
distributed initialised), 2 processes through `accelerate launch --multi_gpu --num_processes 2` (on a machine without
GPUs Accelerate runs them as MULTI_CPU over gloo). Every worker times, between barriers:

* the gradient pass ([`c2i_scores`]) on the calibration examples and a LASER grid ([`laser_search`]) of the planted
  problem ([`peft_spectral.compress.planted_problem`]);
* a few-shot CEM search ([`FewShotMixer.search`], the regularised one of `peft-spectral mix`, fixed seed) mixing the
  first `--cem-experts` experts of an expert library on `--shots` shots.

The parent checks that the choices (C2I ranking, LASER choice and table, CEM α) are those of 1 process. Models:
the tiny random Llama of `examples/tiny_model.py` (default; the CEM mixes random non-identity SVF experts built into a
temporary directory) or the embedded model (`--model default`; the CEM mixes the saved experts of `--experts-dir`,
default `benchmarks/experts`, on shots from the first expert's multiple-choice task, or `--cem-task`). Writes
`distributed.json` and `.md` to --out.

    python benchmarks/bench_distributed.py                    # tiny model, random experts (< 1 minute)
    python benchmarks/bench_distributed.py --model default --experts-dir benchmarks/experts

On a shared machine the times are indicative only; the speed-up needs as many free cores (or devices) as processes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY_MODULE = "model.layers.1.mlp.down_proj"
DEFAULT_MODULE = "model.layers.20.mlp.down_proj"
#: `name_or_path` of the tiny base model, recorded in the random experts built for it.
TINY_NAME = "tiny-llama"
DEFAULT_EXPERTS = ROOT / "benchmarks" / "experts"


def _base_model(model_name: str):
    """A fresh `(model, tokenizer)`: the tiny random Llama (seed 1) or the embedded default model."""
    if model_name == "tiny":
        sys.path.insert(0, str(ROOT / "examples"))
        from tiny_model import tiny_model, tiny_tokenizer

        tok = tiny_tokenizer()
        model = tiny_model(tok, seed=1)
        model.name_or_path = TINY_NAME
        return model, tok
    from peft_spectral.assets import load_model

    return load_model(None)


def _setup(model_name: str):
    from peft_spectral import compress as C

    model, tok = _base_model(model_name)
    module, layers = (TINY_MODULE, None) if model_name == "tiny" else (DEFAULT_MODULE, [18, 19, 20, 21])
    problem = C.planted_problem(model, tok, module)
    modules = C.find_target_modules(problem.model, ["up_proj", "down_proj"], layers)
    return problem, tok, modules


def save_random_experts(root: Path, n: int) -> Path:
    """Save `n` SVF experts of the tiny model with random non-identity `z` (`1 + 0.5 N(0, 1)`, seeds 1..n).

    Each goes into `root/random_<k>/` with an `expert.json`, the layout [`find_experts`] reads.
    """
    from peft import get_peft_model

    from peft_spectral import SVFConfig
    from peft_spectral.model_card import write_expert_files

    for k in range(n):
        base, _ = _base_model("tiny")
        config = SVFConfig(target_modules=["gate_proj", "up_proj", "down_proj"], use_svd_cache=False)
        model = get_peft_model(base, config)
        gen = torch.Generator().manual_seed(k + 1)
        with torch.no_grad():
            for _, layer in model.base_model.svf_layers():
                z = layer.svf_z["default"]
                z.copy_(1 + 0.5 * torch.randn(z.shape, generator=gen))
        folder = root / f"random_{k}"
        model.save_pretrained(str(folder), save_embedding_layers=False)
        write_expert_files(folder, task=f"random_{k}", description=f"random SVF expert {k} (benchmark)")
    return root


def library_experts(root: Path, k: int) -> list:
    """The first `k` experts of the library `root` ([`find_experts`]); exits unless there are at least 2."""
    from peft_spectral.transformer2 import find_experts

    found = find_experts(root)
    if len(found) < 2:
        raise SystemExit(
            f"--experts-dir {root}: {len(found)} expert(s) found (*/expert.json next to adapter_config.json); the "
            "CEM phase mixes at least 2"
        )
    return found[:k]


def _shots(args, experts) -> tuple[str, list]:
    """`(task name, shots)`: random two-option examples (labels alternating) for the tiny model, else the first
    `--shots` train examples of `--cem-task` or of the first expert's multiple-choice task."""
    from peft_spectral.tasks import Example, load_task

    if args.model == "tiny" and not args.cem_task:
        from peft_spectral.compress import random_choice_examples

        pool = random_choice_examples(args.shots, seed=args.seed)
        shots = [Example(ex.prompt, ex.choices[i % 2], ex.choices, i % 2) for i, ex in enumerate(pool)]
        return "random two-option examples", shots
    if args.cem_task:
        task = load_task(args.cem_task, seed=0)
        if task.kind != "multiple_choice":
            raise SystemExit(f"--cem-task: {args.cem_task} is {task.kind}; the CEM phase scores multiple-choice shots")
        return args.cem_task, task.train[: args.shots]
    for expert in experts:  # the first expert whose task is multiple-choice
        task = load_task(expert.task, seed=0)
        if task.kind == "multiple_choice":
            return expert.task, task.train[: args.shots]
    raise SystemExit(
        f"none of the experts' tasks ({', '.join(e.task for e in experts)}) is multiple-choice; the CEM phase scores "
        "multiple-choice shots: pass --cem-task"
    )


def _timed(fn, state):
    if state is not None:
        state.wait_for_everyone()
    t = time.perf_counter()
    out = fn()
    if state is not None:
        state.wait_for_everyone()
    return out, time.perf_counter() - t


def _compress_phase(args, state) -> dict:
    """The C2I gradient pass and the LASER grid of the planted problem, timed."""
    from peft_spectral import compress as C

    torch.manual_seed(0)
    problem, tok, modules = _setup(args.model)
    calibration = problem.train[: args.n_grad]
    grid = C.candidate_grid(modules, args.rhos)
    scores, grad_s = _timed(
        lambda: C.c2i_scores(problem.model, calibration, modules, tokenizer=tok, batch_size=args.batch_size), state
    )
    ranked = C.score_candidates(scores.grads, scores.svds, args.rhos)
    laser, laser_s = _timed(
        lambda: C.laser_search(problem.model, problem.validation, grid, tokenizer=tok, progress=False), state
    )
    return {
        "gradient_pass_s": grad_s,
        "laser_grid_s": laser_s,
        "n_calibration": len(calibration),
        "n_validation": len(problem.validation),
        "n_candidates": len(grid),
        "calibration_loss": scores.loss,
        "top5": [str(c.intervention) for c in ranked[:5]],
        "laser_chosen": [str(iv) for iv in laser.chosen],
        "laser_table": {str(c.intervention): c.result.accuracy for c in laser.candidates},
        "grads": {k: v.tolist() for k, v in scores.grads.items()},
    }


def cem_config(args):
    """The CEM of the benchmark: `peft-spectral mix`'s regularised defaults with `--population`, `--generations` and
    `--seed`."""
    from peft_spectral.transformer2 import CEMConfig

    return CEMConfig(population=args.population, generations=args.generations, seed=args.seed, progress=False)


def _cem_phase(args, state) -> dict:
    """A few-shot CEM search over the library's first experts on a fresh base model, timed."""
    from peft_spectral.transformer2 import ExpertLibrary, FewShotMixer

    experts = library_experts(Path(args.experts_dir), args.cem_experts)
    task, shots = _shots(args, experts)
    base, tok = _base_model(args.model)
    library = ExpertLibrary.load(base, tok, [str(e.path) for e in experts])
    mixer = FewShotMixer(library, shots, batch_size=args.batch_size, adapter_name="bench_mixture")
    result, cem_s = _timed(lambda: mixer.search(cem_config(args)), state)
    return {
        "cem_s": cem_s,
        "cem_task": task,
        "cem_experts": mixer.experts,
        "n_shots": len(shots),
        "cem_split": [len(result.split["fit"]), len(result.split["holdout"])],
        "cem_alpha": result.best_alpha.tolist(),
        "cem_fitness": list(result.best_fitness),
        "cem_holdout_fitness": list(result.holdout_fitness),
        "cem_history": result.history,
        "cem_evaluations": result.evaluations,
        "cem_scored_by_main": mixer.evaluations,
    }


def worker(args) -> dict:
    """Time the searches in this process (one of the launched ones, or alone); the main process writes the JSON."""
    from peft_spectral.distributed import launched_state

    torch.set_num_threads(args.threads)
    state = launched_state()
    out = {"processes": 1 if state is None else state.num_processes}
    out.update(_compress_phase(args, state))
    out.update(_cem_phase(args, state))
    if state is None or state.is_main_process:
        Path(args.worker).write_text(json.dumps(out))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_argv(args, out_file: Path) -> list[str]:
    values = {
        "--worker": out_file,
        "--model": args.model,
        "--n-grad": args.n_grad,
        "--batch-size": args.batch_size,
        "--threads": args.threads,
        "--rhos": ",".join(map(str, args.rhos)),
        "--experts-dir": args.experts_dir,
        "--cem-experts": args.cem_experts,
        "--shots": args.shots,
        "--population": args.population,
        "--generations": args.generations,
        "--seed": args.seed,
    }
    if args.cem_task:
        values["--cem-task"] = args.cem_task
    return [str(x) for item in values.items() for x in item]


def _run(num_processes: int, args, out_file: Path) -> dict:
    worker_args = _worker_argv(args, out_file)
    script = str(Path(__file__).resolve())
    if num_processes == 1:
        cmd = [sys.executable, script, *worker_args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(num_processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(_free_port()),
            script,
            *worker_args,
        ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{num_processes} process(es) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    out = json.loads(out_file.read_text())
    out["launch_total_s"] = time.perf_counter() - t
    return out


def compare(runs: list[dict]) -> dict:
    """How the runs differ from the first (1 process): `same_choices` (C2I top 5, LASER choice and table),
    `same_alpha` (the CEM's α and per-generation history, exactly), `max_grad_diff` (largest |Δ| of a singular-value gradient)."""
    one = runs[0]
    max_diff = max(
        float((torch.tensor(r["grads"][k]) - torch.tensor(g)).abs().max())
        for r in runs
        for k, g in one["grads"].items()
    )
    same = all(
        r["top5"] == one["top5"]
        and r["laser_chosen"] == one["laser_chosen"]
        and r["laser_table"] == one["laser_table"]
        for r in runs
    )
    return {
        "same_choices": same,
        "same_alpha": all(r["cem_alpha"] == one["cem_alpha"] and r["cem_history"] == one["cem_history"] for r in runs),
        "max_grad_diff": max_diff,
    }


def _speedup(one: dict, r: dict, key: str) -> str:
    return f"{r[key]:.2f} | {one[key] / r[key]:.2f}×"


def _markdown(report: dict) -> str:
    rows = report["runs"]
    one = rows[0]
    cem = report["cem"]
    fit, hold = one["cem_split"]
    lines = [
        "# C2I gradient pass, LASER grid and few-shot CEM on 1 vs 2 processes",
        "",
        (
            f"Model: {report['model']}; {report['threads']} thread(s) per process; machine: {report['machine']}. "
            f"C2I: {one['n_calibration']} calibration examples (batch {report['batch_size']}). LASER: grid of "
            f"{one['n_candidates']} candidates on {one['n_validation']} validation examples. CEM: the regularised "
            f"search of `peft-spectral mix` (population {cem['population']}, {cem['generations']} generations, seed "
            f"{cem['seed']}) mixing {len(one['cem_experts'])} experts ({', '.join(one['cem_experts'])}; {report['experts']}) on "
            f"{one['n_shots']} shots of {one['cem_task']} ({fit} fit + {hold} hold-out), "
            f"{one['cem_evaluations']} fitness evaluations."
        ),
        "",
        "| processes | gradient pass (s) | speed-up | LASER grid (s) | speed-up | CEM (s) | speed-up "
        + "| CEM candidates scored by the main process | whole launch (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['processes']} | {_speedup(one, r, 'gradient_pass_s')} | {_speedup(one, r, 'laser_grid_s')} "
            f"| {_speedup(one, r, 'cem_s')} | {r['cem_scored_by_main']} | {r['launch_total_s']:.1f} |"
        )
    alpha = ", ".join(f"{n}={a:.3f}" for n, a in zip(one["cem_experts"], one["cem_alpha"]))
    lines += [
        "",
        (
            f"Same choices as 1 process: C2I and LASER {report['same_choices']} (LASER chose {one['laser_chosen']}; "
            f"C2I top 5 {one['top5']}); largest |Δg| vs 1 process: {report['max_grad_diff']:.2e}. CEM α the same "
            f"(exactly, and its history): {report['same_alpha']} (α: {alpha}; hold-out accuracy {one['cem_holdout_fitness'][0]:.3f})."
        ),
        "",
        "Times are between barriers inside the workers (model loading, the expert library and the launch excluded; "
        "`whole launch` includes them). Cached CEM candidates (identical clamped α) are not scored again. "
        + report["note"],
        "",
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny' (default: the tiny random Llama) or 'default'")
    p.add_argument("--n-grad", type=int, default=128, help="calibration examples of the gradient pass")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward pass (C2I and CEM)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--rhos", type=lambda s: [float(x) for x in s.split(",")], default=[0.9, 0.8, 0.6, 0.2, 0.1])
    p.add_argument(
        "--experts-dir",
        default=None,
        help="CEM: expert library (*/expert.json); left out: random experts (tiny) or benchmarks/experts (default)",
    )
    p.add_argument("--cem-experts", type=int, default=3, help="CEM: mix the library's first N experts (at least 2)")
    p.add_argument(
        "--cem-task",
        default=None,
        help="CEM: task of the shots; left out: random (tiny), else the first expert's multiple-choice task",
    )
    p.add_argument("--shots", type=int, default=24, help="CEM: labelled shots (split into fit and hold-out parts)")
    p.add_argument("--population", type=int, default=8, help="CEM: candidates per generation")
    p.add_argument("--generations", type=int, default=2, help="CEM: generations (no early stop within 2)")
    p.add_argument(
        "--seed",
        type=int,
        default=3,
        help="CEM: seed of the sampling, the split and the random shots (3: on the tiny model the chosen α is not the "
        "base model's 0, so that comparing it across processes means something)",
    )
    p.add_argument("--processes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    p.add_argument("--out", default=str(ROOT / "docs" / "results"))
    p.add_argument("--note", default="Measured on a shared CPU machine: indicative only.")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.model not in ("tiny", "default"):
        p.error(f"--model must be 'tiny' or 'default', got {args.model!r}")
    for name in ("cem_experts", "population"):
        if getattr(args, name) < 2:
            p.error(f"--{name.replace('_', '-')} must be >= 2, got {getattr(args, name)}")
    for name in ("shots", "generations", "n_grad", "batch_size", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.worker:
        worker(args)
        return 0
    experts = args.experts_dir or ("random, built for the run" if args.model == "tiny" else str(DEFAULT_EXPERTS))
    with tempfile.TemporaryDirectory() as tmp:
        if args.experts_dir is None:
            args.experts_dir = (
                str(save_random_experts(Path(tmp) / "experts", args.cem_experts))
                if args.model == "tiny"
                else str(DEFAULT_EXPERTS)
            )
        library_experts(Path(args.experts_dir), args.cem_experts)  # fail before launching anything
        runs = [_run(n, args, Path(tmp) / f"np{n}.json") for n in args.processes]
    checks = compare(runs)
    for r in runs:
        r.pop("grads")
    report = {
        "model": "tiny random Llama (examples/tiny_model.py)" if args.model == "tiny" else "embedded default model",
        "batch_size": args.batch_size,
        "threads": args.threads,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        **checks,
        "cem": {"population": args.population, "generations": args.generations, "seed": args.seed},
        "experts": experts,
        "note": args.note,
        "runs": runs,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "distributed.json").write_text(json.dumps(report, indent=1))
    (out / "distributed.md").write_text(_markdown(report))
    print(_markdown(report))
    return 0 if checks["same_choices"] and checks["same_alpha"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
