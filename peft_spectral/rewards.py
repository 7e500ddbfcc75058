"""Answer extraction, scoring and TRL reward functions.

The reward functions follow TRL's reward-function signature: `fn(completions, **kwargs) -> list[float]`, where
`completions` are strings (standard datasets) or lists of chat messages (conversational datasets), and the dataset's
other columns (`target`, `choices`, `label`, `test`, `entry_point`, `prompt`, ...) arrive as lists in `kwargs`.
Transformer² rewards a correct answer with +1 and a wrong one with -1; [`make_reward`] builds 0/1 variants.

```python
from peft_spectral.rewards import make_reward
trainer = GRPOTrainer(..., reward_funcs=[make_reward("generation", negative=0.0)])
```
"""

from __future__ import annotations

import functools
import math
import re
import string
from collections.abc import Callable, Sequence
from typing import Any

from .sandbox import run_tests


__all__ = [
    "checked_reward",
    "code_reward",
    "completion_text",
    "exact_match_reward",
    "extract_choice",
    "extract_code",
    "extract_number",
    "make_reward",
    "multiple_choice_reward",
    "normalize_answer",
    "numeric_match_reward",
    "score_code",
    "score_generation",
    "score_multiple_choice",
]

RewardFunc = Callable[..., list[float]]

# --------------------------------------------------------------------------------------------------------------------
# Extraction helpers
# --------------------------------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"[-−]?\$?\d[\d,]*(?:\.\d+)?|[-−]?\.\d+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def completion_text(completion: Any) -> str:
    """The text of one completion: a string, or the last message content of a conversational completion."""
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if isinstance(completion, (list, tuple)):
        contents = [completion_text(m) for m in completion]
        return contents[-1] if contents else ""
    return str(completion)


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces."""
    text = str(text).lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _to_number(token: str) -> float | None:
    token = token.replace("−", "-").replace("$", "").replace(",", "").strip()
    try:
        value = float(token)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def extract_number(text: str) -> float | None:
    """GSM8K-style final number: the number after the last `####` if any, else the last number in the text.

    Thousands separators (`1,234`) and a leading `$` are accepted. Returns `None` when there is no number.
    """
    text = str(text)
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        match = _NUMBER.search(tail)
        if match:
            return _to_number(match.group())
    matches = _NUMBER.findall(text)
    for token in reversed(matches):
        value = _to_number(token)
        if value is not None:
            return value
    return None


def _target_number(text: str) -> float | None:
    value = _to_number(text)
    return value if value is not None else extract_number(text)


def _numbers_equal(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)


_STRICT_LETTER_PATTERNS = (
    re.compile(r"^\s*\(?([A-Za-z])\)?\s*[.:)]?\s*$"),  # the whole answer is a letter: "B", "(b)", "C."
    re.compile(r"^\s*\(([A-Za-z])\)"),  # "(b) blue"
    re.compile(r"^\s*([A-Za-z])[.)]\s"),  # "B. blue", "b) blue"
    re.compile(r"(?i)\banswer\s*(?:is|:)?\s*\(?([A-Z])\)?(?:[.:)\s]|$)"),  # "the answer is (B)", "Answer: B"
    re.compile(r"(?i)\boption\s*\(?([A-Z])\)?(?:[.:)\s]|$)"),  # "option B"
)
_LOOSE_LETTER_PATTERN = re.compile(r"^\s*([A-Z])(?:[:\]]|\s|$)")  # "B is right" (capital letter only)


def _letter(pattern: re.Pattern, text: str, n: int) -> int | None:
    match = pattern.search(text)
    if match:
        idx = ord(match.group(1).upper()) - ord("A")
        if 0 <= idx < n:
            return idx
    return None


def extract_choice(text: str, choices: Sequence[str]) -> int | None:
    """Index of the option that `text` picks, by letter (`B`, `(b)`, `B. ...`, `Answer: C`) or by option text.

    Returns `None` when nothing matches unambiguously.
    """
    text = str(text).strip()
    n = len(choices)
    if not text or n == 0:
        return None
    for pattern in _STRICT_LETTER_PATTERNS:
        idx = _letter(pattern, text, n)
        if idx is not None:
            return idx
    options = [normalize_answer(c) for c in choices]
    for candidate in (normalize_answer(text), normalize_answer(text.splitlines()[0])):
        exact = [i for i, opt in enumerate(options) if opt and opt == candidate]
        if len(exact) == 1:
            return exact[0]
    idx = _letter(_LOOSE_LETTER_PATTERN, text, n)
    if idx is not None:
        return idx
    # An option mentioned at the start of the answer (longest first so "non-entailment" beats "entailment").
    norm = normalize_answer(text)
    starts = [i for i, opt in enumerate(options) if opt and norm.startswith(opt)]
    if starts:
        return max(starts, key=lambda i: len(options[i]))
    return None


def extract_code(text: str, entry_point: str = "") -> str:
    """The code in a completion: the first fenced block (```python ...```) that defines `entry_point` if any, else the
    first fenced block, else the text itself."""
    blocks = re.findall(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|$)", str(text), flags=re.DOTALL)
    if not blocks:
        return str(text)
    if entry_point:
        for block in blocks:
            if re.search(rf"\bdef\s+{re.escape(entry_point)}\s*\(", block):
                return block
    return blocks[0]


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
    # A full definition follows the stub (keeping its imports and helpers) and overrides it; a body continues it.
    return prompt + "\n" + code if defines else prompt + code


def build_program(completion: str, *, test: str, entry_point: str, prompt: str = "") -> str:
    """The single HumanEval program: [`build_candidate`], then the tests and `check(entry_point)`.

    Not how [`score_code`] judges code (a program holding its own tests can fake passing them); kept for reading
    and for running trusted solutions with [`peft_spectral.sandbox.run_code`].
    """
    body = build_candidate(completion, entry_point=entry_point, prompt=prompt)
    check = f"\ncheck({entry_point})\n" if entry_point else "\n"
    return f"{body}\n\n{test}\n{check}"


# --------------------------------------------------------------------------------------------------------------------
# Scorers (shared with peft_spectral.evaluation)
# --------------------------------------------------------------------------------------------------------------------


def score_multiple_choice(prediction: str, choices: Sequence[str], label: int | None) -> bool:
    """Whether `prediction` picks option `label` (by letter or option text)."""
    if label is None:
        return False
    return extract_choice(prediction, choices) == int(label)


def score_generation(prediction: str, targets: str | Sequence[str]) -> bool:
    """Normalised exact match against any target (also on the first line alone), or equal numbers for numeric
    targets."""
    targets = [targets] if isinstance(targets, str) else [str(t) for t in targets]
    prediction = str(prediction)
    candidates = {normalize_answer(prediction)}
    if prediction.strip():
        candidates.add(normalize_answer(prediction.strip().splitlines()[0]))
    for target in targets:
        if normalize_answer(target) in candidates and normalize_answer(target) != "":
            return True
        value = _to_number(target)
        if value is not None:
            predicted = extract_number(prediction)
            if predicted is not None and _numbers_equal(predicted, value):
                return True
    return False


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


# --------------------------------------------------------------------------------------------------------------------
# TRL reward functions
# --------------------------------------------------------------------------------------------------------------------


def _column(kwargs: dict, name: str, n: int, fn_name: str) -> list:
    if name not in kwargs or kwargs[name] is None:
        raise ValueError(f"{fn_name} needs the dataset column {name!r} (got columns {sorted(kwargs)})")
    values = list(kwargs[name])
    if len(values) != n:
        raise ValueError(f"{fn_name}: column {name!r} has {len(values)} values for {n} completions")
    return values


def _reward(ok: bool, positive: float, negative: float) -> float:
    return float(positive if ok else negative)


def _targets_of(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def numeric_match_reward(
    completions: list, *, target: list | None = None, positive: float = 1.0, negative: float = -1.0, **kwargs
):
    """+1 when the completion's final number (`#### x`, else the last number; commas allowed) equals `target`."""
    targets = _column({"target": target}, "target", len(completions), "numeric_match_reward")
    out = []
    for completion, gold in zip(completions, targets):
        predicted = extract_number(completion_text(completion))
        values = [v for v in (_target_number(t) for t in _targets_of(gold)) if v is not None]
        out.append(
            _reward(predicted is not None and any(_numbers_equal(predicted, v) for v in values), positive, negative)
        )
    return out


