"""C2I gradient scoring, candidate handling, the LASER baseline and the search → adapter round trip."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import build_tiny_llama, build_tiny_tokenizer
from peft import PeftModel

from peft_spectral import compress
from peft_spectral.compress import (
    EvalSummary,
    Intervention,
    apply_interventions,
    apply_result,
    c2i_search,
    candidate_grid,
    compute_svds,
    find_target_modules,
    laser_search,
    score_candidates,
    singular_value_gradients,
    take_examples,
)
from peft_spectral.evaluation import answer_nll, evaluate, option_logliks
from peft_spectral.linalg import thin_svd
from peft_spectral.tasks import Example


def _text(rng, n):
    return "".join(rng.choice("abcdefghij klmnop") for _ in range(n))


def _examples(n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        choices = (_text(rng, 3), _text(rng, 3))
        out.append(Example(prompt=_text(rng, 12), target=choices[0], choices=choices, label=0))
    return out


# --- gradients ------------------------------------------------------------------------------------------------------


class _Reparametrised:
    """Replace each module's weight by U diag(σ) Vᵀ with σ a leaf tensor."""

    def __init__(self, model, svds):
        self.model, self.svds, self.sigmas, self.saved = model, svds, {}, {}

    def __enter__(self):
        for name, (u, s, v) in self.svds.items():
            module = self.model.get_submodule(name)
            self.saved[name] = module.weight
            sigma = s.clone().double().requires_grad_(True)
            self.sigmas[name] = sigma
            del module.weight
            module.weight = ((u.double() * sigma) @ v.double().T).float()
        return self.sigmas

    def __exit__(self, *exc):
        for name, param in self.saved.items():
            module = self.model.get_submodule(name)
            del module.weight
            module.weight = param


def test_singular_value_gradients_match_autograd_through_sigma(tiny_llama):
    model, tok = tiny_llama
    examples = _examples(5)
    names = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.up_proj",
        "model.layers.1.self_attn.o_proj",
    ]
    svds = compute_svds(model, names)
    grads, loss = singular_value_gradients(model, examples, names, svds=svds, tokenizer=tok, batch_size=2)
    assert all(p.grad is None for p in model.parameters())
    assert not any(p.requires_grad is False for p in model.parameters())  # flags restored

    with _Reparametrised(model, svds) as sigmas:
        ref_loss = answer_nll(model, tok, examples)
        ref_loss.backward()
    assert abs(float(ref_loss.detach()) - loss) < 1e-4  # batching (token-weighted) does not change L
    for name in names:
        ref = sigmas[name].grad.float()
        assert grads[name].shape == ref.shape
        torch.testing.assert_close(grads[name], ref, atol=2e-5, rtol=1e-3)
        assert ref.abs().max() > 1e-4  # the comparison is not vacuous


def test_first_order_score_is_minus_sum_sigma_g():
    svds = {"m": (torch.eye(4), torch.tensor([4.0, 3.0, 2.0, 1.0]), torch.eye(4))}
    grads = {"m": torch.tensor([0.1, -0.2, 0.5, 2.0])}
    ranked = score_candidates(grads, svds, rhos=[0.5, 0.25], score="first_order")
    by_rho = {c.intervention.rho: c.score for c in ranked}
    assert by_rho[0.5] == pytest.approx(-(2 * 0.5 + 1 * 2.0))
    assert by_rho[0.25] == pytest.approx(-(3 * -0.2 + 2 * 0.5 + 1 * 2.0))
    assert [c.score for c in ranked] == sorted(c.score for c in ranked)
    raw = {c.intervention.rho: c.score for c in score_candidates(grads, svds, rhos=[0.5], score="raw")}
    assert raw[0.5] == pytest.approx(-2.5)
    with pytest.raises(ValueError, match="score"):
        score_candidates(grads, svds, score="bogus")


