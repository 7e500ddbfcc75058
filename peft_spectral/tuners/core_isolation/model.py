"""CoreIsolation tuner: wraps the targeted linear layers of a model with [`CoreIsolationLayer`]s."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.integrations import gather_params_ctx
from torch import nn

from .._checks import check_finite_weight
from .._linear import is_conv1d
from .._tuner import SpectralTunerMixin
from .config import CoreIsolationConfig
from .layer import CoreIsolationLayer, CoreIsolationLinear


__all__ = ["CoreIsolationModel"]


class CoreIsolationModel(SpectralTunerMixin, BaseTuner):
    """Creates a CoreIsolation (CPI-FT) model from a pretrained transformers model.

    Every targeted weight `W` gets a trainable dense delta `Δ` (zero at init) and a boolean freeze mask; the
    adapted weight is `W + Δ`. The CPI-FT pipeline ([`~peft_spectral.cpi.CPIPipeline`]) fills `Δ` with the fused task
    deltas and the masks with earlier groups' core regions, then trains with those entries frozen.

    Example:

        ```py
        >>> import peft_spectral.tuners.core_isolation  # registers CORE_ISOLATION with PEFT
        >>> from peft import get_peft_model
        >>> from peft_spectral.tuners.core_isolation import CoreIsolationConfig
        >>> model = get_peft_model(base, CoreIsolationConfig(target_modules=["gate_proj", "up_proj", "down_proj"]))
        >>> model.save_pretrained("cpi-adapter")
        ```

    **Attributes**:
        - **model** ([`~transformers.PreTrainedModel`]) -- The adapted model.
        - **peft_config** ([`CoreIsolationConfig`]) -- The configuration(s), by adapter name.
    """

    prefix: str = "core_isolation_"
    tuner_layer_cls = CoreIsolationLayer
    target_module_mapping: dict = {}

    def _prepare_adapter_config(self, peft_config: CoreIsolationConfig, model_config: dict) -> CoreIsolationConfig:
        if peft_config.target_modules is None:
            peft_config.target_modules = "all-linear"
        return peft_config

    def _create_and_replace(
        self, config: CoreIsolationConfig, adapter_name, target, target_name, parent, current_key, **optional_kwargs
    ):
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        if isinstance(target, CoreIsolationLayer):
            with gather_params_ctx(target.get_base_layer().weight):  # ZeRO-3: the delta takes the full weight's shape
                target.update_layer(adapter_name, config=config, inference_mode=config.inference_mode)
            return
        new_module = self._create_new_module(config, adapter_name, target, current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(
        config: CoreIsolationConfig, adapter_name: str, target: nn.Module, module_name: str = ""
    ) -> CoreIsolationLinear:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, nn.Linear) or is_conv1d(base):
            # under DeepSpeed ZeRO-3 the weight is partitioned: gather it for the checks and the init
            with gather_params_ctx(base.weight):
                check_finite_weight(base, "CoreIsolation", module_name)
                return CoreIsolationLinear(target, adapter_name, config=config, module_name=module_name)
        raise TypeError(
            f"Target module {module_name or target!r} ({type(base).__name__}) is not supported: CoreIsolation adapts "
            "`torch.nn.Linear` and transformers `Conv1D` layers only."
        )

    # ------------------------------------------------------------------------------------------------ helpers
    def core_isolation_layers(self) -> dict[str, CoreIsolationLayer]:
        """The adapted layers by the name of their base weight in the unwrapped model (e.g.
        `"model.layers.0.mlp.up_proj.weight"`)."""
        out = {}
        for name, module in self.model.named_modules():
            if isinstance(module, CoreIsolationLayer):
                out[_base_param_name(name)] = module
        return out

    @torch.no_grad()
    def set_deltas(self, deltas: dict[str, torch.Tensor], adapter_name: str = "default", strict: bool = True) -> None:
        """Write weight-shaped deltas (keyed by base parameter name) into the adapter `adapter_name`."""
        layers = self.core_isolation_layers()
        missing = [k for k in layers if k not in deltas]
        unknown = [k for k in deltas if k not in layers]
        if strict and (missing or unknown):
            raise KeyError(f"set_deltas: missing {missing[:3]}... unknown {unknown[:3]}...")
        for key, value in deltas.items():
            if key in layers:
                layers[key].core_isolation_delta[adapter_name].data.copy_(value)

    @torch.no_grad()
    def set_core_masks(self, masks: dict[str, torch.Tensor], adapter_name: str = "default") -> None:
        """Set the freeze masks of `adapter_name`; layers not in `masks` get an all-`False` mask."""
        for key, layer in self.core_isolation_layers().items():
            mask = masks.get(key)
            if mask is None:
                mask = torch.zeros_like(layer.core_isolation_mask[adapter_name])
            layer.set_core_mask(adapter_name, mask)

    def get_deltas(self, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        """The deltas of `adapter_name` keyed by base parameter name (detached views, not copies)."""
        return {k: layer.get_delta_weight(adapter_name) for k, layer in self.core_isolation_layers().items()}


def _base_param_name(module_name: str) -> str:
    """`base_model.model.model.layers.0.mlp.up_proj` -> `model.layers.0.mlp.up_proj.weight`."""
    return module_name.removeprefix("base_model.model.") + ".weight"
