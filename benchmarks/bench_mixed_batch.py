"""Transformer² pass 2 as one mixed-adapter batch vs one batch per expert (grouped).

A batch of prompts (the first `--batch-size` test questions of `--prompt-task`, a reasoning-gym task) is answered by
an expert library: every expert of `--experts-dir` (default: the package's library `peft_spectral/library/`) on the
model of `--model`; `--smoke`: 3 random SVF experts of the tiny model, built on the fly. For each share of rows sent to
the base model (`__base__`, the "others" answer of dispatch; the remaining rows are spread round-robin over the
experts), the same forward pass (logits of the whole batch) is timed both ways, in alternating order, and the outputs
compared:

* mixed: one forward with `adapter_names=[...]` (one name per row; `tuners/svf/mixed_batch.py`);
* grouped: one forward per expert on its rows (`ExpertLibrary.use`), the base model's rows with the adapters disabled.

    python benchmarks/bench_mixed_batch.py                  # embedded model, the package's library (about 2 minutes)
    python benchmarks/bench_mixed_batch.py --experts-dir DIR
    python benchmarks/bench_mixed_batch.py --smoke          # tiny random model, random experts (seconds)

Exits with status 2 when the library holds no expert. Resumable: each base share is kept in the state file.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from peft_spectral.benchmarking import BenchmarkRun, add_benchmark_arguments, markdown_table
from peft_spectral.benchmarking.experts import default_library_dir, library_experts, random_svf_experts
from peft_spectral.data import load_task
from peft_spectral.transformer2 import ExpertLibrary, expert_name
from peft_spectral.tuners.svf.mixed_batch import BASE_ADAPTER


#: The prompts' task: family relationships (reasoning-gym, level 1 of `benchmarks/probe_tasks.py`), ~45 tokens each.
PROMPT_TASK = "rg:family_relationships?max_family_size=4"


def assign(n_rows: int, experts: list[str], base_share: float) -> list[str]:
    """Row names: the first `round(base_share * n_rows)` rows `__base__`, the rest round-robin over `experts`."""
    n_base = round(base_share * n_rows)
    return [BASE_ADAPTER] * n_base + [experts[i % len(experts)] for i in range(n_rows - n_base)]


def mixed_forward(library, batch, names: list[str]) -> torch.Tensor:
    anchor = next((n for n in names if n in library.experts), library.names[0])
    with torch.no_grad(), library.use(anchor):
        return library.model(**batch, adapter_names=names).logits


def grouped_forward(library, batch, names: list[str]) -> torch.Tensor:
    out = None
    for name in dict.fromkeys(names):
        rows = [i for i, n in enumerate(names) if n == name]
        part = {k: v[rows] for k, v in batch.items()}
        with torch.no_grad(), library.use(None if name == BASE_ADAPTER else name):
            logits = library.model(**part).logits
        if out is None:
            out = torch.empty((len(names), *logits.shape[1:]), dtype=logits.dtype)
        out[rows] = logits
    return out


def measure(library, batch, names: list[str], rounds: int) -> dict:
    """Median seconds of both paths over `rounds` alternating runs (after one warm-up each) and their difference."""
    mixed, grouped = mixed_forward(library, batch, names), grouped_forward(library, batch, names)
    times: dict[str, list[float]] = {"mixed": [], "grouped": []}
    for r in range(rounds):
        for path in ("mixed", "grouped") if r % 2 == 0 else ("grouped", "mixed"):
            fn = mixed_forward if path == "mixed" else grouped_forward
            start = time.perf_counter()
            fn(library, batch, names)
            times[path].append(time.perf_counter() - start)
    m, g = statistics.median(times["mixed"]), statistics.median(times["grouped"])
    return {
        "mixed_s": m,
        "grouped_s": g,
        "mixed_over_grouped": m / g,
        "times": times,
        "max_abs_diff": float((mixed - grouped).abs().max()),
        "groups": len(set(names)),
    }


def prompt_batch(tokenizer, spec: str, n: int, seed: int) -> dict:
    """The first `n` test prompts of `spec`, tokenized with left padding."""
    task = load_task(spec, seed=seed, max_examples=max(100, 5 * n + 5))
    prompts = [ex.prompt for ex in task.test[:n]]
    if len(prompts) < n:
        raise SystemExit(f"--prompt-task {spec}: {len(prompts)} test prompts, fewer than --batch-size {n}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer(prompts, return_tensors="pt", padding=True)


def markdown(data: dict, command: str) -> str:
    intro = (
        f"Command: `{command}`. {len(data['experts'])} experts ({', '.join(data['experts'])}); one forward of a batch "
        f"of {data['batch_size']} prompts of `{data['prompt_task']}` ({data['tokens']} tokens each after left "
        f"padding); median of {data['rounds']} alternating runs, {data['torch_threads']} torch threads."
    )
    table = markdown_table(
        [
            "rows to the base model",
            "groups",
            "mixed batch (s)",
            "grouped (s)",
            "mixed / grouped",
            "max abs logit diff",
        ],
        [
            [
                f"{row['base_share']:.0%}",
                row["groups"],
                f"{row['mixed_s']:.3f}",
                f"{row['grouped_s']:.3f}",
                f"{row['mixed_over_grouped']:.2f}",
                f"{row['max_abs_diff']:.1e}",
            ]
            for row in data["rows"]
        ],
        "rrrrrr",
    )
    return f"{intro}\n\n{table}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_arguments(p, name="mixed_batch")
    p.add_argument(
        "--experts-dir",
        type=Path,
        default=None,
        help=f"expert library (*/expert.json); left out: {default_library_dir()} (--smoke: random experts)",
    )
    p.add_argument("--prompt-task", default=PROMPT_TASK, help="task spec of the prompts (the first test questions)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--base-shares", type=float, nargs="+", default=[0.0, 0.5, 0.75])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch_size, args.rounds = min(args.batch_size, 8), min(args.rounds, 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = {
        "experts_dir": str(args.experts_dir) if args.experts_dir else ("random" if args.smoke else "library"),
        "prompt_task": args.prompt_task,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
    }
    run = BenchmarkRun.from_args(args, config)
    with tempfile.TemporaryDirectory() as tmp:
        experts_dir = args.experts_dir or (
            random_svf_experts(Path(tmp) / "experts", 3) if args.smoke else default_library_dir()
        )
        found, problem = library_experts(experts_dir)
        if problem:
            print(problem, file=sys.stderr)
            return 2
        base, tokenizer = run.load_model()
        library = ExpertLibrary.load(
            base, tokenizer, [{"name": expert_name(e.task), "source": str(e.path)} for e in found]
        )
        batch = prompt_batch(library.tokenizer, args.prompt_task, args.batch_size, args.seed)
        keys = {f"share:{share}": share for share in args.base_shares}
        for key in run.jobs(list(keys), desc="base shares"):
            names = assign(args.batch_size, library.names, keys[key])
            row = run.record(key, {"base_share": keys[key], **measure(library, batch, names, args.rounds)})
            print(
                f"base share {row['base_share']:.0%}: mixed {row['mixed_s']:.3f} s, grouped {row['grouped_s']:.3f} s "
                f"({row['mixed_over_grouped']:.2f}x), max abs diff {row['max_abs_diff']:.1e}",
                flush=True,
            )
    data = {
        "experts": library.names,
        "prompt_task": args.prompt_task,
        "batch_size": args.batch_size,
        "tokens": int(batch["input_ids"].shape[1]),
        "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(),
        "rows": [run.result(key) for key in keys],
    }
    command = " ".join(["python benchmarks/bench_mixed_batch.py", *(sys.argv[1:] if argv is None else argv)])
    run.write(data, markdown(data, command), title="Mixed-adapter batches vs grouped by expert (Transformer² pass 2)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