def test_first_order_score_predicts_small_truncations(tiny_llama):
    """ΔL_k ≈ −Σ σ_i g_i: checked against the true loss change for a mild truncation."""
    model, tok = tiny_llama
    examples = _examples(4, seed=3)
    name = "model.layers.1.mlp.down_proj"
    svds = compute_svds(model, [name])
    grads, loss = singular_value_gradients(model, examples, [name], svds=svds, tokenizer=tok)
    (cand,) = score_candidates(grads, svds, rhos=[0.9])
    with apply_interventions(model, [cand.intervention]), torch.no_grad():
        true = float(answer_nll(model, tok, examples)) - loss
    assert cand.score == pytest.approx(true, rel=0.3, abs=1e-4)


# --- candidates and bad input ---------------------------------------------------------------------------------------


def test_find_target_modules_and_errors(tiny_llama):
    model, _ = tiny_llama
    names = find_target_modules(model, ["down_proj", "o_proj"], layers=[1])
    assert names == ["model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"]
    assert len(find_target_modules(model)) == 14
    assert len(find_target_modules(model, ["*_proj"])) == 14
    with pytest.raises(ValueError, match=r"match no linear module.*down_proj"):
        find_target_modules(model, ["down_proj", "w_nonexistent"])
    with pytest.raises(ValueError, match=r"layer\(s\) \[5\]"):
        find_target_modules(model, ["down_proj"], layers=[1, 5])
    with pytest.raises(ValueError, match="rho"):
        candidate_grid(names, [0.5, 1.5])
    with pytest.raises(ValueError, match="rho"):
        Intervention("x", 0.0)
    grid = candidate_grid(names, [0.9, 0.1])
    assert len(grid) == 4 and grid[0].layer == 1 and grid[0].matrix == "o_proj"


def test_take_examples_fewer_than_asked():
    ex = _examples(3)
    with pytest.warns(UserWarning, match="only 3 exist"):
        assert len(take_examples(ex, 10, "calibration")) == 3
    with pytest.raises(ValueError, match="only 3 exist"):
        take_examples(ex, 10, "calibration", strict=True)
    with pytest.raises(ValueError, match="no calibration"):
        take_examples([], 10, "calibration")
    assert len(take_examples(ex, 2, "x")) == 2


def test_apply_interventions_restores_weights_exactly(tiny_llama):
    model, _ = tiny_llama
    name = "model.layers.0.mlp.gate_proj"
    before = model.get_submodule(name).weight.detach().clone()
    with apply_interventions(model, [Intervention(name, 0.1)]):
        w = model.get_submodule(name).weight
        u, s, v = thin_svd(before)
        k = compress.rank_for(0.1, len(s))
        torch.testing.assert_close(w, (u[:, :k] * s[:k]) @ v[:, :k].T)
    assert torch.equal(model.get_submodule(name).weight, before)
    with pytest.raises(ValueError, match="several interventions"):
        with apply_interventions(model, [Intervention(name, 0.1), Intervention(name, 0.2)]):
            pass


# --- a planted helpful intervention -----------------------------------------------------------------------------------

PLANTED = "model.layers.1.mlp.down_proj"
PLANTED_RHO = 0.2  # rank 6 of 32


def _planted_problem():
    """A tiny model whose `PLANTED` weight = clean rank-6 matrix + noise orthogonal to it, and a task labelled by the
    clean model. Truncating `PLANTED` to rho=0.2 recovers the clean model exactly."""
    tok = build_tiny_tokenizer()
    clean = build_tiny_llama(tok, seed=1)
    noisy = build_tiny_llama(tok, seed=1)
    w = clean.get_submodule(PLANTED).weight.detach()
    u, s, v = thin_svd(w)
    k = 6
    clean_w = (u[:, :k] * (20 * s[:k])) @ v[:, :k].T
    noise_s = torch.linspace(0.95, 0.8, u.shape[1] - k) * 20 * s[k - 1]  # below clean's 6th singular value
    noise = (u[:, k:] * noise_s) @ v[:, k:].T
    with torch.no_grad():
        clean.get_submodule(PLANTED).weight.copy_(clean_w)
        noisy.get_submodule(PLANTED).weight.copy_(clean_w + noise)
    pool = _examples(160, seed=7)
    lc = option_logliks(clean, tok, pool, batch_size=32)
    ln = option_logliks(noisy, tok, pool, batch_size=32)
    disagree, agree = [], []
    for ex, a, b in zip(pool, lc, ln):
        label = int(torch.tensor(a).argmax())
        ex = Example(ex.prompt, ex.choices[label], ex.choices, label)
        (agree if int(torch.tensor(b).argmax()) == label else disagree).append(ex)
    assert len(disagree) >= 12, "the planted noise must change answers"
    validation = disagree[:12] + agree[:8]
    train = disagree[12:] + agree[8:]
    return noisy, tok, validation, train


