"""Scorers: what judges a model's answer to an [`~peft_spectral.data.types.Example`].

Every example carries its scorer (`Example.scorer`), or gets the default scorer of its task's kind from
[`scorer_for`] — the one place where a kind turns into a scorer. Evaluation, RL rewards, CEM fitness, the
Transformer² classifier data and the SpectralCompress / LASER evaluations all score through it, so a new source
with its own verifier (e.g. [`~peft_spectral.data.sources.reasoning_gym.ReasoningGymScorer`]) needs no edit
anywhere else.

A scorer returns a score in [0, 1] (partial credit where its verifier gives it) for one extraction mode (see
[`peft_spectral.data.answers`]); an answer is *correct* when its score is 1.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Optional

from .answers import (
    Extraction,
    check_extraction,
    extract_choice,
    extract_choice_strict,
    extract_code,
    extract_number,
    normalize_answer,
    strict_answer,
    to_number,
)
from .types import Example, check_kind


__all__ = [
    "CORRECT_AT",
    "ChoiceScorer",
    "CodeScorer",
    "ExactMatchScorer",
    "Scorer",
    "build_candidate",
    "build_program",
    "default_scorer",
    "example_targets",
    "is_correct",
    "score_code",
    "score_example",
    "score_generation",
    "score_multiple_choice",
    "scorer_for",
]

#: A score at or above this counts as a correct answer.
CORRECT_AT = 1.0 - 1e-9


class Scorer(ABC):
    """Judges a prediction (the model's text) for an example.

    Subclasses are small frozen dataclasses (hashable, picklable) and implement [`score`]. `kind` is the task kind
    they judge; `partial_credit` says whether [`score`] can return values strictly between 0 and 1.
    """

    kind: ClassVar[str] = "generation"
    partial_credit: ClassVar[bool] = False

    @abstractmethod
    def score(self, prediction: str, example: Example, extraction: Extraction = "lenient") -> float:
        """The score of `prediction` for `example`, in [0, 1], under `extraction` (`"strict"` or `"lenient"`)."""

    def correct(self, prediction: str, example: Example, extraction: Extraction = "lenient") -> bool:
        """Whether `prediction` is a correct answer (score 1)."""
        return self.score(prediction, example, extraction) >= CORRECT_AT

    def describe(self) -> str:
        """One line saying what the scorer accepts (for model cards and `peft-spectral tasks --show`)."""
        return type(self).__name__


def _clamp(value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return 0.0
    return min(1.0, max(0.0, value)) if math.isfinite(value) else 0.0


def example_targets(example: Example) -> list[str]:
    """The accepted answers of `example`: its `target`, then any `meta["targets"]` (without repeats)."""
    targets = [example.target]
    for extra in example.meta.get("targets", ()) or ():
        if str(extra) not in targets:
            targets.append(str(extra))
    return targets


# --------------------------------------------------------------------------------------------------------------------
# Multiple choice
# --------------------------------------------------------------------------------------------------------------------


def score_multiple_choice(
    prediction: str, choices: Sequence[str], label: Optional[int], extraction: Extraction = "lenient"
) -> bool:
    """Whether `prediction` picks option `label`: strict reads a letter alone, `"B. <option>"` or an option's exact
    text ([`extract_choice_strict`]); lenient also finds the letter or option in a sentence ([`extract_choice`])."""
    if label is None:
        return False
    pick = extract_choice_strict if check_extraction(extraction) == "strict" else extract_choice
    return pick(prediction, choices) == int(label)


@dataclass(frozen=True)
class ChoiceScorer(Scorer):
    """Multiple choice: the letter or the option text must pick `example.label`."""

    kind: ClassVar[str] = "multiple_choice"

    def score(self, prediction: str, example: Example, extraction: Extraction = "lenient") -> float:
        return float(score_multiple_choice(prediction, example.choices, example.label, extraction))

    def describe(self) -> str:
        return "the option's letter or text"


# --------------------------------------------------------------------------------------------------------------------
# Short answers
# --------------------------------------------------------------------------------------------------------------------


def _numbers_equal(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)


def score_generation(prediction: str, targets: str | Sequence[str], extraction: Extraction = "lenient") -> bool:
    """Whether `prediction` gives one of `targets`.

    Strict: the normalised [`strict_answer`] equals a normalised target, or both are numbers and equal. Lenient:
    normalised exact match of the whole text or its first line, or the final number ([`extract_number`]) equals a
    numeric target.
    """
    targets = [targets] if isinstance(targets, str) else [str(t) for t in targets]
    prediction = str(prediction)
    if check_extraction(extraction) == "strict":
        answer = strict_answer(prediction)
        value = to_number(answer)
        for target in targets:
            norm = normalize_answer(target)
            if norm and normalize_answer(answer) == norm:
                return True
            expected = to_number(target)
            if value is not None and expected is not None and _numbers_equal(value, expected):
                return True
        return False
    candidates = {normalize_answer(prediction)}
    if prediction.strip():
        candidates.add(normalize_answer(prediction.strip().splitlines()[0]))
    for target in targets:
        if normalize_answer(target) in candidates and normalize_answer(target) != "":
            return True
        value = to_number(target)
        if value is None:
            value = extract_number(target)
        if value is not None:
            predicted = extract_number(prediction)
            if predicted is not None and _numbers_equal(predicted, value):
                return True
    return False


@dataclass(frozen=True)
class ExactMatchScorer(Scorer):
    """Short answers: normalised exact match against `example.target` (and `meta["targets"]`), numbers compared as
    numbers (see [`score_generation`])."""

    def score(self, prediction: str, example: Example, extraction: Extraction = "lenient") -> float:
        return float(score_generation(prediction, example_targets(example), extraction))

    def describe(self) -> str:
        return "normalised exact match, numbers compared as numbers"


# --------------------------------------------------------------------------------------------------------------------
# Code
# --------------------------------------------------------------------------------------------------------------------


def _stub(prompt: str, entry_point: str) -> str:
    """The function stub held by `prompt` (the code of its ```python block when it is an instruction)."""
    if "```" in prompt:  # an instruction with the stub in a code block (e.g. Example.prompt of HumanEval)
        prompt = extract_code(prompt, entry_point)
    if prompt and not prompt.endswith("\n"):
        prompt += "\n"
    return prompt


def build_candidate(completion: str, *, entry_point: str, prompt: str = "") -> str:
    """The candidate program: stub + completion, without any test.

    `prompt` is the function stub, or a text holding it in a ```python block (its content is used). A completion
    that redefines `entry_point` follows the stub (keeping its imports and helpers) and overrides it; any other
    completion continues the stub's body. A fenced completion is unwrapped first.
    """
    code = extract_code(completion, entry_point)
    prompt = _stub(prompt, entry_point)
    defines = bool(entry_point) and re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, flags=re.MULTILINE)
    return prompt + "\n" + code if defines else prompt + code


def build_program(completion: str, *, test: str, entry_point: str, prompt: str = "") -> str:
    """The single HumanEval program: [`build_candidate`], then the tests and `check(entry_point)`.

    Not how [`score_code`] judges code (a program holding its own tests can fake passing them); kept for reading
    and for running trusted solutions with [`peft_spectral.sandbox.run_code`].
    """
    body = build_candidate(completion, entry_point=entry_point, prompt=prompt)
    check = f"\ncheck({entry_point})\n" if entry_point else "\n"
    return f"{body}\n\n{test}\n{check}"


def score_code(
    completion: str, *, test: str, entry_point: str, prompt: str = "", timeout: float = 5.0, memory_mb: int = 512
) -> bool:
    """Whether the completion passes the HumanEval tests, judged by [`peft_spectral.sandbox.run_tests`].

    The stub + completion run in one sandbox and only answer calls of `entry_point`; `test` and the stub (for helpers
    such as HumanEval's `poly`) run in another, which alone decides the verdict (see `docs/security.md`).

    Args:
        completion (`str`): The model's completion (a body continuing the stub, or a whole function, fenced or not).
        test (`str`): The example's test code defining `check(candidate)`.
        entry_point (`str`): The name of the function under test.
        prompt (`str`, defaults to `""`): The function stub, or an instruction holding it in a ```python block.
        timeout (`float`, defaults to 5.0): Wall-clock seconds for the whole check.
        memory_mb (`int`, defaults to 512): Address-space limit of each sandboxed process in MiB.
    """
    from ..sandbox import run_tests

    if not test:
        raise ValueError("score_code needs the example's `test` code (meta['test'] for HumanEval)")
    if not entry_point:
        raise ValueError("score_code needs the example's `entry_point` (meta['entry_point'] for HumanEval)")
    candidate = build_candidate(completion, entry_point=entry_point, prompt=prompt)
    result = run_tests(
        candidate,
        test=test,
        entry_point=entry_point,
        prelude=_stub(prompt, entry_point),
        timeout=timeout,
        memory_mb=memory_mb,
    )
    return result.passed


@dataclass(frozen=True)
class CodeScorer(Scorer):
    """Code: the completion (stub + body, or a whole function) must pass `meta["test"]` for `meta["entry_point"]`,
    run in the sandbox ([`score_code`]). Both extraction modes read the first fenced block (or the whole text).

    Args:
        timeout (`float`, defaults to 5.0): Wall-clock seconds for one check.
        memory_mb (`int`, defaults to 512): Address-space limit of each sandboxed process in MiB.
    """

    kind: ClassVar[str] = "code"
    timeout: float = 5.0
    memory_mb: int = 512

    def score(self, prediction: str, example: Example, extraction: Extraction = "lenient") -> float:
        check_extraction(extraction)
        ok = score_code(
            prediction,
            test=example.meta.get("test", ""),
            entry_point=example.meta.get("entry_point", ""),
            prompt=example.meta.get("code_prompt", example.prompt),
            timeout=self.timeout,
            memory_mb=self.memory_mb,
        )
        return float(ok)

    def describe(self) -> str:
        return "the function passes the example's tests (sandboxed)"


# --------------------------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------------------------

_DEFAULT_SCORERS: dict[str, Scorer] = {
    "multiple_choice": ChoiceScorer(),
    "generation": ExactMatchScorer(),
    "code": CodeScorer(),
}


def default_scorer(kind: str) -> Scorer:
    """The scorer of a task kind for examples that carry none."""
    return _DEFAULT_SCORERS[check_kind(kind)]


def _kind_of(example: Example) -> str:
    if example.choices and example.label is not None:
        return "multiple_choice"
    if example.meta.get("test") and example.meta.get("entry_point"):
        return "code"
    return "generation"


def scorer_for(example: Example, kind: Optional[str] = None) -> Scorer:
    """The scorer of `example`: its own (`example.scorer`), else the default of `kind` (else of the kind its fields
    imply: choices and a label → multiple choice, `meta["test"]` and `meta["entry_point"]` → code, else
    generation)."""
    if example.scorer is not None:
        return example.scorer
    return default_scorer(kind if kind is not None else _kind_of(example))


def score_example(
    prediction: str, example: Example, *, kind: Optional[str] = None, extraction: Extraction = "lenient"
) -> float:
    """`scorer_for(example, kind).score(prediction, example, extraction)`, clamped to [0, 1] (NaN → 0)."""
    return _clamp(scorer_for(example, kind).score(prediction, example, extraction))


def is_correct(
    prediction: str, example: Example, *, kind: Optional[str] = None, extraction: Extraction = "lenient"
) -> bool:
    """Whether `prediction` is a correct answer to `example` (its score is 1)."""
    return score_example(prediction, example, kind=kind, extraction=extraction) >= CORRECT_AT
