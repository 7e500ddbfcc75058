"""CoreIsolation layer: a dense, trainable delta per adapter plus a boolean freeze mask (the isolated core)."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .._linear import linear_features
from .._merge import restore_weight, write_merged_weight
from .config import CoreIsolationConfig


__all__ = ["CoreIsolationLayer", "CoreIsolationLinear"]


class CoreIsolationLayer(BaseTunerLayer):
    """Holds, per adapter, `core_isolation_delta` (trainable, weight-shaped, zero at init) and
    `core_isolation_mask` (a persistent bool buffer of the same shape; `True` = frozen core entry).

    The delta has the layout of the base weight (`(out, in)` for `nn.Linear`, `(in, out)` for `Conv1D`), so it and
    the mask line up entry by entry with the base model's parameter of the same name.
    """

    adapter_layer_names = ("core_isolation_delta",)
    other_param_names = ("core_isolation_mask",)

    def __init__(self, base_layer: nn.Module, module_name: str = "", **kwargs) -> None:
        self.base_layer = base_layer
        self.module_name = module_name
        self.core_isolation_delta = nn.ParameterDict({})
        self.core_isolation_mask = BufferDict({}, persistent=True)
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        # Exact unmerge: floating-point `(W + Δ) - Δ` is not always `W`, so the weight before the first merge is kept
        # (a buffer, so that `.to()` moves it along with the layer).
        self.register_buffer("core_isolation_weight_backup", None, persistent=False)
        self.kwargs = kwargs

        self.in_features, self.out_features, self.fan_in_fan_out = linear_features(
            self.get_base_layer(), "CoreIsolation", module_name
        )

    def update_layer(self, adapter_name: str, config: CoreIsolationConfig, inference_mode: bool = False, **kwargs):
        """Add adapter `adapter_name`: a delta and an all-`False` mask shaped like the base weight.

        The delta is zero (`config.init_weights=True`) or normal with the base weight's standard deviation
        (`False`, a non-identity adapter); it takes the base weight's dtype, as PEFT's adapters do.
        """
        weight = self.get_base_layer().weight
        delta = torch.zeros_like(weight, device=weight.device)
        if not config.init_weights:
            with torch.no_grad():
                scale = weight.float().std() if weight.numel() > 1 else weight.float().abs().mean()
                delta = (torch.randn(weight.shape) * scale.cpu().clamp_min(1e-3)).to(delta)
        self.core_isolation_delta[adapter_name] = nn.Parameter(delta)
        self.core_isolation_mask[adapter_name] = torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    # ---------------------------------------------------------------------------------------------------- masks
    @torch.no_grad()
    def set_core_mask(self, adapter_name: str, mask: torch.Tensor) -> None:
        """Replace the freeze mask of `adapter_name` (a bool tensor shaped like the base weight)."""
        if adapter_name not in self.core_isolation_mask:
            raise ValueError(f"adapter {adapter_name!r} not found in this layer")
        current = self.core_isolation_mask[adapter_name]
        if tuple(mask.shape) != tuple(current.shape):
            raise ValueError(f"mask has shape {tuple(mask.shape)}, the weight has {tuple(current.shape)}")
        self.core_isolation_mask[adapter_name] = mask.to(device=current.device, dtype=torch.bool).clone()

    def effective_delta(self, adapter_name: str) -> torch.Tensor:
        """The delta of `adapter_name` with gradients blocked on the frozen (masked) entries."""
        delta = self.core_isolation_delta[adapter_name]
        mask = self.core_isolation_mask[adapter_name] if adapter_name in self.core_isolation_mask else None  # noqa: SIM401 (BufferDict has no .get)
        if mask is None or not delta.requires_grad or not torch.is_grad_enabled():
            return delta
        return torch.where(mask, delta.detach(), delta)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The weight-shaped delta `Δ` of `adapter_name` (detached)."""
        if adapter_name not in self.core_isolation_delta:
            raise ValueError(f"Adapter {adapter_name} not found.")
        return self.core_isolation_delta[adapter_name].detach()


class CoreIsolationLinear(nn.Module, CoreIsolationLayer):
    """CoreIsolation wrapper around an `nn.Linear` (or transformers `Conv1D`): `y = x (W + Σ_active Δ)ᵀ + b`."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: CoreIsolationConfig, module_name: str = "", **kwargs
    ) -> None:
        super().__init__()
        CoreIsolationLayer.__init__(self, base_layer, module_name=module_name, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config=config, inference_mode=config.inference_mode)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the deltas of the active (or given) adapters into the base weight; [`unmerge`] restores it exactly.

        Args:
            safe_merge (`bool`): Check the merged weight for NaN/inf before writing it.
            adapter_names (`list[str]`, *optional*): Adapters to merge; the active ones when `None`.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.core_isolation_delta:
                continue

            def merged(weight: torch.Tensor, name: str = name) -> torch.Tensor:
                return weight + self.get_delta_weight(name).to(weight.dtype)

            params = [self.core_isolation_delta[name]]
            self.core_isolation_weight_backup = write_merged_weight(
                base, merged, self.core_isolation_weight_backup, params, safe_merge=safe_merge, adapter_name=name
            )
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Restore the base weight exactly as it was before the merges (bit for bit)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        restore_weight(self.get_base_layer(), self.core_isolation_weight_backup)
        self.core_isolation_weight_backup = None
        self.merged_adapters.clear()

    def _adapted_weight(self) -> torch.Tensor:
        weight = self.get_base_layer().weight
        for name in self.active_adapters:
            if name not in self.core_isolation_delta:
                continue
            weight = weight + self.effective_delta(name).to(weight.dtype)
        return weight

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        previous_dtype = x.dtype
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            result = self.base_layer(x, *args, **kwargs)
        elif self.merged or not any(n in self.core_isolation_delta for n in self.active_adapters):
            result = self.base_layer(x, *args, **kwargs)
        else:
            base = self.get_base_layer()
            weight = self._adapted_weight()
            if self.fan_in_fan_out:
                weight = weight.T
            x = self._cast_input_dtype(x, weight.dtype)
            result = F.linear(x, weight, base.bias)
        return result.to(previous_dtype)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False

    def __repr__(self) -> str:
        return "core_isolation." + super().__repr__()
