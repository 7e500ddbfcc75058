r"""Bad inputs to the tuners fail early with an error that names what is wrong (issue 14, items 5-6).

| bad input (before: what happened) | test |
|---|---|
| z = NaN/inf at forward (NaN logits, no error) | `test_svf_non_finite_z_raises_naming_adapter_and_module`, `..._after_an_in_place_update` |
| `mode="sigmoid"` with z = -1e4 (0/0 in the rescale: NaN logits) | `test_svf_sigmoid_mode_is_finite_for_extreme_z`, `..._mixed_extreme_z_matches_the_limit` |
| `mode="sigmoid"` with z = inf | `test_svf_sigmoid_mode_infinite_z_raises` |
| NaN/inf base weight at injection (NaN factors, no error) | `test_non_finite_base_weight_is_refused_at_injection` |
| adapter name with `.`, `/`, `\`, `..` or empty (raised late and broke the model) | `test_get_peft_model_refuses_bad_adapter_name`, `test_add_adapter_...`, `test_load_adapter_...`, `test_other_tuners_...` |
| adapter name `"/tmp/x"` (save_pretrained wrote outside the save dir) | `test_adapter_name_with_path_cannot_escape_the_save_dir` |
| `merge(safe_merge=True)` with a corrupt factor or delta (untested; SVF and CoreIsolation checked it apart) | `test_safe_merge_refuses_a_non_finite_merge_and_keeps_the_weight` |

Training-side bad inputs (a user reward returning NaN/None, an RL run with 0 optimizer steps) are in
`tests/test_training.py`; cache and state-file inputs in `tests/test_svd_cache.py` and `tests/test_state.py`.
"""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import peft_spectral
from peft_spectral.tuners.svf.layer import SVFLinear


class TwoLayer(nn.Module):
    """A tiny MLP: `lin0` (6 → 8) and `lin1` (8 → 4)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(6, 8)
        self.lin1 = nn.Linear(8, 4)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


X = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))


def svf_config(**kwargs):
    return peft_spectral.SVFConfig(target_modules=["lin0", "lin1"], use_svd_cache=False, **kwargs)


def config_for(method: str):
    if method == "svf":
        return svf_config()
    if method == "core_isolation":
        return peft_spectral.CoreIsolationConfig(target_modules=["lin0", "lin1"])
    return peft_spectral.SpectralCompressConfig(target_modules=["lin0", "lin1"], rho=0.5)


def sigmoid_reference(z: torch.Tensor, sigma: torch.Tensor, max_mult: float) -> torch.Tensor:
    """The reference code's rescaled sigmoid scale, in float64: `f · Σσ / Σ(σ f)` with `f = max_mult · sigmoid(z)`."""
    f = max_mult * torch.sigmoid(z.double())
    sigma = sigma.double()
    return f * sigma.sum() / (sigma * f).sum()


# ---------------------------------------------------------------------------------------------------------- z at forward


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_svf_non_finite_z_raises_naming_adapter_and_module(bad):
    model = get_peft_model(TwoLayer(), svf_config(), adapter_name="task_a")
    layer = model.base_model.model.lin1
    with torch.no_grad():
        layer.svf_z["task_a"][1] = bad
    with pytest.raises(ValueError, match=r"'task_a'.*'lin1'.*non-finite"):
        model(X)


def test_svf_non_finite_z_is_checked_again_after_an_in_place_update():
    model = get_peft_model(TwoLayer(), svf_config())
    assert torch.isfinite(model(X)).all()
    with torch.no_grad():
        model.base_model.model.lin0.svf_z["default"][0] = math.nan
    with pytest.raises(ValueError, match="non-finite"):
        model(X)


# ---------------------------------------------------------------------------------------------------------- sigmoid mode


@pytest.mark.parametrize("value", [-1e4, 1e4])
def test_svf_sigmoid_mode_is_finite_for_extreme_z(value):
    base = TwoLayer()
    expected = base(X)
    model = get_peft_model(base, svf_config(mode="sigmoid"))
    for _, layer in model.base_model.svf_layers():
        with torch.no_grad():
            layer.svf_z["default"].fill_(value)
        scale = layer.svf_scale("default")
        assert torch.isfinite(scale).all()
        # all z equal: the sum-preserving rescale gives s = 1, the base layer
        torch.testing.assert_close(scale, torch.ones_like(scale))
    torch.testing.assert_close(model(X), expected, rtol=1e-5, atol=1e-5)


def test_svf_sigmoid_mode_mixed_extreme_z_matches_the_limit():
    model = get_peft_model(TwoLayer(), svf_config(mode="sigmoid"))
    layer = model.base_model.model.lin0
    z = torch.tensor([1e4, -1e4, 1e4, -1e4, 0.0, 3.0])
    with torch.no_grad():
        layer.svf_z["default"].copy_(z)
    scale = layer.svf_scale("default")
    torch.testing.assert_close(scale.double(), sigmoid_reference(z, layer.svf_S, 2.0), rtol=1e-5, atol=1e-6)


