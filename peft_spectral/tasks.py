"""Offline tasks: real data turned into prompts, reference answers and scorers.

The data classes here are the contract every pipeline (TRL training, Transformer² mixing, SpectralCompress,
CoreIsolation) codes against. Loaders for BigBench, HumanEval and user JSONL fill them.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


TaskKind = Literal["multiple_choice", "generation", "code"]


@dataclass(frozen=True)
class Example:
    """One labelled example.

    Args:
        prompt (`str`): The question as plain text, without any chat template (the evaluation code applies it).
        target (`str`): The gold answer text. For multiple choice, the gold option's text.
        choices (`tuple[str, ...]`): Option texts for multiple-choice examples; empty otherwise.
        label (`int`, *optional*): Index of the gold option in `choices`.
        meta (`dict`): Extra fields, e.g. HumanEval's `test` and `entry_point`.
    """

    prompt: str
    target: str
    choices: tuple[str, ...] = ()
    label: int | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class Task:
    """A task with deterministic train / validation / test splits.

    Args:
        name (`str`): The task name, e.g. BigBench's `"epistemic_reasoning"`.
        kind (`str`): `"multiple_choice"`, `"generation"` or `"code"`.
        train, validation, test (`list[Example]`): The splits.
        description (`str`): A one-line description (used by Transformer² dispatch prompts).
    """

    name: str
    kind: TaskKind
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    description: str = ""

    def split(self, name: str) -> list[Example]:
        """Return the split called `name` (`"train"`, `"validation"` or `"test"`)."""
        if name not in ("train", "validation", "test"):
            raise ValueError(f"split must be 'train', 'validation' or 'test', got {name!r}")
        return getattr(self, name)


# --------------------------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------------------------

#: The instruction closing every multiple-choice prompt (after the lettered options).
MC_INSTRUCTION = "Answer with the correct option."

HUMANEVAL_INSTRUCTION = (
    "Complete the following Python function. Answer with the whole function in a ```python code block."
)

#: Example-level prefixes shorter than this are formatting labels ("Q:", "Input:") and are dropped; longer ones are
#: instructions ("What is the answer to the following math word problem?:") and are kept.
_MIN_PREFIX_CHARS = 20


def format_options(choices: Sequence[str]) -> str:
    r"""`"A. first\\nB. second\\n..."` (at most 26 options)."""
    if len(choices) > 26:
        raise ValueError(f"at most 26 options can be lettered, got {len(choices)}")
    return "\n".join(f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(choices))


def multiple_choice_prompt(question: str, choices: Sequence[str], instruction: str = MC_INSTRUCTION) -> str:
    """The question, the lettered options and the instruction, separated by blank lines."""
    return f"{question.rstrip()}\n\nOptions:\n{format_options(choices)}\n\n{instruction}".rstrip()


def split_examples(
    examples: Sequence[Example], *, seed: int = 0, max_examples: int | None = None, fractions=(0.6, 0.2, 0.2)
) -> tuple[list[Example], list[Example], list[Example]]:
    """Shuffle `examples` with `random.Random(seed)`, keep the first `max_examples`, and cut train/validation/test.

    The split sizes are `round(fractions[0] * n)`, `round(fractions[1] * n)` and the rest, less the duplicates:
    a validation example whose [`example_content`] is already in train, and a test example whose content is in train or
    validation (or earlier in test), is dropped, so that no split leaks into a later one (BigBench has repeated
    questions, e.g. 14 in `sports_understanding`). Train itself is left as cut.
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1 or None, got {max_examples}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    if max_examples is not None:
        order = order[:max_examples]
    n = len(order)
    n_train = min(n, round(fractions[0] * n))
    n_val = min(n - n_train, round(fractions[1] * n))
    chosen = [examples[i] for i in order]
    train = chosen[:n_train]
    seen = {example_content(ex) for ex in train}
    validation = _drop_seen(chosen[n_train : n_train + n_val], seen)
    test = _drop_seen(chosen[n_train + n_val :], seen)
    return train, validation, test


def example_content(example: Example) -> str:
    """What makes two examples the same question: the BigBench input (`meta["question"]`, before its options were
    shuffled into the prompt) when known, else the prompt."""
    return str(example.meta.get("question", example.prompt)).strip()


