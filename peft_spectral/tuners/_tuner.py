"""What the three tuner models share on top of PEFT's `BaseTuner`."""

from __future__ import annotations

from typing import Any

from torch import nn

from ._checks import check_adapter_name


class SpectralTunerMixin:
    """Mixed in before `peft.tuners.tuners_utils.BaseTuner` by `SVFModel`, `CoreIsolationModel` and
    `SpectralCompressModel`.

    It refuses adapter names that PEFT cannot hold before anything is injected, so that `get_peft_model`,
    `PeftModel.add_adapter`, `PeftModel.load_adapter` and `PeftModel.from_pretrained` fail with a clear error and
    leave the model as it was (PEFT's `add_adapter` drops the config of an adapter whose injection failed).
    """

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """Check `adapter_name` (see [`~peft_spectral.tuners._checks.check_adapter_name`]), then inject as PEFT does.

        Args:
            model (`nn.Module`): The model to inject into.
            adapter_name (`str`): The new adapter's name.
        """
        check_adapter_name(adapter_name)
        super().inject_adapter(model, adapter_name, *args, **kwargs)


__all__ = ["SpectralTunerMixin"]
