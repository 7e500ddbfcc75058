"""GPU benchmark: bf16 SVF against LoRA r=16 on a ≥1B model (step time, peak memory, merge exactness).

One command, a few minutes on one GPU:

    python benchmarks/bench_gpu.py                                   # HuggingFaceTB/SmolLM2-1.7B-Instruct from the Hub
    python benchmarks/bench_gpu.py --model-dir /models/SmolLM2-1.7B-Instruct --steps 20

For each of SVF (MLP targets), LoRA r=16 (MLP), SVF (all linear) and LoRA r=16 (all linear), on a fresh copy of the
base model and the same random batch: adapter set-up time (SVF computes the SVD factors here), trainable parameters,
median train-step time (forward + backward + AdamW, `torch.cuda.synchronize` around each step) and peak allocated
memory (`torch.cuda.max_memory_allocated`, and the part above the model weights). Then, for each method after its
training steps: merged vs unmerged logits (max abs diff on one batch) and whether `unmerge_adapter` restores every base
weight bit-exactly.

Writes `OUT/gpu.json` and `OUT/gpu.md` (OUT defaults to `docs/results`). Exits with status 2 and a message when the
device is CUDA and no CUDA device is present. `--tiny --device cpu` runs the same code on a random 2-layer Llama (no
download), which is how the test suite keeps this script working.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from peft_spectral import SVFConfig


MLP = ["gate_proj", "up_proj", "down_proj"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", *MLP]
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-1.7B-Instruct"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def method_configs() -> dict:
    """The compared adapters, by name (each a factory, so that every method gets a fresh config)."""
    return {
        "svf_mlp": lambda: SVFConfig(target_modules=MLP, use_svd_cache=False),
        "lora16_mlp": lambda: LoraConfig(r=16, lora_alpha=32, target_modules=MLP),
        "svf_all": lambda: SVFConfig(target_modules=ALL, use_svd_cache=False),
        "lora16_all": lambda: LoraConfig(r=16, lora_alpha=32, target_modules=ALL),
    }


def build_tiny_model():
    """A random 2-layer Llama (hidden 64), for `--tiny`: no download."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=260,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config)


def load_model(args: argparse.Namespace, dtype: torch.dtype, device: torch.device):
    """The base model in `dtype` on `device`: tiny random, a local directory, or a Hub id."""
    if args.tiny:
        model = build_tiny_model()
    else:
        from transformers import AutoModelForCausalLM

        source = args.model_dir or args.model
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    return model.to(device=device, dtype=dtype).eval()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def base_weights(model) -> dict[str, torch.Tensor]:
    """Copies of the targeted base weights, by module name."""
    return {
        name: module.weight.detach().clone()
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in ALL and hasattr(module, "weight")
    }


def run_method(name: str, factory, base, batch: torch.Tensor, steps: int, device: torch.device) -> dict:
    """Adapter set-up, `steps` timed train steps (after one warm-up step), then the merge checks."""
    model = copy.deepcopy(base)
    synchronize(device)
    weights_bytes = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    t0 = time.perf_counter()
    peft_model = get_peft_model(model, factory())
    synchronize(device)
    setup_s = time.perf_counter() - t0
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    peft_model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(steps + 1):
        synchronize(device)
        t0 = time.perf_counter()
        peft_model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        synchronize(device)
        if step > 0:  # the first step warms up kernels and allocates the optimizer state
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    del opt

    peft_model.eval()
    probe = batch[:1]
    before = base_weights(peft_model)
    with torch.no_grad():
        unmerged = peft_model(input_ids=probe).logits.float()
        peft_model.merge_adapter()
        merged = peft_model(input_ids=probe).logits.float()
        peft_model.unmerge_adapter()
    after = base_weights(peft_model)
    restored = set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)
    result = {
        "setup_s": setup_s,
        "trainable_params": trainable,
        "step_s_median": statistics.median(times),
        "step_s_all": times,
        "peak_mem_gb": peak / 2**30,
        "peak_mem_above_weights_gb": (peak - weights_bytes) / 2**30,
        "merged_vs_unmerged_max_abs_logit_diff": float((merged - unmerged).abs().max()),
        "logit_abs_max": float(unmerged.abs().max()),
        "unmerge_restores_weights_bit_exact": bool(restored),
    }
    del peft_model, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(
        f"{name:11s} setup {setup_s:6.2f}s  step {result['step_s_median'] * 1e3:8.1f} ms  "
        f"peak {result['peak_mem_gb']:6.2f} GiB  merge diff {result['merged_vs_unmerged_max_abs_logit_diff']:.3g}  "
        f"unmerge exact {restored}",
        flush=True,
    )
    return result


def write_markdown(results: dict, path: Path) -> None:
    env = results["environment"]
    logit_max = max(r["logit_abs_max"] for r in results["methods"].values())
    lines = [
        "# SVF vs LoRA r=16 on GPU",
        "",
        (
            f"Model `{results['model']}`, {results['dtype']}, batch {results['batch']} × {results['seq_len']} "
            f"tokens, {results['steps']} timed steps (median) after one warm-up step. Device: {env['device_name']}; "
            f"torch {env['torch']}. Command: `{results['command']}`."
        ),
        "",
        (
            "| method | trainable params | set-up (s) | step (ms) | peak mem (GiB) | above weights (GiB) "
            "| merged vs unmerged max abs logit diff | unmerge bit-exact |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for name, r in results["methods"].items():
        lines.append(
            f"| {name} | {r['trainable_params']:,} | {r['setup_s']:.2f} | {r['step_s_median'] * 1e3:.1f} "
            f"| {r['peak_mem_gb']:.2f} | {r['peak_mem_above_weights_gb']:.2f} "
            f"| {r['merged_vs_unmerged_max_abs_logit_diff']:.3g} | {r['unmerge_restores_weights_bit_exact']} |"
        )
    lines += [
        "",
        (
            "SVF set-up time includes computing the SVD of every targeted weight (SVD cache off). The merge "
            f"difference is the rounding of writing the adapted weight in {results['dtype']} (largest |logit|: "
            f"{logit_max:.3g}). SVF keeps the original weight on merge, so its unmerge is exact; LoRA subtracts its "
            "delta again, which is exact only up to that rounding."
        ),
        "",
    ]
    path.write_text("\n".join(lines))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Hub id of the base model.")
    parser.add_argument("--model-dir", default=None, help="A local copy of the model (overrides --model).")
    parser.add_argument("--tiny", action="store_true", help="A random 2-layer Llama instead (tests, no download).")
    parser.add_argument("--device", default="cuda", help="Device (default cuda).")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--steps", type=int, default=10, help="Timed train steps per method.")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--methods", nargs="+", default=list(method_configs()), choices=list(method_configs()))
    parser.add_argument("--out", default="docs/results", help="Directory for gpu.json and gpu.md.")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "bench_gpu.py: no CUDA device is present (torch.cuda.is_available() is False). Run it on a GPU machine, "
            "or pass `--tiny --device cpu` to check the script itself.",
            file=sys.stderr,
        )
        return 2
    dtype = DTYPES[args.dtype]
    base = load_model(args, dtype, device)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, base.config.vocab_size, (args.batch, args.seq_len), generator=g).to(device)
    methods = method_configs()
    results = {
        "model": "tiny-random-llama" if args.tiny else (args.model_dir or args.model),
        "dtype": args.dtype,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "command": " ".join(["bench_gpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "environment": {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "methods": {name: run_method(name, methods[name], base, batch, args.steps, device) for name in args.methods},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, out / "gpu.md")
    print(f"wrote {out / 'gpu.json'} and {out / 'gpu.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
