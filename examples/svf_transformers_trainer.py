"""SVF with `get_peft_model` inside a plain transformers `Trainer`.

Only the singular-value scales `z` of the MLP projections train; the saved adapter holds nothing else.

    python examples/svf_transformers_trainer.py                  # embedded SmolLM2-135M-Instruct (CPU, a few minutes)
    python examples/svf_transformers_trainer.py --model HuggingFaceTB/SmolLM2-360M-Instruct
    python examples/svf_transformers_trainer.py --tiny           # tiny random model, a few seconds
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from tiny_model import load
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from peft_spectral import SVFConfig
from peft_spectral.tasks import load_jsonl_task


DATA = Path(__file__).parent / "data" / "addition.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random model (no download), a few seconds")
    parser.add_argument("--model", default=None, help="Hub id or directory (default: the embedded SmolLM2-135M)")
    parser.add_argument("--data", default=str(DATA), help="JSONL task: {prompt, target} per line")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 30; 8 with --tiny)")
    parser.add_argument("--output", default="runs/svf-trainer", help="where the adapter is saved")
    args = parser.parse_args()
    steps = args.steps or (8 if args.tiny else 30)

    model, tokenizer = load(args.tiny, args.model)
    task = load_jsonl_task(args.data)

    # 1. SVF adapter: one trainable scale per singular value of gate/up/down projections.
    config = SVFConfig(target_modules=["gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, config)
    model.print_trainable_parameters()

    # 2. A causal-LM dataset: prompt + answer through the chat template.
    def to_text(ex):
        chat = [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.target}]
        return tokenizer.apply_chat_template(chat, tokenize=False)

    texts = [to_text(ex) for ex in task.train]
    dataset = Dataset.from_dict({"text": texts}).map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=128), batched=True, remove_columns=["text"]
    )

    def eval_loss() -> float:
        batch = DataCollatorForLanguageModeling(tokenizer, mlm=False)([dataset[i] for i in range(len(dataset))])
        model.eval()
        with torch.no_grad():
            return float(model(**batch).loss)

    before = eval_loss()

    # 3. An ordinary transformers Trainer. SVF wants a larger learning rate than LoRA (paper: 2e-3).
    training_args = TrainingArguments(
        output_dir=args.output + "-checkpoints",
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=2e-2 if args.tiny else 2e-3,
        lr_scheduler_type="constant",
        logging_steps=max(1, steps // 4),
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=args.tiny,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    trainer.train()
    after = eval_loss()
    print(f"training loss on the task: {before:.4f} -> {after:.4f}")

    # 4. Save: adapter_model.safetensors holds only the z vectors (U, sigma, V come from the SVD cache).
    model.save_pretrained(args.output)
    files = sorted(p.name for p in Path(args.output).iterdir())
    print(f"saved adapter to {args.output}: {files}")

    # 5. Reload on a fresh base model and check it reproduces the trained model exactly.
    base, _ = load(args.tiny, args.model)
    reloaded = PeftModel.from_pretrained(base, args.output).eval()
    probe = tokenizer(texts[:2], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        same = torch.allclose(model(**probe).logits, reloaded(**probe).logits, atol=1e-5)
    print(f"reloaded adapter reproduces the trained model: {same}")
    if not same:
        raise SystemExit("the reloaded adapter does not match the trained model")


if __name__ == "__main__":
    main()
