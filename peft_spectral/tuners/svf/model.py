"""`SVFModel`: injects [`SVFLinear`] layers into a transformers model."""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import torch
from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    _maybe_include_all_linear_layers,
    check_target_module_exists,
)
from peft.utils.integrations import gather_params_ctx
from torch import nn

from ...svd_cache import SVDCache
from .._checks import SKETCH_TOLERANCE, check_finite_weight, sketch_difference, weights_sketch
from .._linear import is_conv1d, weight_matrix
from .._tuner import SpectralTunerMixin
from .composed import generation_length, new_tokens_of_generate
from .config import SVF_DEFAULT_TARGET_MODULES, SVFConfig
from .layer import SVFLayer, SVFLinear
from .mixed_batch import mixed_batch_hooks


logger = logging.getLogger(__name__)

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|block)\.(\d+)\.")

#: Largest factor by which a `"linear"`-mode SVF adapter may scale a weight's spectral norm: `|z_i| σ_i <= 1e6 σ_1`
#: for every singular value (checked when an adapter is loaded or combined). No training of the base model's tasks
#: gets near it (PEFT's own stress tests, which train toy MLPs at high learning rates, reach about 3e5), while a
#: corrupt or hostile file (`z = 1e30` is finite, survives a safe merge, and turns every logit into NaN) is refused.
#: `"sigmoid"` mode is bounded by construction (`σ_i f(z_i) <= Σσ`).
SVF_MAX_GAIN = 1e6


class SVFBaseWeightsWarning(UserWarning):
    """An SVF adapter is loaded onto base weights that differ from those it was saved with (see
    `SVFConfig.base_weights_sketch`)."""


def check_z(z: torch.Tensor, sigma: torch.Tensor, mode: str, adapter_name: str, module_name: str) -> None:
    """Refuse a `z` that no trained adapter has: NaN/inf, or (`"linear"` mode) a scaled spectrum beyond
    [`SVF_MAX_GAIN`] times the base weight's spectral norm (`z = 1e30` is finite, survives a safe merge, and turns
    every logit into NaN).

    Args:
        z (`torch.Tensor`): The adapter's `z` for one layer (length `k <= m`).
        sigma (`torch.Tensor`): The layer's singular values (length `m`, descending).
        mode (`str`): `"linear"` or `"sigmoid"`.
        adapter_name (`str`): For the message.
        module_name (`str`): For the message.

    Raises:
        `ValueError`: naming the adapter, the module and the offending value.
    """
    z64 = z.detach().to(torch.float64)
    where = f"SVF adapter {adapter_name!r} of module {module_name!r}"
    finite = torch.isfinite(z64)
    if not bool(finite.all()):
        raise ValueError(
            f"{where} has {int((~finite).sum())} non-finite (NaN or inf) value(s) in z; the adapter is broken "
            "(diverged training or a bad file)"
        )
    if mode != "linear" or not len(z64) or not len(sigma) or float(sigma[0]) <= 0:
        return
    scaled = z64.abs().cpu() * sigma[: len(z64)].detach().to(device="cpu", dtype=torch.float64)
    i = int(scaled.argmax())
    gain = float(scaled[i]) / float(sigma[0])
    if gain > SVF_MAX_GAIN:
        raise ValueError(
            f"{where}: z[{i}] = {float(z64[i]):.3g} scales its weight to {gain:.3g}x the base weight's spectral norm "
            f"(at most {SVF_MAX_GAIN:g}x is accepted: |z_i| sigma_i <= {SVF_MAX_GAIN:g} sigma_1); the adapter would "
            "overflow the model's activations (a bad file or a diverged training)"
        )


