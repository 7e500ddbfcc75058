"""`peft-spectral cpi` end to end on a tiny model (task and model loaders patched), and its argument errors."""

from __future__ import annotations

import json
import re

import pytest
from testing_utils import build_tiny_llama, build_tiny_tokenizer

from peft_spectral.cli import cpi as cli_cpi
from peft_spectral.cli import main
from peft_spectral.tasks import Example, Task


def _tasks(names, jsonl, seed=0):
    out = []
    for name in list(names) + list(jsonl):
        ex = [Example(prompt=f"{name} {i}", target=str(i * 2)) for i in range(8)]
        out.append(Task(name=name, kind="generation", train=ex, validation=[], test=ex[:2]))
    return out


@pytest.fixture
def patched(monkeypatch):
    tok = build_tiny_tokenizer()
    monkeypatch.setattr(cli_cpi, "load_tasks", _tasks)
    monkeypatch.setattr(cli_cpi, "load_model_or_exit", lambda name: (build_tiny_llama(tok), tok))


def test_cli_runs_and_resumes(patched, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "cpi",
        "--tasks",
        "a",
        "b",
        "--jsonl",
        "c.jsonl",
        "--steps",
        "1",
        "--output",
        str(out),
        "--target-modules",
        "up_proj",
        "down_proj",
        "--p",
        "0.05",
        "--tau",
        "0.2",
        "--max-length",
        "32",
    ]
    assert main(argv + ["--until", "cores"]) == 0
    assert json.loads((out / "state.json").read_text())["completed"] == ["probe", "cores"]
    assert main(argv + ["--eval-examples", "2", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "groups (tau=0.2)" in text and "wrote" in text
    report = json.loads((out / "report.json").read_text())
    assert report["tasks"] == ["a", "b", "c.jsonl"] and set(report["scores"]) == {"a", "b", "c.jsonl"}
    assert report["trainer_runs_this_process"][0].startswith("stage:")  # probes were not re-run
    assert (out / "final" / "adapter_config.json").exists()


@pytest.mark.parametrize("flag,value", [("--p", "1.5"), ("--p", "0"), ("--tau", "-0.5")])
def test_cli_bad_hyper_parameters(patched, tmp_path, flag, value, capsys):
    assert main(["cpi", "--tasks", "a", "b", "--output", str(tmp_path / "x"), flag, value]) == 2
    assert re.search(r"^peft-spectral cpi: error: .*(core_fraction|similarity_threshold)", capsys.readouterr().err)


def test_cli_needs_tasks(patched, tmp_path, capsys):
    assert main(["cpi", "--output", str(tmp_path / "x")]) == 2
    assert "at least one task" in capsys.readouterr().err


def test_cli_stage_order_and_fusion_options(patched, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["cpi", "--tasks", "a", "b", "--steps", "1", "--output", str(out), "--target-modules", "up_proj"]
    argv += ["--tau", "1", "--max-length", "32", "--fusion", "slerp_task_vectors", "--until", "grouping"]
    assert main(argv + ["--stage-order", "dependency", "--stage-dependencies", "b:a"]) == 0
    state = json.loads((out / "state.json").read_text())
    assert state["config"]["fusion"] == "slerp_task_vectors" and state["config"]["stage_order"] == "dependency"
    assert state["stage_order"] == [["b"], ["a"]]
    assert "stage order: [['b'], ['a']]" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--stage-order", "dependency", "--stage-dependencies", "a-b"], "BEFORE:AFTER"),
        (["--stage-order", "dependency"], "needs `stage_dependencies`"),
        (["--stage-dependencies", "a:b"], "only used with stage_order='dependency'"),
    ],
)
def test_cli_bad_stage_dependencies(patched, tmp_path, extra, message, capsys):
    assert main(["cpi", "--tasks", "a", "b", "--output", str(tmp_path / "x"), *extra]) == 2
    assert message in capsys.readouterr().err
