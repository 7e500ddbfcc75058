"""Few-shot adaptation (Transformer² strategy 3): mixing weights α searched with the cross-entropy method.

Given n labelled shots of a new task, the adapted `z' = Σ_k α_k z_k` (one α per expert, or one per expert per
transformer block) is scored by its accuracy on the shots, ties broken by the mean log-likelihood of the gold
answers. The cross-entropy method samples a population of α from a Gaussian (clamped to `[0, 1]`), keeps the elite
fraction and refits the Gaussian to it.

A fitness evaluation only rewrites the `z` of one mixture adapter (a `K × r` matrix product per layer: no SVD, no
new adapter) and scores the shots' options with one forward pass per shot batch ([`peft_spectral.option_scoring`]).
The best mixture is saved as an ordinary SVF adapter by [`~peft_spectral.transformer2.mixer.FewShotMixer`].

Fitness on a few shots overfits: the reference CEM (kept as `CEMConfig(regularize=False)`) often picks a mixture
that is worse than the base model on the task. The default, regularised search
([`regularized_cross_entropy_method`]):

* splits the shots (seeded) into a *fit* part, which CEM maximises, and a *hold-out* part, which picks the result;
* mixes the experts *around the base model*, `z' = z₀ + Σ_k α_k (z_k − z₀)` with `z₀` the `z` of the unadapted
  layer (1 in linear mode; the reference's `Σ_k α_k z_k` at `α = 0` zeroes the singular values in linear mode), so
  `α = 0` is exactly the base model, and `α = e_k` is expert `k`;
* shrinks toward the base model: the search starts at `α = 0` (mean 0) and the fit fitness pays `λ · mean|α|`;
* includes the base model (`α = 0`) as a candidate, so the selected mixture is never worse than the base on the
  hold-out shots (lexicographically: accuracy, then mean log-likelihood; ties keep the base);
* stops early when the hold-out fitness has not improved for `patience` generations.

Budget (defaults, SmolLM2-135M on this machine's CPU, ~3.4 s to score 40 two-option shots, i.e. ~0.085 s per
shot): with 40 shots, hold-out 40 % → 24 fit + 16 hold-out shots; a generation costs 16 candidates × 24 shots ×
0.085 s ≈ 32.6 s plus one hold-out evaluation (16 × 0.085 ≈ 1.4 s); 12 generations ≈ 408 s, plus the base model on
both parts (≈ 3.4 s) and a final evaluation on all shots (≈ 3.4 s): ≈ 415 s ≈ 7 minutes ≤ 10 minutes. For other
shot counts [`CEMConfig.for_budget`] sizes the generations to a time budget. The reference (32 × 50 on all 40 shots)
would take 1600 × 3.4 s ≈ 90 minutes.

More than one process: under `accelerate launch --num_processes N` each generation's population is shared out across
the processes (one candidate per process per round, [`peft_spectral.distributed.map_across_processes`]) and the
fitness values gathered on every process; the hold-out checks run on one process and are gathered too. Every process
samples the same candidates (same seed) and takes the same decisions from the same gathered values, so all of them
end with the α that one process finds.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from ..distributed import launched_state, map_across_processes


logger = logging.getLogger(__name__)

Fitness = Union[float, tuple[float, ...]]

#: Seconds to score one shot once with SmolLM2-135M on the development CPU (40 two-option shots ≈ 3.4 s).
SECONDS_PER_SHOT = 0.085


@dataclass
class CEMConfig:
    """Settings of the cross-entropy method.

    The defaults are the regularised search sized for ≤ 10 minutes per task with 40 shots on SmolLM2-135M (see
    the module docstring); [`CEMConfig.reference`] gives the Transformer² reference (32 × 50, no regularisation).

    Args:
        population (`int`): Candidates per generation (reference 32).
        elite_fraction (`float`): Fraction of the population kept to refit the distribution (reference 0.2).
        init_std (`float`): Initial standard deviation of every α (reference 0.5).
        init_mean (`float`, *optional*): Initial mean of every α; `None` uses `0` (the base model) when
            regularising, else `1 / K` (the plain average of the experts, the reference).
        clamp (`tuple[float, float]`): Bounds of α (reference `[0, 1]`).
        generations (`int`): Number of generations (reference 50); the most, with early stopping.
        min_std (`float`): Floor of the standard deviation (0 = none).
        seed (`int`): Seed of the sampling and of the fit/hold-out split; the search is deterministic given a
            deterministic fitness.
        progress (`bool`): Show a tqdm progress bar.
        regularize (`bool`): The regularised search (hold-out selection, shrinkage toward the base model, base
            model as a candidate, early stopping); `False` is the plain reference CEM.
        holdout_fraction (`float`): Fraction of the shots held out to select the result (regularised search; at
            least one shot on each side).
        l1_penalty (`float`): `λ`: the fit fitness's first component pays `λ · mean|α|` (regularised search).
        patience (`int`): Generations without hold-out improvement before stopping (regularised search; `0`: never
            stop early).
    """

    population: int = 16
    elite_fraction: float = 0.25
    init_std: float = 0.5
    init_mean: Optional[float] = None
    clamp: tuple[float, float] = (0.0, 1.0)
    generations: int = 12
    min_std: float = 0.0
    seed: int = 0
    progress: bool = True
    regularize: bool = True
    holdout_fraction: float = 0.4
    l1_penalty: float = 0.01
    patience: int = 4

    @classmethod
    def reference(cls, **overrides: Any) -> CEMConfig:
        """The Transformer² reference settings: population 32, elite 20 %, 50 generations, no regularisation."""
        values = {"population": 32, "elite_fraction": 0.2, "generations": 50, "regularize": False}
        values.update(overrides)
        return cls(**values)

    @classmethod
    def for_budget(
        cls,
        n_shots: int,
        *,
        seconds: float = 600.0,
        seconds_per_shot: float = SECONDS_PER_SHOT,
        **overrides: Any,
    ) -> CEMConfig:
        """Settings whose number of generations fits `seconds` for `n_shots` shots.

        Cost model: `seconds_per_shot` per shot scored; per generation `population × n_fit` shots plus `n_hold`
        for the hold-out check; once the base model on all shots and a final evaluation on all shots.

        Args:
            n_shots (`int`): Number of labelled shots.
            seconds (`float`): Time budget of the search.
            seconds_per_shot (`float`): Measured time to score one shot once (default: SmolLM2-135M on CPU).
            **overrides: Other [`CEMConfig`] fields (e.g. `population`).
        """
        config = cls(**overrides)
        n_fit, n_hold = split_sizes(n_shots, config.holdout_fraction) if config.regularize else (n_shots, 0)
        per_generation = (config.population * n_fit + n_hold) * seconds_per_shot
        fixed = 2 * n_shots * seconds_per_shot if config.regularize else 0.0
        generations = int((seconds - fixed) // per_generation) if per_generation > 0 else 1
        if generations < 1:
            raise ValueError(
                f"a budget of {seconds} s does not fit one generation of {config.population} candidates on "
                f"{n_fit} shots ({per_generation:.1f} s); lower population or the number of shots"
            )
        config.generations = generations
        return config

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
        if not 0 < self.holdout_fraction < 1:
            raise ValueError(f"CEMConfig.holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if self.l1_penalty < 0:
            raise ValueError(f"CEMConfig.l1_penalty must be >= 0, got {self.l1_penalty}")
        if self.patience < 0:
            raise ValueError(f"CEMConfig.patience must be >= 0, got {self.patience}")

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
        evaluations (`int`): Fitness calls made (including those answered from a cache, see `cache_hits`).
        seconds (`float`): Wall time.
        mean, std (`torch.Tensor`): The final Gaussian.
        holdout_fitness (`tuple[float, ...]`, *optional*): Regularised search: hold-out fitness of `best_alpha`.
        base_holdout_fitness (`tuple[float, ...]`, *optional*): Regularised search: hold-out fitness of the base
            model (`α = 0`); `holdout_fitness` is never below it.
        stopped_early (`bool`): Regularised search: stopped before `generations` for lack of hold-out progress.
        shot_evaluations (`int`): Shots scored in all (evaluations × shots per evaluation), when known.
        cache_hits (`int`): Candidates whose fitness came from the cache (identical α, e.g. clamped to the bounds).
        regularized (`bool`): Whether the regularised search produced this result.
        split (`dict`, *optional*): Shot indices of the `fit` and `holdout` parts ([`FewShotMixer.search`]).
    """

    best_alpha: torch.Tensor
    best_fitness: tuple[float, ...]
    history: list[dict[str, Any]]
    evaluations: int
    seconds: float
    mean: torch.Tensor
    std: torch.Tensor
    holdout_fitness: Optional[tuple[float, ...]] = None
    base_holdout_fitness: Optional[tuple[float, ...]] = None
    stopped_early: bool = False
    shot_evaluations: Optional[int] = None
    cache_hits: int = 0
    regularized: bool = False
    split: Optional[dict[str, list[int]]] = None

    @property
    def fitness_curve(self) -> list[float]:
        """Best-so-far fitness (first component) after each generation."""
        return [h["best"] for h in self.history]

    @property
    def evaluations_per_second(self) -> float:
        """Fitness evaluations per second of wall time."""
        return self.evaluations / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        out = {
            "best_alpha": self.best_alpha.tolist(),
            "best_fitness": list(self.best_fitness),
            "history": self.history,
            "evaluations": self.evaluations,
            "seconds": self.seconds,
            "evaluations_per_second": self.evaluations_per_second,
            "regularized": self.regularized,
            "cache_hits": self.cache_hits,
        }
        if self.shot_evaluations is not None:
            out["shot_evaluations"] = self.shot_evaluations
            out["shots_per_second"] = self.shot_evaluations / self.seconds if self.seconds > 0 else float("inf")
        if self.regularized:
            out["holdout_fitness"] = list(self.holdout_fitness) if self.holdout_fitness else None
            out["base_holdout_fitness"] = list(self.base_holdout_fitness) if self.base_holdout_fitness else None
            out["stopped_early"] = self.stopped_early
        if self.split is not None:
            out["split"] = self.split
        return out


