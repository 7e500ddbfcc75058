"""`peft-spectral compress` on a tiny model with a planted helpful truncation (no network, no real model)."""

from __future__ import annotations

import argparse
import json

import pytest
from testing_utils import build_tiny_llama, build_tiny_tokenizer

from peft_spectral import data
from peft_spectral.cli import build_parser
from peft_spectral.cli import compress as cli_compress
from peft_spectral.compress import planted_problem
from peft_spectral.tasks import Task


def test_parse_layers():
    assert cli_compress.parse_layers("all") is None
    assert cli_compress.parse_layers("0-9:3") == [0, 3, 6, 9]
    assert cli_compress.parse_layers("5,1,2-3") == [1, 2, 3, 5]
    with pytest.raises(argparse.ArgumentTypeError):
        cli_compress.parse_layers("4-2")
    common = ["compress", "--task", "t", "--output", "o"]
    assert build_parser().parse_args(common + ["--layers", "5", "0-2", "1"]).layers == [0, 1, 2, 5]
    assert build_parser().parse_args(common + ["--layers", "3", "all"]).layers is None
    assert build_parser().parse_args(common).layers is None


PLANTED = "model.layers.1.mlp.down_proj"


@pytest.fixture(scope="module")
def planted_task():
    tok = build_tiny_tokenizer()
    problem = planted_problem(build_tiny_llama(tok, seed=1), tok, PLANTED)
    validation, train = problem.validation, problem.train
    return problem.model, tok, Task("planted", "multiple_choice", train=train, validation=validation, test=validation)


@pytest.mark.parametrize("method", ["laser", "c2i"])
def test_cli_compress_end_to_end(planted_task, monkeypatch, tmp_path, capsys, method):
    model, tok, task = planted_task
    monkeypatch.setattr(data, "load_task", lambda name, seed=0, max_examples=None: task, raising=False)
    monkeypatch.setattr(cli_compress, "load_model_or_exit", lambda name: (model, tok))
    out = tmp_path / method
    argv = [
        "compress",
        "--task",
        "planted",
        "--method",
        method,
        "--matrices",
        "up_proj",
        "down_proj",
        "--rhos",
        "0.9",
        "0.2",
        "--top-k",
        "2",
        "--n-grad",
        "1000",
        "--batch-size",
        "32",
        "--output",
        str(out),
    ]
    if method == "laser":
        argv += ["--state", str(tmp_path / "state.json")]
    args = build_parser().parse_args(argv)
    with pytest.warns(UserWarning, match="only") if method == "c2i" else _nullcontext():
        assert args.func(args) == 0
    text = capsys.readouterr().out
    assert f"chosen: {PLANTED} @ rho=0.2" in text
    reason = "kept (paired bootstrap" if method == "c2i" else "kept (plain rule)"
    assert f"{PLANTED} @ rho=0.2: {reason}" in text
    assert "test accuracy (20 examples): before 0.400 -> after 1.000" in text
    summary = json.loads((out / "search.json").read_text())
    assert summary["test"]["after"] == 1.0 and (out / "adapter_model.safetensors").exists()
    # the CLI restored the model: a second search starts from the same base
    assert "spectral_compress" not in str(type(model.get_submodule(PLANTED)))


def test_cli_rejects_unknown_matrix(planted_task, monkeypatch):
    model, tok, task = planted_task
    monkeypatch.setattr(data, "load_task", lambda name, seed=0, max_examples=None: task, raising=False)
    monkeypatch.setattr(cli_compress, "load_model_or_exit", lambda name: (model, tok))
    args = build_parser().parse_args(["compress", "--task", "planted", "--matrices", "wq", "--output", "unused"])
    with pytest.raises(ValueError, match="match no linear module"):
        args.func(args)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
