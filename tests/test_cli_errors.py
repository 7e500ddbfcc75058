"""Issue #27 §4: bad inputs to `compress`, `mix`, `eval-two-pass` and `cpi` end in one line naming the input, exit
status 2, before the model loads (or, where only the model can tell, before the long work), never in a traceback.

| input (before: what happened) | test |
|---|---|
| `compress --method laser --output FILE`, `mix --output FILE`, `eval-two-pass`/`cpi --output FILE` (`FileExistsError` after the search) | `test_output_that_is_a_file_fails_first` |
| `--rhos 1.5`, mix's `--holdout-fraction 2`, `--elite-fraction 0`, `--init-std -1`, `--lr nan` (tracebacks) | `test_out_of_range_options_are_one_line` |
| `--eval-examples -1` (cpi scored `test[:-1]`), `--threshold nan` (every prompt to the base model), cpi `--weight-decay -100` (accepted) | `test_out_of_range_options_are_one_line` |
| `--clusters 1000` (traceback after the model loaded) | `test_clusters_beyond_the_rows_fail_before_the_search` |
| `StateFileError` of a LASER `--state` (traceback) | `test_state_errors_are_one_line` |
| cpi `--target-modules` matching nothing (`NoMatchingPeftModuleError` traceback) | `test_cpi_targets_matching_nothing_are_one_line` |
| `mix --model OTHER` with experts of another base (mixture saved after a logged warning) | `test_mix_refuses_experts_of_another_base` |
| missing expert directory, malformed `expert.json` (bare `JSONDecodeError`) | `test_bad_experts_fail_before_the_model_loads` |
| options that a strategy or method ignores (`--classifier` with dispatch, `--state` with c2i) | `test_ignored_options_are_refused` |
"""

from __future__ import annotations

import json

import pytest
import torch
from testing_utils import build_tiny_llama, build_tiny_tokenizer, save_svf_expert

