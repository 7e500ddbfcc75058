"""Adapters that would load broken are refused (issue #27 §3): out-of-range `z`, files missing `z` tensors, adapters of
other base weights, reserved or unusable adapter names, malformed library files.

| bad input (before: what happened) | test |
|---|---|
| `z = 1e30` (finite): loaded, passed `merge_and_unload(safe_merge=True)`, every logit NaN | `test_out_of_range_z_is_refused_on_load` |
| adapter file missing some `z`: loaded with PEFT's generic warning, those layers at identity | `test_missing_z_tensors_fail_in_load_adapter_and_the_library` |
| adapter of another base of the same shapes: loaded without a word | `test_adapter_of_other_base_weights_warns_and_the_library_refuses_it` |
| `__base__` accepted as adapter name (mixed batches route it to the base model); NUL byte failed at save time | `test_reserved_and_unusable_adapter_names_are_refused_early` |
| malformed `expert.json`, `transformer2_expert.json` or manifest: bare `JSONDecodeError`, `KeyError`, `TypeError` | `test_malformed_library_files_name_the_file` |
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from testing_utils import build_tiny_llama, build_tiny_tokenizer, save_svf_expert

from peft_spectral import SVFConfig
from peft_spectral.adapter_io import AdapterLoadError, load_adapter
from peft_spectral.transformer2 import ExpertLibrary, ExpertLibraryError
from peft_spectral.tuners.svf import model as svf_model


TARGETS = ["gate_proj", "down_proj"]


@pytest.fixture
def saved(tmp_path):
    """A saved SVF adapter of the seed-0 tiny Llama (z random around 1) and its tokenizer."""
    tok = build_tiny_tokenizer()
    build_tiny_llama(tok).config.save_pretrained(tmp_path / "base")  # a local base name: PEFT looks nothing up
    folder = save_svf_expert(
        tmp_path / "expert", 1, tmp_path / "svd", targets=TARGETS, base_name=str(tmp_path / "base")
    )
    return folder, tok


def _edit_tensors(folder, edit):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


@pytest.mark.parametrize("value", [1e30, 1e8, float("nan")])
def test_out_of_range_z_is_refused_on_load(saved, value):
    folder, tok = saved

    def blow_up(tensors):
        key = min(tensors)
        tensors[key][0] = value

    _edit_tensors(folder, blow_up)
    with pytest.raises(ValueError, match=r"SVF adapter 'default' of module 'model\.layers\.\d\.mlp\.\w+'"):
        PeftModel.from_pretrained(build_tiny_llama(tok), str(folder))  # plain PEFT loading fails too
    base = build_tiny_llama(tok)
    with pytest.raises(AdapterLoadError, match=str(folder)):
        load_adapter(base, folder)
    assert not any("svf" in n for n, _ in base.named_modules())  # the base model is given back unwrapped


def test_z_bound_is_spectral_gain(saved):
    """A trained-looking z (large on small singular values, within the bound) loads; the bound is on |z_i| σ_i."""
    folder, tok = saved
    model = load_adapter(build_tiny_llama(tok), folder)
    layer = model.base_model.svf_layers()[0][1]
    sigma = layer.svf_S
    z = torch.ones_like(layer.svf_z["default"])
    z[-1] = 0.9 * svf_model.SVF_MAX_GAIN * float(sigma[0] / sigma[-1])  # huge z, but on the smallest singular value

    def set_z(tensors):
        key = next(k for k in tensors if k.startswith(f"base_model.model.{layer.module_name}."))
        tensors[key] = z

    _edit_tensors(folder, set_z)
    load_adapter(build_tiny_llama(tok), folder)


def test_missing_z_tensors_fail_in_load_adapter_and_the_library(saved):
    folder, tok = saved
    _edit_tensors(folder, lambda tensors: tensors.pop(max(tensors)))
    with pytest.warns(UserWarning, match="missing adapter keys"):
        PeftModel.from_pretrained(build_tiny_llama(tok), str(folder))  # PEFT's convention: a warning
    with pytest.raises(AdapterLoadError, match=r"lacks 1 tensor\(s\).*model\.layers\.1\.mlp\.gate_proj"):
        load_adapter(build_tiny_llama(tok), folder)
    with pytest.raises(AdapterLoadError, match="lacks"):
        ExpertLibrary.load(build_tiny_llama(tok), tok, [str(folder)])


def test_adapter_of_other_base_weights_warns_and_the_library_refuses_it(saved):
    folder, tok = saved
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_weights_sketch"]["modules"] == 4  # recorded when saved
    with warnings.catch_warnings():
        warnings.simplefilter("error", svf_model.SVFBaseWeightsWarning)
        load_adapter(build_tiny_llama(tok), folder)  # its own base: silent
        load_adapter(build_tiny_llama(tok).to(torch.bfloat16), folder)  # a cast of it: silent
    other = build_tiny_llama(tok, seed=5)
    with pytest.warns(
        svf_model.SVFBaseWeightsWarning, match=r"does not belong to this base model.*differ .* by about \d+%"
    ):
        model = PeftModel.from_pretrained(other, str(folder))
    assert "does not belong" in model.base_model.base_weights_mismatch("default")
    with pytest.raises(ExpertLibraryError, match=r"expert 'expert' .*does not belong to this base model"):
        ExpertLibrary.load(build_tiny_llama(tok, seed=5), tok, [str(folder)])
    # an adapter saved before the sketch existed loads without a check, as before
    del config["base_weights_sketch"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("error", svf_model.SVFBaseWeightsWarning)
        ExpertLibrary.load(build_tiny_llama(tok, seed=5), tok, [str(folder)])


def test_sketch_keeps_the_config_object_and_never_checks_a_new_adapter(tiny_llama):
    """PEFT's identity (`peft_config["default"] is config`) holds, and a config reused on a second model raises no
    false alarm: only loading an adapter's weights from a file is checked."""
    model, tok = tiny_llama
    config = SVFConfig(target_modules=TARGETS)
    first = get_peft_model(model, config)
    assert first.peft_config["default"] is config and config.base_weights_sketch is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error", svf_model.SVFBaseWeightsWarning)
        second = get_peft_model(build_tiny_llama(tok, seed=3), config)
    assert second.base_model.base_weights_mismatch("default") is None
    with pytest.raises(ValueError, match="base_weights_sketch must be None or"):
        SVFConfig(target_modules=TARGETS, base_weights_sketch={"modules": 1})


