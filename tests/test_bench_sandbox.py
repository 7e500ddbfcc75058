"""`benchmarks/bench_sandbox.py --smoke`: both sandboxes pass the first HumanEval canonical solutions, the throughput
ratio is computed from the recorded times, and a second run resumes from the state file."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from peft_spectral.sandbox import SandboxUnavailableError, check_sandbox


ROOT = Path(__file__).resolve().parents[1]


def _sandbox_problem() -> str:
    try:
        check_sandbox()
    except SandboxUnavailableError as err:
        return str(err)
    return ""


# as tests/test_sandbox.py: without bubblewrap this skips on a developer machine, but fails on CI (which installs it)
pytestmark = pytest.mark.skipif(
    bool(_sandbox_problem()) and not os.environ.get("CI"), reason=f"no code sandbox here: {_sandbox_problem()}"
)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_sandbox", ROOT / "benchmarks" / "bench_sandbox.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_judges_canonical_solutions_on_both_sandboxes(bench, tmp_path):
    assert bench.main(["--smoke", "--no-progress", "--output", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "sandbox.json").read_text())
    assert result["config"]["smoke"] is True and result["problems"] == 3 and result["rounds"] == 1
    for name in ("old", "new"):
        row = result["sandboxes"][name]
        assert row["programs"] == row["passed"] == 3, name  # canonical solutions pass on both
        # seconds are rounded to the millisecond: at ~0.2 s that moves the rate by up to 0.25%
        assert row["programs_per_s"] == pytest.approx(3 / row["seconds"], rel=0.01) and row["median_ms"] > 0, name
    rates = {name: result["sandboxes"][name]["programs_per_s"] for name in ("old", "new")}
    assert result["new_over_old_throughput"] == round(rates["new"] / rates["old"], 3)
    state = json.loads((tmp_path / "sandbox_state.json").read_text())
    recorded = state["results"]["round:0"]
    assert [len(recorded[n]["seconds"]) for n in ("old", "new")] == [3, 3] and all(recorded["new"]["passed"])
    text = (tmp_path / "sandbox.md").read_text()
    assert "smoke run, not a result" in text and "| new (2 bubblewrap sandboxes) | 3 | 3 |" in text
    assert "New / old throughput: **" in text

    # the round is read back from the state file, not run again
    assert bench.main(["--smoke", "--no-progress", "--output", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "sandbox.json").read_text())["sandboxes"] == result["sandboxes"]


def test_solution_is_the_canonical_body(bench):
    from peft_spectral.data.sources.humaneval import humaneval_examples, humaneval_problems

    example, problem = humaneval_examples()[0], humaneval_problems()[0]
    assert bench.solution(example) == problem["canonical_solution"]
