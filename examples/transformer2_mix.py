"""Transformer² mixing of saved SVF experts: prompt dispatch (two passes) and few-shot CEM.

Without `--experts`, two experts are trained first (a few SFT steps each, on the two JSONL tasks of
examples/data/) and saved like any SVF adapter; pass your own with `--experts DIR DIR ...` (directories or Hub ids,
e.g. from `peft-spectral train-svf`).

    python examples/transformer2_mix.py                                  # embedded SmolLM2-135M-Instruct
    python examples/transformer2_mix.py --experts svf-math svf-logic --shots shots.jsonl
    python examples/transformer2_mix.py --tiny                           # tiny random model, a few seconds
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from peft import PeftModel
from tiny_model import load

from peft_spectral import SVFConfig
from peft_spectral.tasks import load_jsonl_task
from peft_spectral.training import train_svf
from peft_spectral.transformer2 import (
    CEMConfig,
    ExpertLibrary,
    FewShotMixer,
    FixedDispatcher,
    PromptDispatcher,
    load_shots,
    two_pass_evaluate,
)


DATA = Path(__file__).parent / "data"
DESCRIPTIONS = {"addition": "adding two numbers", "capitals": "capital cities of countries"}


def train_experts(base, tokenizer, out: Path, steps: int) -> list[dict]:
    """Two quick SFT experts (SVF on the MLP projections), saved as ordinary adapters."""
    experts = []
    for name in ("addition", "capitals"):
        task = load_jsonl_task(DATA / f"{name}.jsonl")
        result = train_svf(
            copy.deepcopy(base),
            tokenizer,
            task,
            method="sft",
            max_steps=steps,
            output_dir=str(out / f"{name}-ckpt"),
            svf_config=SVFConfig(target_modules=["gate_proj", "up_proj", "down_proj"]),
            per_device_train_batch_size=4,
            disable_tqdm=True,
        )
        result.model.save_pretrained(str(out / name))
        experts.append({"name": name, "source": str(out / name), "description": DESCRIPTIONS[name]})
    return experts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random model (no download), a few seconds")
    parser.add_argument("--model", default=None, help="Hub id or directory (default: the embedded SmolLM2-135M)")
    parser.add_argument("--experts", nargs="+", default=None, help="saved SVF experts (directories or Hub ids)")
    parser.add_argument("--task", default=str(DATA / "capitals.jsonl"), help="JSONL task to answer (test split)")
    parser.add_argument("--shots", default=None, help="JSONL few-shot examples (default: the task's validation split)")
    parser.add_argument(
        "--expert-steps",
        type=int,
        default=None,
        help="SFT steps per expert when --experts is not given (default 20; 2 with --tiny)",
    )
    parser.add_argument("--output", default="runs/transformer2", help="output directory")
    args = parser.parse_args()
    out = Path(args.output)
    base, tokenizer = load(args.tiny, args.model)

    experts = args.experts or train_experts(
        base, tokenizer, out / "experts", steps=args.expert_steps or (2 if args.tiny else 20)
    )

    # One PeftModel holds every expert as an adapter: the SVD factors exist once, switching recomputes nothing.
    library = ExpertLibrary.load(base, tokenizer, experts)
    print(f"experts: {library.names}")
    task = load_jsonl_task(args.task)

    # Strategy 1: prompt dispatch. Pass 1 asks the model which expert fits each question, pass 2 answers with it.
    res = two_pass_evaluate(library, PromptDispatcher(None), task.test, kind=task.kind)
    print(
        f"two-pass (prompt dispatch): accuracy {res.accuracy:.3f}, groups {res.to_dict()['group_sizes']}, "
        f"pass 1 = {res.pass1_over_pass2:.0%} of pass 2"
    )
    base_res = two_pass_evaluate(library, FixedDispatcher(None), task.test, kind=task.kind)
    print(f"base model:                 accuracy {base_res.accuracy:.3f}")

    # Strategy 3: few-shot CEM. Search alpha on labelled shots of the task; z' = sum_k alpha_k z_k.
    shots = load_shots(args.shots) if args.shots else task.validation
    mixer = FewShotMixer(library, shots, kind=task.kind)
    cem = (
        CEMConfig(population=6, generations=2, progress=False) if args.tiny else CEMConfig(population=8, generations=5)
    )
    result = mixer.search(cem)
    print(
        f"CEM: best alpha {[round(a, 3) for a in result.best_alpha.tolist()]}, fitness {result.best_fitness}, "
        f"curve {[round(f, 3) for f in result.fitness_curve]}"
    )
    mixed_dir = mixer.save(out / "mixture", result=result)
    mix_res = two_pass_evaluate(library, FixedDispatcher(mixer.adapter_name), task.test, kind=task.kind)
    print(f"CEM mixture:                accuracy {mix_res.accuracy:.3f}")
    print(f"saved the mixture to {mixed_dir}: {sorted(p.name for p in mixed_dir.iterdir())}")

    # The mixture is an ordinary SVF adapter: load it on a fresh base model.
    fresh, _ = load(args.tiny, args.model)
    reloaded = PeftModel.from_pretrained(fresh, str(mixed_dir))
    print(f"reloaded mixture: {type(reloaded.peft_config['default']).__name__}")


if __name__ == "__main__":
    main()
