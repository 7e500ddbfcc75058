"""SVF's composed weight (`SVFConfig.compose_inference`): forwards without gradient through a cached `W'`.

* the composed form gives the factored form's logits (float32: within 1e-4 absolute on logits of magnitude ~10) and
  the same greedy completions token for token, on Llama (`nn.Linear`) and GPT-2 (`Conv1D`), fast and exact forms;
* the cache follows every change of the adapted weight: optimizer steps (also fused AdamW, which does not bump the
  tensor version), in-place writes, `load_state_dict`, `set_adapter`, merge/unmerge, disabling, deleting and re-adding
  an adapter, a replaced base weight, `clear_composed_weights` after a `.data` write. Each test first fills the
  cache, then changes something and compares with the factored form: without the invalidation it would fail;
* training keeps the factored form (same gradients, the cache freed by a forward that needs a gradient);
* plain TRL (`GRPOTrainer` / `RLOOTrainer` with `peft_config=SVFConfig(...)`) composes once per generation round and
  reaches the z of a run without it (also with `steps_per_generation > 1` and gradient accumulation); the base weights
  stay bit-identical;
* the embedded model (slow): logits (within 5e-3) and greedy completions of the composed form against the factored
  form.
"""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from testing_utils import build_tiny_gpt2, build_tiny_llama, build_tiny_tokenizer

from peft_spectral import SVFConfig
from peft_spectral.tuners.svf import composed as composed_module
from peft_spectral.tuners.svf.composed import (
    clear_composed_weights,
    composed_inference,
    composed_weight_bytes,
    is_sharded,
    later_decoding_steps,
    new_tokens_of_generate,
)
from peft_spectral.tuners.svf.layer import SVFLinear


TARGETS = ["gate_proj", "up_proj", "down_proj"]
#: composed vs factored logits, float32 tiny models (logits up to ~10): the two differ by the order of summation only
LOGITS_ATOL = 1e-4


def svf_model(arch: str = "llama", seed: int = 0, **config):
    tok = build_tiny_tokenizer()
    base = build_tiny_llama(tok) if arch == "llama" else build_tiny_gpt2(tok)
    config.setdefault("target_modules", "all-linear" if arch == "llama" else r".*\.(c_attn|c_proj|c_fc)$")
    config.setdefault("init_weights", False)  # a random z: the adapted model differs from the base
    torch.manual_seed(seed)
    model = get_peft_model(base, SVFConfig(use_svd_cache=False, **config))
    return model.eval(), tok


def layers(model) -> list[SVFLinear]:
    return [m for m in model.modules() if isinstance(m, SVFLinear)]


def prompt_ids(tok, n: int = 2):
    texts = ["The quick brown fox", "Q: what is 2 plus 3?\nA:"][:n]
    return tok(texts, return_tensors="pt", padding=True, padding_side="left")


@torch.no_grad()
def logits(model, ids, compose: bool = True) -> torch.Tensor:
    with composed_inference(model, compose):
        return model(**ids).logits


def factored(model, ids) -> torch.Tensor:
    """The reference: the factored forms, no cache involved (and the cache left as it was)."""
    keep = [(layer, layer.svf_composed.weight, layer.svf_composed._key) for layer in layers(model)]
    out = logits(model, ids, compose=False)
    for layer, weight, key in keep:
        layer.svf_composed.weight, layer.svf_composed._key = weight, key
    return out


