"""Few-shot CEM that generalises: fit/hold-out selection, the base model as a candidate, the plain reference kept."""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model
from testing_utils import build_tiny_llama, build_tiny_tokenizer

import peft_spectral
from peft_spectral.tasks import Example
from peft_spectral.transformer2 import (
    CEMConfig,
    ExpertLibrary,
    FewShotMixer,
    cross_entropy_method,
    regularized_cross_entropy_method,
)
from peft_spectral.transformer2.cem import SECONDS_PER_SHOT, split_sizes
from peft_spectral.transformer2.library import svf_z_snapshot


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def plain_cem(fitness, k, population, elites, generations, init_std, seed):
    """The reference CEM written out plainly: Gaussian samples clamped to [0, 1], elites refit mean and std."""
    gen = torch.Generator().manual_seed(seed)
    mean = torch.full((k,), 1.0 / k, dtype=torch.float64)
    std = torch.full((k,), init_std, dtype=torch.float64)
    best, best_fit = None, None
    for _ in range(generations):
        samples = (mean + std * torch.randn((population, k), generator=gen, dtype=torch.float64)).clamp(0, 1)
        fits = [fitness(s) for s in samples]
        order = sorted(range(population), key=lambda i: fits[i], reverse=True)
        if best_fit is None or fits[order[0]] > best_fit:
            best, best_fit = samples[order[0]].clone(), fits[order[0]]
        top = samples[order[:elites]]
        mean = top.mean(0)
        std = top.std(0, unbiased=False) if elites > 1 else std
    return best, best_fit


def test_regularized_cem_never_worse_than_base_on_holdout():
    # the fit shots reward large alpha (overfitting); the hold-out shots prefer the base model
    fit = lambda a: (float(a.sum()), 0.0)  # noqa: E731
    hold = lambda a: (-float(a.sum()), 0.0)  # noqa: E731
    config = CEMConfig(population=8, generations=5, progress=False, patience=0)
    result = regularized_cross_entropy_method(fit, hold, 3, config)
    assert torch.equal(result.best_alpha, torch.zeros(3, dtype=torch.float64))
    assert result.holdout_fitness == result.base_holdout_fitness == (0.0, 0.0)
    # the plain CEM on the same fit fitness runs off to the bound
    plain = cross_entropy_method(fit, 3, CEMConfig.reference(population=8, generations=5, progress=False))
    assert float(plain.best_alpha.sum()) > 2.0 and hold(plain.best_alpha)[0] < result.holdout_fitness[0]
    # when the hold-out agrees with the fit part, a real mixture is selected, strictly better than the base
    target = torch.tensor([0.7, 0.1, 0.4], dtype=torch.float64)
    both = lambda a: (-float(((a - target) ** 2).sum()),)  # noqa: E731
    config = CEMConfig(population=16, generations=15, progress=False, patience=0)
    found = regularized_cross_entropy_method(both, both, 3, config)
    assert found.holdout_fitness[0] > found.base_holdout_fitness[0]
    assert torch.allclose(found.best_alpha, target, atol=0.15)


def test_regularized_cem_stops_early_and_penalises_l1():
    calls = []

    def hold(a):
        calls.append(1)
        return (0.5,)

    result = regularized_cross_entropy_method(
        lambda a: (1.0,), hold, 2, CEMConfig(population=4, generations=20, patience=3, progress=False)
    )
    assert result.stopped_early and len(result.history) == 3 and len(calls) == 1 + 3
    assert result.evaluations == 1 + 3 * (4 + 1)
    # with a flat fit fitness the penalty makes the smallest alpha each generation's champion
    seen = []
    regularized_cross_entropy_method(
        lambda a: (1.0,),
        lambda a: seen.append(a.clone()) or (0.0,),
        3,
        CEMConfig(population=6, generations=1, l1_penalty=0.1, seed=2, progress=False, patience=0),
    )
    gen = torch.Generator().manual_seed(2)
    samples = (0.5 * torch.randn((6, 3), generator=gen, dtype=torch.float64)).clamp(0, 1)
    assert torch.equal(seen[1], samples[int(samples.abs().mean(1).argmin())])


def test_budget_sizes():
    assert split_sizes(40, 0.4) == (24, 16) and split_sizes(1, 0.4) == (1, 0) and split_sizes(2, 0.9) == (1, 1)
    default = CEMConfig()
    n_fit, n_hold = split_sizes(40, default.holdout_fraction)
    estimate = (default.generations * (default.population * n_fit + n_hold) + 2 * 40) * SECONDS_PER_SHOT
    assert estimate <= 600  # the documented default budget (≈ 415 s) for 40 shots on SmolLM2-135M
    sized = CEMConfig.for_budget(64, seconds=600)
    n_fit, n_hold = split_sizes(64, sized.holdout_fraction)
    cost = (sized.generations * (sized.population * n_fit + n_hold) + 2 * 64) * SECONDS_PER_SHOT
    assert cost <= 600 < cost + (sized.population * n_fit + n_hold) * SECONDS_PER_SHOT
    reference = CEMConfig.reference()
    assert (reference.population, reference.generations, reference.regularize) == (32, 50, False)
    with pytest.raises(ValueError, match="budget"):
        CEMConfig.for_budget(1000, seconds=10)
    with pytest.raises(ValueError, match="holdout_fraction"):
        CEMConfig(holdout_fraction=1.0)


