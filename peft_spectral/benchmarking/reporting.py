"""Small pieces of the benchmarks' reports: a [`peft_spectral.stats`] result as a JSON entry that also carries its
table text, and the short label of a task spec for table headers.

```python
from peft_spectral.benchmarking.reporting import stat_entry, task_label
from peft_spectral.stats import compare_paired

entry = stat_entry(compare_paired(base, adapter))  # {"delta": ..., "low": ..., "significant": ..., "text": "Δ +0.045 ..."}
task_label("rg:gcd?max_value=100")                 # "gcd"
```
"""

from __future__ import annotations

import dataclasses
from typing import Any


__all__ = ["stat_entry", "task_label"]


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
