"""What the three tuners share about the layers they wrap: `nn.Linear` and transformers' `Conv1D`.

This is the one place that knows that a `Conv1D` stores its weight as `(in, out)`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def is_conv1d(module: nn.Module) -> bool:
    """Whether `module` is a transformers `Conv1D` (GPT-2 style: weight stored `(in, out)`).

    Args:
        module (`nn.Module`): Any module.
    """
    return isinstance(module, Conv1D) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight of an `nn.Linear` or a transformers `Conv1D` in `(out, in)` orientation (a view, no copy).

    Args:
        module (`nn.Module`): The layer.

    Raises:
        `TypeError`: for any other layer type, naming the type.
    """
    if isinstance(module, nn.Linear):
        return module.weight
    if is_conv1d(module):
        return module.weight.T
    raise TypeError(
        f"expected torch.nn.Linear or transformers' Conv1D, got {type(module).__module__}.{type(module).__name__}"
    )


def linear_features(base: nn.Module, method: str, module_name: str = "") -> tuple[int, int, bool]:
    """`(in_features, out_features, fan_in_fan_out)` of an `nn.Linear` or a `Conv1D` (weight stored `(in, out)`).

    Args:
        base (`nn.Module`): The wrapped layer.
        method (`str`): The PEFT method's name, for the error message.
        module_name (`str`, *optional*): The module's name, for the error message.

    Raises:
        `TypeError`: for any other layer type, naming the type (and the module when given).
    """
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features, False
    if is_conv1d(base):
        # under DeepSpeed ZeRO-3 the local weight is an empty shard; `ds_shape` is the full one
        in_features, out_features = getattr(base.weight, "ds_shape", base.weight.shape)
        return in_features, out_features, True
    where = f" for module {module_name!r}" if module_name else ""
    raise TypeError(
        f"{method} supports torch.nn.Linear and transformers' Conv1D layers, got {type(base).__name__}{where}"
    )


__all__ = ["is_conv1d", "linear_features", "weight_matrix"]
