"""Tests of the task loaders on crafted BigBench-style, HumanEval-style and JSONL data."""

from __future__ import annotations

import json

import pytest

from peft_spectral import tasks
from peft_spectral.tasks import Example, load_jsonl_task, load_task, split_examples


def test_bigbench_multiple_choice_parsing(fake_bigbench):
    task = load_task("mc_task", seed=0)
    assert task.kind == "multiple_choice" and task.description == "mc_task description"
    assert (len(task.train), len(task.validation), len(task.test)) == (6, 2, 2)
    for ex in task.train + task.validation + task.test:
        assert sorted(ex.choices) == ["other", "right", "wrong"]
        assert ex.choices[ex.label] == "right" == ex.target
        assert ex.prompt.startswith("Pick the right answer.\n\nQuestion")
        letter = "ABC"[ex.label]
        assert f"\n{letter}. right\n" in ex.prompt and ex.prompt.endswith(tasks.MC_INSTRUCTION)
    # options are shuffled (BigBench often lists the gold option first), so the gold letter varies
    assert len({ex.label for ex in task.train + task.validation + task.test}) > 1


def test_bigbench_parent_pools_subtasks_as_generation(fake_bigbench):
    task = load_task("maths", seed=1)
    assert task.kind == "generation" and task.description == "maths description"
    examples = task.train + task.validation + task.test
    assert len(examples) == 10
    add = [e for e in examples if "plus" in e.prompt]
    assert all(e.target == str(int(e.prompt.split()[2]) + 1) and set(e.choices) == {e.target, "banana"} for e in add)
    assert all(e.choices[e.label] == e.target for e in add)
    sub = [e for e in examples if "minus" in e.prompt]
    assert all(e.meta["targets"][1] == f"minus {e.target}" for e in sub) and len(sub) == 4
    assert "Options:" not in add[0].prompt
    one = load_task("maths/sub")
    assert one.kind == "generation" and len(one.train + one.validation + one.test) == 4


def test_splits_are_deterministic_and_seeded(fake_bigbench):
    a, b, c = (load_task("mc_task", seed=s) for s in (3, 3, 4))
    assert a.train == b.train and a.test == b.test and a.validation == b.validation
    assert [e.prompt for e in a.train] != [e.prompt for e in c.train]
    all_a = a.train + a.validation + a.test
    assert len({e.prompt for e in all_a}) == 10  # a partition: nothing lost or repeated
    small = load_task("mc_task", seed=3, max_examples=5, fractions=(0.6, 0.2, 0.2))
    assert (len(small.train), len(small.validation), len(small.test)) == (3, 1, 1)


def test_split_examples_validates_arguments():
    examples = [Example(str(i), str(i)) for i in range(10)]
    assert [len(s) for s in split_examples(examples, fractions=(0.5, 0.0, 0.5))] == [5, 0, 5]
    with pytest.raises(ValueError, match="fractions"):
        split_examples(examples, fractions=(0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="max_examples"):
        split_examples(examples, max_examples=0)
    task = tasks.Task("t", "generation", [], [], [])
    with pytest.raises(ValueError, match="split"):
        task.split("dev")


def test_list_tasks_uses_index(fake_bigbench):
    names = tasks.list_tasks()
    assert names[-5:] == [
        "bigbench:gen_task",
        "bigbench:maths",
        "bigbench:maths/add",
        "bigbench:maths/sub",
        "bigbench:mc_task",
    ]
    assert "humaneval" in names and "rg:gcd" in names


def test_jsonl_task_kinds(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"prompt": f"Q{i}", "choices": ["x", "y", "z"], "label": i % 3} for i in range(5)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    task = load_jsonl_task(path, seed=0)
    assert task.name == "mine" and task.kind == "multiple_choice"
    ex = (task.train + task.validation + task.test)[0]
    assert "A. x\nB. y\nC. z" in ex.prompt and ex.target == ex.choices[ex.label]
    assert load_task(str(path)).train == task.train

    gen = tmp_path / "gen.jsonl"
    gen.write_text(json.dumps({"prompt": "2+2?", "target": ["4", "four"], "source": "me"}) + "\n")
    gtask = load_jsonl_task(gen, fractions=(0.0, 0.0, 1.0))
    assert gtask.kind == "generation"
    assert gtask.test[0].meta == {"source": "me", "targets": ["4", "four"], "question": "2+2?"}

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "choices": ["a", "b"], "label": 5}) + "\n")
    with pytest.raises(ValueError, match="label"):
        load_jsonl_task(bad)
    bad.write_text(json.dumps({"text": "p"}) + "\n")
    with pytest.raises(ValueError, match="prompt"):
        load_jsonl_task(bad)
    with pytest.raises(FileNotFoundError):
        load_jsonl_task(tmp_path / "missing.jsonl")


