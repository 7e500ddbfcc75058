"""Scoring a causal LM on [`~peft_spectral.data.Example`]s: prompt formatting, log-likelihoods, greedy generation.

Every pipeline (SVF training, Transformer² dispatch, SpectralCompress search, CoreIsolation) calls these functions,
so their signatures are a contract:

- [`format_prompt`] turns an example into the text the model sees (chat template when the tokenizer has one).
- [`option_logliks`], [`answer_logliks`] and [`answer_nll`] score answer texts given the prompt. The answer tokens
  are the tokenizer's encoding of the answer text alone (no special tokens), appended to the encoded prompt, so the
  prompt/answer boundary is always a token boundary.
- [`generate_answers`] decodes greedily with left padding.
- [`evaluate`] runs a whole split and returns an [`EvalResult`]; [`score_prediction`] judges one prediction with the
  example's own scorer ([`peft_spectral.data.scoring.scorer_for`]), strictly or leniently
  ([`peft_spectral.data.answers`]).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch

from .data.answers import Extraction, check_extraction
from .data.scoring import is_correct
from .data.types import Example, check_kind
from .model_utils import eval_mode, model_device, pad_token_id, progress_bar
from .option_scoring import multiple_choice_metrics, score_examples
from .prompting import encode_answer, encode_prompt, format_prompt
from .tuners.svf.composed import later_decoding_steps


__all__ = [
    "EvalResult",
    "answer_logliks",
    "answer_nll",
    "evaluate",
    "format_prompt",
    "generate_answers",
    "option_logliks",
    "pass_at_k",
    "rescore",
    "sample_answers",
    "score_prediction",
]

logger = logging.getLogger(__name__)

_MODES = ("auto", "loglik", "generate")


# --------------------------------------------------------------------------------------------------------------------
# Log-likelihoods
# --------------------------------------------------------------------------------------------------------------------


def _continuation_logprobs(model, pairs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> list[torch.Tensor]:
    """Per-token log-probabilities of each continuation given its context, for one right-padded batch.

    Args:
        pairs: `(context_ids, continuation_ids)` pairs; the context must be non-empty.

    Returns:
        One 1-D tensor per pair (length of the continuation), differentiable if grad is enabled.
    """
    device = model_device(model)
    lengths = [len(c) + len(a) for c, a in pairs]
    width = max(lengths)
    input_ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for row, (context, answer) in enumerate(pairs):
        if not context:
            raise ValueError("the prompt encodes to zero tokens; cannot score an answer without context")
        ids = context + answer
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
    out = []
    for row, (context, answer) in enumerate(pairs):
        start, end = len(context), len(context) + len(answer)
        step_logits = logits[row, start - 1 : end - 1].float()
        targets = torch.tensor(answer, device=step_logits.device)
        logp = torch.log_softmax(step_logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
        out.append(logp)
    return out


def _batched_logprobs(
    model, tokenizer, pairs: list[tuple[list[int], list[int]]], batch_size: int, progress: bool = False
) -> list[torch.Tensor]:
    """[`_continuation_logprobs`] over many pairs, batched by similar length, returned in input order (no grad)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pad_id = pad_token_id(tokenizer, model)
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    results: list[torch.Tensor | None] = [None] * len(pairs)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    with eval_mode(model), torch.no_grad():
        for batch in progress_bar(batches, len(batches), progress, "scoring"):
            for idx, logp in zip(batch, _continuation_logprobs(model, [pairs[i] for i in batch], pad_id)):
                results[idx] = logp.detach().cpu()
    return results  # type: ignore[return-value]


def _option_pairs(tokenizer, examples: Sequence[Example]) -> tuple[list[tuple[list[int], list[int]]], list[int]]:
    pairs, counts = [], []
    for i, example in enumerate(examples):
        if not example.choices:
            raise ValueError(f"examples[{i}] has no choices; option_logliks needs multiple-choice examples")
        context = encode_prompt(tokenizer, example)
        for choice in example.choices:
            pairs.append((context, encode_answer(tokenizer, choice)))
        counts.append(len(example.choices))
    return pairs, counts


def _option_logprobs(model, tokenizer, examples, batch_size, progress=False) -> list[list[torch.Tensor]]:
    pairs, counts = _option_pairs(tokenizer, examples)
    flat = _batched_logprobs(model, tokenizer, pairs, batch_size, progress)
    grouped, pos = [], 0
    for count in counts:
        grouped.append(flat[pos : pos + count])
        pos += count
    return grouped