def assert_follows(model, ids) -> None:
    """The composed forward (cache in use) gives the factored form's logits."""
    composed = logits(model, ids)
    assert composed_weight_bytes(model) > 0
    torch.testing.assert_close(composed, factored(model, ids), atol=LOGITS_ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------- composed = factored


@pytest.mark.parametrize(
    "arch,config",
    [
        ("llama", {}),
        ("llama", {"fast_factored": False}),
        ("llama", {"rank": 4}),  # 2k <= m: the exact factored form, W' = W + W Q_k diag(s - 1) Q_kᵀ
        ("llama", {"mode": "sigmoid"}),
        ("gpt2", {}),
    ],
)
def test_composed_matches_factored_logits_and_greedy_tokens(arch, config):
    model, tok = svf_model(arch, **config)
    ids = prompt_ids(tok)
    composed = logits(model, ids)
    assert composed_weight_bytes(model) == sum(
        layer.out_features * layer.in_features * 4 for layer in layers(model)
    )  # one float32 W' per layer
    reference = logits(model, ids, compose=False)
    assert composed_weight_bytes(model) == 0  # composed_inference(model, False) frees them
    torch.testing.assert_close(composed, reference, atol=LOGITS_ATOL, rtol=0)
    assert (composed - reference).abs().max() > 0 or arch == "gpt2"  # two different computations
    gen = {"max_new_tokens": 24, "do_sample": False, "pad_token_id": tok.pad_token_id}
    with torch.no_grad(), composed_inference(model, True):
        greedy_composed = model.generate(**ids, **gen)
    with torch.no_grad(), composed_inference(model, False):
        greedy_factored = model.generate(**ids, **gen)
    assert torch.equal(greedy_composed, greedy_factored)


def test_composed_weight_at_init_is_the_base_weight_bit_for_bit():
    model, _ = svf_model(init_weights=True)
    for layer in layers(model):
        assert torch.equal(layer.composed_weight(), layer.get_base_layer().weight)


def test_composed_weight_equals_the_merged_weight():
    model, _ = svf_model()
    composed = {id(layer): layer.composed_weight().clone() for layer in layers(model)}
    for layer in layers(model):
        layer.merge()
        torch.testing.assert_close(layer.get_base_layer().weight, composed[id(layer)], atol=1e-6, rtol=1e-6)
        layer.unmerge()


def test_compose_inference_false_never_composes_and_is_saved(tmp_path):
    from peft import PeftModel

    model, tok = svf_model(compose_inference=False)
    ids = prompt_ids(tok)
    with torch.no_grad():
        out = model(**ids).logits
    assert composed_weight_bytes(model) == 0
    with composed_inference(model, True):  # the context overrides the config
        with torch.no_grad():
            model(**ids)
        assert composed_weight_bytes(model) > 0
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, out, atol=0, rtol=0)
    model.save_pretrained(str(tmp_path))
    reloaded = PeftModel.from_pretrained(build_tiny_llama(tok), str(tmp_path))
    assert reloaded.peft_config["default"].compose_inference is False
    with pytest.raises(ValueError, match="compose_inference must be a bool"):
        SVFConfig(compose_inference="yes")


def test_automatic_composition_waits_for_its_break_even():
    """Default config: compose once the tokens run at this z have cost the extra of the factored form what the
    composition costs (ski rental), or at once for a decoding step; a new z starts the count again."""
    model, tok = svf_model()
    ids = tok(["0123456789"], return_tensors="pt")  # 10 tokens, one row
    expected = factored(model, ids)
    needed = {}
    for layer in layers(model):
        k = layer.svf_z["default"].shape[0]
        m, out, inn = layer.svf_rank, layer.out_features, layer.in_features
        assert layer.compose_break_even_tokens(k) == out * inn * m / (m * (out + inn) - out * inn)
        needed[layer.module_name] = math.ceil(layer.compose_break_even_tokens(k) / 10)
    assert sorted(set(needed.values())) == [4, 7]  # square/k-v matrices: 32 tokens; MLP: 64 tokens
    for call in range(1, 8):
        with torch.no_grad():
            torch.testing.assert_close(model(**ids).logits, expected, atol=LOGITS_ATOL, rtol=0)
        for layer in layers(model):
            assert (layer.svf_composed.weight is not None) == (call >= needed[layer.module_name]), (call, layer)
    with torch.no_grad():
        for layer in layers(model):
            layer.svf_z["default"].mul_(1.01)
        model(**ids)
    assert composed_weight_bytes(model) == 0  # a new z: counting starts again
    with torch.no_grad():
        model.generate(**ids, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)
    assert all(layer.svf_composed.weight is not None for layer in layers(model))  # a decoding step composes