@pytest.fixture(scope="module")
def planted():
    return _planted_problem()


def test_laser_finds_planted_intervention_and_resumes(planted, tmp_path):
    model, tok, validation, _ = planted
    modules = find_target_modules(model, ["up_proj", "down_proj"])
    grid = candidate_grid(modules, [0.9, 0.2])
    state = tmp_path / "laser.json"

    calls = {"n": 0}
    real = compress.default_eval_fn(tok, "multiple_choice", batch_size=32)

    def interrupted(model_, examples):
        calls["n"] += 1
        if calls["n"] > 4:
            raise KeyboardInterrupt
        return real(model_, examples)

    with pytest.raises(KeyboardInterrupt):
        laser_search(model, validation, grid, eval_fn=interrupted, state_path=state, progress=False)
    partial = json.loads(state.read_text())
    assert partial["evaluations"] == 4 and len(partial["results"]) == 3

    calls["n"] = 0
    result = laser_search(model, validation, grid, tokenizer=tok, batch_size=32, state_path=state, progress=False)
    assert result.evaluations == len(grid) + 1  # each candidate evaluated exactly once overall, plus the base
    assert result.chosen == [Intervention(PLANTED, PLANTED_RHO)]
    assert result.base.accuracy == pytest.approx(0.4)
    assert result.best.accuracy == 1.0

    # the chosen intervention as a PEFT adapter gives the same accuracy
    adapted = apply_result(model, result)
    ev = evaluate(adapted, tok, validation, kind="multiple_choice", batch_size=32)
    assert ev.accuracy == 1.0
    adapted.unload()

    # a state file of another search is refused
    with pytest.raises(ValueError, match="belongs to another search"):
        laser_search(model, validation, grid[:3], tokenizer=tok, state_path=state, progress=False)


def test_c2i_ranks_planted_intervention_and_keeps_only_improvements(planted, tmp_path):
    model, tok, validation, train = planted
    modules = find_target_modules(model, ["up_proj", "down_proj"])
    result = c2i_search(
        model, train, validation, modules, tokenizer=tok, rhos=[0.9, 0.2, 0.05], top_k=3, batch_size=16
    )
    ranked = [c.intervention for c in result.candidates]
    assert len(ranked) == len(modules) * 3
    assert Intervention(PLANTED, PLANTED_RHO) in ranked[:3]
    assert result.evaluations == 4  # base + top 3
    assert result.chosen and result.best.beats(result.base)
    assert all(c.result is None or c.result.n == len(validation) for c in result.candidates)
    # save → load of the found adapter is bit-exact
    adapted = apply_result(model, result)
    adapted.save_pretrained(tmp_path)
    base_ev = result.best.accuracy
    loaded = PeftModel.from_pretrained(adapted.unload(), tmp_path)
    assert evaluate(loaded, tok, validation, kind="multiple_choice", batch_size=32).accuracy == base_ev
    loaded.unload()


def test_c2i_keeps_nothing_when_nothing_helps(tiny_llama):
    model, tok = tiny_llama
    examples = _examples(6)
    modules = find_target_modules(model, ["down_proj"])

    def never_better(model_, ex):
        return EvalSummary(0.5, -1.0, len(ex))

    result = c2i_search(model, examples, examples, modules, tokenizer=tok, rhos=[0.5], top_k=2, eval_fn=never_better)
    assert result.chosen == [] and result.best == result.base
    with pytest.raises(ValueError, match="kept no intervention"):
        result.to_config()