def option_logliks(model, tokenizer, examples: Sequence[Example], *, batch_size: int = 8) -> list[list[float]]:
    """Sum of log p(option | prompt) over the option's tokens, for every option of every example.

    Args:
        model: A causal LM (a `PreTrainedModel` or a `PeftModel`).
        tokenizer: Its tokenizer.
        examples (`Sequence[Example]`): Multiple-choice examples (non-empty `choices`).
        batch_size (`int`, defaults to 8): Number of (prompt, option) sequences per forward pass.

    Returns:
        `list[list[float]]`: `result[i][j]` is the log-likelihood of `examples[i].choices[j]`.
    """
    return [
        [float(lp.sum()) for lp in options] for options in _option_logprobs(model, tokenizer, examples, batch_size)
    ]


def _target_pairs(tokenizer, examples: Sequence[Example]) -> list[tuple[list[int], list[int]]]:
    return [(encode_prompt(tokenizer, ex), encode_answer(tokenizer, ex.target)) for ex in examples]


def answer_logliks(model, tokenizer, examples: Sequence[Example], *, batch_size: int = 8) -> torch.Tensor:
    """Mean per-token log p(target | prompt) of each example's gold `target` (no gradient).

    An example whose target encodes to no token (an empty answer) gets NaN (`nanmean` skips it).

    Returns:
        `torch.Tensor`: Shape `(len(examples),)`, float32, on CPU.
    """
    if not examples:
        return torch.zeros(0)
    scored = [i for i, ex in enumerate(examples) if tokenizer(ex.target, add_special_tokens=False)["input_ids"]]
    out = torch.full((len(examples),), float("nan"))
    if scored:
        pairs = _target_pairs(tokenizer, [examples[i] for i in scored])
        logps = _batched_logprobs(model, tokenizer, pairs, batch_size)
        out[scored] = torch.stack([lp.mean() for lp in logps])
    return out


def answer_nll(model, tokenizer, examples: Sequence[Example]) -> torch.Tensor:
    """Differentiable mean negative log-likelihood of the gold target tokens given the prompt.

    All examples go through one forward pass (the caller picks the batch size). The mean is over all target tokens
    of all examples. The model's train/eval mode is left as found, and gradients flow as usual.

    Returns:
        `torch.Tensor`: A scalar on the model's device.
    """
    if not examples:
        raise ValueError("answer_nll needs at least one example")
    logps = _continuation_logprobs(model, _target_pairs(tokenizer, examples), pad_token_id(tokenizer, model))
    return -torch.cat(logps).mean()


# --------------------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------------------


def _eos_ids(model, tokenizer) -> list[int]:
    ids: list[int] = []
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(model.generation_config, "eos_token_id", None)):
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int) and v not in ids:
                ids.append(v)
    return ids


def _generate(
    model, tokenizer, examples: Sequence[Example], gen_config, batch_size: int, progress: bool
) -> list[list[str]]:
    """`gen_config.num_return_sequences` completions of each example's formatted prompt (left-padded batches of similar length)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    samples = gen_config.num_return_sequences or 1
    pad_id = gen_config.pad_token_id
    eos = list(gen_config.eos_token_id or [])
    encoded = [encode_prompt(tokenizer, ex) for ex in examples]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    device = model_device(model)
    answers: list[list[str]] = [[] for _ in examples]
    with eval_mode(model), torch.no_grad():
        for number, batch in enumerate(progress_bar(batches, len(batches), progress, "generating")):
            # the decoding steps of the batches still to come count toward composing SVF weights in this one
            later = later_decoding_steps(model, (len(batches) - 1 - number) * max(gen_config.max_new_tokens - 1, 0))
            width = max(len(encoded[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, idx in enumerate(batch):
                ids = encoded[idx]
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention_mask[row, width - len(ids) :] = 1
            with later:
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    generation_config=gen_config,
                )
            for row, idx in enumerate(batch):
                for k in range(samples):
                    new_tokens = output[row * samples + k, width:].tolist()
                    cut = next((j for j, t in enumerate(new_tokens) if t in eos), len(new_tokens))
                    answers[idx].append(tokenizer.decode(new_tokens[:cut], skip_special_tokens=True).strip())
    return answers


def _generation_config(model, tokenizer, max_new_tokens: int, **sampling):
    from transformers import GenerationConfig

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        num_beams=1,
        pad_token_id=pad_token_id(tokenizer, model),
        eos_token_id=_eos_ids(model, tokenizer) or None,
        **sampling,
    )


def generate_answers(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    progress: bool = False,
) -> list[str]:
    """Greedy completions of each example's formatted prompt.

    Prompts are left-padded and batched by similar length; only the generated continuation is decoded (special
    tokens skipped, surrounding whitespace stripped).

    Returns:
        `list[str]`: One answer per example, in input order.
    """
    gen_config = _generation_config(model, tokenizer, max_new_tokens, do_sample=False)
    return [a[0] for a in _generate(model, tokenizer, examples, gen_config, batch_size, progress)]


def sample_answers(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    num_samples: int = 8,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 32,
    batch_size: int = 4,
    seed: Optional[int] = 0,
    progress: bool = False,
) -> list[list[str]]:
    """`num_samples` sampled completions of each example (for pass@k), `temperature` / `top_p` sampling.

    Args:
        seed (`int`, *optional*): Seeds torch's generator first, so that a run repeats; `None` leaves it alone.

    Returns:
        `list[list[str]]`: The samples of each example, in input order.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if seed is not None:
        torch.manual_seed(seed)
    gen_config = _generation_config(
        model,
        tokenizer,
        max_new_tokens,
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        top_k=0,
        num_return_sequences=num_samples,
    )
    return _generate(model, tokenizer, examples, gen_config, batch_size, progress)


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """The unbiased pass@k estimate of Chen et al. (2021): `1 - C(n-c, k) / C(n, k)` for `c` correct of `n`."""
    if not 0 <= num_correct <= num_samples or not 1 <= k <= num_samples:
        raise ValueError(
            f"need 0 <= num_correct <= num_samples and 1 <= k <= num_samples, got {num_correct}, {num_samples}, {k}"
        )
    if num_samples - num_correct < k:
        return 1.0
    value = 1.0
    for i in range(num_samples - num_correct + 1, num_samples + 1):
        value *= 1.0 - k / i
    return 1.0 - value