def _greedy(model, ids, tok, **kwargs) -> list[list[int]]:
    with torch.no_grad():
        out = model.generate(**ids, do_sample=False, pad_token_id=tok.pad_token_id, **kwargs)
    return out.tolist()


def test_generation_length_keeps_short_generations_factored(monkeypatch):
    """Inside `generate` the layers know how many decoding steps are left: a generation too short to pay for the
    composition stays factored, a long one composes at its first decoding step, repeated short ones at the same z
    compose once their count pays, and a decoding step of unknown length composes at once (the old rule)."""
    monkeypatch.setitem(composed_module.DECODING_STEP_TOKENS, "cpu", 1)  # a decoding step counts as its 1 row
    model, tok = svf_model()
    reference, _ = svf_model(compose_inference=False)  # same seed: the same adapter, always factored
    ids = tok(["0123456789"], return_tensors="pt")  # 10 prompt tokens, one row
    break_even = {
        layer.module_name: layer.compose_break_even_tokens(layer.svf_z["default"].shape[0]) for layer in layers(model)
    }
    assert sorted(set(break_even.values())) == [32.0, 64.0]

    # 5 new tokens: 10 prompt tokens + 4 decoding steps = 14 < 32: nothing composes; the same completion
    assert _greedy(model, ids, tok, max_new_tokens=5) == _greedy(reference, ids, tok, max_new_tokens=5)
    assert composed_weight_bytes(model) == 0
    assert all(layer.svf_decoding_steps_left is None for layer in layers(model))  # reset after generate

    # repeated short generations (TRL passes a generation_config): each call adds 14 tokens at this z
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    calls = 1
    while composed_weight_bytes(model) == 0 or any(layer.svf_composed.weight is None for layer in layers(model)):
        with torch.no_grad():
            out = model.generate(**ids, generation_config=config).tolist()
        assert out == _greedy(reference, ids, tok, max_new_tokens=5)
        calls += 1
        assert calls <= 6, "repeated short generations never composed"
    assert calls == math.ceil(64 / 14)  # the MLP matrices (64 tokens) are the last to compose, during the 5th call

    # a long generation at a new z composes at its first decoding step
    seen = {}
    for layer, reference_layer in zip(layers(model), layers(reference)):
        with torch.no_grad():
            layer.svf_z["default"].mul_(1.01)
            reference_layer.svf_z["default"].mul_(1.01)
        original = layer._compose

        def compose(names, layer=layer, original=original):
            seen[layer.module_name] = layer.svf_decoding_steps_left
            return original(names)

        monkeypatch.setattr(layer, "_compose", compose)
    assert _greedy(model, ids, tok, max_new_tokens=40) == _greedy(reference, ids, tok, max_new_tokens=40)
    assert set(seen.values()) == {38}  # 39 decoding steps, composed at the first (the square ones would pay by 22)

    # a decoding step outside a generation of known length (a hand-written loop) composes at once
    clear_composed_weights(model)
    with torch.no_grad():
        first = model(**ids, use_cache=True)
        step = first.logits[:, -1:].argmax(-1)
        mask = torch.cat([ids["attention_mask"], torch.ones_like(step)], dim=1)
        model(input_ids=step, attention_mask=mask, cache=first.past_key_values)
    assert all(layer.svf_composed.weight is not None for layer in layers(model))


