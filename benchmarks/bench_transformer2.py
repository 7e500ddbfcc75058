"""Benchmark: Transformer² with the SVF expert library on tasks no expert was trained on, shaped like the paper's.

The paper pairs each unseen task with a related expert (GSM8K → MATH, MBPP → HumanEval); its gains come from
transferring a related skill, CEM's from combining several. Here, with the library of `peft_spectral/library/`:

* **related** unseen tasks: per skill family a harder setting of an expert's generator and a sibling generator;
* a **two-skill** task that needs two families at once;
* **controls**: unrelated tasks where the right answer is the base model (`others`).

Strategies, each scored on the same n test questions (greedy answers read leniently by the task's own verifier):
**base**; **prompt dispatch** and **classifier dispatch** (pass 1 picks an expert or `others`; the threshold and the
classifier's `others` class are fitted on validation prompts of the experts' tasks and of separate `others` tasks,
disjoint from every task scored); **CEM** (few-shot mixing weights on shots from the task's train split); **oracle**
(the related expert; every single expert on the two-skill task). Reported: Δ vs base with paired 95% CIs, dispatch
accuracy, pass-1 / pass-2 time, the goals of issue #25 §3 met or not, and each gain beside the majority answer (a
constant giving the training split's most frequent answer: a gain it also gets is an answer prior, not a skill).

    python benchmarks/bench_transformer2.py          # the embedded model and the shipped library (~1.8 h on 2 cores)
    python benchmarks/bench_transformer2.py --smoke  # tiny model, random experts, seconds

Resumable: every answer set, pass-1 score set, classifier and CEM search is a job in the run state. A job's key
names what it used (the task spec's digest, each expert's content digest, the classifier's inputs), so a retrained
expert or a changed task re-runs only the jobs that used it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from peft_spectral.benchmarking import BenchmarkRun, add_benchmark_arguments, markdown_table
from peft_spectral.benchmarking.experts import LibraryJobKeys, library_specs, random_svf_experts
from peft_spectral.benchmarking.reporting import majority_by_strategy
from peft_spectral.data import load_task
from peft_spectral.evaluation import evaluate
from peft_spectral.paths import library_dir
from peft_spectral.plots import ci_bar_chart
from peft_spectral.stats import accuracy_ci, compare_paired
from peft_spectral.transformer2 import (
    OTHERS,
    CEMConfig,
    ExpertLibrary,
    FewShotMixer,
    PromptDispatcher,
    build_classifier_examples,
    decide_categories,
    fit_threshold,
    train_classifier_expert,
)


_SUMS = "allow_negation=false&allow_parentheses=false"
#: name -> (role, task spec, the related expert or `None`); roles: related, two_skill, control.
UNSEEN = {
    "sums_3digit": (
        "related",
        f"rg:basic_arithmetic?{_SUMS}&max_digits=3&max_terms=2&min_digits=3&min_terms=2&operators=+,-",
        "arithmetic",
    ),
    "chain_sum": ("related", "rg:chain_sum?max_digits=1&max_terms=3&min_terms=3", "arithmetic"),
    "reverse_more_words": ("related", "rg:word_sequence_reversal?max_words=6&min_words=5", "reversal"),
    "word_sorting": ("related", "rg:word_sorting?max_word_length=6&max_words=3&min_words=3", "reversal"),
    "letters_longer": ("related", "rg:letter_counting?max_words=6&min_words=4", "counting"),
    "count_bits_big": ("related", "rg:count_bits?max_n=4095&min_n=256", "counting"),
    "gcd_larger": ("related", "rg:gcd?max_value=200&min_value=51", "number_theory"),
    "prime_factors": ("related", "rg:prime_factorization?max_value=2000&min_value=100", "number_theory"),
    # family_relationships is reasoning-gym's only kinship generator: two harder settings instead of a sibling
    "kinship_6": ("related", "rg:family_relationships?max_family_size=6&min_family_size=5", "kinship"),
    "kinship_8": ("related", "rg:family_relationships?max_family_size=8&min_family_size=7", "kinship"),
    "leg_counting": ("two_skill", "rg:leg_counting?max_animals=2&max_instances=3&min_animals=1", None),
    "number_format": ("control", "rg:number_format?max_num_candidates=4&min_num_candidates=3", None),
    "syllogism": ("control", "rg:syllogism?inversion_probability=0.5", None),
}
#: Tasks of the `others` class (classifier training, threshold fitting): generators of neither the experts nor UNSEEN.
OTHERS_TASKS = (
    "rg:caesar_cipher?max_words=1&min_words=1",
    "rg:isomorphic_strings?max_string_length=4",
    "rg:fraction_simplification?max_factor=5&max_value=20&styles=plain",
)
DISPATCHERS = ("prompt_dispatch", "calibrated_dispatch", "classifier_dispatch")
LABELS = {"prompt_dispatch": "prompt dispatch", "calibrated_dispatch": "prompt dispatch, calibrated"}
LABELS["classifier_dispatch"] = "classifier dispatch"
#: Content-free questions of the calibrated prompt dispatch (contextual calibration, see docs/transformer2.md).
CONTENT_FREE = ("N/A", "", "?")
GOALS = {"mean_delta": 0.05, "recovery": 0.8}


def answers(run, library, key: str, adapter, task, n: int, max_new_tokens: int) -> list[bool]:
    """Verdicts of `adapter` (`None`: the base model) on the first `n` test questions, cached as job `key`."""

    def compute():
        t0 = time.perf_counter()
        with library.use(adapter):
            result = evaluate(
                library.model, library.tokenizer, task.test[:n], kind=task.kind, max_new_tokens=max_new_tokens
            )
        return {"correct": result.correct, "seconds": time.perf_counter() - t0}

    return run.cached(key, compute)["correct"]


def pass1(run, library, key: str, dispatcher, examples) -> tuple[list[list[float]], float]:
    def compute():
        t0 = time.perf_counter()
        return {"scores": dispatcher.scores(library, examples), "seconds": time.perf_counter() - t0}

    entry = run.cached(key, compute)
    return entry["scores"], entry["seconds"]


def compare(base: list[bool], other: list[bool]) -> dict:
    ci, delta = accuracy_ci(other), compare_paired(base, other)
    return {
        "accuracy": ci.accuracy,
        "low": ci.low,
        "high": ci.high,
        "delta": delta.delta,
        "delta_low": delta.low,
        "delta_high": delta.high,
        "p": delta.p_value,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_arguments(parser, name="transformer2")
    parser.add_argument("--library", default=None, help="expert library; left out: peft_spectral/library/")
    parser.add_argument("--n-test", type=int, default=200, help="test questions per unseen task")
    parser.add_argument("--n-calibrate", type=int, default=32, help="validation prompts per task for the threshold")
    parser.add_argument("--shots", type=int, default=12, help="CEM shots (from train)")
    parser.add_argument("--population", type=int, default=8, help="CEM population")
    parser.add_argument("--generations", type=int, default=3, help="CEM generations")
    parser.add_argument("--classifier-steps", type=int, default=40, help="classifier SFT steps (batch 8)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="generation budget of every answer")
    args = parser.parse_args(argv)
    if args.smoke:
        args.n_test, args.n_calibrate, args.shots, args.population, args.generations = 6, 4, 4, 4, 2
        args.classifier_steps, args.max_new_tokens = 2, 4
    config = {
        k: v
        for k, v in vars(args).items()
        if k not in ("output", "state", "no_progress", "smoke", "model", "benchmark_name")
    }
    # the unseen tasks and the experts are in the job keys (`LibraryJobKeys`), not in the run's fingerprint
    run = BenchmarkRun.from_args(args, {**config, "others": OTHERS_TASKS})
    model, tok = run.load_model()
    if args.smoke:
        root = run.output_dir / "library"
        random_svf_experts(root, 3)
        specs, expert_tasks = library_specs(root)
        names = [s["name"] for s in specs]
        unseen = {
            "related_a": ("related", "rg:gcd?max_value=30", names[0]),
            "two": ("two_skill", "rg:lcm?max_value=10", None),
            "ctl": ("control", "rg:coin_flip?max_trials=6", None),
        }
        expert_tasks = dict(
            zip(
                names,
                [
                    "rg:gcd?max_value=10",
                    "rg:spell_backward?max_word_len=3",
                    "rg:letter_counting?max_words=2&min_words=1",
                ],
            )
        )
        others = ("rg:syllogism?inversion_probability=0",)
    else:
        specs, expert_tasks = library_specs(Path(args.library) if args.library else library_dir())
        unseen, others = UNSEEN, OTHERS_TASKS
        missing = {e for _, _, e in unseen.values() if e} - set(expert_tasks)
        if missing:
            raise SystemExit(
                f"the library has no expert {sorted(missing)} that UNSEEN names; train it (bench_experts.py --train)"
            )
    overlap = set(expert_tasks.values()) & {s for _, s, _ in unseen.values()} | set(others) & {
        s for _, s, _ in unseen.values()
    }
    if overlap:
        raise SystemExit(f"task sets overlap: {sorted(overlap)}")
    library = ExpertLibrary.load(model, tok, specs)
    names = library.names
    labels = {"prompt_dispatch": "descriptions", "calibrated_dispatch": "descriptions"}
    keys = LibraryJobKeys(unseen, specs, expert_tasks, others, {**labels, "classifier_dispatch": "classifier"})
    load = lambda spec: load_task(spec, seed=args.seed, max_examples=max(1000, 5 * args.n_test))  # noqa: E731
    tasks = {n: load(s) for n, (_, s, _) in unseen.items()}
    exp_tasks = {n: load(s) for n, s in expert_tasks.items()}
    oth_tasks = {s: load(s) for s in others}

    # ---------------------------------------------------------------------------------------- pass 1: dispatchers
    folder = run.output_dir / "transformer2_classifier"
    if not run.done(keys.classifier) or not (folder / "adapter_config.json").is_file():
        data = build_classifier_examples(
            library,
            {n: t.train for n, t in exp_tasks.items()},
            others={s: t.train for s, t in oth_tasks.items()},
            seed=args.seed,
        )
        t0 = time.perf_counter()
        train_classifier_expert(library, data, folder, steps=args.classifier_steps, seed=args.seed)
        run.record(keys.classifier, {"seconds": time.perf_counter() - t0, "examples": len(data)})
    classifier = library.load_extra_adapter(folder, "classifier", "classifier")
    dispatchers = {
        "prompt_dispatch": PromptDispatcher(None),
        "calibrated_dispatch": PromptDispatcher(None, content_free=CONTENT_FREE),
        "classifier_dispatch": PromptDispatcher(classifier),
    }
    categories = names + [OTHERS]
    decisions, calibration, pass1_seconds = {}, {}, {}
    for label, dispatcher in dispatchers.items():
        scores, truth = [], []
        for n, t in [*exp_tasks.items(), *oth_tasks.items()]:
            key = keys.pass1(label, n, calibrate=True)
            rows, _ = pass1(run, library, key, dispatcher, t.validation[: args.n_calibrate])
            scores += rows
            truth += [n if n in exp_tasks else OTHERS] * len(rows)
        threshold, fitted = fit_threshold(scores, categories, truth)
        calibration[label] = {"threshold": threshold, "validation_accuracy": fitted["accuracy"], "n": len(truth)}
        for n, t in tasks.items():
            rows, seconds = pass1(run, library, keys.pass1(label, n), dispatcher, t.test[: args.n_test])
            decisions[(label, n)] = decide_categories(rows, categories, threshold=threshold)
            pass1_seconds[(label, n)] = seconds

    # ---------------------------------------------------------------------------------------- pass 2 and CEM
    results, answer_seconds = {}, {}
    for n, (role, spec, related) in progress(unseen.items(), run.progress):
        task = tasks[n]
        base = answers(run, library, keys.answers(None, n), None, task, args.n_test, args.max_new_tokens)
        row = {"role": role, "spec": spec, "related": related, "n": len(base), "base": compare(base, base)}
        singles = names if role == "two_skill" else [related] if related else []
        single = {
            e: answers(run, library, keys.answers(e, n), e, task, args.n_test, args.max_new_tokens) for e in singles
        }
        row["experts"] = {e: compare(base, c) for e, c in single.items()}
        verdicts = {}
        if related:
            row["oracle"], verdicts["oracle"] = row["experts"][related], single[related]
        elif role == "two_skill":
            best = max(single, key=lambda e: sum(single[e]))
            row["oracle"], verdicts["oracle"] = row["experts"][best], single[best]
        for label in DISPATCHERS:
            picks = decisions[(label, n)]
            correct = list(base)
            for e in sorted(set(picks) - {OTHERS}):
                chosen = answers(run, library, keys.answers(e, n), e, task, args.n_test, args.max_new_tokens)
                correct = [c if p == e else k for p, c, k in zip(picks, chosen, correct)]
            right, verdicts[label] = related or OTHERS, correct
            row[label] = {
                **compare(base, correct),
                "chosen": {c: picks.count(c) for c in sorted(set(picks))},
                "dispatch_accuracy": (sum(p == right for p in picks) / len(picks)) if role != "two_skill" else None,
            }
        cem = run.cached(keys.cem(n), lambda task=task, n=n: search_cem(library, task, args, n))
        mixer = FewShotMixer(
            library,
            task.train[: args.shots],
            kind=task.kind,
            max_new_tokens=args.max_new_tokens,
            adapter_name=f"mix_{n}",
        )
        mixer.around_base = cem["around_base"]
        mixer.apply(cem["best_alpha"])
        verdicts["cem"] = answers(
            run, library, keys.answers("cem", n), mixer.adapter_name, task, args.n_test, args.max_new_tokens
        )
        row["cem"] = {
            **compare(base, verdicts["cem"]),
            "alpha": dict(zip(names, cem["best_alpha"])),
            "search_seconds": cem["seconds"],
        }
        row["majority"] = majority_by_strategy(task.train, task.test[: len(base)], base, verdicts)
        results[n] = row
        answer_seconds[n] = run.result(keys.answers(None, n))["seconds"]
    timing = {
        label: sum(pass1_seconds[(label, n)] for n in tasks) / sum(answer_seconds.values()) for label in DISPATCHERS
    }
    goals = evaluate_goals(results, args.n_test)
    data = {
        "rows": results,
        "calibration": calibration,
        "pass1_over_pass2": timing,
        "goals": goals,
        "experts": expert_tasks,
        "others_tasks": list(others),
    }
    plot(results, run.path(".png"))
    run.write(
        data,
        report(results, calibration, timing, goals, expert_tasks, args.n_test),
        title="Transformer² on unseen tasks",
    )
    return 0


def progress(items, enabled: bool):
    """`items` with a progress bar and ETA (every answer set and CEM search in it is a cached job)."""
    items = list(items)
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="transformer2: unseen tasks", unit="task")


def search_cem(library, task, args, name: str) -> dict:
    mixer = FewShotMixer(
        library,
        task.train[: args.shots],
        kind=task.kind,
        max_new_tokens=args.max_new_tokens,
        adapter_name=f"mix_{name}",
    )
    result = mixer.search(CEMConfig(population=args.population, generations=args.generations, seed=args.seed))
    return {
        "best_alpha": result.best_alpha.tolist(),
        "around_base": mixer.around_base,
        "seconds": result.seconds,
        "evaluations": result.evaluations,
        "history": result.history,
    }


def _mean_rest_delta(related: dict, strategies: list[str], entry) -> dict[str, float]:
    """Per strategy, the mean over `related` of the paired Δ that `entry` picks from its majority analysis (strategies
    without one on every task are left out)."""
    picked = {
        s: [entry(r["majority"]["strategies"][s]) if r.get("majority") else None for r in related.values()]
        for s in strategies
    }
    return {s: sum(e["delta"] for e in v) / len(v) for s, v in picked.items() if v and all(v)}


def evaluate_goals(results: dict, n_test: int) -> dict:
    """Issue #25 §3's goals; tasks with fewer than `n_test` test questions are left out of them (and named)."""
    too_small = sorted(n for n, r in results.items() if r["n"] < n_test)
    results = {n: r for n, r in results.items() if n not in too_small}
    related = {n: r for n, r in results.items() if r["role"] == "related"}
    strategies = [*DISPATCHERS, "cem"]
    mean = {s: sum(r[s]["delta"] for r in related.values()) / max(1, len(related)) for s in strategies}
    best = max(strategies, key=mean.get)
    significant = sum(r[best]["delta_low"] > 0 for r in related.values())
    below = [(n, s) for n, r in results.items() for s in strategies if r[s]["delta_high"] < 0]
    oracle_gain = sum(r["oracle"]["delta"] for r in related.values())
    recovery = {
        s: (sum(r[s]["delta"] for r in related.values()) / oracle_gain if oracle_gain > 0 else None)
        for s in DISPATCHERS
    }
    two = next((r for r in results.values() if r["role"] == "two_skill"), None)
    cem_beats = None if two is None else all(two["cem"]["accuracy"] > e["accuracy"] for e in two["experts"].values())
    beyond = _mean_rest_delta(related, strategies, lambda e: e["rest_delta"])
    beyond_top = _mean_rest_delta(related, strategies, lambda e: e["top_right"]["rest_delta"])
    return {
        "left_out_too_few_questions": too_small,
        "best_strategy": best,
        "mean_delta_related": mean,
        "mean_delta_related_beyond_majority": beyond,
        "mean_delta_related_beyond_top_right_answer": beyond_top,
        "best_mean_delta_met": mean[best] >= GOALS["mean_delta"] and significant * 2 >= len(related),
        "best_significant_tasks": f"{significant} of {len(related)}",
        "none_significantly_below_base": not below,
        "significantly_below": below,
        "oracle_recovery": recovery,
        "recovery_met": any(v is not None and v >= GOALS["recovery"] for v in recovery.values()),
        "cem_beats_every_single_expert_on_two_skill": cem_beats,
    }