def test_svf_sigmoid_mode_matches_the_reference_formula_and_its_gradient():
    model = get_peft_model(TwoLayer(), svf_config(mode="sigmoid", max_mult=3.0))
    layer = model.base_model.model.lin0
    z = torch.randn(6, generator=torch.Generator().manual_seed(3)) * 2
    with torch.no_grad():
        layer.svf_z["default"].copy_(z)
    scale = layer.svf_scale("default")
    torch.testing.assert_close(scale.double(), sigmoid_reference(z, layer.svf_S, 3.0), rtol=1e-5, atol=1e-6)
    weights = torch.arange(6.0)
    (scale * weights).sum().backward()
    z_ref = z.double().requires_grad_(True)
    (sigmoid_reference(z_ref, layer.svf_S, 3.0) * weights.double()).sum().backward()
    torch.testing.assert_close(layer.svf_z["default"].grad.double(), z_ref.grad, rtol=1e-4, atol=1e-6)


def test_svf_sigmoid_mode_infinite_z_raises():
    model = get_peft_model(TwoLayer(), svf_config(mode="sigmoid"))
    with torch.no_grad():
        model.base_model.model.lin0.svf_z["default"][0] = math.inf
    with pytest.raises(ValueError, match=r"'default'.*'lin0'.*non-finite"):
        model(X)


# ---------------------------------------------------------------------------------------------------------- base weights


@pytest.mark.parametrize("method", ["svf", "core_isolation", "spectral_compress"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_base_weight_is_refused_at_injection(method, bad):
    base = TwoLayer()
    with torch.no_grad():
        base.lin1.weight[0, 0] = bad
    with pytest.raises(ValueError, match=r"'lin1'.*non-finite"):
        get_peft_model(base, config_for(method))


# ---------------------------------------------------------------------------------------------------------- adapter names

BAD_NAMES = ["a.b", "/tmp/x", "a\\b", "", ".."]


def _check_still_usable(model: PeftModel) -> None:
    """Another, valid adapter still adds and runs after a refused call."""
    model.add_adapter("valid", svf_config(init_weights=False))
    model.set_adapter("valid")
    out = model(X)
    assert torch.isfinite(out).all()
    assert all("valid" in layer.svf_z for _, layer in model.base_model.svf_layers())
    assert all(set(layer.svf_z) <= {"default", "valid"} for _, layer in model.base_model.svf_layers())


@pytest.mark.parametrize("name", BAD_NAMES)
def test_get_peft_model_refuses_bad_adapter_name(name):
    base = TwoLayer()
    with pytest.raises(ValueError, match="invalid adapter_name"):
        get_peft_model(base, svf_config(), adapter_name=name)
    assert not any(isinstance(m, SVFLinear) for m in base.modules())
    model = get_peft_model(base, svf_config())
    _check_still_usable(model)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_add_adapter_refuses_bad_adapter_name(name):
    model = get_peft_model(TwoLayer(), svf_config())
    with pytest.raises(ValueError, match="invalid adapter_name"):
        model.add_adapter(name, svf_config())
    assert name not in model.peft_config
    _check_still_usable(model)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_load_adapter_refuses_bad_adapter_name(name, tmp_path):
    model = get_peft_model(TwoLayer(), svf_config(init_weights=False))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="invalid adapter_name"):
        model.load_adapter(tmp_path, adapter_name=name)
    assert name not in model.peft_config
    _check_still_usable(model)


@pytest.mark.parametrize("method", ["core_isolation", "spectral_compress"])
def test_other_tuners_refuse_bad_adapter_name(method):
    base = TwoLayer()
    with pytest.raises(ValueError, match="invalid adapter_name"):
        get_peft_model(base, config_for(method), adapter_name="x/y")
    model = get_peft_model(base, config_for(method))
    assert torch.isfinite(model(X)).all()


def test_adapter_name_with_path_cannot_escape_the_save_dir(tmp_path):
    outside = tmp_path / "outside"
    model = get_peft_model(TwoLayer(), svf_config())
    with pytest.raises(ValueError, match="path separator"):
        model.add_adapter(str(outside), svf_config())
    model.save_pretrained(tmp_path / "save")
    assert not outside.exists()
    assert (tmp_path / "save" / "adapter_model.safetensors").is_file()


def _poison(model: PeftModel, method: str) -> None:
    """Make `lin0`'s adapter give a non-finite merged weight (a corrupt factor or delta; `z` stays finite)."""
    layer = model.base_model.model.lin0
    with torch.no_grad():
        if method == "svf":
            layer.svf_Q[0, 0] = math.inf
        elif method == "core_isolation":
            layer.core_isolation_delta["default"][0, 0] = math.inf
        else:
            layer.spectral_compress_us["default"].view(-1)[0] = math.inf


@pytest.mark.parametrize("method", ["svf", "core_isolation", "spectral_compress"])
def test_safe_merge_refuses_a_non_finite_merge_and_keeps_the_weight(method):
    model = get_peft_model(TwoLayer(), config_for(method))
    _poison(model, method)
    lin0 = model.base_model.model.lin0
    before = lin0.get_base_layer().weight.detach().clone()
    with pytest.raises(
        ValueError, match=r"NaNs detected in the merged weights\. The adapter 'default' seems to be broken"
    ):
        model.merge_adapter(safe_merge=True)
    assert not lin0.merged and torch.equal(lin0.get_base_layer().weight, before)
    model.merge_adapter()  # without the check the poisoned merge goes through: the test above is not vacuous
    assert lin0.merged and not torch.isfinite(lin0.get_base_layer().weight).all()
    model.unmerge_adapter()
    assert torch.equal(lin0.get_base_layer().weight, before)