def test_later_decoding_steps_compose_in_the_first_of_several_short_generations(monkeypatch):
    """An evaluation's batches at one z: the decoding steps its later batches will run count in the first batch, so
    it composes there when they pay together (without the hint the first short call stays factored)."""
    monkeypatch.setitem(composed_module.DECODING_STEP_TOKENS, "cpu", 1)
    model, tok = svf_model()
    reference, _ = svf_model(compose_inference=False)
    ids = tok(["0123456789"], return_tensors="pt")
    with later_decoding_steps(model, 0):
        assert _greedy(model, ids, tok, max_new_tokens=5) == _greedy(reference, ids, tok, max_new_tokens=5)
    assert composed_weight_bytes(model) == 0  # 14 tokens < 32: factored
    clear_composed_weights(model)
    with torch.no_grad():
        for layer, reference_layer in zip(layers(model), layers(reference)):
            layer.svf_z["default"].mul_(1.01)
            reference_layer.svf_z["default"].mul_(1.01)
    with later_decoding_steps(model, 60):  # 10 + 1 + (3 + 60) >= 64 at the first decoding step
        assert _greedy(model, ids, tok, max_new_tokens=5) == _greedy(reference, ids, tok, max_new_tokens=5)
    assert all(layer.svf_composed.weight is not None for layer in layers(model))
    assert all(layer.svf_decoding_steps_later == 0 for layer in layers(model))  # reset on exit

    # the evaluation's generation announces its later batches: (batches left) x (new tokens - 1)
    from peft_spectral import evaluation
    from peft_spectral.data import Example

    seen = []
    original = evaluation.later_decoding_steps

    def record(model, steps):
        seen.append(steps)
        return original(model, steps)

    monkeypatch.setattr(evaluation, "later_decoding_steps", record)
    examples = [Example(prompt=f"{i} + 1 =", target=str(i + 1)) for i in range(5)]
    evaluation.generate_answers(model, tok, examples, max_new_tokens=5, batch_size=2)
    assert seen == [8, 4, 0]


def test_new_tokens_of_generate_reads_the_generate_kwargs():
    from transformers import GenerationConfig

    ids = torch.zeros(2, 12, dtype=torch.long)
    assert new_tokens_of_generate({"input_ids": ids, "max_new_tokens": 7}) == 7
    assert new_tokens_of_generate({"generation_config": GenerationConfig(max_new_tokens=9)}) == 9
    assert new_tokens_of_generate({"input_ids": ids, "max_length": 20}) == 8
    assert new_tokens_of_generate({"input_ids": ids, "generation_config": GenerationConfig(max_length=15)}) == 3
    assert new_tokens_of_generate({"input_ids": ids}) is None  # a forward's kwargs
    assert new_tokens_of_generate({"max_length": 20}) is None  # no prompt to subtract


# ---------------------------------------------------------------------------------------------- invalidation


def _grad_step(model, optimizer) -> None:
    """An optimizer step without a forward through the layers (a forward with gradient would free the cache)."""
    gen = torch.Generator().manual_seed(1)
    for layer in layers(model):
        z = layer.svf_z["default"]
        z.grad = torch.randn(z.shape, generator=gen)
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("kind", ["foreach", "fused", "sgd"])
def test_cache_follows_optimizer_steps(kind):
    # fused AdamW writes z without bumping its version: the global post-step hook is what invalidates
    model, tok = svf_model()
    ids = prompt_ids(tok)
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "sgd":
        optimizer = torch.optim.SGD(params, lr=0.5)
    else:
        optimizer = torch.optim.AdamW(params, lr=0.1, **{kind: True})
    assert_follows(model, ids)
    for _ in range(2):
        before = logits(model, ids)
        _grad_step(model, optimizer)
        assert (logits(model, ids) - before).abs().max() > 1e-3
        assert_follows(model, ids)


def test_cache_follows_in_place_writes_and_load_state_dict():
    model, tok = svf_model()
    ids = prompt_ids(tok)
    assert_follows(model, ids)
    state = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    with torch.no_grad():
        for layer in layers(model):
            layer.svf_z["default"].mul_(1.5)
    assert_follows(model, ids)
    changed = logits(model, ids)
    set_peft_model_state_dict(model, state)  # copies into the existing parameters
    assert_follows(model, ids)
    assert (logits(model, ids) - changed).abs().max() > 1e-3
    model.load_state_dict({k: v * 0.5 for k, v in model.state_dict().items() if "svf_z" in k}, strict=False)
    assert_follows(model, ids)


