"""The benchmark harness: what every script in `benchmarks/` shares (options, model, resumable state, progress with
ETA, machine header, JSON + markdown reports) and the tiny model of the smoke runs and the tests. A benchmark script
keeps only its experiment; see `docs/architecture.md` for where a new one goes."""

from .harness import BenchmarkRun, add_benchmark_arguments, machine_info, markdown_table
from .tiny import tiny_gpt2, tiny_llama, tiny_model, tiny_tokenizer


__all__ = [
    "BenchmarkRun",
    "add_benchmark_arguments",
    "machine_info",
    "markdown_table",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_model",
    "tiny_tokenizer",
]
