"""SVF tuner: numerics against a dense reference, PEFT conventions, SVD cache and bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from testing_utils import build_tiny_gpt2, build_tiny_llama, build_tiny_tokenizer

import peft_spectral
from peft_spectral import SVFConfig, combine_svf_adapters
from peft_spectral.adapter_io import AdapterLoadError, load_adapter, validate_adapter_dir
from peft_spectral.svd_cache import SVDCache, compute_factors
from peft_spectral.tuners import weight_matrix
from peft_spectral.tuners.svf.layer import SVFLinear


MLP = ["gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFT_SPECTRAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PEFT_SPECTRAL_SVD_CACHE", raising=False)


@pytest.fixture
def tok():
    return build_tiny_tokenizer()


@pytest.fixture
def llama(tok):
    return build_tiny_llama(tok)


def ids(n=2, length=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 250, (n, length), generator=g)


def randomize_z(model, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SVFLinear):
                for p in m.svf_z.values():
                    p.add_(scale * torch.randn(p.shape, generator=g))


def dense_reference(layer: SVFLinear, adapter="default") -> torch.Tensor:
    """U diag(σ ⊙ s) Vᵀ from an independent float64 SVD, keeping the unadapted tail of the spectrum."""
    w = weight_matrix(layer.get_base_layer()).detach().double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    scale = torch.ones_like(s)
    sc = layer.svf_scale(adapter).detach().double()
    scale[: sc.shape[0]] = sc
    return (u * (s * scale)) @ vh


# ----------------------------------------------------------------------------- registration


def test_peft_types_registered_and_lora_still_works(llama):
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType

    for name in ("SVF", "SPECTRAL_COMPRESS", "CORE_ISOLATION"):
        assert PeftType(name).value == name
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.SVF] is SVFConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.SVF] is peft_spectral.SVFModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.SVF] == "svf_"
    lora = get_peft_model(llama, LoraConfig(target_modules=["q_proj"], r=2))
    assert lora.peft_config["default"].peft_type == PeftType.LORA
    assert any("lora_A" in n for n, _ in lora.named_parameters())


def test_registration_is_idempotent():
    import importlib

    from peft_spectral import registry

    before = list(__import__("peft").utils.PeftType)
    importlib.reload(registry)
    registry.register_method("svf", SVFConfig, peft_spectral.SVFModel, prefix="svf_")
    assert list(__import__("peft").utils.PeftType) == before


def test_add_peft_type_rejects_lower_case():
    with pytest.raises(ValueError, match="upper case"):
        peft_spectral.registry.add_peft_type("svf")


# ----------------------------------------------------------------------------- numerics


def test_trainable_parameters_are_sum_of_ranks(llama):
    model = get_peft_model(llama, SVFConfig(target_modules=MLP))
    expected = sum(
        min(m.weight.shape) for n, m in llama.named_modules() if n.endswith(tuple(MLP)) and hasattr(m, "weight")
    )
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert sum(p.numel() for _, p in trainable) == expected == 2 * (32 + 32 + 32)
    assert all(".svf_z." in n for n, _ in trainable)


def test_rank_limits_trainable_values(llama):
    model = get_peft_model(llama, SVFConfig(target_modules=MLP, rank=5))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 6 * 5


@pytest.mark.parametrize("fast_factored", [False, True])
@pytest.mark.parametrize("mode", ["linear", "sigmoid"])
def test_identity_at_init(tok, mode, fast_factored):
    base = build_tiny_llama(tok)
    x, long_x = ids(), ids(length=40)  # 80 tokens > max(out, in) = 64: the no-grad call recomposes W'
    with torch.no_grad():
        ref, long_ref = base(x).logits, base(long_x).logits
    model = get_peft_model(base, SVFConfig(target_modules=MLP, mode=mode, fast_factored=fast_factored))
    model.train()
    out = model(x).logits  # factored path (grad enabled)
    with torch.no_grad():
        long_out = model(long_x).logits
    assert not torch.equal(out, torch.zeros_like(out))
    if mode == "linear" and not fast_factored:  # the exact form's correction is exactly zero
        assert torch.equal(out, ref) and torch.equal(long_out, long_ref)
    else:  # U Σ (Vᵀ x) instead of W x, or a sum-preserving rescale to 1: the base up to float rounding
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=5e-5)
        torch.testing.assert_close(long_out, long_ref, rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("fast_factored", [True, False])
@pytest.mark.parametrize("mode", ["linear", "sigmoid"])
@pytest.mark.parametrize("builder", [build_tiny_llama, build_tiny_gpt2])
def test_forward_matches_dense_reference_both_paths(tok, mode, builder, fast_factored):
    base = builder(tok)
    targets = MLP if builder is build_tiny_llama else ["c_fc", "c_proj", "c_attn"]
    model = get_peft_model(base, SVFConfig(target_modules=targets, mode=mode, fast_factored=fast_factored))
    randomize_z(model)
    layers = [m for m in model.modules() if isinstance(m, SVFLinear)]
    assert {m.svf_side for m in layers} == {"left", "right"}
    for layer in layers:
        ref_w = dense_reference(layer)
        base_layer = layer.get_base_layer()
        bias = base_layer.bias.double() if base_layer.bias is not None else None
        few = torch.randn(3, 4, layer.in_features)  # 12 tokens: factored
        many = torch.randn(8, 64, layer.in_features)  # 512 tokens > max(out, in): recomposed without grad
        assert not layer._use_recomposed(many.requires_grad_(True), layer._combined_delta(["default"]))
        many = many.detach()
        with torch.no_grad():
            assert layer._use_recomposed(many, layer._combined_delta(["default"]))
            for x in (few, many):
                expected = torch.nn.functional.linear(x.double(), ref_w, bias)
                torch.testing.assert_close(layer(x).double(), expected, rtol=1e-4, atol=1e-5)
        expected = torch.nn.functional.linear(few.double(), ref_w, bias)
        torch.testing.assert_close(layer(few).double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("builder", [build_tiny_llama, build_tiny_gpt2])
@pytest.mark.parametrize("rank", [None, 20])
def test_fast_factored_form_matches_reference_and_regular_gradients(tok, builder, rank):
    targets = MLP if builder is build_tiny_llama else ["c_fc", "c_proj", "c_attn"]
    models = {}
    for fast in (False, True):
        torch.manual_seed(0)
        models[fast] = get_peft_model(builder(tok), SVFConfig(target_modules=targets, rank=rank, fast_factored=fast))
        randomize_z(models[fast])
    layers = [m for m in models[True].modules() if isinstance(m, SVFLinear)]
    assert {m.svf_side for m in layers} == {"left", "right"}
    for layer in layers:
        assert layer.svf_P is not None and layer._fast_form(layer.svf_z["default"].shape[0])
        ref_w = dense_reference(layer)
        base_layer = layer.get_base_layer()
        bias = base_layer.bias.double() if base_layer.bias is not None else None
        x = torch.randn(3, 4, layer.in_features)
        expected = torch.nn.functional.linear(x.double(), ref_w, bias)
        torch.testing.assert_close(layer(x).double(), expected, rtol=1e-4, atol=1e-5)
    # same loss and same z gradients as the regular factored form
    batch = ids()
    grads = {}
    for fast, model in models.items():
        model.eval()  # no dropout (GPT-2), gradients still flow
        out = model(batch, labels=batch)
        out.loss.backward()
        grads[fast] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        assert grads[fast] and all(".svf_z." in n for n in grads[fast])
    assert grads[True].keys() == grads[False].keys()
    for n in grads[True]:
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=1e-3, atol=1e-6)


def test_fast_factored_is_base_up_to_rounding_and_not_saved(tok, tmp_path):
    base = build_tiny_llama(tok)
    x = ids()
    with torch.no_grad():
        ref = base(x).logits
    model = get_peft_model(base, SVFConfig(target_modules=MLP, fast_factored=True))
    model.train()
    torch.testing.assert_close(model(x).logits, ref, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all(".svf_z" in k for k in saved)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fast_factored"] is True
    with pytest.raises(ValueError, match="fast_factored"):
        SVFConfig(fast_factored="yes")


def test_fast_factored_not_used_for_small_rank(llama):
    model = get_peft_model(llama, SVFConfig(target_modules=MLP, rank=4, fast_factored=True))
    layer = next(m for m in model.modules() if isinstance(m, SVFLinear))
    # 2·k·m < m²: the two-matmul exact form is cheaper, so no copy of the weight is kept
    assert layer.svf_P is None and not layer._fast_form(4)
    # an adapter of full rank added later keeps P (and uses it); the rank-4 adapter still uses the exact form
    model.add_adapter("full", SVFConfig(target_modules=MLP, fast_factored=True))
    assert layer.svf_P is not None and layer._fast_form(layer.svf_rank) and not layer._fast_form(4)


def test_default_is_fast_factored_and_exact_form_is_opt_in(llama):
    assert SVFConfig().fast_factored is True
    fast = get_peft_model(copy.deepcopy(llama), SVFConfig(target_modules=MLP))
    exact = get_peft_model(llama, SVFConfig(target_modules=MLP, fast_factored=False))
    fast_layers = [m for m in fast.modules() if isinstance(m, SVFLinear)]
    exact_layers = [m for m in exact.modules() if isinstance(m, SVFLinear)]
    assert fast_layers and all(m.svf_P is not None for m in fast_layers)
    assert exact_layers and all(m.svf_P is None for m in exact_layers)


def test_only_z_receives_gradients(llama):
    model = get_peft_model(llama, SVFConfig(target_modules=MLP))
    model.train()
    out = model(ids(), labels=ids())
    out.loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".svf_z." in n for n in with_grad)
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in with_grad)
    layer = next(m for m in model.modules() if isinstance(m, SVFLinear))
    assert not any(b.requires_grad for b in (layer.svf_S, layer.svf_Q))


# ----------------------------------------------------------------------------- save / load


def test_save_load_bit_exact_and_only_z_saved(tok, tmp_path):
    base = build_tiny_llama(tok)
    model = get_peft_model(base, SVFConfig(target_modules=MLP, mode="sigmoid", init_noise_std=0.01))
    randomize_z(model)
    x = ids()
    with torch.no_grad():
        expected = model(x).logits
    model.save_pretrained(tmp_path / "a")
    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert len(saved) == 6 and all(k.endswith("svf_z") for k in saved)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "SVF" and cfg["mode"] == "sigmoid"
    assert (tmp_path / "a" / "README.md").exists()

    loaded = PeftModel.from_pretrained(build_tiny_llama(tok), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, expected)
    checked = load_adapter(build_tiny_llama(tok), tmp_path / "a", expected_type="SVF")
    with torch.no_grad():
        assert torch.equal(checked(x).logits, expected)


def test_auto_peft_model_loads_svf(tok, tmp_path):
    base = build_tiny_llama(tok)
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(build_tiny_llama(tok), SVFConfig(target_modules=MLP))
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    randomize_z(model)
    model.save_pretrained(tmp_path / "ad")
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "ad")
    x = ids()
    with torch.no_grad():
        assert torch.equal(auto(x).logits, model(x).logits)


def test_push_to_hub_uploads_adapter_files_only(llama, monkeypatch):
    import huggingface_hub

    uploaded = {}

    def fake_create_commit(self, repo_id, operations, **kwargs):
        uploaded[repo_id] = sorted(op.path_in_repo for op in operations)
        return huggingface_hub.CommitInfo(
            commit_url="https://huggingface.co/me/svf-test/commit/" + "1" * 40,
            commit_message="m",
            commit_description="",
            oid="1" * 40,
        )

    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", fake_create_commit)
    monkeypatch.setattr(
        huggingface_hub.HfApi,
        "create_repo",
        lambda self, repo_id, **kw: huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}"),
    )
    import transformers.utils.hub as tf_hub

    def no_remote_card(*args, **kwargs):
        raise tf_hub.EntryNotFoundError("no remote model card (offline test)")

    monkeypatch.setattr(tf_hub.ModelCard, "load", no_remote_card)
    model = get_peft_model(llama, SVFConfig(target_modules=MLP))
    model.push_to_hub("me/svf-test", token="hf_fake")
    assert uploaded["me/svf-test"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


# ----------------------------------------------------------------------------- merge, disable, adapters


@pytest.mark.parametrize("fast_factored", [True, False])
def test_merge_unmerge_and_merge_and_unload(tok, fast_factored):
    base = build_tiny_llama(tok)
    originals = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_peft_model(base, SVFConfig(target_modules=MLP, fast_factored=fast_factored))
    randomize_z(model)
    x = ids()
    with torch.no_grad():
        adapted = model(x).logits
        model.merge_adapter()
        torch.testing.assert_close(model(x).logits, adapted, rtol=1e-4, atol=1e-5)
        model.unmerge_adapter()
        assert torch.equal(model(x).logits, adapted)  # the unmerged layer computes as before the merge
    for n, p in model.base_model.model.named_parameters():
        key = n.replace(".base_layer", "")
        if key in originals:
            assert torch.equal(p, originals[key]), n
    with torch.no_grad():
        plain = model.merge_and_unload()
        assert not any(isinstance(m, SVFLinear) for m in plain.modules())
        torch.testing.assert_close(plain(x).logits, adapted, rtol=1e-4, atol=1e-5)


def test_disable_adapter_gives_base_outputs(tok):
    base = build_tiny_llama(tok)
    x = ids()
    with torch.no_grad():
        ref = base(x).logits
    model = get_peft_model(base, SVFConfig(target_modules=MLP))
    randomize_z(model)
    with torch.no_grad():
        assert not torch.equal(model(x).logits, ref)
        with model.disable_adapter():
            assert torch.equal(model(x).logits, ref)


def test_multiple_adapters_share_factors_and_switch_without_svd(tok, monkeypatch):
    model = get_peft_model(build_tiny_llama(tok), SVFConfig(target_modules=MLP))
    model.add_adapter("b", SVFConfig(target_modules=MLP))
    layer = next(m for m in model.modules() if isinstance(m, SVFLinear))
    assert set(layer.svf_z) == {"default", "b"}
    # one S, one Q (and one P of the default fast factored form) for both adapters
    assert len([b for n, b in layer.named_buffers() if n.startswith("svf_")]) == 3
    randomize_z(model, seed=3)

    def no_svd(*a, **k):
        raise AssertionError("switching adapters must not compute an SVD")

    monkeypatch.setattr("peft_spectral.svd_cache.compute_factors", no_svd)
    x = ids()
    with torch.no_grad():
        model.set_adapter("default")
        a = model(x).logits
        model.set_adapter("b")
        b = model(x).logits
        model.set_adapter("default")
        assert torch.equal(model(x).logits, a) and not torch.equal(a, b)


def test_combination_per_adapter_and_per_layer(tok, tmp_path):
    model = get_peft_model(build_tiny_llama(tok), SVFConfig(target_modules=MLP))
    model.add_adapter("b", SVFConfig(target_modules=MLP))
    randomize_z(model, seed=4)
    combine_svf_adapters(model, ["default", "b"], [0.25, 0.5], "mix")
    combine_svf_adapters(model, ["default", "b"], [[1.0, 0.0], [0.0, 1.0]], "per_layer")
    for name, layer in model.base_model.svf_layers():
        za, zb = layer.svf_z["default"], layer.svf_z["b"]
        torch.testing.assert_close(layer.svf_z["mix"], 0.25 * za + 0.5 * zb)
        expected = za if ".layers.0." in name else zb
        assert torch.equal(layer.svf_z["per_layer"], expected)
    model.set_adapter("mix")
    x = ids()
    with torch.no_grad():
        out = model(x).logits
    model.save_pretrained(tmp_path / "s", selected_adapters=["mix"])
    loaded = PeftModel.from_pretrained(build_tiny_llama(tok), tmp_path / "s" / "mix")
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, out)
    with pytest.raises(ValueError, match="shape"):
        combine_svf_adapters(model, ["default", "b"], [1.0], "bad")


# ----------------------------------------------------------------------------- cache


def test_svd_cache_hit_miss_and_stale(tmp_path):
    cache = SVDCache(tmp_path / "svd")
    w = torch.randn(12, 7)
    first = cache.get(w)
    assert (cache.hits, cache.misses) == (0, 1)
    again = cache.get(w)
    assert (cache.hits, cache.misses) == (1, 1)
    assert torch.equal(first.Q, again.Q) and torch.equal(first.S, again.S)
    # an entry whose content does not belong to the weight is stale: recomputed, never used
    path = cache.path_for(first.weight_hash)
    bad = {"S": first.S * 2, "Q": first.Q}
    save_file(bad, str(path), metadata={"weight_hash": first.weight_hash, "side": first.side, "format": "1"})
    third = cache.get(w)
    assert cache.stale == 1 and torch.equal(third.S, first.S)
    # a truncated file is recomputed too
    path.write_bytes(path.read_bytes()[:20])
    assert torch.equal(cache.get(w).S, first.S) and cache.stale == 2
    # a changed weight never hits the old entry
    w2 = w.clone()
    w2[0, 0] += 1e-3
    cache.get(w2)
    assert cache.misses == 4


def test_factors_reconstruct_weight():
    for shape in [(9, 5), (5, 9), (6, 6)]:
        w = torch.randn(*shape)
        f = compute_factors(w)
        q = f.Q.double()
        assert torch.allclose(q.T @ q, torch.eye(q.shape[0], dtype=torch.float64), atol=1e-6)
        s_ref = torch.linalg.svdvals(w.double())
        torch.testing.assert_close(f.S.double(), s_ref, rtol=1e-5, atol=1e-6)


def test_injection_uses_cache_second_time(tok, monkeypatch):
    get_peft_model(build_tiny_llama(tok), SVFConfig(target_modules=MLP))
    calls = []
    real = peft_spectral.svd_cache.compute_factors
    monkeypatch.setattr("peft_spectral.svd_cache.compute_factors", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = get_peft_model(build_tiny_llama(tok), SVFConfig(target_modules=MLP))
    assert calls == [] and model.base_model._svd_cache.hits == 6


# ----------------------------------------------------------------------------- bad input


def test_target_matching_nothing_lists_real_modules(llama):
    with pytest.raises(ValueError, match=r"matches no module.*q_proj"):
        get_peft_model(llama, SVFConfig(target_modules=["nonexistent_proj"]))


def test_unknown_architecture_needs_targets():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(ValueError, match=r"target_modules is required.*fc"):
        get_peft_model(Tiny(), SVFConfig())


def test_unsupported_layer_type_is_named(llama):
    with pytest.raises(TypeError, match="Embedding"):
        get_peft_model(llama, SVFConfig(target_modules=["embed_tokens"]))


def test_adapter_from_other_shapes_names_module(tok, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    get_peft_model(build_tiny_llama(tok), SVFConfig(target_modules=MLP)).save_pretrained(tmp_path / "a")
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    with pytest.raises(ValueError, match=r"module 'model\.layers\.0\.mlp\.\w+_proj' has 16 .* holds 32"):
        PeftModel.from_pretrained(LlamaForCausalLM(cfg), tmp_path / "a")


def test_corrupt_foreign_and_pickled_adapters_are_refused(tok, tmp_path):
    model = get_peft_model(build_tiny_llama(tok), SVFConfig(target_modules=MLP))
    model.save_pretrained(tmp_path / "ok")
    validate_adapter_dir(tmp_path / "ok", expected_type="SVF")

    truncated = tmp_path / "ok"
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterLoadError, match="corrupt or truncated"):
        load_adapter(build_tiny_llama(tok), truncated)

    lora = get_peft_model(build_tiny_llama(tok), LoraConfig(target_modules=["q_proj"], r=2))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(AdapterLoadError, match="'LORA' adapter, expected a 'SVF'"):
        load_adapter(build_tiny_llama(tok), tmp_path / "lora", expected_type="SVF")

    (tmp_path / "lora" / "adapter_model.safetensors").rename(tmp_path / "lora" / "adapter_model.bin")
    with pytest.raises(AdapterLoadError, match="only safetensors"):
        validate_adapter_dir(tmp_path / "lora")


def test_non_finite_z_refused_on_merge(llama):
    model = get_peft_model(llama, SVFConfig(target_modules=MLP))
    layer = next(m for m in model.modules() if isinstance(m, SVFLinear))
    before = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        layer.svf_z["default"][3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        model.merge_adapter()
    assert torch.equal(layer.get_base_layer().weight, before)


# ----------------------------------------------------------------------------- init_weights


def test_init_weights_false_is_a_random_non_identity_adapter(tok):
    x = ids()
    base = build_tiny_llama(tok)
    with torch.no_grad():
        ref = base(x).logits
    torch.manual_seed(0)
    model = get_peft_model(base, SVFConfig(target_modules=MLP, init_weights=False))
    zs = [layer.svf_z["default"].detach() for _, layer in model.base_model.svf_layers()]
    assert all(not torch.equal(z, torch.ones_like(z)) for z in zs)
    spread = torch.cat(zs) - 1
    assert 0.3 < float(spread.std()) < 0.7 and abs(float(spread.mean())) < 0.15  # N(1, 0.5²) around init_value
    with torch.no_grad():
        assert not torch.allclose(model(x).logits, ref, atol=1e-3)
    model.add_adapter("other", SVFConfig(target_modules=MLP, init_weights=False))
    layer = model.base_model.svf_layers()[0][1]
    assert not torch.equal(layer.svf_z["default"], layer.svf_z["other"])  # each call draws anew


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_init_weights_must_be_bool(bad):
    with pytest.raises(ValueError, match="init_weights"):
        SVFConfig(target_modules=MLP, init_weights=bad)


# ----------------------------------------------------------------------------- add_weighted_adapter


def test_add_weighted_adapter_is_peft_style_linear_combination(tok, tmp_path):
    model = get_peft_model(build_tiny_llama(tok), SVFConfig(target_modules=MLP, init_weights=False))
    model.add_adapter("b", SVFConfig(target_modules=MLP, init_weights=False))
    model.add_weighted_adapter(adapters=["default", "b"], weights=[0.25, -0.5], adapter_name="mix")
    assert "mix" in model.peft_config and model.active_adapters == ["default"]
    for name, layer in model.base_model.svf_layers():
        expected = 0.25 * layer.svf_z["default"].detach().double() - 0.5 * layer.svf_z["b"].detach().double()
        torch.testing.assert_close(layer.svf_z["mix"].detach().double(), expected, rtol=1e-6, atol=1e-6)
        assert not layer.svf_z["mix"].requires_grad  # a new adapter is inactive, as in PEFT
    model.set_adapter("mix")
    x = ids()
    with torch.no_grad():
        mixed = model(x).logits
    model.save_pretrained(tmp_path, selected_adapters=["mix"])
    loaded = PeftModel.from_pretrained(build_tiny_llama(tok), tmp_path / "mix")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, mixed)


def test_add_weighted_adapter_refuses_other_combination_types_and_names(llama):
    model = get_peft_model(llama, SVFConfig(target_modules=MLP))
    with pytest.raises(ValueError, match="combination_type must be 'linear'"):
        model.add_weighted_adapter(["default"], [1.0], "mix", combination_type="svd")
    with pytest.raises(ValueError, match="exists already"):
        model.add_weighted_adapter(["default"], [1.0], "default")
    with pytest.raises(ValueError, match="unknown adapter"):
        model.add_weighted_adapter(["nope"], [1.0], "mix")
    assert set(model.peft_config) == {"default"}


# ----------------------------------------------------------------------------- dtypes and devices


HALF = [torch.bfloat16, torch.float16]


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize("factor_dtype", ["auto", "float32"])
@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_base_forward_backward_merge_save_load(tok, tmp_path, dtype, factor_dtype):
    """bf16/fp16 base: factors in the base's dtype ("auto") or fp32, z fp32 (PEFT's autocast), merge and reload agree."""
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 5e-3, "atol": 5e-3}
    x = ids()
    torch.manual_seed(0)
    config = SVFConfig(target_modules=MLP, init_weights=False, factor_dtype=factor_dtype)
    model = get_peft_model(build_tiny_llama(tok).to(dtype), config)
    layers = [layer for _, layer in model.base_model.svf_layers()]
    factors = dtype if factor_dtype == "auto" else torch.float32
    assert all(layer.svf_z["default"].dtype == torch.float32 for layer in layers)
    assert all(layer.svf_Q.dtype == factors and layer.svf_P.dtype == factors for layer in layers)
    assert all(layer.svf_S.dtype == torch.float32 for layer in layers)

    # forward: each layer against the fp64 dense reference of its (half precision) base weight
    layer = layers[0]
    h = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(2)).to(dtype)
    with torch.no_grad():
        y = layer(h)
        y_ref = h.double() @ dense_reference(layer).T
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), y_ref, **tol)

    # backward: finite gradients on z only
    out = model(x).logits
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.float().pow(2).mean().backward()
    grads = [layer.svf_z["default"].grad for layer in layers]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    assert all(g.dtype == torch.float32 for g in grads)
    assert all(p.grad is None for n, p in model.named_parameters() if "svf_z" not in n)

    # merge: same outputs up to half-precision rounding; unmerge restores the weight bit for bit
    before = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        adapted = model(x).logits.float()
        model.merge_adapter()
        assert layer.get_base_layer().weight.dtype == dtype
        merged = model(x).logits.float()
        # the merged weight is rounded to half precision once, the factored forward a few times: a few units of eps
        assert rel_err(merged, adapted) < 4 * torch.finfo(dtype).eps
        model.unmerge_adapter()
    assert torch.equal(layer.get_base_layer().weight, before)

    # save / load onto a fresh half-precision base: identical outputs
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build_tiny_llama(tok).to(dtype), tmp_path)
    assert all(m.svf_Q.dtype == factors for _, m in loaded.base_model.svf_layers())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_factors_stay_within_the_base_models_own_rounding_at_init(tok, dtype):
    """At init, 16-bit factors move the output from the half-precision base by less than half precision itself does."""
    x = ids()
    torch.manual_seed(0)
    base = build_tiny_llama(tok)
    with torch.no_grad():
        ref32 = base(x).logits
        base = base.to(dtype)
        ref_half = base(x).logits
        model = get_peft_model(base, SVFConfig(target_modules=MLP))
        assert model.base_model.svf_layers()[0][1].svf_P.dtype == dtype
        out = model(x).logits
        # one layer: the fast form's output against the fp64 product with the layer's (half precision) weight
        layer = model.base_model.svf_layers()[0][1]
        h = torch.randn(7, layer.in_features, generator=torch.Generator().manual_seed(3)).to(dtype)
        w = weight_matrix(layer.get_base_layer()).double()
        assert rel_err(layer(h), h.double() @ w.T) < torch.finfo(dtype).eps
    assert out.dtype == dtype
    own = rel_err(ref_half, ref32)  # what half precision alone does to the fp32 model's logits
    assert rel_err(out, ref_half) < own
    assert rel_err(out, ref32) < 1.5 * own


@pytest.mark.parametrize("fast_factored", [True, False])
def test_bfloat16_factors_give_the_gradient_of_float32_factors(tok, fast_factored):
    """The scales are applied in fp32: the gradient of z with 16-bit factors is close to the fp32 factors' one."""
    x = ids()
    grads = {}
    for factor_dtype in ("bfloat16", "float32"):
        torch.manual_seed(0)
        model = get_peft_model(
            build_tiny_llama(tok).to(torch.bfloat16),
            SVFConfig(target_modules=MLP, init_weights=False, factor_dtype=factor_dtype, fast_factored=fast_factored),
        )
        torch.manual_seed(1)
        model(x).logits.float().log_softmax(-1)[..., 0].mean().backward()
        grads[factor_dtype] = torch.cat([m.svf_z["default"].grad for _, m in model.base_model.svf_layers()])
    assert rel_err(grads["bfloat16"], grads["float32"]) < 0.05  # 1.1-1.4 % when written
    cos = torch.nn.functional.cosine_similarity(grads["bfloat16"], grads["float32"], dim=0)
    assert float(cos) > 0.999