def test_data_writes_need_clear_composed_weights():
    model, tok = svf_model()
    ids = prompt_ids(tok)
    assert_follows(model, ids)
    for layer in layers(model):
        layer.svf_z["default"].data.mul_(1.5)  # invisible to the cache (no version bump) ...
    assert clear_composed_weights(model) > 0  # ... so clear it
    assert_follows(model, ids)
    for layer in layers(model):
        layer.svf_z["default"].data = layer.svf_z["default"].data * 0.5  # a new storage: seen
    assert_follows(model, ids)


def test_cache_follows_set_adapter_delete_and_readd():
    model, tok = svf_model()
    ids = prompt_ids(tok)
    torch.manual_seed(5)
    model.add_adapter("other", SVFConfig(target_modules="all-linear", init_weights=False, use_svd_cache=False))
    assert_follows(model, ids)
    default = logits(model, ids)
    model.set_adapter("other")
    assert_follows(model, ids)
    assert (logits(model, ids) - default).abs().max() > 1e-3
    model.set_adapter("default")
    torch.testing.assert_close(logits(model, ids), default, atol=0, rtol=0)
    model.set_adapter("other")
    logits(model, ids)
    with pytest.warns(UserWarning, match="was active"):
        model.base_model.delete_adapter("other")
    model.set_adapter("default")
    torch.manual_seed(6)
    model.add_adapter("other", SVFConfig(target_modules="all-linear", init_weights=False, use_svd_cache=False))
    model.set_adapter("other")
    assert_follows(model, ids)


def test_cache_follows_merge_unmerge_and_disable():
    model, tok = svf_model()
    ids = prompt_ids(tok)
    with torch.no_grad(), model.disable_adapter():
        base = model(**ids).logits
    composed = logits(model, ids)
    model.base_model.merge_adapter()
    assert composed_weight_bytes(model) == 0  # merging frees the cache
    torch.testing.assert_close(logits(model, ids), composed, atol=LOGITS_ATOL, rtol=0)
    model.base_model.unmerge_adapter()
    assert_follows(model, ids)
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(model(**ids).logits, base, atol=0, rtol=0)  # exactly the base model
        for layer in layers(model):
            layer.svf_z["default"].add_(0.25)  # changed while disabled: the cached W' is stale on re-enabling
    assert_follows(model, ids)
    assert (logits(model, ids) - composed).abs().max() > 1e-3


def test_moving_the_model_frees_the_cache():
    model, tok = svf_model()
    ids = prompt_ids(tok)
    assert_follows(model, ids)
    model.to(torch.float64)
    assert composed_weight_bytes(model) == 0
    with torch.no_grad(), composed_inference(model):
        out = model(**ids).logits
    assert out.dtype == torch.float64
    assert all(layer.svf_composed.weight.dtype == torch.float64 for layer in layers(model))


def test_cache_follows_a_replaced_base_weight():
    model, tok = svf_model()
    ids = prompt_ids(tok)
    assert_follows(model, ids)
    for layer in layers(model):
        weight = layer.get_base_layer().weight
        weight.data = weight.data * 1.01  # as SpectralCompress writes a weight
    composed = logits(model, ids)
    # the factored forms keep the factors of the old weight, so compare with a composition from scratch
    clear_composed_weights(model)
    torch.testing.assert_close(composed, logits(model, ids), atol=0, rtol=0)
    assert (composed - factored(model, ids)).abs().max() > 1e-4  # the old weight's W' would be that far off


# ---------------------------------------------------------------------------------------------- training, mixed batches


