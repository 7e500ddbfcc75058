"""SpectralCompress adapter and multi-subspace truncation: exactness, save/load, merge, bad input."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from testing_utils import build_tiny_llama, build_tiny_tokenizer

from peft_spectral import subspace
from peft_spectral.linalg import thin_svd
from peft_spectral.subspace import multi_subspace_factors, multi_subspace_truncate, rank_for, reconstruct
from peft_spectral.tuners.spectral_compress import SpectralCompressConfig, SpectralCompressLinear


MODULES = {
    "model.layers.1.mlp.down_proj": {"rho": 0.2, "clusters": 1},
    "model.layers.0.mlp.up_proj": {"rho": 0.5, "clusters": 3},
    "model.layers.0.self_attn.o_proj": {"rho": 0.1},
}


def _ids(seed=0):
    return torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(seed))


# --- truncation -----------------------------------------------------------------------------------------------------


def test_rank_for_and_rho_validation():
    assert rank_for(0.01, 576) == 6 and rank_for(0.9, 576) == 518 and rank_for(1.0, 10) == 10
    assert rank_for(0.01, 10) == 1  # never zero
    for bad in (0, -0.1, 1.5, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="rho"):
            rank_for(bad, 10)


def test_truncation_keeps_top_k_subspace_exactly():
    torch.manual_seed(0)
    w = torch.randn(40, 24, dtype=torch.float64).float()
    k = rank_for(0.25, 24)
    trunc = multi_subspace_truncate(w, 0.25, 1)
    u, s, v = thin_svd(w)
    # W' = U_k S_k V_kᵀ: same top-k singular triplets, the rest removed
    torch.testing.assert_close(trunc, (u[:, :k] * s[:k]) @ v[:, :k].T, atol=1e-5, rtol=1e-5)
    _tu, ts, _tv = thin_svd(trunc)
    torch.testing.assert_close(ts[:k], s[:k], atol=1e-5, rtol=1e-5)
    assert ts[k:].max() < 1e-5 * ts[0]  # rank exactly k (up to float32 rounding)
    # projection onto the kept subspaces is the identity on W', and W - W' is orthogonal to them
    torch.testing.assert_close(u[:, :k] @ (u[:, :k].T @ trunc), trunc, atol=1e-5, rtol=1e-5)
    assert (u[:, :k].T @ (w - trunc)).abs().max() < 1e-4
    assert ((w - trunc) @ v[:, :k]).abs().max() < 1e-4


def test_multi_subspace_one_cluster_equals_plain_truncation():
    torch.manual_seed(1)
    w = torch.randn(30, 20)
    for rho in (0.9, 0.2, 0.05):
        (f,) = multi_subspace_factors(w, rho, 1)
        plain = multi_subspace_truncate(w, rho, 1)
        u, s, v = thin_svd(w)
        k = rank_for(rho, 20)
        torch.testing.assert_close(plain, (u[:, :k] * s[:k]) @ v[:, :k].T)
        assert torch.equal(f.rows, torch.arange(30)) and f.rank == k


def test_multi_subspace_reconstructs_union_of_subspaces_better():
    g = torch.Generator().manual_seed(0)
    dim, per, n_sub, sub_dim = 20, 20, 3, 2
    blocks = []
    for _ in range(n_sub):
        basis = torch.linalg.qr(torch.randn(dim, sub_dim, generator=g))[0]
        blocks.append(torch.randn(per, sub_dim, generator=g) @ basis.T)
    w = torch.cat(blocks)[torch.randperm(per * n_sub, generator=g)]
    w = w + 1e-3 * torch.randn(w.shape, generator=g)
    rho = 0.1  # rank 2 of 20 per block
    err_plain = (multi_subspace_truncate(w, rho, 1) - w).norm() / w.norm()
    factors = multi_subspace_factors(w, rho, 3, seed=0)
    err_multi = (reconstruct(factors, tuple(w.shape)) - w).norm() / w.norm()
    assert sorted(len(f.rows) for f in factors) == [20, 20, 20]
    assert err_multi < 0.01
    assert err_plain > 0.3
    # all rows covered exactly once
    assert torch.equal(torch.sort(torch.cat([f.rows for f in factors])).values, torch.arange(60))


def test_clustering_is_seeded_and_validates():
    w = torch.randn(50, 16, generator=torch.Generator().manual_seed(3))
    a = subspace.cluster_rows(w, 4, 0.25, seed=7)
    b = subspace.cluster_rows(w, 4, 0.25, seed=7)
    assert torch.equal(a, b) and set(a.tolist()) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="clusters"):
        subspace.cluster_rows(w, 0, 0.5)
    with pytest.raises(ValueError, match="exceed"):
        subspace.cluster_rows(w, 51, 0.5)


# --- the PEFT adapter -----------------------------------------------------------------------------------------------


@pytest.fixture
def compressed():
    tok = build_tiny_tokenizer()
    base = build_tiny_llama(tok)
    ref = {n: p.detach().clone() for n, p in base.state_dict().items()}
    model = get_peft_model(base, SpectralCompressConfig(modules=dict(MODULES)))
    return model, ref


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SpectralCompressLinear)}


def test_factored_forward_equals_dense_truncated_matrix(compressed):
    model, _ = compressed
    for name, layer in _layers(model).items():
        w = layer.get_base_layer().weight
        settings = MODULES
        key = next(k for k in settings if name.endswith(k))
        dense = multi_subspace_truncate(w, settings[key]["rho"], settings[key].get("clusters", 1))
        torch.testing.assert_close(layer.get_truncated_weight("default"), dense, atol=1e-5, rtol=1e-5)
        x = torch.randn(3, 5, layer.in_features)
        layer.spectral_compress_forward_mode["default"] = "factored"
        y_fact = layer(x)
        layer.spectral_compress_forward_mode["default"] = "dense"
        y_dense = layer(x)
        torch.testing.assert_close(y_fact, y_dense, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y_fact, x @ dense.T, atol=1e-5, rtol=1e-5)
        layer.spectral_compress_forward_mode["default"] = "auto"
        assert layer._use_factored("default") == (layer.factored_macs("default") < w.numel())


def test_disabled_adapter_is_base_and_merge_unmerge_exact(compressed):
    model, ref = compressed
    x = _ids()
    base_model = build_tiny_llama(build_tiny_tokenizer())
    expected_base = base_model(x).logits
    with model.disable_adapter():
        torch.testing.assert_close(model(x).logits, expected_base, atol=0, rtol=0)
    adapted = model(x).logits
    assert (adapted - expected_base).abs().max() > 1e-4
    model.merge_adapter()
    torch.testing.assert_close(model(x).logits, adapted, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    for name, layer in _layers(model).items():
        key = name.removeprefix("base_model.model.") + ".weight"
        assert torch.equal(layer.get_base_layer().weight, ref[key]), name
    torch.testing.assert_close(model(x).logits, adapted, atol=0, rtol=0)


def test_merge_and_unload_gives_plain_model(compressed):
    model, _ = compressed
    x = _ids(1)
    adapted = model(x).logits
    plain = model.merge_and_unload()
    assert not any(isinstance(m, SpectralCompressLinear) for m in plain.modules())
    assert type(plain).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(plain(x).logits, adapted, atol=1e-5, rtol=1e-5)


def test_save_load_bit_exact_without_svd(compressed, tmp_path, monkeypatch):
    model, _ = compressed
    x = _ids(2)
    adapted = model(x).logits
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = list(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys and all("spectral_compress_" in k for k in keys)
    assert not any(".default" in k for k in keys)

    def no_svd(*a, **k):
        raise AssertionError("loading must not compute an SVD")

    import peft_spectral.tuners.spectral_compress.layer as layer_mod

    monkeypatch.setattr(layer_mod, "multi_subspace_factors", no_svd)
    fresh = build_tiny_llama(build_tiny_tokenizer())
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    saved = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        if "spectral_compress_" in name:
            assert torch.equal(tensor, saved[name]), name
    torch.testing.assert_close(loaded(x).logits, adapted, atol=0, rtol=0)
    # loading under another adapter name works too
    other = PeftModel.from_pretrained(build_tiny_llama(build_tiny_tokenizer()), tmp_path, adapter_name="c2i")
    torch.testing.assert_close(other(x).logits, adapted, atol=0, rtol=0)


def test_gpt2_conv1d_supported():
    tok = build_tiny_tokenizer()
    from testing_utils import build_tiny_gpt2

    base = build_tiny_gpt2(tok)
    w = base.transformer.h[0].mlp.c_fc.weight.detach().clone()  # (in, out)
    model = get_peft_model(base, SpectralCompressConfig(modules={"h.0.mlp.c_fc": {"rho": 0.25}}))
    layer = model.base_model.model.transformer.h[0].mlp.c_fc
    torch.testing.assert_close(layer.get_truncated_weight("default"), multi_subspace_truncate(w.T, 0.25))
    x = torch.randn(2, 3, layer.in_features)
    torch.testing.assert_close(layer(x), x @ multi_subspace_truncate(w.T, 0.25).T + layer.bias, atol=1e-5, rtol=1e-5)
    model.merge_adapter()
    model.unmerge_adapter()
    assert torch.equal(layer.get_base_layer().weight, w)


# --- bad input ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rho", [0, 1.01, -1, float("inf")])
def test_config_rejects_bad_rho(rho):
    with pytest.raises(ValueError, match="rho"):
        SpectralCompressConfig(modules={"down_proj": {"rho": rho}})
    with pytest.raises(ValueError, match="rho"):
        SpectralCompressConfig(target_modules=["down_proj"], rho=rho)


def test_config_rejects_bad_entries():
    with pytest.raises(ValueError, match="unknown keys"):
        SpectralCompressConfig(modules={"down_proj": {"rank": 3}})
    with pytest.raises(ValueError, match="clusters"):
        SpectralCompressConfig(modules={"down_proj": {"clusters": 0}})


def test_unmatched_module_names_are_an_error():
    base = build_tiny_llama(build_tiny_tokenizer())
    with pytest.raises(ValueError):
        get_peft_model(base, SpectralCompressConfig(modules={"model.layers.7.mlp.down_proj": {"rho": 0.5}}))
    base = build_tiny_llama(build_tiny_tokenizer())
    with pytest.raises(ValueError, match="not found or not targeted"):
        get_peft_model(
            base,
            SpectralCompressConfig(
                target_modules=["down_proj"], modules={"down_proj": {"rho": 0.5}, "layers.9.mlp.up_proj": {"rho": 0.5}}
            ),
        )


def test_adapter_on_other_model_shapes_names_module_and_shapes(compressed, tmp_path):
    model, _ = compressed
    model.save_pretrained(tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(
        ValueError, match=r"model\.layers\.\d\.mlp\.(up|down)_proj.*\[(64, 32|32, 64)\].*\[(48, 32|32, 48)\]"
    ):
        PeftModel.from_pretrained(other, tmp_path)


# ---------------------------------------------------------------------------------------------------- training-free


def _factors(model):
    return [p for n, p in model.named_parameters() if "spectral_compress_" in n]


def test_training_free_adapter_has_no_trainable_parameters(compressed, capsys):
    model, _ = compressed
    factors = _factors(model)
    assert factors and not any(p.requires_grad for p in factors)
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 0 and total == sum(p.numel() for p in model.parameters())
    model.print_trainable_parameters()
    assert "trainable params: 0 ||" in capsys.readouterr().out
    # PEFT's own switches keep the factors frozen
    model.set_adapter("default")
    model.base_model.set_requires_grad("default", requires_grad=True)
    model.base_model.enable_adapter_layers()
    assert not any(p.requires_grad for p in _factors(model))


def test_training_free_adapter_stays_frozen_when_loaded_trainable_and_with_modules_to_save(tmp_path):
    base = build_tiny_llama(build_tiny_tokenizer())
    config = SpectralCompressConfig(modules=dict(MODULES), modules_to_save=["model.norm"])
    model = get_peft_model(base, config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("model.norm.modules_to_save" in n for n in trainable)  # only modules_to_save
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build_tiny_llama(build_tiny_tokenizer()), tmp_path, is_trainable=True)
    assert _factors(loaded) and not any(p.requires_grad for p in _factors(loaded))
    loaded.add_adapter("second", SpectralCompressConfig(modules=dict(MODULES)))
    loaded.set_adapter("second")
    assert not any(p.requires_grad for p in _factors(loaded))


def test_factors_are_computed_under_gather_params_ctx(monkeypatch):
    """DeepSpeed ZeRO-3: the weight is gathered (PEFT's `gather_params_ctx`) for the truncation's SVD."""
    import contextlib

    import peft_spectral.tuners.spectral_compress.model as sc_model

    gathered = []

    @contextlib.contextmanager
    def recording_ctx(params, *args, **kwargs):
        gathered.extend([params] if isinstance(params, torch.nn.Parameter) else list(params))
        yield

    monkeypatch.setattr(sc_model, "gather_params_ctx", recording_ctx)
    base = build_tiny_llama(build_tiny_tokenizer())
    targets = {id(base.get_submodule(name).weight) for name in MODULES}
    get_peft_model(base, SpectralCompressConfig(modules=dict(MODULES)))
    assert targets <= {id(p) for p in gathered}
