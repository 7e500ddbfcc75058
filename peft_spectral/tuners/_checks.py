"""Input checks shared by the three tuners: adapter names, base weights and adapter values, and the sketch of the base
weights an adapter records to recognise its base model."""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn


def check_finite_weight(base: nn.Module, method: str, module_name: str = "") -> None:
    """Refuse a base weight that holds NaN or inf: an adapter built on it would only spread them.

    Meta-device weights (not materialised yet, e.g. `low_cpu_mem_usage`) are not checked.

    Args:
        base (`nn.Module`): The wrapped layer.
        method (`str`): The PEFT method's name, for the error message.
        module_name (`str`, *optional*): The module's name, for the error message.

    Raises:
        `ValueError`: naming the module and the number of non-finite entries.
    """
    weight = base.weight
    if weight.device.type == "meta" or not weight.is_floating_point():
        return
    finite = torch.isfinite(weight)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(
            f"{method}: the base weight of module {module_name or type(base).__name__!r} has {bad} non-finite "
            f"(NaN or inf) value(s) of {weight.numel()}; fix or reload the base model before adding an adapter."
        )


#: Adapter names no adapter may take: `"__base__"` means "the base model" in the `adapter_names=[...]` of mixed-adapter
#: batches (PEFT's convention, see `peft_spectral.tuners.svf.mixed_batch`).
RESERVED_ADAPTER_NAMES = frozenset({"__base__"})


def check_adapter_name(adapter_name: object) -> str:
    r"""Refuse an adapter name that PEFT cannot hold or that would fail later: not a string, empty, containing `.`
    (module keys), a path separator `/` or `\` (`save_pretrained` writes each non-default adapter to a folder of that
    name), a control character such as NUL or a newline (no folder can have that name), or reserved (`"__base__"`, the
    base model in mixed-adapter batches).

    Args:
        adapter_name (`str`): The name to check.

    Returns:
        `str`: `adapter_name`.

    Raises:
        `ValueError`: naming the bad name and what is wrong with it.
    """
    if not isinstance(adapter_name, str):
        raise ValueError(f"adapter_name must be a string, got {type(adapter_name).__name__} {adapter_name!r}")
    problem = None
    if not adapter_name.strip():
        problem = "it is empty"
    elif "/" in adapter_name or "\\" in adapter_name:
        problem = "it contains a path separator (save_pretrained would write outside its folder)"
    elif "." in adapter_name:
        problem = "it contains '.', which PEFT cannot hold in a module key"
    elif not adapter_name.isprintable():
        problem = "it contains a control character (NUL, newline, ...), which no folder name can hold"
    elif adapter_name in RESERVED_ADAPTER_NAMES:
        problem = "it is reserved: mixed-adapter batches route '__base__' to the base model"
    if problem:
        raise ValueError(f"invalid adapter_name {adapter_name!r}: {problem}. Use letters, digits, '_' or '-'.")
    return adapter_name


def check_finite_adapter(values: torch.Tensor, method: str, adapter_name: str, module_name: str, what: str) -> None:
    """Refuse adapter values holding NaN or inf at forward time, instead of returning a NaN output.

    Args:
        values (`torch.Tensor`): The adapter's tensor (e.g. SVF's `z`).
        method (`str`): The PEFT method's name, for the error message.
        adapter_name (`str`): The adapter's name, for the error message.
        module_name (`str`): The module's name, for the error message.
        what (`str`): The tensor's name, for the error message.

    Raises:
        `ValueError`: naming the adapter, the module and the number of non-finite entries.
    """
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(
            f"{method} adapter {adapter_name!r} of module {module_name or '(unnamed)'!r} has {bad} non-finite (NaN or "
            f"inf) value(s) in {what} (of {values.numel()}); the adapter is broken (diverged training or a bad file)."
        )


#: Gaussian bilinear probes of a base-weight sketch ([`weights_sketch`]).
SKETCH_PROBES = 16
#: Estimated relative (Frobenius) difference of two sketched sets of weights above which they count as different:
#: a cast to bfloat16 moves weights by about 0.1%, another checkpoint of the same shapes by tens of percent.
SKETCH_TOLERANCE = 0.01
_SKETCH_BLOCK = 1 << 22  # float64 entries of a weight converted at a time


