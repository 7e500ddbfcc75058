"""The cost of a GRPO step: SVF with factored and composed rollouts against LoRA r=16 (issue #26 §3, goal 1).

In one process, `--rounds` round-robin rounds (the order of the arms rotates). A round times, at each `--new-tokens`
length (every sample exactly that long: `min_new_tokens`):

* a GRPO step (the last of `--grpo-steps` of a fresh `train_svf`) of SVF with factored rollouts
  (`compose_inference=False`), SVF with composed rollouts (the default) and LoRA r=16, all on the MLP projections;
* the sampling alone (one `generate` of a step's prompts and samples, after a change of the adapter's parameters, so
  that composed weights are rebuilt once as after an optimizer step) of the base model and the three arms;

and SFT tokens per second of SVF and LoRA. Reported: seconds and per-round ratios, median [min–max] over rounds, and
the goals "SVF GRPO step ≤ 0.95× LoRA's at 64 new tokens" and "composed sampling within 1.10× of the base model's".
The time to an expert (the race at the same wall clock) is `bench_budget.py`.

    python benchmarks/bench_grpo_step.py            # ~45 min on the 2-core machine: docs/results/grpo_step.{json,md}
    python benchmarks/bench_grpo_step.py --smoke    # tiny random model, seconds

Resumable: each round is kept in the state file as it finishes.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path
from typing import Any

from peft_spectral.benchmarking import BenchmarkRun, add_benchmark_arguments, markdown_table
from peft_spectral.benchmarking.reporting import format_spread, round_spread


MLP = ["gate_proj", "up_proj", "down_proj"]
#: 2-term addition and subtraction of 1-2 digit numbers (the library's arithmetic family).
DEFAULT_TASK = (
    "rg:basic_arithmetic?allow_negation=false&allow_parentheses=false&max_digits=2&max_terms=2&operators=+,-"
)
SMOKE_TASK = "rg:spell_backward?min_word_len=3&max_word_len=4"
ARMS = ("svf_factored", "svf_composed", "lora")
STEP_PAIRS = (("svf_composed", "lora"), ("svf_factored", "lora"), ("svf_composed", "svf_factored"))
LABELS = {"svf_factored": "SVF, factored rollouts", "svf_composed": "SVF, composed rollouts", "lora": "LoRA r=16"}
LABELS["base"] = "base model"
OPTIONS = ["task", "rounds", "new_tokens", "grpo_steps", "sft_steps", "prompts_per_step", "num_generations"]
OPTIONS += ["sft_batch_size", "max_examples"]
SMOKE = {
    "rounds": 2, "new_tokens": [2, 4], "grpo_steps": 2, "sft_steps": 2, "prompts_per_step": 2, "num_generations": 2,
    "sft_batch_size": 4, "max_examples": 120, "task": SMOKE_TASK,
}  # fmt: skip


def adapter_config(arm: str):
    """The PEFT config of an arm: SVF (factored or composed rollouts) or LoRA r=16, all on the MLP projections."""
    from peft import LoraConfig

    from peft_spectral import SVFConfig

    if arm == "lora":
        return LoraConfig(r=16, lora_alpha=32, target_modules=MLP, task_type="CAUSAL_LM")
    return SVFConfig(target_modules=MLP, compose_inference=arm != "svf_factored", task_type="CAUSAL_LM")


def sampling_seconds(net, tokenizer, prompts, tokens: int, args) -> float:
    """Seconds of one `generate` of a GRPO step's prompts and samples (each exactly `tokens` new tokens), after a
    change of the trainable parameters, as an optimizer step makes (composed weights are rebuilt once)."""
    import torch
    from transformers import GenerationConfig

    from peft_spectral.model_utils import pad_token_id
    from peft_spectral.prompting import encode_prompt

    encoded = [encode_prompt(tokenizer, ex) for ex in prompts]
    width, pad = max(map(len, encoded)), pad_token_id(tokenizer, net)
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    config = GenerationConfig(
        do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=tokens, min_new_tokens=tokens,
        num_return_sequences=args.num_generations, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    with torch.no_grad():
        for param in net.parameters():
            if param.requires_grad:
                param.add_(1e-6)
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        out = net.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        seconds = time.perf_counter() - start
    assert out.shape[1] == width + tokens, f"sampled {out.shape[1] - width} tokens, not {tokens}"
    return seconds


def time_round(model, tokenizer, task, args, work: Path, index: int) -> dict[str, Any]:
    """One round: a GRPO step and the sampling of every arm at every length, SFT steps of SVF and LoRA."""
    from peft import get_peft_model

    from peft_spectral.training import train_svf

    arms = list(ARMS[index % 3 :] + ARMS[: index % 3])
    common = {"seed": args.seed, "disable_tqdm": True, "train_limit": 64}
    out: dict[str, Any] = {"order": arms, "grpo": {}, "generate": {}, "sft": {}, "load_average": os.getloadavg()[0]}
    nets = {"base": model, **{arm: get_peft_model(copy.deepcopy(model), adapter_config(arm)) for arm in arms}}
    for tokens in args.new_tokens:
        for arm in arms:
            result = train_svf(
                copy.deepcopy(model), tokenizer, task, method="rl", output_dir=str(work / f"grpo_{arm}"),
                max_steps=args.grpo_steps, svf_config=adapter_config(arm), prompts_per_step=args.prompts_per_step,
                num_generations=args.num_generations, max_completion_length=tokens,
                generation_kwargs={"min_new_tokens": tokens}, **common,
            )  # fmt: skip
            lengths = [row["completions/mean_length"] for row in result.logs if "completions/mean_length" in row]
            out["grpo"][f"{arm}@{tokens}"] = {"step_seconds": result.step_times, "mean_length": lengths}
        for arm in ["base", *arms]:
            seconds = sampling_seconds(nets[arm], tokenizer, task.train[: args.prompts_per_step], tokens, args)
            out["generate"][f"{arm}@{tokens}"] = seconds
    for arm in [a for a in arms if a != "svf_factored"]:  # SFT trains the factored form either way
        result = train_svf(
            copy.deepcopy(model), tokenizer, task, method="sft", output_dir=str(work / f"sft_{arm}"),
            max_steps=args.sft_steps, svf_config=adapter_config(arm),
            per_device_train_batch_size=args.sft_batch_size, **common,
        )  # fmt: skip
        seen = [row["num_tokens"] for row in result.logs if "num_tokens" in row]  # TRL's running count
        tokens = [b - a for a, b in zip([0.0, *seen], seen)]
        out["sft"]["svf" if arm == "svf_composed" else arm] = {
            "step_seconds": result.step_times,
            "tokens": tokens,
            "tokens_per_second": tokens[-1] / result.step_times[-1],
        }
    return out


def goal(text: str, values: list[float], limit: float) -> dict[str, Any]:
    """A goal on per-round ratios: met when their median is at most `limit`."""
    s, within = round_spread(values), sum(v <= limit for v in values)
    value = f"median {format_spread(s, 3)}×; ≤ {limit:.2f}× in {within} of {len(values)} rounds"
    return {"goal": text, "met": s["median"] <= limit, "value": value}


def row_label(key: str) -> str:
    """`grpo:lora` -> `GRPO step, LoRA r=16`; `generate:lora/base` -> `sampling: LoRA r=16 / base model`."""
    kind, _, arms = key.partition(":")
    names = " / ".join(LABELS[a] for a in arms.split("/"))
    return f"{'GRPO step' if kind == 'grpo' else 'sampling'}{': ' if '/' in arms else ', '}{names}"


def summary(results: dict, config: dict) -> tuple[dict, str]:
    """Seconds and per-round ratios (median [min–max]), the two goals, and the markdown."""
    rounds = [results[k] for k in sorted(results) if k.startswith("round")]
    lengths = config["new_tokens"]

    def grpo(r, arm, n):
        return r["grpo"][f"{arm}@{n}"]["step_seconds"][-1]

    def gen(r, arm, n):
        return r["generate"][f"{arm}@{n}"]

    measures = {f"grpo:{a}": lambda r, n, a=a: grpo(r, a, n) for a in ARMS}
    measures |= {f"generate:{a}": lambda r, n, a=a: gen(r, a, n) for a in ("base", *ARMS)}
    ratios = {f"grpo:{a}/{b}": lambda r, n, a=a, b=b: grpo(r, a, n) / grpo(r, b, n) for a, b in STEP_PAIRS}
    ratios |= {f"generate:{a}/base": lambda r, n, a=a: gen(r, a, n) / gen(r, "base", n) for a in ARMS}
    seconds = {f"{k}@{n}": round_spread([f(r, n) for r in rounds]) for k, f in measures.items() for n in lengths}
    per_round = {f"{k}@{n}": [f(r, n) for r in rounds] for k, f in ratios.items() for n in lengths}
    tps = {arm: [r["sft"][arm]["tokens_per_second"] for r in rounds] for arm in ("svf", "lora")}
    per_round["sft_tokens_per_second:svf/lora"] = [s / lo for s, lo in zip(tps["svf"], tps["lora"])]
    seconds |= {f"sft_tokens_per_second:{arm}": round_spread(v) for arm, v in tps.items()}
    rat = {k: round_spread(v) for k, v in per_round.items()}
    longest = max(lengths)
    worst = max(lengths, key=lambda n: rat[f"generate:svf_composed/base@{n}"]["median"])
    goals = [
        goal(f"SVF GRPO step ≤ 0.95× LoRA r=16's at {longest} new tokens (composed rollouts)",
             per_round[f"grpo:svf_composed/lora@{longest}"], 0.95),
        goal(f"composed-rollout sampling within 1.10× of the base model's own generation ({worst} tokens, the "
             "worse length)", per_round[f"generate:svf_composed/base@{worst}"], 1.10),
    ]  # fmt: skip
    head = ["measurement", *[f"{n} new tokens" for n in lengths]]

    def table(keys, stats, digits, unit=""):
        rows = [[row_label(k), *[format_spread(stats[f"{k}@{n}"], digits, unit) for n in lengths]] for k in keys]
        return markdown_table(head, rows)

    rows = [[g["goal"], "met" if g["met"] else "**not met**", g["value"]] for g in goals]
    text = (
        f"## Goals\n\n{markdown_table(['goal', 'met', 'measured'], rows, 'lll')}\n\n## Step cost\n\n"
        f"Task `{config['task']}`. {len(rounds)} rounds in one process (the order of the arms rotates); median "
        f"[min–max] over rounds. GRPO: {config['prompts_per_step']} prompts × {config['num_generations']} samples, "
        f"each exactly the given number of new tokens; the last of {config['grpo_steps']} steps of a fresh "
        "`train_svf`. Sampling: one `generate` of the same prompts and samples after a change of the adapter's "
        "parameters (composed weights rebuilt once, as after an optimizer step).\n\n"
        f"{table(measures, seconds, 3, ' s')}\n\nPer-round ratios:\n\n{table(ratios, rat, 3)}\n\n"
        f"SFT ({config['sft_batch_size']} examples per step, the last of {config['sft_steps']} steps): SVF "
        f"{format_spread(seconds['sft_tokens_per_second:svf'], 0)} tokens/s, LoRA "
        f"{format_spread(seconds['sft_tokens_per_second:lora'], 0)} tokens/s; SVF / LoRA "
        f"{format_spread(rat['sft_tokens_per_second:svf/lora'], 3)}."
    )  # fmt: skip
    return {"rounds": len(rounds), "seconds": seconds, "ratios": rat, "per_round": per_round, "goals": goals}, text


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_arguments(p, name="grpo_step")
    p.add_argument("--task", default=DEFAULT_TASK, metavar="SPEC", help="task spec (prompts and SFT examples)")
    p.add_argument("--work", default=None, help="training runs (default: runs/bench_grpo_step)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--max-examples", type=int, default=None, help="examples of the task before the splits")
    p.add_argument("--rounds", type=int, default=5, help="round-robin rounds")
    p.add_argument("--new-tokens", type=int, nargs="+", default=[8, 64], help="sampled tokens per completion")
    p.add_argument("--grpo-steps", type=int, default=2, help="GRPO steps per arm and round (the last timed)")
    p.add_argument("--sft-steps", type=int, default=3, help="SFT steps per arm and round (the last timed)")
    p.add_argument("--prompts-per-step", type=int, default=4, help="GRPO prompts per step")
    p.add_argument("--num-generations", type=int, default=4, help="GRPO samples per prompt")
    p.add_argument("--sft-batch-size", type=int, default=8, help="SFT examples per step")
    args = p.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    run = BenchmarkRun.from_args(args, {k: getattr(args, k) for k in OPTIONS})
    work = Path(args.work or (run.output_dir / "runs" if args.smoke else "runs/bench_grpo_step"))
    model, tokenizer = run.load_model()
    from peft_spectral.data import load_task

    task = load_task(args.task, seed=args.seed, max_examples=args.max_examples)
    for job in run.jobs([f"round{i}" for i in range(args.rounds)], desc="rounds"):
        run.record(job, time_round(model, tokenizer, task, args, work, int(job[5:])))
    data, text = summary(run.results(), run.config)
    run.write(data, text, title="GRPO step cost: SVF vs LoRA r=16")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
