"""[`FewShotMixer`]: few-shot mixing of saved SVF experts (Transformer² strategy 3) on a model, saved as an SVF adapter.

The search itself (reference and regularised cross-entropy method) is in [`peft_spectral.transformer2.cem`]; this
module scores candidate mixtures on the shots (cached encodings, one mixture adapter whose `z` is rewritten) and saves
or uploads the result.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..evaluation import evaluate
from ..model_utils import pad_token_id
from ..option_scoring import encode_examples, multiple_choice_metrics, score_option_ids
from ..tasks import Example
from ..tuners.svf.model import combine_svf_adapters, layer_index
from .cem import CEMConfig, CEMResult, cross_entropy_method, regularized_cross_entropy_method, split_sizes
from .library import ExpertLibrary


logger = logging.getLogger(__name__)

MIXTURE_METADATA = "transformer2_mixture.json"


def _check_shots(shots: Sequence[Example], kind: str) -> list[Example]:
    shots = list(shots or [])
    if not shots:
        raise ValueError("the few-shot set `shots` is empty; CEM needs labelled examples of the new task")
    for i, ex in enumerate(shots):
        if kind == "multiple_choice":
            if not ex.choices:
                raise ValueError(f"shots[{i}] has no choices but kind='multiple_choice'")
            if ex.label is None or not 0 <= ex.label < len(ex.choices):
                raise ValueError(f"shots[{i}] has no valid label (label={ex.label!r}, {len(ex.choices)} choices)")
        elif not ex.target:
            raise ValueError(f"shots[{i}] has no target answer; few-shot CEM needs labelled shots")
    return shots


class FewShotMixer:
    """Search, apply and save mixtures `z' = Σ_k α_k z_k` of the experts of a library.

    Args:
        library ([`ExpertLibrary`]): The experts.
        shots (`Sequence[Example]`): Labelled examples of the new task.
        kind (`str`): `"multiple_choice"` (scored by option log-likelihood, fast) or `"generation"`/`"code"`
            (scored by greedy generation, slow).
        experts (`Sequence[str]`, *optional*): Experts to mix (default: all).
        per_layer (`bool`): One α per expert per transformer block instead of one per expert.
        batch_size (`int`): Shots per forward pass.
        adapter_name (`str`): Name of the working mixture adapter added to the model.
        max_new_tokens (`int`): Generation budget for non-multiple-choice kinds.
    """

    def __init__(
        self,
        library: ExpertLibrary,
        shots: Sequence[Example],
        *,
        kind: str = "multiple_choice",
        experts: Optional[Sequence[str]] = None,
        per_layer: bool = False,
        batch_size: int = 8,
        adapter_name: str = "t2_mixture",
        max_new_tokens: int = 32,
    ):
        if kind not in ("multiple_choice", "generation", "code"):
            raise ValueError(f"kind must be 'multiple_choice', 'generation' or 'code', got {kind!r}")
        self.library = library
        self.kind = kind
        self.shots = _check_shots(shots, kind)
        self.experts = list(experts) if experts is not None else library.names
        if not self.experts:
            raise ValueError("`experts` is empty; nothing to mix")
        unknown = [e for e in self.experts if e not in library.experts]
        if unknown:
            raise ValueError(f"unknown expert(s) {unknown}; the library has {library.names}")
        self.per_layer = per_layer
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.adapter_name = adapter_name
        self.num_layers = library.num_layers
        model = library.model
        if adapter_name not in model.peft_config:
            active = model.active_adapter
            combine_svf_adapters(model, self.experts, [1.0 / len(self.experts)] * len(self.experts), adapter_name)
            model.set_adapter(active)
        if adapter_name not in library.extra_adapters:
            library.register_adapter(adapter_name, "mixture")
        # stacked expert z per layer: (K, r), the block index of the layer, and the z that is the base layer
        self._stacks: list[tuple[torch.nn.Parameter, torch.Tensor, Optional[int], float]] = []
        for name, layer in library.svf_layers:
            if adapter_name not in layer.svf_z:
                continue
            stack = torch.stack([layer.svf_z[e].detach().to(torch.float64) for e in self.experts])
            identity = 1.0 if layer.svf_settings[self.experts[0]]["mode"] == "linear" else 0.0
            self._stacks.append((layer.svf_z[adapter_name], stack, layer_index(name), identity))
        #: How α mixes the experts: `False`: `z' = Σ_k α_k z_k` (the reference); `True`: around the base model,
        #: `z' = z₀ + Σ_k α_k (z_k − z₀)` with `z₀` the `z` of the unadapted layer (1 in linear mode), so `α = 0` is
        #: the base model exactly. [`search`] sets it from `CEMConfig.regularize`.
        self.around_base = False
        if kind == "multiple_choice":  # encoded once: the tokens do not change between candidates
            self._prompts, self._options = encode_examples(library.tokenizer, self.shots)
        self._labels = [ex.label for ex in self.shots]
        self._pad_id = pad_token_id(library.tokenizer, library.model)
        self._cache: dict[tuple, tuple[float, float]] = {}
        self.evaluations = 0
        self.cache_hits = 0
        self.shots_scored = 0

    @property
    def alpha_shape(self) -> tuple[int, ...]:
        """`(K,)` or `(K, L)`."""
        k = len(self.experts)
        return (k, self.num_layers) if self.per_layer else (k,)

    def apply(self, alpha: Union[torch.Tensor, Sequence[float], Sequence[Sequence[float]]]) -> None:
        """Write the mixture `alpha` into the mixture adapter.

        `z' = Σ_k α_k z_k` (same result as `combine_svf_adapters`), or, with `around_base`,
        `z' = z₀ + Σ_k α_k (z_k − z₀)` (`α = 0` is the base model).
        """
        alpha = torch.as_tensor(alpha, dtype=torch.float64)
        if alpha.ndim == 1:
            alpha = alpha[:, None]
        k = len(self.experts)
        if alpha.shape[0] != k or alpha.ndim != 2 or alpha.shape[1] not in (1, self.num_layers):
            raise ValueError(f"alpha must have shape ({k},) or ({k}, {self.num_layers}), got {tuple(alpha.shape)}")
        with torch.no_grad():
            for param, stack, idx, identity in self._stacks:
                col = alpha[:, 0] if alpha.shape[1] == 1 else alpha[:, idx if idx is not None else 0]
                z = identity + col @ (stack - identity) if self.around_base else col @ stack
                param.copy_(z.to(param.dtype))  # not through `.data`: the composed-weight cache sees the change

    def split(self, seed: int = 0, holdout_fraction: float = 0.4) -> tuple[list[int], list[int]]:
        """Seeded split of the shot indices into a fit part and a hold-out part (see [`split_sizes`]).

        With a single shot both parts are that shot.
        """
        n_fit, n_hold = split_sizes(len(self.shots), holdout_fraction)
        order = torch.randperm(len(self.shots), generator=torch.Generator().manual_seed(seed)).tolist()
        if n_hold == 0:
            return order, order
        return sorted(order[:n_fit]), sorted(order[n_fit:])

    def fitness(self, alpha: torch.Tensor, shots: Optional[Sequence[int]] = None) -> tuple[float, float]:
        """`(accuracy, mean gold log-likelihood)` of the mixture `alpha` on the shots (or the shots of the indices).

        Results are cached by `(α, shots)`: a candidate seen before (e.g. clamped to the same bounds) is not
        scored again.

        Args:
            alpha (`torch.Tensor`): Mixing weights of shape [`alpha_shape`].
            shots (`Sequence[int]`, *optional*): Indices of the shots to score; all when `None`.
        """
        alpha = torch.as_tensor(alpha, dtype=torch.float64)
        idx = list(range(len(self.shots))) if shots is None else list(shots)
        key = (self.around_base, tuple(idx), tuple(alpha.shape), alpha.contiguous().numpy().tobytes())
        if key in self._cache:
            self.cache_hits += 1
            return self._cache[key]
        self.apply(alpha)
        self.evaluations += 1
        self.shots_scored += len(idx)
        lib = self.library
        with lib.use(self.adapter_name):
            if self.kind == "multiple_choice":
                scores = score_option_ids(
                    lib.model,
                    [self._prompts[i] for i in idx],
                    [self._options[i] for i in idx],
                    pad_id=self._pad_id,
                    batch_size=self.batch_size,
                )
                correct, ll = multiple_choice_metrics(scores, [self._labels[i] for i in idx])
                value = (sum(correct) / len(correct), ll)
            else:
                res = evaluate(
                    lib.model,
                    lib.tokenizer,
                    [self.shots[i] for i in idx],
                    kind=self.kind,
                    mode="generate",
                    batch_size=self.batch_size,
                    max_new_tokens=self.max_new_tokens,
                )
                value = (res.accuracy, res.mean_loglik)
        self._cache[key] = value
        return value

    def search(self, config: Optional[CEMConfig] = None) -> CEMResult:
        """Run the cross-entropy method and leave the best α applied to the mixture adapter.

        With `config.regularize` (default) the shots are split (seeded by `config.seed`) into fit and hold-out
        parts and [`regularized_cross_entropy_method`] selects the α; the returned `best_fitness` is then that α's
        fitness on *all* shots (its hold-out fitness is `holdout_fitness`, the base model's `base_holdout_fitness`).
        With `regularize=False` it is the plain reference CEM on all shots ([`cross_entropy_method`]). Sets
        `around_base` to `config.regularize` (how α mixes the experts, see [`apply`]).
        """
        config = config or CEMConfig()
        hits, scored = self.cache_hits, self.shots_scored
        self.around_base = config.regularize
        if config.regularize:
            fit_idx, hold_idx = self.split(config.seed, config.holdout_fraction)
            result = regularized_cross_entropy_method(
                lambda a: self.fitness(a, fit_idx), lambda a: self.fitness(a, hold_idx), self.alpha_shape, config
            )
            result.best_fitness = self.fitness(result.best_alpha)
            result.split = {"fit": fit_idx, "holdout": hold_idx}
        else:
            result = cross_entropy_method(self.fitness, self.alpha_shape, config)
        result.cache_hits = self.cache_hits - hits
        result.shot_evaluations = self.shots_scored - scored
        logger.info(
            "CEM: %d fitness calls (%d cached), %.2f evaluations/s, %d shots scored in %.1f s",
            result.evaluations,
            result.cache_hits,
            result.evaluations_per_second,
            result.shot_evaluations,
            result.seconds,
        )
        self.apply(result.best_alpha)
        return result

    def save(
        self,
        output_dir: Union[str, Path],
        alpha: Optional[torch.Tensor] = None,
        *,
        result: Optional[CEMResult] = None,
        extra: Optional[dict[str, Any]] = None,
    ) -> Path:
        """Save the mixture as an ordinary SVF adapter directory (loadable with `PeftModel.from_pretrained`).

        Args:
            output_dir: Target directory (created; existing adapter files are replaced).
            alpha (`torch.Tensor`, *optional*): Mixture to save; default: `result.best_alpha`, else the current one.
            result ([`CEMResult`], *optional*): Search result, recorded in `transformer2_mixture.json`.
            extra (`dict`, *optional*): More metadata for that file.

        Returns:
            `Path`: `output_dir`.
        """
        if alpha is None and result is not None:
            alpha = result.best_alpha
        if alpha is not None:
            self.apply(alpha)
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.library.model.save_pretrained(tmp, selected_adapters=[self.adapter_name], save_embedding_layers=False)
            src = Path(tmp) / self.adapter_name if self.adapter_name != "default" else Path(tmp)
            for f in src.iterdir():
                if f.is_file():
                    shutil.copy2(f, out / f.name)
        meta = {
            "experts": [
                {
                    "name": e,
                    "source": self.library.experts[e].source,
                    "description": self.library.experts[e].description,
                }
                for e in self.experts
            ],
            "per_layer": self.per_layer,
            "mixing": "around_base" if self.around_base else "weighted_sum",
            "alpha": torch.as_tensor(alpha).tolist() if alpha is not None else None,
            "n_shots": len(self.shots),
            "kind": self.kind,
        }
        if result is not None:
            meta["search"] = result.to_dict()
        if extra:
            meta.update(extra)
        (out / MIXTURE_METADATA).write_text(json.dumps(meta, indent=2))
        return out


def push_mixture_to_hub(folder: Union[str, Path], repo_id: str, *, private: bool = False, **kwargs: Any) -> str:
    """Upload a saved mixture directory to the Hub (`huggingface_hub.HfApi.upload_folder`); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, **kwargs)
    return str(getattr(info, "commit_url", info))