def _drop_seen(examples: list[Example], seen: set[str]) -> list[Example]:
    kept = []
    for ex in examples:
        key = example_content(ex)
        if key not in seen:
            seen.add(key)
            kept.append(ex)
    return kept


def draw_shots(task: Task, n: int) -> list[Example]:
    """`n` labelled examples of `task` for few-shot adaptation (Transformer²'s CEM): the first `n` of its (shuffled)
    train split, so they never overlap its validation or test examples (see [`split_examples`])."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n > len(task.train):
        raise ValueError(f"task {task.name!r} has {len(task.train)} train examples, fewer than n={n} shots")
    return list(task.train[:n])


def _make_task(name, kind, examples, description, seed, max_examples, fractions) -> Task:
    if not examples:
        raise ValueError(f"task {name!r} has no examples")
    train, validation, test = split_examples(examples, seed=seed, max_examples=max_examples, fractions=fractions)
    return Task(name=name, kind=kind, train=train, validation=validation, test=test, description=description)


# BigBench ---------------------------------------------------------------------------------------------------------


def _shuffled_options(scores: dict, rng: random.Random) -> tuple[tuple[str, ...], int]:
    items = [(str(k), float(v)) for k, v in scores.items()]
    if not items:
        raise ValueError("empty target_scores")
    rng.shuffle(items)
    best = max(v for _, v in items)
    return tuple(k for k, _ in items), next(i for i, (_, v) in enumerate(items) if v == best)


def _bigbench_question(data: dict, example: dict) -> str:
    parts = []
    task_prefix = str(data.get("task_prefix") or "").strip()
    if task_prefix:
        parts.append(task_prefix)
    input_prefix = str(data.get("example_input_prefix") or "").strip()
    text = str(example.get("input", "")).strip()
    if len(input_prefix) >= _MIN_PREFIX_CHARS:
        text = f"{input_prefix} {text}"
    parts.append(text)
    return "\n\n".join(parts)


def _bigbench_kind(data: dict) -> TaskKind:
    examples = data.get("examples") or []
    if not examples:
        raise ValueError(f"BigBench task {data.get('name')!r} has no examples")
    all_scores = all(isinstance(e.get("target_scores"), dict) and e["target_scores"] for e in examples)
    has_target = any("target" in e for e in examples)
    if all_scores and (not has_target or data.get("preferred_score") == "multiple_choice_grade"):
        return "multiple_choice"
    return "generation"


def parse_bigbench_examples(
    data: dict, *, kind: TaskKind | None = None, seed: int = 0, name: str = ""
) -> list[Example]:
    """Examples of one BigBench `task.json` (already parsed).

    Multiple-choice examples (`target_scores`) get their options shuffled (deterministically from `seed`, `name` and
    the example's index, since BigBench often lists the gold option first) and lettered in the prompt; `choices` are
    the option texts and `label` the highest-scored one. Generation examples keep the first `target` as `target` and
    all of them in `meta["targets"]`; when they also have `target_scores` (e.g. arithmetic), `choices`/`label` are
    filled too (not shown in the prompt).
    """
    kind = kind or _bigbench_kind(data)
    out = []
    for i, ex in enumerate(data.get("examples") or []):
        question = _bigbench_question(data, ex)
        scores = ex.get("target_scores")
        choices, label = (), None
        if isinstance(scores, dict) and scores:
            choices, label = _shuffled_options(scores, random.Random(f"{seed}:{name}:{i}"))
        meta = {"source": name, "index": i, "question": question}
        if kind == "multiple_choice":
            if not choices:
                raise ValueError(f"example {i} of BigBench task {name!r} has no target_scores")
            out.append(Example(multiple_choice_prompt(question, choices), choices[label], choices, label, meta))
            continue
        targets = ex.get("target")
        targets = (
            [str(t) for t in targets]
            if isinstance(targets, (list, tuple))
            else [str(targets)]
            if targets is not None
            else []
        )
        if not targets and choices:
            targets = [choices[label]]
        if not targets:
            raise ValueError(f"example {i} of BigBench task {name!r} has neither target nor target_scores")
        meta["targets"] = targets
        out.append(Example(question, targets[0], choices, label, meta))
    return out


def _bigbench_sources(name: str) -> list[tuple[str, dict]]:
    """`(task name, task.json)` of `name` and, recursively, its sub-tasks that have examples."""
    from .assets import bigbench_task_json

    data = bigbench_task_json(name)
    found = [(name, data)] if data.get("examples") else []
    for sub in data.get("subtasks", []):
        found += _bigbench_sources(sub)
    return found


def load_bigbench_task(
    name: str, *, seed: int = 0, max_examples: int | None = None, fractions=(0.6, 0.2, 0.2)
) -> Task:
    """A BigBench JSON task, e.g. `"epistemic_reasoning"`, `"arithmetic"` (all its sub-tasks pooled) or
    `"arithmetic/1_digit_addition"` (one sub-task). See [`parse_bigbench_examples`] for the prompt format."""
    from .assets import bigbench_task_json

    sources = _bigbench_sources(name)
    if not sources:
        raise ValueError(f"BigBench task {name!r} has no examples (nor sub-tasks with examples)")
    kinds = {_bigbench_kind(data) for _, data in sources}
    kind: TaskKind = "generation" if "generation" in kinds else "multiple_choice"
    examples = [ex for sub, data in sources for ex in parse_bigbench_examples(data, kind=kind, seed=seed, name=sub)]
    description = str(bigbench_task_json(name).get("description") or "").strip()
    return _make_task(name, kind, examples, description, seed, max_examples, fractions)


# HumanEval --------------------------------------------------------------------------------------------------------


def humaneval_examples(problems: Sequence[dict] | None = None) -> list[Example]:
    """HumanEval problems as code examples.

    `prompt` is an instruction plus the function stub in a code block; `target` is the stub plus the canonical
    solution (a complete function, which passes its tests); `meta` holds `code_prompt` (the stub), `test`,
    `entry_point` and `task_id`.
    """
    if problems is None:
        from .assets import humaneval_problems

        problems = humaneval_problems()
    out = []
    for p in problems:
        stub = p["prompt"]
        prompt = f"{HUMANEVAL_INSTRUCTION}\n\n```python\n{stub.strip()}\n```"
        meta = {
            "code_prompt": stub,
            "test": p["test"],
            "entry_point": p["entry_point"],
            "task_id": p.get("task_id", ""),
        }
        out.append(Example(prompt=prompt, target=stub + p["canonical_solution"], meta=meta))
    return out


def load_humaneval(*, seed: int = 0, max_examples: int | None = None, fractions=(0.6, 0.2, 0.2)) -> Task:
    """HumanEval (164 problems, kind `"code"`), split like any other task."""
    return _make_task(
        "humaneval",
        "code",
        humaneval_examples(),
        "Write Python functions from their docstrings",
        seed,
        max_examples,
        fractions,
    )


# User data --------------------------------------------------------------------------------------------------------


def example_from_record(record: dict, index: int = 0) -> tuple[Example, TaskKind]:
    """An [`Example`] and its kind from a dict with `prompt` and either `target`, or `choices` + `label` (multiple
    choice; `target` defaults to the gold option), or `test` + `entry_point` (code). `target` may be a list of
    accepted answers. Other keys go to `meta`."""
    if not isinstance(record, dict):
        raise ValueError(f"record {index} must be a JSON object, got {type(record).__name__}")
    if not isinstance(record.get("prompt"), str):
        raise ValueError(f"record {index} needs a string 'prompt' (keys: {sorted(record)})")
    prompt = record["prompt"]
    meta = {k: v for k, v in record.items() if k not in ("prompt", "target", "choices", "label")}
    choices = record.get("choices")
    if choices is not None:
        if not isinstance(choices, (list, tuple)) or len(choices) < 2:
            raise ValueError(f"record {index}: 'choices' must be a list of at least two options")
        label = record.get("label")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
            raise ValueError(f"record {index}: 'label' must be an index into 'choices', got {label!r}")
        choices = tuple(str(c) for c in choices)
        if not re.search(r"(?m)^\s*\(?A[.):]\s", prompt):
            prompt = multiple_choice_prompt(prompt, choices)
        return Example(prompt, choices[label], choices, label, meta), "multiple_choice"
    target = record.get("target")
    if isinstance(target, (list, tuple)):
        if not target:
            raise ValueError(f"record {index}: 'target' is an empty list")
        meta["targets"] = [str(t) for t in target]
        target = target[0]
    if "test" in record and "entry_point" in record:
        meta.setdefault("code_prompt", prompt)
        return Example(prompt, "" if target is None else str(target), (), None, meta), "code"
    if target is None:
        raise ValueError(f"record {index} needs 'target', or 'choices' and 'label' (keys: {sorted(record)})")
    return Example(prompt, str(target), (), None, meta), "generation"


def task_from_records(
    records: Iterable[dict],
    *,
    name: str,
    kind: TaskKind | None = None,
    description: str = "",
    seed: int = 0,
    max_examples: int | None = None,
    fractions=(0.6, 0.2, 0.2),
) -> Task:
    """A [`Task`] from dict records (see [`example_from_record`]); `kind` is inferred when all records agree."""
    parsed = [example_from_record(r, i) for i, r in enumerate(records)]
    if not parsed:
        raise ValueError(f"task {name!r} has no records")
    kinds = {k for _, k in parsed}
    if kind is None:
        if len(kinds) > 1:
            raise ValueError(f"task {name!r} mixes record kinds {sorted(kinds)}; pass kind=")
        kind = kinds.pop()
    elif kind not in ("multiple_choice", "generation", "code"):
        raise ValueError(f"kind must be 'multiple_choice', 'generation' or 'code', got {kind!r}")
    return _make_task(name, kind, [e for e, _ in parsed], description, seed, max_examples, fractions)


def load_jsonl_task(
    path: str | os.PathLike,
    *,
    name: str | None = None,
    kind: TaskKind | None = None,
    description: str = "",
    seed: int = 0,
    max_examples: int | None = None,
    fractions=(0.6, 0.2, 0.2),
) -> Task:
    """A task from a JSONL file: one object per line, `{"prompt", "target"}` (generation),
    `{"prompt", "choices", "label"}` (multiple choice) or `{"prompt", "test", "entry_point"}` (code).

    Args:
        name (`str`, *optional*): Task name; defaults to the file's stem.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL task file not found: {path}")
    records = []
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({err})") from err
    return task_from_records(
        records,
        name=name or path.stem,
        kind=kind,
        description=description,
        seed=seed,
        max_examples=max_examples,
        fractions=fractions,
    )


def task_from_dataset(
    dataset,
    *,
    name: str,
    kind: TaskKind | None = None,
    description: str = "",
    seed: int = 0,
    max_examples: int | None = None,
    fractions=(0.6, 0.2, 0.2),
) -> Task:
    """A task from a `datasets.Dataset` (or any iterable of dicts) with the same columns as [`load_jsonl_task`]."""
    return task_from_records(
        (dict(row) for row in dataset),
        name=name,
        kind=kind,
        description=description,
        seed=seed,
        max_examples=max_examples,
        fractions=fractions,
    )


# Entry points -----------------------------------------------------------------------------------------------------


def list_tasks() -> list[str]:
    """Names [`load_task`] accepts: `"humaneval"` and every BigBench JSON task (`"arithmetic"`,
    `"arithmetic/1_digit_addition"`, ...), from the archive's index (nothing is extracted)."""
    from .assets import bigbench_task_names

    return ["humaneval", *bigbench_task_names()]


def load_task(name: str, *, seed: int = 0, max_examples: int | None = None, fractions=(0.6, 0.2, 0.2)) -> Task:
    """Load a task by name with deterministic, seeded train/validation/test splits.

    Args:
        name (`str`): `"humaneval"`, a BigBench JSON task (`"epistemic_reasoning"`, `"arithmetic"`,
            `"arithmetic/1_digit_addition"`, ...; see [`list_tasks`]), or a path to a `.jsonl` file.
        seed (`int`, defaults to 0): Seed of the shuffle before splitting (and of BigBench option order).
        max_examples (`int`, *optional*): Keep only this many examples (after shuffling) before splitting.
        fractions (`tuple[float, float, float]`, defaults to `(0.6, 0.2, 0.2)`): Train/validation/test fractions.

    Returns:
        [`Task`]
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a non-empty task name, got {name!r}")
    kwargs = {"seed": seed, "max_examples": max_examples, "fractions": fractions}
    if name.strip().lower() in ("humaneval", "human_eval", "human-eval"):
        return load_humaneval(**kwargs)
    if name.endswith(".jsonl") or Path(name).is_file():
        return load_jsonl_task(name, **kwargs)
    return load_bigbench_task(name, **kwargs)