# --------------------------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """The outcome of [`evaluate`].

    Args:
        accuracy (`float`): Fraction of examples judged correct (0.0 for an empty split).
        mean_loglik (`float`): Mean over examples of the mean per-token log-likelihood of the gold target (a smooth
            tie-breaker for searches).
        n (`int`): Number of examples.
        correct (`list[bool]`): Per-example verdicts, in input order.
        predictions (`list[str]`, *optional*): The generated answers (generation mode), kept so that another
            extraction mode can score them again ([`rescore`]).
        extraction (`str`, *optional*): The extraction mode the verdicts used (generation mode).
    """

    accuracy: float
    mean_loglik: float
    n: int
    correct: list[bool] = field(default_factory=list)
    predictions: list[str] | None = None
    extraction: str | None = None

    def ci(self, confidence: float = 0.95):
        """The accuracy with its Wilson interval ([`peft_spectral.stats.accuracy_ci`]); `str()` gives
        `0.620 [0.55, 0.69] (n=200)`."""
        from .stats import accuracy_ci

        return accuracy_ci(self._verdicts(), confidence)

    def compare(self, reference: EvalResult, **kwargs):
        """This result against `reference` on the same examples ([`peft_spectral.stats.compare_paired`]: Δ =
        this accuracy minus the reference's, paired bootstrap interval, exact McNemar p-value)."""
        from .stats import compare_paired

        return compare_paired(reference._verdicts(), self._verdicts(), **kwargs)

    def _verdicts(self) -> list[bool]:
        if len(self.correct) != self.n or self.n == 0:
            raise ValueError(
                f"this EvalResult has {len(self.correct)} per-example verdicts for n={self.n}: intervals and paired "
                "comparisons need them all"
            )
        return self.correct


def score_prediction(kind: str, prediction: str, example: Example, extraction: Extraction = "lenient") -> bool:
    """Whether `prediction` (a generated answer) is correct for `example`, judged by the example's scorer (the
    default scorer of `kind` when it carries none, see [`peft_spectral.data.scoring.scorer_for`]).

    Args:
        kind (`str`): The task kind: `"multiple_choice"`, `"generation"` or `"code"`.
        prediction (`str`): The model's text.
        example ([`Example`]): The example.
        extraction (`str`, defaults to `"lenient"`): `"strict"` (the bare answer) or `"lenient"` (the answer inside a
            sentence), see [`peft_spectral.data.answers`].
    """
    return is_correct(prediction, example, kind=check_kind(kind), extraction=extraction)


def rescore(result: EvalResult, examples: Sequence[Example], *, kind: str, extraction: Extraction) -> EvalResult:
    """`result` (from generated answers) scored again under another extraction mode, from its kept predictions: no
    generation is repeated."""
    if result.predictions is None or len(result.predictions) != len(examples):
        raise ValueError("rescore needs an EvalResult of generated answers (predictions) for the same examples")
    correct = [score_prediction(kind, p, ex, extraction) for p, ex in zip(result.predictions, examples)]
    return EvalResult(
        accuracy=sum(correct) / len(correct) if correct else 0.0,
        mean_loglik=result.mean_loglik,
        n=len(correct),
        correct=correct,
        predictions=list(result.predictions),
        extraction=extraction,
    )


def _resolve_mode(kind: str, mode: str) -> str:
    check_kind(kind)
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if mode == "auto":
        return "loglik" if kind == "multiple_choice" else "generate"
    if mode == "loglik" and kind != "multiple_choice":
        raise ValueError(f"mode='loglik' scores options and needs kind='multiple_choice', got kind={kind!r}")
    return mode


def evaluate(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    kind: str,
    mode: str = "auto",
    batch_size: int = 8,
    max_new_tokens: int = 32,
    progress: bool = False,
    shared_prompt_scoring: bool = True,
    extraction: Extraction = "lenient",
) -> EvalResult:
    """Accuracy and mean gold-answer log-likelihood of `model` on `examples`.

    Args:
        kind (`str`): `"multiple_choice"`, `"generation"` or `"code"` (usually `task.kind`).
        mode (`str`, defaults to `"auto"`): `"loglik"` picks the option with the highest summed log-likelihood
            (multiple choice only, the `"auto"` choice for it); `"generate"` decodes greedily and judges the text
            with [`score_prediction`] (the `"auto"` choice for generation and code).
        batch_size (`int`, defaults to 8): Sequences per forward pass / generate call.
        max_new_tokens (`int`, defaults to 32): Generation budget (code tasks typically need ~256-512).
        progress (`bool`, defaults to `False`): Show tqdm bars.
        shared_prompt_scoring (`bool`, defaults to `True`): In `"loglik"` mode, run each prompt once and score its
            options from the KV cache ([`peft_spectral.option_scoring`]); about twice as fast for two options and
            equal to scoring `prompt + option` sequences up to float rounding. Models whose forward does not take
            `position_ids`, a KV cache and `logits_to_keep` fall back to the per-sequence path (with a warning).
        extraction (`str`, defaults to `"lenient"`): In `"generate"` mode, how the answer is read from the text:
            `"lenient"` finds it inside a sentence, `"strict"` takes the text as the answer (see
            [`peft_spectral.data.answers`]); the other mode's accuracy is one [`rescore`] away.

    Returns:
        [`EvalResult`]
    """
    mode = _resolve_mode(kind, mode)
    check_extraction(extraction)
    examples = list(examples)
    if not examples:
        return EvalResult(accuracy=0.0, mean_loglik=0.0, n=0, correct=[])
    if mode == "loglik" and shared_prompt_scoring:
        fast = _shared_prompt_loglik(model, tokenizer, examples, batch_size, progress)
        if fast is not None:
            return fast
    if mode == "loglik":
        grouped = _option_logprobs(model, tokenizer, examples, batch_size, progress)
        correct, gold_means = [], []
        for example, options in zip(examples, grouped):
            sums = torch.stack([lp.sum() for lp in options])
            correct.append(int(sums.argmax()) == example.label)
            gold_means.append(float(options[example.label].mean()) if example.label is not None else float("nan"))
        mean_loglik = float(torch.tensor(gold_means).nanmean()) if gold_means else 0.0
    else:
        predictions = generate_answers(
            model, tokenizer, examples, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress
        )
        correct = [score_prediction(kind, p, ex, extraction) for p, ex in zip(predictions, examples)]
        mean_loglik = float(answer_logliks(model, tokenizer, examples, batch_size=batch_size).nanmean())
        return EvalResult(
            accuracy=sum(correct) / len(correct),
            mean_loglik=mean_loglik,
            n=len(examples),
            correct=correct,
            predictions=predictions,
            extraction=extraction,
        )
    return EvalResult(accuracy=sum(correct) / len(correct), mean_loglik=mean_loglik, n=len(examples), correct=correct)


_FALLBACK_WARNED: set[str] = set()


def _shared_prompt_loglik(model, tokenizer, examples, batch_size, progress) -> EvalResult | None:
    """`evaluate`'s loglik mode through [`peft_spectral.option_scoring`]; `None` when the model cannot run it."""

    try:
        scores = score_examples(model, tokenizer, examples, batch_size=batch_size, progress=progress)
    except TypeError as err:  # forward without position_ids / cache / logits_to_keep
        name = type(model).__name__
        if name not in _FALLBACK_WARNED:
            _FALLBACK_WARNED.add(name)
            logger.warning(
                "shared-prompt option scoring is not supported by %s (%s); scoring prompt+option sequences instead",
                name,
                err,
            )
        return None
    correct, mean_loglik = multiple_choice_metrics(scores, [ex.label for ex in examples])
    return EvalResult(
        accuracy=sum(correct) / len(correct),
        mean_loglik=mean_loglik,
        n=len(examples),
        correct=[bool(c) for c in correct],
    )
