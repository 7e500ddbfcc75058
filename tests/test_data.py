"""Tests of the data package: task specs, the reasoning-gym source, answer extraction, scorers, JSONL / hf / BigBench
sources, mixtures and the one-line errors of bad specs."""

from __future__ import annotations

import json

import pytest

from peft_spectral.data import (
    DEFAULT_TASK,
    Example,
    TaskSpecError,
    check_task_spec,
    example_content,
    lenient_answers,
    list_tasks,
    load_task,
    parse_task_spec,
    read_jsonl_examples,
    score_example,
    strict_answer,
)
from peft_spectral.data.spec import format_value, parse_value


GCD = "rg:gcd?max_value=30"


# ---------------------------------------------------------------------------------------------------------- specs


def test_spec_parsing_and_canonical_form():
    spec = parse_task_spec("rg:basic_arithmetic?operators=+,-&max_digits=2&allow_negation=false&x=%3Ba")
    assert spec.source == "rg" and spec.name == "basic_arithmetic"
    assert spec.param_dict == {"operators": ("+", "-"), "max_digits": 2, "allow_negation": False, "x": ";a"}
    # canonical: sorted keys, and it parses back to the same spec
    text = str(spec)
    assert text.startswith("rg:basic_arithmetic?allow_negation=false&max_digits=2&operators=+,-")
    assert parse_task_spec(text) == spec
    assert parse_task_spec("humaneval") == parse_task_spec("humaneval").with_source("")
    assert parse_task_spec("hf:owner/name:main:test?prompt=question").name == "owner/name:main:test"
    for value in (2, 0.5, True, "text", "12", ("+", "-"), "a,b"):
        back = parse_value(format_value(value))
        assert (tuple(back) if isinstance(back, list) else back) == value


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("nosuch:gcd", "unknown task source 'nosuch'"),
        ("rg:gcdd", "unknown reasoning-gym generator 'gcdd'.*did you mean gcd"),
        ("rg:gcd?max_valu=3", r"unknown parameter\(s\) \['max_valu'\].*max_value"),
        ("rg:gcd?min_value=5&max_value=2", "bad parameter for gcd"),
        ("rg:gcd?seed=3", "set by the loader"),
        ("rg:gcd?max_value", "is not key=value"),
        ("jsonl:/no/such/file.jsonl", "no such file"),
        ("definitely_not_a_task", "unknown task 'definitely_not_a_task'"),
        ("rg:gcd;;rg:lcm", "empty part"),
        ("bigbench:navigate", "PEFT_SPECTRAL_BIGBENCH"),
    ],
)
def test_bad_specs_are_one_line_errors(spec, match, package_cache, monkeypatch):
    monkeypatch.delenv("PEFT_SPECTRAL_BIGBENCH", raising=False)
    with pytest.raises(TaskSpecError, match=match) as info:
        check_task_spec(spec)
    assert "\n" not in str(info.value)


def test_bare_names_resolve_where_unambiguous():
    assert [str(s) for s in check_task_spec("gcd")] == ["rg:gcd"]
    assert check_task_spec("humaneval")[0].source == "humaneval"
    assert "rg:basic_arithmetic" in list_tasks("rg") and list_tasks("humaneval") == ["humaneval"]


# ---------------------------------------------------------------------------------------------------------- reasoning-gym


def test_reasoning_gym_splits_are_disjoint_deterministic_and_recorded():
    task = load_task(GCD, seed=3, max_examples=300)
    again = load_task(GCD, seed=3, max_examples=300)
    other = load_task(GCD, seed=4, max_examples=300)
    assert (len(task.train), len(task.validation), len(task.test)) == (180, 60, 60)
    assert task.name == task.spec == "rg:gcd?max_value=30" and task.kind == "generation"
    assert task.params == {"generator": "gcd", "max_value": 30}
    assert "GCD" in task.description
    assert [e.prompt for e in task.test] == [e.prompt for e in again.test]
    assert [e.prompt for e in task.test] != [e.prompt for e in other.test]
    questions = {s: {example_content(e) for e in task.split(s)} for s in ("train", "validation", "test")}
    assert not questions["train"] & questions["test"] and not questions["train"] & questions["validation"]
    assert not questions["validation"] & questions["test"]
    assert len(questions["test"]) == len(task.test)  # no repeats inside test
    ex = task.test[0]
    assert ex.prompt.endswith("final answer.") and ex.target == str(ex.meta["entry"]["answer"])
    assert all(max(e.meta["entry"]["metadata"]["numbers"]) <= 30 for e in task.train)
    assert task.info()["spec"] == task.spec and task.info()["sizes"]["test"] == 60


