"""The test evaluation of an SVF expert against its base model, shared by `peft-spectral train-svf --eval-examples`
and `benchmarks/bench_experts.py`.

Both score the same way: greedy generated answers ([`peft_spectral.evaluation.evaluate`] with `mode="generate"`,
what RL optimises) on the first examples of the task's test split, base model and adapter on the same examples. The
report gives each accuracy with its 95% Wilson interval and the paired difference (adapter minus base) with its paired
bootstrap interval and exact McNemar p-value ([`peft_spectral.stats`]), and keeps the per-example verdicts so that
the file can be re-analysed:

```python
from peft_spectral.expert_eval import evaluate_generated, paired_report, write_test_eval

base = evaluate_generated(model, tokenizer, task.test[:200], kind=task.kind)
expert = evaluate_generated(peft_model, tokenizer, task.test[:200], kind=task.kind)
report = paired_report(base, expert, task=task.name)
write_test_eval("svf-gcd", report)  # svf-gcd/test_eval.json
```
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Union

from .data import Example
from .stats import accuracy_ci, compare_balanced, compare_paired, format_accuracy, format_comparison


__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "TEST_EVAL_FILE",
    "evaluate_generated",
    "paired_report",
    "read_test_eval",
    "report_lines",
    "write_test_eval",
]

#: Name of the file [`write_test_eval`] writes in an adapter directory.
TEST_EVAL_FILE = "test_eval.json"
#: Generation budget of the test evaluation (a letter or a short number; `train-svf` uses
#: `max(--max-completion-length, 8)`).
DEFAULT_MAX_NEW_TOKENS = 8


def evaluate_generated(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    kind: str,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 8,
    progress: bool = False,
):
    """Greedy generated answers of `model` on `examples`, judged by [`peft_spectral.evaluation.score_prediction`].

    Args:
        model: A causal LM (a `PeftModel` is scored with its active adapter).
        tokenizer: Its tokenizer.
        examples (`Sequence[Example]`): The test examples.
        kind (`str`): The task's kind (`"multiple_choice"`, `"generation"`, `"code"`).
        max_new_tokens (`int`, defaults to 8): Generation budget.
        batch_size (`int`, defaults to 8): How many examples are generated together.
        progress (`bool`, defaults to `False`): Show a progress bar.

    Returns:
        [`~peft_spectral.evaluation.EvalResult`] with the per-example verdicts.
    """
    from .evaluation import evaluate

    if not examples:
        raise ValueError("examples is empty: the test evaluation needs at least one example")
    return evaluate(
        model,
        tokenizer,
        list(examples),
        kind=kind,
        mode="generate",
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        progress=progress,
    )


def paired_report(
    base,
    adapter,
    *,
    task: Optional[str] = None,
    settings: Optional[Mapping[str, Any]] = None,
    labels: Optional[Sequence[Any]] = None,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """The JSON-ready comparison of an adapter with its base model on the same examples.

    Args:
        base, adapter ([`~peft_spectral.evaluation.EvalResult`] or `Sequence[bool]`): Per-example verdicts of the
            base model and of the adapter, in the same order.
        task (`str`, *optional*): Recorded as `"task"`.
        settings (`Mapping`, *optional*): How the verdicts were obtained (mode, `max_new_tokens`, split, ...),
            recorded as `"settings"`.
        labels (`Sequence`, *optional*): Gold labels of the examples (multiple-choice tasks). Adds `"balanced"`:
            balanced accuracy of both and its paired difference ([`~peft_spectral.stats.compare_balanced`]), which
            tells a model that learned the task from one that learned to give one answer every time.
        confidence (`float`, defaults to 0.95): Coverage of the intervals.

    Returns:
        `dict` with `n`, `base` and `adapter` (each `{"accuracy", "low", "high", "n", "confidence", "correct"}`: the
        Wilson interval and the verdicts), `delta` (`{"delta", "low", "high", "p_value", "only_a", "only_b",
        "significant", ...}`: adapter minus base, paired bootstrap interval, exact McNemar p; `only_a` = examples only
        the base gets right), the `text` lines of the table format, and `balanced` when `labels` are given.
    """
    base_correct = [bool(c) for c in getattr(base, "correct", base)]
    adapter_correct = [bool(c) for c in getattr(adapter, "correct", adapter)]
    base_ci, adapter_ci = accuracy_ci(base_correct, confidence), accuracy_ci(adapter_correct, confidence)
    delta = compare_paired(base_correct, adapter_correct, confidence=confidence)
    report: dict[str, Any] = {}
    if task is not None:
        report["task"] = task
    report.update(
        n=delta.n,
        settings=dict(settings or {}),
        base={**asdict(base_ci), "correct": base_correct},
        adapter={**asdict(adapter_ci), "correct": adapter_correct},
        delta={**asdict(delta), "significant": delta.significant},
        text={
            "base": format_accuracy(base_ci),
            "adapter": format_accuracy(adapter_ci),
            "delta": format_comparison(delta),
        },
    )
    if labels is not None:
        balanced = compare_balanced(base_correct, adapter_correct, list(labels), confidence=confidence)
        report["balanced"] = {
            **asdict(balanced),
            "significant": balanced.significant,
            "adapter_above_chance": balanced.b_above_chance,
        }
        report["text"]["balanced"] = str(balanced)
    return report


def report_lines(report: Mapping[str, Any]) -> list[str]:
    """Three printable lines of a [`paired_report`]: base, adapter, Δ vs base."""
    text = report["text"]
    return [f"base    {text['base']}", f"adapter {text['adapter']}", f"vs base {text['delta']}"]


def write_test_eval(directory: Union[str, os.PathLike], report: Mapping[str, Any]) -> Path:
    """Write a [`paired_report`] to `directory/test_eval.json` (atomically); returns the path."""
    from .state import write_json_atomic

    path = Path(directory) / TEST_EVAL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, dict(report))
    return path


def read_test_eval(path: Union[str, os.PathLike]) -> Optional[dict[str, Any]]:
    """A `test_eval.json` (or the one inside a directory), or `None` when there is none."""
    path = Path(path)
    if path.is_dir():
        path = path / TEST_EVAL_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())
