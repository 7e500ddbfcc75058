"""Smoke tests of `examples/`: each script runs in its fastest setting (`--tiny`: a tiny random model built in the
script, no download) as a subprocess, as a user would run it, and its output and artifacts are checked."""

from __future__ import annotations

import functools
import json
import operator
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


#: script -> extra arguments of its fastest setting (every script also gets `--tiny`).
RUNS: dict[str, tuple[str, ...]] = {
    "svf_transformers_trainer.py": ("--output", "adapter"),
    "svf_grpo.py": ("--output", "adapter"),
    "transformer2_mix.py": ("--output", "t2"),
    "c2i_compress.py": ("--output", "c2i"),
    "cpi_jsonl.py": ("--output", "cpi"),
    "push_to_hub.py": ("--dry-run", "--repo-id", "me/svf-tiny", "--output", "push"),
}
TIMEOUT_S = 600


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """Start every example at once (one torch thread each), so that their imports and runs overlap on few cores."""
    procs = {}
    for script, args in RUNS.items():
        workdir = tmp_path_factory.mktemp(script.removesuffix(".py"))
        env = dict(
            os.environ,
            TOKENIZERS_PARALLELISM="false",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            PYTHONWARNINGS="ignore",
            PEFT_SPECTRAL_SVD_CACHE=str(workdir / "svd-cache"),
        )
        proc = subprocess.Popen(
            [sys.executable, str(EXAMPLES / script), "--tiny", *args],
            cwd=workdir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs[script] = (proc, workdir)
    yield procs
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def finished(started, script: str) -> tuple[str, Path]:
    """Wait for `script`; return its stdout and working directory (fail with its output when it failed)."""
    proc, workdir = started[script]
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"{script} ran over {TIMEOUT_S} s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{stdout[-3000:]}\n{stderr[-5000:]}"
    return stdout, workdir


def test_every_example_is_tested():
    scripts = {p.name for p in EXAMPLES.glob("*.py") if p.name != "tiny_model.py"}
    assert scripts == set(RUNS)


def test_svf_transformers_trainer(started):
    out, tmp_path = finished(started, "svf_transformers_trainer.py")
    assert "reloaded adapter reproduces the trained model: True" in out
    before, after = (float(x) for x in out.split("training loss on the task: ")[1].split()[0:3:2])
    assert after < before, out
    z = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert len(z) == 6 and all(".svf_z" in k for k in z)  # 2 layers x gate/up/down, nothing else
    assert max(float((v - 1).abs().max()) for v in z.values()) > 0  # trained
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "SVF"


def test_svf_grpo(started):
    out, tmp_path = finished(started, "svf_grpo.py")
    assert "step 2: reward=" in out
    z = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert len(z) == 6 and all(".svf_z" in k for k in z)
    assert max(float((v - 1).abs().max()) for v in z.values()) > 0, "GRPO did not move z"


def test_transformer2_mix(started):
    out, tmp_path = finished(started, "transformer2_mix.py")
    assert "experts: ['addition', 'capitals']" in out
    assert "two-pass (prompt dispatch): accuracy" in out and "CEM mixture:" in out
    assert "reloaded mixture: SVFConfig" in out
    mixture = tmp_path / "t2" / "mixture"
    meta = json.loads((mixture / "transformer2_mixture.json").read_text())
    assert [e["name"] for e in meta["experts"]] == ["addition", "capitals"]
    assert len(meta["alpha"]) == 2 and all(0.0 <= a <= 1.0 for a in meta["alpha"])
    assert len(meta["search"]["history"]) == 2  # 2 CEM generations in --tiny
    assert (mixture / "adapter_model.safetensors").is_file()


def test_c2i_compress(started):
    out, tmp_path = finished(started, "c2i_compress.py")
    search = json.loads((tmp_path / "c2i" / "search.json").read_text())
    assert search["method"] == "c2i-standard"
    assert len(search["candidates"]) == 6 * 7  # 6 MLP matrices x 7 LASER rank fractions
    assert search["evaluations"] >= 2  # the base model + at least one candidate
    if search["chosen"]:
        assert "reloaded adapter reproduces the compressed model: True" in out
        config = json.loads((tmp_path / "c2i" / "adapter" / "adapter_config.json").read_text())
        assert config["peft_type"] == "SPECTRAL_COMPRESS"
        assert set(config["modules"]) == {c["module"] for c in search["chosen"]}
    else:
        assert "no adapter was saved" in out


def test_cpi_jsonl(started):
    out, tmp_path = finished(started, "cpi_jsonl.py")
    assert "reloaded: PeftType.CORE_ISOLATION" in out
    report = json.loads((tmp_path / "cpi" / "report.json").read_text())
    assert report["tasks"] == ["addition", "capitals"]
    assert len(report["jaccard"]) == 2 and report["jaccard"][0][0] == 1.0
    assert sorted(functools.reduce(operator.iadd, report["groups"], [])) == ["addition", "capitals"]
    assert set(report["scores"]) == {"addition", "capitals"}
    final = tmp_path / "cpi" / "final"
    assert json.loads((final / "adapter_config.json").read_text())["peft_type"] == "CORE_ISOLATION"
    assert (final / "adapter_model.safetensors").is_file() and (tmp_path / "cpi" / "jaccard.png").is_file()


def test_push_to_hub_dry_run(started):
    out, tmp_path = finished(started, "push_to_hub.py")
    assert "dry run: nothing uploaded" in out
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    assert listed == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    assert not list((tmp_path / "push").glob("*.bin"))
    card = (tmp_path / "push" / "README.md").read_text()
    assert "import peft_spectral" in card and "me/svf-tiny" in card and "peft_spectral" in card.split("---")[1]
