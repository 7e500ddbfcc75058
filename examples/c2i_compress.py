"""Compress to Impress: one gradient pass ranks every (matrix, rank fraction) truncation, the best few are checked
on validation examples, and the ones that help are saved as a SpectralCompress PEFT adapter.

    python examples/c2i_compress.py                                   # embedded SmolLM2-135M, 1-digit sums (reasoning-gym)
    python examples/c2i_compress.py --task jsonl:my_task.jsonl --clustered  # your JSONL task, multi-subspace truncation
    python examples/c2i_compress.py --tiny                            # tiny random model, a few seconds
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from peft import PeftModel
from tiny_model import load

from peft_spectral.compress import C2ISearchConfig, apply_result, compress_to_impress, find_target_modules
from peft_spectral.data import load_task
from peft_spectral.evaluation import evaluate


DATA = Path(__file__).parent / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random model (no download), a few seconds")
    parser.add_argument("--model", default=None, help="Hub id or directory (default: the embedded SmolLM2-135M)")
    parser.add_argument(
        "--task",
        default=None,
        help="task spec (docs/data.md); default: 1-digit sums from reasoning-gym, capitals.jsonl with --tiny",
    )
    parser.add_argument("--clustered", action="store_true", help="multi-subspace truncation (CL-100G-100E mode)")
    parser.add_argument("--output", default="runs/c2i", help="output directory")
    args = parser.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)

    model, tokenizer = load(args.tiny, args.model)
    default = "rg:basic_arithmetic?max_digits=1&max_terms=2&min_terms=2&operators=+,-&allow_negation=false"
    task_name = args.task or (f"jsonl:{DATA / 'capitals.jsonl'}" if args.tiny else default)
    task = load_task(task_name, max_examples=None if args.tiny else 400)
    print(f"task {task.name}: {len(task.train)} train / {len(task.validation)} validation / {len(task.test)} test")

    # Candidates: the MLP matrices of the last layers (all layers of the tiny model) x LASER's rank fractions.
    layers = None if args.tiny else range(20, 30)
    modules = find_target_modules(model, ["gate_proj", "up_proj", "down_proj"], layers=layers)
    result = compress_to_impress(
        model,
        tokenizer,
        task,
        modules,
        mode="clustered" if args.clustered else "standard",
        n_grad=min(100, len(task.train)),
        n_eval=min(100, len(task.validation)),
        # keep a truncation only when its gain is beyond a paired bootstrap's noise (the default SelectionGuard)
        config=C2ISearchConfig(top_k=5, combine=True),
    )
    (out / "search.json").write_text(json.dumps(result.to_dict(), indent=2))
    print(
        f"{result.method}: {len(result.candidates)} candidates ranked, {result.evaluations} evaluations, "
        f"{result.wall_time_s:.1f} s"
    )
    print(
        f"validation accuracy {result.base.accuracy:.3f} -> {result.best.accuracy:.3f}; chosen: "
        f"{[str(iv) for iv in result.chosen] or 'none'}"
    )

    for cand in result.candidates:
        if cand.decision is not None:
            print(f"  {cand.intervention}: {cand.decision.reason}")

    before = evaluate(model, tokenizer, task.test, kind=task.kind).accuracy
    if not result.chosen:
        print(f"test accuracy {before:.3f}; no truncation beat the unmodified model, so no adapter was saved")
        return

    adapted = apply_result(model, result)  # a PeftModel with a SpectralCompress adapter
    after = evaluate(adapted, tokenizer, task.test, kind=task.kind).accuracy
    print(f"test accuracy {before:.3f} -> {after:.3f}")
    adapted.save_pretrained(str(out / "adapter"))  # the truncated factors: loading needs no SVD
    print(f"saved adapter to {out / 'adapter'}: {sorted(p.name for p in (out / 'adapter').iterdir())}")

    fresh, _ = load(args.tiny, args.model)
    reloaded = PeftModel.from_pretrained(fresh, str(out / "adapter")).eval()
    probe = tokenizer([task.test[0].prompt], return_tensors="pt")
    with torch.no_grad():
        same = torch.allclose(adapted(**probe).logits, reloaded(**probe).logits, atol=1e-4)
    print(f"reloaded adapter reproduces the compressed model: {same}")
    if not same:
        raise SystemExit("the reloaded adapter does not match the compressed model")


if __name__ == "__main__":
    main()
