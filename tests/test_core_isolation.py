"""CoreIsolation adapter: identity at init, exact merge/unmerge, bit-exact save/load, masks, validation."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils import PeftType
from testing_utils import build_tiny_llama, build_tiny_tokenizer

from peft_spectral.tuners.core_isolation import CoreIsolationConfig, CoreIsolationLayer, CoreIsolationModel


MLP = ["gate_proj", "up_proj", "down_proj"]


def _randomise(model, seed=1, std=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "core_isolation_delta" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def _ids(seed=0):
    return torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(seed))


def test_registered_and_identity_at_init(tiny_llama):
    base, _ = tiny_llama
    x = _ids()
    with torch.no_grad():
        ref = base(x).logits
    model = get_peft_model(base, CoreIsolationConfig(target_modules=MLP))
    assert model.peft_config["default"].peft_type == PeftType.CORE_ISOLATION
    assert isinstance(model.base_model, CoreIsolationModel)
    layers = model.base_model.core_isolation_layers()
    assert len(layers) == 6 and all(isinstance(v, CoreIsolationLayer) for v in layers.values())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("core_isolation_delta" in n for n in trainable)
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref)


def test_default_targets_all_linear(tiny_llama):
    base, _ = tiny_llama
    model = get_peft_model(base, CoreIsolationConfig())
    names = set(model.base_model.core_isolation_layers())
    assert "model.layers.0.self_attn.q_proj.weight" in names and "model.layers.1.mlp.down_proj.weight" in names
    assert not any("lm_head" in n for n in names)


def test_merge_unmerge_exact(tiny_llama):
    base, _ = tiny_llama
    w0 = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_peft_model(base, CoreIsolationConfig(target_modules=MLP))
    _randomise(model)
    x = _ids()
    with torch.no_grad():
        unmerged = model(x).logits
        model.merge_adapter()
        merged = model(x).logits
        model.unmerge_adapter()
        again = model(x).logits
    assert torch.equal(unmerged, merged)  # same W + Δ, same matmul
    assert torch.equal(again, unmerged)
    for name, p in model.get_base_model().named_parameters():
        if "core_isolation" in name:
            continue
        key = name.replace(".base_layer", "")
        assert torch.equal(p, w0[key]), name  # bit-exact restore
    with torch.no_grad(), model.disable_adapter():
        assert not torch.equal(model(x).logits, unmerged)


def test_merge_and_unload_plain_model(tiny_llama):
    base, _ = tiny_llama
    model = get_peft_model(base, CoreIsolationConfig(target_modules=MLP))
    _randomise(model)
    x = _ids()
    with torch.no_grad():
        expected = model(x).logits
    plain = model.merge_and_unload()
    assert not any(isinstance(m, CoreIsolationLayer) for m in plain.modules())
    assert not any("core_isolation" in n for n in plain.state_dict())
    with torch.no_grad():
        assert torch.equal(plain(x).logits, expected)


def test_save_load_bit_exact_with_masks(tiny_llama, tmp_path):
    from testing_utils import build_tiny_llama

    base, tok = tiny_llama
    model = get_peft_model(base, CoreIsolationConfig(target_modules=MLP, core_fraction=0.05))
    _randomise(model)
    layers = model.base_model.core_isolation_layers()
    key = "model.layers.1.mlp.up_proj.weight"
    mask = (
        torch.rand(layers[key].core_isolation_mask["default"].shape, generator=torch.Generator().manual_seed(3)) < 0.1
    )
    model.base_model.set_core_masks({key: mask})
    x = _ids()
    with torch.no_grad():
        expected = model(x).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build_tiny_llama(tok), tmp_path)
    assert loaded.peft_config["default"].core_fraction == 0.05
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, expected)
    got = loaded.base_model.core_isolation_layers()
    assert torch.equal(got[key].core_isolation_mask["default"], mask)
    assert got[key].core_isolation_mask["default"].dtype == torch.bool
    for k, layer in layers.items():
        assert torch.equal(got[k].core_isolation_delta["default"], layer.core_isolation_delta["default"])


def test_mask_blocks_gradient(tiny_llama):
    base, _ = tiny_llama
    model = get_peft_model(base, CoreIsolationConfig(target_modules=MLP))
    _randomise(model)
    key = "model.layers.0.mlp.gate_proj.weight"
    layer = model.base_model.core_isolation_layers()[key]
    mask = torch.zeros_like(layer.core_isolation_mask["default"])
    mask[:5] = True
    model.base_model.set_core_masks({key: mask})
    x = _ids()
    model(input_ids=x, labels=x).loss.backward()
    grad = layer.core_isolation_delta["default"].grad
    assert torch.count_nonzero(grad[mask]) == 0
    assert torch.count_nonzero(grad[~mask]) > 0


def test_conv1d_gpt2(tiny_gpt2):
    base, _ = tiny_gpt2
    model = get_peft_model(
        base, CoreIsolationConfig(target_modules=["c_fc", "c_proj"], exclude_modules=["attn.c_proj"])
    )
    layers = model.base_model.core_isolation_layers()
    assert layers and all(layer.fan_in_fan_out for layer in layers.values())
    _randomise(model)
    x = _ids()
    with torch.no_grad():
        y = model(x).logits
        plain = model.merge_and_unload()
        assert torch.allclose(plain(x).logits, y, atol=1e-5)


@pytest.mark.parametrize("p", [0.0, 1.0, -0.1, 1.5, True])
def test_bad_core_fraction(p):
    with pytest.raises(ValueError, match="core_fraction"):
        CoreIsolationConfig(core_fraction=p)


@pytest.mark.parametrize("tau", [-0.01, 1.01])
def test_bad_similarity_threshold(tau):
    with pytest.raises(ValueError, match="similarity_threshold"):
        CoreIsolationConfig(similarity_threshold=tau)


def test_threshold_bounds_ok():
    assert CoreIsolationConfig(similarity_threshold=0.0).similarity_threshold == 0.0
    assert CoreIsolationConfig(similarity_threshold=1.0).similarity_threshold == 1.0


# ---------------------------------------------------------------------------------------------------- init_weights


def test_init_weights_false_gives_a_random_delta_at_the_weight_scale(tiny_llama):
    base, _ = tiny_llama
    x = _ids()
    with torch.no_grad():
        ref = base(x).logits
    torch.manual_seed(0)
    model = get_peft_model(base, CoreIsolationConfig(target_modules=MLP, init_weights=False))
    for layer in model.base_model.core_isolation_layers().values():
        delta = layer.core_isolation_delta["default"].detach()
        weight = layer.get_base_layer().weight.detach()
        assert delta.shape == weight.shape and delta.abs().sum() > 0
        assert 0.8 < float(delta.std() / weight.std()) < 1.25
        assert not layer.core_isolation_mask["default"].any()
    with torch.no_grad():
        assert not torch.allclose(model(x).logits, ref, atol=1e-3)


def test_init_weights_must_be_bool():
    with pytest.raises(ValueError, match="init_weights"):
        CoreIsolationConfig(target_modules=MLP, init_weights="no")


def test_layer_class_name_and_peft_type_set_in_post_init():
    from peft_spectral.tuners.core_isolation import CoreIsolationLinear

    assert CoreIsolationLinear.__name__ == "CoreIsolationLinear"
    assert CoreIsolationConfig(target_modules=MLP).peft_type == PeftType.CORE_ISOLATION


# ---------------------------------------------------------------------------------------------------- dtypes, devices


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_forward_backward_merge_save_load(tiny_llama, tmp_path, dtype):
    """bf16/fp16 base: the delta is fp32 (PEFT's autocast), the output keeps the base dtype, merge and reload agree."""
    base, _ = tiny_llama
    x = _ids()
    torch.manual_seed(0)
    model = get_peft_model(base.to(dtype), CoreIsolationConfig(target_modules=MLP, init_weights=False))
    layers = list(model.base_model.core_isolation_layers().values())
    assert all(layer.core_isolation_delta["default"].dtype == torch.float32 for layer in layers)

    # forward of one layer against a plain reference: x (W + Δ)ᵀ + b in float64, W in its half-precision values
    layer = layers[0]
    h = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(2)).to(dtype)
    w = layer.get_base_layer().weight.double()
    delta = layer.core_isolation_delta["default"].detach().double()
    with torch.no_grad():
        y = layer(h)
    assert y.dtype == dtype
    reference = h.double() @ (w + delta.to(dtype).double()).T
    torch.testing.assert_close(y.double(), reference, rtol=2e-2, atol=2e-2)

    out = model(x).logits
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.float().pow(2).mean().backward()
    assert all(torch.isfinite(la.core_isolation_delta["default"].grad).all() for la in layers)
    assert all(p.grad is None for n, p in model.named_parameters() if "core_isolation_delta" not in n)

    before = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        adapted = model(x).logits.float()
        model.merge_adapter()
        assert layer.get_base_layer().weight.dtype == dtype
        merged = model(x).logits.float()
        assert float((merged - adapted).norm() / adapted.norm()) < 4 * torch.finfo(dtype).eps
        model.unmerge_adapter()
    assert torch.equal(layer.get_base_layer().weight, before)

    model.save_pretrained(tmp_path)
    fresh = build_tiny_llama(build_tiny_tokenizer()).to(dtype)
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)


