"""`peft_spectral.benchmarking.BenchmarkRun`: a report rewritten from an earlier run's state says when its jobs ran."""

from __future__ import annotations

import json

from peft_spectral.benchmarking import BenchmarkRun
from peft_spectral.state import write_json_atomic


def _run(tmp_path) -> BenchmarkRun:
    return BenchmarkRun("demo", tmp_path, {"n": 1}, model="tiny", progress=False)


def test_header_says_when_resumed_jobs_were_recorded(tmp_path):
    run = _run(tmp_path)
    run.record("a", {"x": 1})
    assert "Jobs recorded" not in run.header()  # every job ran in this process
    state_path = tmp_path / "demo_state.json"
    state = json.loads(state_path.read_text())
    assert state["recorded"]["first"]["date"] == state["recorded"]["last"]["date"]
    # an earlier run recorded the jobs: rewrite the state as it would have written it then
    state.pop("digest")
    state["recorded"] = {
        "first": {"date": "2026-01-02T03:04:00+00:00", "commit": "abc1234"},
        "last": {"date": "2026-01-02T05:06:00+00:00", "commit": "abc1234"},
    }
    write_json_atomic(state_path, state, digest=True)

    resumed = _run(tmp_path)
    assert resumed.done("a")
    header = resumed.header()
    assert "Jobs recorded from 2026-01-02 03:04 to 2026-01-02 05:06 UTC (commit abc1234)" in header
    assert "this report was rewritten from that state" in header
    resumed.record("b", {"x": 2})
    assert "this run added some" in resumed.header()
    recorded = json.loads(state_path.read_text())["recorded"]
    assert recorded["first"]["date"] == "2026-01-02T03:04:00+00:00" and recorded["last"]["date"] > "2026-01-02"
