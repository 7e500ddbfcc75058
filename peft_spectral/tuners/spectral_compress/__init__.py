"""SpectralCompress: LASER / Compress to Impress low-rank truncations as a PEFT adapter."""

from ...registry import register_method
from .config import SpectralCompressConfig
from .layer import SpectralCompressLayer, SpectralCompressLinear
from .model import SpectralCompressModel


__all__ = ["SpectralCompressConfig", "SpectralCompressLayer", "SpectralCompressLinear", "SpectralCompressModel"]

register_method("spectral_compress", SpectralCompressConfig, SpectralCompressModel, prefix="spectral_compress_")
