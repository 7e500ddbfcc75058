"""SVF tuner layers: a trainable scale per singular value of a frozen weight.

Notation: `W` is the base weight in `(out, in)` orientation, `m = min(out, in)`, `σ` its singular values, `Q` the
singular vectors of the smaller side (see [`peft_spectral.svd_cache`]), `k` the number of adapted values and
`s ∈ R^k` the scales of the active adapter(s). With `D = diag(s - 1)` and `Q_k` the top-`k` columns of `Q`,

    W' = W (I + Q_k D Q_kᵀ)    when Q = V (in <= out)
    W' = (I + Q_k D Q_kᵀ) W    when Q = U (out < in)

which equals `U diag(σ ⊙ s) Vᵀ` on the top-`k` subspace and keeps the rest of the spectrum. Three ways to compute an
output, per call and per matrix the cheapest that applies:

* fast factored (the default, `SVFConfig(fast_factored=True)`): the layer also keeps `P = W Q` (right) or
  `P = Qᵀ W` (left), i.e. `U Σ` or `Σ Vᵀ`, and computes `((x Q) ⊙ s) Pᵀ` or `((x Pᵀ) ⊙ s) Qᵀ` *instead of* the
  base matmul: `tokens·m²` extra multiply-adds per direction (forward, and backward to the input), one more
  weight-sized buffer, and an output at `s = 1` that matches the base up to float rounding. Used where more than
  half of the singular values are adapted (`2k > m`); `P` is only kept for such layers.
* exact factored (`fast_factored=False`, or `2k <= m`): transform the input (`x + ((x Q_k) ⊙ (s-1)) Q_kᵀ`) or the
  output, then the base matmul: `2·tokens·m·k` extra multiply-adds, and exactly the base model when `s = 1` (bit
  for bit: the correction is `0`), needing only the smaller side's factors.
* composed (when no gradient is needed, `SVFConfig.compose_inference=True`): `W'` built once per change of `z`
  (`out·in·m` multiply-adds with `P`, `2·out·in·k` without), cached, and each forward runs the base layer's one
  matmul with it: sampling and evaluation at the merged model's cost, the base weight untouched. Composed at a
  decoding step, or once the tokens run at this `z` reach the break-even (see [`peft_spectral.tuners.svf.composed`]
  for that rule, when `W'` is rebuilt, where it is not used, and its memory).
* recomposed per call: build `W'` for this call only, `2·out·in·k` extra; chosen, where the composed form does not
  apply, only when no gradient is needed and it is cheaper than the factored forms.

Dtypes: `Q` and `P` are kept in the layer's factor dtype (`SVFConfig.factor_dtype`; by default the base weight's
dtype when it is bfloat16/float16, else float32), and the matmuls with them run in that dtype, as the base layer's
do; the scales `s` (from a float32 `z`) are applied in float32 before the product is rounded to it, so that a small
change of `z` is not lost to a 16-bit `s`. Merging and recomposing compute `W'` in float32 (or wider).

When `s` needs a gradient, a dense delta form never beats the fast factored one; a weight recomposed once per step
(gradient of `s` from `diag(Pᵀ (gᵀ x) Q)`) does only on near-square matrices with more than about `3m` tokens per
step, and is not implemented (the arithmetic is in docs/svf.md).
"""

from __future__ import annotations

import warnings
import zlib
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils.integrations import gather_params_ctx
from torch import nn

from ...svd_cache import SpectralFactors
from .._checks import check_finite_adapter
from .._linear import linear_features, weight_matrix
from .._merge import restore_weight, write_merged_weight
from .composed import ComposedWeightCache, decoding_step_tokens, is_sharded
from .config import SVFConfig
from .factor_dtype import resolve_factor_dtype, scaled_matmul
from .mixed_batch import mixed_batch_forward


#: Standard deviation of the random `z` of `SVFConfig(init_weights=False)` (around `init_value`).
RANDOM_INIT_STD = 0.5


