"""Resumable JSON state: atomic writes, fingerprints, one clear error for an unusable file."""

from __future__ import annotations

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
    [("", "is empty"), ('{"fingerprint": "abc", "res', "is not valid JSON"), ("[1, 2]", "holds a list, not a JSON object")],
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
