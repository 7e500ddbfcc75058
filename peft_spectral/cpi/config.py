"""[`CPIConfig`]: the hyper-parameters of a CPI-FT run; the adapter part is a [`CoreIsolationConfig`]."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from peft.config import PeftConfig

from ..tuners.core_isolation import CoreIsolationConfig


__all__ = ["FUSION_MODES", "STAGE_ORDERS", "CPIConfig", "adapter_config_dict"]

#: Orders of the staged-SFT groups (see [`~peft_spectral.cpi.order_groups`]).
STAGE_ORDERS: tuple[str, ...] = ("random", "input", "difficulty", "dependency", "core_overlap", "small_first")
#: What SLERP merges outside the cores (see [`~peft_spectral.cpi.fuse_deltas`]).
FUSION_MODES: tuple[str, ...] = ("slerp_params", "slerp_task_vectors")

_PEFT_BASE_FIELDS = frozenset(f.name for f in dataclasses.fields(PeftConfig))


def adapter_config_dict(config: CoreIsolationConfig) -> dict[str, Any]:
    """The CoreIsolation-specific fields of `config` as JSON-ready values (sets become sorted lists).

    PEFT's bookkeeping fields (`peft_type`, `peft_version`, `base_model_name_or_path`, ...) are left out, so the dict
    describes the method's settings only and compares equal across PEFT versions.
    """
    out = {}
    for f in dataclasses.fields(config):
        if f.name in _PEFT_BASE_FIELDS:
            continue
        value = getattr(config, f.name)
        out[f.name] = sorted(value) if isinstance(value, (set, frozenset, tuple)) else value
    return out


@dataclass
class CPIConfig:
    """Hyper-parameters of a [`CPIPipeline`] run.

    The method's own hyper-parameters — p (`core_fraction`), τ (`similarity_threshold`), `core_scope`, `slerp_t`,
    `slerp_eps` — and the adapted modules (`target_modules`) are those of the `adapter`, a [`CoreIsolationConfig`]
    that is also the PEFT config of the trained adapter. In `"full"` mode its `target_modules` are not used.

    Args:
        adapter ([`CoreIsolationConfig`]): The adapter and the CPI-FT hyper-parameters (default: all linear layers,
            p = 0.01, τ = 0.1, global scope).
        train_params (`str`): `"adapter"` (CoreIsolation deltas of `adapter.target_modules`) or `"full"` (every
            parameter).
        probe_steps (`int`): Optimizer steps of each probe SFT.
        stage_steps (`int`, *optional*): Optimizer steps of each staged-SFT stage; defaults to `probe_steps`.
        total_stage_steps (`int`, *optional*): Instead of `stage_steps`, a budget shared by all stages: each of the
            G stages gets `total // G` steps (the first `total % G` one more). Useful to compare methods at one budget.
        learning_rate (`float`): Probe learning rate. `stage_learning_rate` defaults to it.
        stage_learning_rate (`float`, *optional*): Learning rate of the stages.
        weight_decay (`float`): AdamW weight decay (frozen cores are restored after each step regardless).
        batch_size (`int`): Per-device batch size.
        grad_accum (`int`): Gradient accumulation steps.
        max_length (`int`): Maximum tokens per example (prompts are cut from the left to keep the answer).
        lr_scheduler_type (`str`): Passed to `SFTConfig`.
        warmup_steps (`int`): Passed to `SFTConfig`.
        optim (`str`): Passed to `SFTConfig`.
        fusion (`str`): How non-core entries are merged: `"slerp_params"` (the paper: SLERP of the fine-tuned
            parameters θ_t) or `"slerp_task_vectors"` (SLERP of Δ_t = θ_t − θ0).
        stage_order (`str`): One of `STAGE_ORDERS`: `"random"` (default, shuffled with `seed`), `"input"`,
            `"difficulty"`, `"dependency"`, `"core_overlap"`, `"small_first"` (see [`order_groups`]).
        stage_dependencies (`list[list[str]]`, *optional*): `[before, after]` task-name pairs for
            `stage_order="dependency"`.
        seed (`int`): Seed of the stage order, data shuffling and training.
        max_train_examples (`int`, *optional*): Cap on the training examples used per task.
        chat (`bool`, *optional*): Apply the tokenizer's chat template (`None`: when it has one).
    """

    adapter: CoreIsolationConfig = field(default_factory=CoreIsolationConfig)
    train_params: Literal["adapter", "full"] = "adapter"
    probe_steps: int = 50
    stage_steps: Optional[int] = None
    total_stage_steps: Optional[int] = None
    learning_rate: float = 1e-4
    stage_learning_rate: Optional[float] = None
    weight_decay: float = 0.0
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 256
    lr_scheduler_type: str = "constant"
    warmup_steps: int = 0
    optim: str = "adamw_torch"
    fusion: Literal["slerp_params", "slerp_task_vectors"] = "slerp_params"
    stage_order: Literal["random", "input", "difficulty", "dependency", "core_overlap", "small_first"] = "random"
    stage_dependencies: Optional[list[list[str]]] = None
    seed: int = 0
    max_train_examples: Optional[int] = None
    chat: Optional[bool] = None

    def __post_init__(self):
        if not isinstance(self.adapter, CoreIsolationConfig):
            raise TypeError(f"`adapter` must be a CoreIsolationConfig, got {type(self.adapter).__name__}")
        self.adapter = copy.deepcopy(self.adapter)  # PEFT mutates the config it is given; keep ours as passed
        if self.train_params not in ("adapter", "full"):
            raise ValueError(f"`train_params` must be 'adapter' or 'full', got {self.train_params!r}")
        if self.fusion not in FUSION_MODES:
            raise ValueError(f"`fusion` must be one of {FUSION_MODES}, got {self.fusion!r}")
        if self.stage_order not in STAGE_ORDERS:
            raise ValueError(f"`stage_order` must be one of {STAGE_ORDERS}, got {self.stage_order!r}")
        self._check_dependencies()
        for name in ("probe_steps", "batch_size", "grad_accum", "max_length"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)!r}")
        for name in ("stage_steps", "total_stage_steps", "max_train_examples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1 or None, got {getattr(self, name)!r}")

    def _check_dependencies(self) -> None:
        deps = self.stage_dependencies
        if deps is None:
            if self.stage_order == "dependency":
                raise ValueError("`stage_order='dependency'` needs `stage_dependencies` ([before, after] task pairs)")
            return
        if self.stage_order != "dependency":
            raise ValueError(
                f"`stage_dependencies` is only used with stage_order='dependency', not {self.stage_order!r}"
            )
        pairs = []
        for pair in deps:
            if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(x, str) for x in pair):
                raise ValueError(f"`stage_dependencies` must hold [before, after] task-name pairs, got {pair!r}")
            pairs.append([pair[0], pair[1]])
        self.stage_dependencies = pairs

    def steps_for_stage(self, k: int, num_stages: int) -> int:
        """Optimizer steps of stage `k` (0-based) out of `num_stages`."""
        if self.total_stage_steps is not None:
            base, extra = divmod(self.total_stage_steps, num_stages)
            return max(1, base + (1 if k < extra else 0))
        return self.stage_steps if self.stage_steps is not None else self.probe_steps

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-ready values (the adapter as [`adapter_config_dict`])."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "adapter"}
        out["adapter"] = adapter_config_dict(self.adapter)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CPIConfig:
        """Inverse of [`to_dict`] (unknown keys are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if isinstance(kwargs.get("adapter"), dict):
            kwargs["adapter"] = CoreIsolationConfig(**kwargs["adapter"])
        return cls(**kwargs)