def linear_module_names(model: nn.Module, limit: Optional[int] = None) -> list[str]:
    """Names of the `nn.Linear`/`Conv1D` modules of `model` (for error messages)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)]
    return names[:limit] if limit else names


def layer_index(module_name: str) -> Optional[int]:
    """The transformer block index in a module name (`model.layers.3.mlp.up_proj` → 3), or `None`."""
    match = _LAYER_INDEX.search(module_name)
    return int(match.group(1)) if match else None


class SVFModel(SpectralTunerMixin, BaseTuner):
    """Singular Value Fine-tuning (Transformer², https://huggingface.co/papers/2501.06252) for PEFT.

    Each targeted weight `W = U diag(σ) Vᵀ` becomes `U diag(σ ⊙ f(z)) Vᵀ` with one trainable `z` per singular value.
    Use it through `peft.get_peft_model(model, SVFConfig(...))` after `import peft_spectral`.

    Example:

    ```py
    >>> import peft_spectral
    >>> from peft import get_peft_model
    >>> model = get_peft_model(base_model, peft_spectral.SVFConfig(target_modules=["gate_proj", "up_proj", "down_proj"]))
    >>> model.print_trainable_parameters()
    ```
    """

    prefix: str = "svf_"
    tuner_layer_cls = SVFLayer
    target_module_mapping = SVF_DEFAULT_TARGET_MODULES

    # ------------------------------------------------------------------ injection

    def _prepare_adapter_config(self, peft_config: SVFConfig, model_config: dict) -> SVFConfig:
        if peft_config.target_modules is None:
            model_type = model_config.get("model_type")
            targets = self.target_module_mapping.get(model_type)
            if targets is None:
                examples = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in linear_module_names(self.model)})[:8])
                raise ValueError(
                    f"SVFConfig.target_modules is required: no default targets are known for model type "
                    f"{model_type!r}. Name the linear layers to adapt, e.g. target_modules=[...] from: {examples}"
                )
            peft_config.target_modules = targets if isinstance(targets, str) else set(targets)
        return peft_config

    def _prepare_model(self, peft_config: SVFConfig, model: nn.Module) -> None:
        """Match the targets, reject unsupported ones, and compute (or load) all SVD factors with one progress bar."""
        matched = _matching_modules(peft_config, model)
        if not matched:
            examples = ", ".join(linear_module_names(model, limit=6)) or "(the model has no Linear/Conv1D layers)"
            raise ValueError(
                f"SVFConfig.target_modules={_describe(peft_config.target_modules)} matches no module of the model. "
                f"Some linear modules of this model: {examples}"
            )
        unsupported = [
            (n, type(m).__name__) for n, m in matched if not (isinstance(m, (nn.Linear, SVFLayer)) or is_conv1d(m))
        ]
        if unsupported:
            name, kind = unsupported[0]
            raise TypeError(
                f"SVF supports torch.nn.Linear and transformers' Conv1D layers; target '{name}' is a {kind}"
                f" ({len(unsupported)} unsupported target(s) in all). Narrow target_modules."
            )
        new = [(n, m) for n, m in matched if not isinstance(m, SVFLayer)]
        cache = SVDCache(peft_config.svd_cache_dir, enabled=peft_config.use_svd_cache)
        self._svd_cache = cache
        # under DeepSpeed ZeRO-3 the weights are partitioned: gather them for the SVD, as PEFT's PiSSA init does
        with gather_params_ctx([m.weight for _, m in new]):
            for name, module in new:
                check_finite_weight(module, "SVF", name)
            weights = [(n, weight_matrix(m)) for n, m in new]
            self._pending_factors = cache.get_many(weights, desc="SVF: SVD of target weights")

    def _create_and_replace(
        self,
        peft_config: SVFConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if isinstance(target, SVFLayer):
            target.update_layer(adapter_name, peft_config, current_key)
            return
        factors = getattr(self, "_pending_factors", {}).pop(current_key, None)
        if factors is None:
            with gather_params_ctx(target.weight):
                check_finite_weight(target, "SVF", current_key)
                cache = SVDCache(peft_config.svd_cache_dir, enabled=peft_config.use_svd_cache)
                factors = cache.get(weight_matrix(target), name=current_key)
        # not inside `gather_params_ctx`: the layer gathers the weight itself where it needs it (`W Q`), and
        # DeepSpeed refuses nested gathers of one parameter
        new_module = SVFLinear(target, adapter_name, peft_config, factors, current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _post_injection_hook(self, model: nn.Module, config: SVFConfig, adapter_name: str) -> None:
        self._pending_factors = {}

    # ------------------------------------------------------------------ loading

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: SVFConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        model_state = model.state_dict()
        for key, value in remapped.items():
            if ".svf_z." not in key + ".":
                continue
            path = key.split(".svf_z")[0]
            module = path.removeprefix("base_model.model.")
            if key in model_state and model_state[key].shape != value.shape:
                raise ValueError(
                    f"SVF adapter does not fit this model: module '{module}' has {model_state[key].numel()} adapted "
                    f"singular values here but the adapter holds {value.numel()} (it was trained on a model with "
                    f"other weight shapes, or with another `rank`)."
                )
            layer = _submodule(model, path)
            if isinstance(layer, SVFLayer):
                check_z(value, layer.svf_S, config.mode, adapter_name, module)
        tuner = model if isinstance(model, SVFModel) else getattr(model, "base_model", None)
        if isinstance(tuner, SVFModel):  # an adapter loaded from a file: check it belongs to these base weights
            tuner._check_base_weights(adapter_name)
        return remapped

    # ------------------------------------------------------------------ the base weights an adapter belongs to

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """Inject as PEFT does, then record the sketch of the adapter's base weights in its config (what
        `save_pretrained` writes), keeping the sketch the config held before: when the adapter's weights are then
        loaded from a file, [`_remap_adapter_state_dict_for_load`] compares the two (see
        `SVFConfig.base_weights_sketch`). A new adapter is never checked, so a config object reused on another model
        raises no false alarm.
        """
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        self._record_base_weights(adapter_name)

    def base_weights_mismatch(self, adapter_name: str) -> Optional[str]:
        """Why adapter `adapter_name` does not belong to this model's base weights, or `None` when it does (or when
        it recorded no sketch of them)."""
        return getattr(self, "_base_mismatch", {}).get(adapter_name)

    def _record_base_weights(self, adapter_name: str) -> None:
        config = self.peft_config.get(adapter_name)
        layers = [(n, m) for n, m in self.svf_layers() if adapter_name in m.svf_z]
        self.__dict__.setdefault("_sketch_before", {}).pop(adapter_name, None)
        if not isinstance(config, SVFConfig) or not layers:
            return
        if any(m.merged for _, m in layers):
            logger.info(
                "SVF adapter %r: a layer it targets is merged; its base weights are not sketched", adapter_name
            )
            return

        def base_weights():
            for name, layer in layers:  # one weight gathered at a time under DeepSpeed ZeRO-3
                with gather_params_ctx(layer.get_base_layer().weight):
                    yield name, weight_matrix(layer.get_base_layer())

        self._sketch_before[adapter_name] = config.base_weights_sketch
        config.base_weights_sketch = weights_sketch(base_weights())

    def _check_base_weights(self, adapter_name: str) -> None:
        """Compare the sketch the loaded adapter was saved with to this model's; warn and remember a mismatch."""
        mismatches = self.__dict__.setdefault("_base_mismatch", {})
        mismatches.pop(adapter_name, None)
        config = self.peft_config.get(adapter_name)
        recorded = getattr(self, "_sketch_before", {}).get(adapter_name)
        current = getattr(config, "base_weights_sketch", None)
        if current is None:
            return
        if recorded is None:
            logger.debug(
                "SVF adapter %r has no base-weight sketch (saved before sketches existed): nothing to check",
                adapter_name,
            )
            return
        difference = sketch_difference(recorded, current)
        if difference <= SKETCH_TOLERANCE:
            return
        if recorded["modules"] != current["modules"]:
            detail = f"it was saved for {recorded['modules']} targeted modules, this model has {current['modules']}"
        else:
            detail = (
                f"the {current['modules']} targeted weights differ from those it was saved with by about "
                f"{difference:.0%} (relative, Frobenius; casts to bfloat16/float16 move them by about 0.1%)"
            )
        trained_on = getattr(config, "base_model_name_or_path", None)
        message = (
            f"SVF adapter {adapter_name!r} does not belong to this base model: {detail}. Its z scale the singular "
            "directions of other matrices, so its outputs are not the trained adapter's; load it onto the model it "
            f"was trained on{f' ({trained_on})' if trained_on else ''}."
        )
        mismatches[adapter_name] = message
        warnings.warn(message, SVFBaseWeightsWarning, stacklevel=3)

    # ------------------------------------------------------------------ adapters

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        """Mixed-adapter batches: `adapter_names=[...]` (one per example) in `forward`/`generate`, as for LoRA; in
        `generate`, the generation's length for the composed weight's rule (see `generation_length`)."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(generation_length(self.model, new_tokens_of_generate(kwargs)))
            adapter_names = kwargs.get("adapter_names")
            if adapter_names is not None:
                stack.enter_context(
                    mixed_batch_hooks(self.model, adapter_names, layer_cls=SVFLayer, num_beams=kwargs.get("num_beams"))
                )
            yield

    def svf_layers(self) -> list[tuple[str, SVFLinear]]:
        """All SVF layers of the model with their module names."""
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, SVFLinear)]

    def add_weighted_adapter(
        self,
        adapters: Sequence[str],
        weights: Union[Sequence[float], Sequence[Sequence[float]], Mapping[str, Any], torch.Tensor],
        adapter_name: str,
        combination_type: str = "linear",
    ) -> None:
        """Add adapter `adapter_name` with `z = Σ_k weights[k] · z_k` over the given SVF adapters (PEFT's name).

        This is [`combine_svf_adapters`] under the name and signature that PEFT's other methods use (e.g.
        `IA3Model.add_weighted_adapter`). The new adapter is not active; use `set_adapter(adapter_name)`.

        Args:
            adapters (`Sequence[str]`): Names of the source adapters.
            weights (`Sequence[float]`, nested sequence, mapping or `torch.Tensor`): One weight per adapter, or one
                per adapter per transformer block (see [`combine_svf_adapters`]).
            adapter_name (`str`): Name of the new adapter (must not exist yet).
            combination_type (`str`, defaults to `"linear"`): Only `"linear"` (a weighted sum of the `z`) is
                defined for SVF.

        Raises:
            `ValueError`: for another `combination_type`, an unknown or non-SVF source adapter, or an existing
                `adapter_name`.
        """
        if combination_type != "linear":
            raise ValueError(
                f"SVF adapters combine linearly (z = sum_k w_k z_k): combination_type must be 'linear', got "
                f"{combination_type!r}"
            )
        combine_svf_adapters(self, adapters, weights, adapter_name)


def _submodule(model: nn.Module, path: str) -> Optional[nn.Module]:
    """`model.get_submodule(path)`, also when the state-dict prefix `base_model.model.` does not apply; else `None`."""
    for candidate in (path, path.removeprefix("base_model.model.")):
        try:
            return model.get_submodule(candidate)
        except AttributeError:
            continue
    return None


def _describe(targets: Any) -> str:
    if isinstance(targets, (set, frozenset)):
        return repr(sorted(targets))
    return repr(targets)


def _matching_modules(config: SVFConfig, model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules of `model` that `config` targets (resolving `"all-linear"`), skipping the inside of tuner layers."""
    cfg = _maybe_include_all_linear_layers(copy.copy(config), model)
    out = []
    tuner_prefixes: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in tuner_prefixes):
            continue
        if isinstance(module, BaseTunerLayer):
            tuner_prefixes.append(name + ".")
        if check_target_module_exists(cfg, name):
            out.append((name, module))
    return out


