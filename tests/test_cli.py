"""Conventions every `peft-spectral` subcommand follows (see the top of docs/cli.md), `--version` and `python -m`."""

from __future__ import annotations

import argparse
import re
import sys

import pytest
import torch
from testing_utils import build_tiny_llama, build_tiny_tokenizer

import peft_spectral
from peft_spectral.cli import _common, build_parser, main


#: The fewest arguments each subcommand that loads a model accepts.
REQUIRED = {
    "demo": [],
    "train-svf": ["--task", "t", "--output", "o"],
    "mix": ["--experts", "e", "--shots", "s.jsonl", "--output", "o"],
    "eval-two-pass": ["--experts", "e", "--task", "t", "--output", "o"],
    "compress": ["--task", "t", "--output", "o"],
    "cpi": ["--tasks", "t", "--output", "o"],
}


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_option_has_help_and_shows_its_default(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping: textwrap would break "all-linear" at its hyphen
    for name, parser in _commands().items():
        text = " ".join(parser.format_help().split())  # undo the line wrapping
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            option = action.option_strings[-1]
            assert action.help, f"`{name} {option}` has no help text"
            if action.default not in (None, False, argparse.SUPPRESS):
                shown = " ".join(str(action.default).split())
                assert f"(default: {shown})" in text, f"`{name} {option}`: --help does not show its default"


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_every_model_command_accepts_device_dtype_and_no_progress(name):
    args = build_parser().parse_args([name, *REQUIRED[name], "--device", "cpu", "--dtype", "float32", "--no-progress"])
    assert (args.device, args.dtype, args.no_progress) == ("cpu", "float32", True)
    default = build_parser().parse_args([name, *REQUIRED[name]])
    assert (default.device, default.dtype, default.no_progress) == ("auto", "float32", False)
    assert hasattr(default, "output")  # --output: a directory everywhere


def test_push_to_hub_where_an_adapter_is_produced_and_device_map_where_only_inference():
    commands = _commands()
    for name in ("train-svf", "mix", "compress", "cpi"):
        assert "--push-to-hub" in commands[name]._option_string_actions, name
    for name in ("mix", "eval-two-pass"):
        assert "--device-map" in commands[name]._option_string_actions, name
    for name in ("train-svf", "cpi", "demo"):  # training spreads no model over devices
        assert "--device-map" not in commands[name]._option_string_actions, name


def test_list_options_are_space_separated():
    for name, parser in _commands().items():
        for action in parser._actions:
            if action.option_strings and isinstance(action.default, list):
                assert action.nargs == "+", f"`{name} {action.option_strings[-1]}` is a list but not nargs='+'"
    args = build_parser().parse_args(["compress", "--task", "t", "--output", "o", "--rhos", "0.5", "0.1"])
    assert args.rhos == [0.5, 0.1]
    args = build_parser().parse_args(["train-svf", "--task", "t", "--output", "o", "--target-modules", "a", "b"])
    assert args.target_modules == ["a", "b"]


def test_bad_device_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compress", "--task", "t", "--output", "o", "--device", "gpu0"])
    assert "--device" in capsys.readouterr().err


def test_loader_applies_model_dtype_and_device(tmp_path):
    tok = build_tiny_tokenizer()
    build_tiny_llama(tok).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    args = build_parser().parse_args(
        ["compress", "--task", "t", "--output", "o", "--model", str(tmp_path / "m"), "--device", "cpu"]
    )
    args.dtype = "bfloat16"
    model, tokenizer = _common.load_model_or_exit(args)
    param = next(model.parameters())
    assert param.dtype == torch.bfloat16 and param.device.type == "cpu" and tokenizer.pad_token is not None
    args.model = str(tmp_path / "missing")
    with pytest.raises(SystemExit, match="--model"):
        _common.load_model_or_exit(args)


def test_no_progress_hides_library_bars_only_while_the_command_runs():
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
    with _common.progress_bars(False):
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()


def test_push_without_an_adapter_names_the_option(tmp_path):
    args = argparse.Namespace(push_to_hub="me/repo")
    with pytest.raises(SystemExit, match="--push-to-hub me/repo: no adapter"):
        _common.push_adapter_if_requested(args, tmp_path)
    assert _common.push_adapter_if_requested(argparse.Namespace(push_to_hub=None), tmp_path) is None


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"peft-spectral {peft_spectral.__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", peft_spectral.__version__)


def test_python_dash_m_runs_the_cli(monkeypatch, capsys):
    import runpy

    monkeypatch.setattr(sys, "argv", ["python -m peft_spectral", "--help"])
    with pytest.raises(SystemExit) as exit_info:  # in-process `python -m peft_spectral --help`
        runpy.run_module("peft_spectral", run_name="__main__")
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "usage: peft-spectral" in out and "train-svf" in out and "--version" in out