def _cell(r: dict) -> str:
    return (
        f"{r['accuracy']:.3f}, Δ {100 * r['delta']:+.1f} [{100 * r['delta_low']:+.1f}, {100 * r['delta_high']:+.1f}]"
    )


def _dispatch_cell(entry: dict) -> str:
    accuracy = entry["dispatch_accuracy"]
    return f"{'—' if accuracy is None else f'{accuracy:.2f}'}, {entry['chosen']}"


def _points(entry: dict) -> str:
    return f"{100 * entry['delta']:+.1f} [{100 * entry['low']:+.1f}, {100 * entry['high']:+.1f}]"


def majority_table(results: dict) -> str:
    shown = ("classifier_dispatch", "cem", "oracle")
    rows = []
    for n, r in results.items():
        m = r.get("majority")
        if not m:
            continue
        cells = []
        for s in shown:
            e = m["strategies"].get(s)
            if not e or not e["rest_delta"]:
                cells.append("—")
                continue
            top = e["top_right"]
            if not top["right"]:
                cells.append(f"{_points(e['rest_delta'])}; none right")
                continue
            besides = f"; without `{top['answer']}` {_points(top['rest_delta'])}" if top["rest_delta"] else ""
            cells.append(
                f"{_points(e['rest_delta'])}; {top['right']} of {top['of_right']} right on `{top['answer']}`{besides}"
            )
        rows.append([f"`{n}`", f"`{m['answer']}` ({m['share']:.2f})", m["strategies"]["cem"]["rest_n"], *cells])
    headers = ["task", "majority answer (share of test)", "n without it", *(LABELS.get(s, s) for s in shown)]
    return markdown_table(headers, rows, "llr" + "r" * len(shown))


