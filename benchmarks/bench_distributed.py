"""The training-free searches on 1 vs 2 processes (`accelerate launch`): C2I's gradient pass, a LASER grid and a
few-shot CEM.

Each setting runs this file as its worker: 1 process as a plain Python process (the one-process path, nothing
distributed initialised), 2 processes through `accelerate launch --multi_gpu --num_processes 2` (on a machine without
GPUs Accelerate runs them as MULTI_CPU over gloo). Every worker times, between barriers:

* the gradient pass ([`c2i_scores`]) on the calibration examples and a LASER grid ([`laser_search`]) of the planted
  problem ([`peft_spectral.compress.planted_problem`]: random two-option questions labelled by a clean model, no
  data to download);
* a few-shot CEM search ([`FewShotMixer.search`], the regularised one of `peft-spectral mix`, fixed seed) mixing the
  first `--cem-experts` experts of an expert library on `--shots` shots of `--cem-task` (a reasoning-gym task,
  scored by greedy generation of at most `--max-new-tokens` tokens).

The parent checks that the choices (C2I ranking, LASER choice and table, CEM α and history) are those of 1 process
and exits 1 otherwise. Experts: `--experts-dir` (default: the package's library `peft_spectral/library/`; exits 2
with one line when it holds fewer than 2); `--smoke` runs the tiny random Llama with 3 random non-identity SVF
experts built on the fly.

    OMP_NUM_THREADS=1 python benchmarks/bench_distributed.py             # embedded model (about 10 minutes)
    OMP_NUM_THREADS=1 python benchmarks/bench_distributed.py --smoke     # tiny model, random experts (< 1 minute)

On a shared machine the times are indicative only; the speed-up needs as many free cores (or devices) as processes.
Resumable: each process count is kept in the state file.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import peft_spectral
from peft_spectral.benchmarking import BenchmarkRun, add_benchmark_arguments, markdown_table, tiny_model
from peft_spectral.benchmarking.experts import default_library_dir, library_experts, random_svf_experts
from peft_spectral.data import DEFAULT_TASK, load_task


#: The planted problem's noisy weight and the C2I / LASER targets, per model.
MODULES = {
    "tiny": ("model.layers.1.mlp.down_proj", None),
    "default": ("model.layers.20.mlp.down_proj", [18, 19, 20, 21]),
}


def base_model(name: str):
    """A fresh `(model, tokenizer)`: the tiny random Llama (seed 0, the random experts' base) or the embedded model."""
    if name == "tiny":
        return tiny_model()
    from peft_spectral.assets import load_model

    return load_model(None)


def _timed(fn, state):
    if state is not None:
        state.wait_for_everyone()
    t = time.perf_counter()
    out = fn()
    if state is not None:
        state.wait_for_everyone()
    return out, time.perf_counter() - t


def compress_phase(args, state) -> dict:
    """The C2I gradient pass and the LASER grid of the planted problem, timed."""
    from peft_spectral import compress as C

    torch.manual_seed(0)
    model, tok = base_model(args.model)
    module, layers = MODULES[args.model]
    problem = C.planted_problem(model, tok, module)
    modules = C.find_target_modules(problem.model, ["up_proj", "down_proj"], layers)
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


def cem_phase(args, state) -> dict:
    """A few-shot CEM search over the library's first experts on a fresh base model, timed."""
    from peft_spectral.transformer2 import CEMConfig, ExpertLibrary, FewShotMixer

    experts = library_experts(args.experts_dir, 2)[0][: args.cem_experts]  # the parent checked there are 2
    task = load_task(args.cem_task, seed=args.seed, max_examples=max(200, 2 * args.shots))
    shots = task.train[: args.shots]
    base, tok = base_model(args.model)
    library = ExpertLibrary.load(base, tok, [str(e.path) for e in experts])
    mixer = FewShotMixer(
        library,
        shots,
        kind=task.kind,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        adapter_name="bench_mixture",
    )
    config = CEMConfig(population=args.population, generations=args.generations, seed=args.cem_seed, progress=False)
    result, cem_s = _timed(lambda: mixer.search(config), state)
    return {
        "cem_s": cem_s,
        "cem_task": args.cem_task,
        "cem_kind": task.kind,
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


def worker(args) -> None:
    """Time the searches in this process (one of the launched ones, or alone); the main process writes the JSON."""
    from peft_spectral.distributed import launched_state

    torch.set_num_threads(args.threads)
    state = launched_state()
    out = {"processes": 1 if state is None else state.num_processes}
    out.update(compress_phase(args, state))
    out.update(cem_phase(args, state))
    if state is None or state.is_main_process:
        Path(args.worker).write_text(json.dumps(out))


#: The options a worker gets from the parent.
SETTINGS = ["model", "n_grad", "batch_size", "threads", "rhos", "experts_dir", "cem_experts", "cem_task", "shots"]
SETTINGS += ["max_new_tokens", "population", "generations", "cem_seed", "seed"]


def launch(num_processes: int, args, out_file: Path) -> dict:
    """Run the worker on `num_processes` processes (1: a plain process) and read back its results."""
    worker_args = ["--worker", str(out_file)]
    for name in SETTINGS:
        value = getattr(args, name)
        worker_args += [f"--{name.replace('_', '-')}", ",".join(map(str, value)) if name == "rhos" else str(value)]
    script = str(Path(__file__).resolve())
    cmd = [sys.executable, script, *worker_args]
    if num_processes > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes)]
        launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        cmd = [sys.executable, *launcher, "--main_process_port", str(port), script, *worker_args]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    package_root = str(Path(peft_spectral.__file__).resolve().parents[1])  # the workers import this same package
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{num_processes} process(es) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    out = json.loads(out_file.read_text())
    out["launch_total_s"] = time.perf_counter() - t
    return out


