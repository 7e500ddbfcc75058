"""CPI-FT (core parameter isolation fine-tuning) on your own JSONL tasks.

Each task is fine-tuned alone (probe), its core region is the top p of parameters by |delta|, tasks whose cores
overlap are grouped, the probes are fused, then one SFT stage per group runs with the earlier groups' cores frozen.
The result is a CoreIsolation PEFT adapter in OUTPUT/final plus report.json / report.md / jaccard.png.

A JSONL task has one object per line: {"prompt", "target"} (generation), {"prompt", "choices", "label"}
(multiple choice) or {"prompt", "test", "entry_point"} (code). Two small ones ship in examples/data/.

    python examples/cpi_jsonl.py                                        # embedded SmolLM2-135M, examples/data/*.jsonl
    python examples/cpi_jsonl.py --jsonl a.jsonl b.jsonl c.jsonl --steps 50
    python examples/cpi_jsonl.py --tiny                                 # tiny random model, a few seconds
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from peft import PeftModel
from tiny_model import load

from peft_spectral.cpi import CPIConfig, CPIPipeline
from peft_spectral.evaluation import evaluate
from peft_spectral.tasks import load_jsonl_task
from peft_spectral.tuners.core_isolation import CoreIsolationConfig


DATA = Path(__file__).parent / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random model (no download), a few seconds")
    parser.add_argument("--model", default=None, help="Hub id or directory (default: the embedded SmolLM2-135M)")
    parser.add_argument(
        "--jsonl",
        nargs="+",
        default=[str(DATA / "addition.jsonl"), str(DATA / "capitals.jsonl")],
        help="task files (default: the two in examples/data/)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="SFT steps per probe and per stage (default 20; 2 with --tiny)"
    )
    parser.add_argument("--p", type=float, default=0.01, help="core fraction p (paper: 1%%)")
    parser.add_argument("--tau", type=float, default=0.1, help="Jaccard threshold tau for grouping (paper: 0.1)")
    parser.add_argument("--output", default="runs/cpi", help="state/output directory (an existing one is resumed)")
    args = parser.parse_args()
    steps = args.steps or (2 if args.tiny else 20)

    model, tokenizer = load(args.tiny, args.model)
    tasks = [load_jsonl_task(path) for path in args.jsonl]  # seeded 60/20/20 train/validation/test splits
    for t in tasks:
        print(f"task {t.name} ({t.kind}): {len(t.train)} train / {len(t.test)} test")

    config = CPIConfig(
        adapter=CoreIsolationConfig(
            target_modules=["gate_proj", "up_proj", "down_proj"],  # CoreIsolation deltas on the MLP
            core_fraction=args.p,
            similarity_threshold=args.tau,
        ),
        probe_steps=steps,
        stage_steps=steps,
        learning_rate=1e-3 if args.tiny else 1e-4,
        batch_size=4,
    )

    def eval_fn(model, tokenizer, task):
        return {"accuracy": evaluate(model, tokenizer, task.test, kind=task.kind, max_new_tokens=8).accuracy}

    pipe = CPIPipeline(model, tokenizer, tasks, config, args.output, progress=not args.tiny, eval_fn=eval_fn)
    report = pipe.run()  # interrupt and re-run: it continues from the last finished step
    print(f"core sizes: {report['core_sizes']}")
    print(f"Jaccard: {json.dumps(report['jaccard'])}")
    print(f"groups: {report['groups']}, stage order: {report['stage_order']}")
    print(f"scores after CPI-FT: {report.get('scores')}")

    final = Path(args.output) / "final"
    print(f"adapter in {final}: {sorted(p.name for p in final.iterdir())}")
    fresh, _ = load(args.tiny, args.model)
    reloaded = PeftModel.from_pretrained(fresh, str(final))
    print(f"reloaded: {reloaded.peft_config['default'].peft_type}")


if __name__ == "__main__":
    main()
