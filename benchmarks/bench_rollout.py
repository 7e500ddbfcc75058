"""Rollouts and evaluations at the merged model's speed (issue #26 §1-2): SVF's composed weight and padding-free SFT.

Measured in one run, round-robin (each round runs every variant of a part back to back, so that load from other
processes hits all alike; medians over rounds, and per-round ratios with their range):

* **sampling** (`generate(do_sample=True)`, a batch of chat prompts, exactly 8 and 64 new tokens): SVF in its
  factored form (`composed_inference(model, False)`), SVF with the default `compose_inference=True` (the automatic
  rule, which knows the generation's length; the cache cleared before each call, so that a call that composes pays
  one composition, as a GRPO step does after its optimizer step), the base model (adapters disabled) and LoRA r=16
  (unmerged, as TRL samples with it);
* **evaluations per second**, factored (before) against the default (after), the answers compared: (a) a validation
  evaluation during training (`evaluation.evaluate`, greedy, what `ValidationCallback` runs; cache cleared first),
  (b) Transformer² pass 2 with one expert (`two_pass_generate` with a `FixedDispatcher`), (c) CEM candidate
  evaluations (`FewShotMixer.fitness`, each candidate a new α, on multiple-choice shots: composed only once a
  candidate's shots reach the break-even);
* **SFT tokens per second** (real tokens, the trainer's `num_tokens`), padded batches against padding-free ones
  (`sft_preset(padding_free=...)`), the same examples and steps.

    python benchmarks/bench_rollout.py --rounds 5            # docs/results/rollout.{json,md}
    python benchmarks/bench_rollout.py --targets all         # SVF and LoRA on every linear layer
    python benchmarks/bench_rollout.py --smoke               # tiny random Llama, one round (seconds)

Resumable: each round is kept in the state file as it finishes.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import random
import statistics
import sys
import tempfile
import time

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model

from peft_spectral import SVFConfig
from peft_spectral.benchmarking import BenchmarkRun, add_benchmark_arguments, markdown_table
from peft_spectral.data import Example
from peft_spectral.evaluation import evaluate
from peft_spectral.training import build_trainer, sft_preset
from peft_spectral.transformer2 import Expert, ExpertLibrary, FewShotMixer, FixedDispatcher, two_pass_generate
from peft_spectral.tuners.svf.composed import clear_composed_weights, composed_inference


TARGETS = {"mlp": ["gate_proj", "up_proj", "down_proj"], "all": "all-linear"}
GEN_METHODS = ("base", "svf_factored", "svf_composed", "lora16")
#: (ratio key, numerator, denominator) of the sampling times, for each number of new tokens
GEN_RATIOS = (("composed/base", "svf_composed", "base"), ("composed/factored", "svf_composed", "svf_factored"))
GEN_RATIOS += (("factored/base", "svf_factored", "base"), ("lora16/base", "lora16", "base"))


def question(i: int) -> tuple[str, str]:
    a, b, c = 7 + 13 * i % 89, 3 + 29 * i % 71, i % 5
    return f"Tom has {a} apples, buys {b} more, then gives {c} away. How many apples has he now?", str(a + b - c)


def examples(n: int) -> list[Example]:
    return [Example(prompt=q, target=t) for q, t in map(question, range(n))]


def shots(n: int) -> list[Example]:
    out = []
    for q, t in map(question, range(100, 100 + n)):
        choices = (t, str(int(t) + 1))
        out.append(Example(prompt=q, target=t, choices=choices[:: 1 - 2 * (len(out) % 2)], label=len(out) % 2))
    return out


def svf_library(base, tokenizer, targets, seed: int):
    """The base model with two SVF adapters of random z (1 ± 5 %) as an `ExpertLibrary`, and a LoRA copy."""
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, target_modules=targets)).eval()
    model = get_peft_model(base, SVFConfig(target_modules=targets), adapter_name="expert_a")
    model.add_adapter("expert_b", SVFConfig(target_modules=targets))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "svf_z" in name:
                param.copy_(1 + 0.05 * torch.randn(param.shape, generator=gen))
    model.set_adapter("expert_a")
    experts = [Expert("expert_a", "in-memory", "arithmetic"), Expert("expert_b", "in-memory", "counting")]
    return ExpertLibrary(model.eval(), tokenizer, experts), lora


def chat_batch(tokenizer, n: int):
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": question(i)[0]}], tokenize=False, add_generation_prompt=True
        )
        for i in range(n)
    ]
    return tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


@torch.no_grad()
def sample_seconds(model, batch, new_tokens: int, seed: int) -> float:
    torch.manual_seed(seed)
    kwargs = {"do_sample": True, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "top_k": 0, "top_p": 1.0}
    return timed(lambda: model.generate(**batch, **kwargs))[0]


def measure_sampling(library, lora, batch, lengths, seed: int) -> dict:
    model, out = library.model, {}
    for n in lengths:
        times = {}
        with model.disable_adapter():
            times["base"] = sample_seconds(model, batch, n, seed)
        with composed_inference(model, False):
            times["svf_factored"] = sample_seconds(model, batch, n, seed)
        clear_composed_weights(model)  # the default (automatic) rule; one composition per call, as after a step
        times["svf_composed"] = sample_seconds(model, batch, n, seed)
        times["lora16"] = sample_seconds(lora, batch, n, seed)
        out[str(n)] = times
    return out


def measure_evaluations(library, sizes: dict, seed: int) -> dict:
    """(a) validation, (b) pass 2 with one expert, (c) CEM candidates: seconds and answers, factored vs composed."""
    model, tok = library.model, library.tokenizer
    val, prompts, few = examples(sizes["validation"]), examples(sizes["pass2"]), shots(sizes["shots"])
    alphas = torch.rand((sizes["candidates"], 2), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out = {}
    for label, context in (
        ("factored", lambda: composed_inference(model, False)),
        ("composed", contextlib.nullcontext),
    ):
        with context():  # composed: the config's automatic rule, as in a run with the defaults
            clear_composed_weights(model)
            seconds, res = timed(
                lambda: evaluate(model, tok, val, kind="generation", mode="generate", max_new_tokens=16, batch_size=8)
            )
            pass2 = two_pass_generate(
                library, FixedDispatcher("expert_a"), prompts, max_new_tokens=sizes["pass2_tokens"], batch_size=8
            )
            mixer = FewShotMixer(library, few, batch_size=8)  # a fresh one: no candidate read back from its cache
            cem_seconds, fits = timed(lambda m=mixer: [m.fitness(a) for a in alphas])
        out[label] = {
            "validation_s": seconds,
            "validation_correct": list(res.correct),
            "pass2_s": pass2.pass2_seconds,
            "pass2_outputs": list(pass2.outputs),
            "cem_s": cem_seconds,
            "cem_fitness": [[f[0], round(f[1], 4)] for f in fits],  # accuracy; mean log-likelihood to 1e-4
        }
    return out


def sft_dataset(n: int, seed: int) -> Dataset:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        q, t = question(i)
        rows.append(
            {
                "prompt": q + " Explain briefly." * rng.randint(0, 12),
                "completion": f"{t}." + " ok" * rng.randint(0, 20),
            }
        )
    return Dataset.from_list(rows)


def measure_sft(base, tok, targets, data: Dataset, steps: int, seed: int) -> dict:
    out = {}
    for label, padding_free in (("padded", False), ("padding_free", True)):
        args = sft_preset(tempfile.mkdtemp(), max_steps=steps, padding_free=padding_free, seed=seed, disable_tqdm=True)
        trainer = build_trainer(
            copy.deepcopy(base), tok, data, method="sft", args=args, peft_config=SVFConfig(target_modules=targets)
        )
        seconds, _ = timed(trainer.train)
        tokens = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h][-1]
        out[label] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}
    return out


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": values}


def summarise(rounds: list[dict], lengths) -> dict:
    sampling = {}
    for n in map(str, lengths):
        per = [r["sampling"][n] for r in rounds]
        sampling[n] = {
            "seconds": {m: statistics.median(p[m] for p in per) for m in GEN_METHODS},
            "ratios": {k: spread([p[a] / p[b] for p in per]) for k, a, b in GEN_RATIOS},
        }
    evals = {}
    for part, key in (("validation", "validation_s"), ("pass2", "pass2_s"), ("cem", "cem_s")):
        before = [r["evaluations"]["factored"][key] for r in rounds]
        after = [r["evaluations"]["composed"][key] for r in rounds]
        answers = key.replace(
            "_s", "_correct" if part == "validation" else "_outputs" if part == "pass2" else "_fitness"
        )
        agree = all(r["evaluations"]["factored"][answers] == r["evaluations"]["composed"][answers] for r in rounds)
        evals[part] = {
            "before_s": statistics.median(before),
            "after_s": statistics.median(after),
            "speedup": spread([b / a for b, a in zip(before, after)]),
            "same_answers": agree,
        }
    sft = {k: statistics.median(r["sft"][k]["tokens_per_s"] for r in rounds) for k in ("padded", "padding_free")}
    speed = spread([r["sft"]["padding_free"]["tokens_per_s"] / r["sft"]["padded"]["tokens_per_s"] for r in rounds])
    return {"sampling": sampling, "evaluations": evals, "sft": {"tokens_per_s": sft, "speedup": speed}}


def markdown(summary: dict, sizes: dict, command: str) -> str:
    def r(x):
        return f"{x['median']:.2f}× ({x['min']:.2f}–{x['max']:.2f})"

    lines = [f"Command: `{command}`; sampling batch {sizes['batch']} sequences, fp32, medians over rounds.", ""]
    rows = []
    for n, s in summary["sampling"].items():
        sec, rat = s["seconds"], s["ratios"]
        rows.append([n, *(f"{sec[m]:.2f}" for m in GEN_METHODS), *(r(rat[k]) for k, _, _ in GEN_RATIOS)])
    lines.append(
        markdown_table(["new tokens", *(f"{m} s" for m in GEN_METHODS), *(k for k, _, _ in GEN_RATIOS)], rows)
    )
    lines += ["", "Evaluations per second, SVF factored (before) and composed (after); speedup per round (range)", ""]
    names = {
        "validation": "(a) validation evaluation",
        "pass2": "(b) Transformer² pass 2, one expert",
        "cem": "(c) CEM candidates",
    }
    counts = {"validation": 1, "pass2": 1, "cem": sizes["candidates"]}
    rows = [
        [
            names[p],
            f"{counts[p] / e['before_s']:.3f}",
            f"{counts[p] / e['after_s']:.3f}",
            r(e["speedup"]),
            "yes" if e["same_answers"] else "**no**",
        ]
        for p, e in summary["evaluations"].items()
    ]
    lines.append(markdown_table(["part", "before /s", "after /s", "speedup", "same answers"], rows))
    sft = summary["sft"]
    lines += ["", "SFT (SVF, sft_preset), real tokens per second", ""]
    lines.append(
        markdown_table(
            ["padded tok/s", "padding-free tok/s", "speedup"],
            [
                [
                    f"{sft['tokens_per_s']['padded']:.0f}",
                    f"{sft['tokens_per_s']['padding_free']:.0f}",
                    r(sft["speedup"]),
                ]
            ],
        )
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_arguments(parser, name="rollout")
    parser.add_argument("--rounds", type=int, default=5, help="round-robin rounds")
    parser.add_argument("--targets", choices=sorted(TARGETS), default="mlp", help="SVF and LoRA targets")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    lengths = (8, 64)
    sizes = {"batch": 8, "validation": 16, "pass2": 16, "pass2_tokens": 32, "shots": 24, "candidates": 4}
    sizes.update(sft_examples=24, sft_steps=3)
    if args.smoke:
        args.rounds, lengths = 1, (4, 8)
        sizes.update(
            batch=2, validation=2, pass2=2, pass2_tokens=4, shots=2, candidates=2, sft_examples=4, sft_steps=1
        )
    config = {"rounds": args.rounds, "targets": args.targets, "lengths": list(lengths), "sizes": sizes}
    run = BenchmarkRun.from_args(args, config=config)
    base, tok = run.load_model()
    torch.manual_seed(args.seed)
    targets = TARGETS[args.targets]
    sft_base = copy.deepcopy(base)
    library, lora = svf_library(base, tok, targets, args.seed)
    batch, data = chat_batch(tok, sizes["batch"]), sft_dataset(sizes["sft_examples"], args.seed)
    for key in run.jobs([f"round:{r}" for r in range(args.rounds)], desc="rounds"):
        seed = args.seed + int(key.split(":")[1])
        run.record(
            key,
            {
                "sampling": measure_sampling(library, lora, batch, lengths, seed),
                "evaluations": measure_evaluations(library, sizes, seed),
                "sft": measure_sft(sft_base, tok, targets, data, sizes["sft_steps"], seed),
            },
        )
    summary = summarise([run.result(f"round:{r}") for r in range(args.rounds)], lengths)
    command = "python benchmarks/bench_rollout.py " + " ".join(sys.argv[1:] if argv is None else argv)
    run.write(
        {**summary, "sizes": sizes}, markdown(summary, sizes, command.strip()), title="SVF rollouts and SFT batches"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
