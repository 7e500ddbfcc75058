"""Task specs: one string names a task's source, the task and its parameters.

```text
rg:basic_arithmetic?min_digits=1&max_digits=2&operators=+,-     reasoning-gym generator with its config
humaneval                                                        HumanEval (164 problems)
jsonl:path/to/file.jsonl                                         the package's JSONL records
hf:owner/name:config:split?prompt=question&target=answer         datasets.load_dataset (Hub id or builder + files)
bigbench:navigate                                                BigBench JSON task (needs the archive)
rg:gcd?max_value=30;rg:lcm?max_value=30                          several specs: one task mixing them
```

Grammar: `source:name?key=value&key=value`. The source prefix is optional where a bare name is unambiguous (a
reasoning-gym generator, `humaneval`, a `.jsonl` path). Values are read as JSON when they parse (`2`, `0.5`, `true`,
`["+", "-"]`), as a list when they hold a comma (`+,-`), else as text; `%XX` escapes are decoded (`%3B` for `;`,
`%26` for `&`). Specs joined by `;` make one task whose examples come from each in turn.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote


__all__ = ["TaskSpec", "TaskSpecError", "format_value", "parse_task_spec", "parse_value", "split_task_specs"]

_PREFIX = re.compile(r"^([A-Za-z][A-Za-z0-9_\-]*):(?!//)")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class TaskSpecError(ValueError):
    """A task spec that cannot be loaded: unknown source or task, a bad parameter, a missing file. The message is one
    line naming the spec and what is wrong."""


def parse_value(text: str) -> Any:
    """A parameter value from its text: JSON when it parses, a list when it holds a comma, else the text."""
    text = unquote(text)
    try:
        return json.loads(text)
    except ValueError:
        pass
    if "," in text:
        return [parse_value(part) for part in text.split(",")]
    return text


def format_value(value: Any) -> str:
    """The text of a parameter value that [`parse_value`] reads back as `value`."""
    if isinstance(value, (list, tuple)):
        return ",".join(format_value(v) for v in value)
    if isinstance(value, str):
        try:
            json.loads(value)
            looks_like_json = True
        except ValueError:
            looks_like_json = False
        if looks_like_json or "," in value:
            return quote(json.dumps(value), safe="")
        return quote(value, safe="+-*/.^_ ")
    return json.dumps(value)


def _hashable(value: Any, spec: str, key: str) -> Any:
    """A parameter value made hashable (lists become tuples); objects are refused."""
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v, spec, key) for v in value)
    if isinstance(value, dict):
        raise TaskSpecError(f"task spec {spec!r}: parameter {key!r} must be a number, text, a boolean or a list")
    return value


@dataclass(frozen=True)
class TaskSpec:
    """A parsed task spec.

    Args:
        source (`str`): The source prefix (`"rg"`, `"jsonl"`, ...); `""` for a bare name not yet resolved.
        name (`str`): What the source loads: a generator, a path, `owner/name:config:split`, ...
        params (`tuple[tuple[str, Any], ...]`): The parameters, sorted by key.
    """

    source: str
    name: str
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def param_dict(self) -> dict[str, Any]:
        """The parameters as a dict."""
        return dict(self.params)

    def with_source(self, source: str) -> TaskSpec:
        """The same spec read by `source`."""
        return TaskSpec(source, self.name, self.params)

    def __str__(self) -> str:
        head = f"{self.source}:{self.name}" if self.source else self.name
        if not self.params:
            return head
        return head + "?" + "&".join(f"{k}={format_value(v)}" for k, v in self.params)


def split_task_specs(text: str) -> list[str]:
    """The specs of a `;`-joined spec string (one item for a single spec)."""
    parts = [p.strip() for p in str(text).split(";")]
    if not all(parts):
        raise TaskSpecError(f"task spec {text!r} has an empty part between ';'")
    return parts


def parse_task_spec(text: str) -> TaskSpec:
    """Parse one spec (no `;`) into a [`TaskSpec`]; the source stays `""` when there is no `prefix:`.

    Raises:
        [`TaskSpecError`]: on an empty spec, an empty name, or a malformed `key=value` parameter.
    """
    if not isinstance(text, str) or not text.strip():
        raise TaskSpecError(f"a task spec must be a non-empty string, got {text!r}")
    text = text.strip()
    if ";" in text:
        raise TaskSpecError(f"task spec {text!r} holds several specs (';'): use split_task_specs first")
    source = ""
    match = _PREFIX.match(text)
    if match:
        source, text = match.group(1).lower(), text[match.end() :]
    name, _, query = text.partition("?")
    name = unquote(name.strip())
    if not name and source != "humaneval":
        raise TaskSpecError(f"task spec {source + ':' if source else ''}{text!r} names no task")
    params: dict[str, Any] = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not _KEY.match(key):
            raise TaskSpecError(
                f"task spec {source + ':' if source else ''}{text!r}: parameter {item!r} is not key=value"
            )
        if key in params:
            raise TaskSpecError(f"task spec {source + ':' if source else ''}{text!r}: parameter {key!r} given twice")
        params[key] = _hashable(parse_value(value.strip()), f"{source + ':' if source else ''}{text}", key)
    return TaskSpec(source, name, tuple(sorted(params.items())))
