"""Mixed-adapter batches for SVF (`adapter_names=[...]`, one adapter per example, `"__base__"` for the base model)."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from testing_utils import build_tiny_gpt2, build_tiny_llama, build_tiny_tokenizer

import peft_spectral
from peft_spectral.tuners.svf.layer import SVFLayer
from peft_spectral.tuners.svf.mixed_batch import mixed_batch_hooks


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _randomise(model, adapter, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.base_model.svf_layers():
            if adapter in layer.svf_z:
                z = layer.svf_z[adapter]
                z.copy_(1 + 0.5 * torch.randn(z.shape, generator=gen))


def _two_expert_model(builder, targets, tmp_path, rank=None):
    tok = build_tiny_tokenizer()
    base = builder(tok)
    config = {"target_modules": targets, "svd_cache_dir": str(tmp_path / "svd")}
    model = get_peft_model(base, peft_spectral.SVFConfig(**config), adapter_name="a")
    model.add_adapter("b", peft_spectral.SVFConfig(**config, **({"rank": rank} if rank else {})))
    _randomise(model, "a", 1)
    _randomise(model, "b", 2)
    model.set_adapter("a")
    return model.eval(), tok


def _batch(tok, texts):
    enc = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(e) for e in enc)
    ids = torch.full((len(enc), width), tok.pad_token_id)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, width - len(e) :] = torch.tensor(e)
        mask[i, width - len(e) :] = 1
    return ids, mask


TEXTS = ["the cat sat", "2 + 3 =", "a longer prompt here", "x", "what is it?"]
NAMES = ["a", "b", "__base__", "b", "a"]


def _grouped_logits(model, ids, mask, names):
    out = torch.empty(
        ids.shape[0], ids.shape[1], model.config.vocab_size, dtype=model.get_input_embeddings().weight.dtype
    )
    for name in dict.fromkeys(names):
        rows = [i for i, n in enumerate(names) if n == name]
        with torch.no_grad():
            if name == "__base__":
                with model.disable_adapter():
                    logits = model(input_ids=ids[rows], attention_mask=mask[rows]).logits
            else:
                model.set_adapter(name)
                logits = model(input_ids=ids[rows], attention_mask=mask[rows]).logits
        out[rows] = logits
    return out


@pytest.mark.parametrize(
    "builder,targets,rank",
    [
        (build_tiny_llama, ["q_proj", "gate_proj", "up_proj", "down_proj"], None),
        (build_tiny_llama, ["gate_proj", "down_proj"], 8),
        (build_tiny_gpt2, ["c_attn", "c_fc", "c_proj"], None),
    ],
)
def test_mixed_batch_forward_equals_grouped(builder, targets, rank, tmp_path):
    model, tok = _two_expert_model(builder, targets, tmp_path, rank)
    ids, mask = _batch(tok, TEXTS)
    expected = _grouped_logits(model, ids, mask, NAMES)
    model.set_adapter("a")
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=1e-5)
    # base rows are the base model bit for bit
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(mixed[2], base[2])
    # the experts really differ, so the test would fail if the names were ignored
    assert not torch.allclose(expected[0], base[0], atol=1e-3)
    assert not torch.allclose(
        _grouped_logits(model, ids, mask, ["a"] * 5)[1], _grouped_logits(model, ids, mask, ["b"] * 5)[1], atol=1e-3
    )


def test_mixed_batch_with_bfloat16_base_and_factors(tmp_path):
    """bf16 base, bf16 factors: mixed rows match the grouped (fast form) ones within bf16 rounding, base rows exactly."""

    def bf16_llama(tok):
        return build_tiny_llama(tok).to(torch.bfloat16)

    model, tok = _two_expert_model(bf16_llama, ["gate_proj", "up_proj", "down_proj"], tmp_path)
    assert all(layer.svf_Q.dtype == torch.bfloat16 for _, layer in model.base_model.svf_layers())
    ids, mask = _batch(tok, TEXTS)
    expected = _grouped_logits(model, ids, mask, NAMES)
    model.set_adapter("a")
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
        with model.disable_adapter():
            base = model(input_ids=ids, attention_mask=mask).logits
    assert mixed.dtype == torch.bfloat16 and torch.equal(mixed[2], base[2])
    for row in (0, 1, 3, 4):
        err = float((mixed[row].double() - expected[row].double()).norm() / expected[row].double().norm())
        # the mixed rows use the exact form, the grouped ones the fast form: both round in bf16 (as fp32 factors do)
        assert err < 4 * torch.finfo(torch.bfloat16).eps, (row, err)
        moved = float((base[row].double() - expected[row].double()).norm() / expected[row].double().norm())
        assert moved > 10 * err  # the adapters move the rows far more than rounding does


def test_mixed_batch_generate_equals_grouped(tmp_path):
    model, tok = _two_expert_model(build_tiny_llama, ["q_proj", "gate_proj", "up_proj", "down_proj"], tmp_path)
    ids, mask = _batch(tok, TEXTS)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tok.pad_token_id, "eos_token_id": None}
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, attention_mask=mask, adapter_names=NAMES, **kwargs)
    expected = torch.empty_like(mixed)
    for name in dict.fromkeys(NAMES):
        rows = [i for i, n in enumerate(NAMES) if n == name]
        with torch.no_grad():
            if name == "__base__":
                with model.disable_adapter():
                    expected[rows] = model.generate(input_ids=ids[rows], attention_mask=mask[rows], **kwargs)
            else:
                model.set_adapter(name)
                expected[rows] = model.generate(input_ids=ids[rows], attention_mask=mask[rows], **kwargs)
    assert torch.equal(mixed, expected)
    model.set_adapter("a")
    with torch.no_grad():
        only_a = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert not torch.equal(only_a, mixed)  # names matter


def test_mixed_batch_errors_and_hooks_removed(tmp_path):
    model, tok = _two_expert_model(build_tiny_llama, ["gate_proj"], tmp_path)
    ids, mask = _batch(tok, TEXTS[:2])
    with pytest.raises(ValueError, match="non-existing adapter"):
        model(input_ids=ids, attention_mask=mask, adapter_names=["a", "typo"])
    with pytest.raises(ValueError, match="one adapter name per example"):
        model(input_ids=ids, attention_mask=mask, adapter_names=["a"])
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(input_ids=ids, attention_mask=mask, adapter_names=["a", "b"])
    model.eval()
    assert all(not layer._forward_pre_hooks for layer in model.modules() if isinstance(layer, SVFLayer))


def test_hooks_by_batch_size(tmp_path):
    """A mapping from batch size to names serves code that runs forwards of several sizes over the same rows."""
    model, tok = _two_expert_model(build_tiny_llama, ["gate_proj", "down_proj"], tmp_path)
    ids, mask = _batch(tok, TEXTS[:2])
    with torch.no_grad():
        expected = _grouped_logits(model, ids, mask, ["b", "__base__"])
        with mixed_batch_hooks(model, {2: ["b", "__base__"], 1: ["b"]}, layer_cls=SVFLayer):
            both = model(input_ids=ids, attention_mask=mask).logits
            first = model(input_ids=ids[:1], attention_mask=mask[:1]).logits
    torch.testing.assert_close(both, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(first, expected[:1], atol=1e-5, rtol=1e-5)


def test_base_rows_skip_the_correction(tmp_path, monkeypatch):
    from peft_spectral.tuners.svf import mixed_batch

    model, tok = _two_expert_model(build_tiny_llama, ["gate_proj", "down_proj"], tmp_path, None)
    ids, mask = _batch(tok, TEXTS)
    seen = []
    real = mixed_batch.scaled_matmul

    def counting(projected, delta, q_t):
        seen.append(projected.shape[0])
        return real(projected, delta, q_t)

    monkeypatch.setattr(mixed_batch, "scaled_matmul", counting)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, adapter_names=NAMES)
        assert seen and set(seen) == {4}  # 4 adapted rows of 5, in every adapted layer
        seen.clear()
        model(input_ids=ids, attention_mask=mask, adapter_names=["__base__"] * 5)
    assert seen == []  # an all-base batch never computes a correction
