"""peft_spectral: spectral and parameter-selective adaptation methods for Hugging Face PEFT.

Importing the package registers its methods with PEFT (`SVF`, `SPECTRAL_COMPRESS`, `CORE_ISOLATION`), so that
`get_peft_model`, `PeftModel.from_pretrained` and `AutoPeftModelForCausalLM` handle them like PEFT's own.

The top level holds what a user needs: each method's config, model and layer classes, [`combine_svf_adapters`],
the task loader [`load_task`] (task specs such as `"rg:gcd?max_value=30"`), [`evaluate`], and the expert job
[`SVFTrainingConfig`] / [`train_expert`] (imported on first use: they pull in TRL). The pipelines live in their own
modules (`peft_spectral.data`, `peft_spectral.training`, `peft_spectral.transformer2`, `peft_spectral.compress`,
`peft_spectral.cpi`); see `docs/architecture.md`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .data import load_task
from .tuners.core_isolation import CoreIsolationConfig, CoreIsolationLayer, CoreIsolationLinear, CoreIsolationModel
from .tuners.spectral_compress import (
    SpectralCompressConfig,
    SpectralCompressLayer,
    SpectralCompressLinear,
    SpectralCompressModel,
)
from .tuners.svf import SVFConfig, SVFLayer, SVFLinear, SVFModel, combine_svf_adapters


if TYPE_CHECKING:  # for type checkers and linters; at run time `__getattr__` imports them on first access
    from .evaluation import evaluate
    from .training.expert_job import SVFTrainingConfig, train_expert

__version__ = "0.1.0"

#: Names imported on first access (`peft_spectral.train_expert`): their modules import transformers' Trainer and TRL.
_LAZY = {
    "SVFTrainingConfig": "training.expert_job",
    "train_expert": "training.expert_job",
    "evaluate": "evaluation",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'peft_spectral' has no attribute {name!r}")


__all__ = [
    "CoreIsolationConfig",
    "CoreIsolationLayer",
    "CoreIsolationLinear",
    "CoreIsolationModel",
    "SVFConfig",
    "SVFLayer",
    "SVFLinear",
    "SVFModel",
    "SVFTrainingConfig",
    "SpectralCompressConfig",
    "SpectralCompressLayer",
    "SpectralCompressLinear",
    "SpectralCompressModel",
    "__version__",
    "combine_svf_adapters",
    "evaluate",
    "load_task",
    "train_expert",
]
