"""Transformer² inference: expert library, dispatch, two-pass generation, CEM mixing (tiny random models)."""

from __future__ import annotations

import copy
import itertools
import json
import logging

import pytest
import torch
from peft import PeftModel
from testing_utils import build_tiny_llama, build_tiny_tokenizer, save_svf_expert

import peft_spectral
from peft_spectral import svd_cache
from peft_spectral.adapter_io import AdapterLoadError
from peft_spectral.evaluation import generate_answers, option_logliks
from peft_spectral.option_scoring import score_examples
from peft_spectral.tasks import Example
from peft_spectral.transformer2 import (
    OTHERS,
    CEMConfig,
    DispatchPrompt,
    ExpertLibrary,
    ExpertLibraryError,
    FewShotMixer,
    FixedDispatcher,
    PromptDispatcher,
    build_classifier_examples,
    cross_entropy_method,
    load_shots,
    parse_category,
    two_pass_evaluate,
    two_pass_generate,
)
from peft_spectral.transformer2.library import svf_z_snapshot


TARGETS = ["gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run far faster on one thread than on a shared, busy multi-core CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


EXPERTS = (("arith", "arithmetic questions"), ("logic", "logic puzzles"), ("facts", "world knowledge"))


@pytest.fixture(scope="module")
def expert_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    svd_dir = root / "svd"
    return [save_svf_expert(root / name, seed, svd_dir) for seed, (name, _) in enumerate(EXPERTS, start=1)]


def _library(expert_dirs):
    tok = build_tiny_tokenizer()
    base = build_tiny_llama(tok)
    base.name_or_path = "tiny-llama"
    reference = copy.deepcopy(base)
    lib = ExpertLibrary.load(
        base, tok, [{"name": n, "source": str(d), "description": desc} for (n, desc), d in zip(EXPERTS, expert_dirs)]
    )
    return lib, reference


@pytest.fixture
def library(expert_dirs):
    return _library(expert_dirs)


def _logits(model, tok, text):
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def _mc(prompt, label=0):
    return Example(prompt=prompt, target=("yes", "no", "maybe")[label], choices=("yes", "no", "maybe"), label=label)


# --------------------------------------------------------------------------------------------- library


def test_library_loads_experts_once_without_recomputing_svd(expert_dirs, monkeypatch):
    calls = []
    real = svd_cache.compute_factors
    monkeypatch.setattr(svd_cache, "compute_factors", lambda *a, **k: calls.append(1) or real(*a, **k))
    lib, _ = _library(expert_dirs)
    assert lib.names == ["arith", "logic", "facts"]
    assert lib.experts["logic"].description == "logic puzzles"
    after_load = len(calls)
    assert after_load <= len(lib.svf_layers)  # at most one SVD per weight, for the first expert only
    layer = lib.svf_layers[0][1]
    assert set(layer.svf_z) == {"arith", "logic", "facts"}  # one layer, one set of factors, K vectors z
    for name in lib.names:
        with lib.use(name):
            assert lib.model.active_adapter == name
    mixer = FewShotMixer(lib, [_mc("q?")])
    mixer.apply([0.2, 0.3, 0.5])
    assert len(calls) == after_load


def test_expert_metadata_files(tmp_path):
    from peft_spectral.transformer2.library import read_expert_metadata

    (tmp_path / "expert.json").write_text(json.dumps({"task": "arithmetic/2_digit", "description": "Sums.\n Big."}))
    assert read_expert_metadata(tmp_path) == {"name": "arithmetic_2_digit", "description": "Sums. Big."}
    # expert.json wins over an older version's file; the old file alone is still read, with a deprecation warning
    (tmp_path / "transformer2_expert.json").write_text(json.dumps({"name": "math", "description": "d"}))
    assert read_expert_metadata(tmp_path)["name"] == "arithmetic_2_digit"
    (tmp_path / "expert.json").unlink()
    with pytest.warns(FutureWarning, match="transformer2_expert.json is the metadata file of an older version"):
        assert read_expert_metadata(tmp_path) == {"name": "math", "description": "d"}


def test_find_experts_reads_one_level_below_the_library(tmp_path, caplog):
    from peft_spectral.transformer2 import SavedExpert, expert_name, find_experts

    assert expert_name("arithmetic/2_digit addition") == "arithmetic_2_digit_addition"
    assert find_experts(tmp_path / "missing") == []
    for task in ("navigate", "arithmetic/2_digit_addition"):
        folder = tmp_path / expert_name(task)
        folder.mkdir()
        (folder / "adapter_config.json").write_text("{}")
        (folder / "expert.json").write_text(json.dumps({"task": task, "description": "d"}))
    (tmp_path / "notes").mkdir()  # an expert.json without an adapter is not an expert
    (tmp_path / "notes" / "expert.json").write_text(json.dumps({"task": "old"}))
    (tmp_path / "navigate" / "deeper").mkdir()  # nor is anything deeper than one level
    (tmp_path / "navigate" / "deeper" / "adapter_config.json").write_text("{}")
    (tmp_path / "navigate" / "deeper" / "expert.json").write_text(json.dumps({"task": "deeper"}))
    with caplog.at_level(logging.WARNING):
        found = find_experts(tmp_path)
    assert found == [
        SavedExpert(
            "arithmetic/2_digit_addition",
            tmp_path / "arithmetic_2_digit_addition",
            {"task": "arithmetic/2_digit_addition", "description": "d"},
        ),
        SavedExpert("navigate", tmp_path / "navigate", {"task": "navigate", "description": "d"}),
    ]
    task, path, meta = found[1]  # unpacks as a tuple
    assert (task, path.name, meta["description"]) == ("navigate", "navigate", "d")
    assert "notes has an expert.json but no adapter_config.json" in caplog.text
    (tmp_path / "navigate" / "expert.json").write_text(json.dumps({"description": "no task"}))
    with pytest.raises(ExpertLibraryError, match="names no 'task'"):
        find_experts(tmp_path)
    (tmp_path / "navigate" / "expert.json").write_text("{not json")
    with pytest.raises(ExpertLibraryError, match="is not valid JSON"):
        find_experts(tmp_path)


def test_library_bad_inputs(expert_dirs, tmp_path):
    tok = build_tiny_tokenizer()
    with pytest.raises(ExpertLibraryError, match="empty"):
        ExpertLibrary.load(build_tiny_llama(tok), tok, [])
    with pytest.raises(ExpertLibraryError, match="unique"):
        ExpertLibrary.load(build_tiny_llama(tok), tok, expert_dirs[:2], names=["a", "a"])
    with pytest.raises(ExpertLibraryError, match="reserved"):
        ExpertLibrary.load(build_tiny_llama(tok), tok, expert_dirs[:1], names=["others"])
    with pytest.raises(ExpertLibraryError, match="names"):
        ExpertLibrary.load(build_tiny_llama(tok), tok, expert_dirs[:2], names=["a"])
    # different base model, named in the error
    other = save_svf_expert(tmp_path / "foreign", 9, tmp_path / "svd", base_name="another-model")
    with pytest.raises(
        ExpertLibraryError, match=r"different base models.*'arith'.*tiny-llama.*'foreign'.*another-model"
    ):
        ExpertLibrary.load(build_tiny_llama(tok), tok, [expert_dirs[0], other], names=["arith", "foreign"])
    # different target modules, named in the error
    attn = save_svf_expert(tmp_path / "attn", 9, tmp_path / "svd", targets=["q_proj", "v_proj"])
    with pytest.raises(ExpertLibraryError, match=r"different target modules.*'arith'.*'attn'"):
        ExpertLibrary.load(build_tiny_llama(tok), tok, [expert_dirs[0], attn], names=["arith", "attn"])
    with pytest.raises(AdapterLoadError):
        ExpertLibrary.load(build_tiny_llama(tok), tok, [tmp_path / "missing"])


def test_resolve_unknown_name_falls_back_to_base_and_logs(library, caplog):
    lib, _ = library
    with caplog.at_level(logging.WARNING):
        assert lib.resolve("no_such_expert") is None
    assert "no_such_expert" in caplog.text
    assert lib.resolve("OTHERS") is None and lib.resolve(None) is None
    assert lib.resolve("Logic") == "logic"


# --------------------------------------------------------------------------------------------- dispatch


def test_parse_category():
    names = ["arith", "logic", "facts"]
    assert parse_category("logic", names) == "logic"
    assert parse_category("Category: Arith.", names) == "arith"
    assert parse_category("'facts'", names) == "facts"
    assert parse_category("others", names) == OTHERS
    assert parse_category("I think it is logic, not arith", names) == "logic"
    assert parse_category("logical", names) is None  # whole words only
    assert parse_category("%%% garbage", names) is None
    assert parse_category("", names) is None


def test_others_and_garbage_dispatch_to_bit_identical_base(library, caplog):
    lib, reference = library
    prompts = ["What is 2+2?", "Is every cat a cat?", "Capital of France?", "Sing a song."]
    answers = ["others", "%%% garbage", None, "unknown_expert"]
    with caplog.at_level(logging.WARNING):
        result = two_pass_generate(lib, lambda _lib, exs: answers, prompts, max_new_tokens=6, batch_size=4)
    assert result.choices == [None] * 4
    assert result.groups == {"base": [0, 1, 2, 3]}
    assert "unknown_expert" in caplog.text
    tok = lib.tokenizer
    expected = generate_answers(
        reference, tok, [Example(prompt=p, target="") for p in prompts], max_new_tokens=6, batch_size=4
    )
    assert result.outputs == expected
    with lib.use(None):
        assert torch.equal(_logits(lib.model, tok, prompts[0]), _logits(reference, tok, prompts[0]))
    # an expert really changes the model, and after the call the model is back to its active adapter
    with lib.use("arith"):
        assert not torch.equal(_logits(lib.model, tok, prompts[0]), _logits(reference, tok, prompts[0]))
    assert lib.model.active_adapter == "arith"


def test_prompt_dispatch_generate_mode_garbage_means_base(library):
    lib, _reference = library
    dispatcher = PromptDispatcher(None, mode="generate", max_new_tokens=4)
    choices = dispatcher(lib, [Example(prompt="What is 2+2?", target="")])
    # a random tiny model answers garbage; whatever it says must be a category or None (base)
    assert choices[0] in lib.names + [OTHERS, None]
    assert len(dispatcher.last_answers) == 1


def test_prompt_dispatch_loglik_picks_most_likely_category(library):
    lib, _ = library
    dispatcher = PromptDispatcher(
        None, mode="loglik", prompt=DispatchPrompt(max_question_tokens=16), label_tokens="full"
    )
    exs = [Example(prompt=f"Question number {i}: what is {i} + {i}?", target="") for i in range(5)]
    choices = dispatcher(lib, exs)
    assert all(c in lib.names + [OTHERS] for c in choices)
    # same answer as scoring the category questions in full, one by one, with the base model
    questions = dispatcher.category_examples(lib, exs)
    with lib.use(None):
        ref = option_logliks(lib.model, lib.tokenizer, questions)
    cats = questions[0].choices
    assert choices == [cats[max(range(len(r)), key=r.__getitem__)] for r in ref]
    # the shared instruction prefix is cached and reused on the next call
    assert len(dispatcher._prefix) == 1
    assert dispatcher(lib, exs) == choices and len(dispatcher._prefix) == 1


def test_distinct_label_prefixes(library):
    from peft_spectral.transformer2.dispatch import distinct_prefixes

    assert distinct_prefixes([[5, 1], [6, 2, 3], [6, 4]]) == [[5], [6, 2], [6, 4]]
    assert distinct_prefixes([[1, 2], [1, 2, 3]]) == [[1, 2], [1, 2, 3]]
    lib, _ = library
    exs = [Example(prompt=f"Question {i}?", target="") for i in range(3)]
    fast = PromptDispatcher(None, label_tokens="distinct")(lib, exs)
    assert all(c in lib.names + [OTHERS] for c in fast)
    with pytest.raises(ValueError, match="label_tokens"):
        PromptDispatcher(None, label_tokens="some")


def test_dispatch_prompt_truncates_question():
    tok = build_tiny_tokenizer()
    text = DispatchPrompt(max_question_tokens=5).render(tok, ["a"], ["desc"], "abcdefghij")
    assert text.endswith("Question:\nabcde") and "- a: desc" in text and f"- {OTHERS}:" in text


# --------------------------------------------------------------------------------------------- two passes


def test_grouping_by_expert_matches_one_prompt_at_a_time(library):
    lib, _ = library
    prompts = [f"Prompt {c}: hi" for c in "ABCDEF"]  # same length: no padding differences
    route = dict(zip(prompts, ["arith", "logic", None, "arith", "facts", "logic"]))
    dispatcher = lambda _lib, exs: [route[e.prompt] for e in exs]  # noqa: E731
    grouped = two_pass_generate(lib, dispatcher, prompts, max_new_tokens=5, batch_size=8)
    single = [two_pass_generate(lib, dispatcher, [p], max_new_tokens=5).outputs[0] for p in prompts]
    assert grouped.outputs == single
    assert grouped.groups == {"arith": [0, 3], "logic": [1, 5], "base": [2], "facts": [4]}
    assert grouped.pass1_seconds >= 0 and grouped.pass2_seconds > 0 and grouped.switch_seconds >= 0
    assert len(set(grouped.outputs)) > 1  # the experts do differ

    exs = [_mc(f"Prompt {c}: ok?", i % 3) for i, c in enumerate("ABCDEF")]
    route2 = {e.prompt: r for e, r in zip(exs, route.values())}
    disp2 = lambda _lib, xs: [route2[e.prompt] for e in xs]  # noqa: E731
    res = two_pass_evaluate(lib, disp2, exs)
    one = [two_pass_evaluate(lib, disp2, [e]) for e in exs]
    assert res.correct == [o.correct[0] for o in one]
    assert res.outputs == [o.outputs[0] for o in one]


def test_fixed_dispatcher_runs_every_prompt_on_one_adapter(library):
    lib, _ = library
    exs = [_mc(f"Prompt {c}: ok?", i % 3) for i, c in enumerate("ABCD")]
    res = two_pass_evaluate(lib, FixedDispatcher("logic"), exs)
    assert set(res.groups) == {"logic"} and len(res.groups["logic"]) == len(exs)
    with lib.use("logic"):
        expected = score_examples(lib.model, lib.tokenizer, exs).argmax()
    assert res.correct == [p == e.label for p, e in zip(expected, exs)]
    base = two_pass_evaluate(lib, FixedDispatcher(None), exs)
    assert set(base.groups) == {"base"}


def test_fast_option_scoring_matches_evaluation(library):
    lib, _ = library
    exs = [
        Example(prompt="Shared intro. " + "x" * i + "?", target="A", choices=("A", "bb b", "ccc"), label=0)
        for i in range(6)
    ]
    with lib.use("logic"):
        ref = torch.tensor(option_logliks(lib.model, lib.tokenizer, exs))
        got = torch.tensor(score_examples(lib.model, lib.tokenizer, exs, batch_size=4).sums)
    assert torch.allclose(ref, got, atol=1e-4)


# --------------------------------------------------------------------------------------------- CEM


def test_cem_finds_known_optimum_and_is_seeded():
    target = torch.tensor([0.2, 0.9, 0.5], dtype=torch.float64)
    fitness = lambda a: -float(((a - target) ** 2).sum())  # noqa: E731
    config = CEMConfig(population=32, generations=30, seed=3, progress=False)
    result = cross_entropy_method(fitness, 3, config)
    assert torch.allclose(result.best_alpha, target, atol=0.05)
    assert len(result.history) == 30 and result.evaluations == 30 * 32
    curve = result.fitness_curve
    assert all(b >= a for a, b in itertools.pairwise(curve))  # best so far never drops
    again = cross_entropy_method(fitness, 3, config)
    assert torch.equal(again.best_alpha, result.best_alpha)
    # clamping: an optimum outside [0, 1] is found on the boundary
    out = cross_entropy_method(
        lambda a: -float(((a - 2) ** 2).sum()), (2, 3), CEMConfig(population=16, generations=20, progress=False)
    )
    assert out.best_alpha.shape == (2, 3) and float(out.best_alpha.max()) <= 1.0 and float(out.best_alpha.min()) > 0.8


def test_cem_tie_break_on_second_component():
    # accuracy is flat (ties everywhere); the second component decides
    result = cross_entropy_method(
        lambda a: (0.5, -abs(float(a[0]) - 0.7)), 1, CEMConfig(population=20, generations=15, progress=False)
    )
    assert abs(float(result.best_alpha[0]) - 0.7) < 0.05
    with pytest.raises(ValueError, match="population"):
        CEMConfig(population=1)
    with pytest.raises(ValueError, match="elite_fraction"):
        CEMConfig(elite_fraction=0)


def test_per_layer_alpha_changes_only_named_layers(library):
    lib, _ = library
    mixer = FewShotMixer(lib, [_mc("q?")], per_layer=True)
    assert mixer.alpha_shape == (3, 2)
    alpha = torch.tensor([[0.2, 0.2], [0.3, 0.3], [0.5, 0.5]])
    mixer.apply(alpha)
    before = svf_z_snapshot(lib.model, mixer.adapter_name)
    alpha2 = alpha.clone()
    alpha2[:, 1] = torch.tensor([1.0, 0.0, 0.0])
    mixer.apply(alpha2)
    after = svf_z_snapshot(lib.model, mixer.adapter_name)
    for name in before:
        if ".layers.0." in name:
            assert torch.equal(before[name], after[name]), name
        else:
            assert not torch.equal(before[name], after[name]), name
            arith = lib.model.base_model.model.get_submodule(name).svf_z["arith"]
            assert torch.allclose(after[name], arith)
    # same z as the SVF tuner's own combine_svf_adapters
    peft_spectral.combine_svf_adapters(lib.model, lib.names, alpha2, "combined")
    combined = svf_z_snapshot(lib.model, "combined")
    assert all(torch.allclose(combined[n], after[n], atol=1e-6) for n in after)


def test_few_shot_search_and_saved_mixture_reloads_identically(library, tmp_path):
    lib, _ = library
    shots = [_mc(f"Shot {i}: is {i} even?", i % 2) for i in range(4)]
    mixer = FewShotMixer(lib, shots)
    result = mixer.search(CEMConfig(population=4, generations=2, seed=0, progress=False))
    assert result.best_alpha.shape == (3,) and len(result.fitness_curve) == 2
    assert 0.0 <= result.best_fitness[0] <= 1.0 and result.best_fitness[1] < 0
    assert mixer.fitness(result.best_alpha) == result.best_fitness  # deterministic fitness
    out = mixer.save(tmp_path / "mix", result=result)
    meta = json.loads((out / "transformer2_mixture.json").read_text())
    assert meta["alpha"] == result.best_alpha.tolist() and len(meta["search"]["history"]) == 2
    tok = lib.tokenizer
    with lib.use(mixer.adapter_name):
        expected = _logits(lib.model, tok, "Shot 9: is 9 even?")
    base = build_tiny_llama(build_tiny_tokenizer())
    reloaded = PeftModel.from_pretrained(base, str(out))
    assert torch.equal(_logits(reloaded, tok, "Shot 9: is 9 even?"), expected)


def test_few_shot_bad_inputs(library, tmp_path):
    lib, _ = library
    with pytest.raises(ValueError, match="empty"):
        FewShotMixer(lib, [])
    with pytest.raises(ValueError, match="no valid label"):
        FewShotMixer(lib, [Example(prompt="q", target="", choices=("a", "b"), label=None)])
    with pytest.raises(ValueError, match="no target"):
        FewShotMixer(lib, [Example(prompt="q", target="")], kind="generation")
    with pytest.raises(ValueError, match="unknown expert"):
        FewShotMixer(lib, [_mc("q")], experts=["nope"])
    mixer = FewShotMixer(lib, [_mc("q")])
    with pytest.raises(ValueError, match="shape"):
        mixer.apply([0.5, 0.5])
    bad = tmp_path / "shots.jsonl"
    bad.write_text('{"prompt": "q", "choices": ["a", "b"]}\n')
    with pytest.raises(ValueError, match=r"shots\.jsonl:1.*label"):
        load_shots(bad)
    bad.write_text("\n")
    with pytest.raises(ValueError, match="holds no records"):
        load_shots(bad)
    good = tmp_path / "good.jsonl"
    good.write_text('{"input": "q", "options": ["a", "b"], "target": "b"}\n{"prompt": "2+2", "target": "4"}\n')
    a, b = load_shots(good)
    assert a.label == 1 and a.choices == ("a", "b") and b.target == "4" and not b.choices


def test_push_mixture_to_hub_uploads_folder(monkeypatch, tmp_path):
    import huggingface_hub

    calls = {}

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls["create"] = repo_id

        def upload_folder(self, folder_path, repo_id, **kw):
            calls["upload"] = (folder_path, repo_id)
            return "https://hub/commit/1"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    from peft_spectral.transformer2 import push_mixture_to_hub

    assert push_mixture_to_hub(tmp_path, "me/mix") == "https://hub/commit/1"
    assert calls == {"create": "me/mix", "upload": (str(tmp_path), "me/mix")}


# --------------------------------------------------------------------------------------------- classifier


def test_classifier_examples_and_training(library, tmp_path):
    lib, _ = library
    data = {
        "arith": [Example(prompt=f"What is {i} + {i}?", target=str(2 * i)) for i in range(4)],
        "logic": [Example(prompt=f"If A then B. A{i}. B?", target="yes") for i in range(4)],
    }
    others = [Example(prompt=f"Tell a story {i}", target="ok") for i in range(2)]
    exs = build_classifier_examples(lib, data, others=others, per_category=3, seed=0)
    assert len(exs) == 3 + 3 + 2
    labels = {e.target for e in exs}
    assert labels == {"arith", "logic", OTHERS}
    assert all(e.choices == ("arith", "logic", "facts", OTHERS) and e.choices[e.label] == e.target for e in exs)
    with pytest.raises(ValueError, match="unknown expert"):
        build_classifier_examples(lib, {"nope": data["arith"]})

    from peft_spectral.transformer2 import train_classifier_expert

    out = train_classifier_expert(lib, exs, tmp_path / "clf", steps=2, batch_size=4, learning_rate=0.05)
    assert (out / "adapter_config.json").is_file()
    meta = json.loads((out / "transformer2_classifier.json").read_text())
    assert meta["trained_with"] == "peft_spectral.training"
    name = lib.load_extra_adapter(out, "clf", "classifier")
    z = svf_z_snapshot(lib.model, name)
    assert any(not torch.allclose(v, torch.ones_like(v)) for v in z.values())  # it trained
    choices = PromptDispatcher(name)(lib, [Example(prompt="What is 3 + 3?", target="")])
    assert choices[0] in lib.names + [OTHERS]
    assert lib.model.active_adapter == "arith"  # pass 1 left the active adapter alone
