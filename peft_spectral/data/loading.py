"""Loading a task from its spec: resolving the source, checking the spec early, and mixing several specs."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Optional, Union

from .sources import get_source, list_sources
from .spec import TaskSpec, TaskSpecError, parse_task_spec, split_task_specs
from .splits import check_fractions
from .types import SPLITS, Example, Task


__all__ = ["DEFAULT_TASK", "check_task_spec", "list_tasks", "load_task", "resolve_task_spec"]

#: The task the package's examples and the demo fall back to: 1-2 digit addition and subtraction (reasoning-gym).
DEFAULT_TASK = (
    "rg:basic_arithmetic?allow_negation=false&allow_parentheses=false&max_digits=2&max_terms=2&operators=+,-"
)

SpecLike = Union[str, TaskSpec, Sequence[Union[str, TaskSpec]]]


def _resolve_one(spec: Union[str, TaskSpec]) -> TaskSpec:
    if not isinstance(spec, TaskSpec):
        spec = parse_task_spec(spec)
    if spec.source:
        get_source(spec.source)  # unknown prefix -> TaskSpecError
        return spec
    owners = [s for s in list_sources() if s.owns(spec.name)]
    if len(owners) == 1:
        return spec.with_source(owners[0].prefix)
    if len(owners) > 1:
        options = " or ".join(f"{s.prefix}:{spec.name}" for s in owners)
        raise TaskSpecError(f"task name {spec.name!r} is ambiguous: write {options}")
    notes = []
    for source in list_sources():
        usable, note = source.available()
        if not usable and note:
            notes.append(f"{source.prefix}: {note}")
    hint = f" ({'; '.join(notes)})" if notes else ""
    prefixes = ", ".join(s.prefix for s in list_sources())
    raise TaskSpecError(
        f"unknown task {spec.name!r}: no source has a task of that name; write <source>:<name> with a source among "
        f"{prefixes} (`peft-spectral tasks` lists them){hint}"
    )


def resolve_task_spec(spec: SpecLike) -> list[TaskSpec]:
    """The specs of `spec` (a string, possibly `;`-joined, a [`TaskSpec`], or a list of them) with their sources
    resolved (a bare name gets the one source that has it).

    Raises:
        [`TaskSpecError`]: for an unknown source, an unknown or ambiguous bare name, or a malformed spec.
    """
    if isinstance(spec, TaskSpec):
        items: list[Union[str, TaskSpec]] = [spec]
    elif isinstance(spec, str):
        items = list(split_task_specs(spec))
    elif isinstance(spec, Sequence) and spec:
        items = [p for item in spec for p in ([item] if isinstance(item, TaskSpec) else split_task_specs(item))]
    else:
        raise TaskSpecError(f"a task spec must be a string, a TaskSpec or a non-empty list of them, got {spec!r}")
    return [_resolve_one(item) for item in items]


def check_task_spec(spec: SpecLike) -> list[TaskSpec]:
    """Resolve `spec` and let each source check it without loading its data (unknown generator, bad parameter,
    missing file), so that a command can refuse a bad spec in one line before loading a model.

    Returns:
        `list[TaskSpec]`: the resolved specs.

    Raises:
        [`TaskSpecError`]: naming the spec and what is wrong.
    """
    resolved = resolve_task_spec(spec)
    for item in resolved:
        get_source(item.source).check(item)
    return resolved


def _interleave(parts: list[list[Example]]) -> list[Example]:
    """Round-robin over the parts, so that any prefix of the result is balanced between them."""
    return [ex for group in itertools.zip_longest(*parts) for ex in group if ex is not None]


def _mixture(tasks: list[Task], specs: list[TaskSpec]) -> Task:
    kinds = {t.kind for t in tasks}
    if len(kinds) > 1:
        raise TaskSpecError(f"a task mixture must have one kind; {'; '.join(map(str, specs))} mixes {sorted(kinds)}")
    descriptions = list(dict.fromkeys(t.description for t in tasks if t.description))
    name = ";".join(t.spec or t.name for t in tasks)
    splits = {s: _interleave([t.split(s) for t in tasks]) for s in SPLITS}
    return Task(
        name=name,
        kind=tasks[0].kind,
        description="; ".join(descriptions),
        spec=name,
        params={"mixture": [{"spec": t.spec or t.name, "params": t.params} for t in tasks]},
        **splits,
    )


def load_task(spec: SpecLike, *, seed: int = 0, max_examples: Optional[int] = None, fractions=(0.6, 0.2, 0.2)) -> Task:
    """Load a task from its spec, with deterministic train / validation / test splits.

    Args:
        spec (`str`, [`TaskSpec`] or a list of them): e.g. `"rg:gcd?max_value=30"`, `"humaneval"`,
            `"jsonl:data.jsonl"`, `"hf:json?data_files=data.jsonl"`, `"bigbench:navigate"` (see
            [`peft_spectral.data.spec`]). Several specs (`;`-joined or a list) make one task: each split
            interleaves theirs round-robin.
        seed (`int`, defaults to 0): Seed of the splits (and of a generator's draws).
        max_examples (`int`, *optional*): Examples in all before the splits are cut (a finite source keeps the
            first after shuffling; a generator draws this many, 2000 when not given); shared equally by the specs
            of a mixture.
        fractions (`tuple[float, float, float]`, defaults to `(0.6, 0.2, 0.2)`): Train / validation / test shares.

    Returns:
        [`Task`]: a single spec's task is named by its canonical spec for a generator (`rg:gcd?max_value=30`), by
        the task's own name otherwise; a mixture by its `;`-joined specs.

    Raises:
        [`TaskSpecError`]: for a bad spec (unknown source, task or parameter, missing file), in one line.
    """
    check_fractions(fractions)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if max_examples is not None and (isinstance(max_examples, bool) or max_examples < 1):
        raise ValueError(f"max_examples must be >= 1 or None, got {max_examples!r}")
    specs = check_task_spec(spec)
    share = None if max_examples is None else max(1, max_examples // len(specs))
    tasks = [get_source(item.source).load(item, seed=seed, max_examples=share, fractions=fractions) for item in specs]
    return tasks[0] if len(tasks) == 1 else _mixture(tasks, specs)


def list_tasks(source: Optional[str] = None) -> list[str]:
    """The task specs the sources can list (`rg:<generator>`, `humaneval`, `bigbench:<task>` when BigBench is
    configured); `source` keeps one source's. Files (`jsonl:`) and `hf:` datasets are named by the user."""
    out = []
    for item in list_sources():
        if source is not None and item.prefix != source:
            continue
        for name in item.list_tasks():
            out.append(name if name == item.prefix else f"{item.prefix}:{name}")
    if source is not None and not any(s.prefix == source for s in list_sources()):
        get_source(source)  # raises with the known prefixes
    return out
