"""Resumable JSON state: atomic writes, fingerprints, one clear error for an unusable file."""

from __future__ import annotations

import json
import time

import pytest
import torch

from peft_spectral.state import StateFileError, fingerprint, load_state, model_fingerprint, write_json_atomic


def test_round_trip_and_missing_file(tmp_path):
    path = tmp_path / "sub" / "state.json"
    assert load_state(path) is None
    write_json_atomic(path, {"fingerprint": "abc", "results": {"x": 1}})
    assert load_state(path, "abc") == {"fingerprint": "abc", "results": {"x": 1}}
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]  # no temporary file left behind


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("", "is empty"),
        ('{"fingerprint": "abc", "res', "is not valid JSON"),
        ("[1, 2]", "holds a list, not a JSON object"),
    ],
)
def test_empty_truncated_or_foreign_file_is_one_clear_error(tmp_path, content, reason):
    path = tmp_path / "state.json"
    path.write_text(content)
    with pytest.raises(StateFileError, match=rf"LASER state file .*state\.json {reason}.*delete"):
        load_state(path, "abc", what="LASER state")


def test_fingerprint_mismatch_names_both(tmp_path):
    path = tmp_path / "state.json"
    write_json_atomic(path, {"fingerprint": "old"})
    with pytest.raises(StateFileError, match=r"another job \(fingerprint 'old' != 'new'"):
        load_state(path, "new")


def test_fingerprint_is_stable_and_sensitive():
    assert fingerprint({"a": 1, "b": [1, 2]}, "x") == fingerprint({"b": [1, 2], "a": 1}, "x")
    assert fingerprint({"a": 1}, "x") != fingerprint({"a": 2}, "x")
    assert fingerprint("ab", "c") != fingerprint("a", "bc")


def test_model_fingerprint_sees_weights_not_wrappers(tiny_llama):
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_llama
    before = model_fingerprint(model)
    wrapped = get_peft_model(model, LoraConfig(target_modules=["down_proj"]))
    assert model_fingerprint(wrapped, skip=("lora_",)) == before
    with torch.no_grad():
        next(wrapped.get_base_model().parameters()).add_(1.0)
    assert model_fingerprint(wrapped, skip=("lora_",)) != before


def _edit_between_old_samples(model, factor=-3.0):
    """Multiply every MLP weight entry the old fingerprint (64 strided values per tensor) did not read by `factor`."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "mlp" in name:
                flat = param.view(-1)
                sampled = torch.zeros_like(flat, dtype=torch.bool)
                sampled[:: max(1, flat.numel() // 64)][:64] = True
                flat[~sampled] *= factor


def test_model_fingerprint_hashes_every_byte(tiny_llama):
    """Issue #27 §2: an edit between the old strided samples moved the logits but not the fingerprint."""
    model, tok = tiny_llama
    ids = tok("hello world", return_tensors="pt").input_ids
    with torch.no_grad():
        before_logits = model(ids).logits
    before = model_fingerprint(model)
    _edit_between_old_samples(model)
    with torch.no_grad():
        assert (model(ids).logits - before_logits).abs().max() > 0.1
    assert model_fingerprint(model) != before
    # one changed bit anywhere changes it too
    fp = model_fingerprint(model)
    with torch.no_grad():
        weight = model.model.layers[1].mlp.down_proj.weight
        weight.view(torch.int32).view(-1)[17] ^= 1
    assert model_fingerprint(model) != fp


def test_model_fingerprint_tied_weights_hashed_once_and_meta_refused(tiny_llama):
    model, _ = tiny_llama
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: one tensor under two names
    assert len(model_fingerprint(model)) == 32
    with torch.device("meta"):
        meta = type(model)(model.config)
    with pytest.raises(ValueError, match="meta device"):
        model_fingerprint(meta)


def test_state_digest_refuses_an_edited_state(tmp_path):
    """Issue #27 §2: a LASER state whose accuracy was edited to 1.0 was believed."""
    path = tmp_path / "state.json"
    state = {"fingerprint": "abc", "base": {"accuracy": 0.25, "n": 4}, "results": {"(1, 0.5)": [0.5, (1, 2)]}}
    write_json_atomic(path, state, digest=True)
    loaded = load_state(path, "abc")
    assert "digest" not in loaded and loaded["base"] == {"accuracy": 0.25, "n": 4}
    assert loaded["results"] == {"(1, 0.5)": [0.5, [1, 2]]}  # what JSON reads back
    # rewriting the state as loaded gives the same file
    write_json_atomic(path, loaded, digest=True)
    assert load_state(path, "abc") == loaded
    edited = json.loads(path.read_text())
    edited["base"]["accuracy"] = 1.0
    path.write_text(json.dumps(edited, indent=1))
    with pytest.raises(StateFileError, match=r"state\.json was changed after it was written.*delete") as err:
        load_state(path, "abc")
    assert "\n" not in str(err.value)
    # a state written without a digest (older versions, benchmarks) still loads
    write_json_atomic(path, {"fingerprint": "abc"})
    assert load_state(path, "abc") == {"fingerprint": "abc"}
    with pytest.raises(TypeError, match="must be a dict"):
        write_json_atomic(path, [1], digest=True)


@pytest.mark.slow
def test_model_fingerprint_cost_smollm2_135m_size():
    """The number in `model_fingerprint`'s docstring: a random model of SmolLM2-135M's config (nothing downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    model_fingerprint(model)
    start = time.perf_counter()
    model_fingerprint(model)
    assert time.perf_counter() - start < 1.0
