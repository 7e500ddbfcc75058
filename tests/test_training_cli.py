"""`peft-spectral train-svf` end to end on a tiny local model: progress/logs printed, an adapter PEFT can load."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from testing_utils import build_tiny_llama, build_tiny_tokenizer

import peft_spectral  # noqa: F401  (registers SVF)
from peft_spectral.cli import main
from peft_spectral.cli import train_svf as cli_train_svf
from peft_spectral.tasks import Example, Task


def _toy_task(name: str, seed: int) -> Task:
    ex = [
        Example(
            prompt=f"Q{i}: 1+{i}=?\nA. {i + 1}\nB. {i + 2}",
            target=str(i + 1),
            choices=(str(i + 1), str(i + 2)),
            label=0,
        )
        for i in range(8)
    ]
    return Task(name=name, kind="multiple_choice", train=ex, validation=ex[:2], test=ex[:2])


@pytest.fixture
def tiny_model_dir(tmp_path):
    tok = build_tiny_tokenizer()
    model = build_tiny_llama(tok)
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("method", ["rl", "sft"])
def test_train_svf_cli_writes_loadable_adapter(tmp_path, tiny_model_dir, monkeypatch, capsys, method):
    monkeypatch.setattr(cli_train_svf, "_load_task", _toy_task)
    out = tmp_path / "adapter"
    code = main(
        [
            "train-svf",
            "--task",
            "toy",
            "--method",
            method,
            "--steps",
            "2",
            "--output",
            str(out),
            "--model",
            str(tiny_model_dir),
            "--num-generations",
            "2",
            "--max-completion-length",
            "4",
            "--batch-size",
            "4",
            "--eval-examples",
            "2",
        ]
    )
    assert code == 0
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert "step 1:" in text and ("reward=" in text if method == "rl" else "loss=" in text)
    assert "adapter saved" in text and "base test accuracy" in text and "vs base Δ" in text
    assert (out / "adapter_model.safetensors").exists()
    log = json.loads((out / "training_log.json").read_text())
    assert log["trainable_parameters"] > 0 and len([r for r in log["logs"] if "loss" in r]) >= 2
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == str(tiny_model_dir)

    # the paired test evaluation: per-example verdicts kept, intervals and Δ recomputable from them
    from peft_spectral.stats import accuracy_ci, compare_paired

    test_eval = json.loads((out / "test_eval.json").read_text())
    base, adapter = test_eval["base"]["correct"], test_eval["adapter"]["correct"]
    assert test_eval["n"] == len(base) == len(adapter) == 2 and test_eval["settings"]["mode"] == "generate"
    ci = accuracy_ci(adapter)
    assert (test_eval["adapter"]["accuracy"], test_eval["adapter"]["low"], test_eval["adapter"]["high"]) == (
        ci.accuracy,
        ci.low,
        ci.high,
    )
    delta = compare_paired(base, adapter)
    assert test_eval["delta"]["delta"] == delta.delta and test_eval["delta"]["p_value"] == delta.p_value

    # the model card and expert.json
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "library_name: peft" in card and "- toy" in card
    assert "## Test accuracy" in card and "Δ vs base" in card and "## How to load it" in card
    meta = json.loads((out / "expert.json").read_text())
    assert meta["task"] == "toy" and meta["kind"] == "multiple_choice" and meta["steps"] == 2
    assert meta["test_accuracy"] == test_eval["adapter"]["accuracy"] and meta["recipe"]["method"] == method
    if method == "rl":
        assert meta["recipe"]["beta"] == 0.1 and meta["recipe"]["num_generations"] == 2
    else:
        assert meta["recipe"]["batch_size"] == 4

    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loaded = PeftModel.from_pretrained(base, out)
    z = [p for n, p in loaded.named_parameters() if "svf_z" in n]
    assert len(z) == 6
    if method == "sft":  # (a random model never answers right, so RL rewards are all -1: no gradient, as reported)
        assert any(not torch.allclose(p, torch.ones_like(p)) for p in z)
    else:
        assert "no learning signal" in text


def test_train_svf_cli_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train-svf", "--task", "toy", "--method", "ppo", "--output", str(tmp_path)])
    assert "--method" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train-svf", "--task", "toy", "--steps", "0", "--output", str(tmp_path)])
    assert "--steps" in capsys.readouterr().err


def test_train_svf_cli_validation_and_resume(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """`--val-examples` writes the validation curve next to the adapter; `--resume` run twice continues from the
    last checkpoint of the first run (here: 2 steps, then the same command with --steps 3 does one more)."""
    monkeypatch.setattr(cli_train_svf, "_load_task", _toy_task)
    out = tmp_path / "adapter"
    common = ["train-svf", "--task", "toy", "--method", "sft", "--output", str(out), "--model", str(tiny_model_dir)]
    options = ["--batch-size", "4", "--val-examples", "2", "--eval-every", "1", "--save-steps", "1", "--resume"]
    assert main([*common, "--steps", "2", *options]) == 0
    assert (out / "checkpoints" / "checkpoint-2" / "validation_state.json").exists()
    first = json.loads((out / "validation.json").read_text())
    assert [row["step"] for row in first["curve"]] == [0, 1, 2]
    capsys.readouterr()
    assert main([*common, "--steps", "3", *options]) == 0
    text = capsys.readouterr().out
    assert "validation: best" in text and "1 steps in this run" in text
    log = json.loads((out / "training_log.json").read_text())
    assert log["resumed_from"].endswith("checkpoint-2")
    curve = json.loads((out / "validation.json").read_text())["curve"]
    assert [row["step"] for row in curve] == [0, 1, 2, 3]
    with pytest.raises(SystemExit, match="no such checkpoint"):
        main([*common, "--steps", "3", "--resume", str(tmp_path / "missing")])


def test_train_svf_cli_time_budget(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """`--time-budget` ends training before `--steps` once the (tiny) budget is spent, and says so in the log."""
    monkeypatch.setattr(cli_train_svf, "_load_task", _toy_task)
    out = tmp_path / "adapter"
    common = ["train-svf", "--task", "toy", "--method", "sft", "--output", str(out), "--model", str(tiny_model_dir)]
    assert main([*common, "--steps", "50", "--batch-size", "4", "--time-budget", "0.001", "--no-progress"]) == 0
    assert "time budget of 0.001 s used up at step 1" in capsys.readouterr().out
    budget = json.loads((out / "training_log.json").read_text())["time_budget"]
    assert budget["steps"] == 1 and budget["stopped_at"] == 1 and budget["exhausted"]
    assert budget["max_train_seconds"] == 0.001 and budget["train_seconds"] >= 0.001
    for bad in ("0", "-5", "inf", "soon"):
        with pytest.raises(SystemExit):
            main([*common, "--time-budget", bad])
        assert "--time-budget" in capsys.readouterr().err


def test_train_svf_cli_default_beta_is_the_paper_preset():
    from peft_spectral.cli import build_parser
    from peft_spectral.training import PAPER_BETA

    args = build_parser().parse_args(["train-svf", "--task", "toy", "--output", "x"])
    assert args.beta == PAPER_BETA == 0.1


def test_train_svf_cli_init_adapter_starts_from_the_loaded_z(tmp_path, tiny_model_dir, monkeypatch):
    """`--init-adapter` (SFT → RL warm start): training continues from the saved z, not from ones. With lr 0 the
    saved adapter equals the loaded one; with a small lr it moves a little away from it."""
    from safetensors.torch import load_file
    from testing_utils import save_svf_expert

    monkeypatch.setattr(cli_train_svf, "_load_task", _toy_task)
    init = save_svf_expert(tmp_path / "init", seed=3, svd_dir=tmp_path / "svd", base_name=str(tiny_model_dir))
    start = load_file(init / "adapter_model.safetensors")
    assert all(not torch.allclose(z, torch.ones_like(z)) for z in start.values())
    common = ["train-svf", "--task", "toy", "--method", "sft", "--steps", "1", "--batch-size", "4"]
    common += ["--model", str(tiny_model_dir), "--init-adapter", str(init), "--no-progress"]
    for lr, out in (("0", tmp_path / "lr0"), ("1e-4", tmp_path / "small")):
        assert main([*common, "--lr", lr, "--output", str(out)]) == 0
        trained = load_file(out / "adapter_model.safetensors")
        assert set(trained) == set(start)
        for key, z in start.items():
            if lr == "0":
                assert torch.equal(trained[key], z), key
            else:
                assert torch.allclose(trained[key], z, atol=1e-3) and not torch.allclose(
                    trained[key], torch.ones_like(z), atol=0.1
                )
        meta = json.loads((out / "expert.json").read_text())
        assert meta["recipe"]["init_adapter"] == str(init)
    assert json.loads((tmp_path / "small" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    moved = load_file(tmp_path / "small" / "adapter_model.safetensors")
    assert any(not torch.equal(moved[k], start[k]) for k in start)
    with pytest.raises(SystemExit, match="--target-modules"):
        main([*common, "--target-modules", "up_proj", "--output", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="no such adapter directory"):
        main(["train-svf", "--task", "toy", "--init-adapter", str(tmp_path / "missing"), "--output", str(tmp_path)])
