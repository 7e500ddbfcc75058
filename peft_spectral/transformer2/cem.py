"""Few-shot adaptation (Transformer² strategy 3): mixing weights α searched with the cross-entropy method.

Given n labelled shots of a new task, the adapted `z' = Σ_k α_k z_k` (one α per expert, or one per expert per
transformer block) is scored by its accuracy on the shots, ties broken by the mean log-likelihood of the gold
answers. The cross-entropy method samples a population of α from a Gaussian (clamped to `[0, 1]`), keeps the elite
fraction and refits the Gaussian to it.

A fitness evaluation only rewrites the `z` of one mixture adapter (a `K × r` matrix product per layer: no SVD, no
new adapter) and scores the shots' options with one forward pass per shot batch ([`peft_spectral.option_scoring`]).
The best mixture is saved as an ordinary SVF adapter ([`FewShotMixer.save`]).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..evaluation import evaluate
from ..option_scoring import encode_examples, multiple_choice_metrics, score_option_ids
from ..prompting import pad_token_id
from ..tasks import Example
from ..tuners.svf.model import combine_svf_adapters, layer_index
from .library import ExpertLibrary


logger = logging.getLogger(__name__)

Fitness = Union[float, tuple[float, ...]]

MIXTURE_METADATA = "transformer2_mixture.json"


@dataclass
class CEMConfig:
    """Settings of the cross-entropy method (defaults: the Transformer² reference).

    Args:
        population (`int`): Candidates per generation (reference 32).
        elite_fraction (`float`): Fraction of the population kept to refit the distribution (reference 0.2).
        init_std (`float`): Initial standard deviation of every α (reference 0.5).
        init_mean (`float`, *optional*): Initial mean of every α; `None` uses `1 / K` (the plain average of the
            experts).
        clamp (`tuple[float, float]`): Bounds of α (reference `[0, 1]`).
        generations (`int`): Number of generations (reference 50).
        min_std (`float`): Floor of the standard deviation (0 = none).
        seed (`int`): Seed of the sampling; the search is deterministic given a deterministic fitness.
        progress (`bool`): Show a tqdm progress bar.
    """

    population: int = 32
    elite_fraction: float = 0.2
    init_std: float = 0.5
    init_mean: Optional[float] = None
    clamp: tuple[float, float] = (0.0, 1.0)
    generations: int = 50
    min_std: float = 0.0
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.population < 2:
            raise ValueError(f"CEMConfig.population must be >= 2, got {self.population}")
        if not 0 < self.elite_fraction <= 1:
            raise ValueError(f"CEMConfig.elite_fraction must be in (0, 1], got {self.elite_fraction}")
        if self.init_std <= 0:
            raise ValueError(f"CEMConfig.init_std must be > 0, got {self.init_std}")
        if self.generations < 1:
            raise ValueError(f"CEMConfig.generations must be >= 1, got {self.generations}")
        lo, hi = self.clamp
        if not lo < hi:
            raise ValueError(f"CEMConfig.clamp must be (low, high) with low < high, got {self.clamp}")
        if self.min_std < 0:
            raise ValueError(f"CEMConfig.min_std must be >= 0, got {self.min_std}")

    @property
    def num_elites(self) -> int:
        """Elite count: `ceil(elite_fraction · population)`, at least 1."""
        return max(1, math.ceil(self.elite_fraction * self.population - 1e-9))


@dataclass
class CEMResult:
    """The outcome of [`cross_entropy_method`].

    Args:
        best_alpha (`torch.Tensor`): The best α seen (shape of the search).
        best_fitness (`tuple[float, ...]`): Its fitness.
        history (`list[dict]`): Per generation: `best` (best so far, first fitness component), `generation_best`,
            `generation_mean`, `elite_mean`, `std_mean` (mean σ after refitting), `best_fitness` (full tuple).
        evaluations (`int`): Fitness evaluations done.
        seconds (`float`): Wall time.
        mean, std (`torch.Tensor`): The final Gaussian.
    """

    best_alpha: torch.Tensor
    best_fitness: tuple[float, ...]
    history: list[dict[str, Any]]
    evaluations: int
    seconds: float
    mean: torch.Tensor
    std: torch.Tensor

    @property
    def fitness_curve(self) -> list[float]:
        """Best-so-far fitness (first component) after each generation."""
        return [h["best"] for h in self.history]

    def to_dict(self) -> dict[str, Any]:
        return {
            "best_alpha": self.best_alpha.tolist(),
            "best_fitness": list(self.best_fitness),
            "history": self.history,
            "evaluations": self.evaluations,
            "seconds": self.seconds,
        }


def _as_tuple(value: Fitness) -> tuple[float, ...]:
    if isinstance(value, tuple):
        return tuple(float(v) for v in value)
    return (float(value),)


def _key(f: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(-math.inf if math.isnan(v) else v for v in f)  # NaN ranks last


def cross_entropy_method(
    fitness: Callable[[torch.Tensor], Fitness],
    shape: Union[int, Sequence[int]],
    config: Optional[CEMConfig] = None,
) -> CEMResult:
    """Maximise `fitness(α)` over α in a box with the cross-entropy method.

    Args:
        fitness (`Callable`): Maps an α tensor (float64, `shape`) to a float or a tuple compared lexicographically
            (e.g. `(accuracy, mean_loglik)`: accuracy first, log-likelihood breaks ties). Higher is better.
        shape (`int` or `Sequence[int]`): Shape of α, e.g. `K` or `(K, L)`.
        config ([`CEMConfig`], *optional*): Settings; the reference defaults when `None`.

    Returns:
        [`CEMResult`]
    """
    config = config or CEMConfig()
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if any(s < 1 for s in shape):
        raise ValueError(f"shape must be positive, got {shape}")
    lo, hi = config.clamp
    gen = torch.Generator().manual_seed(config.seed)
    k = shape[0]
    init_mean = config.init_mean if config.init_mean is not None else 1.0 / k
    mean = torch.full(shape, float(init_mean), dtype=torch.float64).clamp(lo, hi)
    std = torch.full(shape, float(config.init_std), dtype=torch.float64)
    best_alpha, best_fit = None, None
    history: list[dict[str, Any]] = []
    evaluations = 0
    start = time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(total=config.generations * config.population, desc="CEM", disable=not config.progress)
    try:
        for g in range(config.generations):
            noise = torch.randn((config.population, *shape), generator=gen, dtype=torch.float64)
            samples = (mean + std * noise).clamp(lo, hi)
            fits = []
            for cand in samples:
                fits.append(_as_tuple(fitness(cand.clone())))
                evaluations += 1
                bar.update(1)
            order = sorted(range(len(fits)), key=lambda i: _key(fits[i]), reverse=True)
            if best_fit is None or _key(fits[order[0]]) > _key(best_fit):
                best_fit, best_alpha = fits[order[0]], samples[order[0]].clone()
            elites = samples[order[: config.num_elites]]
            mean = elites.mean(0)
            std = (
                elites.std(0, unbiased=False).clamp_min(config.min_std)
                if len(elites) > 1
                else std.clamp_min(config.min_std)
            )
            firsts = [f[0] for f in fits]
            history.append(
                {
                    "generation": g,
                    "best": best_fit[0],
                    "best_fitness": list(best_fit),
                    "generation_best": fits[order[0]][0],
                    "generation_mean": sum(firsts) / len(firsts),
                    "elite_mean": sum(fits[i][0] for i in order[: config.num_elites]) / config.num_elites,
                    "std_mean": float(std.mean()),
                }
            )
            bar.set_postfix(best=f"{best_fit[0]:.4g}")
    finally:
        bar.close()
    return CEMResult(
        best_alpha=best_alpha,
        best_fitness=best_fit,
        history=history,
        evaluations=evaluations,
        seconds=time.perf_counter() - start,
        mean=mean,
        std=std,
    )


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
        # stacked expert z per layer: (K, r), and the block index of the layer
        self._stacks: list[tuple[torch.nn.Parameter, torch.Tensor, Optional[int]]] = []
        for name, layer in library.svf_layers:
            if adapter_name not in layer.svf_z:
                continue
            stack = torch.stack([layer.svf_z[e].detach().to(torch.float64) for e in self.experts])
            self._stacks.append((layer.svf_z[adapter_name], stack, layer_index(name)))
        if kind == "multiple_choice":
            self._prompts, self._options = encode_examples(library.tokenizer, self.shots)
        self.evaluations = 0

    @property
    def alpha_shape(self) -> tuple[int, ...]:
        """`(K,)` or `(K, L)`."""
        k = len(self.experts)
        return (k, self.num_layers) if self.per_layer else (k,)

    def apply(self, alpha: Union[torch.Tensor, Sequence[float], Sequence[Sequence[float]]]) -> None:
        """Write `z' = Σ_k α_k z_k` into the mixture adapter (same result as `combine_svf_adapters`)."""
        alpha = torch.as_tensor(alpha, dtype=torch.float64)
        if alpha.ndim == 1:
            alpha = alpha[:, None]
        k = len(self.experts)
        if alpha.shape[0] != k or alpha.ndim != 2 or alpha.shape[1] not in (1, self.num_layers):
            raise ValueError(f"alpha must have shape ({k},) or ({k}, {self.num_layers}), got {tuple(alpha.shape)}")
        with torch.no_grad():
            for param, stack, idx in self._stacks:
                col = alpha[:, 0] if alpha.shape[1] == 1 else alpha[:, idx if idx is not None else 0]
                param.data.copy_((col @ stack).to(param.dtype))

    def fitness(self, alpha: torch.Tensor) -> tuple[float, float]:
        """`(accuracy, mean gold log-likelihood)` of the mixture `alpha` on the shots."""
        self.apply(alpha)
        self.evaluations += 1
        lib = self.library
        with lib.use(self.adapter_name):
            if self.kind == "multiple_choice":
                scores = score_option_ids(
                    lib.model,
                    self._prompts,
                    self._options,
                    pad_id=pad_token_id(lib.tokenizer, lib.model),
                    batch_size=self.batch_size,
                )
                correct, ll = multiple_choice_metrics(scores, [ex.label for ex in self.shots])
                return sum(correct) / len(correct), ll
            res = evaluate(
                lib.model,
                lib.tokenizer,
                self.shots,
                kind=self.kind,
                mode="generate",
                batch_size=self.batch_size,
                max_new_tokens=self.max_new_tokens,
            )
            return res.accuracy, res.mean_loglik

    def search(self, config: Optional[CEMConfig] = None) -> CEMResult:
        """Run the cross-entropy method and leave the best α applied to the mixture adapter."""
        result = cross_entropy_method(self.fitness, self.alpha_shape, config)
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
            self.library.model.save_pretrained(tmp, selected_adapters=[self.adapter_name])
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
