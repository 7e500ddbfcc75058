"""`bigbench:` — BigBench JSON tasks, from a copy of the BigBench data the user provides (optional source).

PyPI no longer serves `bigbench==1.0.0` (the 358 MB source archive with 1041 `task.json` files; only a 0.0.1 stub
without tasks is left), so the package cannot fetch it. Point `$PEFT_SPECTRAL_BIGBENCH` (or
[`set_bigbench_path`]) at either

* the archive `bigbench-1.0.0.tar.gz`, or
* a directory holding the task folders: a checkout of https://github.com/google/BIG-bench (its
  `bigbench/benchmark_tasks/`), or the `benchmark_tasks` folder itself.

An archive left in the package cache by an earlier version (`<cache>/bigbench/bigbench-1.0.0.tar.gz`) is used too.
Only the `task.json` files of the tasks asked for are extracted from an archive (all of them take 1.7 GB).

Multiple-choice examples get their options shuffled (deterministically from the seed, the task name and the
example's index: BigBench often lists the gold option first) and lettered in the prompt.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tarfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Optional, Union

from ...paths import cache_subdir
from ..spec import TaskSpec
from ..splits import make_task
from ..types import Example, Task, TaskKind, multiple_choice_prompt
from .base import TaskSource


__all__ = [
    "BIGBENCH_ARCHIVE",
    "BIGBENCH_ENV",
    "BigBenchSource",
    "BigBenchUnavailableError",
    "bigbench_location",
    "bigbench_task_json",
    "bigbench_task_names",
    "load_bigbench_task",
    "parse_bigbench_examples",
    "set_bigbench_path",
]

logger = logging.getLogger(__name__)

BIGBENCH_ENV = "PEFT_SPECTRAL_BIGBENCH"
BIGBENCH_ARCHIVE = "bigbench-1.0.0.tar.gz"
_TASKS_PREFIX = "bigbench-1.0.0/bigbench/benchmark_tasks/"
#: Example-level prefixes shorter than this are formatting labels ("Q:", "Input:") and are dropped; longer ones are
#: instructions ("What is the answer to the following math word problem?:") and are kept.
_MIN_PREFIX_CHARS = 20
_LOCK = threading.Lock()
_PATH: Optional[Path] = None


class BigBenchUnavailableError(ValueError):
    """No copy of the BigBench data is configured (see the module docstring for how to provide one)."""


def set_bigbench_path(path: Union[str, os.PathLike, None]) -> None:
    """Use `path` (an archive or a directory of task folders) for `bigbench:` tasks; `None` goes back to
    `$PEFT_SPECTRAL_BIGBENCH` and the cache."""
    global _PATH
    _PATH = None if path is None else Path(path)


def _how_to_provide() -> str:
    return (
        f"BigBench is not bundled and PyPI no longer serves bigbench==1.0.0: set {BIGBENCH_ENV} to a copy of "
        f"{BIGBENCH_ARCHIVE} or to a BIG-bench checkout's bigbench/benchmark_tasks folder"
    )


def bigbench_location() -> Path:
    """The configured BigBench data: [`set_bigbench_path`], else `$PEFT_SPECTRAL_BIGBENCH`, else an archive in the
    package cache.

    Raises:
        [`BigBenchUnavailableError`]: when none is there.
    """
    configured = _PATH or (Path(os.environ[BIGBENCH_ENV]) if os.environ.get(BIGBENCH_ENV) else None)
    if configured is not None:
        if not configured.exists():
            raise BigBenchUnavailableError(f"{configured} (from {BIGBENCH_ENV}) does not exist. {_how_to_provide()}")
        return configured
    cached = cache_subdir("bigbench") / BIGBENCH_ARCHIVE
    if cached.is_file():
        return cached
    raise BigBenchUnavailableError(_how_to_provide())


def _tasks_root(folder: Path) -> Path:
    for candidate in (folder / "bigbench" / "benchmark_tasks", folder / "benchmark_tasks", folder):
        if candidate.is_dir() and any(candidate.glob("*/task.json")):
            return candidate
    raise BigBenchUnavailableError(f"{folder} holds no <task>/task.json files. {_how_to_provide()}")


def _task_name(member: str) -> Optional[str]:
    if not (member.startswith(_TASKS_PREFIX) and member.endswith("/task.json")):
        return None
    return member[len(_TASKS_PREFIX) : -len("/task.json")]


def _check_task_name(name: str) -> str:
    name = str(name).strip().strip("/")
    if not name or any(p in ("", ".", "..") for p in name.split("/")):
        raise ValueError(f"invalid BigBench task name {name!r}")
    return name


def _index_path(archive: Path) -> Path:
    return cache_subdir("bigbench") / f"index-{archive.stat().st_size}.json"


def bigbench_task_names() -> list[str]:
    """Names of all BigBench JSON tasks (`"arithmetic"`, `"arithmetic/1_digit_addition"`, ...), sorted.

    For an archive the names come from an index built once by listing it (about 30 s), extracting nothing.
    """
    location = bigbench_location()
    if location.is_dir():
        root = _tasks_root(location)
        return sorted(p.parent.relative_to(root).as_posix() for p in root.rglob("task.json"))
    index = _index_path(location)
    if index.exists():
        return json.loads(index.read_text())
    with tarfile.open(location, "r:gz") as archive:
        names = sorted({n for m in archive if m.isfile() and (n := _task_name(m.name)) is not None})
    tmp = index.with_name(f"{index.name}.partial-{os.getpid()}")
    tmp.write_text(json.dumps(names))
    os.replace(tmp, index)
    return names


def _extracted_path(name: str) -> Path:
    return cache_subdir("bigbench") / "tasks" / name / "task.json"


def _extract(names: Iterable[str], archive: Path) -> None:
    """Extract the task.json files of `names` and of their sub-tasks (one pass over the archive)."""
    known = set(bigbench_task_names())
    wanted = set(names)
    todo = {
        n for n in known if any(n == w or n.startswith(w + "/") for w in wanted) and not _extracted_path(n).exists()
    }
    if not todo:
        return
    logger.info("extracting %d BigBench task file(s) from %s", len(todo), archive)
    with _LOCK, tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            name = _task_name(member.name)
            if name not in todo or not member.isfile():
                continue
            handle = tar.extractfile(member)
            if handle is None:  # pragma: no cover - not a regular file
                continue
            target = _extracted_path(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f"task.json.partial-{os.getpid()}")
            with open(tmp, "wb") as out:
                shutil.copyfileobj(handle, out)
            os.replace(tmp, target)
            todo.discard(name)
            if not todo:
                break


def bigbench_task_json(name: str) -> dict:
    """The parsed `task.json` of a BigBench task, with its direct sub-tasks listed under the added key `"subtasks"`.

    Raises:
        `ValueError`: for an unknown task name ([`BigBenchUnavailableError`] when no BigBench copy is configured).
    """
    name = _check_task_name(name)
    names = bigbench_task_names()
    if name not in names:
        raise ValueError(f"unknown BigBench task {name!r}; see `peft-spectral tasks --source bigbench`")
    location = bigbench_location()
    if location.is_dir():
        path = _tasks_root(location) / name / "task.json"
    else:
        path = _extracted_path(name)
        if not path.exists():
            _extract([name], location)
    data = json.loads(path.read_text(encoding="utf-8"))
    data["subtasks"] = [n for n in names if n.startswith(name + "/") and "/" not in n[len(name) + 1 :]]
    return data


def _shuffled_options(scores: dict, rng: random.Random) -> tuple[tuple[str, ...], int]:
    items = [(str(k), float(v)) for k, v in scores.items()]
    if not items:
        raise ValueError("empty target_scores")
    rng.shuffle(items)
    best = max(v for _, v in items)
    return tuple(k for k, _ in items), next(i for i, (_, v) in enumerate(items) if v == best)


def _question(data: dict, example: dict) -> str:
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


def _kind(data: dict) -> TaskKind:
    examples = data.get("examples") or []
    if not examples:
        raise ValueError(f"BigBench task {data.get('name')!r} has no examples")
    all_scores = all(isinstance(e.get("target_scores"), dict) and e["target_scores"] for e in examples)
    has_target = any("target" in e for e in examples)
    if all_scores and (not has_target or data.get("preferred_score") == "multiple_choice_grade"):
        return "multiple_choice"
    return "generation"


def parse_bigbench_examples(
    data: dict, *, kind: Optional[TaskKind] = None, seed: int = 0, name: str = ""
) -> list[Example]:
    """Examples of one BigBench `task.json` (already parsed).

    Multiple-choice examples (`target_scores`) get their options shuffled and lettered in the prompt; `choices` are
    the option texts and `label` the highest-scored one. Generation examples keep the first `target` as `target` and
    all of them in `meta["targets"]`; when they also have `target_scores` (e.g. arithmetic), `choices`/`label` are
    filled too (not shown in the prompt).
    """
    kind = kind or _kind(data)
    out = []
    for i, ex in enumerate(data.get("examples") or []):
        question = _question(data, ex)
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
        if isinstance(targets, (list, tuple)):
            targets = [str(t) for t in targets]
        else:
            targets = [str(targets)] if targets is not None else []
        if not targets and choices:
            targets = [choices[label]]
        if not targets:
            raise ValueError(f"example {i} of BigBench task {name!r} has neither target nor target_scores")
        meta["targets"] = targets
        out.append(Example(question, targets[0], choices, label, meta))
    return out


def _sources(name: str) -> list[tuple[str, dict]]:
    """`(task name, task.json)` of `name` and, recursively, its sub-tasks that have examples."""
    data = bigbench_task_json(name)
    found = [(name, data)] if data.get("examples") else []
    for sub in data.get("subtasks", []):
        found += _sources(sub)
    return found


def load_bigbench_task(
    name: str, *, seed: int = 0, max_examples: Optional[int] = None, fractions=(0.6, 0.2, 0.2)
) -> Task:
    """A BigBench JSON task, e.g. `"epistemic_reasoning"`, `"arithmetic"` (all its sub-tasks pooled) or
    `"arithmetic/1_digit_addition"` (one sub-task)."""
    sources = _sources(name)
    if not sources:
        raise ValueError(f"BigBench task {name!r} has no examples (nor sub-tasks with examples)")
    kinds = {_kind(data) for _, data in sources}
    kind: TaskKind = "generation" if "generation" in kinds else "multiple_choice"
    examples = [ex for sub, data in sources for ex in parse_bigbench_examples(data, kind=kind, seed=seed, name=sub)]
    description = str(bigbench_task_json(name).get("description") or "").strip()
    return make_task(
        name,
        kind,
        examples,
        description=description,
        seed=seed,
        max_examples=max_examples,
        fractions=fractions,
        spec=f"bigbench:{name}",
    )


class BigBenchSource(TaskSource):
    """`bigbench:<task>[/<subtask>]` — BigBench JSON tasks from a user-provided copy (see the module docstring)."""

    prefix = "bigbench"
    description = f"BigBench JSON tasks (optional: needs a copy of the data, ${BIGBENCH_ENV})"
    example = "bigbench:navigate"

    def available(self) -> tuple[bool, str]:
        try:
            return True, str(bigbench_location())
        except BigBenchUnavailableError as err:
            return False, str(err)

    def owns(self, name: str) -> bool:
        if not self.available()[0]:
            return False
        try:
            return name.strip("/") in bigbench_task_names()
        except (ValueError, OSError, tarfile.TarError):
            return False

    def list_tasks(self) -> list[str]:
        return bigbench_task_names() if self.available()[0] else []

    def check(self, spec: TaskSpec) -> None:
        if spec.params:
            raise self.error(spec, f"BigBench tasks take no parameters, got {sorted(spec.param_dict)}")
        try:
            names = bigbench_task_names()
        except BigBenchUnavailableError as err:
            raise self.error(spec, str(err)) from None
        if _check_task_name(spec.name) not in names:
            raise self.error(spec, f"unknown BigBench task {spec.name!r}; see `peft-spectral tasks --source bigbench`")

    def load(self, spec: TaskSpec, *, seed: int, max_examples: Optional[int], fractions) -> Task:
        self.check(spec)
        return load_bigbench_task(spec.name, seed=seed, max_examples=max_examples, fractions=fractions)