def multiple_choice_reward(completions: list, *, positive: float = 1.0, negative: float = -1.0, **kwargs):
    """+1 when the completion picks the gold option, by letter or by text (columns `choices` and `label`)."""
    n = len(completions)
    choices = _column(kwargs, "choices", n, "multiple_choice_reward")
    labels = _column(kwargs, "label", n, "multiple_choice_reward")
    return [
        _reward(score_multiple_choice(completion_text(c), list(opts), lab), positive, negative)
        for c, opts, lab in zip(completions, choices, labels)
    ]


def exact_match_reward(
    completions: list, *, target: list | None = None, positive: float = 1.0, negative: float = -1.0, **kwargs
):
    """+1 on a normalised exact match with `target` (a string or a list of accepted strings), or equal numbers."""
    targets = _column({"target": target}, "target", len(completions), "exact_match_reward")
    return [
        _reward(score_generation(completion_text(c), _targets_of(t)), positive, negative)
        for c, t in zip(completions, targets)
    ]


def code_reward(
    completions: list,
    *,
    positive: float = 1.0,
    negative: float = -1.0,
    timeout: float = 5.0,
    memory_mb: int = 512,
    **kwargs,
):
    """+1 when the completion passes its HumanEval tests, judged by [`score_code`] (two sandboxes, see
    `docs/security.md`).

    Columns: `test`, `entry_point`, and optionally `code_prompt` (the function stub the completion continues; else
    TRL's `prompts` when they are plain strings).
    """
    n = len(completions)
    tests = _column(kwargs, "test", n, "code_reward")
    entry_points = _column(kwargs, "entry_point", n, "code_reward")
    prompts = kwargs.get("code_prompt") or kwargs.get("prompts") or [""] * n
    out = []
    for completion, test, entry, prompt in zip(completions, tests, entry_points, prompts):
        prompt = prompt if isinstance(prompt, str) else ""  # conversational prompts carry no code stub
        ok = score_code(
            completion_text(completion),
            test=test,
            entry_point=entry,
            prompt=prompt,
            timeout=timeout,
            memory_mb=memory_mb,
        )
        out.append(_reward(ok, positive, negative))
    return out


