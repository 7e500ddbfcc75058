"""Configuration of the SpectralCompress (Compress to Impress / LASER) adapter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from ...subspace import check_rho


_MODULE_KEYS = {"rho", "clusters"}
_FORWARD_MODES = ("auto", "factored", "dense")


def _check_clusters(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: clusters must be a positive integer, got {value!r}")
    return value


@dataclass
class SpectralCompressConfig(PeftConfig):
    """Configuration of a [`SpectralCompressModel`].

    A SpectralCompress adapter *replaces* each targeted weight `W` by a low-rank truncation `W'` (it is not `W + ΔW`):
    plain truncation to a fraction `rho` of the rank (LASER), or, with `clusters > 1`, a multi-subspace truncation in
    which the rows of `W` are clustered and each cluster's block is truncated on its own (Compress to Impress).

    The adapter is *training-free*: its factors are computed from the base weight and never trained. `get_peft_model`
    therefore leaves them with `requires_grad=False` (also after `set_adapter`, `set_requires_grad` or
    `PeftModel.from_pretrained(..., is_trainable=True)`), and `print_trainable_parameters()` reports
    `trainable params: 0` (only `modules_to_save`, when given, are trainable). There is no identity initialisation
    either: a truncation changes the model from the start, so the config has no `init_weights`.

    The adapter's saved tensors are the truncated factors, so loading it needs no SVD. The shapes of those factors
    depend on the decomposition and are recorded in `layout` (filled in automatically when the adapter is created),
    which lets `PeftModel.from_pretrained` build the layers before it loads the tensors.

    Args:
        modules (`dict[str, dict]`):
            Per-module settings: module name (full name such as `"model.layers.3.mlp.down_proj"`, or a suffix of it)
            → `{"rho": float, "clusters": int}`. Missing keys take the defaults below. When `target_modules` is not
            given, the keys of `modules` are the targets.
        target_modules (`Union[list[str], str]`, *optional*):
            Modules to compress (PEFT matching rules: names/suffixes or one regex). Modules matched here but not in
            `modules` use the default `rho` and `clusters`.
        rho (`float`, defaults to 0.1): Default rank fraction in (0, 1]: `k = round(rho · min(out, in))`, at least 1.
        clusters (`int`, defaults to 1): Default number of row clusters; 1 is plain (LASER) truncation.
        seed (`int`, defaults to 0): Seed of the row clustering.
        cluster_iters (`int`, defaults to 10): Maximum assign/refit rounds of the row clustering.
        forward_mode (`str`, defaults to `"auto"`):
            `"factored"` computes `((x V) (U Σ)ᵀ)` per cluster, `"dense"` builds the truncated matrix once and caches
            it, `"auto"` picks factored when it needs fewer multiply-adds than the dense matrix.
        layout (`dict[str, dict]`):
            Filled in by the tuner: module name → `{"shape": [out, in], "sizes": [...], "ranks": [...]}` (rows and
            rank of each cluster). Do not edit by hand; it is what lets a saved adapter be loaded without an SVD.
        modules_to_save (`list[str]`, *optional*): Extra modules to train and save, as in other PEFT methods.
    """

    modules: dict = field(
        default_factory=dict,
        metadata={
            "help": (
                "Per-module settings: module name or suffix -> {'rho': float in (0, 1], 'clusters': int >= 1}. "
                "When target_modules is None, the keys are the targets."
            )
        },
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": (
                "Module names (or suffixes) or a regex of the modules to compress; defaults to the keys of `modules`."
            )
        },
    )
    rho: float = field(
        default=0.1,
        metadata={"help": "Default rank fraction in (0, 1] kept by the truncation: k = round(rho * min(out, in))."},
    )
    clusters: int = field(default=1, metadata={"help": "Default number of row clusters (1 = plain LASER truncation)."})
    seed: int = field(default=0, metadata={"help": "Seed of the row clustering (multi-subspace truncation)."})
    cluster_iters: int = field(default=10, metadata={"help": "Maximum assign/refit rounds of the row clustering."})
    forward_mode: Literal["auto", "factored", "dense"] = field(
        default="auto",
        metadata={
            "help": (
                "'factored': ((x V)(U S)^T) per cluster; 'dense': cached dense truncated matrix; 'auto': factored "
                "when it needs fewer multiply-adds than the dense matrix."
            )
        },
    )
    layout: dict = field(
        default_factory=dict,
        metadata={
            "help": (
                "Filled in by the tuner: module name -> {'shape': [out, in], 'sizes': [...], 'ranks': [...]}; lets "
                "a saved adapter be loaded without recomputing any SVD. Do not edit."
            )
        },
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "List of modules apart from the compressed layers to be set as trainable and saved."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.SPECTRAL_COMPRESS
        check_rho(self.rho, "SpectralCompressConfig.rho")
        _check_clusters(self.clusters, "SpectralCompressConfig")
        if self.forward_mode not in _FORWARD_MODES:
            raise ValueError(f"forward_mode must be one of {_FORWARD_MODES}, got {self.forward_mode!r}")
        if not isinstance(self.modules, dict):
            raise TypeError(
                f"modules must be a dict of module name -> {{'rho', 'clusters'}}, got {type(self.modules)}"
            )
        for name, spec in self.modules.items():
            if not isinstance(spec, dict):
                raise TypeError(f"modules[{name!r}] must be a dict like {{'rho': 0.1, 'clusters': 1}}, got {spec!r}")
            unknown = set(spec) - _MODULE_KEYS
            if unknown:
                raise ValueError(
                    f"modules[{name!r}] has unknown keys {sorted(unknown)}; allowed: {sorted(_MODULE_KEYS)}"
                )
            check_rho(spec.get("rho", self.rho), f"modules[{name!r}]['rho']")
            _check_clusters(spec.get("clusters", self.clusters), f"modules[{name!r}]")
        if self.target_modules is None and self.modules:
            self.target_modules = set(self.modules)
        elif isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)

    def settings_for(self, module_name: str) -> dict:
        """The `{"rho", "clusters"}` settings of the module called `module_name` (longest matching key wins)."""
        best, best_len = None, -1
        for key, spec in self.modules.items():
            if (module_name == key or module_name.endswith("." + key)) and len(key) > best_len:
                best, best_len = spec, len(key)
        spec = best or {}
        return {"rho": float(spec.get("rho", self.rho)), "clusters": int(spec.get("clusters", self.clusters))}
