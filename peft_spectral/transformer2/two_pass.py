"""Two-pass inference: pass 1 picks the adaptation of each prompt, pass 2 answers with it.

Prompts are grouped by their chosen adaptation so that each adapter is switched on once per call; the base-model
group runs with every adapter layer disabled. Each call reports the wall time of pass 1, of pass 2 and of the
adapter switches.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from ..evaluation import answer_logliks, generate_answers, score_prediction
from ..option_scoring import multiple_choice_metrics, score_examples
from ..tasks import Example
from .dispatch import DispatcherLike
from .library import ExpertLibrary


logger = logging.getLogger(__name__)

BASE = "base"


@dataclass
class TwoPassResult:
    """The outcome of [`two_pass_generate`] / [`two_pass_evaluate`].

    Args:
        choices (`list[str | None]`): Adapter used for each prompt (`None`: the base model).
        outputs (`list`): Generated answers (generation) or the picked option index (multiple choice by loglik).
        pass1_seconds, pass2_seconds, switch_seconds (`float`): Wall times of the two passes and of switching.
        groups (`dict[str, list[int]]`): Prompt indices per adapter (`"base"` for the base model).
        correct (`list[bool]`, *optional*): Per-prompt verdicts (evaluation only).
        accuracy (`float`, *optional*): Fraction correct (evaluation only).
        mean_loglik (`float`, *optional*): Mean gold-answer per-token log-likelihood (evaluation only).
    """

    choices: list[Optional[str]]
    outputs: list[Any]
    pass1_seconds: float
    pass2_seconds: float
    switch_seconds: float
    groups: dict[str, list[int]] = field(default_factory=dict)
    correct: Optional[list[bool]] = None
    accuracy: Optional[float] = None
    mean_loglik: Optional[float] = None

    @property
    def pass1_over_pass2(self) -> float:
        """Pass-1 time as a fraction of pass-2 time."""
        return self.pass1_seconds / self.pass2_seconds if self.pass2_seconds > 0 else float("inf")

    @property
    def switch_over_pass2(self) -> float:
        """Switching time as a fraction of pass-2 time."""
        return self.switch_seconds / self.pass2_seconds if self.pass2_seconds > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (without per-prompt outputs)."""
        return {
            "n": len(self.choices),
            "accuracy": self.accuracy,
            "mean_loglik": self.mean_loglik,
            "pass1_seconds": self.pass1_seconds,
            "pass2_seconds": self.pass2_seconds,
            "switch_seconds": self.switch_seconds,
            "pass1_over_pass2": self.pass1_over_pass2,
            "switch_over_pass2": self.switch_over_pass2,
            "group_sizes": {k: len(v) for k, v in self.groups.items()},
        }


def _as_examples(prompts: Sequence[Union[str, Example]]) -> list[Example]:
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, Example):
            out.append(p)
        elif isinstance(p, str):
            out.append(Example(prompt=p, target=""))
        else:
            raise TypeError(f"prompts[{i}] must be a str or an Example, got {type(p).__name__}")
    return out


def run_pass1(
    library: ExpertLibrary, dispatcher: DispatcherLike, examples: Sequence[Example]
) -> tuple[list[Optional[str]], float]:
    """Run a dispatcher and resolve its answers to adapter names (or `None`); returns them and the time taken."""
    start = time.perf_counter()
    raw = list(dispatcher(library, examples))
    seconds = time.perf_counter() - start
    if len(raw) != len(examples):
        raise ValueError(f"the dispatcher returned {len(raw)} choices for {len(examples)} prompts")
    return [library.resolve(c) for c in raw], seconds


def group_by_choice(choices: Sequence[Optional[str]]) -> OrderedDict[Optional[str], list[int]]:
    """Prompt indices per chosen adapter, in order of first appearance."""
    groups: OrderedDict[Optional[str], list[int]] = OrderedDict()
    for i, c in enumerate(choices):
        groups.setdefault(c, []).append(i)
    return groups


def _run_groups(library: ExpertLibrary, choices, fn) -> tuple[dict[int, Any], float, float, dict[str, list[int]]]:
    results: dict[int, Any] = {}
    switch = 0.0
    start = time.perf_counter()
    groups = group_by_choice(choices)
    for adapter, idx in groups.items():
        before = len(library.switch_seconds)
        with library.use(adapter):
            switch += sum(library.switch_seconds[before:])
            for i, value in zip(idx, fn(idx)):
                results[i] = value
    pass2 = time.perf_counter() - start
    return results, pass2, switch, {(BASE if k is None else k): v for k, v in groups.items()}


