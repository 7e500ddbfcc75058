"""Tests of prompt formatting, log-likelihood scoring, generation and evaluate() with tiny random models."""

from __future__ import annotations

import pytest
import torch

from peft_spectral import evaluation as E
from peft_spectral.tasks import Example


MC = [
    Example("What is 2+2?", "4", ("3", "4", "five"), 1),
    Example("Pick the animal among these longer words", "cat", ("dog food", "cat"), 1),
    Example("Yes or no?", "no", ("yes", "no"), 1),
]
GEN = [
    Example("Say hi", "hi"),
    Example("What is 3 plus 4?", "7"),
    Example("A much longer prompt, to force padding!", "ok"),
]


def manual_logprob(model, tokenizer, prompt_text, answer, add_special_tokens=False):
    """Sum and per-token log p(answer | prompt), from one unpadded forward pass."""
    ctx = tokenizer(prompt_text, add_special_tokens=add_special_tokens).input_ids
    ans = tokenizer(answer, add_special_tokens=False).input_ids
    ids = torch.tensor([ctx + ans])
    logits = model(ids).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    per_token = torch.stack([logp[len(ctx) + k - 1, t] for k, t in enumerate(ans)])
    return per_token


def test_format_prompt_chat_and_plain(tiny_llama):
    _, tok = tiny_llama
    ex = Example("Hello?", "x")
    assert E.format_prompt(tok, ex) == "<|im_start|>user\nHello?<|im_end|>\n<|im_start|>assistant\n"
    assert E.format_prompt(tok, ex, chat=False) == "Hello?\n"
    assert E.format_prompt(tok, "Hi  ") == E.format_prompt(tok, Example("Hi  ", ""))
    tok.chat_template = None
    assert E.format_prompt(tok, ex) == "Hello?\n"
    with pytest.raises(ValueError, match="chat template"):
        E.format_prompt(tok, ex, chat=True)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_option_logliks_match_manual(fixture, request):
    model, tok = request.getfixturevalue(fixture)
    got = E.option_logliks(model, tok, MC, batch_size=3)
    with torch.no_grad():
        for ex, row in zip(MC, got):
            prompt = E.format_prompt(tok, ex)
            expected = [float(manual_logprob(model, tok, prompt, c).sum()) for c in ex.choices]
            assert row == pytest.approx(expected, abs=1e-4)
    flat = [v for row in got for v in row]
    assert [v for row in E.option_logliks(model, tok, MC, batch_size=1) for v in row] == pytest.approx(flat, abs=1e-4)


def test_answer_logliks_and_nll_match_manual(tiny_llama):
    model, tok = tiny_llama
    with torch.no_grad():
        per_ex = [manual_logprob(model, tok, E.format_prompt(tok, ex), ex.target) for ex in GEN]
    means = E.answer_logliks(model, tok, GEN, batch_size=2)
    assert means.shape == (3,) and not means.requires_grad
    assert means.tolist() == pytest.approx([float(p.mean()) for p in per_ex], abs=1e-4)

    model.train()
    nll = E.answer_nll(model, tok, GEN)
    assert nll.requires_grad and nll.dim() == 0 and model.training
    assert float(nll.detach()) == pytest.approx(float(-torch.cat(per_ex).mean()), abs=1e-4)
    nll.backward()
    assert model.model.embed_tokens.weight.grad is not None
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_plain_prompt_gets_special_tokens(tiny_llama):
    model, tok = tiny_llama
    tok.chat_template = None
    tok.add_bos_token = True
    # without a chat template the prompt is encoded with the tokenizer's special tokens (add_special_tokens=True)
    with torch.no_grad():
        expected = manual_logprob(model, tok, "Say hi\n", "hi", add_special_tokens=True).mean()
    assert float(E.answer_logliks(model, tok, GEN[:1])[0]) == pytest.approx(float(expected), abs=1e-4)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_generate_batched_equals_one_by_one(fixture, request):
    model, tok = request.getfixturevalue(fixture)
    batched = E.generate_answers(model, tok, GEN, max_new_tokens=6, batch_size=3)
    single = [E.generate_answers(model, tok, [ex], max_new_tokens=6, batch_size=1)[0] for ex in GEN]
    assert batched == single
    assert any(batched)  # the random model says something, so the comparison is not vacuous
    # the continuation only: a greedy manual decode of the first prompt gives the same text
    ids = torch.tensor([tok(E.format_prompt(tok, GEN[0]), add_special_tokens=False).input_ids])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, ids.shape[1] :].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    assert batched[0] == tok.decode(new, skip_special_tokens=True).strip()


