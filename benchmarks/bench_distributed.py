"""Benchmark: C2I's gradient pass and a LASER grid on 1 vs 2 processes (`accelerate launch`).

Each setting runs this file as its worker: 1 process as a plain Python process (the one-process path, nothing
distributed initialised), 2 processes through `accelerate launch --multi_gpu --num_processes 2` (on a machine without
GPUs Accelerate runs them as MULTI_CPU over gloo). The worker builds the planted problem
([`peft_spectral.compress.planted_problem`]) on the tiny random Llama of `examples/tiny_model.py` (default) or on the
embedded model (`--model default`), then times, between barriers, the gradient pass ([`c2i_scores`]) on the
calibration examples and a LASER grid ([`laser_search`]), and checks that the choices are those of 1 process.
Writes `compress_distributed.json` and `.md` to --out.

    python benchmarks/bench_compress_distributed.py                    # tiny planted problem
    python benchmarks/bench_compress_distributed.py --model default    # the embedded model

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


def _setup(model_name: str):
    from peft_spectral import compress as C

    if model_name == "tiny":
        sys.path.insert(0, str(ROOT / "examples"))
        from tiny_model import tiny_model, tiny_tokenizer

        tok = tiny_tokenizer()
        model, module, layers = tiny_model(tok, seed=1), TINY_MODULE, None
    else:
        from peft_spectral.assets import load_model

        model, tok = load_model(None)
        module, layers = DEFAULT_MODULE, [18, 19, 20, 21]
    problem = C.planted_problem(model, tok, module)
    modules = C.find_target_modules(problem.model, ["up_proj", "down_proj"], layers)
    return problem, tok, modules


def _timed(fn, state):
    if state is not None:
        state.wait_for_everyone()
    t = time.perf_counter()
    out = fn()
    if state is not None:
        state.wait_for_everyone()
    return out, time.perf_counter() - t


def worker(args) -> None:
    """Time the gradient pass and the LASER grid in this process (one of the launched ones, or alone)."""
    from peft_spectral import compress as C
    from peft_spectral.compress.distributed import launched_state

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    problem, tok, modules = _setup(args.model)
    state = launched_state()
    calibration = problem.train[: args.n_grad]
    grid = C.candidate_grid(modules, args.rhos)
    scores, grad_s = _timed(
        lambda: C.c2i_scores(problem.model, calibration, modules, tokenizer=tok, batch_size=args.batch_size), state
    )
    ranked = C.score_candidates(scores.grads, scores.svds, args.rhos)
    laser, laser_s = _timed(
        lambda: C.laser_search(problem.model, problem.validation, grid, tokenizer=tok, progress=False), state
    )
    if state is None or state.is_main_process:
        out = {
            "processes": 1 if state is None else state.num_processes,
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
        Path(args.worker).write_text(json.dumps(out))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(num_processes: int, args, out_file: Path) -> dict:
    worker_args = [
        "--worker",
        str(out_file),
        "--model",
        args.model,
        "--n-grad",
        str(args.n_grad),
        "--batch-size",
        str(args.batch_size),
        "--threads",
        str(args.threads),
        "--rhos",
        ",".join(map(str, args.rhos)),
    ]
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


def _markdown(report: dict) -> str:
    rows = report["runs"]
    one = rows[0]
    lines = [
        "# C2I gradient pass and LASER grid on 1 vs 2 processes",
        "",
        (
            f"Model: {report['model']}; {one['n_calibration']} calibration examples (batch {report['batch_size']}), "
            f"LASER grid of {one['n_candidates']} candidates on {one['n_validation']} validation examples; "
            f"{report['threads']} thread(s) per process; machine: {report['machine']}."
        ),
        "",
        "| processes | gradient pass (s) | speed-up | LASER grid (s) | speed-up | whole launch (s) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['processes']} | {r['gradient_pass_s']:.2f} | {one['gradient_pass_s'] / r['gradient_pass_s']:.2f}× "
            f"| {r['laser_grid_s']:.2f} | {one['laser_grid_s'] / r['laser_grid_s']:.2f}× | {r['launch_total_s']:.1f} |"
        )
    lines += [
        "",
        (
            f"Same choices as 1 process: {report['same_choices']} (LASER chose {one['laser_chosen']}; C2I top 5 "
            f"{one['top5']}); largest |Δg| vs 1 process: {report['max_grad_diff']:.2e}."
        ),
        "",
        "Times are between barriers inside the workers (model loading and the launch excluded; `whole launch` "
        "includes them). " + report["note"],
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny' (default: the tiny random Llama) or 'default'")
    p.add_argument("--n-grad", type=int, default=128, help="calibration examples of the gradient pass")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--rhos", type=lambda s: [float(x) for x in s.split(",")], default=[0.9, 0.8, 0.6, 0.2, 0.1])
    p.add_argument("--processes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    p.add_argument("--out", default=str(ROOT / "docs" / "results"))
    p.add_argument("--note", default="Measured on a shared CPU machine: indicative only.")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.model not in ("tiny", "default"):
        p.error(f"--model must be 'tiny' or 'default', got {args.model!r}")
    if args.worker:
        worker(args)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        runs = [_run(n, args, Path(tmp) / f"np{n}.json") for n in args.processes]
    one = runs[0]
    max_diff = max(
        float((torch.tensor(r["grads"][k]) - torch.tensor(g)).abs().max())
        for r in runs
        for k, g in one["grads"].items()
    )
    same = all(r["top5"] == one["top5"] and r["laser_chosen"] == one["laser_chosen"] for r in runs)
    same = same and all(r["laser_table"] == one["laser_table"] for r in runs)
    for r in runs:
        r.pop("grads")
    report = {
        "model": "tiny random Llama (examples/tiny_model.py)" if args.model == "tiny" else "embedded default model",
        "batch_size": args.batch_size,
        "threads": args.threads,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "same_choices": same,
        "max_grad_diff": max_diff,
        "note": args.note,
        "runs": runs,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compress_distributed.json").write_text(json.dumps(report, indent=1))
    (out / "compress_distributed.md").write_text(_markdown(report))
    print(_markdown(report))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