def test_training_keeps_the_factored_form_and_frees_the_cache():
    model, tok = svf_model()
    ids = prompt_ids(tok)
    model.train()
    logits(model, ids)
    assert composed_weight_bytes(model) > 0
    grads = {}
    for compose in (True, False):
        model.zero_grad()
        with composed_inference(model, compose):
            model(**ids, labels=ids["input_ids"]).loss.backward()
        assert composed_weight_bytes(model) == 0  # a forward that needs a gradient frees the cached weights
        grads[compose] = [layer.svf_z["default"].grad.clone() for layer in layers(model)]
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_composed_under_autocast_is_the_full_precision_weight():
    model, tok = svf_model()
    ids = prompt_ids(tok)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), composed_inference(model):
        model(**ids)
    under_autocast = [layer.svf_composed.weight for layer in layers(model)]
    assert all(w.dtype == torch.float32 for w in under_autocast)
    clear_composed_weights(model)
    for layer, w in zip(layers(model), under_autocast):
        torch.testing.assert_close(layer.composed_weight(), w, atol=0, rtol=0)


def test_inference_mode_and_no_grad_share_the_cache():
    model, tok = svf_model()
    ids = prompt_ids(tok)
    with torch.inference_mode(), composed_inference(model):
        first = model(**ids).logits.clone()
    cached = [layer.svf_composed.weight for layer in layers(model)]
    assert all(not w.is_inference() for w in cached)
    with torch.no_grad(), composed_inference(model):
        torch.testing.assert_close(model(**ids).logits, first, atol=0, rtol=0)
    assert all(layer.svf_composed.weight is w for layer, w in zip(layers(model), cached))


def test_single_adapter_mixed_batch_uses_the_composed_weight():
    model, tok = svf_model()
    torch.manual_seed(3)
    model.add_adapter("other", SVFConfig(target_modules="all-linear", init_weights=False, use_svd_cache=False))
    ids = prompt_ids(tok)
    expected = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        expected[name] = factored(model, ids)
    model.set_adapter("default")
    clear_composed_weights(model)
    with torch.no_grad(), composed_inference(model):
        same = model(**ids, adapter_names=["other", "other"]).logits
        assert composed_weight_bytes(model) > 0
        assert all(layer.svf_composed._key[1] == ("other",) for layer in layers(model))
        torch.testing.assert_close(same, expected["other"], atol=LOGITS_ATOL, rtol=0)
        mixed = model(**ids, adapter_names=["default", "other"]).logits  # the factored per-row form
    torch.testing.assert_close(mixed[0], expected["default"][0], atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(mixed[1], expected["other"][1], atol=LOGITS_ATOL, rtol=0)


def test_partitioned_weights_are_not_cached():
    model, tok = svf_model()
    for layer in layers(model):
        weight = layer.get_base_layer().weight
        weight.ds_id, weight.ds_tensor = 0, weight.data  # what DeepSpeed ZeRO-3 sets on a partitioned parameter
        assert is_sharded(weight)
    ids = prompt_ids(tok)
    out = logits(model, ids)
    assert composed_weight_bytes(model) == 0
    torch.testing.assert_close(out, logits(model, ids, compose=False), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- plain TRL


def _reward(completions, **kwargs):
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum(ord(ch) % 2 for ch in t) / max(len(t), 1) for t in texts]


def _trl_run(tmp_path, algorithm: str, compose: bool, **overrides):
    """Plain TRL on the tiny Llama, `peft_config=SVFConfig(...)`; returns (z, compositions, base weights before/after).

    SGD (not Adam): its update is proportional to the gradient, so the rounding differences between the composed
    and the factored sampling pass stay at rounding size in z (Adam's normalisation would blow up components whose
    gradient is ~0).
    """
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    tok = build_tiny_tokenizer()
    model = build_tiny_llama(tok)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dataset = Dataset.from_list([{"prompt": f"Q{i}: pick a colour. Answer:"} for i in range(16)])
    config_cls, trainer_cls = (GRPOConfig, GRPOTrainer) if algorithm == "grpo" else (RLOOConfig, RLOOTrainer)
    kwargs = {
        "output_dir": str(tmp_path / f"{algorithm}-{compose}"),
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "num_generations": 2,
        "max_completion_length": 6,
        "learning_rate": 2.0,
        "optim": "sgd",
        "bf16": False,  # TRL's default is bf16 autocast; float32 keeps the comparison at float32 rounding
        "beta": 0.1,
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "save_strategy": "no",
        "disable_tqdm": True,
        "logging_steps": 1,
    }
    kwargs.update(overrides)
    trainer = trainer_cls(
        model=model,
        reward_funcs=[_reward],
        args=config_cls(**kwargs),
        train_dataset=dataset,
        processing_class=tok,
        peft_config=SVFConfig(target_modules=TARGETS, use_svd_cache=False, compose_inference=compose),
    )
    count = {"n": 0}
    original = SVFLinear._compose

    def counting(self, names):
        count["n"] += 1
        return original(self, names)

    SVFLinear._compose = counting
    try:
        trainer.train()
    finally:
        SVFLinear._compose = original
    z = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "svf_z" in n}
    after = {n.replace(".base_layer", ""): p for n, p in trainer.model.get_base_model().named_parameters()}
    return z, count["n"], before, after