def test_to_moves_every_tensor_of_the_layer(tiny_llama):
    base, _ = tiny_llama
    model = get_peft_model(base, CoreIsolationConfig(target_modules=MLP, init_weights=False))
    model.merge_adapter()  # also keeps the pre-merge weight
    model.to("meta")
    for layer in model.base_model.core_isolation_layers().values():
        assert layer.core_isolation_weight_backup is not None
        tensors = list(layer.parameters()) + list(layer.buffers())
        tensors += [v for v in vars(layer).values() if isinstance(v, torch.Tensor)]
        assert all(t.device.type == "meta" for t in tensors)


def test_weights_are_read_under_gather_params_ctx(tiny_llama, monkeypatch):
    """DeepSpeed ZeRO-3: the weight is gathered (PEFT's `gather_params_ctx`) while the layer is built from it."""
    import contextlib

    import peft_spectral.tuners.core_isolation.model as ci_model

    gathered = []

    @contextlib.contextmanager
    def recording_ctx(params, *args, **kwargs):
        gathered.extend([params] if isinstance(params, torch.nn.Parameter) else list(params))
        yield

    monkeypatch.setattr(ci_model, "gather_params_ctx", recording_ctx)
    base, _ = tiny_llama
    targets = {id(m.weight) for n, m in base.named_modules() if n.endswith(tuple(MLP))}
    get_peft_model(base, CoreIsolationConfig(target_modules=MLP))
    assert targets <= {id(p) for p in gathered}