def test_evaluate_loglik_restores_mode_and_agrees_with_option_logliks(tiny_llama):
    model, tok = tiny_llama
    model.train()
    result = E.evaluate(model, tok, MC, kind="multiple_choice", batch_size=2)
    assert model.training  # mode restored
    scores = E.option_logliks(model, tok, MC)
    expected = [max(range(len(s)), key=s.__getitem__) == ex.label for s, ex in zip(scores, MC)]
    assert result.correct == expected and result.n == 3
    assert result.accuracy == pytest.approx(sum(expected) / 3)
    assert result.mean_loglik == pytest.approx(float(E.answer_logliks(model, tok, MC).mean()), abs=1e-4)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_evaluate_shared_prompt_scoring_equals_per_sequence_scoring(fixture, request, monkeypatch):
    model, tok = request.getfixturevalue(fixture)
    examples = MC + [
        Example(
            "Which colour is the sky on a clear day, friend?",
            "light blue",
            ("deep red", "light blue", "a rather dark green"),
            1,
        )
    ]
    slow = E.evaluate(model, tok, examples, kind="multiple_choice", batch_size=2, shared_prompt_scoring=False)

    def refuse(*args, **kwargs):
        raise AssertionError("the per-sequence path must not run")

    monkeypatch.setattr(E, "_option_logprobs", refuse)
    fast = E.evaluate(model, tok, examples, kind="multiple_choice", batch_size=2)
    assert fast.correct == slow.correct and fast.n == slow.n == 4
    assert fast.mean_loglik == pytest.approx(slow.mean_loglik, abs=1e-4)


def test_evaluate_falls_back_when_the_model_cannot_take_a_cache(tiny_llama, caplog):
    model, tok = tiny_llama

    class NoCacheLM(torch.nn.Module):  # a forward that takes only input_ids/attention_mask
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    wrapped = NoCacheLM(model)
    expected = E.evaluate(model, tok, MC, kind="multiple_choice", shared_prompt_scoring=False)
    with caplog.at_level("WARNING", logger="peft_spectral.evaluation"):
        got = E.evaluate(wrapped, tok, MC, kind="multiple_choice")
    assert got.correct == expected.correct
    assert got.mean_loglik == pytest.approx(expected.mean_loglik, abs=1e-5)
    assert "NoCacheLM" in caplog.text


def test_evaluate_generate_uses_score_prediction(tiny_llama, monkeypatch):
    model, tok = tiny_llama
    answers = {"Say hi": "Hi!", "What is 3 plus 4?": "3 plus 4 is 7.", "A much longer prompt, to force padding!": "no"}
    monkeypatch.setattr(E, "generate_answers", lambda m, t, exs, **kw: [answers.get(e.prompt, "(B)") for e in exs])
    result = E.evaluate(model, tok, GEN, kind="generation")
    assert result.correct == [True, True, False] and result.accuracy == pytest.approx(2 / 3)
    mc = E.evaluate(model, tok, MC, kind="multiple_choice", mode="generate", progress=True)
    assert mc.correct == [True, True, True] and isinstance(mc.mean_loglik, float)


def test_evaluate_argument_errors_and_empty(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(ValueError, match="kind"):
        E.evaluate(model, tok, GEN, kind="qa")
    with pytest.raises(ValueError, match="mode"):
        E.evaluate(model, tok, GEN, kind="generation", mode="beam")
    with pytest.raises(ValueError, match="loglik"):
        E.evaluate(model, tok, GEN, kind="generation", mode="loglik")
    with pytest.raises(ValueError, match="choices"):
        E.option_logliks(model, tok, GEN)
    assert E.evaluate(model, tok, [], kind="generation") == E.EvalResult(0.0, 0.0, 0, [])


def test_score_prediction():
    mc = Example("Q\n\nOptions:\nA. red\nB. blue", "blue", ("red", "blue"), 1)
    assert E.score_prediction("multiple_choice", "B", mc)
    assert E.score_prediction("multiple_choice", "The answer is (B).", mc)
    assert E.score_prediction("multiple_choice", "blue", mc)
    assert not E.score_prediction("multiple_choice", "A. red", mc)
    gen = Example("What is 12 times 100?", "1200", meta={"targets": ["1200", "twelve hundred"]})
    assert E.score_prediction("generation", "1,200", gen)
    assert E.score_prediction("generation", "The answer is 1200.", gen)
    assert E.score_prediction("generation", "Twelve hundred", gen)
    assert not E.score_prediction("generation", "1201", gen)
    text = Example("Capital of France?", "Paris")
    assert E.score_prediction("generation", "paris.\nMore text", text)
    assert not E.score_prediction("generation", "Lyon", text)
    with pytest.raises(ValueError, match="kind"):
        E.score_prediction("essay", "x", text)