@pytest.mark.parametrize(
    "algorithm,overrides,rounds",
    [
        ("grpo", {}, 3),
        ("grpo", {"steps_per_generation": 2}, 2),  # generations at steps 0 and 2; importance ratios vs old logps
        ("grpo", {"gradient_accumulation_steps": 2}, 3),  # one generation per optimizer step, 2 micro-batches
        ("rloo", {}, 3),
    ],
)
def test_plain_trl_with_composed_rollouts_reaches_the_same_z(tmp_path, algorithm, overrides, rounds):
    z_on, composed, before, after = _trl_run(tmp_path, algorithm, True, **overrides)
    z_off, none, _, _ = _trl_run(tmp_path, algorithm, False, **overrides)
    assert composed == rounds * 6 and none == 0  # once per generation round per layer (6 layers)
    for name, w in before.items():
        assert torch.equal(after[name], w), f"base parameter {name} changed"
    moved = max(float((v - 1).abs().max()) for v in z_on.values())
    assert moved > 1e-3
    for name in z_on:
        torch.testing.assert_close(z_on[name], z_off[name], atol=1e-6, rtol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------- embedded model


@pytest.mark.slow
def test_embedded_model_composed_matches_factored():
    """SmolLM2-135M, SVF on every linear layer (210 matrices) with a trained-like z (1 ± 5 %): logits within 5e-3
    (float32, logits up to ~40; 1.6e-3 measured, the two forms sum in different orders through 30 blocks), greedy
    completions of up to 64 tokens token for token."""
    from peft_spectral import assets

    base, tok = assets.load_default_model()
    torch.manual_seed(0)
    model = get_peft_model(base, SVFConfig(target_modules="all-linear")).eval()
    with torch.no_grad():
        for layer in layers(model):
            z = layer.svf_z["default"]
            z.copy_(1 + 0.05 * torch.randn(z.shape))
    chats = [
        [{"role": "user", "content": "What is 17 plus 25? Answer with a number."}],
        [{"role": "user", "content": "Name a colour of the sky."}],
    ]
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    ids = tok(texts, return_tensors="pt", padding=True, padding_side="left")
    composed = logits(model, ids)
    reference = logits(model, ids, compose=False)
    torch.testing.assert_close(composed, reference, atol=5e-3, rtol=0)
    gen = {"max_new_tokens": 64, "do_sample": False, "pad_token_id": tok.pad_token_id}
    with torch.no_grad(), composed_inference(model, True):
        greedy_composed = model.generate(**ids, **gen)
    with torch.no_grad(), composed_inference(model, False):
        greedy_factored = model.generate(**ids, **gen)
    assert torch.equal(greedy_composed, greedy_factored)
