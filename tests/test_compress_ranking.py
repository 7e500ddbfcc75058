"""`peft_spectral.compress.ranking`: generation tasks as answer ranking (gold answer among near misses)."""

from __future__ import annotations

import pytest

from peft_spectral.compress.ranking import NEAR_MISSES, answer_ranking, ranking_task
from peft_spectral.data import Example, Task


def _task(targets, kind="generation"):
    examples = [Example(f"q{i}", t, meta={"i": i}) for i, t in enumerate(targets)]
    return Task("t", kind, train=examples, validation=examples[:2], test=examples[:3], params={"level": 1})


def test_integer_answers_get_near_misses_and_the_gold_one_once():
    examples = answer_ranking(_task(["5", "0", "-3", "120"]).train, n_options=4, seed=1)
    for ex in examples:
        assert len(ex.choices) == len(set(ex.choices)) == 4 and ex.choices[ex.label] == ex.target
        gold = int(ex.target)
        wrong = [int(c) for c in ex.choices if c != ex.target]
        assert all(w - gold in NEAR_MISSES for w in wrong)
        if gold >= 0:
            assert min(wrong) >= 0  # a non-negative answer keeps non-negative candidates
    assert examples[0].meta == {"i": 0} and examples[0].prompt == "q0"
    assert answer_ranking(_task(["5", "0", "-3", "120"]).train, 4, seed=1) == examples  # seeded
    labels = {ex.label for ex in answer_ranking(_task([str(i) for i in range(40)]).train, 4, seed=0)}
    assert labels == {0, 1, 2, 3}  # the gold answer's position varies


def test_other_answers_are_drawn_from_the_split():
    words = ["cat", "dog", "emu", "fox", "gnu"]
    for ex in answer_ranking(_task(words).train, n_options=3):
        assert set(ex.choices) <= set(words) and ex.choices[ex.label] == ex.target
    with pytest.raises(ValueError, match="fewer than 3"):
        answer_ranking(_task(["cat", "dog", "emu"]).train, n_options=4)
    with pytest.raises(ValueError, match="n_options"):
        answer_ranking(_task(["1"]).train, n_options=1)


def test_ranking_task_records_itself_and_leaves_other_kinds():
    task = ranking_task(_task(["1", "2", "3", "4"]), n_options=3, seed=2)
    assert task.kind == "multiple_choice" and task.params == {"level": 1, "answer_ranking": {"options": 3, "seed": 2}}
    assert [len(task.split(s)) for s in ("train", "validation", "test")] == [4, 2, 3]
    assert all(len(ex.choices) == 3 for ex in task.test)
    mc = _task(["a", "b"], kind="multiple_choice")
    assert ranking_task(mc) is mc
    with pytest.raises(ValueError, match="only generation tasks"):
        ranking_task(_task(["x"], kind="code"))