def test_compress_to_impress_modes_on_a_task(planted):
    from peft_spectral.tasks import Task

    model, tok, validation, train = planted
    task = Task("planted", "multiple_choice", train=train, validation=validation, test=validation)
    modules = find_target_modules(model, ["up_proj", "down_proj"], layers=[1])
    std = compress.compress_to_impress(
        model, tok, task, modules, mode="standard", n_grad=50, rhos=[0.9, 0.2], top_k=2, batch_size=32
    )
    assert std.method == "c2i-standard" and std.base.n == len(validation)
    assert std.chosen == [Intervention(PLANTED, PLANTED_RHO)]
    with pytest.warns(UserWarning, match="only 20 exist"):
        cl = compress.compress_to_impress(
            model,
            tok,
            task,
            modules,
            mode="clustered",
            n_grad=50,
            n_eval=100,
            clusters=2,
            rhos=[0.9, 0.2],
            top_k=2,
            batch_size=32,
        )
    assert cl.method == "c2i-clustered" and all(iv.clusters == 2 for iv in cl.chosen)
    assert cl.to_config().modules == {iv.module: {"rho": iv.rho, "clusters": 2} for iv in cl.chosen}
    with pytest.raises(ValueError, match="only 20 exist"):
        compress.compress_to_impress(model, tok, task, modules, mode="clustered", n_eval=100, strict=True)
    with pytest.raises(ValueError, match="mode"):
        compress.compress_to_impress(model, tok, task, modules, mode="fast")


def test_shared_scores_and_base_are_counted_honestly(planted):
    model, tok, validation, train = planted
    modules = find_target_modules(model, ["up_proj", "down_proj"], layers=[1])
    scores = compress.c2i_scores(model, train[:40], modules, tokenizer=tok, batch_size=32)
    scores.timings["gradient_s"] += 100.0  # make the shared cost visible
    base = compress.default_eval_fn(tok, "multiple_choice", batch_size=32)(model, validation)
    base.seconds = 50.0
    own = c2i_search(model, train[:40], validation, modules, tokenizer=tok, rhos=[0.9, 0.2], top_k=2, batch_size=32)
    shared = c2i_search(
        model,
        train[:40],
        validation,
        modules,
        tokenizer=tok,
        rhos=[0.9, 0.2],
        top_k=2,
        batch_size=32,
        scores=scores,
        base=base,
    )
    assert [c.intervention for c in shared.candidates] == [c.intervention for c in own.candidates]
    assert shared.chosen == own.chosen and shared.evaluations == own.evaluations == 3
    assert shared.wall_time_s > 150.0 and shared.timings["scoring_shared"]
    laser = laser_search(
        model, validation, candidate_grid(modules, [0.2]), tokenizer=tok, batch_size=32, base=base, progress=False
    )
    assert laser.evaluations == 3 and laser.wall_time_s > 50.0 and laser.base.accuracy == base.accuracy
    with pytest.raises(ValueError, match="do not cover"):
        c2i_search(model, train[:40], validation, find_target_modules(model, ["o_proj"]), tokenizer=tok, scores=scores)


def test_svds_from_the_on_disk_cache_give_the_same_gradients(tiny_llama, tmp_path):
    from peft_spectral.svd_cache import SVDCache

    model, tok = tiny_llama
    names = ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.down_proj", "model.layers.0.self_attn.k_proj"]
    ref = compute_svds(model, names)
    cache = SVDCache(tmp_path)
    cold = compute_svds(model, names, cache=cache)
    warm = compute_svds(model, names, cache=cache)
    assert cache.misses == 3 and cache.hits == 3
    examples = _examples(4, seed=5)
    g_ref, _ = singular_value_gradients(model, examples, names, svds=ref, tokenizer=tok)
    g_warm, _ = singular_value_gradients(model, examples, names, svds=warm, tokenizer=tok)
    for name in names:
        u, s, v = warm[name]
        w = model.get_submodule(name).weight.detach()
        torch.testing.assert_close((u * s) @ v.T, w, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(s, ref[name][1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g_warm[name], g_ref[name], atol=1e-5, rtol=1e-3)
        torch.testing.assert_close(cold[name][1], warm[name][1])
