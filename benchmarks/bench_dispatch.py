"""Transformer² pass 1 alone: how often prompt dispatch picks the right expert, with and without contextual
calibration (`PromptDispatcher(content_free=...)`).

The embedded 135M model, asked which category a question belongs to, can favour one category name whatever the
question (in the demo it sent every 3-term sum to the word-reversal expert). Contextual calibration (Zhao et al.,
2021) subtracts each category's log-probability on content-free questions ("N/A", "", "?") before the argmax.

Prompts, each with its right category: the first `--n` test questions of every expert's own task (that expert),
of `--related` unseen tasks (their related expert) and of `--others` tasks no expert covers (`others`, the base
model). Both dispatchers score the same prompts (plain argmax, no threshold). Reported: dispatch accuracy overall and
per true category with Wilson 95% intervals, calibrated − raw paired on the same prompts (bootstrap 95% CI, exact
McNemar p), and where each category's prompts went. Pass 2 (the answers) is `bench_transformer2.py`.

    python benchmarks/bench_dispatch.py             # shipped library, a few minutes on 2 cores: docs/results/dispatch.{json,md}
    python benchmarks/bench_dispatch.py --smoke     # tiny model, random experts, seconds
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from peft_spectral.benchmarking import BenchmarkRun, add_benchmark_arguments, markdown_table
from peft_spectral.benchmarking.experts import library_experts, library_specs, random_svf_experts
from peft_spectral.benchmarking.reporting import stat_entry, task_label
from peft_spectral.data import load_task
from peft_spectral.paths import library_dir
from peft_spectral.stats import accuracy_ci, compare_paired
from peft_spectral.transformer2 import OTHERS, ExpertLibrary, PromptDispatcher


#: Unseen tasks and their related expert (the demo's unseen task first).
RELATED = ["rg:chain_sum?max_digits=1&max_terms=3&min_terms=3@arithmetic", "rg:word_sorting?max_words=3@reversal"]
OTHERS_TASKS = ["rg:caesar_cipher?max_words=1&min_words=1", "rg:isomorphic_strings?max_string_length=4"]
CONTENT_FREE = ["N/A", "", "?"]
SMOKE_TASKS = ["rg:gcd?max_value=10", "rg:spell_backward?max_word_len=3"]


def expert_tasks(root: Path, smoke: bool) -> tuple[list[dict], dict[str, str]]:
    """The library's experts as `ExpertLibrary` specs, and `expert name -> task spec` (tiny tasks in a smoke run)."""
    _, message = library_experts(root, minimum=2, option="--library")
    if message:
        raise SystemExit(message)
    specs, tasks = library_specs(root)
    if smoke:
        tasks = {name: SMOKE_TASKS[k % len(SMOKE_TASKS)] for k, name in enumerate(tasks)}
    return specs, tasks


def prompts(args, tasks: dict[str, str], names: list[str]) -> list[tuple[str, str, list]]:
    """`(group label, right category, examples)`: the experts' tasks, the related tasks, the `others` tasks."""
    load = lambda spec: load_task(spec, seed=args.seed, max_examples=max(400, 4 * args.n)).test[: args.n]  # noqa: E731
    out = [(f"own: {name}", name, load(spec)) for name, spec in tasks.items()]
    for pair in args.related:
        spec, _, expert = pair.rpartition("@")
        if expert not in names:
            raise SystemExit(f"--related {pair}: no expert {expert!r} in the library ({', '.join(names)})")
        out.append((f"related: {task_label(spec)} → {expert}", expert, load(spec)))
    out += [(f"others: {task_label(spec)}", OTHERS, load(spec)) for spec in args.others]
    return out


def summary(groups, picks: dict[str, list[str]]) -> tuple[dict, str]:
    """Accuracy per dispatcher and group, the paired difference, where the prompts went; the markdown."""
    truth = [right for _, right, exs in groups for _ in exs]
    correct = {label: [p == t for p, t in zip(chosen, truth)] for label, chosen in picks.items()}
    data = {"n": len(truth), "dispatchers": {}, "groups": {}}
    for label, verdicts in correct.items():
        data["dispatchers"][label] = stat_entry(accuracy_ci(verdicts))
    data["calibrated_minus_raw"] = stat_entry(compare_paired(correct["raw"], correct["calibrated"]))
    rows, start = [], 0
    for name, right, exs in groups:
        span = slice(start, start + len(exs))
        start += len(exs)
        entry = {"right": right, "n": len(exs)}
        for label in picks:
            chosen = picks[label][span]
            entry[label] = {
                **stat_entry(accuracy_ci(correct[label][span])),
                "chosen": {c: chosen.count(c) for c in sorted(set(chosen))},
            }
        data["groups"][name] = entry
        went = {label: ", ".join(f"{c} {k}" for c, k in entry[label]["chosen"].items()) for label in picks}
        rows.append(
            [name, len(exs), entry["raw"]["text"], entry["calibrated"]["text"], went["raw"], went["calibrated"]]
        )
    head = ["prompts (right category)", "n", "raw", "calibrated", "raw: chosen", "calibrated: chosen"]
    overall = [["all", data["n"], data["dispatchers"]["raw"]["text"], data["dispatchers"]["calibrated"]["text"]]]
    text = (
        "Dispatch accuracy [Wilson 95%] (plain argmax over the experts and `others`, no threshold):\n\n"
        + markdown_table(head[:4], overall)
        + f"\n\nCalibrated − raw, paired on the same prompts: {data['calibrated_minus_raw']['text']}.\n\n"
        + markdown_table(head, rows, "lr" + "l" * 4)
    )
    return data, text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_arguments(p, name="dispatch")
    p.add_argument("--library", default=None, help="expert library; left out: peft_spectral/library/")
    p.add_argument("--n", type=int, default=100, help="test prompts per task")
    p.add_argument("--related", nargs="*", default=RELATED, metavar="SPEC@EXPERT", help="unseen tasks")
    p.add_argument("--others", nargs="*", default=OTHERS_TASKS, metavar="SPEC", help="tasks of no expert")
    p.add_argument("--content-free", nargs="+", default=CONTENT_FREE, metavar="TEXT", help="calibration texts")
    args = p.parse_args(argv)
    if args.smoke:
        args.n, args.others = 4, ["rg:coin_flip?max_trials=6"]
        args.related = [f"{SMOKE_TASKS[0]}&min_value=2@random_0"] if args.related == RELATED else args.related
    config = {k: getattr(args, k) for k in ("library", "n", "related", "others", "content_free")}
    run = BenchmarkRun.from_args(args, config)
    model, tok = run.load_model()
    root = Path(args.library) if args.library else library_dir()
    if args.smoke:
        root = random_svf_experts(run.output_dir / "library", 2)
    specs, tasks = expert_tasks(root, args.smoke)
    library = ExpertLibrary.load(model, tok, specs)
    groups = prompts(args, tasks, library.names)
    examples = [ex for _, _, exs in groups for ex in exs]
    dispatchers = {"raw": PromptDispatcher(None), "calibrated": PromptDispatcher(None, content_free=args.content_free)}
    for label in run.jobs(list(dispatchers), desc="dispatchers"):
        t0 = time.perf_counter()
        chosen = dispatchers[label](library, examples)
        run.record(label, {"chosen": chosen, "seconds": time.perf_counter() - t0})
    picks = {label: run.result(label)["chosen"] for label in dispatchers}
    data, text = summary(groups, picks)
    data["seconds"] = {label: run.result(label)["seconds"] for label in dispatchers}
    data["experts"] = tasks
    run.write(data, text, title="Transformer² pass 1: prompt dispatch with and without contextual calibration")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