def test_small_question_space_is_shared_by_the_splits(caplog):
    # 1-digit, 2-term addition has about a hundred distinct questions: each split gets its share
    task = load_task(
        "rg:basic_arithmetic?min_digits=1&max_digits=1&min_terms=2&max_terms=2&operators=+&allow_negation=false"
        "&allow_parentheses=false",
        max_examples=400,
    )
    sizes = [len(task.train), len(task.validation), len(task.test)]
    total = sum(sizes)
    assert total < 200 and abs(sizes[1] - 0.2 * total) <= 2 and abs(sizes[2] - 0.2 * total) <= 2
    questions = [example_content(e) for e in task.train + task.validation + task.test]
    assert len(set(questions)) == len(questions)
    assert "question space is small" in caplog.text


def test_reasoning_gym_scorer_strict_and_lenient():
    task = load_task(GCD, max_examples=20)
    ex = next(e for e in task.test if e.target != "1")
    answer = ex.target
    right = {
        answer: (1.0, 1.0),
        f"{answer}.": (1.0, 1.0),
        f"<answer>{answer}</answer>": (1.0, 1.0),
        f"The GCD of these numbers is {answer}.": (None, 1.0),
        f"**{answer}**": (None, 1.0),
    }
    for text, (strict, lenient) in right.items():
        assert score_example(text, ex, extraction="lenient") == lenient, text
        if strict is not None:
            assert score_example(text, ex, extraction="strict") == strict, text
        else:
            assert score_example(text, ex, extraction="strict") < 1.0, text
    assert score_example("I do not know", ex) == 0.0
    # reasoning-gym's own verifier gives partial credit when the answer contains the gold one ("103" holds "3")
    assert 0.0 < score_example(f"1{answer}0", ex) < 1.0


def test_answer_extraction_modes():
    assert strict_answer("  12.\nbecause ...") == "12"
    assert strict_answer("so <answer>7</answer> done") == "7"
    assert strict_answer("The answer is 12.") == "The answer is 12"
    found = lenient_answers("The GCD of 9 and 3 is 3.")
    assert "3" in found and found[0] == "The GCD of 9 and 3 is 3"
    assert "dog cat" in lenient_answers("Reversed: dog cat")
    assert "5" in lenient_answers("x = 5") and "3/4" in lenient_answers("It is 3/4 of it")
    assert "No" in lenient_answers("No, it does not logically follow.")  # the first clause
    assert "3.5" in lenient_answers("3.5 is the answer") and "3" not in lenient_answers("3.5 is the answer")
    assert lenient_answers("") == []


def test_default_scorers_strict_and_lenient():
    mc = Example("Q\n\nA. red\nB. blue", "blue", ("red", "blue"), 1)
    assert score_example("B", mc, extraction="strict") == 1.0
    assert score_example("B. blue", mc, extraction="strict") == 1.0
    assert score_example("The answer is B", mc, extraction="strict") == 0.0
    assert score_example("The answer is B", mc, extraction="lenient") == 1.0
    gen = Example("2+2?", "4")
    assert score_example("4", gen, extraction="strict") == 1.0
    assert score_example("It is 4", gen, extraction="strict") == 0.0
    assert score_example("It is 4", gen, extraction="lenient") == 1.0
    with pytest.raises(ValueError, match="extraction"):
        score_example("4", gen, extraction="loose")