def test_half_precision_exact_form_is_the_base_model_bit_for_bit_at_init(tok):
    x = ids()
    base = build_tiny_llama(tok).to(torch.bfloat16)
    with torch.no_grad():
        ref = base(x).logits
        model = get_peft_model(base, SVFConfig(target_modules=MLP, fast_factored=False))
        assert model.base_model.svf_layers()[0][1].svf_Q.dtype == torch.bfloat16
        assert torch.equal(model(x).logits, ref)


def test_float32_base_with_bfloat16_factors(tok):
    """`factor_dtype="bfloat16"` on an fp32 base (e.g. trained under autocast): fp32 output within bf16 rounding."""
    x = ids()
    base = build_tiny_llama(tok)
    with torch.no_grad():
        ref = base(x).logits
        own = rel_err(copy.deepcopy(base).to(torch.bfloat16)(x).logits, ref)  # a bf16 model's own rounding
        # the factored form (a composed W' at init would be the base weight itself)
        model = get_peft_model(base, SVFConfig(target_modules=MLP, factor_dtype="bfloat16", compose_inference=False))
        layer = model.base_model.svf_layers()[0][1]
        assert layer.svf_Q.dtype == layer.svf_P.dtype == torch.bfloat16 and layer.svf_S.dtype == torch.float32
        out = model(x).logits
    assert out.dtype == torch.float32
    assert 0 < rel_err(out, ref) < own


