"""Probe the embedded model on reasoning-gym generators at two difficulty levels: where can an SVF expert learn?

For every setting (generator × level), on the first `--n` test questions: greedy pass@1 scored with strict and
lenient answer extraction (one generation, two readings, `peft_spectral.data.answers`), and sampled pass@1 / pass@8
(8 samples at temperature 1 on the first `--n-sampled` questions, lenient; pass@8 > 0 means RL can see a reward).
With `--sft`, each candidate setting also gets a short SVF-SFT run (`--sft-steps` steps from the task's train split)
and its lenient accuracy on the same test questions, paired with the base model's.

    python benchmarks/probe_tasks.py                 # base model on every setting -> docs/results/probe.{json,md}
    python benchmarks/probe_tasks.py --sft           # then the short SFT runs of the candidates
    python benchmarks/probe_tasks.py --smoke         # tiny random model, a few settings, seconds

Resumable: every finished setting is kept in the state file and skipped when the command runs again.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from peft_spectral.benchmarking import BenchmarkRun, add_benchmark_arguments, markdown_table
from peft_spectral.data import load_task, parse_task_spec
from peft_spectral.evaluation import evaluate, pass_at_k, rescore, sample_answers, score_prediction
from peft_spectral.stats import accuracy_ci, compare_paired, format_accuracy, format_comparison


_ARITH = "operators=+,-&allow_parentheses=false&allow_negation=false"
#: (family, generator, {level: parameters}); level 1 is the easy setting, level 2 a harder one.
SETTINGS: list[tuple[str, str, dict[int, str]]] = [
    (
        "arithmetic",
        "basic_arithmetic",
        {1: f"min_terms=2&max_terms=2&max_digits=1&{_ARITH}", 2: f"min_terms=2&max_terms=2&max_digits=2&{_ARITH}"},
    ),
    (
        "arithmetic",
        "chain_sum",
        {1: "min_terms=3&max_terms=3&max_digits=1", 2: "min_terms=3&max_terms=3&max_digits=2"},
    ),
    ("arithmetic", "products", {1: "max_digits=1", 2: "max_digits=2"}),
    (
        "arithmetic",
        "decimal_arithmetic",
        {
            1: "min_num_decimal_places=1&max_num_decimal_places=1&min_terms=2&max_terms=2",
            2: "min_num_decimal_places=2&max_num_decimal_places=2&min_terms=3&max_terms=3",
        },
    ),
    (
        "arithmetic",
        "simple_equations",
        {
            1: "min_terms=2&max_terms=2&max_value=10&operators=+,-&operators_weights=0.5,0.5",
            2: "min_terms=2&max_terms=3&max_value=50",
        },
    ),
    ("number theory", "gcd", {1: "max_value=20", 2: "max_value=100"}),
    ("number theory", "lcm", {1: "max_value=10", 2: "max_value=30"}),
    ("number theory", "prime_factorization", {1: "max_value=100", 2: "max_value=500"}),
    ("number theory", "base_conversion", {1: "max_base=10&max_value=15", 2: "max_value=255"}),
    (
        "number theory",
        "fraction_simplification",
        {1: "max_value=20&max_factor=5&styles=plain", 2: "max_value=100&max_factor=12&styles=plain"},
    ),
    (
        "counting",
        "leg_counting",
        {1: "min_animals=1&max_animals=2&max_instances=3", 2: "min_animals=2&max_animals=4&max_instances=6"},
    ),
    ("counting", "letter_counting", {1: "min_words=1&max_words=3", 2: "min_words=5&max_words=8"}),
    ("counting", "count_bits", {1: "max_n=255", 2: "max_n=4095"}),
    (
        "counting",
        "number_format",
        {1: "max_num_candidates=2&max_n=1000&min_n=10", 2: "min_num_candidates=3&max_num_candidates=4"},
    ),
    ("strings", "spell_backward", {1: "min_word_len=3&max_word_len=4", 2: "min_word_len=5&max_word_len=7"}),
    ("strings", "word_sequence_reversal", {1: "min_words=2&max_words=3", 2: "min_words=4&max_words=6"}),
    (
        "strings",
        "letter_jumble",
        {
            1: "min_words=1&max_words=2&max_word_len=5&max_corruption_level=0.3",
            2: "min_words=3&max_words=5&max_word_len=8",
        },
    ),
    ("strings", "caesar_cipher", {1: "min_words=1&max_words=1", 2: "min_words=2&max_words=3"}),
    ("strings", "word_sorting", {1: "min_words=3&max_words=3&max_word_length=6", 2: "min_words=5&max_words=6"}),
    (
        "strings",
        "number_sorting",
        {
            1: "min_numbers=3&max_numbers=3&max_decimals=0&min_value=0&max_value=50",
            2: "min_numbers=5&max_numbers=6&max_decimals=1",
        },
    ),
    ("logic", "syllogism", {1: "inversion_probability=0", 2: "inversion_probability=0.5"}),
    (
        "logic",
        "isomorphic_strings",
        {1: "max_string_length=4", 2: "min_string_length=6&max_string_length=10"},
    ),
    ("logic", "family_relationships", {1: "max_family_size=4", 2: "min_family_size=6&max_family_size=8"}),
    ("logic", "coin_flip", {1: "max_trials=6", 2: "min_trials=7&max_trials=12"}),
]
SMOKE_SETTINGS = [("arithmetic", "gcd", {1: "max_value=10"}), ("strings", "spell_backward", {1: "max_word_len=4"})]


def setting_specs(settings) -> dict[str, tuple[str, str, int]]:
    """`spec -> (family, generator, level)` of every setting."""
    return {
        f"rg:{gen}?{params}": (family, gen, level)
        for family, gen, levels in settings
        for level, params in levels.items()
    }


def probe_base(model, tokenizer, task, n: int, n_sampled: int, max_new_tokens: int, seed: int) -> dict:
    test = task.test[:n]
    lenient = evaluate(model, tokenizer, test, kind=task.kind, max_new_tokens=max_new_tokens, batch_size=16)
    strict = rescore(lenient, test, kind=task.kind, extraction="strict")
    samples = sample_answers(
        model, tokenizer, test[:n_sampled], num_samples=8, max_new_tokens=max_new_tokens, batch_size=4, seed=seed
    )
    correct = [sum(score_prediction(task.kind, s, ex) for s in group) for group, ex in zip(samples, test)]
    return {
        "n": len(test),
        "strict": strict.correct,
        "lenient": lenient.correct,
        "predictions": lenient.predictions[:5],
        "sampled_n": len(samples),
        "sampled_pass1": sum(pass_at_k(8, c, 1) for c in correct) / max(1, len(correct)),
        "sampled_pass8": sum(pass_at_k(8, c, 8) for c in correct) / max(1, len(correct)),
        "test_sizes": len(task.test),
    }


def probe_sft(model, tokenizer, task, n: int, steps: int, max_new_tokens: int, seed: int, work: str) -> dict:
    from peft_spectral.training import train_svf

    result = train_svf(
        copy.deepcopy(model),
        tokenizer,
        task,
        method="sft",
        max_steps=steps,
        output_dir=work,
        seed=seed,
        per_device_train_batch_size=8,
        disable_tqdm=True,
    )
    scored = evaluate(
        result.model, tokenizer, task.test[:n], kind=task.kind, max_new_tokens=max_new_tokens, batch_size=16
    )
    strict = rescore(scored, task.test[:n], kind=task.kind, extraction="strict")
    return {
        "lenient": scored.correct,
        "strict": strict.correct,
        "seconds": result.train_runtime,
        "predictions": scored.predictions[:5],
    }


def _canonical(spec: str) -> str:
    return str(parse_task_spec(spec))


def report(specs: dict, results: dict) -> tuple[dict, str]:
    # SFT candidates may be named with their parameters in another order: match them by canonical spec
    sft_results = {_canonical(k.removeprefix("sft:")): v for k, v in results.items() if k.startswith("sft:")}
    rows, table = [], []
    for spec, (family, gen, level) in specs.items():
        base = results.get(f"base:{spec}")
        if base is None:
            continue
        sft = sft_results.get(_canonical(spec))
        row = {
            "family": family,
            "generator": gen,
            "level": level,
            "spec": spec,
            "n": base["n"],
            "strict": sum(base["strict"]) / base["n"],
            "lenient": sum(base["lenient"]) / base["n"],
            "sampled_pass8": base["sampled_pass8"],
            "sampled_pass1": base["sampled_pass1"],
        }
        sft_cell = "—"
        if sft is not None:
            row["sft_lenient"] = sum(sft["lenient"]) / base["n"]
            row["sft_strict"] = sum(sft["strict"]) / base["n"]
            sft_cell = f"{format_accuracy(accuracy_ci(sft['lenient']))}, Δ {format_comparison(compare_paired(base['lenient'], sft['lenient'])).removeprefix('Δ ')}"
        rows.append(row)
        table.append(
            [
                family,
                f"`{gen}` L{level}",
                format_accuracy(accuracy_ci(base["strict"])),
                format_accuracy(accuracy_ci(base["lenient"])),
                f"{base['sampled_pass1']:.2f} / {base['sampled_pass8']:.2f} (n={base['sampled_n']})",
                sft_cell,
            ]
        )
    markdown = markdown_table(
        [
            "family",
            "generator, level",
            "greedy strict [95% CI]",
            "greedy lenient [95% CI]",
            "sampled pass@1 / pass@8",
            "after short SVF-SFT (lenient), Δ vs base [95% CI]",
        ],
        table,
        "llrrrr",
    )
    legend = "\n\nSettings (`rg:` task specs):\n\n" + "\n".join(
        f"- {gen} L{level}: `{spec}`" for spec, (_, gen, level) in specs.items()
    )
    return {"rows": rows}, markdown + legend


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_arguments(parser, name="probe")
    parser.add_argument("--n", type=int, default=32, help="greedy test questions per setting")
    parser.add_argument("--n-sampled", type=int, default=12, help="questions sampled 8 times each (pass@8)")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="generation budget")
    parser.add_argument(
        "--sft",
        nargs="*",
        default=None,
        metavar="SPEC",
        help="short SFT runs: these specs (none given: every level-1 setting)",
    )
    parser.add_argument("--sft-steps", type=int, default=40, help="SFT steps per candidate (batch 8, lr 2e-3)")
    args = parser.parse_args(argv)
    settings = SMOKE_SETTINGS if args.smoke else SETTINGS
    if args.smoke:
        args.n, args.n_sampled, args.max_new_tokens, args.sft_steps = 4, 2, 4, 2
    specs = setting_specs(settings)
    config = {
        "specs": list(specs),
        "n": args.n,
        "n_sampled": args.n_sampled,
        "max_new_tokens": args.max_new_tokens,
        "sft_steps": args.sft_steps,
    }
    run = BenchmarkRun.from_args(args, config)
    model, tokenizer = run.load_model()
    tasks = {}

    def task_of(spec):
        if spec not in tasks:
            tasks[spec] = load_task(spec, seed=args.seed, max_examples=1000)
        return tasks[spec]

    for key in run.jobs([f"base:{s}" for s in specs], desc="base model"):
        spec = key.removeprefix("base:")
        run.record(
            key, probe_base(model, tokenizer, task_of(spec), args.n, args.n_sampled, args.max_new_tokens, args.seed)
        )
    if args.sft is not None:
        candidates = args.sft or [s for s, (_, _, level) in specs.items() if level == 1]
        for key in run.jobs([f"sft:{s}" for s in candidates], desc="short SFT"):
            spec = key.removeprefix("sft:")
            work = str(Path("runs") / "probe_sft_checkpoints")
            run.record(
                key,
                probe_sft(
                    model, tokenizer, task_of(spec), args.n, args.sft_steps, args.max_new_tokens, args.seed, work
                ),
            )
    data, markdown = report(specs, run.results())
    run.write(data, markdown, title="Probe: the embedded model on reasoning-gym settings")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
