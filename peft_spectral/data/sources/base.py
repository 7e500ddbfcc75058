"""The interface of a task source and the registry of sources.

A source turns a [`~peft_spectral.data.spec.TaskSpec`] with its prefix into a [`~peft_spectral.data.types.Task`].
Adding one is a module with a [`TaskSource`] subclass and one [`register_source`] call (see `docs/data.md`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional

from ..spec import TaskSpec, TaskSpecError
from ..types import Task


__all__ = ["TaskSource", "get_source", "list_sources", "register_source"]


class TaskSource(ABC):
    """One kind of task data, chosen by the prefix of a task spec.

    Class attributes:
        prefix (`str`): The spec prefix (`"rg"` in `rg:gcd`).
        description (`str`): One line for `peft-spectral tasks`.
        example (`str`): An example spec.
    """

    prefix: str = ""
    description: str = ""
    example: str = ""

    @abstractmethod
    def load(self, spec: TaskSpec, *, seed: int, max_examples: Optional[int], fractions) -> Task:
        """The task of `spec` with deterministic splits seeded by `seed` (`max_examples` examples in all when given,
        cut by `fractions`).

        Raises:
            [`~peft_spectral.data.spec.TaskSpecError`]: for an unknown task, a bad parameter or a missing file.
        """

    def check(self, spec: TaskSpec) -> None:
        """Check `spec` quickly, without loading data or a model (unknown task, bad parameter, missing file), so a
        command can refuse it before any long work. The default accepts everything [`load`] may refuse later."""
        return

    def owns(self, name: str) -> bool:
        """Whether the bare name `name` (no prefix) is one of this source's tasks."""
        return False

    def list_tasks(self) -> list[str]:
        """The task names this source can list without downloading anything (may be empty)."""
        return []

    def available(self) -> tuple[bool, str]:
        """`(usable now, a short note)`: e.g. a source whose data must be provided by the user says how."""
        return True, ""

    def error(self, spec: TaskSpec, message: str) -> TaskSpecError:
        """A [`TaskSpecError`] naming `spec`."""
        return TaskSpecError(f"task spec {str(spec)!r}: {message}")


_SOURCES: dict[str, TaskSource] = {}


def register_source(source: TaskSource) -> TaskSource:
    """Make `source` available under its `prefix` (a later registration of the same prefix replaces it)."""
    if not isinstance(source, TaskSource):
        raise TypeError(f"source must be a TaskSource, got {type(source).__name__}")
    if not source.prefix or not source.prefix.replace("_", "").isalnum() or source.prefix != source.prefix.lower():
        raise ValueError(f"a source prefix must be lower-case letters, digits and '_', got {source.prefix!r}")
    _SOURCES[source.prefix] = source
    return source


def get_source(prefix: str) -> TaskSource:
    """The source registered under `prefix`, else a [`TaskSpecError`] listing the known ones."""
    try:
        return _SOURCES[prefix]
    except KeyError:
        raise TaskSpecError(f"unknown task source {prefix!r}; known sources: {', '.join(sorted(_SOURCES))}") from None


def list_sources() -> list[TaskSource]:
    """The registered sources, in registration order."""
    return list(_SOURCES.values())
