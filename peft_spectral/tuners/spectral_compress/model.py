"""The SpectralCompress tuner: injects [`SpectralCompressLinear`] layers into a model."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.integrations import gather_params_ctx
from torch import nn

from .._checks import check_finite_weight
from .._linear import is_conv1d
from .._tuner import SpectralTunerMixin
from .config import SpectralCompressConfig
from .layer import SpectralCompressLayer, SpectralCompressLinear


class SpectralCompressModel(SpectralTunerMixin, BaseTuner):
    """Replaces chosen weight matrices of a model by low-rank (optionally multi-subspace) truncations.

    This is the adapter form of LASER (Sharma et al., 2023) and of Compress to Impress (arXiv 2510.20800): the
    search ([`peft_spectral.compress`]) decides which modules to truncate and to which rank fraction; this tuner
    holds the result as a normal PEFT adapter (`save_pretrained`, `PeftModel.from_pretrained`, `merge_and_unload`).

    Args:
        model ([`torch.nn.Module`]): The model to adapt.
        config ([`SpectralCompressConfig`]): The configuration.
        adapter_name (`str`): The adapter name, defaults to `"default"`.

    Example:

    ```py
    >>> from peft import get_peft_model
    >>> import peft_spectral.tuners.spectral_compress as sc
    >>> cfg = sc.SpectralCompressConfig(modules={"model.layers.27.mlp.down_proj": {"rho": 0.05, "clusters": 1}})
    >>> model = get_peft_model(base, cfg)  # factored forward; model.merge_and_unload() gives a plain model
    ```
    """

    prefix: str = "spectral_compress_"
    tuner_layer_cls = SpectralCompressLayer
    target_module_mapping: dict = {}

    def _prepare_adapter_config(
        self, peft_config: SpectralCompressConfig, model_config: dict
    ) -> SpectralCompressConfig:
        if peft_config.target_modules is None:
            raise ValueError(
                "SpectralCompressConfig needs `modules` (module name -> {'rho', 'clusters'}) or `target_modules`; "
                "there is no default set of modules to compress."
            )
        return peft_config

    def _create_and_replace(
        self,
        config: SpectralCompressConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        settings = config.settings_for(current_key)
        kwargs = {
            "seed": config.seed,
            "cluster_iters": config.cluster_iters,
            "layout": config.layout.get(current_key),
            "forward_mode": config.forward_mode,
            "inference_mode": config.inference_mode,
        }
        if isinstance(target, SpectralCompressLayer):
            with gather_params_ctx(target.get_base_layer().weight):
                layout = target.update_layer(adapter_name, settings["rho"], settings["clusters"], **kwargs)
        else:
            base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
            if not (isinstance(base, nn.Linear) or is_conv1d(base)):
                raise TypeError(
                    f"Module {current_key!r} ({type(base).__name__}) cannot be compressed: SpectralCompress supports "
                    "torch.nn.Linear and transformers' Conv1D."
                )
            # under DeepSpeed ZeRO-3 the weight is partitioned: gather it for the SVD, as PEFT's PiSSA init does
            with gather_params_ctx(base.weight):
                check_finite_weight(base, "SpectralCompress", current_key)
                new_module = SpectralCompressLinear(
                    target, adapter_name, settings["rho"], settings["clusters"], module_name=current_key, **kwargs
                )
            if adapter_name not in self.active_adapters:
                new_module.requires_grad_(False)
            self._replace_module(parent, target_name, new_module, target)
            layout = new_module.layout(adapter_name)
        config.layout[current_key] = layout

    def _post_injection_hook(self, model: nn.Module, config: SpectralCompressConfig, adapter_name: str) -> None:
        unmatched = [
            key
            for key in config.modules
            if not any(n == key or n.endswith("." + key) for n in self.targeted_module_names)
        ]
        if unmatched:
            raise ValueError(
                f"SpectralCompressConfig.modules names modules that were not found or not targeted: {unmatched}. "
                f"Targeted modules: {sorted(self.targeted_module_names)[:10]}..."
            )

    def compression_report(self, adapter_name: str | None = None) -> dict[str, dict]:
        """Per compressed module: rho, clusters, ranks, dense and factor parameter counts and bytes.

        Args:
            adapter_name (`str`, *optional*): Defaults to the active adapter.
        """
        adapter_name = adapter_name or self.active_adapters[0]
        report = {}
        for name, module in self.model.named_modules():
            if isinstance(module, SpectralCompressLayer) and adapter_name in module.spectral_compress_us:
                dense = module.in_features * module.out_features
                factor = module.num_factor_params(adapter_name)
                elem = module.spectral_compress_us[adapter_name].element_size()
                report[name] = {
                    "rho": module.spectral_compress_rho[adapter_name],
                    "clusters": module.spectral_compress_clusters[adapter_name],
                    "ranks": module.layout(adapter_name)["ranks"],
                    "dense_params": dense,
                    "factor_params": factor,
                    "dense_bytes": dense * elem,
                    "factor_bytes": factor * elem + module.spectral_compress_rows[adapter_name].numel() * 8,
                    "factored_forward": module._use_factored(adapter_name),
                }
        return report