def report(results: dict, calibration: dict, timing: dict, goals: dict, experts: dict, n_test: int) -> str:
    rows = [
        [f"`{n}` ({r['role']})", r["n"], f"{r['base']['accuracy']:.3f} [{r['base']['low']:.2f}, {r['base']['high']:.2f}]", *(_cell(r[d]) for d in DISPATCHERS), _cell(r["cem"]), _cell(r["oracle"]) if "oracle" in r else "— (base)"]
        for n, r in results.items()
    ]  # fmt: skip
    table = markdown_table(
        ["task", "n", "base", *(LABELS[d] for d in DISPATCHERS), "CEM", "oracle"],
        rows,
        "lr" + "r" * (len(DISPATCHERS) + 3),
    )
    met = lambda ok: "met" if ok else "**not met**"  # noqa: E731
    g = goals
    lines = [
        table,
        "",
        "Accuracy, Δ vs base in points [paired 95% CI] on the same test questions (greedy answers read leniently).",
        "",
        "## Goals (issue #25 §3)",
        "",
        f"- best strategy's mean Δ over the related tasks ≥ +5 points with its CI above 0 on at least half: {met(g['best_mean_delta_met'])} ({g['best_strategy']}: mean "
        + ", ".join(f"{s} {100 * v:+.1f}" for s, v in g["mean_delta_related"].items()) + f"; CI above 0 on {g['best_significant_tasks']})",
        f"- no strategy significantly below base on any task, controls included: {met(g['none_significantly_below_base'])} {g['significantly_below'] or ''}",
        f"- dispatch recovers ≥ 80% of the oracle gain on the related tasks: {met(g['recovery_met'])} ("
        + ", ".join(f"{s} {'n/a' if v is None else f'{100 * v:.0f}%'}" for s, v in g["oracle_recovery"].items()) + ")",
        f"- on the two-skill task CEM beats every single expert: {met(g['cem_beats_every_single_expert_on_two_skill'])}",
        "- the same mean Δ on the questions whose answer is not the training split's most frequent one: "
        + (", ".join(f"{s} {100 * v:+.1f}" for s, v in g["mean_delta_related_beyond_majority"].items()) or "—"),
        "- and without the questions of the answer each strategy is most often right on (a constant-answer check): "
        + (", ".join(f"{s} {100 * v:+.1f}" for s, v in g["mean_delta_related_beyond_top_right_answer"].items()) or "—"),
        f"- left out of the goals, fewer than {n_test} test questions: {', '.join(g['left_out_too_few_questions']) or 'none'}",
        "",
        "## Beyond the majority answer",
        "",
        ("A constant that gives the training split's most frequent answer to every question is right on that answer's "
        "share of the test; a gain it also gets is an answer prior, not a skill. Per strategy: Δ vs base in points "
        "[paired 95% CI] on the other questions; then the gold answer it is right on most often, how many of its "
        "right answers are on it (all of them: it gives one answer to everything), and Δ vs base without that "
        "answer's questions (chosen on these test questions: a check, not a selection)."),
        "",
        majority_table(results),
        "",
        "## Dispatch",
        "",
        markdown_table(
            ["task", "right choice", *(f"{LABELS[d]}: accuracy, chosen" for d in DISPATCHERS)],
            [[n, r["related"] or OTHERS, *(_dispatch_cell(r[d]) for d in DISPATCHERS)] for n, r in results.items()],
            "l" * (len(DISPATCHERS) + 2),
        ),
        "",
        "Thresholds fitted on validation prompts of the experts' tasks and the `others` tasks: "
        + "; ".join(f"{k} {v['threshold']:.2f} (validation dispatch accuracy {v['validation_accuracy']:.2f}, n={v['n']})" for k, v in calibration.items())
        + ". Pass 1 / pass 2 time: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in timing.items()) + ".",
        "",
        "Experts: " + ", ".join(f"`{n}` (`{s}`)" for n, s in experts.items()) + ".",
    ]  # fmt: skip
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    names = list(results)
    series = {
        s: [{"delta": r[s]["delta"], "low": r[s]["delta_low"], "high": r[s]["delta_high"]} for r in results.values()]
        for s in (*DISPATCHERS, "cem")
    }
    ci_bar_chart(
        path,
        names,
        series,
        value="delta",
        scale=100,
        ylabel="Δ vs base, points (95% CI)",
        zero_line=True,
        figsize=(max(6.0, 1.2 * len(names) + 2), 4.0),
        xticks={"rotation": 25, "ha": "right"},
    )


if __name__ == "__main__":
    raise SystemExit(main())