def test_float32_base_keeps_float32_factors_and_merges_exactly(llama):
    model = get_peft_model(llama, SVFConfig(target_modules=MLP, init_weights=False))
    layer = model.base_model.svf_layers()[0][1]
    assert layer.svf_Q.dtype == layer.svf_P.dtype == torch.float32
    before = layer.get_base_layer().weight.detach().clone()
    x = ids()
    with torch.no_grad():
        adapted = model(x).logits
        model.merge_adapter()
        torch.testing.assert_close(model(x).logits, adapted, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
    assert torch.equal(layer.get_base_layer().weight, before)


def test_an_adapter_with_another_factor_dtype_keeps_the_layers_factors(tok):
    model = get_peft_model(build_tiny_llama(tok).to(torch.bfloat16), SVFConfig(target_modules=MLP))
    with pytest.warns(UserWarning, match="shared by its adapters"):
        model.add_adapter("b", SVFConfig(target_modules=MLP, factor_dtype="float32"))
    assert all(m.svf_Q.dtype == torch.bfloat16 for _, m in model.base_model.svf_layers())


@pytest.mark.parametrize("bad", ["fp32", "float64", None])
def test_factor_dtype_is_validated(bad):
    with pytest.raises(ValueError, match="factor_dtype"):
        SVFConfig(target_modules=MLP, factor_dtype=bad)


def test_half_precision_without_autocast_keeps_z_in_base_dtype(tok):
    model = get_peft_model(
        build_tiny_llama(tok).to(torch.bfloat16), SVFConfig(target_modules=MLP), autocast_adapter_dtype=False
    )
    layer = model.base_model.svf_layers()[0][1]
    assert layer.svf_z["default"].dtype == torch.bfloat16 and layer.svf_Q.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(model(ids()).logits).all()


@pytest.mark.parametrize("src, dst", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_to_dtype_casts_every_floating_tensor_of_the_layer(tok, src, dst):
    model = get_peft_model(build_tiny_llama(tok).to(src), SVFConfig(target_modules=MLP, init_weights=False))
    model.merge_adapter()  # also creates the backup of the base weight
    model.unmerge_adapter()
    model.merge_adapter()
    model.to(dst)
    for _, layer in model.base_model.svf_layers():
        tensors = dict(layer.named_parameters()) | dict(layer.named_buffers())
        assert layer.svf_P is not None and layer.svf_weight_backup is not None and "svf_weight_backup" in tensors
        assert {n: t.dtype for n, t in tensors.items()} == {n: dst for n in tensors}
    model.unmerge_adapter()
    x = ids()
    with torch.no_grad():
        adapted = model(x).logits
        model.merge_adapter()
        merged = model(x).logits
    assert adapted.dtype == dst and rel_err(merged, adapted) < 4 * torch.finfo(torch.bfloat16).eps


def test_to_moves_every_tensor_of_the_layer(tok):
    model = get_peft_model(build_tiny_llama(tok), SVFConfig(target_modules=MLP, fast_factored=True))
    randomize_z(model)
    model.merge_adapter()  # also creates the backup of the base weight
    model.to("meta")
    for _, layer in model.base_model.svf_layers():
        tensors = list(layer.parameters()) + list(layer.buffers())
        tensors += [v for v in vars(layer).values() if isinstance(v, torch.Tensor)]
        assert layer.svf_weight_backup is not None and layer.svf_P is not None
        assert all(t.device.type == "meta" for t in tensors)


def test_factors_are_computed_under_gather_params_ctx(tok, monkeypatch):
    """DeepSpeed ZeRO-3: the SVD reads the weights inside PEFT's `gather_params_ctx` (as PEFT's PiSSA init does)."""
    import contextlib

    import peft_spectral.tuners.svf.model as svf_model

    gathered = []

    @contextlib.contextmanager
    def recording_ctx(params, *args, **kwargs):
        gathered.extend([params] if isinstance(params, torch.nn.Parameter) else list(params))
        yield

    monkeypatch.setattr(svf_model, "gather_params_ctx", recording_ctx)
    base = build_tiny_llama(tok)
    targets = {id(m.weight) for n, m in base.named_modules() if n.endswith(tuple(MLP))}
    get_peft_model(base, SVFConfig(target_modules=MLP))
    assert targets <= {id(p) for p in gathered}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "tanh"}, "mode"),
        ({"rank": 0}, "rank"),
        ({"max_mult": 0}, "max_mult"),
        ({"init_noise_std": -1}, "init_noise_std"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SVFConfig(target_modules=MLP, **kwargs)


def test_all_linear_and_layers_to_transform(llama):
    model = get_peft_model(llama, SVFConfig(target_modules="all-linear"))
    names = [n for n, _ in model.base_model.svf_layers()]
    assert len(names) == 14 and not any("lm_head" in n for n in names)
    model2 = get_peft_model(
        build_tiny_llama(build_tiny_tokenizer()), SVFConfig(target_modules=MLP, layers_to_transform=[1])
    )
    assert all(".layers.1." in n for n, _ in model2.base_model.svf_layers())
    model3 = get_peft_model(
        build_tiny_llama(build_tiny_tokenizer()), SVFConfig(target_modules=MLP, exclude_modules=["down_proj"])
    )
    assert all("down_proj" not in n for n, _ in model3.base_model.svf_layers())
