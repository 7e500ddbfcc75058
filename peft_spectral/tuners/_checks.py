"""Input checks shared by the three tuners: adapter names, base weights and adapter values."""

from __future__ import annotations

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


def check_adapter_name(adapter_name: object) -> str:
    r"""Refuse an adapter name that PEFT cannot hold: not a string, empty, containing `.` (module keys), or a path
    separator `/` or `\` (`save_pretrained` writes each non-default adapter to a folder of that name).

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


__all__ = ["check_adapter_name", "check_finite_adapter", "check_finite_weight"]
