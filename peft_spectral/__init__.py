"""peft_spectral: spectral and parameter-selective adaptation methods for Hugging Face PEFT.

Importing the package registers its methods with PEFT (`SVF`, `SPECTRAL_COMPRESS`, `CORE_ISOLATION`), so that
`get_peft_model`, `PeftModel.from_pretrained` and `AutoPeftModelForCausalLM` handle them like PEFT's own.
"""

from __future__ import annotations

import importlib

from . import registry
from .tuners.svf import SVFConfig, SVFLayer, SVFLinear, SVFModel, combine_svf_adapters


__version__ = "0.1.0"

__all__ = ["SVFConfig", "SVFLayer", "SVFLinear", "SVFModel", "__version__", "combine_svf_adapters", "registry"]

# The other two tuners are written in parallel; each registers itself when its package imports.
for _pkg, _names in (
    ("spectral_compress", ("SpectralCompressConfig", "SpectralCompressModel", "SpectralCompressLayer")),
    ("core_isolation", ("CoreIsolationConfig", "CoreIsolationModel", "CoreIsolationLayer")),
):
    try:
        _mod = importlib.import_module(f".tuners.{_pkg}", __name__)
    except ImportError as _err:  # pragma: no cover - only while a tuner is missing
        if f"tuners.{_pkg}" not in str(_err):
            raise
        continue
    for _n in _names:
        if hasattr(_mod, _n):
            globals()[_n] = getattr(_mod, _n)
            __all__.append(_n)
