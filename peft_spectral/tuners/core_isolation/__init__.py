"""CoreIsolation (CPI-FT) as a PEFT method. Importing this package registers `CORE_ISOLATION` with PEFT."""

from ...registry import register_method
from .config import CoreIsolationConfig
from .layer import CoreIsolationLayer, CoreIsolationLinear
from .model import CoreIsolationModel


register_method("core_isolation", CoreIsolationConfig, CoreIsolationModel, prefix="core_isolation_")

__all__ = ["CoreIsolationConfig", "CoreIsolationLayer", "CoreIsolationLinear", "CoreIsolationModel"]
