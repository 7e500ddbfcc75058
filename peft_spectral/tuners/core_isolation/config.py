"""Configuration of CoreIsolation adapters (Core Parameter Isolation Fine-Tuning, CPI-FT, arXiv 2508.21741)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType


CoreScope = Literal["global", "per_tensor"]


def validate_core_fraction(p: float, name: str = "core_fraction") -> float:
    """Check that the core fraction `p` lies in the open interval (0, 1) and return it as a float."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < float(p) < 1.0:
        raise ValueError(f"`{name}` (p) must be in the open interval (0, 1), got {p!r}")
    return float(p)


def validate_similarity_threshold(tau: float, name: str = "similarity_threshold") -> float:
    """Check that the Jaccard threshold `tau` lies in [0, 1] and return it as a float."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= float(tau) <= 1.0:
        raise ValueError(f"`{name}` (tau) must be in the closed interval [0, 1], got {tau!r}")
    return float(tau)


@dataclass
class CoreIsolationConfig(PeftConfig):
    """Configuration of a [`CoreIsolationModel`]: a learned dense delta per targeted weight plus a freeze mask.

    The adapted weight is `W' = W + Δ`, where `Δ` (same shape and layout as `W`, initialised to zero, so the adapter
    is the base model at initialisation) is the trainable tensor. The boolean mask marks the *core* entries of `Δ`
    that are isolated (frozen): no gradient reaches them, and [`~peft_spectral.cpi.FreezeMaskCallback`] restores them
    after every optimizer step so that they stay bit-identical under AdamW, weight decay and momentum. Both `Δ` and
    the mask are saved with the adapter. `merge_and_unload()` returns a plain model with `W + Δ`.

    `core_fraction`, `similarity_threshold`, `core_scope`, `slerp_t` and `slerp_eps` are the CPI-FT hyper-parameters
    used by [`~peft_spectral.cpi.CPIPipeline`]; they are recorded in the adapter config for provenance.

    Args:
        target_modules (`list[str]` or `str`, *optional*):
            Module names (suffix match), a regex (full match), or `"all-linear"` (default: every linear layer except
            the output head). `nn.Linear` and transformers' `Conv1D` are supported.
        exclude_modules (`list[str]` or `str`, *optional*): Modules never adapted.
        layers_to_transform (`list[int]` or `int`, *optional*): Only adapt these layer indices.
        layers_pattern (`list[str]` or `str`, *optional*): Name of the layer list, used with `layers_to_transform`.
        core_fraction (`float`): The fraction p of parameters (by |Δ|) forming a task's core region, in (0, 1).
            Paper: 0.01.
        similarity_threshold (`float`): Jaccard threshold τ in [0, 1] above which (≥) two tasks are grouped.
            Paper: 0.1.
        core_scope (`str`): `"global"`: the top p over all targeted tensors together; `"per_tensor"`: the top p of
            each tensor.
        slerp_t (`float`, *optional*): SLERP interpolation weight used when fusing non-core parameters. `None`
            gives every task equal weight (t = 1/k at the k-th step of the iterative merge).
        slerp_eps (`float`): Threshold on `1 - |cos Ω|` below which SLERP falls back to linear interpolation.
        init_weights (`bool`): `True` (default): `Δ = 0`, the adapter is the base model at initialisation. `False`:
            `Δ` is drawn from a normal distribution with the standard deviation of the base weight (torch's global
            generator), a non-identity adapter, as `init_weights=False` does for PEFT's other methods (used to test
            merging, saving and loading).
        modules_to_save (`list[str]`, *optional*): Extra modules trained and saved in full.
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default="all-linear",
        metadata={
            "help": "Module names or a regex to adapt, or 'all-linear' (default: every linear layer but the head)."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex to exclude from adaptation."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Layer indices to adapt; all when None."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list, used with layers_to_transform."}
    )
    core_fraction: float = field(
        default=0.01, metadata={"help": "Fraction p in (0, 1) of parameters, by |delta|, that form a task's core."}
    )
    similarity_threshold: float = field(
        default=0.1, metadata={"help": "Jaccard threshold tau in [0, 1]; tasks with J >= tau are grouped."}
    )
    core_scope: CoreScope = field(
        default="global", metadata={"help": "'global' (top p over all targeted tensors) or 'per_tensor'."}
    )
    slerp_t: Optional[float] = field(
        default=None,
        metadata={"help": "SLERP weight for fusing non-core parameters; None weights all tasks equally (t = 1/k)."},
    )
    slerp_eps: float = field(
        default=1e-4, metadata={"help": "Below this 1 - |cos|, SLERP falls back to linear interpolation."}
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: zero delta (the base model at init). False: a random, non-identity delta."},
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules to train and save in full."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.CORE_ISOLATION
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            if self.layers_to_transform is not None:
                raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a regex str.")
            if self.layers_pattern is not None:
                raise ValueError("`layers_pattern` cannot be used when `target_modules` is a regex str.")
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"`init_weights` must be a bool, got {self.init_weights!r}")
        self.core_fraction = validate_core_fraction(self.core_fraction)
        self.similarity_threshold = validate_similarity_threshold(self.similarity_threshold)
        if self.core_scope not in ("global", "per_tensor"):
            raise ValueError(f"`core_scope` must be 'global' or 'per_tensor', got {self.core_scope!r}")
        if self.slerp_t is not None and not 0.0 <= float(self.slerp_t) <= 1.0:
            raise ValueError(f"`slerp_t` must be in [0, 1] or None, got {self.slerp_t!r}")
        if not self.slerp_eps >= 0:
            raise ValueError(f"`slerp_eps` must be >= 0, got {self.slerp_eps!r}")


__all__ = ["CoreIsolationConfig", "validate_core_fraction", "validate_similarity_threshold"]