def test_mixture_interleaves_and_keeps_each_scorer():
    task = load_task("rg:gcd?max_value=30;rg:lcm?max_value=20", max_examples=100)
    assert task.name == "rg:gcd?max_value=30;rg:lcm?max_value=20"
    assert [e.meta["generator"] for e in task.train[:4]] == ["gcd", "lcm", "gcd", "lcm"]
    assert len(task.train) == 60 and len(task.test) == 20
    lcm = next(e for e in task.test if e.meta["generator"] == "lcm")
    assert lcm.scorer.generator == "lcm" and score_example(lcm.target, lcm) == 1.0
    assert [m["spec"] for m in task.params["mixture"]] == ["rg:gcd?max_value=30", "rg:lcm?max_value=20"]


def test_default_task_loads():
    task = load_task(DEFAULT_TASK, max_examples=50)
    assert task.kind == "generation" and all("+" in e.prompt or "-" in e.prompt for e in task.train)


# ---------------------------------------------------------------------------------------------------------- files


def test_jsonl_one_format_both_dialects_and_own_splits(tmp_path):
    path = tmp_path / "shots.jsonl"
    rows = [
        {"question": "Sky?", "options": ["red", "blue"], "target": "blue"},
        {"input": "2+2?", "target": ["4", "four"], "source": "me"},
        {"prompt": "Pick", "choices": ["x", "y", "z"], "label": 2},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    examples = read_jsonl_examples(path)
    assert examples[0].label == 1 and "A. red\nB. blue" in examples[0].prompt
    assert examples[1].meta["targets"] == ["4", "four"] and examples[1].meta["source"] == "me"
    assert examples[2].target == "z"

    split_file = tmp_path / "own.jsonl"
    split_file.write_text(
        "\n".join(
            json.dumps({"prompt": f"q{i}", "target": str(i), "split": s})
            for i, s in enumerate(["train", "train", "validation", "test", "test"])
        )
    )
    task = load_task(f"jsonl:{split_file}")
    assert [e.target for e in task.train] == ["0", "1"] and [e.target for e in task.test] == ["3", "4"]
    assert task.spec == f"jsonl:{split_file}" and task.name == "own"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "choices": ["a", "b"], "label": 5}) + "\n")
    with pytest.raises(TaskSpecError, match=r"bad\.jsonl:1.*label"):
        load_task(f"jsonl:{bad}")


def test_hf_source_reads_a_local_file_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"question": f"What is {i}+1?", "answer": str(i + 1)}) for i in range(20)))
    task = load_task(f"hf:json?data_files={path}&prompt=question&target=answer", seed=1)
    assert task.kind == "generation" and (len(task.train), len(task.validation), len(task.test)) == (12, 4, 4)
    example = task.test[0]
    assert score_example(f"It is {example.target}", example) == 1.0
    with pytest.raises(TaskSpecError, match="column 'nope'"):
        load_task(f"hf:json?data_files={path}&prompt=nope&target=answer")


def test_bigbench_from_a_directory(tmp_path, monkeypatch):
    root = tmp_path / "BIG-bench" / "bigbench" / "benchmark_tasks" / "toy"
    root.mkdir(parents=True)
    examples = [
        {"input": f"Is {i} even?", "target_scores": {"yes": int(i % 2 == 0), "no": int(i % 2)}} for i in range(10)
    ]
    (root / "task.json").write_text(json.dumps({"name": "toy", "description": "parity", "examples": examples}))
    monkeypatch.setenv("PEFT_SPECTRAL_BIGBENCH", str(tmp_path / "BIG-bench"))
    task = load_task("bigbench:toy")
    assert task.kind == "multiple_choice" and task.spec == "bigbench:toy" and len(task.train) == 6
    assert load_task("toy").train == task.train  # a bare name, now that BigBench is configured


def test_degenerate_generator_entries_are_skipped():
    # reasoning-gym writes 0 in another base as "": such entries cannot be scored or trained on
    task = load_task("rg:base_conversion?max_base=10&max_value=15", max_examples=600)
    assert all(e.target.strip() for e in task.train + task.validation + task.test)


def test_answer_logliks_of_an_empty_target_is_nan(tiny_llama):
    import math

    from peft_spectral.evaluation import answer_logliks

    model, tokenizer = tiny_llama
    values = answer_logliks(model, tokenizer, [Example("2+2?", "4"), Example("0 in base 6?", "")]).tolist()
    assert math.isfinite(values[0]) and math.isnan(values[1])