@pytest.mark.parametrize(
    ("name", "reason"),
    [("__base__", "reserved"), ("a\x00b", "control character"), ("line\nbreak", "control character")],
)
def test_reserved_and_unusable_adapter_names_are_refused_early(saved, name, reason):
    folder, tok = saved
    with pytest.raises(ValueError, match=f"invalid adapter_name .*{reason}"):
        get_peft_model(build_tiny_llama(tok), SVFConfig(target_modules=TARGETS), adapter_name=name)
    base = build_tiny_llama(tok)
    with pytest.raises((ValueError, AdapterLoadError), match=reason):
        load_adapter(base, folder, adapter_name=name)
    with pytest.raises(ExpertLibraryError):
        ExpertLibrary.load(build_tiny_llama(tok), tok, [str(folder)], names=[name])


def test_malformed_library_files_name_the_file(saved, tmp_path):
    folder, tok = saved
    meta = folder / "expert.json"
    for text in ("{not json", "[1, 2]"):
        meta.write_text(text)
        with pytest.raises(ExpertLibraryError, match=r"expert\.json"):
            ExpertLibrary.load(build_tiny_llama(tok), tok, [str(folder)])
    meta.unlink()
    manifest = tmp_path / "library.json"
    for text in (
        "{oops",
        "[]",
        '{"experts": 3}',
        '{"experts": [{"name": "e", "source": "x"}], "extra_adapters": [{}]}',
    ):
        manifest.write_text(text)
        with pytest.raises(ExpertLibraryError, match=r"library\.json"):
            ExpertLibrary.from_manifest(build_tiny_llama(tok), tok, manifest)