def test_task_from_dataset():
    from datasets import Dataset

    ds = Dataset.from_list([{"prompt": f"p{i}", "target": f"t{i}"} for i in range(10)])
    task = tasks.task_from_dataset(ds, name="ds", seed=0)
    assert task.kind == "generation" and len(task.train) == 6
    assert {e.target for e in task.train + task.validation + task.test} == {f"t{i}" for i in range(10)}


def test_humaneval_examples_target_passes_its_tests():
    from peft_spectral.evaluation import score_prediction

    problem = {
        "task_id": "HumanEval/x",
        "prompt": 'from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """Sum."""\n',
        "canonical_solution": "    return sum(xs)\n",
        "test": "def check(candidate):\n    assert candidate([1, 2]) == 3\n",
        "entry_point": "total",
    }
    (ex,) = tasks.humaneval_examples([problem])
    assert "```python\nfrom typing import List" in ex.prompt and ex.meta["code_prompt"] == problem["prompt"]
    assert score_prediction("code", ex.target, ex)
    assert score_prediction("code", "    return sum(xs)\n", ex)  # a body continuing the stub
    assert not score_prediction("code", "    return 0\n", ex)


def test_cli_tasks_sources_list_and_show(fake_bigbench, capsys):
    from peft_spectral.cli import main

    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("rg ") and "bigbench" in out and "e.g. rg:basic_arithmetic" in out
    assert main(["tasks", "--source", "bigbench", "--filter", "maths"]) == 0
    assert capsys.readouterr().out.split() == ["bigbench:maths", "bigbench:maths/add", "bigbench:maths/sub"]
    assert main(["tasks", "--show", "mc_task", "-n", "2", "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert "kind:        multiple_choice" in out and "train 6, validation 2, test 2" in out
    assert out.count(">>> target: ") == 2 and ". right" in out
    assert main(["tasks", "--show", "rg:gcd?max_value=20", "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "spec:        rg:gcd?max_value=20" in out and "reasoning-gym's gcd verifier" in out
    assert main(["tasks", "--show", "missing_task"]) == 2
    assert "unknown task 'missing_task'" in capsys.readouterr().err


def test_cap_answer_share_keeps_the_largest_subset_under_the_share():
    from collections import Counter

    from peft_spectral.data import Example, cap_answer_share

    targets = ["1"] * 60 + ["2"] * 25 + ["3"] * 10 + ["4"] * 5
    examples = [Example(prompt=f"q{i}", target=t) for i, t in enumerate(targets)]
    kept = cap_answer_share(examples, 0.4, seed=3)
    counts = Counter(ex.target for ex in kept)
    # the largest cap m with m <= 0.4 * sum(min(count, m)): 26 <= 0.4 * 66, 27 > 0.4 * 67
    assert counts == {"1": 26, "2": 25, "3": 10, "4": 5}
    assert max(counts.values()) <= 0.4 * len(kept)
    assert [int(ex.prompt[1:]) for ex in kept] == sorted(int(ex.prompt[1:]) for ex in kept)  # order kept
    assert cap_answer_share(examples, 0.4, seed=3) == kept  # seeded
    assert cap_answer_share(examples, 0.4, seed=4) != kept  # another draw of the "1"s
    assert cap_answer_share(examples, 1.0) == examples
    with pytest.raises(ValueError, match="needs at least 5 distinct answers; the examples have 4"):
        cap_answer_share(examples, 0.2)
    with pytest.raises(ValueError, match=r"max_answer_share must be in \(0, 1\]"):
        cap_answer_share(examples, 0)
