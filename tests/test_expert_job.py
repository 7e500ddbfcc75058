"""Tests of the one expert job: SVFTrainingConfig validation, staged SFT -> RL training, resume, files written."""

from __future__ import annotations

import json

import pytest

from peft_spectral.training import SVFTrainingConfig, train_expert


TASK = "rg:gcd?max_value=10"


def _config(tmp_path, **overrides):
    settings = {
        "task": TASK,
        "output_dir": str(tmp_path / "expert"),
        "max_examples": 60,
        "sft_steps": 2,
        "sft_batch_size": 4,
        "rl_steps": 1,
        "prompts_per_step": 2,
        "num_generations": 2,
        "max_completion_length": 4,
        "val_examples": 4,
        "eval_every": 1,
        "eval_max_new_tokens": 4,
        "test_examples": 6,
        "progress": False,
    }
    settings.update(overrides)
    return SVFTrainingConfig(**settings)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("sft_steps", -1, "sft_steps must be an integer >= 0"),
        ("rl_learning_rate", float("nan"), "rl_learning_rate must be a finite number > 0"),
        ("beta", -0.1, "beta must be a finite number >= 0"),
        ("num_generations", 1, "num_generations must be an integer >= 2"),
        ("peft_method", "ia3", "peft_method must be one of"),
        ("reward_extraction", "loose", "reward_extraction must be one of"),
        ("test_examples", True, "test_examples must be an integer"),
        ("max_answer_share", 0.0, "max_answer_share must be a finite number > 0"),
        ("max_answer_share", 1.5, r"max_answer_share must be in \(0, 1\]"),
    ],
)
def test_config_refuses_bad_values_naming_the_field(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        _config(tmp_path, **{field: value})
    with pytest.raises(ValueError, match="nothing to train"):
        _config(tmp_path, sft_steps=0, rl_steps=0)
    with pytest.raises(ValueError, match=r"unknown SVFTrainingConfig field\(s\) \['steps'\]"):
        SVFTrainingConfig.from_dict({"steps": 3})


def test_bad_task_spec_fails_before_the_model_is_used(tmp_path):
    config = _config(tmp_path, task="rg:gcd?max_valu=3")
    with pytest.raises(ValueError, match="max_valu"):
        train_expert(config, model=object(), tokenizer=object())


def test_max_answer_share_caps_the_train_split_only(tmp_path):
    from collections import Counter

    from peft_spectral.data import load_task
    from peft_spectral.training.expert_job import train_split

    task = load_task("rg:gcd?max_value=20", seed=0, max_examples=300)
    share = Counter(ex.target for ex in task.train).most_common(1)[0][1] / len(task.train)
    assert share > 0.4  # the case the option is for: gcd of small numbers is mostly 1
    config = _config(tmp_path, task="rg:gcd?max_value=20", max_answer_share=0.25)
    kept = train_split(task, config)
    counts = Counter(ex.target for ex in kept)
    assert max(counts.values()) <= 0.25 * len(kept) and len(kept) < len(task.train)
    assert set(counts) == {ex.target for ex in task.train}  # no answer is lost
    assert (
        len(task.validation)
        and task.validation == load_task("rg:gcd?max_value=20", seed=0, max_examples=300).validation
    )
    assert train_split(task, _config(tmp_path)) == task.train  # off: every example
    # too few distinct answers for the share: refused before any model is used
    with pytest.raises(ValueError, match=r"max_answer_share=0\.01 needs at least 100 distinct answers"):
        train_expert(_config(tmp_path, max_answer_share=0.01), model=object(), tokenizer=object(), printer=print)


def test_staged_expert_writes_its_files_and_resumes(tmp_path, tiny_llama):
    model, tokenizer = tiny_llama
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = _config(tmp_path)
    result = train_expert(config, model, tokenizer, printer=lambda _: None)
    out = result.path
    assert [s["name"] for s in result.stages] == ["sft", "rl"]
    assert result.stages[1]["init_from"] == str(out / "stages" / "sft")
    assert all(torch_equal(before[k], v) for k, v in model.state_dict().items())  # the base model is untouched
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md", "expert.json", "test_eval.json"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "expert.json").read_text())
    assert meta["task_spec"] == TASK and meta["task_params"] == {"generator": "gcd", "max_value": 10}
    assert meta["config"]["sft_steps"] == 2 and [s["name"] for s in meta["stages"]] == ["sft", "rl"]
    assert meta["metrics"]["test"]["n"] == 6 and "test_strict" in meta["metrics"]
    card = (out / "README.md").read_text()
    assert f"Task spec: `{TASK}`" in card and "Strict extraction" in card
    test_eval = result.test_eval
    assert len(test_eval["base"]["correct"]) == 6 and test_eval["strict"]["n"] == 6

    # a second run reads every finished stage back and trains nothing
    seen = []
    again = train_expert(config, model, tokenizer, printer=seen.append)
    assert sum("done already" in line for line in seen) == 2
    assert again.test_eval["adapter"]["correct"] == test_eval["adapter"]["correct"]
    # the same directory with another config is refused
    with pytest.raises(ValueError, match="another config"):
        train_expert(_config(tmp_path, sft_steps=3), model, tokenizer, printer=lambda _: None)


def test_lora_baseline_through_the_same_job(tmp_path, tiny_llama):
    model, tokenizer = tiny_llama
    config = _config(tmp_path, peft_method="lora", lora_r=2, target_modules=["up_proj"], test_examples=0)
    result = train_expert(config, model, tokenizer, printer=lambda _: None)
    saved = json.loads((result.path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 2


def torch_equal(a, b):
    import torch

    return torch.equal(a, b)
