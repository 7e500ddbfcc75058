"""What the three tuners share about the layers they wrap: `nn.Linear` and transformers' `Conv1D`."""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D


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
    if isinstance(base, Conv1D):
        in_features, out_features = base.weight.shape
        return in_features, out_features, True
    where = f" for module {module_name!r}" if module_name else ""
    raise TypeError(
        f"{method} supports torch.nn.Linear and transformers' Conv1D layers, got {type(base).__name__}{where}"
    )
