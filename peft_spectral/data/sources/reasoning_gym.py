"""`rg:` — reasoning-gym's procedural generators (PyPI `reasoning-gym`): unlimited, deterministic, offline questions
with verifiers, whose difficulty is set by the generator's config.

`rg:basic_arithmetic?min_digits=1&max_digits=2&operators=+,-` is the `basic_arithmetic` generator with those config
fields (`reasoning_gym.create_dataset(name, **config)`; any field of the generator's config class but `seed` and
`size`, which the loader sets). Each split comes from its own seed (derived from the task seed, the split and the
spec); a question already drawn for any split is skipped, so no question appears twice, within a split or across
splits. Draws go to the split filled least, so in a small question space (e.g. 1-digit sums) each split gets its
share of the distinct questions. Answers are scored by the generator's own
`score_answer` ([`ReasoningGymScorer`]), with partial credit where the generator gives it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from ..answers import Extraction, check_extraction, lenient_answers, strict_answer
from ..scoring import Scorer
from ..spec import TaskSpec
from ..splits import split_sizes
from ..types import Example, Task
from .base import TaskSource


__all__ = ["ANSWER_INSTRUCTION", "DEFAULT_SIZE", "ReasoningGymScorer", "ReasoningGymSource"]

logger = logging.getLogger(__name__)

#: Examples generated in all (before `fractions` cuts them) when `load_task` gets no `max_examples`.
DEFAULT_SIZE = 2000
#: Appended to every question that does not already ask for a final answer.
ANSWER_INSTRUCTION = "Give only the final answer."
#: Draws allowed per wanted example before a split is declared short (small question spaces).
_DRAWS_PER_EXAMPLE = 20
_RESERVED = ("seed", "size")


def _generators() -> dict[str, tuple[type, type]]:
    try:
        from reasoning_gym.factory import DATASETS
    except ImportError as err:  # pragma: no cover - reasoning-gym is a dependency
        raise ImportError("the rg: task source needs reasoning-gym: pip install 'reasoning-gym>=0.1.25'") from err
    return DATASETS


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


def _config_kwargs(generator: str, params: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    """The generator's config fields from the spec's parameters; a scalar given for a list field becomes a list."""
    _, config_cls = _generators()[generator]
    fields = {f.name: f for f in dataclasses.fields(config_cls)} if dataclasses.is_dataclass(config_cls) else {}
    out = {}
    for key, value in params:
        field = fields.get(key)
        default = field.default if field is not None else None
        if isinstance(default, (list, tuple)) and not isinstance(value, (list, tuple)):
            value = [value]
        out[key] = value
    return out


@functools.lru_cache(maxsize=256)
def _dataset(generator: str, params: tuple[tuple[str, Any], ...], seed: int = 0, size: int = 1):
    import reasoning_gym

    return reasoning_gym.create_dataset(generator, seed=seed, size=size, **_config_kwargs(generator, params))


@dataclass(frozen=True)
class ReasoningGymScorer(Scorer):
    """Scores with the generator's own verifier, `dataset.score_answer(answer, entry)`.

    Strict extraction passes the [`~peft_spectral.data.answers.strict_answer`]; lenient passes each of
    [`~peft_spectral.data.answers.lenient_answers`] and keeps the best score. The entry is `example.meta["entry"]`.

    Args:
        generator (`str`): The reasoning-gym generator (`"gcd"`).
        params (`tuple`): Its config parameters, as in the task spec (the verifier of some generators depends on them).
    """

    kind: ClassVar[str] = "generation"
    partial_credit: ClassVar[bool] = True
    generator: str = ""
    params: tuple[tuple[str, Any], ...] = ()

    def score(self, prediction: str, example: Example, extraction: Extraction = "lenient") -> float:
        entry = example.meta.get("entry")
        if not isinstance(entry, dict):
            raise ValueError(f"a reasoning-gym example needs meta['entry'] (the generator's dict); got {entry!r}")
        verify = _dataset(self.generator, self.params).score_answer
        answers = (
            [strict_answer(prediction)] if check_extraction(extraction) == "strict" else lenient_answers(prediction)
        )
        best = 0.0
        for answer in answers:
            try:
                value = float(verify(answer, entry))
            except Exception:  # a verifier that chokes on a malformed answer scores it 0
                value = 0.0
            if not math.isnan(value):
                best = max(best, min(1.0, value))
            if best >= 1.0:
                break
        return best

    def describe(self) -> str:
        return f"reasoning-gym's {self.generator} verifier"


def _description(generator: str) -> str:
    cls, _ = _generators()[generator]
    doc = (cls.__doc__ or "").strip().splitlines()
    text = doc[0].strip().rstrip(".") if doc else ""
    for prefix in ("Dataset that generates ", "Generates "):
        text = text.removeprefix(prefix)
    text = text[:1].upper() + text[1:] if text else generator.replace("_", " ").capitalize() + " questions"
    return text


def _split_seed(seed: int, split: str, spec: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\0{split}\0{spec}".encode()).digest()[:4], "little")


def _prompt(question: str) -> str:
    question = question.rstrip()
    return question if "final answer" in question.lower() else f"{question}\n\n{ANSWER_INSTRUCTION}"


def _example(entry: dict, scorer: ReasoningGymScorer) -> Example:
    meta: dict[str, Any] = {"entry": entry, "question": entry["question"], "generator": scorer.generator}
    solution = (entry.get("metadata") or {}).get("answer_cot")
    if isinstance(solution, str) and solution.strip():
        meta["solution"] = solution.strip()
    return Example(prompt=_prompt(entry["question"]), target=str(entry["answer"]), meta=meta, scorer=scorer)


class ReasoningGymSource(TaskSource):
    """`rg:<generator>?<config>` — reasoning-gym generators (see the module docstring)."""

    prefix = "rg"
    description = "reasoning-gym's procedural generators with verifiers (offline, unlimited, difficulty by config)"
    example = "rg:basic_arithmetic?min_digits=1&max_digits=2&operators=+,-"

    def list_tasks(self) -> list[str]:
        return sorted(_generators())

    def owns(self, name: str) -> bool:
        return name in _generators()

    def check(self, spec: TaskSpec) -> None:
        generators = _generators()
        if spec.name not in generators:
            close = difflib.get_close_matches(spec.name, list(generators), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see `peft-spectral tasks --source rg`"
            raise self.error(spec, f"unknown reasoning-gym generator {spec.name!r}{hint}")
        reserved = [k for k, _ in spec.params if k in _RESERVED]
        if reserved:
            raise self.error(spec, f"parameter(s) {reserved} are set by the loader (use load_task's seed= and sizes)")
        _, config_cls = generators[spec.name]
        names = [f.name for f in dataclasses.fields(config_cls)] if dataclasses.is_dataclass(config_cls) else []
        unknown = [k for k, _ in spec.params if names and k not in names]
        if unknown:
            fields = ", ".join(n for n in names if n not in _RESERVED)
            raise self.error(spec, f"unknown parameter(s) {unknown} of {spec.name}; its config fields: {fields}")
        try:
            _dataset(spec.name, spec.params)
        except Exception as err:
            raise self.error(spec, f"bad parameter for {spec.name}: {type(err).__name__}: {err}") from None

    def load(self, spec: TaskSpec, *, seed: int, max_examples: Optional[int], fractions) -> Task:
        self.check(spec)
        total = DEFAULT_SIZE if max_examples is None else int(max_examples)
        if total < 1:
            raise self.error(spec, f"max_examples must be >= 1, got {max_examples}")
        n_train, n_val, n_test = split_sizes(total, fractions)
        scorer = ReasoningGymScorer(spec.name, spec.params)
        wanted = {"train": n_train, "validation": n_val, "test": n_test}
        splits = self._draw(spec, scorer, seed, wanted)
        return Task(
            name=str(spec),
            kind="generation",
            train=splits["train"],
            validation=splits["validation"],
            test=splits["test"],
            description=_description(spec.name),
            spec=str(spec),
            params={"generator": spec.name, **spec.param_dict},
        )

    def _draw(self, spec, scorer, seed: int, wanted: dict[str, int]) -> dict[str, list[Example]]:
        """Each split from its own seeded stream; the next draw always goes to the split filled least (as a fraction
        of what it wants), and a question already taken by any split is skipped. In a question space smaller than
        what is wanted, every split thus gets its share of the distinct questions."""
        streams = {
            split: _dataset(spec.name, spec.params, _split_seed(seed, split, str(spec)), n * _DRAWS_PER_EXAMPLE)
            for split, n in wanted.items()
            if n > 0
        }
        out: dict[str, list[Example]] = {split: [] for split in wanted}
        drawn = dict.fromkeys(streams, 0)
        seen: set[str] = set()
        while True:
            open_splits = [s for s in streams if len(out[s]) < wanted[s] and drawn[s] < wanted[s] * _DRAWS_PER_EXAMPLE]
            if not open_splits:
                break
            split = min(open_splits, key=lambda s: len(out[s]) / wanted[s])
            entry = streams[split][drawn[split]]
            drawn[split] += 1
            question = str(entry["question"]).strip()
            if not str(entry.get("answer", "")).strip():  # a generator's degenerate entry (e.g. 0 in base 6 is "")
                continue
            if question not in seen:
                seen.add(question)
                out[split].append(_example(entry, scorer))
        short = {s: f"{len(out[s])}/{n}" for s, n in wanted.items() if len(out[s]) < n}
        if short:
            logger.warning(
                "%s: the generator's question space is small for these settings: %s distinct questions per split "
                "(no question is in two splits)",
                spec,
                short,
            )
        return out