def _bilinear_probes(weight: torch.Tensor, name: str) -> tuple[float, torch.Tensor]:
    """`(‖W‖_F², [g_jᵀ W r_j for j < SKETCH_PROBES])` in float64, with `g`, `r` Gaussian seeded by `name`."""
    w = weight.detach()
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode("utf-8")))
    g = torch.randn(w.shape[0], SKETCH_PROBES, generator=gen, dtype=torch.float64)
    r = torch.randn(w.shape[1], SKETCH_PROBES, generator=gen, dtype=torch.float64)
    device = torch.device("cpu") if w.device.type == "mps" else w.device  # MPS has no float64
    g, r = g.to(device), r.to(device)
    rows = max(1, _SKETCH_BLOCK // max(1, w.shape[1]))
    square, probes = 0.0, torch.zeros(SKETCH_PROBES, dtype=torch.float64, device=device)
    for i in range(0, w.shape[0], rows):
        block = w[i : i + rows].to(device=device, dtype=torch.float64)
        square += float((block * block).sum())
        probes += (g[i : i + rows] * (block @ r)).sum(0)
    return square, probes.cpu()


def weights_sketch(weights: Iterable[tuple[str, torch.Tensor]]) -> dict[str, Any]:
    """A sketch of a set of named weights that survives dtype casts but not other values: their number, their joint
    Frobenius norm and [`SKETCH_PROBES`] sums of seeded Gaussian bilinear forms `Σ_l g_{l,j}ᵀ W_l r_{l,j}`.

    Each probe has mean 0 and variance `Σ_l ‖W_l‖_F²`, and the probes of two sets of weights differ by bilinear forms
    of their difference, so [`sketch_difference`] estimates `‖ΔW‖_F / ‖W‖_F` (to about ±20%). Computed in float64,
    one matrix-vector block product per weight.

    Args:
        weights (`Iterable[tuple[str, torch.Tensor]]`): `(module name, 2-D weight)` pairs, in any order; the name
            seeds the probes.

    Returns:
        `dict`: `{"modules": int, "norm": float, "probes": list[float]}`, JSON-ready (8 significant digits).
    """
    count, square, probes = 0, 0.0, torch.zeros(SKETCH_PROBES, dtype=torch.float64)
    for name, weight in weights:  # lazily: the caller may gather one weight at a time
        sq, pr = _bilinear_probes(weight, name)
        count, square, probes = count + 1, square + sq, probes + pr
    return {
        "modules": count,
        "norm": float(f"{math.sqrt(square):.8g}"),
        "probes": [float(f"{p:.8g}") for p in probes.tolist()],
    }


def check_sketch(sketch: Any, what: str) -> None:
    """Raise `ValueError` naming `what` unless `sketch` has the shape [`weights_sketch`] returns."""
    ok = (
        isinstance(sketch, Mapping)
        and set(sketch) == {"modules", "norm", "probes"}
        and isinstance(sketch["modules"], int)
        and sketch["modules"] >= 0
        and isinstance(sketch["norm"], (int, float))
        and math.isfinite(sketch["norm"])
        and sketch["norm"] >= 0
        and isinstance(sketch["probes"], list)
        and len(sketch["probes"]) == SKETCH_PROBES
        and all(isinstance(p, (int, float)) and math.isfinite(p) for p in sketch["probes"])
    )
    if not ok:
        raise ValueError(
            f"{what} must be None or {{'modules': int, 'norm': float, 'probes': [{SKETCH_PROBES} floats]}} "
            f"(written when the adapter is saved), got {sketch!r:.200}"
        )


def sketch_difference(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> float:
    """Estimated relative difference `‖W_current - W_recorded‖_F / ‖W_recorded‖_F` of two [`weights_sketch`]es of the
    same modules (`inf` when they cover a different number of modules).

    Args:
        recorded (`Mapping`): The sketch saved with the adapter.
        current (`Mapping`): The sketch of the model it is loaded onto.
    """
    if recorded["modules"] != current["modules"]:
        return math.inf
    norm = float(recorded["norm"])
    if norm == 0:
        return 0.0 if float(current["norm"]) == 0 else math.inf
    diffs = [float(a) - float(b) for a, b in zip(recorded["probes"], current["probes"])]
    estimate = math.sqrt(sum(d * d for d in diffs) / len(diffs)) / norm
    return max(estimate, abs(float(current["norm"]) - norm) / norm)


__all__ = [
    "RESERVED_ADAPTER_NAMES",
    "SKETCH_PROBES",
    "SKETCH_TOLERANCE",
    "check_adapter_name",
    "check_finite_adapter",
    "check_finite_weight",
    "check_sketch",
    "sketch_difference",
    "weights_sketch",
]