_BY_KIND: dict[str, RewardFunc] = {
    "numeric": numeric_match_reward,
    "multiple_choice": multiple_choice_reward,
    "generation": exact_match_reward,
    "exact_match": exact_match_reward,
    "code": code_reward,
}


def make_reward(kind: str, *, positive: float = 1.0, negative: float = -1.0, **options) -> RewardFunc:
    """A TRL reward function for a task kind.

    Args:
        kind (`str`): `"numeric"`, `"multiple_choice"`, `"generation"` (= `"exact_match"`) or `"code"`.
        positive (`float`, defaults to 1.0): Reward for a correct completion.
        negative (`float`, defaults to -1.0): Reward for a wrong one (`0.0` gives 0/1 rewards).
        options: Extra keyword arguments for the reward (e.g. `timeout`, `memory_mb` for code).

    Returns:
        A callable `fn(completions, **kwargs) -> list[float]` with a `__name__` TRL can log.
    """
    if kind not in _BY_KIND:
        raise ValueError(f"kind must be one of {sorted(_BY_KIND)}, got {kind!r}")
    base = _BY_KIND[kind]

    def reward(completions, **kwargs):
        return base(completions, positive=positive, negative=negative, **options, **kwargs)

    reward.__name__ = reward.__qualname__ = base.__name__ if negative == -1.0 else f"{base.__name__}_{negative:g}"
    reward.__doc__ = base.__doc__
    return reward


def checked_reward(fn: RewardFunc) -> RewardFunc:
    """Wrap a reward function so that a `None`, NaN or infinite reward raises a `ValueError` naming the function.

    Wrapping twice is a no-op: an already checked function is returned as is.
    """
    if getattr(fn, "_peft_spectral_checked", False):
        return fn
    name = getattr(fn, "__name__", repr(fn))

    @functools.wraps(fn)
    def wrapper(completions, **kwargs):
        rewards = fn(completions, **kwargs)
        if rewards is None:
            raise ValueError(f"reward function {name!r} returned None instead of a list of floats")
        rewards = list(rewards)
        if len(rewards) != len(completions):
            raise ValueError(
                f"reward function {name!r} returned {len(rewards)} rewards for {len(completions)} completions"
            )
        for i, value in enumerate(rewards):
            if value is None:
                raise ValueError(f"reward function {name!r} returned None for completion {i}")
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ValueError(
                    f"reward function {name!r} returned a non-number {value!r} for completion {i}"
                ) from None
            if not math.isfinite(number):
                raise ValueError(f"reward function {name!r} returned {number} for completion {i}")
        return [float(v) for v in rewards]

    wrapper._peft_spectral_checked = True
    return wrapper