def combine_svf_adapters(
    peft_model: nn.Module,
    adapters: Sequence[str],
    weights: Union[
        Sequence[float], Sequence[Sequence[float]], Mapping[str, Union[float, Sequence[float]]], torch.Tensor
    ],
    adapter_name: str,
) -> str:
    """Build a new SVF adapter with `z' = Σ_k α_k z_k` from existing adapters of `peft_model`.

    The new adapter is an ordinary SVF adapter: it can be activated with `set_adapter`, saved with
    `save_pretrained(..., selected_adapters=[adapter_name])` and loaded with `PeftModel.from_pretrained`. It is
    also available as `SVFModel.add_weighted_adapter` (PEFT's name, reachable as `peft_model.add_weighted_adapter`).

    Args:
        peft_model (`PeftModel` or `SVFModel`): A model holding the SVF adapters to combine.
        adapters (`Sequence[str]`): Names of the K source adapters.
        weights: Mixing weights α: K floats (one per adapter), a `K × L` nested sequence or tensor (one per adapter
            per transformer block, `L` blocks, the block index read from module names such as `layers.3`), or a
            mapping from adapter name to a float or a list of `L` floats.
        adapter_name (`str`): Name of the new adapter (must not exist yet).

    Returns:
        `str`: `adapter_name`.
    """
    if not adapters:
        raise ValueError("combine_svf_adapters needs at least one source adapter")
    configs = peft_model.peft_config
    missing = [a for a in adapters if a not in configs]
    if missing:
        raise ValueError(f"combine_svf_adapters: unknown adapter(s) {missing}; available: {sorted(configs)}")
    not_svf = [a for a in adapters if not isinstance(configs[a], SVFConfig)]
    if not_svf:
        raise ValueError(f"combine_svf_adapters: adapter(s) {not_svf} are not SVF adapters")
    if adapter_name in configs:
        raise ValueError(f"combine_svf_adapters: an adapter named {adapter_name!r} exists already")
    modes = {configs[a].mode for a in adapters}
    if len(modes) > 1:
        raise ValueError(f"combine_svf_adapters: adapters use different modes {sorted(modes)}; z cannot be mixed")

    alpha = _mixing_matrix(adapters, weights)  # (K, L) or (K, 1)
    base_config = copy.deepcopy(configs[adapters[0]])
    base_config.inference_mode = True
    base_config.init_noise_std = 0.0
    base_config.init_weights = True
    tuner = peft_model if isinstance(peft_model, SVFModel) else peft_model.base_model
    if not isinstance(tuner, SVFModel):
        raise ValueError(f"combine_svf_adapters needs a PeftModel with SVF adapters, got {type(peft_model).__name__}")
    tuner.peft_config[adapter_name] = base_config
    try:
        tuner.inject_adapter(tuner.model, adapter_name)
        tuner._cast_adapter_dtype(adapter_name=adapter_name, autocast_adapter_dtype=True)
    except Exception:
        del tuner.peft_config[adapter_name]
        raise
    try:
        _write_combination(tuner, adapters, alpha, adapter_name, base_config.mode)
    except Exception:  # leave no half-built adapter behind
        tuner.delete_adapter(adapter_name)
        raise
    return adapter_name


