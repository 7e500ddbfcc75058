"""Freezing core entries bit-identically during SFT, and the tensors CPI-FT tracks (adapter deltas or parameters)."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from transformers import TrainerCallback


if TYPE_CHECKING:
    from .config import CPIConfig


__all__ = ["FreezeMaskCallback", "TrackedParameters"]


class FreezeMaskCallback(TrainerCallback):
    """Keeps the masked entries of some parameters bit-identical through a `transformers.Trainer` run.

    The values under each mask are copied when the callback is built and written back after every optimizer step
    (`on_optimizer_step`), at the end of every step and at the end of training. This undoes every change the optimizer
    makes there — gradient, momentum and decoupled weight decay alike — so it holds for any optimizer. Gradients to
    those entries should also be zeroed (the CoreIsolation layer does this; [`CPIPipeline`] registers hooks in
    `"full"` mode) so that they do not enter the gradient-norm clipping.

    Args:
        frozen (`Iterable[tuple[torch.nn.Parameter, torch.Tensor]]`): `(parameter, bool mask)` pairs.
    """

    def __init__(self, frozen: Iterable[tuple[torch.Tensor, torch.Tensor]]):
        self.frozen = []
        for param, mask in frozen:
            mask = mask.to(device=param.device, dtype=torch.bool)
            if tuple(mask.shape) != tuple(param.shape):
                raise ValueError(f"mask shape {tuple(mask.shape)} does not match parameter {tuple(param.shape)}")
            if mask.any():
                self.frozen.append((param, mask, param.detach()[mask].clone()))

    @torch.no_grad()
    def restore(self) -> None:
        """Write the saved values back under the masks."""
        for param, mask, values in self.frozen:
            param.data[mask] = values

    def is_intact(self) -> bool:
        """Whether every frozen entry still equals its saved value bit for bit."""
        return all(torch.equal(p.detach()[m], v) for p, m, v in self.frozen)

    @property
    def num_frozen(self) -> int:
        """How many entries are frozen."""
        return sum(int(m.sum()) for _, m, _ in self.frozen)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.restore()

    def on_step_end(self, args, state, control, **kwargs):
        self.restore()

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()


class TrackedParameters:
    """The tensors CPI-FT trains and tracks, behind one interface: the deltas of a CoreIsolation adapter
    (`train_params="adapter"`) or the model's own parameters (`"full"`, θ0 kept as a copy).

    Args:
        model (`torch.nn.Module`): The base model; in `"adapter"` mode it is wrapped with `config.adapter`.
        config ([`CPIConfig`]): The run's config (`train_params`, `adapter`).
    """

    def __init__(self, model: torch.nn.Module, config: CPIConfig):
        self.mode = config.train_params
        self._hooks: list = []
        if self.mode == "adapter":
            from peft import get_peft_model

            self.model = get_peft_model(model, copy.deepcopy(config.adapter))
            self.layers = self.model.base_model.core_isolation_layers()
            self.tensors = {k: layer.core_isolation_delta["default"] for k, layer in self.layers.items()}
            self.theta0 = None
        else:
            self.model = model
            for p in model.parameters():
                p.requires_grad_(True)
            self.tensors = dict(model.named_parameters())
            self.theta0 = {k: p.detach().clone() for k, p in self.tensors.items()}
        if not self.tensors:
            raise ValueError(f"no tensors to train: target_modules={config.adapter.target_modules!r} matched nothing")

    @property
    def names(self) -> list[str]:
        """The tracked tensors' names (base parameter names)."""
        return list(self.tensors)

    def base(self, name: str) -> torch.Tensor:
        """θ0 of a tracked tensor (the base layer's weight in `"adapter"` mode)."""
        if self.theta0 is not None:
            return self.theta0[name]
        return self.layers[name].get_base_layer().weight.detach()

    def delta(self, name: str) -> torch.Tensor:
        """Δ of one tracked tensor (a copy)."""
        p = self.tensors[name].detach()
        return p.clone() if self.theta0 is None else p - self.theta0[name]

    def deltas(self) -> dict[str, torch.Tensor]:
        """Δ of every tracked tensor (copies)."""
        return {k: self.delta(k).contiguous() for k in self.tensors}

    @torch.no_grad()
    def set_deltas(self, deltas: dict[str, torch.Tensor]) -> None:
        """Set every tracked tensor to θ0 + Δ."""
        for k, p in self.tensors.items():
            d = deltas[k].to(p.dtype)
            p.data.copy_(d if self.theta0 is None else self.theta0[k] + d)

    @torch.no_grad()
    def reset(self) -> None:
        """Back to θ0 (Δ = 0)."""
        for k, p in self.tensors.items():
            if self.theta0 is None:
                p.data.zero_()
            else:
                p.data.copy_(self.theta0[k])

    def set_frozen(self, masks: dict[str, torch.Tensor]) -> FreezeMaskCallback:
        """Freeze the masked entries (blocking their gradients) and return the callback that keeps them intact."""
        self.clear_frozen()
        if self.mode == "adapter":
            self.model.base_model.set_core_masks(masks)
        else:
            for k, mask in masks.items():
                if mask.any():
                    m = mask.to(self.tensors[k].device)
                    self._hooks.append(self.tensors[k].register_hook(lambda g, m=m: g.masked_fill(m, 0)))
        return FreezeMaskCallback((self.tensors[k], m) for k, m in masks.items())

    def clear_frozen(self) -> None:
        """Unfreeze everything (remove the gradient hooks or the adapter masks)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self.mode == "adapter":
            self.model.base_model.set_core_masks({})
