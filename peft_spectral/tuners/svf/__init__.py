"""Singular Value Fine-tuning (SVF), the adapter of Transformer² (arXiv 2501.06252)."""

from ...registry import register_method
from .config import SVF_DEFAULT_TARGET_MODULES, SVFConfig
from .layer import SVFLayer, SVFLinear
from .model import SVFModel, combine_svf_adapters


register_method("svf", config_cls=SVFConfig, model_cls=SVFModel, prefix="svf_")

__all__ = ["SVF_DEFAULT_TARGET_MODULES", "SVFConfig", "SVFLayer", "SVFLinear", "SVFModel", "combine_svf_adapters"]
