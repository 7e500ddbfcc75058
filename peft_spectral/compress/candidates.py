"""What the searches choose from: [`Intervention`]s, the candidate grid, and the examples they are scored on."""

from __future__ import annotations

import fnmatch
import logging
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Optional

from torch import nn

from ..data import Example
from ..subspace import check_rho


logger = logging.getLogger(__name__)

__all__ = ["LASER_RHOS", "MATRIX_TYPES", "Intervention", "candidate_grid", "find_target_modules", "take_examples"]

#: The matrix types of a Llama-style decoder layer.
MATRIX_TYPES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: LASER's rank fractions.
LASER_RHOS: tuple[float, ...] = (0.9, 0.8, 0.6, 0.2, 0.1, 0.05, 0.01)

_LAYER_RE = re.compile(r"\.(\d+)\.")


def layer_of(module_name: str) -> Optional[int]:
    """The decoder layer index in a module name (the last purely numeric component), `None` if there is none."""
    found = _LAYER_RE.findall("." + module_name + ".")
    return int(found[-1]) if found else None


@dataclass(frozen=True)
class Intervention:
    """Replace the weight of `module` by its truncation to rank fraction `rho` with `clusters` row clusters.

    Args:
        module (`str`): Module name in the model (e.g. `"model.layers.3.mlp.down_proj"`).
        rho (`float`): Rank fraction in `(0, 1]`; the kept rank is `rank_for(rho, min(out, in))`.
        clusters (`int`, defaults to 1): Row clusters (1 = plain truncation, more = multi-subspace).
    """

    module: str
    rho: float
    clusters: int = 1

    def __post_init__(self):
        check_rho(self.rho)
        if not isinstance(self.clusters, int) or self.clusters < 1:
            raise ValueError(f"clusters must be a positive integer, got {self.clusters!r}")

    @property
    def layer(self) -> Optional[int]:
        """The decoder layer index parsed from the module name (`None` if there is none)."""
        return layer_of(self.module)

    @property
    def matrix(self) -> str:
        """The matrix type, i.e. the last component of the module name (e.g. `"down_proj"`)."""
        return self.module.rsplit(".", 1)[-1]

    @property
    def key(self) -> str:
        """A unique string for this intervention (used in state files and caches)."""
        return f"{self.module}|rho={self.rho:g}|c={self.clusters}"

    def __str__(self) -> str:
        c = f", {self.clusters} clusters" if self.clusters > 1 else ""
        return f"{self.module} @ rho={self.rho:g}{c}"


def is_linear(module: nn.Module) -> bool:
    """Whether `module` is an `nn.Linear` or a transformers `Conv1D`."""
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def find_target_modules(
    model: nn.Module, matrices: Iterable[str] = MATRIX_TYPES, layers: Optional[Iterable[int]] = None
) -> list[str]:
    """Names of the linear modules whose matrix type matches one of `matrices` (and whose layer is in `layers`).

    Args:
        model (`nn.Module`): The model (a plain transformers model, not a `PeftModel`).
        matrices (`Iterable[str]`): Matrix types or glob patterns matched against the last name component, or
            against the full module name (e.g. `"down_proj"`, `"*_proj"`, `"model.layers.3.mlp.*"`).
        layers (`Iterable[int]`, *optional*): Layer indices to keep (default: all).

    Raises:
        `ValueError`: if a pattern or a layer index matches nothing.
    """
    linear = [n for n, m in model.named_modules() if n and is_linear(m)]
    patterns = list(matrices)
    if not patterns:
        raise ValueError("no matrix patterns given")
    layer_set = None if layers is None else {int(i) for i in layers}
    chosen, used_patterns, used_layers = [], set(), set()
    for name in linear:
        last = name.rsplit(".", 1)[-1]
        hits = [p for p in patterns if fnmatch.fnmatchcase(last, p) or fnmatch.fnmatchcase(name, p)]
        if not hits:
            continue
        used_patterns.update(hits)  # the pattern exists, even if not in the asked layers
        layer = layer_of(name)
        if layer_set is not None and layer not in layer_set:
            continue
        if layer is not None:
            used_layers.add(layer)
        chosen.append(name)
    missing = [p for p in patterns if p not in used_patterns]
    if missing:
        types = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ValueError(f"candidate pattern(s) {missing} match no linear module; matrix types in this model: {types}")
    if layer_set is not None:
        missing_layers = sorted(layer_set - used_layers)
        if missing_layers:
            raise ValueError(f"layer(s) {missing_layers} have no module matching {patterns}")
    if not chosen:
        raise ValueError(f"no linear module matches {patterns} in layers {sorted(layer_set or [])}")
    return chosen


def candidate_grid(
    modules: Sequence[str], rhos: Sequence[float] = LASER_RHOS, clusters: int = 1
) -> list[Intervention]:
    """All `(module, rho)` pairs as [`Intervention`]s (module-major order).

    Args:
        modules (`Sequence[str]`): Module names (see [`find_target_modules`]).
        rhos (`Sequence[float]`, defaults to [`LASER_RHOS`]): Rank fractions.
        clusters (`int`, defaults to 1): Row clusters of every intervention.
    """
    if not rhos:
        raise ValueError("no rank fractions given")
    for rho in rhos:
        check_rho(rho)
    return [Intervention(m, float(rho), clusters) for m in modules for rho in rhos]


def take_examples(
    examples: Sequence[Example], n: Optional[int], what: str, *, strict: bool = False, note: str = ""
) -> list[Example]:
    """The first `n` examples; with fewer available, warn and use them all (or raise if `strict`).

    Args:
        examples (`Sequence[Example]`): The pool.
        n (`int`, *optional*): How many to take (`None` = all).
        what (`str`): What they are for, in messages (e.g. `"calibration (train)"`).
        strict (`bool`, defaults to `False`): Raise instead of warning when fewer than `n` exist.
        note (`str`, *optional*): Appended to the warning (e.g. why the number matters).

    Raises:
        `ValueError`: if there are no examples at all, or fewer than `n` and `strict` is set.
    """
    examples = list(examples)
    if not examples:
        raise ValueError(f"no {what} examples available")
    if n is None:
        return examples
    if n < 1:
        raise ValueError(f"the number of {what} examples must be >= 1, got {n}")
    if len(examples) < n:
        msg = f"asked for {n} {what} examples but only {len(examples)} exist"
        if strict:
            raise ValueError(msg)
        full = msg + f"; using all {len(examples)}" + (f" ({note})" if note else "")
        warnings.warn(full, stacklevel=2)
        logger.warning("%s", full)
        return examples
    return examples[:n]