def compare(runs: list[dict]) -> dict:
    """How the runs differ from the first (1 process): `same_choices` (C2I top 5, LASER choice and table),
    `same_alpha` (the CEM's α and per-generation history, exactly), `max_grad_diff` (largest |Δ| of a
    singular-value gradient)."""
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


def markdown(report: dict, command: str) -> str:
    runs, cem = report["runs"], report["cem"]
    one = runs[0]
    fit, hold = one["cem_split"]

    def speed(r: dict, key: str) -> list[str]:
        return [f"{r[key]:.2f}", f"{one[key] / r[key]:.2f}×"]

    intro = (
        f"Command: `{command}`; {report['threads']} thread(s) per process. C2I: {one['n_calibration']} calibration "
        f"examples of the planted problem (batch {report['batch_size']}). LASER: grid of {one['n_candidates']} "
        f"candidates on {one['n_validation']} validation examples. CEM: the regularised search of `peft-spectral mix` "
        f"(population {cem['population']}, {cem['generations']} generations, seed {cem['seed']}) mixing "
        f"{len(one['cem_experts'])} experts ({', '.join(one['cem_experts'])}; {report['experts']}) on "
        f"{one['n_shots']} shots of `{one['cem_task']}` ({one['cem_kind']}, at most {cem['max_new_tokens']} new "
        f"tokens; {fit} fit + {hold} hold-out), {one['cem_evaluations']} fitness evaluations."
    )
    headers = ["processes", "gradient pass (s)", "speed-up", "LASER grid (s)", "speed-up", "CEM (s)", "speed-up"]
    headers += ["CEM candidates scored by the main process", "whole launch (s)"]
    rows = [
        [r["processes"], *speed(r, "gradient_pass_s"), *speed(r, "laser_grid_s"), *speed(r, "cem_s")]
        + [r["cem_scored_by_main"], f"{r['launch_total_s']:.1f}"]
        for r in runs
    ]
    alpha = ", ".join(f"{n}={a:.3f}" for n, a in zip(one["cem_experts"], one["cem_alpha"]))
    checks = (
        f"Same choices as 1 process: C2I and LASER {report['same_choices']} (LASER chose {one['laser_chosen']}; "
        f"C2I top 5 {one['top5']}); largest |Δg| vs 1 process: {report['max_grad_diff']:.2e}. CEM α the same "
        f"(exactly, and its history): {report['same_alpha']} (α: {alpha}; hold-out accuracy "
        f"{one['cem_holdout_fitness'][0]:.3f})."
    )
    note = (
        "Times are between barriers inside the workers (model loading, the expert library and the launch excluded; "
        "`whole launch` includes them). Cached CEM candidates (identical clamped α) are not scored again. "
        + report["note"]
    )
    return "\n\n".join([intro, markdown_table(headers, rows, "r" * len(headers)), checks, note.strip()])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_arguments(p, name="distributed")
    p.add_argument("--n-grad", type=int, default=128, help="calibration examples of the gradient pass")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward pass (C2I and CEM)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--rhos", type=lambda s: [float(x) for x in s.split(",")], default=[0.9, 0.8, 0.6, 0.2, 0.1])
    p.add_argument(
        "--experts-dir",
        default=None,
        help=f"CEM: expert library (*/expert.json); left out: {default_library_dir()} (--smoke: random experts)",
    )
    p.add_argument("--cem-experts", type=int, default=3, help="CEM: mix the library's first N experts (at least 2)")
    p.add_argument("--cem-task", default=DEFAULT_TASK, help="CEM: task spec of the shots (train split)")
    p.add_argument("--shots", type=int, default=24, help="CEM: labelled shots (split into fit and hold-out parts)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="CEM: generation budget per generated shot")
    p.add_argument("--population", type=int, default=8, help="CEM: candidates per generation")
    p.add_argument("--generations", type=int, default=2, help="CEM: generations (no early stop within 2)")
    p.add_argument("--cem-seed", type=int, default=3, help="CEM: seed of the sampling and the fit/hold-out split")
    p.add_argument("--processes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    p.add_argument("--note", default="", help="a sentence added to the report (e.g. how idle the machine was)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    for name in ("cem_experts", "population"):
        if getattr(args, name) < 2:
            p.error(f"--{name.replace('_', '-')} must be >= 2, got {getattr(args, name)}")
    for name in ("shots", "generations", "n_grad", "batch_size", "threads", "max_new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.worker:
        worker(args)
        return 0
    if args.smoke:
        args.n_grad, args.shots, args.population, args.max_new_tokens = 16, 12, 4, 4
    if args.model not in MODULES and not args.smoke:
        p.error(f"--model must be 'default' (or 'tiny'), got {args.model!r}: the planted problem names its modules")
    config = {name: getattr(args, name) for name in SETTINGS if name not in ("model", "seed")}
    config["experts_dir"] = args.experts_dir or ("random" if args.smoke else "library")
    run = BenchmarkRun.from_args(args, config)
    args.model = run.model_name
    with tempfile.TemporaryDirectory() as tmp:
        if args.experts_dir is None:
            args.experts_dir = str(
                random_svf_experts(Path(tmp) / "experts", 3) if args.smoke else default_library_dir()
            )
        problem = library_experts(args.experts_dir, 2)[1]
        if problem:  # before launching anything
            print(problem, file=sys.stderr)
            return 2
        for key in run.jobs([f"processes:{n}" for n in args.processes], desc="launches"):
            run.record(key, launch(int(key.split(":")[1]), args, Path(tmp) / f"{key.replace(':', '_')}.json"))
    runs = [dict(run.result(f"processes:{n}")) for n in args.processes]
    checks = compare(runs)
    for r in runs:
        r.pop("grads")
    report = {
        "batch_size": args.batch_size,
        "threads": args.threads,
        **checks,
        "cem": {
            "population": args.population,
            "generations": args.generations,
            "seed": args.cem_seed,
            "max_new_tokens": args.max_new_tokens,
        },
        "experts": config["experts_dir"],
        "note": args.note,
        "runs": runs,
    }
    command = " ".join(["python benchmarks/bench_distributed.py", *(sys.argv[1:] if argv is None else argv)])
    run.write(
        report, markdown(report, command), title="C2I gradient pass, LASER grid and few-shot CEM on 1 vs 2 processes"
    )
    return 0 if checks["same_choices"] and checks["same_alpha"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