def _as_tuple(value: Fitness) -> tuple[float, ...]:
    if isinstance(value, tuple):
        return tuple(float(v) for v in value)
    return (float(value),)


def _key(f: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(-math.inf if math.isnan(v) else v for v in f)  # NaN ranks last


def _refit(elites: torch.Tensor, std: torch.Tensor, min_std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampling Gaussian refitted to the elites (a single elite keeps the previous spread), floored at `min_std`."""
    spread = elites.std(0, unbiased=False) if len(elites) > 1 else std
    return elites.mean(0), spread.clamp_min(min_std)


def _quiet(config: CEMConfig, processes) -> bool:
    """No progress bar when not asked for, nor on the processes other than the main one."""
    return not config.progress or (processes is not None and not processes.is_main_process)


def _population_fitness(
    score: Callable[[torch.Tensor], tuple[float, ...]], samples: torch.Tensor, processes, bar
) -> list[tuple[float, ...]]:
    """`[score(c) for c in samples]`, the candidates shared out across launched processes (see the module docstring)."""
    return map_across_processes(
        lambda cand: score(cand.clone()), list(samples), processes, on_round=lambda done: bar.update(len(done))
    )


def _on_one_process(score: Callable[[torch.Tensor], tuple[float, ...]], alpha: torch.Tensor, processes):
    """`score(alpha)` computed on one process and gathered on all of them (every process gets the same value)."""
    return map_across_processes(lambda a: score(a.clone()), [alpha], processes)[0]


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

    Under `accelerate launch` with several processes every process must make the same call: each generation's
    candidates are shared out and their fitness gathered, and every process returns the same result.

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
    processes = launched_state()
    from tqdm.auto import tqdm

    bar = tqdm(total=config.generations * config.population, desc="CEM", disable=_quiet(config, processes))
    try:
        for g in range(config.generations):
            noise = torch.randn((config.population, *shape), generator=gen, dtype=torch.float64)
            samples = (mean + std * noise).clamp(lo, hi)
            fits = _population_fitness(lambda a: _as_tuple(fitness(a)), samples, processes, bar)
            evaluations += len(fits)
            order = sorted(range(len(fits)), key=lambda i: _key(fits[i]), reverse=True)
            if best_fit is None or _key(fits[order[0]]) > _key(best_fit):
                best_fit, best_alpha = fits[order[0]], samples[order[0]].clone()
            mean, std = _refit(samples[order[: config.num_elites]], std, config.min_std)
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


def split_sizes(n_shots: int, holdout_fraction: float) -> tuple[int, int]:
    """`(n_fit, n_hold)` for a fit/hold-out split of `n_shots`; at least one on each side when `n_shots >= 2`."""
    if n_shots < 2:
        return n_shots, 0
    n_hold = min(n_shots - 1, max(1, round(holdout_fraction * n_shots)))
    return n_shots - n_hold, n_hold


def regularized_cross_entropy_method(
    fitness: Callable[[torch.Tensor], Fitness],
    holdout: Callable[[torch.Tensor], Fitness],
    shape: Union[int, Sequence[int]],
    config: Optional[CEMConfig] = None,
) -> CEMResult:
    """CEM on a fit fitness, the result selected by a hold-out fitness, shrunk toward `α = 0` (the base model).

    Each generation samples `population` candidates around the mean (clamped), ranks them by the fit fitness
    minus `l1_penalty · mean|α|` (on its first component), refits the Gaussian to the elites (their unclamped
    values, so that starting at the bound 0 the spread does not collapse there), and evaluates the
    generation's best on `holdout`. The result is the candidate with the best hold-out fitness among the base model
    (`α` at the lower clamp bound, normally 0, evaluated first) and the generation bests; ties keep the earlier
    one, so the base model wins unless a mixture is strictly better on the hold-out. The search stops after
    `patience` generations without hold-out improvement.

    Args:
        fitness (`Callable`): Fit fitness of an α (float or tuple compared lexicographically; higher is better).
        holdout (`Callable`): Hold-out fitness of an α.
        shape (`int` or `Sequence[int]`): Shape of α.
        config ([`CEMConfig`], *optional*): Settings (`init_mean=None` starts at 0).

    Under `accelerate launch` with several processes every process must make the same call: each generation's
    candidates are shared out, the hold-out checks run on one process, all values are gathered, and every process
    returns the same result.

    Returns:
        [`CEMResult`] with `best_fitness` = `holdout_fitness` = the selected α's hold-out fitness.
    """
    config = config or CEMConfig()
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if any(s < 1 for s in shape):
        raise ValueError(f"shape must be positive, got {shape}")
    lo, hi = config.clamp
    gen = torch.Generator().manual_seed(config.seed)
    init_mean = config.init_mean if config.init_mean is not None else 0.0
    mean = torch.full(shape, float(init_mean), dtype=torch.float64).clamp(lo, hi)
    std = torch.full(shape, float(config.init_std), dtype=torch.float64)
    base_alpha = torch.full(shape, float(min(max(0.0, lo), hi)), dtype=torch.float64)
    evaluations = 0
    start = time.perf_counter()

    def penalised(alpha: torch.Tensor) -> tuple[float, ...]:
        fit = _as_tuple(fitness(alpha.clone()))
        return (fit[0] - config.l1_penalty * float(alpha.abs().mean()), *fit[1:])

    processes = launched_state()

    def held_out(alpha: torch.Tensor) -> tuple[float, ...]:
        return _as_tuple(holdout(alpha))

    base_hold = _on_one_process(held_out, base_alpha, processes)
    best_alpha, best_hold = base_alpha.clone(), base_hold
    evaluations += 1
    history: list[dict[str, Any]] = []
    stale = 0
    stopped_early = False
    from tqdm.auto import tqdm

    bar = tqdm(total=config.generations * config.population, desc="CEM", disable=_quiet(config, processes))
    try:
        for g in range(config.generations):
            noise = torch.randn((config.population, *shape), generator=gen, dtype=torch.float64)
            raw = mean + std * noise
            samples = raw.clamp(lo, hi)
            fits = _population_fitness(penalised, samples, processes, bar)
            evaluations += len(fits)
            order = sorted(range(len(fits)), key=lambda i: _key(fits[i]), reverse=True)
            champion = samples[order[0]].clone()
            hold = _on_one_process(held_out, champion, processes)
            evaluations += 1
            improved = _key(hold) > _key(best_hold)
            if improved:
                best_alpha, best_hold = champion, hold
            stale = 0 if improved else stale + 1
            # unclamped elites: the spread does not collapse at a bound
            mean, std = _refit(raw[order[: config.num_elites]], std, config.min_std)
            firsts = [f[0] for f in fits]
            history.append(
                {
                    "generation": g,
                    "best": best_hold[0],
                    "best_fitness": list(best_hold),
                    "generation_best": fits[order[0]][0],
                    "generation_best_holdout": list(hold),
                    "generation_mean": sum(firsts) / len(firsts),
                    "elite_mean": sum(fits[i][0] for i in order[: config.num_elites]) / config.num_elites,
                    "std_mean": float(std.mean()),
                }
            )
            bar.set_postfix(holdout=f"{best_hold[0]:.4g}")
            if config.patience and stale >= config.patience and g + 1 < config.generations:
                stopped_early = True
                break
    finally:
        bar.close()
    return CEMResult(
        best_alpha=best_alpha,
        best_fitness=best_hold,
        history=history,
        evaluations=evaluations,
        seconds=time.perf_counter() - start,
        mean=mean,
        std=std,
        holdout_fitness=best_hold,
        base_holdout_fitness=base_hold,
        stopped_early=stopped_early,
        regularized=True,
    )
