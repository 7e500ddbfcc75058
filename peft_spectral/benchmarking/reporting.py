"""Small pieces of the benchmarks' reports: a [`peft_spectral.stats`] result as a JSON entry that also carries its
table text, the short label of a task spec for table headers, and the spread of a timing over round-robin rounds.

```python
from peft_spectral.benchmarking.reporting import stat_entry, task_label
from peft_spectral.stats import compare_paired

entry = stat_entry(compare_paired(base, adapter))  # {"delta": ..., "low": ..., "significant": ..., "text": "Δ +0.045 ..."}
task_label("rg:gcd?max_value=100")                 # "gcd"
format_spread(round_spread([1.02, 0.97, 1.10]), 2, "×")  # "1.02× [0.97–1.10]"
```
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from typing import Any


__all__ = ["format_spread", "round_spread", "stat_entry", "task_label"]


def stat_entry(stat: Any) -> dict[str, Any]:
    """A `peft_spectral.stats` result (`AccuracyCI`, `PairedComparison`, `BalancedComparison`) as a JSON-ready dict:
    its fields, `"text"` (the table format, `str(stat)`) and, for a comparison, `"significant"` (its interval
    excludes 0)."""
    out = {**dataclasses.asdict(stat), "text": str(stat)}
    if hasattr(stat, "significant"):
        out["significant"] = bool(stat.significant)
    return out


def task_label(spec: str) -> str:
    """A task spec without its source prefix and parameters (`"rg:gcd?max_value=100"` -> `"gcd"`); a mixture keeps
    each part's label (`"gcd+lcm"`)."""
    return "+".join(part.split("?", maxsplit=1)[0].split(":", maxsplit=1)[-1] for part in str(spec).split(";"))


def round_spread(values: Sequence[float]) -> dict[str, float]:
    """`{"median", "min", "max", "n"}` of a measurement taken once per round-robin round (timings are reported as
    the median and the range over rounds, never as one number)."""
    if not values:
        raise ValueError("round_spread needs at least one value")
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def format_spread(spread: dict[str, float], digits: int = 2, unit: str = "") -> str:
    """`"median [min–max]"` of a [`round_spread`], each with `digits` decimals and `unit` appended to the median."""
    return f"{spread['median']:.{digits}f}{unit} [{spread['min']:.{digits}f}–{spread['max']:.{digits}f}]"
