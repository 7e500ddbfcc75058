"""Configuration of Singular Value Fine-tuning (SVF, Transformer², arXiv 2501.06252)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from .._checks import check_sketch


#: Default targets per architecture: the MLP projections, as in the Transformer² reference code.
SVF_DEFAULT_TARGET_MODULES: dict[str, Union[list[str], str]] = {
    "llama": ["gate_proj", "up_proj", "down_proj"],
    "mistral": ["gate_proj", "up_proj", "down_proj"],
    "mixtral": ["w1", "w2", "w3"],
    "qwen2": ["gate_proj", "up_proj", "down_proj"],
    "qwen3": ["gate_proj", "up_proj", "down_proj"],
    "gemma": ["gate_proj", "up_proj", "down_proj"],
    "gemma2": ["gate_proj", "up_proj", "down_proj"],
    "gemma3_text": ["gate_proj", "up_proj", "down_proj"],
    "smollm3": ["gate_proj", "up_proj", "down_proj"],
    "olmo2": ["gate_proj", "up_proj", "down_proj"],
    "phi3": ["gate_up_proj", "down_proj"],
    "gpt2": r".*\.mlp\.(c_fc|c_proj)$",
    "gpt_neox": ["dense_h_to_4h", "dense_4h_to_h"],
    "gptj": ["fc_in", "fc_out"],
    "opt": ["fc1", "fc2"],
    "falcon": ["dense_h_to_4h", "dense_4h_to_h"],
}

SVFMode = Literal["linear", "sigmoid"]
SVFFactorDtype = Literal["auto", "float32", "bfloat16", "float16"]

#: The values of `SVFConfig.factor_dtype`.
SVF_FACTOR_DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")

_IGNORED_CACHE_DIR = (
    "`svd_cache_dir` in {source} is ignored: the SVD cache location is chosen only at runtime "
    "(SVFConfig(svd_cache_dir=...), $PEFT_SPECTRAL_SVD_CACHE or $PEFT_SPECTRAL_CACHE), never by an adapter file."
)


@dataclass
class SVFConfig(PeftConfig):
    """Configuration of an [`SVFModel`]: one trainable scale per singular value of each targeted weight.

    For a targeted weight `W = U diag(σ) Vᵀ` the adapted weight is `W' = U diag(σ ⊙ f(z)) Vᵀ`, where `z` is the only
    trainable (and the only saved) tensor. `U`, `σ`, `V` come from the SVD cache and are never saved.

    Args:
        target_modules (`list[str]` or `str`, *optional*):
            Module names (suffix match), a regex (full match), or `"all-linear"`. Defaults to the MLP projections
            for known architectures (see `SVF_DEFAULT_TARGET_MODULES`); other models must name their targets.
        exclude_modules (`list[str]` or `str`, *optional*): Modules never adapted (names or a regex).
        layers_to_transform (`list[int]` or `int`, *optional*): Only adapt these layer indices.
        layers_pattern (`list[str]` or `str`, *optional*): Name of the layer list (e.g. `"layers"`), used with
            `layers_to_transform` when the architecture is not recognised.
        mode (`str`): `"linear"`: `f(z) = z`, `z` initialised to 1 (the paper). `"sigmoid"`: `f(z) =
            max_mult · sigmoid(z)`, then rescaled so that `Σ σ ⊙ f = Σ σ` (the reference code). Both are the base
            model at initialisation.
        rank (`int`, *optional*): Adapt only the top `rank` singular values of each weight; the rest of the spectrum
            is kept exactly. `None` adapts all `min(out, in)` values.
        max_mult (`float`): Upper bound of `f` in `"sigmoid"` mode. The sum-preserving rescale divides it out again,
            so it does not change the scales `s` (kept for the reference code's configs).
        init_value (`float`, *optional*): Initial `z`. Defaults to 1.0 (`"linear"`) or 0.1 (`"sigmoid"`, the reference).
        init_noise_std (`float`): Standard deviation of Gaussian noise added to the initial `z` (the reference uses
            0.01 in `"sigmoid"` mode). Non-zero noise makes the initial model differ slightly from the base.
        init_seed (`int`): Seed of that noise, so that adapters are reproducible.
        init_weights (`bool`): `True` (default) initialises `z` as above, so that the adapter is the base model at
            initialisation (up to `init_noise_std`). `False` draws `z` at random around `init_value` (standard
            deviation 0.5, from torch's global generator), a non-identity adapter, as `init_weights=False` does for
            PEFT's other methods (used to test merging, saving and loading).
        fast_factored (`bool`): `True` (default): also keep the larger side's scaled singular vectors (`W V = U Σ`
            or `Uᵀ W = Σ Vᵀ`, one more copy of each targeted weight in memory, in `factor_dtype`, never saved) and
            compute the output as `U Σ (s ⊙ Vᵀ x)` instead of the base matmul: one extra `m × m` matmul per token
            instead of two, so training steps cost about what LoRA r=16's do (see the SVF cost benchmark). The output
            at `s = 1` equals the base model up to the factor dtype's rounding. Used (and the copy kept) only where
            more than half of the singular values are adapted. `False`: the exact form, the base model bit for bit at
            initialisation and no copy of the weight, at +30-40 % step time (see `docs/svf_memory.md` for the memory
            of each form).
        factor_dtype (`str`): Dtype of the layer's singular vectors `Q` and of the fast form's `P`, and of the
            matmuls that use them. `"auto"` (default): the base weight's dtype when it is bfloat16 or float16 (the
            factors then cost what the weight costs, and the matmuls run as fast as the base model's), float32
            otherwise. `"float32"` keeps them in float32 whatever the base (twice the memory of a 16-bit base, a
            fast-form output closer to the base's at init); `"bfloat16"`/`"float16"` force 16 bits (e.g. a float32
            base trained under autocast). The SVD itself is always computed and cached in float32; the singular
            values `S`, `z` (float32 under PEFT's `autocast_adapter_dtype`) and the scales stay in float32. The
            factors are shared by all adapters of a layer: the first adapter's setting decides.
        compose_inference (`bool`): `True` (default): forwards that need no gradient (sampling completions,
            evaluation) use the adapted weight `W'` composed once per change of `z` and cached, at the merged
            model's cost per token instead of the factored form's, wherever that pays: from the first decoding
            step of a generation, or once the tokens run at one `z` have cost what composing costs. The loss and
            backward keep the factored form, and the base weight is never written. Costs one dense weight per
            targeted layer while cached (freed by the next forward that needs a gradient). `False`: always the
            factored forms. See
            `peft_spectral.tuners.svf.composed` (`composed_inference`, `clear_composed_weights`).
        base_weights_sketch (`dict`, *optional*): Filled in when the adapter is injected, and saved with it: a sketch of
            the targeted base weights ([`~peft_spectral.tuners._checks.weights_sketch`]: their number, joint norm and
            16 seeded Gaussian bilinear probes). Loading the adapter onto weights that differ from it by more than 1%
            (another checkpoint of the same shapes) warns with [`SVFBaseWeightsWarning`]; `ExpertLibrary` and `mix`
            refuse it. Casts to bfloat16/float16 (about 0.1%) pass. `None` in adapters saved before it existed: not
            checked.
        svd_cache_dir (`str`, *optional*): Directory of the SVD cache for this process; defaults to
            `$PEFT_SPECTRAL_SVD_CACHE`, else `$PEFT_SPECTRAL_CACHE/svd`, else the user cache directory. A runtime
            setting: never saved in `adapter_config.json`, and ignored (with a warning) when a config is read from a
            saved adapter, so that a downloaded adapter cannot choose where the library reads and writes.
        use_svd_cache (`bool`): Set to `False` to always recompute the SVD (nothing is written).
        modules_to_save (`list[str]`, *optional*): Extra modules trained and saved in full.
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names or a regex to adapt, or 'all-linear'. Defaults to the MLP projections of known "
            "architectures."
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
    mode: SVFMode = field(
        default="linear",
        metadata={
            "help": "'linear' (paper: sigma * z, z=1 at init) or 'sigmoid' (reference code: max_mult*sigmoid(z), sum-preserving)."
        },
    )
    rank: Optional[int] = field(
        default=None, metadata={"help": "Adapt only the top-`rank` singular values; None adapts all."}
    )
    max_mult: float = field(default=2.0, metadata={"help": "Upper bound of the scale in 'sigmoid' mode."})
    init_value: Optional[float] = field(
        default=None, metadata={"help": "Initial z; 1.0 for 'linear', 0.1 for 'sigmoid' when None."}
    )
    init_noise_std: float = field(
        default=0.0, metadata={"help": "Std of Gaussian noise on the initial z (reference: 0.01 in sigmoid mode)."}
    )
    init_seed: int = field(default=0, metadata={"help": "Seed of the initial noise."})
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: the adapter is the base model at init (up to init_noise_std). False: a random, "
            "non-identity z (std 0.5 around init_value), as for PEFT's other methods."
        },
    )
    fast_factored: bool = field(
        default=True,
        metadata={
            "help": "True (default): keep U*Sigma (or Sigma*V^T) for a cheaper factored forward/backward (one more "
            "weight copy per target; base output reproduced up to rounding). False: the exact form (base model bit "
            "for bit at init, no copy, slower steps)."
        },
    )
    factor_dtype: SVFFactorDtype = field(
        default="auto",
        metadata={
            "help": "Dtype of the singular vectors and of the fast form's weight copy: 'auto' (the base weight's "
            "dtype if bf16/fp16, else float32), 'float32', 'bfloat16' or 'float16'. The SVD is always float32."
        },
    )
    compose_inference: bool = field(
        default=True,
        metadata={
            "help": "True (default): forwards without gradient (sampling, evaluation) use W' = U diag(sigma*f(z)) V^T "
            "composed once per change of z and cached, where that pays (decoding, or enough tokens at one z): "
            "merged-model speed, one dense weight per target while cached; training keeps the factored form. "
            "False: always the factored form."
        },
    )
    base_weights_sketch: Optional[dict] = field(
        default=None,
        metadata={
            "help": "Sketch of the targeted base weights (number, norm, 16 Gaussian bilinear probes), recorded when the "
            "adapter is injected; loading onto weights that differ by more than 1% warns. None: not checked."
        },
    )
    svd_cache_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Directory of the SVD cache (runtime only, never saved); the user cache dir when None."},
    )
    use_svd_cache: bool = field(default=True, metadata={"help": "Read and write the on-disk SVD cache."})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules to train and save in full."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.peft_type is not None and self.svd_cache_dir is not None:
            # Only deserialization passes `peft_type` (PeftConfig.from_pretrained / from_peft_type): a saved file.
            warnings.warn(_IGNORED_CACHE_DIR.format(source="a saved adapter config"), UserWarning, stacklevel=3)
            self.svd_cache_dir = None
        self.peft_type = PeftType.SVF
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.mode not in ("linear", "sigmoid"):
            raise ValueError(f"SVFConfig.mode must be 'linear' or 'sigmoid', got {self.mode!r}")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"SVFConfig.rank must be a positive integer or None, got {self.rank!r}")
        if self.max_mult <= 0:
            raise ValueError(f"SVFConfig.max_mult must be positive, got {self.max_mult!r}")
        if not isinstance(self.compose_inference, bool):
            raise ValueError(f"SVFConfig.compose_inference must be a bool, got {self.compose_inference!r}")
        if not isinstance(self.fast_factored, bool):
            raise ValueError(f"SVFConfig.fast_factored must be a bool, got {self.fast_factored!r}")
        if self.factor_dtype not in SVF_FACTOR_DTYPES:
            raise ValueError(
                f"SVFConfig.factor_dtype must be one of {list(SVF_FACTOR_DTYPES)}, got {self.factor_dtype!r}"
            )
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"SVFConfig.init_weights must be a bool, got {self.init_weights!r}")
        if self.init_noise_std < 0:
            raise ValueError(f"SVFConfig.init_noise_std must be >= 0, got {self.init_noise_std!r}")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("SVFConfig: `layers_to_transform` cannot be used when `target_modules` is a regex str.")
        if self.base_weights_sketch is not None:
            check_sketch(self.base_weights_sketch, "SVFConfig.base_weights_sketch")
        if self.init_value is None:
            self.init_value = 1.0 if self.mode == "linear" else 0.1

    def to_dict(self) -> dict:
        """The config as a dict, without the runtime-only `svd_cache_dir` (so it is never saved)."""
        out = super().to_dict()
        out.pop("svd_cache_dir", None)
        return out

    @classmethod
    def from_json_file(cls, path_json_file: str, **kwargs) -> dict:
        """Read a saved config, dropping `svd_cache_dir` (with a warning): only the user chooses the cache location.

        Args:
            path_json_file (`str`): Path of an `adapter_config.json`.
        """
        loaded = super().from_json_file(path_json_file, **kwargs)
        if loaded.pop("svd_cache_dir", None) is not None:
            warnings.warn(_IGNORED_CACHE_DIR.format(source=path_json_file), UserWarning, stacklevel=2)
        return loaded