def _write_combination(tuner: SVFModel, adapters: Sequence[str], alpha: torch.Tensor, adapter_name: str, mode: str):
    for name, layer in tuner.svf_layers():
        if adapter_name not in layer.svf_z:
            continue
        missing_here = [a for a in adapters if a not in layer.svf_z]
        if missing_here:
            raise ValueError(f"combine_svf_adapters: module '{name}' has no adapter(s) {missing_here}")
        lengths = {layer.svf_z[a].shape[0] for a in adapters}
        if len(lengths) > 1:
            raise ValueError(f"combine_svf_adapters: module '{name}' has adapters of different rank {sorted(lengths)}")
        if alpha.shape[1] == 1:
            col = alpha[:, 0]
        else:
            idx = layer_index(name)
            if idx is None or idx >= alpha.shape[1]:
                raise ValueError(
                    f"combine_svf_adapters: per-layer weights given for {alpha.shape[1]} layers, but module '{name}' "
                    f"has layer index {idx}"
                )
            col = alpha[:, idx]
        with torch.no_grad():
            z = sum(float(c) * layer.svf_z[a].detach().float() for c, a in zip(col, adapters))
            check_z(z, layer.svf_S, mode, adapter_name, name)
            layer.svf_z[adapter_name].data.copy_(z)


def _mixing_matrix(adapters: Sequence[str], weights: Any) -> torch.Tensor:
    k = len(adapters)
    if isinstance(weights, Mapping):
        unknown = set(weights) - set(adapters)
        if unknown or len(weights) != k:
            raise ValueError(f"mixing weights name {sorted(weights)}, but the adapters are {list(adapters)}")
        weights = [weights[a] for a in adapters]
    alpha = torch.as_tensor(
        weights if not isinstance(weights, torch.Tensor) else weights.detach(), dtype=torch.float64
    )
    if alpha.ndim == 1:
        alpha = alpha[:, None]
    if alpha.ndim != 2 or alpha.shape[0] != k:
        raise ValueError(f"mixing weights must have shape ({k},) or ({k}, num_layers), got {tuple(alpha.shape)}")
    if not torch.isfinite(alpha).all():
        raise ValueError("mixing weights must be finite")
    return alpha