from peft_spectral import compress, data
from peft_spectral.cli import compress as cli_compress
from peft_spectral.cli import cpi as cli_cpi
from peft_spectral.cli import main
from peft_spectral.cli import mix as cli_mix
from peft_spectral.tasks import Example, Task


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model (or a task) fails the test: the error must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model or the task was loaded before the bad input was reported")

    for module in (cli_compress, cli_mix, cli_cpi):
        monkeypatch.setattr(module, "load_model_or_exit", refuse)
    monkeypatch.setattr(data, "load_task", refuse, raising=False)
    monkeypatch.setattr(cli_cpi, "load_tasks", refuse)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_errors")
    tok = build_tiny_tokenizer()
    for name, seed in (("model", 0), ("other", 3)):
        build_tiny_llama(tok, seed=seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    experts = [
        str(save_svf_expert(root / n, s, root / "svd", base_name=str(root / "model")))
        for s, n in enumerate(["alpha", "beta"], 1)
    ]
    shots = root / "shots.jsonl"
    shots.write_text(
        "".join(
            json.dumps({"prompt": f"Is {i} even?", "choices": ["yes", "no"], "label": i % 2}) + "\n" for i in range(4)
        )
    )
    (root / "a_file").write_text("not a directory")
    return root, experts, shots


def _one_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.split("\r")[-1]  # after any progress bar
    assert err.count("\n") == 1 and err.startswith(f"peft-spectral {command}: error: "), err
    return err


def _argv(command, files, *extra):
    root, experts, shots = files
    if command == "compress":
        return ["compress", "--task", "t", "--output", str(root / "out"), *extra]
    if command == "mix":
        return ["mix", "--experts", *experts, "--shots", str(shots), "--output", str(root / "out"), *extra]
    if command == "eval-two-pass":
        return ["eval-two-pass", "--experts", *experts, "--task-file", str(shots), "--output", str(root / "o"), *extra]
    return ["cpi", "--tasks", "a", "b", "--output", str(root / "out"), *extra]


@pytest.mark.parametrize("command", ["compress", "mix", "eval-two-pass", "cpi"])
def test_output_that_is_a_file_fails_first(files, no_model, capsys, command):
    argv = _argv(command, files, "--method", "laser") if command == "compress" else _argv(command, files)
    argv[argv.index("--output") + 1] = str(files[0] / "a_file")
    assert main(argv) == 2
    line = _one_line(capsys, command)
    assert "--output" in line and "is a file" in line


@pytest.mark.parametrize(
    ("command", "extra", "named"),
    [
        ("compress", ["--rhos", "1.5"], "--rhos"),
        ("compress", ["--rhos", "nan"], "--rhos"),
        ("compress", ["--rhos", "0.5", "0.5"], "--rhos"),
        ("compress", ["--clusters", "0"], "--clusters"),
        ("mix", ["--holdout-fraction", "2"], "--holdout-fraction"),
        ("mix", ["--elite-fraction", "0"], "--elite-fraction"),
        ("mix", ["--init-std", "-1"], "--init-std"),
        ("mix", ["--init-std", "nan"], "--init-std"),
        ("mix", ["--l1-penalty", "nan"], "--l1-penalty"),
        ("mix", ["--population", "1"], "--population"),
        ("eval-two-pass", ["--threshold", "nan"], "--threshold"),
        ("eval-two-pass", ["--threshold", "2", "--confidence", "probability"], "--threshold"),
        ("cpi", ["--eval-examples", "-1"], "--eval-examples"),
        ("cpi", ["--weight-decay", "-100"], "--weight-decay"),
        ("cpi", ["--lr", "nan"], "--lr"),
        ("cpi", ["--stage-lr", "0"], "--stage-lr"),
        ("cpi", ["--slerp-t", "nan"], "slerp_t"),
    ],
)
def test_out_of_range_options_are_one_line(files, no_model, capsys, command, extra, named):
    try:
        code = main(_argv(command, files, *extra))
    except SystemExit as err:  # an argparse error
        code = err.code
    assert code == 2
    assert named in _one_line(capsys, command)


def _task():
    examples = compress.random_choice_examples(6, seed=0)
    return Task("t", "multiple_choice", train=examples, validation=examples, test=examples)


@pytest.fixture
def tiny_compress(monkeypatch):
    """`compress` with a tiny model (seed 0, or 3 after `swap()`) and a 6-example task."""
    tok = build_tiny_tokenizer()
    seeds = [0]
    monkeypatch.setattr(data, "load_task", lambda name, seed=0, max_examples=None: _task(), raising=False)
    monkeypatch.setattr(cli_compress, "load_model_or_exit", lambda args: (build_tiny_llama(tok, seed=seeds[0]), tok))
    return seeds


def test_clusters_beyond_the_rows_fail_before_the_search(files, tiny_compress, capsys, monkeypatch):
    def no_search(*args, **kwargs):
        raise AssertionError("the search started")

    monkeypatch.setattr(compress, "c2i_search", no_search)
    argv = _argv("compress", files, "--clustered", "--clusters", "1000", "--matrices", "down_proj")
    assert main(argv) == 2
    assert "--clusters 1000: more than the 32 rows of model.layers.0.mlp.down_proj" in _one_line(capsys, "compress")


def test_state_errors_are_one_line(files, tiny_compress, capsys, tmp_path):
    state = tmp_path / "laser.json"
    state.write_text('{"version": 2, "fingerpr')
    argv = _argv("compress", files, "--method", "laser", "--matrices", "down_proj", "--rhos", "0.5")
    assert main([*argv, "--state", str(state)]) == 2  # truncated: before the task and the model load
    assert "is not valid JSON" in _one_line(capsys, "compress")
    state.unlink()
    assert main([*argv, "--state", str(state), "--no-progress"]) == 0
    capsys.readouterr()
    tiny_compress[0] = 3  # another model: only its fingerprint tells
    assert main([*argv, "--state", str(state), "--no-progress"]) == 2
    assert "belongs to another job" in _one_line(capsys, "compress")


def test_cpi_targets_matching_nothing_are_one_line(files, monkeypatch, capsys, tmp_path):
    tok = build_tiny_tokenizer()

    def load_tasks(names, jsonl, seed=0):
        ex = [Example(prompt=f"q {i}", target=str(i)) for i in range(8)]
        return [Task(name=n, kind="generation", train=ex, validation=[], test=ex[:2]) for n in names]

    monkeypatch.setattr(cli_cpi, "load_tasks", load_tasks)
    monkeypatch.setattr(cli_cpi, "load_model_or_exit", lambda args: (build_tiny_llama(tok), tok))
    argv = ["cpi", "--tasks", "a", "b", "--output", str(tmp_path / "run"), "--target-modules", "no_such_proj"]
    assert main([*argv, "--steps", "1", "--max-length", "32"]) == 2
    assert "no_such_proj" in _one_line(capsys, "cpi")


def test_mix_refuses_experts_of_another_base(files, capsys, tmp_path):
    root, experts, shots = files
    out = tmp_path / "mixed"
    argv = ["mix", "--model", str(root / "other"), "--experts", *experts, "--shots", str(shots), "--output", str(out)]
    assert main([*argv, "--population", "4", "--generations", "1", "--no-progress"]) == 2
    assert "expert 'alpha'" in _one_line(capsys, "mix")
    assert not (out / "adapter_config.json").exists()


def test_bad_experts_fail_before_the_model_loads(files, no_model, capsys, tmp_path):
    root = files[0]
    argv = _argv("mix", files)
    argv[argv.index("--experts") + 1] = str(tmp_path / "missing")
    assert main(argv) == 2
    assert "missing" in _one_line(capsys, "mix")
    broken = tmp_path / "broken"
    save_svf_expert(broken, 1, root / "svd", base_name=str(root / "model"))
    (broken / "expert.json").write_text("{not json")
    argv = _argv("mix", files)
    argv[argv.index("--experts") + 1] = str(broken)
    assert main(argv) == 2
    assert "expert.json is not valid JSON" in _one_line(capsys, "mix")


@pytest.mark.parametrize(
    ("command", "extra", "named"),
    [
        ("eval-two-pass", ["--strategy", "dispatch", "--classifier", "somewhere"], "--classifier"),
        ("eval-two-pass", ["--strategy", "mixture"], "--mixture"),
        ("eval-two-pass", ["--strategy", "base", "--content-free", "N/A"], "--content-free"),
        ("eval-two-pass", ["--dispatch-mode", "generate", "--content-free", "N/A"], "--content-free"),
        ("compress", ["--method", "c2i", "--state", "s.json"], "--state"),
        ("compress", ["--method", "laser", "--clustered"], "--clustered"),
    ],
)
def test_ignored_options_are_refused(files, no_model, capsys, command, extra, named):
    assert main(_argv(command, files, *extra)) == 2
    assert named in _one_line(capsys, command)
