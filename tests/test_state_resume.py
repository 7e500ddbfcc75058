"""Resumes never trust stale or edited state (issue #27 §2): the LASER grid and CPI-FT's run directory refuse a state
made from a base model that differs anywhere, and a state edited by hand."""

from __future__ import annotations

import json

import pytest
import torch
from testing_utils import build_tiny_llama, build_tiny_tokenizer

from peft_spectral import compress
from peft_spectral.compress import candidate_grid, laser_search
from peft_spectral.cpi import CPIConfig, CPIPipeline, base_model_fingerprint
from peft_spectral.state import StateFileError
from peft_spectral.tasks import Example, Task
from peft_spectral.tuners.core_isolation import CoreIsolationConfig


def _edit_between_old_samples(model, factor=-3.0):
    """Multiply every MLP weight entry the old fingerprint (64 strided values per tensor) did not read by `factor`."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "mlp" in name:
                flat = param.view(-1)
                sampled = torch.zeros_like(flat, dtype=torch.bool)
                sampled[:: max(1, flat.numel() // 64)][:64] = True
                flat[~sampled] *= factor


@pytest.fixture
def laser_run(tmp_path):
    tok = build_tiny_tokenizer()
    model = build_tiny_llama(tok)
    validation = compress.random_choice_examples(6, seed=0)
    grid = candidate_grid(["model.layers.1.mlp.down_proj"], [0.5])
    state = tmp_path / "laser.json"
    laser_search(model, validation, grid, tokenizer=tok, batch_size=8, state_path=state, progress=False)
    return model, tok, validation, grid, state


def test_laser_state_of_a_model_edited_between_samples_is_refused(laser_run):
    model, tok, validation, grid, state = laser_run
    _edit_between_old_samples(model)
    with pytest.raises(StateFileError, match="another job"):
        laser_search(model, validation, grid, tokenizer=tok, batch_size=8, state_path=state, progress=False)


def test_laser_state_with_an_edited_accuracy_is_refused(laser_run):
    model, tok, validation, grid, state = laser_run
    data = json.loads(state.read_text())
    data["base"]["accuracy"] = 1.0
    state.write_text(json.dumps(data))
    with pytest.raises(StateFileError, match="changed after it was written") as err:
        laser_search(model, validation, grid, tokenizer=tok, batch_size=8, state_path=state, progress=False)
    assert "\n" not in str(err.value) and str(state) in str(err.value)


def test_cpi_base_fingerprint_sees_an_edit_between_samples():
    from peft import get_peft_model

    base = build_tiny_llama(build_tiny_tokenizer())
    before = base_model_fingerprint(base)
    _edit_between_old_samples(base)
    edited = base_model_fingerprint(base)
    assert edited != before
    wrapped = get_peft_model(base, CoreIsolationConfig(target_modules=["down_proj"]))
    assert base_model_fingerprint(wrapped) == edited  # the adapter is still looked through


def test_cpi_run_of_a_model_edited_between_samples_is_refused(tmp_path):
    """Issue #27 §2: CPI-FT resumed from the old probes of a base model that had changed between the samples."""
    tok = build_tiny_tokenizer()
    tasks = [
        Task(name, "generation", train=[Example(f"{name}: {i}", str(i + d)) for i in range(8)], validation=[], test=[])
        for name, d in (("inc", 1), ("dec", -1))
    ]
    adapter = CoreIsolationConfig(target_modules=["down_proj"], core_fraction=0.05)
    config = CPIConfig(adapter=adapter, probe_steps=1, stage_steps=1, batch_size=4, max_length=32)
    CPIPipeline(build_tiny_llama(tok), tok, tasks, config, tmp_path, progress=False).run(until="probe")
    model = build_tiny_llama(tok)
    _edit_between_old_samples(model)
    with pytest.raises(StateFileError, match="another base model"):
        CPIPipeline(model, tok, tasks, config, tmp_path, progress=False).run(until="probe")
