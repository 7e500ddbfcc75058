"""`peft-spectral train-svf` end to end on a tiny local model: options from SVFTrainingConfig, one-line errors, an
expert directory PEFT can load, `--config` files overridden by explicit options."""

from __future__ import annotations

import json

import pytest
from peft import PeftModel
from testing_utils import build_tiny_llama, build_tiny_tokenizer

import peft_spectral  # noqa: F401  (registers SVF)
from peft_spectral.cli import main
from peft_spectral.training import SVFTrainingConfig


@pytest.fixture
def tiny_model_dir(tmp_path):
    tok = build_tiny_tokenizer()
    model = build_tiny_llama(tok)
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _argv(tmp_path, model_dir, *extra):
    return [
        "train-svf",
        "--task",
        "rg:gcd?max_value=10",
        "--max-examples",
        "60",
        "--model",
        str(model_dir),
        "--output",
        str(tmp_path / "expert"),
        "--sft-steps",
        "2",
        "--sft-batch-size",
        "4",
        "--rl-steps",
        "1",
        "--num-generations",
        "2",
        "--max-completion-length",
        "4",
        "--eval-max-new-tokens",
        "4",
        "--no-progress",
        *extra,
    ]


def test_every_config_field_is_an_option():
    from peft_spectral.cli import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["train-svf"].format_help()
    for f in SVFTrainingConfig.__dataclass_fields__:
        option = {"output_dir": "--output", "progress": "--no-progress"}.get(f, "--" + f.replace("_", "-"))
        assert option in text, option


def test_train_svf_cli_trains_a_loadable_expert(tmp_path, tiny_model_dir, capsys):
    assert main(_argv(tmp_path, tiny_model_dir, "--test-examples", "4", "--partial-credit")) == 0
    out = tmp_path / "expert"
    meta = json.loads((out / "expert.json").read_text())
    assert meta["config"]["partial_credit"] is True and meta["config"]["sft_steps"] == 2
    assert meta["task_spec"] == "rg:gcd?max_value=10" and meta["metrics"]["test"]["n"] == 4
    assert "expert saved to" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    assert loaded.peft_config["default"].peft_type == "SVF"


def test_config_file_is_overridden_by_explicit_options(tmp_path, tiny_model_dir):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"sft_steps": 3, "beta": 0.2, "seed": 5}))
    assert main(_argv(tmp_path, tiny_model_dir, "--config", str(recipe), "--rl-steps", "0")) == 0
    config = json.loads((tmp_path / "expert" / "expert.json").read_text())["config"]
    # --sft-steps 2 on the command line wins over the file's 3; beta and seed come from the file
    assert (config["sft_steps"], config["beta"], config["seed"], config["rl_steps"]) == (2, 0.2, 5, 0)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--task", "rg:nosuch"], "unknown reasoning-gym generator"),
        (["--rl-learning-rate", "nan"], "rl_learning_rate must be a finite number > 0"),
        (["--sft-steps", "-2"], "sft_steps must be an integer >= 0"),
        (["--beta", "-1"], "beta must be a finite number >= 0"),
    ],
)
def test_bad_arguments_are_one_line_before_the_model_loads(tmp_path, capsys, extra, match):
    argv = _argv(tmp_path, tmp_path / "no_model_here", *extra)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err
    import re

    assert re.search(match, err)


def test_bad_choice_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(_argv(tmp_path, tmp_path, "--peft-method", "ia3"))
    assert info.value.code == 2
