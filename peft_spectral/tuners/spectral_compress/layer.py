"""SpectralCompress layers: a linear layer whose weight is replaced by its (multi-subspace) low-rank truncation.

Per adapter the layer holds

- `spectral_compress_us[adapter]`: the blocks `U_c diag(σ_c)` (`n_c × k_c`) of all clusters, flattened and
  concatenated (cluster order);
- `spectral_compress_v[adapter]`: the `V_c` (`in × k_c`) of all clusters concatenated along the columns, `(in, K)`;
- `spectral_compress_rows[adapter]`: the row indices of all clusters concatenated, `(out,)` (a permutation);
- `spectral_compress_sizes[adapter]`: `(c, 2)` integers `[n_c, k_c]`.

All four are saved; nothing needs an SVD at load time. The truncated weight is `W'[rows_c] = (U_c Σ_c) V_cᵀ`; the
forward computes `y[..., rows_c] = ((x V_c) (U_c Σ_c)ᵀ)` (factored) or `x W'ᵀ` (dense, cached). A truncation
*replaces* `W`: with the adapter disabled the layer is exactly the base layer, and `unmerge` restores the original
weight bit for bit (a copy is kept while merged).
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ...subspace import multi_subspace_factors
from .._linear import linear_features, weight_matrix
from .._merge import restore_weight, write_merged_weight


class SpectralCompressLayer(BaseTunerLayer):
    """Mixin holding the truncated factors of one weight for each adapter.

    The factors are training-free: they are registered in PEFT's `frozen_peft_weight_names`, so that
    `set_adapter`, `set_requires_grad` and `enable_adapters` keep `requires_grad=False` on them and
    `print_trainable_parameters()` reports 0 trainable parameters.
    """

    adapter_layer_names = ("spectral_compress_us", "spectral_compress_v")
    other_param_names = (
        "spectral_compress_rows",
        "spectral_compress_sizes",
        "spectral_compress_rho",
        "spectral_compress_clusters",
        "spectral_compress_forward_mode",
        "spectral_compress_settings",
    )

    def __init__(self, base_layer: nn.Module, module_name: str = "", **kwargs) -> None:
        self.base_layer = base_layer
        self.module_name = module_name
        self.spectral_compress_us = nn.ParameterDict({})
        self.spectral_compress_v = nn.ParameterDict({})
        self.spectral_compress_rows = BufferDict({}, persistent=True)
        self.spectral_compress_sizes = BufferDict({}, persistent=True)
        self.spectral_compress_original = BufferDict({}, persistent=False)  # base weight while merged
        self.spectral_compress_rho: dict[str, float] = {}
        self.spectral_compress_clusters: dict[str, int] = {}
        self.spectral_compress_forward_mode: dict[str, str] = {}
        self.spectral_compress_settings: dict[str, dict] = {}
        self.frozen_peft_weight_names: dict[str, tuple[str, ...]] = {}  # per instance (BaseTunerLayer's is shared)
        self._pending: set[str] = set()  # allocated from a recorded layout, waiting for load_state_dict
        self._dense_cache: dict[str, tuple[tuple, torch.Tensor]] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs

        self.in_features, self.out_features, self.fan_in_fan_out = linear_features(
            self.get_base_layer(), "SpectralCompress", module_name
        )

    # ---------------------------------------------------------------------------------------------------------------
    # weights
    # ---------------------------------------------------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int]:
        """`(out, in)` of the (virtual) weight matrix."""
        return (self.out_features, self.in_features)

    def _weight_matrix(self) -> torch.Tensor:
        """The base weight as an `(out, in)` matrix (a view)."""
        return weight_matrix(self.get_base_layer())

    def update_layer(
        self,
        adapter_name: str,
        rho: float,
        clusters: int,
        *,
        seed: int = 0,
        cluster_iters: int = 10,
        layout: Optional[dict] = None,
        forward_mode: str = "auto",
        inference_mode: bool = False,
        svd=None,
    ) -> dict:
        """Add the truncation of this layer's weight as adapter `adapter_name`.

        Args:
            rho (`float`): Rank fraction in (0, 1].
            clusters (`int`): Number of row clusters (1 = plain truncation).
            layout (`dict`, *optional*): A recorded layout (`{"shape", "sizes", "ranks"}`). When given, the factors
                are allocated with these shapes and filled by `load_state_dict` (no SVD); the recorded shape must
                match this layer.
            svd (`tuple`, *optional*): Precomputed `(U, S, V)` of the weight, reused when `clusters == 1`.

        Returns:
            `dict`: the layout of the new factors.
        """
        self.spectral_compress_rho[adapter_name] = float(rho)
        self.spectral_compress_clusters[adapter_name] = int(clusters)
        self.spectral_compress_forward_mode[adapter_name] = forward_mode
        self.spectral_compress_settings[adapter_name] = {"seed": seed, "cluster_iters": cluster_iters}
        self.frozen_peft_weight_names[adapter_name] = self.adapter_layer_names
        if layout is not None:
            recorded = tuple(layout.get("shape", ()))
            if recorded != self.shape:
                raise ValueError(
                    f"SpectralCompress adapter {adapter_name!r} was made for module {self.module_name!r} with weight "
                    f"shape {list(recorded)} (out, in), but this model's {self.module_name!r} has shape "
                    f"{list(self.shape)}; the adapter belongs to a different model."
                )
            sizes, ranks = [int(n) for n in layout["sizes"]], [int(k) for k in layout["ranks"]]
            if len(sizes) != clusters or len(ranks) != clusters or sum(sizes) != self.out_features:
                raise ValueError(
                    f"SpectralCompress layout of module {self.module_name!r} is inconsistent: sizes={sizes}, "
                    f"ranks={ranks}, clusters={clusters}, out_features={self.out_features}"
                )
            dtype = self._weight_matrix().dtype
            self._store(
                adapter_name,
                us=torch.zeros(sum(n * k for n, k in zip(sizes, ranks)), dtype=dtype),
                v=torch.zeros(self.in_features, sum(ranks), dtype=dtype),
                rows=torch.arange(self.out_features),
                sizes=torch.tensor([[n, k] for n, k in zip(sizes, ranks)], dtype=torch.long).reshape(-1, 2),
            )
            self._pending.add(adapter_name)
        else:
            self._materialize(adapter_name, svd=svd)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)
        return self.layout(adapter_name)

    def _compute_factors(self, adapter_name: str, svd=None):
        weight = self._weight_matrix().detach()
        settings = self.spectral_compress_settings[adapter_name]
        factors = multi_subspace_factors(
            weight,
            self.spectral_compress_rho[adapter_name],
            self.spectral_compress_clusters[adapter_name],
            seed=settings["seed"],
            n_iter=settings["cluster_iters"],
            svd=svd,
        )
        us = torch.cat([f.us.reshape(-1) for f in factors])
        v = torch.cat([f.v for f in factors], dim=1)
        rows = torch.cat([f.rows for f in factors])
        sizes = torch.tensor([[f.us.shape[0], f.us.shape[1]] for f in factors], dtype=torch.long)
        return us, v, rows, sizes

    def _store(self, adapter_name, *, us, v, rows, sizes) -> None:
        dtype = self._weight_matrix().dtype
        device = self._weight_matrix().device
        self.spectral_compress_us[adapter_name] = nn.Parameter(us.to(device=device, dtype=dtype).contiguous())
        self.spectral_compress_v[adapter_name] = nn.Parameter(v.to(device=device, dtype=dtype).contiguous())
        self.spectral_compress_rows[adapter_name] = rows.to(device=device, dtype=torch.long)
        self.spectral_compress_sizes[adapter_name] = sizes.to(device=device, dtype=torch.long)
        self._dense_cache.pop(adapter_name, None)

    def _materialize(self, adapter_name: str, svd=None) -> None:
        """Compute the factors from the base weight (SVD / clustering)."""
        if self.merged:
            raise RuntimeError(f"cannot compute SpectralCompress factors of {self.module_name!r} while merged")
        us, v, rows, sizes = self._compute_factors(adapter_name, svd=svd)
        if adapter_name in self._pending:
            expected = self.layout(adapter_name)
            got = {"sizes": sizes[:, 0].tolist(), "ranks": sizes[:, 1].tolist()}
            if expected["sizes"] != got["sizes"] or expected["ranks"] != got["ranks"]:
                raise RuntimeError(
                    f"SpectralCompress factors of module {self.module_name!r} were allocated from a recorded layout "
                    f"{expected} but never loaded, and recomputing them gives a different layout {got}. Load the "
                    "adapter with PeftModel.from_pretrained, or create it from a config without `layout`."
                )
            with torch.no_grad():
                self.spectral_compress_us[adapter_name].copy_(us)
                self.spectral_compress_v[adapter_name].copy_(v)
                self.spectral_compress_rows[adapter_name].copy_(rows)
                self.spectral_compress_sizes[adapter_name].copy_(sizes)
            self._dense_cache.pop(adapter_name, None)
            self._pending.discard(adapter_name)
        else:
            self._store(adapter_name, us=us, v=v, rows=rows, sizes=sizes)

    def _ensure_ready(self, adapter_name: str) -> None:
        if adapter_name in self._pending:
            warnings.warn(
                f"SpectralCompress factors of {self.module_name!r} (adapter {adapter_name!r}) were never loaded; "
                "computing them from the base weight."
            )
            self._materialize(adapter_name)

    def layout(self, adapter_name: str) -> dict:
        """`{"shape": [out, in], "sizes": [n_c...], "ranks": [k_c...]}` of adapter `adapter_name`."""
        sizes = self.spectral_compress_sizes[adapter_name]
        return {"shape": list(self.shape), "sizes": sizes[:, 0].tolist(), "ranks": sizes[:, 1].tolist()}

    def _blocks(self, adapter_name: str) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """`(row_offset, col_offset, us_c, v_c)` per cluster, views into the stored tensors."""
        us_flat = self.spectral_compress_us[adapter_name]
        v = self.spectral_compress_v[adapter_name]
        out, pos_u, pos_k, pos_r = [], 0, 0, 0
        for n, k in self.spectral_compress_sizes[adapter_name].tolist():
            out.append((pos_r, pos_k, us_flat[pos_u : pos_u + n * k].view(n, k), v[:, pos_k : pos_k + k]))
            pos_u, pos_k, pos_r = pos_u + n * k, pos_k + k, pos_r + n
        return out

    def num_factor_params(self, adapter_name: str) -> int:
        """Number of stored factor values (`US` and `V`) of adapter `adapter_name`."""
        return self.spectral_compress_us[adapter_name].numel() + self.spectral_compress_v[adapter_name].numel()

    def factored_macs(self, adapter_name: str) -> int:
        """Multiply-adds per token of the factored forward."""
        sizes = self.spectral_compress_sizes[adapter_name].tolist()
        return sum(k * (self.in_features + n) for n, k in sizes)

    def _use_factored(self, adapter_name: str) -> bool:
        mode = self.spectral_compress_forward_mode.get(adapter_name, "auto")
        if mode == "auto":
            return self.factored_macs(adapter_name) < self.in_features * self.out_features
        return mode == "factored"

    def get_truncated_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense truncated matrix `W'` of shape `(out, in)`."""
        self._ensure_ready(adapter_name)
        rows = self.spectral_compress_rows[adapter_name]
        v = self.spectral_compress_v[adapter_name]
        weight = torch.zeros(self.shape, dtype=v.dtype, device=v.device)
        for r0, _, us_c, v_c in self._blocks(adapter_name):
            weight = weight.index_copy(0, rows[r0 : r0 + us_c.shape[0]], us_c @ v_c.T)
        return weight

    def _dense(self, adapter_name: str) -> torch.Tensor:
        us, v = self.spectral_compress_us[adapter_name], self.spectral_compress_v[adapter_name]
        if torch.is_grad_enabled() and (us.requires_grad or v.requires_grad):
            return self.get_truncated_weight(adapter_name)
        key = (us._version, v._version, us.data_ptr(), v.data_ptr(), us.device, us.dtype)
        cached = self._dense_cache.get(adapter_name)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, self.get_truncated_weight(adapter_name))
            self._dense_cache[adapter_name] = cached
        return cached[1]

    def _factored_forward(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        self._ensure_ready(adapter_name)
        blocks = self._blocks(adapter_name)
        z = x @ self.spectral_compress_v[adapter_name]
        if len(blocks) == 1:
            return z @ blocks[0][2].T
        parts = [z[..., k0 : k0 + us_c.shape[1]] @ us_c.T for _, k0, us_c, _ in blocks]
        y_perm = torch.cat(parts, dim=-1)
        inverse = torch.argsort(self.spectral_compress_rows[adapter_name])
        return y_perm.index_select(-1, inverse)


class SpectralCompressLinear(nn.Module, SpectralCompressLayer):
    """A `nn.Linear` (or transformers `Conv1D`) whose weight is replaced by a low-rank truncation."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        rho: float,
        clusters: int,
        module_name: str = "",
        **kwargs,
    ) -> None:
        super().__init__()
        SpectralCompressLayer.__init__(self, base_layer, module_name=module_name)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, rho, clusters, **kwargs)

    def _active_compress_adapter(self) -> Optional[str]:
        active = [a for a in self.active_adapters if a in self.spectral_compress_us]
        if len(active) > 1:
            raise ValueError(
                f"Module {self.module_name!r}: several SpectralCompress adapters are active ({active}); a truncation "
                "replaces the weight, so only one can act on a module at a time."
            )
        return active[0] if active else None

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Write the dense truncated matrix into the base weight (keeping a copy of the original for `unmerge`).

        Args:
            safe_merge (`bool`, defaults to `False`): Check the merged weight for NaN/inf before writing it.
            adapter_names (`list[str]`, *optional*): Adapters to merge (default: the active ones); at most one per
                module, since a truncation replaces the weight.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        adapter_names = [a for a in adapter_names if a in self.spectral_compress_us]
        if not adapter_names:
            return
        if len(adapter_names) > 1 or self.merged:
            raise ValueError(
                f"Module {self.module_name!r}: cannot merge {adapter_names} (already merged: {self.merged_adapters});"
                " a truncation replaces the weight, so only one SpectralCompress adapter can be merged."
            )
        adapter = adapter_names[0]

        def truncated(weight: torch.Tensor) -> torch.Tensor:
            new = self.get_truncated_weight(adapter).to(weight.dtype)
            return new.T.contiguous() if self.fan_in_fan_out else new

        params = [self.spectral_compress_us[adapter], self.spectral_compress_v[adapter]]
        self.spectral_compress_original[adapter] = write_merged_weight(
            self.get_base_layer(), truncated, None, params, safe_merge=safe_merge, adapter_name=adapter
        )
        self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Restore the original base weight exactly."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        adapter = self.merged_adapters.pop()
        restore_weight(self.get_base_layer(), self.spectral_compress_original[adapter])
        del self.spectral_compress_original[adapter]

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """`W' - W` in the layout of the base weight (for tools that expect a delta; the adapter itself replaces W)."""
        new = self.get_truncated_weight(adapter_name)
        delta = new - self._weight_matrix().to(new.dtype)
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        adapter = self._active_compress_adapter()
        if adapter is None:
            return self.base_layer(x, *args, **kwargs)
        previous_dtype = x.dtype
        x = self._cast_input_dtype(x, self.spectral_compress_v[adapter].dtype)
        if self._use_factored(adapter):
            result = self._factored_forward(adapter, x)
        else:
            result = x @ self._dense(adapter).T
        bias = self.get_base_layer().bias
        if bias is not None:
            result = result + bias.to(result.dtype)
        return result.to(previous_dtype)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        loaded = []
        for adapter in list(self._pending):
            names = {
                "spectral_compress_us": self.spectral_compress_us,
                "spectral_compress_v": self.spectral_compress_v,
                "spectral_compress_rows": self.spectral_compress_rows,
                "spectral_compress_sizes": self.spectral_compress_sizes,
            }
            present = {
                n: state_dict[f"{prefix}{n}.{adapter}"] for n in names if f"{prefix}{n}.{adapter}" in state_dict
            }
            if not present:
                continue
            bad = [
                f"{n}: checkpoint {list(t.shape)} vs layer {list(names[n][adapter].shape)}"
                for n, t in present.items()
                if tuple(t.shape) != tuple(names[n][adapter].shape)
            ]
            if bad:
                error_msgs.append(
                    f"SpectralCompress adapter {adapter!r} does not fit module {self.module_name!r} "
                    f"(weight shape {list(self.shape)}): " + "; ".join(bad)
                )
            elif len(present) == len(names):
                loaded.append(adapter)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        for adapter in loaded:
            self._pending.discard(adapter)
            self._dense_cache.pop(adapter, None)

    def __repr__(self) -> str:
        return "spectral_compress." + super().__repr__()