class SVFLayer(BaseTunerLayer):
    """Mixin holding the SVF state of one targeted layer.

    Attributes:
        svf_z (`nn.ParameterDict`): The trainable vector `z` of each adapter (the only saved tensors).
        svf_S, svf_Q (buffers): Singular values (float32) and smaller-side singular vectors (in the factor dtype),
            shared by all adapters of the layer and never saved.
        svf_P (buffer or `None`): `W Q` or `Qᵀ W` (in the factor dtype) where the fast factored form is used.
        svf_composed ([`ComposedWeightCache`]): The composed weight `W'` of the last adapter set used without
            gradient (see [`peft_spectral.tuners.svf.composed`]).
        svf_compose_override (`bool` or `None`): Set by `composed_inference(model, enabled)`; `None` follows the
            adapters' `SVFConfig.compose_inference`.
        svf_decoding_steps_left (`int` or `None`): Decoding steps left in the current generation (set by
            `generation_length`, which `generate` of an SVF `PeftModel` enters); `None` outside one.
        svf_decoding_steps_later (`int`): Decoding steps that later generations at the same `z` will run (set by
            `later_decoding_steps`, e.g. for an evaluation's remaining batches); 0 outside one.
    """

    adapter_layer_names: tuple[str, ...] = ("svf_z",)
    other_param_names: tuple[str, ...] = ("svf_settings",)

    def __init__(
        self,
        base_layer: nn.Module,
        factors: SpectralFactors,
        module_name: str = "",
        factor_dtype: str = "auto",
        **kwargs: Any,
    ) -> None:
        self.base_layer = base_layer
        self.module_name = module_name
        self.svf_z = nn.ParameterDict({})
        self.svf_settings: dict[str, dict[str, Any]] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._svf_checked: dict[str, tuple[int, int]] = {}  # adapter -> (data_ptr, _version) of the last finite z
        self.svf_composed = ComposedWeightCache()
        self.svf_compose_override: Optional[bool] = None
        self.svf_decoding_steps_left: Optional[int] = None
        self.svf_decoding_steps_later: int = 0

        base = self.get_base_layer()
        self.in_features, self.out_features, self.fan_in_fan_out = linear_features(base, "SVF", module_name)
        m = min(self.out_features, self.in_features)
        if tuple(factors.S.shape) != (m,) or tuple(factors.Q.shape) != (m, m):
            raise ValueError(
                f"SVF factors of shape S{tuple(factors.S.shape)}, Q{tuple(factors.Q.shape)} do not fit a weight of "
                f"shape ({self.out_features}, {self.in_features})"
            )
        self.svf_side = factors.side
        # a zero weight (σ = 0): every scale leaves it unchanged; known once here, so the forward needs no host sync
        self._svf_zero_weight = bool(m == 0 or float(factors.S.max()) <= 0)
        weight = weight_matrix(base)
        dtype = resolve_factor_dtype(factor_dtype, weight.dtype)
        self.register_buffer("svf_S", factors.S.to(weight.device), persistent=False)
        self.register_buffer("svf_Q", factors.Q.to(device=weight.device, dtype=dtype), persistent=False)
        self.register_buffer("svf_P", None, persistent=False)
        # the base weight before the first merge (a buffer, so that `.to()` moves it along); exact unmerge
        self.register_buffer("svf_weight_backup", None, persistent=False)

    @property
    def svf_factor_dtype(self) -> torch.dtype:
        """The dtype of `Q` and `P`, and of the forward's matmuls with them (see `SVFConfig.factor_dtype`)."""
        return self.svf_Q.dtype

    @property
    def svf_compute_dtype(self) -> torch.dtype:
        """The dtype of the scales, of merging and of recomposing `W'`: float32 (or wider), even for 16-bit factors."""
        return torch.promote_types(self.svf_Q.dtype, torch.float32)

    def _q(self) -> torch.Tensor:
        return self.svf_Q.to(self.svf_compute_dtype)

    @property
    def svf_rank(self) -> int:
        """Number of singular values of the weight, `min(out, in)`."""
        return int(self.svf_S.shape[0])

    def update_layer(self, adapter_name: str, config: SVFConfig, current_key: str = "") -> None:
        """Add an adapter: a `z` of length `min(config.rank, m)`.

        With `config.init_weights=True` the layer is the base layer at initialisation (up to `init_noise_std`); with
        `False`, `z` is drawn at random around `init_value` (standard deviation [`RANDOM_INIT_STD`], from torch's
        global generator), so that the adapter is not the identity. `z` takes the dtype of the base weight, as
        PEFT's adapters do (`get_peft_model(..., autocast_adapter_dtype=True)` then upcasts fp16/bf16 to fp32).
        """
        k = min(config.rank or self.svf_rank, self.svf_rank)
        z = torch.full((k,), float(config.init_value), dtype=torch.float32)
        if not config.init_weights:
            z += RANDOM_INIT_STD * torch.randn(k)
        elif config.init_noise_std > 0:
            gen = torch.Generator().manual_seed(config.init_seed * 1_000_003 + zlib.crc32(current_key.encode()))
            z += config.init_noise_std * torch.randn(k, generator=gen)
        weight = weight_matrix(self.get_base_layer())
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        self.svf_z[adapter_name] = nn.Parameter(z.to(device=self.svf_S.device, dtype=dtype))
        self._svf_checked.pop(adapter_name, None)
        self.svf_settings[adapter_name] = {
            "mode": config.mode,
            "max_mult": float(config.max_mult),
            "rank": k,
            "compose": bool(getattr(config, "compose_inference", True)),
        }
        self.svf_composed.clear()
        wanted = resolve_factor_dtype(getattr(config, "factor_dtype", "auto"), weight.dtype)
        if wanted != self.svf_factor_dtype:
            warnings.warn(
                f"SVF: the factors of a layer are shared by its adapters and kept in {self.svf_factor_dtype}; the "
                f"factor_dtype of adapter '{adapter_name}' ({wanted}) is not applied",
                UserWarning,
                stacklevel=2,
            )
        if getattr(config, "fast_factored", False) and self._fast_form(k, needs_factor=False) and self.svf_P is None:
            self.svf_P = self._scaled_factor()
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _scaled_factor(self) -> torch.Tensor:
        """`W Q = U Σ` (right side, `(out, m)`) or `Qᵀ W = Σ Vᵀ` (left side, `(m, in)`) of the current base weight.

        Computed in float32 (or wider) and rounded once to the factor dtype.
        """
        base = self.get_base_layer()
        with torch.no_grad(), gather_params_ctx(base.weight):  # DeepSpeed ZeRO-3: the full weight, as for the SVD
            w = weight_matrix(base).to(self.svf_compute_dtype)
            q = self._q()
            p = (w @ q) if self.svf_side == "right" else (q.T @ w)
            return p.to(self.svf_factor_dtype)

    # ------------------------------------------------------------------ scales

    def svf_scale(self, adapter_name: str) -> torch.Tensor:
        """The per-singular-value scale `s = f(z)` of one adapter (length `k`, float32 or wider), differentiable in `z`.

        `"sigmoid"` mode: `f = max_mult · sigmoid(z)` rescaled so that `Σ σ ⊙ f = Σ σ`, i.e.
        `s_i = Σσ · sigmoid(z_i) / Σ_j σ_j sigmoid(z_j)` (`max_mult` cancels). It is computed in log space
        (`logsigmoid`, `logsumexp`), so that it stays finite for any finite `z`, including `z = ±1e4` where
        `sigmoid(z)` underflows to 0 and the direct ratio is `0 / 0`.

        Raises:
            `ValueError`: when `z` holds NaN or inf, naming the adapter and the module.
        """
        z = self.svf_z[adapter_name]
        self._check_finite_z(adapter_name, z)
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        settings = self.svf_settings[adapter_name]
        if settings["mode"] == "linear":
            return z
        if self._svf_zero_weight:
            return torch.ones_like(z)
        sigma = self.svf_S[: z.shape[0]].to(z.dtype)
        total = sigma.sum()
        log_f = F.logsigmoid(z)
        log_f = log_f - log_f.max().detach()  # shift-invariant; keeps the exponents near 0 for |z| ~ 1e4
        return total * torch.exp(log_f - torch.logsumexp(log_f + torch.log(sigma), dim=0))

    def _check_finite_z(self, adapter_name: str, z: torch.Tensor) -> None:
        """Raise on a non-finite `z`; checked once per change of `z` (a host sync), not on every forward."""
        key = (z.data_ptr(), z._version)
        if self._svf_checked.get(adapter_name) == key:
            return
        check_finite_adapter(z.detach(), "SVF", adapter_name, self.module_name, "z")
        self._svf_checked[adapter_name] = key

    def _combined_scale(self, adapter_names: list[str]) -> Optional[torch.Tensor]:
        """`Π_a s_a` over the given adapters (padded with 1 to the longest `k`), or `None` if none applies."""
        scales = [self.svf_scale(a) for a in adapter_names if a in self.svf_z]
        if not scales:
            return None
        k = max(s.shape[0] for s in scales)
        total = None
        for s in scales:
            if s.shape[0] < k:
                s = torch.cat([s, s.new_ones(k - s.shape[0])])
            total = s if total is None else total * s
        return total

    def _combined_delta(self, adapter_names: list[str]) -> Optional[torch.Tensor]:
        """`Π_a s_a - 1` over the given adapters (padded with 1 to the longest `k`), or `None` if none applies."""
        scale = self._combined_scale(adapter_names)
        return None if scale is None else scale - 1

    def delta_weight(self, delta: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`W' - W` in `(out, in)` orientation for the correction `delta = s - 1`.

        Args:
            delta (`torch.Tensor`): `s - 1`, length `k`.
            weight (`torch.Tensor`, *optional*): `W` in `(out, in)` orientation; the base layer's by default.
        """
        w = (weight_matrix(self.get_base_layer()) if weight is None else weight).to(self.svf_compute_dtype)
        q = self._q()[:, : delta.shape[0]]
        if self.svf_side == "right":
            return (w @ q) @ (q * delta).T
        return (q * delta) @ (q.T @ w)

    # ------------------------------------------------------------------ merge

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Write the active (or given) adapters into the base weight. The original weight is kept for `unmerge`.

        Args:
            safe_merge (`bool`): Check the merged weight for NaN/inf before writing it.
            adapter_names (`list[str]`, *optional*): Adapters to merge; the active ones when `None`.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        self.svf_composed.clear()  # a merged layer runs the base layer; the memory is not needed
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.svf_z:
                continue

            def merged(weight: torch.Tensor, name: str = name) -> torch.Tensor:
                w = weight.T if self.fan_in_fan_out else weight
                new_w = (w.to(self.svf_compute_dtype) + self.delta_weight(self._combined_delta([name]), w)).to(w.dtype)
                return new_w.T.contiguous() if self.fan_in_fan_out else new_w

            params = [self.svf_z[name]]
            self.svf_weight_backup = write_merged_weight(
                base, merged, self.svf_weight_backup, params, safe_merge=safe_merge, adapter_name=name
            )
            self.merged_adapters.append(name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter (PEFT's `BaseTunerLayer.delete_adapter`) and the composed weight cached for it."""
        self.svf_composed.clear()
        self._svf_checked.pop(adapter_name, None)
        super().delete_adapter(adapter_name)

    # ------------------------------------------------------------------ composed weight

    def composed_weight(self, adapter_names: Optional[list[str]] = None) -> torch.Tensor:
        """`W'` of the given (default: the active) adapters, `(out, in)`, in the base weight's dtype.

        The cached one when it was composed for these adapters from the current `z`, base weight and bias (see
        [`peft_spectral.tuners.svf.composed`]); otherwise composed now (in float32 or wider, rounded once, as a merge
        is) and cached in place of the previous one. With every scale at 1 it is the base weight bit for bit.

        Args:
            adapter_names (`list[str]`, *optional*): Adapters of this layer whose scales multiply.
        """
        names = tuple(a for a in (self.active_adapters if adapter_names is None else adapter_names) if a in self.svf_z)
        tensors = self._composition_inputs(names)
        weight = self.svf_composed.lookup(names, tensors)
        if weight is None:
            weight = self._compose(names)
            self.svf_composed.store(names, tensors, weight)
        return weight

    def _composition_inputs(self, names: tuple[str, ...]) -> list[torch.Tensor]:
        base = self.get_base_layer()
        tensors = [self.svf_z[a] for a in names] + [base.weight]
        if base.bias is not None:
            tensors.append(base.bias)
        return tensors

    def _compose(self, names: tuple[str, ...]) -> torch.Tensor:
        base = self.get_base_layer()
        w = weight_matrix(base)
        scale = self._combined_scale(list(names))
        # a normal tensor even inside `torch.inference_mode()`, so that later forwards outside it may use it; and
        # composed at full precision even under autocast, since later forwards without autocast reuse it
        with torch.inference_mode(False), torch.no_grad(), torch.autocast(w.device.type, enabled=False):
            if scale is None or self._svf_zero_weight:
                return w.detach().clone().contiguous()
            delta = scale - 1
            compute = self.svf_compute_dtype
            if self._fast_form(delta.shape[0]):
                # W + P diag(s - 1) Qᵀ: one matmul with the kept P (the fast form's own factors), and W exactly at s = 1
                m = self.svf_rank
                if delta.shape[0] < m:
                    delta = torch.cat([delta, delta.new_zeros(m - delta.shape[0])])
                p, q = self.svf_P.to(compute), self._q()
                correction = (p * delta) @ q.T if self.svf_side == "right" else (q * delta) @ p
            else:
                correction = self.delta_weight(delta)
            return (w.to(compute) + correction).to(w.dtype).contiguous()

    def _compose_mode(self, names: list[str]) -> str:
        """`"always"` (forced by `composed_inference(model, True)`), `"auto"` (the adapters' config) or `"never"`."""
        if self.svf_compose_override is not None:
            return "always" if self.svf_compose_override else "never"
        return "auto" if all(self.svf_settings[a].get("compose", True) for a in names) else "never"

    def compose_break_even_tokens(self, k: int) -> float:
        """Tokens after which composing `W'` for `k` adapted values has cost what it saves.

        Composing costs `out·in·m` multiply-adds with the kept `P` (`2·out·in·k` without); each token then costs
        `out·in` instead of the factored form's `m·(out + in)` (`out·in + 2·m·k` for the exact form). On
        SmolLM2-135M: 1,540 tokens for the 576×1536 MLP matrices, 576 for the square ones.
        """
        out, inn, m = self.out_features, self.in_features, self.svf_rank
        if self._fast_form(k):
            compose, per_token = out * inn * m, m * (out + inn)
        else:
            compose, per_token = 2 * out * inn * k, out * inn + 2 * m * k
        saved = per_token - out * inn
        return compose / saved if saved > 0 else float("inf")

    def _composition_pays(self, x: torch.Tensor, names: tuple[str, ...], tensors: list[torch.Tensor]) -> bool:
        """`"auto"`: compose once the tokens run without gradient at this `z`, plus those the current generation
        will still run, reach the break-even (a ski-rental rule, see `peft_spectral.tuners.svf.composed`). A decoding
        step (one new token per row) counts as `decoding_step_tokens(device)` tokens or its rows, whichever is more,
        and the steps still to come are this generation's and those later calls announced (`later_decoding_steps`);
        outside a generation of known length it composes at once."""
        tokens = x.numel() // max(x.shape[-1], 1)
        k = max(self.svf_z[a].shape[0] for a in names)
        if x.ndim >= 3 and x.shape[-2] == 1:
            left = self.svf_decoding_steps_left
            if left is None:
                return True
            step = max(tokens, decoding_step_tokens(x.device))
            self.svf_decoding_steps_left = max(left - 1, 0)
            ahead = self.svf_decoding_steps_left + self.svf_decoding_steps_later
            expected = self.svf_composed.add_tokens(names, tensors, step) + ahead * step
            return expected >= self.compose_break_even_tokens(k)
        return self.svf_composed.add_tokens(names, tensors, tokens) >= self.compose_break_even_tokens(k)

    def composed_output(self, x: torch.Tensor, adapter_names: list[str]) -> Optional[torch.Tensor]:
        """The layer's output for `x` through the (cached) composed weight of `adapter_names`, or `None` where that
        form is not used: it is turned off, the output needs a gradient (then the cached weight is freed), the
        weights are partitioned (ZeRO-3, FSDP), the base weight is not floating point, under `torch.compile`, or
        (`SVFConfig.compose_inference=True`, automatic) composing does not pay yet (see `_composition_pays`).

        Args:
            x (`torch.Tensor`): The input, `(..., in_features)`.
            adapter_names (`list[str]`): Adapters of this layer whose scales multiply (all present in `svf_z`).
        """
        if not adapter_names:
            return None
        mode = self._compose_mode(adapter_names)
        if mode == "never":
            return None
        base = self.get_base_layer()
        names = tuple(adapter_names)
        tensors = self._composition_inputs(names)
        if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in tensors)):
            self.svf_composed.clear()  # z is being trained and will change; free the memory before the backward
            return None
        if not base.weight.is_floating_point() or torch.compiler.is_compiling() or any(is_sharded(t) for t in tensors):
            return None
        weight = self.svf_composed.lookup(names, tensors)
        if weight is None:
            if mode == "auto" and not self._composition_pays(x, names, tensors):
                return None
            weight = self._compose(names)
            self.svf_composed.store(names, tensors, weight)
        bias = base.bias
        if weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            weight = weight.to(x.dtype)
            bias = None if bias is None else bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def unmerge(self) -> None:
        """Restore the base weight exactly as it was before the first merge."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        restore_weight(self.get_base_layer(), self.svf_weight_backup)
        self.svf_weight_backup = None
        self.merged_adapters.clear()


class SVFLinear(nn.Module, SVFLayer):
    """SVF around an `nn.Linear` or a transformers `Conv1D`."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: SVFConfig,
        factors: SpectralFactors,
        current_key: str = "",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        SVFLayer.__init__(
            self, base_layer, factors, module_name=current_key, factor_dtype=getattr(config, "factor_dtype", "auto")
        )
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, current_key)

    def _use_recomposed(self, x: torch.Tensor, delta: torch.Tensor) -> bool:
        if torch.is_grad_enabled() and (delta.requires_grad or x.requires_grad):
            return False
        tokens = x.numel() // max(x.shape[-1], 1)
        m, k = self.svf_rank, delta.shape[0]
        # extra multiply-adds: factored 2·tokens·m·k (fast form: tokens·m²), recomposed 2·out·in·k
        factored = tokens * m * m if self._fast_form(k) else 2 * tokens * m * k
        return factored > 2 * self.out_features * self.in_features * k

    def _fast_form(self, k: int, needs_factor: bool = True) -> bool:
        """Whether the fast factored form is cheaper for `k` adapted values (and, with `needs_factor`, `P` is kept).

        Its extra cost is `tokens·m²` multiply-adds against `2·tokens·m·k` for the exact factored form.
        """
        return (self.svf_P is not None or not needs_factor) and 2 * k > self.svf_rank

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None and not self.disable_adapters:
            return mixed_batch_forward(self, x, *args, adapter_names=adapter_names, **kwargs)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.svf_z]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        y = self.composed_output(x, active)
        if y is not None:
            return y
        scale = self._combined_scale(active)

        base = self.get_base_layer()
        if self._fast_form(scale.shape[0]) and not self._use_recomposed(x, scale):
            return self._fast_factored_forward(x, scale, base)
        delta = scale - 1
        compute_dtype = self.svf_compute_dtype
        if self._use_recomposed(x, delta):
            w = weight_matrix(base)
            new_w = (w.to(compute_dtype) + self.delta_weight(delta)).to(x.dtype)
            bias = base.bias.to(x.dtype) if base.bias is not None else None
            return F.linear(x, new_w, bias)

        q = self.svf_Q[:, : delta.shape[0]]
        if self.svf_side == "right":
            x = x + scaled_matmul(x.to(q.dtype) @ q, delta, q.T).to(x.dtype)
            return self.base_layer(x, *args, **kwargs)
        y = self.base_layer(x, *args, **kwargs)
        lin = y if base.bias is None else y - base.bias
        return y + scaled_matmul(lin.to(q.dtype) @ q, delta, q.T).to(y.dtype)

    def _fast_factored_forward(self, x: torch.Tensor, scale: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """`U Σ (s ⊙ Vᵀ x)` from the kept scaled factor `P` (see `SVFConfig.fast_factored`)."""
        m, k = self.svf_rank, scale.shape[0]
        if k < m:
            scale = torch.cat([scale, scale.new_ones(m - k)])
        q, p = self.svf_Q, self.svf_P
        xc = x.to(q.dtype)
        if self.svf_side == "right":
            y = scaled_matmul(xc @ q, scale, p.T)
        else:
            y = scaled_matmul(xc @ p.T, scale, q.T)
        if base.bias is not None:
            y = y + base.bias.to(y.dtype)
        return y.to(x.dtype)

    def _apply(self, fn, *args: Any, **kwargs: Any):
        # `.to()`, `.cuda()`, `.half()`: a composed weight on the old device or in the old dtype is only memory now
        cache = getattr(self, "svf_composed", None)
        if cache is not None:
            cache.clear()
        return super()._apply(fn, *args, **kwargs)

    def __repr__(self) -> str:
        return "svf." + super().__repr__()
