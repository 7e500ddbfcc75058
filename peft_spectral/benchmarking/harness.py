"""What every benchmark in `benchmarks/` shares: its command-line options, the model it runs on, resumable run state,
progress with an ETA, the machine header, and writing JSON + markdown (+ plots) to `docs/results/`.

A benchmark script holds its experiment only:

```python
from peft_spectral.benchmarking import BenchmarkRun, add_benchmark_arguments

parser = argparse.ArgumentParser(description=__doc__)
add_benchmark_arguments(parser, name="probe")
args = parser.parse_args()
run = BenchmarkRun.from_args(args, config={"tasks": tasks, "n": n})
model, tokenizer = run.load_model()
for job in run.jobs(["a", "b"], desc="probe"):          # progress bar with ETA; finished jobs are skipped
    run.record(job, {"accuracy": ...})                  # stored atomically in the state file
run.write({"rows": run.results()}, markdown)             # docs/results/probe.json and probe.md, machine header
```
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

from ..state import fingerprint, load_state, write_json_atomic


__all__ = [
    "BenchmarkRun",
    "add_benchmark_arguments",
    "machine_info",
    "markdown_table",
]

logger = logging.getLogger(__name__)

#: Where results go unless `--output` says otherwise (relative to the working directory).
RESULTS_DIR = Path("docs") / "results"


def machine_info() -> dict[str, Any]:
    """The machine a number was measured on: date, CPU count, torch threads, load average, library versions, and the
    git commit of the working directory when there is one."""
    import torch

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        info["load_average"] = None
    versions = {}
    for name in ("torch", "transformers", "peft", "trl", "accelerate"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:  # pragma: no cover - all are dependencies
            versions[name] = None
    info["versions"] = versions
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False, timeout=5
        )
        info["git_commit"] = commit.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: Optional[str] = None) -> str:
    """A markdown table; `align` is one character per column (`l`, `r`), default: first left, the rest right."""
    headers = list(headers)
    align = align or "l" + "r" * (len(headers) - 1)
    marks = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(marks) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def add_benchmark_arguments(parser: argparse.ArgumentParser, *, name: str, model_default: str = "default") -> None:
    """The options every benchmark takes: `--model`, `--smoke`, `--output`, `--state`, `--seed`, `--no-progress`.

    Args:
        parser (`argparse.ArgumentParser`): The benchmark's parser.
        name (`str`): The benchmark's name: results go to `docs/results/<name>.{json,md}` by default.
        model_default (`str`, defaults to `"default"`): `--model`'s default.
    """
    parser.add_argument(
        "--model",
        default=model_default,
        help="'default' (the embedded SmolLM2-135M-Instruct), 'tiny' (a random tiny Llama) or a Hub id / local path",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="a seconds-long run on the tiny model and a few examples (for tests)"
    )
    parser.add_argument(
        "--output",
        default=None,
        metavar="DIR",
        help=f"where {name}.json and {name}.md go; left out: docs/results (a temporary directory with --smoke)",
    )
    parser.add_argument(
        "--state",
        default=None,
        metavar="FILE",
        help="resumable run state: finished jobs are read back, not run again; left out: <output>/<name>_state.json",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of task splits, sampling and training")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(benchmark_name=name)


class BenchmarkRun:
    """One run of a benchmark: its config, resumable job results, progress and report files.

    Args:
        name (`str`): The benchmark's name (file names of its results).
        output_dir (`str` or `Path`): Where the JSON, markdown and plots go.
        config (`dict`): What defines the run (tasks, sizes, settings); the state file is bound to its fingerprint,
            so a changed config never reuses another run's results.
        model (`str`): `"default"`, `"tiny"` or a Hub id / path.
        state_path (`str` or `Path`, *optional*): The state file; `None`: `<output_dir>/<name>_state.json`.
        progress (`bool`): Show progress bars.
        smoke (`bool`): A smoke run (recorded in the results).
    """

    def __init__(
        self,
        name: str,
        output_dir,
        config: dict[str, Any],
        *,
        model: str = "default",
        state_path=None,
        progress: bool = True,
        smoke: bool = False,
    ):
        self.name = name
        self.output_dir = Path(output_dir)
        self.config = {**config, "model": model, "smoke": smoke}
        self.model_name = model
        self.progress = progress
        self.smoke = smoke
        self.state_path = Path(state_path) if state_path else self.output_dir / f"{name}_state.json"
        self.fingerprint = fingerprint(name, self.config)
        state = load_state(self.state_path, self.fingerprint, what=f"{name} benchmark state")
        self._results: dict[str, Any] = dict((state or {}).get("results", {}))
        # when and on which commit the recorded jobs ran (a report rewritten from the state later says so)
        self._recorded: dict[str, Any] = dict((state or {}).get("recorded", {}))
        self._recorded_now = False
        self._started = time.perf_counter()
        self.machine = machine_info()
        if self._results:
            logger.info("%s: resuming, %d job(s) already done (%s)", name, len(self._results), self.state_path)

    @classmethod
    def from_args(cls, args: argparse.Namespace, config: dict[str, Any]) -> BenchmarkRun:
        """A run from the options of [`add_benchmark_arguments`]; `--smoke` writes to a temporary directory unless
        `--output` is given, and runs on the tiny model."""
        import tempfile

        smoke = bool(getattr(args, "smoke", False))
        output = args.output or (tempfile.mkdtemp(prefix=f"{args.benchmark_name}-smoke-") if smoke else RESULTS_DIR)
        model = "tiny" if smoke else args.model
        return cls(
            args.benchmark_name,
            output,
            {**config, "seed": args.seed},
            model=model,
            state_path=args.state,
            progress=not args.no_progress,
            smoke=smoke,
        )

    # ---------------------------------------------------------------------------------------------------- model

    def load_model(self, dtype: str = "float32"):
        """`(model, tokenizer)` of the run's `--model`: the embedded default, the tiny model, or
        `from_pretrained`."""
        if self.model_name == "tiny":
            from .tiny import tiny_model

            return tiny_model()
        from ..assets import load_model

        return load_model(None if self.model_name == "default" else self.model_name, dtype=dtype)

    # ---------------------------------------------------------------------------------------------------- jobs

    def done(self, key: str) -> bool:
        """Whether job `key` has a recorded result."""
        return key in self._results

    def result(self, key: str) -> Any:
        """The recorded result of job `key`."""
        return self._results[key]

    def results(self) -> dict[str, Any]:
        """Every recorded result, by job key, in the order they were recorded."""
        return dict(self._results)

    def record(self, key: str, value: Any) -> Any:
        """Record the result of job `key` (JSON-ready) and write the state file atomically; returns `value`."""
        self._results[key] = json.loads(json.dumps(value, default=str))
        now = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": self.machine.get("git_commit"),
        }
        self._recorded = {"first": self._recorded.get("first") or now, "last": now}
        self._recorded_now = True
        write_json_atomic(
            self.state_path,
            {
                "fingerprint": self.fingerprint,
                "config": self.config,
                "results": self._results,
                "recorded": self._recorded,
            },
            digest=True,
        )
        return self._results[key]

    def cached(self, key: str, compute) -> Any:
        """The result of job `key`: read back when recorded, else `compute()` recorded."""
        if key in self._results:
            return self._results[key]
        return self.record(key, compute())

    def jobs(self, keys: Sequence[str], desc: str = "jobs") -> Iterator[str]:
        """The keys of the jobs still to run, with a progress bar (finished ones count as done) and an ETA from the
        mean time of the jobs run so far."""
        keys = list(keys)
        todo = [k for k in keys if k not in self._results]
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(keys), initial=len(keys) - len(todo), desc=f"{self.name}: {desc}", unit="job")
        durations: list[float] = []
        try:
            for i, key in enumerate(todo):
                if bar is not None:
                    eta = ""
                    if durations:
                        eta = f"ETA {(len(todo) - i) * sum(durations) / len(durations) / 60:.1f} min"
                    bar.set_postfix_str(f"{key} {eta}".strip())
                start = time.perf_counter()
                yield key
                durations.append(time.perf_counter() - start)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()

    # ---------------------------------------------------------------------------------------------------- report

    def path(self, suffix: str) -> Path:
        """`<output_dir>/<name><suffix>`, e.g. `run.path(".png")`."""
        return self.output_dir / f"{self.name}{suffix}"

    def header(self) -> str:
        """One markdown line saying where and when the numbers were measured and how to reproduce them."""
        m = self.machine
        load = m.get("load_average")
        return (
            f"Measured {m['date'][:16].replace('T', ' ')} UTC on {m['cpu_count']} CPU cores "
            f"({m['torch_threads']} torch threads{f', load average {load[0]:.2f} at start' if load else ''}), "
            f"model `{self.model_name}`, commit {m.get('git_commit') or 'n/a'}"
            + (" — **smoke run, not a result**" if self.smoke else "")
            + "."
            + self._earlier_jobs()
        )

    def _earlier_jobs(self) -> str:
        """A sentence saying when the jobs of a resumed run were recorded, where that was before this process."""
        first, last = self._recorded.get("first"), self._recorded.get("last")
        if not first or not self._results or first["date"] >= self.machine["date"]:
            return ""
        span = f"{first['date'][:16].replace('T', ' ')} to {last['date'][:16].replace('T', ' ')} UTC"
        commits = ", ".join(sorted({c for c in (first.get("commit"), last.get("commit")) if c}))
        return (
            f" Jobs recorded from {span}{f' (commit {commits})' if commits else ''}"
            f"{', this run added some' if self._recorded_now else '; this report was rewritten from that state'}."
        )

    def write(self, data: dict[str, Any], markdown: str, *, title: Optional[str] = None) -> tuple[Path, Path]:
        """Write `<name>.json` (`data` plus the config, the machine header and the wall time) and `<name>.md` (a
        title, the header line, then `markdown`); returns both paths."""
        wall = time.perf_counter() - self._started
        payload = {
            "benchmark": self.name,
            "config": self.config,
            "machine": {**self.machine, "load_average_end": _load_average()},
            "wall_seconds": round(wall, 1),
            **data,
        }
        json_path, md_path = self.path(".json"), self.path(".md")
        write_json_atomic(json_path, payload)
        text = f"# {title or self.name}\n\n{self.header()}\n\n{markdown.strip()}\n"
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(text)
        print(f"[{self.name}] wrote {json_path} and {md_path} ({wall / 60:.1f} min)", flush=True)
        return json_path, md_path


def _load_average() -> Optional[list[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None