# --------------------------------------------------------------------------------------------- on a tiny library


@pytest.fixture(scope="module")
def expert_specs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cem_experts")
    specs = []
    for seed, name in enumerate(("arith", "logic"), start=1):
        tok = build_tiny_tokenizer()
        base = build_tiny_llama(tok)
        base.name_or_path = "tiny-llama"
        model = get_peft_model(
            base, peft_spectral.SVFConfig(target_modules=["gate_proj", "up_proj"], svd_cache_dir=str(root / "svd"))
        )
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, layer in model.base_model.svf_layers():
                z = layer.svf_z["default"]
                z.copy_(1 + 0.5 * torch.randn(z.shape, generator=gen))
        model.save_pretrained(str(root / name))
        specs.append({"name": name, "source": str(root / name)})
    return specs


@pytest.fixture
def library(expert_specs):
    tok = build_tiny_tokenizer()
    base = build_tiny_llama(tok)
    base.name_or_path = "tiny-llama"
    return ExpertLibrary.load(base, tok, expert_specs)


def _shots(n):
    return [
        Example(prompt=f"Is {i} even?", target=("yes", "no")[i % 2], choices=("yes", "no"), label=i % 2)
        for i in range(n)
    ]


def test_mixer_regularized_search_holdout_not_below_base(library):
    mixer = FewShotMixer(library, _shots(6), batch_size=6)
    config = CEMConfig(population=4, generations=3, progress=False, seed=1)
    result = mixer.search(config)
    fit_idx, hold_idx = result.split["fit"], result.split["holdout"]
    assert sorted(fit_idx + hold_idx) == list(range(6)) and len(hold_idx) == 2 and not set(fit_idx) & set(hold_idx)
    assert mixer.split(1, 0.4) == (fit_idx, hold_idx)  # seeded
    assert result.regularized and tuple(result.holdout_fitness) >= tuple(result.base_holdout_fitness)
    assert mixer.around_base
    assert result.best_fitness == mixer.fitness(result.best_alpha)  # all shots
    assert result.evaluations_per_second > 0 and result.shot_evaluations > 0
    summary = result.to_dict()
    assert {"evaluations_per_second", "holdout_fitness", "base_holdout_fitness", "split"} <= set(summary)
    # alpha = 0 is exactly the base model when mixing around the base
    mixer.apply(torch.zeros(2))
    z = svf_z_snapshot(library.model, mixer.adapter_name)
    assert all(torch.equal(v, torch.ones_like(v)) for v in z.values())
    # alpha = e_k is expert k
    mixer.apply(torch.tensor([0.0, 1.0]))
    logic = svf_z_snapshot(library.model, "logic")
    assert all(torch.allclose(v, logic[n]) for n, v in svf_z_snapshot(library.model, mixer.adapter_name).items())
    # identical candidates are scored once
    before = mixer.evaluations
    mixer.fitness(torch.zeros(2), hold_idx)
    assert mixer.evaluations == before and mixer.cache_hits > 0


def test_mixer_regularize_false_is_the_plain_reference(library):
    shots = _shots(4)
    config = CEMConfig.reference(population=10, generations=2, seed=3, progress=False)
    mixer = FewShotMixer(library, shots, batch_size=4)
    result = mixer.search(config)
    assert not result.regularized and not mixer.around_base and result.holdout_fitness is None
    assert len(result.history) == 2 and result.evaluations == 20
    other = FewShotMixer(library, shots, batch_size=4, adapter_name="other_mix")
    expected, expected_fit = plain_cem(other.fitness, 2, population=10, elites=2, generations=2, init_std=0.5, seed=3)
    assert torch.equal(result.best_alpha, expected) and result.best_fitness == expected_fit
    # the reference mixes z directly: the same z as combine_svf_adapters
    mixer.apply(result.best_alpha)
    peft_spectral.combine_svf_adapters(library.model, library.names, result.best_alpha, "combined")
    mixed, combined = svf_z_snapshot(library.model, mixer.adapter_name), svf_z_snapshot(library.model, "combined")
    assert all(torch.allclose(mixed[n], combined[n], atol=1e-6) for n in mixed)
    assert not math.isnan(result.best_fitness[1])
