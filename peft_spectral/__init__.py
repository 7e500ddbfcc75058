"""peft_spectral: spectral and parameter-selective adaptation methods for Hugging Face PEFT.

Importing the package registers its methods with PEFT (`SVF`, `SPECTRAL_COMPRESS`, `CORE_ISOLATION`), so that
`get_peft_model`, `PeftModel.from_pretrained` and `AutoPeftModelForCausalLM` handle them like PEFT's own.

The top level holds what a user of the adapters needs: each method's config, model and layer classes, and
[`combine_svf_adapters`]. The pipelines live in their own modules (`peft_spectral.transformer2`,
`peft_spectral.compress`, `peft_spectral.cpi`, `peft_spectral.training`); see `docs/architecture.md`.
"""

from __future__ import annotations

from . import registry
from .tuners.core_isolation import CoreIsolationConfig, CoreIsolationLayer, CoreIsolationLinear, CoreIsolationModel
from .tuners.spectral_compress import (
    SpectralCompressConfig,
    SpectralCompressLayer,
    SpectralCompressLinear,
    SpectralCompressModel,
)
from .tuners.svf import SVFConfig, SVFLayer, SVFLinear, SVFModel, combine_svf_adapters


__version__ = "0.1.0"

__all__ = [
    "CoreIsolationConfig",
    "CoreIsolationLayer",
    "CoreIsolationLinear",
    "CoreIsolationModel",
    "SVFConfig",
    "SVFLayer",
    "SVFLinear",
    "SVFModel",
    "SpectralCompressConfig",
    "SpectralCompressLayer",
    "SpectralCompressLinear",
    "SpectralCompressModel",
    "__version__",
    "combine_svf_adapters",
    "registry",
]
