"""GPU benchmark: bf16 SVF against LoRA r=16 on a ≥1B model (step time, peak memory, merge exactness).

One command, a few minutes on one GPU:

    python benchmarks/bench_gpu.py                                   # HuggingFaceTB/SmolLM2-1.7B-Instruct from the Hub
    python benchmarks/bench_gpu.py --model /models/SmolLM2-1.7B-Instruct --steps 20
    python benchmarks/bench_gpu.py --smoke                           # tiny random Llama, CUDA when present (seconds)

For each of SVF (MLP targets), LoRA r=16 (MLP), SVF (all linear) and LoRA r=16 (all linear), on a fresh copy of the
base model and the same random batch: adapter set-up time (SVF computes the SVD factors here), trainable parameters,
median train-step time (forward + backward + AdamW, `torch.cuda.synchronize` around each step) and peak allocated
memory (`torch.cuda.max_memory_allocated`, and the part above the model weights). Then, for each method after its
training steps: merged vs unmerged logits (max abs diff on one batch) and whether `unmerge_adapter` restores every base
weight bit-exactly.

Writes `docs/results/gpu.{json,md}` (`--output` to change; a smoke run writes to a temporary directory). Exits with
status 2 and one line when the device is CUDA and no CUDA device is present. Resumable: each method is kept in the
state file.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
from peft import LoraConfig, get_peft_model

from peft_spectral import SVFConfig
from peft_spectral.benchmarking import BenchmarkRun, add_benchmark_arguments, markdown_table


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


def markdown(results: dict) -> str:
    logit_max = max(r["logit_abs_max"] for r in results["methods"].values())
    intro = (
        f"Model `{results['model']}`, {results['dtype']}, batch {results['batch']} × {results['seq_len']} tokens, "
        f"{results['steps']} timed steps (median) after one warm-up step. Device: {results['device_name']}; torch "
        f"{torch.__version__}. Command: `{results['command']}`."
    )
    headers = ["method", "trainable params", "set-up (s)", "step (ms)", "peak mem (GiB)", "above weights (GiB)"]
    headers += ["merged vs unmerged max abs logit diff", "unmerge bit-exact"]
    rows = [
        [
            name,
            f"{r['trainable_params']:,}",
            f"{r['setup_s']:.2f}",
            f"{r['step_s_median'] * 1e3:.1f}",
            f"{r['peak_mem_gb']:.2f}",
            f"{r['peak_mem_above_weights_gb']:.2f}",
            f"{r['merged_vs_unmerged_max_abs_logit_diff']:.3g}",
            r["unmerge_restores_weights_bit_exact"],
        ]
        for name, r in results["methods"].items()
    ]
    note = (
        "SVF set-up time includes computing the SVD of every targeted weight (SVD cache off). The merge difference is "
        f"the rounding of writing the adapted weight in {results['dtype']} (largest |logit|: {logit_max:.3g}). SVF "
        "keeps the original weight on merge, so its unmerge is exact; LoRA subtracts its delta again, which is exact "
        "only up to that rounding."
    )
    return f"{intro}\n\n{markdown_table(headers, rows, 'lrrrrrrc')}\n\n{note}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_benchmark_arguments(parser, name="gpu", model_default=DEFAULT_MODEL)
    parser.add_argument("--device", default=None, help="device (default cuda; --smoke: cuda when present, else cpu)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--steps", type=int, default=10, help="timed train steps per method")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--methods", nargs="+", default=list(method_configs()), choices=list(method_configs()))
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.smoke:
        args.steps, args.batch, args.seq_len = 2, 2, 16
    device = torch.device(args.device or ("cpu" if args.smoke and not torch.cuda.is_available() else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "bench_gpu.py: no CUDA device is present (torch.cuda.is_available() is False); run it on a GPU machine, "
            "or pass --smoke to check the script itself.",
            file=sys.stderr,
        )
        return 2
    config = {k: getattr(args, k) for k in ("dtype", "steps", "batch", "seq_len", "methods")}
    run = BenchmarkRun.from_args(args, {**config, "device": str(device)})
    dtype = DTYPES[args.dtype]
    base, _ = run.load_model(dtype=str(dtype).removeprefix("torch."))
    base = base.to(device=device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(args.seed)
    batch = torch.randint(0, base.config.vocab_size, (args.batch, args.seq_len), generator=g).to(device)
    methods = method_configs()
    for key in run.jobs([f"method:{name}" for name in args.methods], desc="methods"):
        name = key.removeprefix("method:")
        run.record(key, run_method(name, methods[name], base, batch, args.steps, device))
    results = {
        "model": run.model_name,
        **config,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "command": " ".join(["python benchmarks/bench_gpu.py", *(sys.argv[1:] if argv is None else argv)]),
        "methods": {name: run.result(f"method:{name}") for name in args.methods},
    }
    run.write(results, markdown(results), title="SVF vs LoRA r=16 on GPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
