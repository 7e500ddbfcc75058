"""Transformer² pass 1 ("others" threshold, calibration, cheaper prefix sharing) and mixed-adapter pass 2."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import get_peft_model
from testing_utils import build_tiny_llama, build_tiny_tokenizer

import peft_spectral
from peft_spectral.evaluation import generate_answers
from peft_spectral.tasks import Example
from peft_spectral.transformer2 import (
    OTHERS,
    DispatchPrompt,
    ExpertLibrary,
    PromptDispatcher,
    build_classifier_examples,
    calibrate_threshold,
    category_confidence,
    decide_categories,
    dispatch_report,
    fit_threshold,
    labelled_prompts,
    two_pass_evaluate,
    two_pass_generate,
)


TARGETS = ["q_proj", "gate_proj", "up_proj", "down_proj"]
EXPERTS = (("arith", "arithmetic questions"), ("logic", "logic puzzles"))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _save_svf(path, seed, svd_dir):
    tok = build_tiny_tokenizer()
    base = build_tiny_llama(tok)
    base.name_or_path = "tiny-llama"
    model = get_peft_model(base, peft_spectral.SVFConfig(target_modules=TARGETS, svd_cache_dir=str(svd_dir)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.base_model.svf_layers():
            z = layer.svf_z["default"]
            z.copy_(1 + 0.5 * torch.randn(z.shape, generator=gen))
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def expert_specs(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    return [
        {"name": n, "source": str(_save_svf(root / n, seed, root / "svd")), "description": d}
        for seed, (n, d) in enumerate(EXPERTS, start=1)
    ]


def _base():
    tok = build_tiny_tokenizer()
    base = build_tiny_llama(tok)
    base.name_or_path = "tiny-llama"
    return base, tok


@pytest.fixture
def library(expert_specs):
    base, tok = _base()
    reference = copy.deepcopy(base)
    return ExpertLibrary.load(base, tok, expert_specs), reference


def _questions(n, start=""):
    return [Example(prompt=f"{start}Item {i}: what is {i} plus {2 * i}?", target="") for i in range(n)]


# --------------------------------------------------------------------------------------------- "others"


def test_confidence_and_decision_on_constructed_scores():
    cats = ["a", "b", OTHERS]
    rows = [[-1.0, -3.0, -5.0], [-2.0, -2.5, -4.0], [-6.0, -1.0, -0.5]]
    assert category_confidence(rows[0], "margin") == pytest.approx(2.0)
    assert category_confidence(rows[1], "probability") == pytest.approx(
        1 / (1 + math.exp(-0.5) + math.exp(-2.0)), rel=1e-9
    )
    assert decide_categories(rows, cats) == ["a", "a", OTHERS]
    assert decide_categories(rows, cats, threshold=0.0) == ["a", "a", OTHERS]
    assert decide_categories(rows, cats, threshold=1.0) == ["a", OTHERS, OTHERS]
    assert decide_categories(rows, cats, threshold=100.0) == [OTHERS] * 3
    with pytest.raises(ValueError, match="confidence"):
        category_confidence(rows[0], "entropy")


@pytest.mark.parametrize("confidence", ["margin", "probability"])
def test_threshold_dispatch_all_others_when_high_argmax_at_zero(library, confidence):
    lib, _ = library
    exs = _questions(6)
    plain = PromptDispatcher(None)(lib, exs)
    at_zero = PromptDispatcher(None, threshold=0.0, confidence=confidence)
    assert at_zero(lib, exs) == plain
    high = PromptDispatcher(None, threshold=1e9, confidence=confidence)
    assert high(lib, exs) == [OTHERS] * 6
    assert len(high.last_confidences) == 6 and len(high.last_scores[0]) == len(lib.names) + 1
    with pytest.raises(ValueError, match="generate"):
        PromptDispatcher(None, mode="generate", threshold=1.0)
    with pytest.raises(ValueError, match="no fitted threshold"):
        PromptDispatcher(None, threshold="library")(lib, exs)


def test_content_free_calibration_subtracts_the_normalised_prior(library):
    lib, _ = library
    exs = _questions(5)
    texts = ("N/A", "", "?")
    raw = PromptDispatcher(None)
    raw_scores = raw.scores(lib, exs)
    raw_tokens = raw.last_tokens_run
    # reference: the raw scores of the content-free questions, log-softmax over the categories, mean per category
    rows = torch.tensor(raw.scores(lib, [Example(prompt=t, target="") for t in texts]), dtype=torch.float64)
    prior = torch.log_softmax(rows, dim=1).mean(0)
    calibrated = PromptDispatcher(None, content_free=texts)
    got = calibrated.scores(lib, exs)
    expected = torch.tensor(raw_scores, dtype=torch.float64) - prior
    assert torch.allclose(torch.tensor(got, dtype=torch.float64), expected, atol=1e-5)
    assert calibrated.last_prior == pytest.approx(prior.tolist(), abs=1e-6)
    assert calibrated.last_tokens_run == raw_tokens  # the prior's questions are not counted as this call's
    assert calibrated.last_confidences == [category_confidence(r, "margin") for r in got]
    # decisions follow the calibrated scores
    names = lib.names + [OTHERS]
    assert calibrated(lib, exs) == decide_categories(expected.tolist(), names)
    # a content-free question itself then has no preferred category (the prior of one text is its own scores)
    one = PromptDispatcher(None, content_free=("N/A",))
    flat = one.scores(lib, [Example(prompt="N/A", target="")])[0]
    assert max(flat) - min(flat) < 1e-4
    # the prior is cached per adapter and library, and forgotten by clear_cache
    assert len(calibrated._priors) == 1
    calibrated.scores(lib, exs[:2])
    assert len(calibrated._priors) == 1
    calibrated.clear_cache()
    assert not calibrated._priors


@pytest.mark.parametrize("bad", [(), "N/A", ("N/A", 3)])
def test_content_free_must_be_strings(bad):
    with pytest.raises(ValueError, match="content_free"):
        PromptDispatcher(None, content_free=bad)


def test_content_free_needs_loglik_mode():
    with pytest.raises(ValueError, match="content_free needs mode='loglik'"):
        PromptDispatcher(None, mode="generate", content_free=("N/A",))
    with pytest.raises(ValueError, match="no content_free"):
        PromptDispatcher(None).prior(None)


def test_fit_threshold_picks_documented_midpoint():
    cats = ["a", "b", OTHERS]
    # margins 4, 3, 1, 0.5: the two confident prompts are "a"; the two hesitant ones should go to the base model
    scores = [[-1.0, -5.0, -6.0], [-1.0, -4.0, -6.0], [-1.0, -2.0, -6.0], [-1.0, -1.5, -6.0]]
    truth = ["a", "a", OTHERS, OTHERS]
    threshold, report = fit_threshold(scores, cats, truth)
    assert threshold == pytest.approx(2.0)  # midpoint of margins 1 and 3, the smallest of the best thresholds
    assert report["correct"] == 4 and report["per_category"][OTHERS] == {
        "n": 2,
        "correct": 2,
        "predicted": {OTHERS: 2},
        "accuracy": 1.0,
    }
    # everything belongs to "a": the plain argmax (threshold 0) is best
    assert fit_threshold(scores, cats, ["a"] * 4)[0] == 0.0
    # balanced accuracy weighs the single "others" prompt as much as the three "a" prompts
    t_acc, _ = fit_threshold(scores, cats, ["a", "a", "a", OTHERS])
    t_bal, rep = fit_threshold(scores, cats, ["a", "a", "a", OTHERS], target="balanced_accuracy")
    assert t_acc == pytest.approx(0.75) and t_bal == pytest.approx(0.75) and rep["balanced_accuracy"] == 1.0
    with pytest.raises(ValueError, match="target"):
        fit_threshold(scores, cats, truth, target="f1")


def test_dispatch_report_counts():
    report = dispatch_report(["a", None, "b", "a", OTHERS], ["a", "a", "b", OTHERS, OTHERS])
    assert report["n"] == 5 and report["correct"] == 3
    assert report["per_category"]["a"] == {"n": 2, "correct": 1, "predicted": {"a": 1, OTHERS: 1}, "accuracy": 0.5}
    assert report["per_category"][OTHERS]["predicted"] == {"a": 1, OTHERS: 1}
    assert report["balanced_accuracy"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)


def test_calibrated_threshold_saved_and_loaded_with_library(library, expert_specs, tmp_path):
    lib, _ = library
    data = {
        "arith": _questions(4),
        "logic": [Example(prompt=f"If A{i} then B. A{i}. B?", target="") for i in range(4)],
    }
    others = {"story": [Example(prompt=f"Tell a story about {w}", target="") for w in ("cats", "rain", "ships")]}
    labelled = labelled_prompts(data, others)
    assert len(labelled) == 11 and labelled[-1][1] == OTHERS
    dispatcher = PromptDispatcher(None, threshold=0.0)
    entry = calibrate_threshold(dispatcher, lib, labelled)
    assert dispatcher.threshold == entry["threshold"] and lib.dispatch_thresholds["prompt"] is entry
    assert entry["report"]["accuracy"] >= entry["argmax_report"]["accuracy"]  # threshold 0 is a candidate
    exs = [ex for ex, _ in labelled]
    choices = dispatcher(lib, exs)
    path = lib.save_manifest(tmp_path / "lib")
    base, tok = _base()
    loaded = ExpertLibrary.from_manifest(base, tok, tmp_path / "lib")
    assert path.name == "transformer2_library.json" and loaded.names == lib.names
    assert loaded.dispatch_thresholds["prompt"]["threshold"] == entry["threshold"]
    assert PromptDispatcher(None, threshold="library")(loaded, exs) == choices
    with pytest.raises(ValueError, match="category"):
        calibrate_threshold(dispatcher, lib, [("q", "nope")])


def test_classifier_examples_others_from_several_tasks(library):
    lib, _ = library
    data = {"arith": _questions(4), "logic": _questions(3, "Logic ")}
    others = {
        "story": [Example(prompt=f"Story {i}", target="") for i in range(10)],
        "poem": [Example(prompt=f"Poem {i}", target="") for i in range(2)],
        "chat": [Example(prompt=f"Chat {i}", target="") for i in range(10)],
    }
    exs = build_classifier_examples(lib, data, others=others, seed=1)
    other_prompts = [e.prompt.rsplit("Question:\n", 1)[1] for e in exs if e.target == OTHERS]
    assert len(other_prompts) == 4  # as many as the largest expert class
    kinds = sorted(p.split()[0] for p in other_prompts)
    assert set(kinds) == {"Story", "Poem", "Chat"}  # drawn from every unrelated task
    assert all(e.choices[e.label] == e.target for e in exs)
    capped = build_classifier_examples(lib, data, others=others, per_category=9, seed=1)
    kinds = [e.prompt.rsplit("Question:\n", 1)[1].split()[0] for e in capped if e.target == OTHERS]
    assert len(kinds) == 9 and kinds.count("Poem") == 2 and kinds.count("Story") in (3, 4)
    with pytest.raises(ValueError, match="no examples"):
        build_classifier_examples(lib, data, others={"empty": []})


# --------------------------------------------------------------------------------------------- pass-1 cost


def test_prompt_prefix_sharing_matches_instruction_prefix(library):
    lib, _ = library
    start = "Answer the following arithmetic question carefully and show no work. "
    exs = _questions(5, start)
    prompt = DispatchPrompt(max_question_tokens=None)
    old = PromptDispatcher(None, prompt=prompt, prefix_sharing="instruction", label_tokens="full")
    new = PromptDispatcher(None, prompt=prompt, prefix_sharing="prompts", label_tokens="full")
    old_choices, new_choices = old(lib, exs), new(lib, exs)
    assert new_choices == old_choices
    for a, b in zip(old.last_scores, new.last_scores):
        assert a == pytest.approx(b, abs=1e-4)
    # the questions' shared start is run once instead of once per prompt
    assert new.last_tokens_run <= old.last_tokens_run - 4 * len(start)
    with pytest.raises(ValueError, match="prefix_sharing"):
        PromptDispatcher(None, prefix_sharing="all")


# --------------------------------------------------------------------------------------------- mixed pass 2


def _route(routes):
    return lambda _lib, exs: [routes[e.prompt] for e in exs]


def test_two_pass_generate_mixed_equals_grouped(library):
    lib, reference = library
    prompts = ["What is 2+2?", "Sing.", "Is every cat a cat?", "Capital of France, please?", "x", "Why?"]
    routes = dict(zip(prompts, ["arith", "logic", None, "arith", "logic", None]))
    mixed = two_pass_generate(lib, _route(routes), prompts, max_new_tokens=5, batch_size=4, compare_paths=True)
    grouped = two_pass_generate(lib, _route(routes), prompts, max_new_tokens=5, batch_size=4, mixed_batch=False)
    assert mixed.pass2_path == "mixed" and grouped.pass2_path == "grouped"
    assert mixed.outputs == grouped.outputs and mixed.paths_agree is True
    assert set(mixed.pass2_seconds_by_path) == {"mixed", "grouped"}
    assert mixed.groups == grouped.groups == {"arith": [0, 3], "logic": [1, 4], "base": [2, 5]}
    # the base-model prompts are answered as by the unadapted model
    base_exs = [Example(prompt=prompts[i], target="") for i in (2, 5)]
    assert [mixed.outputs[i] for i in (2, 5)] == generate_answers(reference, lib.tokenizer, base_exs, max_new_tokens=5)
    # one adaptation for all: no mixing needed
    assert two_pass_generate(lib, lambda _l, e: ["arith"] * len(e), prompts[:2], max_new_tokens=2).pass2_path == (
        "grouped"
    )
    assert "pass1_over_pass2" in mixed.to_dict() and mixed.to_dict()["pass2_path"] == "mixed"


@pytest.mark.parametrize("choices", [("yes", "no"), ("a long answer", "b", "another long one")])
def test_two_pass_evaluate_mixed_equals_grouped(library, choices):
    lib, _ = library
    exs = [
        Example(prompt=f"Question {i}{'?' * (i % 3)}", target=choices[i % 2], choices=choices, label=i % 2)
        for i in range(7)
    ]
    routes = {e.prompt: c for e, c in zip(exs, ["arith", "logic", None] * 3)}
    mixed = two_pass_evaluate(lib, _route(routes), exs, batch_size=3)
    grouped = two_pass_evaluate(lib, _route(routes), exs, batch_size=3, mixed_batch=False)
    assert mixed.pass2_path == "mixed"
    assert mixed.outputs == grouped.outputs and mixed.correct == grouped.correct
    assert mixed.mean_loglik == pytest.approx(grouped.mean_loglik, abs=1e-5)


def test_two_pass_evaluate_generation_mixed_equals_grouped(library):
    lib, _ = library
    exs = [Example(prompt=f"Say {w}", target=w) for w in ("hi", "a longer word", "yo", "ok then")]
    routes = {e.prompt: c for e, c in zip(exs, ["logic", None, "arith", "logic"])}
    kwargs = {"kind": "generation", "batch_size": 3, "max_new_tokens": 4}
    mixed = two_pass_evaluate(lib, _route(routes), exs, compare_paths=True, **kwargs)
    grouped = two_pass_evaluate(lib, _route(routes), exs, mixed_batch=False, **kwargs)
    assert mixed.outputs == grouped.outputs and mixed.paths_agree is True
    assert mixed.mean_loglik == pytest.approx(grouped.mean_loglik, abs=1e-5)
