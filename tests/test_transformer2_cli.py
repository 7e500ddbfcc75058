"""`peft-spectral mix` and `peft-spectral eval-two-pass` end to end on a tiny saved model."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from testing_utils import build_tiny_llama, build_tiny_tokenizer, save_svf_expert

from peft_spectral.cli import main


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tok = build_tiny_tokenizer()
    model = build_tiny_llama(tok)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
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
    return root, experts, shots


def test_mix_command_saves_loadable_mixture(setup, capsys, monkeypatch):
    import huggingface_hub

    uploads = []

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            pass

        def upload_folder(self, folder_path, repo_id, **kw):
            uploads.append((folder_path, repo_id))
            return "https://hub/commit/1"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    root, experts, shots = setup
    out = root / "mixed"
    rc = main(
        [
            "mix",
            "--model",
            str(root / "model"),
            "--experts",
            *experts,
            "--shots",
            str(shots),
            "--output",
            str(out),
            "--population",
            "4",
            "--generations",
            "2",
            "--no-progress",
            "--push-to-hub",
            "me/mix",
        ]
    )
    assert uploads == [(str(out), "me/mix")]
    assert rc == 0
    text = capsys.readouterr().out
    assert "alpha: alpha=" in text and "best fitness on 4 shots" in text
    meta = json.loads((out / "transformer2_mixture.json").read_text())
    assert [e["name"] for e in meta["experts"]] == ["alpha", "beta"] and len(meta["search"]["history"]) == 2
    base = build_tiny_llama(build_tiny_tokenizer())
    PeftModel.from_pretrained(base, str(out))  # an ordinary SVF adapter

    rc = main(
        [
            "eval-two-pass",
            "--model",
            str(root / "model"),
            "--experts",
            *experts,
            "--task-file",
            str(shots),
            "--strategy",
            "mixture",
            "--mixture",
            str(out),
            "--output",
            str(root / "res"),
            "--device",
            "cpu",
            "--dtype",
            "float32",
        ]
    )
    assert rc == 0
    res = json.loads((root / "res" / "two_pass.json").read_text())
    assert res["n"] == 4 and res["group_sizes"] == {"t2_mixture": 4} and 0 <= res["accuracy"] <= 1


def test_eval_two_pass_dispatch_and_bad_args(setup, capsys):
    root, experts, shots = setup
    rc = main(
        [
            "eval-two-pass",
            "--model",
            str(root / "model"),
            "--experts",
            *experts,
            "--task-file",
            str(shots),
            "--strategy",
            "dispatch",
            "--names",
            "math",
            "logic",
            "--descriptions",
            "sums",
            "puzzles",
            "--output",
            str(root / "dispatch"),
            "--eval-examples",
            "3",
            "--answer-mode",
            "loglik",
        ]
    )
    assert rc == 0
    assert json.loads((root / "dispatch" / "two_pass.json").read_text())["n"] == 3
    text = capsys.readouterr().out
    assert "strategy dispatch: accuracy" in text and "pass 1" in text
    capsys.readouterr()
    common = ["--model", str(root / "model"), "--experts", *experts, "--output", str(root / "x")]
    assert main(["eval-two-pass", *common, "--task-file", str(shots), "--strategy", "classifier"]) == 2
    assert "--strategy classifier needs --classifier DIR" in capsys.readouterr().err
    assert main(["eval-two-pass", *common, "--task-file", str(shots), "--descriptions", "only-one"]) == 2
    assert "--descriptions: 1 given for 2 experts" in capsys.readouterr().err
    empty = root / "empty.jsonl"
    empty.write_text("")
    assert main(["mix", *common, "--shots", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"peft-spectral mix: error: --shots {empty}" in err