def two_pass_generate(
    library: ExpertLibrary,
    dispatcher: DispatcherLike,
    prompts: Sequence[Union[str, Example]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
) -> TwoPassResult:
    """Generate answers with Transformer²'s two passes.

    Args:
        library ([`ExpertLibrary`]): The model and its experts.
        dispatcher: Pass 1 ([`PromptDispatcher`], [`FixedDispatcher`] or any callable).
        prompts: Plain prompts or [`Example`]s.
        max_new_tokens (`int`): Pass-2 generation budget.
        batch_size (`int`): Prompts per `generate` call within a group.

    Returns:
        [`TwoPassResult`] with the generated strings in `outputs`, in input order.
    """
    examples = _as_examples(prompts)
    choices, pass1 = run_pass1(library, dispatcher, examples)
    results, pass2, switch, groups = _run_groups(
        library,
        choices,
        lambda idx: generate_answers(
            library.model,
            library.tokenizer,
            [examples[i] for i in idx],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        ),
    )
    return TwoPassResult(
        choices=choices,
        outputs=[results[i] for i in range(len(examples))],
        pass1_seconds=pass1,
        pass2_seconds=pass2,
        switch_seconds=switch,
        groups=groups,
    )


def two_pass_evaluate(
    library: ExpertLibrary,
    dispatcher: DispatcherLike,
    examples: Sequence[Example],
    *,
    kind: str = "multiple_choice",
    mode: str = "auto",
    batch_size: int = 8,
    max_new_tokens: int = 32,
) -> TwoPassResult:
    """Accuracy of Transformer²'s two passes on labelled examples.

    Args:
        kind (`str`): `"multiple_choice"`, `"generation"` or `"code"`.
        mode (`str`): `"loglik"` (multiple choice: most likely option, the `"auto"` choice), or `"generate"`
            (greedy answer judged by [`peft_spectral.evaluation.score_prediction`]).

    Returns:
        [`TwoPassResult`] with `correct`, `accuracy` and `mean_loglik` filled in.
    """
    examples = list(examples)
    if not examples:
        raise ValueError("examples is empty")
    if mode == "auto":
        mode = "loglik" if kind == "multiple_choice" else "generate"
    if mode not in ("loglik", "generate"):
        raise ValueError(f"mode must be 'auto', 'loglik' or 'generate', got {mode!r}")
    if mode == "loglik" and kind != "multiple_choice":
        raise ValueError(f"mode='loglik' needs kind='multiple_choice', got kind={kind!r}")
    choices, pass1 = run_pass1(library, dispatcher, examples)

    def answer(idx: list[int]) -> list[tuple[Any, bool, float]]:
        group = [examples[i] for i in idx]
        if mode == "loglik":
            scores = score_examples(library.model, library.tokenizer, group, batch_size=batch_size)
            picks = scores.argmax()
            return [
                (p, p == ex.label, scores.mean_token_loglik(k, ex.label) if ex.label is not None else float("nan"))
                for k, (p, ex) in enumerate(zip(picks, group))
            ]
        texts = generate_answers(
            library.model, library.tokenizer, group, max_new_tokens=max_new_tokens, batch_size=batch_size
        )
        lls = answer_logliks(library.model, library.tokenizer, group, batch_size=batch_size).tolist()
        return [(t, score_prediction(kind, t, ex), ll) for t, ex, ll in zip(texts, group, lls)]

    results, pass2, switch, groups = _run_groups(library, choices, answer)
    ordered = [results[i] for i in range(len(examples))]
    correct = [bool(r[1]) for r in ordered]
    lls = [r[2] for r in ordered if r[2] == r[2]]
    return TwoPassResult(
        choices=choices,
        outputs=[r[0] for r in ordered],
        pass1_seconds=pass1,
        pass2_seconds=pass2,
        switch_seconds=switch,
        groups=groups,
        correct=correct,
        accuracy=sum(correct) / len(correct),
        mean_loglik=sum(lls) / len(lls) if lls else float("nan"),
    )


__all__ = [
    "TwoPassResult",
    "group_by_choice",
    "multiple_choice_metrics",
    "run_pass1",
    "two_pass_evaluate",
    "two_pass_generate",
]
