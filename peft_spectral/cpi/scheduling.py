"""The order in which the staged SFT trains the task groups (the seed's "dynamic scheduling")."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Optional

from .config import STAGE_ORDERS


__all__ = ["order_groups"]


def order_groups(
    groups: Sequence[Sequence[str]],
    strategy: str = "random",
    *,
    tasks: Sequence[str],
    seed: int = 0,
    difficulty: Optional[Mapping[str, float]] = None,
    jaccard: Optional[Sequence[Sequence[float]]] = None,
    core_sizes: Optional[Mapping[str, int]] = None,
    dependencies: Optional[Sequence[Sequence[str]]] = None,
) -> list[list[str]]:
    """Order the groups of a CPI-FT run for the staged SFT. Ties always keep the input order.

    * `"random"` (the paper's basic method): a shuffle with `random.Random(seed)`.
    * `"input"`: by the position of each group's first task in `tasks`.
    * `"difficulty"`: easiest first; a group's difficulty is the mean of its tasks' `difficulty` (the pipeline uses
      the last training loss logged by each task's probe: lower loss = easier).
    * `"dependency"`: a topological order of `dependencies`, `[before, after]` task pairs: the group of `before`
      trains before the group of `after` (pairs inside one group are ignored; a cycle is an error). Among groups
      whose prerequisites are done, the earliest in input order goes first.
    * `"core_overlap"`: the groups whose cores overlap least with the other groups first; a group's overlap is the
      mean Jaccard J(i, j) over its tasks i and the tasks j outside it (0 with a single group).
    * `"small_first"`: the smallest total core (sum of `core_sizes` of its tasks) first.

    Args:
        groups (`Sequence[Sequence[str]]`): The groups, as task names.
        strategy (`str`): One of `STAGE_ORDERS`.
        tasks (`Sequence[str]`): Every task name in input order (indexes `jaccard`).
        seed (`int`): Seed of `"random"`.
        difficulty (`Mapping[str, float]`, *optional*): Per task, for `"difficulty"`.
        jaccard (`Sequence[Sequence[float]]`, *optional*): T × T matrix over `tasks`, for `"core_overlap"`.
        core_sizes (`Mapping[str, int]`, *optional*): Per task, for `"small_first"`.
        dependencies (`Sequence[Sequence[str]]`, *optional*): `[before, after]` pairs, for `"dependency"`.

    Returns:
        `list[list[str]]`: The groups in training order.
    """
    if strategy not in STAGE_ORDERS:
        raise ValueError(f"`stage_order` must be one of {STAGE_ORDERS}, got {strategy!r}")
    position = {name: i for i, name in enumerate(tasks)}
    groups = sorted((list(g) for g in groups), key=lambda g: min(position[n] for n in g))
    if strategy == "input":
        return groups
    if strategy == "random":
        random.Random(seed).shuffle(groups)
        return groups
    if strategy == "dependency":
        return _topological(groups, dependencies or [], position)
    if strategy == "difficulty":
        key = _per_task_key(groups, difficulty, "difficulty", lambda vals: sum(vals) / len(vals))
    elif strategy == "small_first":
        key = _per_task_key(groups, core_sizes, "core_sizes", sum)
    else:
        key = _overlap_key(groups, jaccard, position)
    return [g for _, g in sorted(enumerate(groups), key=lambda item: (key[item[0]], item[0]))]


def _per_task_key(groups, values, what, reduce) -> list[float]:
    if values is None:
        raise ValueError(f"this stage order needs `{what}` per task")
    missing = sorted({n for g in groups for n in g} - set(values))
    if missing:
        raise ValueError(f"`{what}` has no value for tasks {missing}")
    return [reduce([float(values[n]) for n in g]) for g in groups]


def _overlap_key(groups, jaccard, position) -> list[float]:
    if jaccard is None:
        raise ValueError("stage_order='core_overlap' needs the Jaccard matrix of the cores")
    key = []
    for g in groups:
        inside = [position[n] for n in g]
        outside = [j for j in position.values() if j not in inside]
        pairs = [jaccard[i][j] for i in inside for j in outside]
        key.append(sum(pairs) / len(pairs) if pairs else 0.0)
    return key


def _topological(groups: list[list[str]], dependencies, position) -> list[list[str]]:
    group_of = {n: k for k, g in enumerate(groups) for n in g}
    after: dict[int, set[int]] = {k: set() for k in range(len(groups))}
    for before, later in dependencies:
        unknown = [n for n in (before, later) if n not in group_of]
        if unknown:
            raise ValueError(f"`stage_dependencies` names unknown tasks {unknown} (tasks: {list(position)})")
        if group_of[before] != group_of[later]:
            after[group_of[later]].add(group_of[before])
    done: list[int] = []
    while len(done) < len(groups):
        ready = [k for k in range(len(groups)) if k not in done and after[k] <= set(done)]
        if not ready:
            cycle = [groups[k] for k in range(len(groups)) if k not in done]
            raise ValueError(f"`stage_dependencies` form a cycle between the groups {cycle}")
        done.append(ready[0])
    return [groups[k] for k in done]
