"""Benchmark: Transformer² pass 2 as one mixed-adapter batch vs one batch per expert (grouped).

A batch of prompts is answered by an expert library (every expert of `--experts-dir`, default the committed
`benchmarks/experts/`, on the embedded model; `--smoke`: random SVF experts of a tiny random model). For each share of
rows sent to the base model (`__base__`, the "others" answer of dispatch; the remaining rows are spread round-robin
over the experts), the same forward pass (logits of the whole batch) is timed both ways, in alternating order, and
the outputs compared:

* mixed: one forward with `adapter_names=[...]` (one name per row; `tuners/svf/mixed_batch.py`);
* grouped: one forward per expert on its rows (`ExpertLibrary.use`), the base model's rows with the adapters disabled.

Writes `mixed_batch.json` and `mixed_batch.md` to `--out`.

    python benchmarks/bench_mixed_batch.py                  # embedded model, committed experts (about 2 minutes)
    python benchmarks/bench_mixed_batch.py --smoke          # tiny random model (seconds)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _library(args, work: Path):
    from peft_spectral.transformer2 import ExpertLibrary, find_experts
    from peft_spectral.transformer2.library import expert_name

    if args.smoke:
        from bench_distributed import _base_model, save_random_experts

        root = save_random_experts(work / "experts", 3)
        base, tok = _base_model("tiny")
        prompts = [f"Question {i}: what comes after {i}?" for i in range(args.batch_size)]
    else:
        from peft_spectral.assets import load_default_model
        from peft_spectral.tasks import load_task

        root = Path(args.experts_dir)
        base, tok = load_default_model()
        prompts = [e.prompt for e in load_task(args.prompt_task, seed=0).test[: args.batch_size]]
    found = find_experts(root)
    if not found:
        raise SystemExit(f"--experts-dir {root}: no experts (*/expert.json next to adapter_config.json)")
    specs = [{"name": expert_name(e.task), "source": str(e.path)} for e in found]
    library = ExpertLibrary.load(base, tok, specs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True)
    return library, batch


def assign(n_rows: int, experts: list[str], base_share: float) -> list[str]:
    """Row names: the first `round(base_share * n_rows)` rows `__base__`, the rest round-robin over `experts`."""
    from peft_spectral.tuners.svf.mixed_batch import BASE_ADAPTER

    n_base = round(base_share * n_rows)
    return [BASE_ADAPTER] * n_base + [experts[i % len(experts)] for i in range(n_rows - n_base)]


def mixed_forward(library, batch, names: list[str]) -> torch.Tensor:
    anchor = next((n for n in names if n in library.experts), library.names[0])
    with torch.no_grad(), library.use(anchor):
        return library.model(**batch, adapter_names=names).logits


def grouped_forward(library, batch, names: list[str]) -> torch.Tensor:
    from peft_spectral.tuners.svf.mixed_batch import BASE_ADAPTER

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
        order = ("mixed", "grouped") if r % 2 == 0 else ("grouped", "mixed")
        for path in order:
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


def markdown(report: dict) -> str:
    lines = [
        "# Mixed-adapter batches vs grouped by expert (Transformer² pass 2)",
        "",
        (
            f"Generated by `benchmarks/bench_mixed_batch.py`{' --smoke' if report['smoke'] else ''} on "
            f"{report['machine']}. Model: {report['model']}; {len(report['experts'])} experts "
            f"({', '.join(report['experts'])}); one forward of a batch of {report['batch_size']} prompts "
            f"({report['tokens']} tokens each after left padding); median of {report['rounds']} alternating runs."
        ),
        "",
        "| rows to the base model | groups | mixed batch (s) | grouped (s) | mixed / grouped | max abs logit diff |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['base_share']:.0%} | {row['groups']} | {row['mixed_s']:.3f} | {row['grouped_s']:.3f} | "
            f"{row['mixed_over_grouped']:.2f} | {row['max_abs_diff']:.1e} |"
        )
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts-dir", default=str(ROOT / "benchmarks" / "experts"))
    p.add_argument("--prompt-task", default="sports_understanding", help="prompts: the first test examples of it")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--base-shares", type=float, nargs="+", default=[0.0, 0.5, 0.75])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--out", default=str(ROOT / "docs" / "results"))
    p.add_argument("--smoke", action="store_true", help="tiny random model and random experts (seconds)")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch_size, args.rounds = min(args.batch_size, 8), min(args.rounds, 2)
        if args.out == p.get_default("out"):
            args.out = str(Path(tempfile.gettempdir()) / "bench_mixed_batch_smoke")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        library, batch = _library(args, Path(tmp))
        rows = []
        for share in args.base_shares:
            names = assign(args.batch_size, library.names, share)
            row = {"base_share": share, **measure(library, batch, names, args.rounds)}
            rows.append(row)
            print(
                f"base share {share:.0%}: mixed {row['mixed_s']:.3f} s, grouped {row['grouped_s']:.3f} s "
                f"({row['mixed_over_grouped']:.2f}x), max abs diff {row['max_abs_diff']:.1e}",
                flush=True,
            )
    report = {
        "smoke": args.smoke,
        "model": "tiny random Llama" if args.smoke else "SmolLM2-135M-Instruct (embedded, fp32)",
        "experts": library.names,
        "batch_size": args.batch_size,
        "tokens": int(batch["input_ids"].shape[1]),
        "rounds": args.rounds,
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mixed_batch.json").write_text(json.dumps(report, indent=1))
    (out / "mixed_batch.md").write_text(markdown(report))
    print(f"wrote {out / 'mixed_batch.json'} and .md", flush=True)
    return report


if __name__ == "__main__":
    main()
