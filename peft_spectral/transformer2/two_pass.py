"""Two-pass inference: pass 1 picks the adaptation of each prompt, pass 2 answers with it.

Pass 2 answers prompts that chose different adaptations either in *mixed-adapter batches* (the default: each batch
row uses its own SVF adapter, or the base model, in one forward pass — see
[`peft_spectral.tuners.svf.mixed_batch`]) or *grouped* by adaptation, each adapter switched on once per call and the
base-model group run with every adapter layer disabled. Both give the same answers (up to float rounding). Each
call reports the wall time of pass 1, of pass 2 and of the adapter switches, and the pass-1/pass-2 time ratio.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from ..evaluation import answer_logliks, generate_answers, score_prediction
from ..model_utils import eval_mode, pad_token_id
from ..option_scoring import OptionScores, encode_examples, multiple_choice_metrics, score_option_ids
from ..prompting import encode_answer, encode_prompt
from ..tasks import Example
from ..tuners.svf.layer import SVFLayer
from ..tuners.svf.mixed_batch import BASE_ADAPTER, mixed_batch_hooks
from .dispatch import DispatcherLike
from .library import ExpertLibrary


logger = logging.getLogger(__name__)

BASE = "base"


@dataclass
class TwoPassResult:
    """The outcome of [`two_pass_generate`] / [`two_pass_evaluate`].

    Args:
        choices (`list[str | None]`): Adapter used for each prompt (`None`: the base model).
        outputs (`list`): Generated answers (generation) or the picked option index (multiple choice by loglik).
        pass1_seconds, pass2_seconds, switch_seconds (`float`): Wall times of the two passes and of switching.
        groups (`dict[str, list[int]]`): Prompt indices per adapter (`"base"` for the base model).
        correct (`list[bool]`, *optional*): Per-prompt verdicts (evaluation only).
        accuracy (`float`, *optional*): Fraction correct (evaluation only).
        mean_loglik (`float`, *optional*): Mean gold-answer per-token log-likelihood (evaluation only).
        pass2_path (`str`): `"mixed"` (mixed-adapter batches) or `"grouped"` (one adapter at a time).
        pass2_seconds_by_path (`dict[str, float]`): Pass-2 time of the path used and, with `compare_paths=True`,
            of the other one.
        paths_agree (`bool`, *optional*): With `compare_paths=True`, whether both paths gave the same outputs.
    """

    choices: list[Optional[str]]
    outputs: list[Any]
    pass1_seconds: float
    pass2_seconds: float
    switch_seconds: float
    groups: dict[str, list[int]] = field(default_factory=dict)
    correct: Optional[list[bool]] = None
    accuracy: Optional[float] = None
    mean_loglik: Optional[float] = None
    pass2_path: str = "grouped"
    pass2_seconds_by_path: dict[str, float] = field(default_factory=dict)
    paths_agree: Optional[bool] = None

    @property
    def pass1_over_pass2(self) -> float:
        """Pass-1 time as a fraction of pass-2 time."""
        return self.pass1_seconds / self.pass2_seconds if self.pass2_seconds > 0 else float("inf")

    @property
    def switch_over_pass2(self) -> float:
        """Switching time as a fraction of pass-2 time."""
        return self.switch_seconds / self.pass2_seconds if self.pass2_seconds > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (without per-prompt outputs)."""
        return {
            "n": len(self.choices),
            "accuracy": self.accuracy,
            "mean_loglik": self.mean_loglik,
            "pass1_seconds": self.pass1_seconds,
            "pass2_seconds": self.pass2_seconds,
            "switch_seconds": self.switch_seconds,
            "pass1_over_pass2": self.pass1_over_pass2,
            "switch_over_pass2": self.switch_over_pass2,
            "group_sizes": {k: len(v) for k, v in self.groups.items()},
            "pass2_path": self.pass2_path,
            "pass2_seconds_by_path": self.pass2_seconds_by_path,
            "paths_agree": self.paths_agree,
        }


def _as_examples(prompts: Sequence[Union[str, Example]]) -> list[Example]:
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, Example):
            out.append(p)
        elif isinstance(p, str):
            out.append(Example(prompt=p, target=""))
        else:
            raise TypeError(f"prompts[{i}] must be a str or an Example, got {type(p).__name__}")
    return out


def run_pass1(
    library: ExpertLibrary, dispatcher: DispatcherLike, examples: Sequence[Example]
) -> tuple[list[Optional[str]], float]:
    """Run a dispatcher and resolve its answers to adapter names (or `None`); returns them and the time taken."""
    start = time.perf_counter()
    raw = list(dispatcher(library, examples))
    seconds = time.perf_counter() - start
    if len(raw) != len(examples):
        raise ValueError(f"the dispatcher returned {len(raw)} choices for {len(examples)} prompts")
    return [library.resolve(c) for c in raw], seconds


def group_by_choice(choices: Sequence[Optional[str]]) -> OrderedDict[Optional[str], list[int]]:
    """Prompt indices per chosen adapter, in order of first appearance."""
    groups: OrderedDict[Optional[str], list[int]] = OrderedDict()
    for i, c in enumerate(choices):
        groups.setdefault(c, []).append(i)
    return groups


def _run_groups(library: ExpertLibrary, choices, fn) -> tuple[dict[int, Any], float, float, dict[str, list[int]]]:
    results: dict[int, Any] = {}
    switch = 0.0
    start = time.perf_counter()
    groups = group_by_choice(choices)
    for adapter, idx in groups.items():
        before = len(library.switch_seconds)
        with library.use(adapter):
            switch += sum(library.switch_seconds[before:])
            for i, value in zip(idx, fn(idx)):
                results[i] = value
    pass2 = time.perf_counter() - start
    return results, pass2, switch, {(BASE if k is None else k): v for k, v in groups.items()}


def uses_mixed_batches(choices: Sequence[Optional[str]], mixed_batch: bool) -> bool:
    """Whether pass 2 runs mixed-adapter batches: asked for, and the prompts chose more than one adaptation."""
    return mixed_batch and len(set(choices)) > 1


def batch_names(choices: Sequence[Optional[str]], rows: Sequence[int]) -> list[str]:
    """The adapter name of each row for a mixed-adapter batch (`"__base__"` for the base model)."""
    return [BASE_ADAPTER if choices[i] is None else choices[i] for i in rows]


def sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices sorted longest first (stable) and cut into batches — the order the evaluation helpers use inside.

    A batch given in this order to [`generate_answers`], [`score_option_ids`] or [`answer_logliks`] with
    `batch_size=len(batch)` is run as one batch with its rows in the same order, so that row `r` of every forward
    pass is example `batch[r]`.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _run_mixed(
    library: ExpertLibrary, choices: Sequence[Optional[str]], batches: list[list[int]], fn
) -> tuple[dict[int, Any], float, float]:
    """Run `fn(batch) -> (results, {batch size: names})`-style work with per-row adapters; returns results, times."""
    results: dict[int, Any] = {}
    start = time.perf_counter()
    anchor = next(c for c in choices if c is not None)
    before = len(library.switch_seconds)
    with library.use(anchor), eval_mode(library.model):
        switch = sum(library.switch_seconds[before:])
        for batch in batches:
            sizes, run = fn(batch)
            with mixed_batch_hooks(library.model, sizes, layer_cls=SVFLayer):
                for i, value in zip(batch, run()):
                    results[i] = value
    return results, time.perf_counter() - start, switch


def _groups_dict(choices: Sequence[Optional[str]]) -> dict[str, list[int]]:
    return {(BASE if k is None else k): v for k, v in group_by_choice(choices).items()}


def two_pass_generate(
    library: ExpertLibrary,
    dispatcher: DispatcherLike,
    prompts: Sequence[Union[str, Example]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    mixed_batch: bool = True,
    compare_paths: bool = False,
) -> TwoPassResult:
    """Generate answers with Transformer²'s two passes.

    Args:
        library ([`ExpertLibrary`]): The model and its experts.
        dispatcher: Pass 1 ([`PromptDispatcher`], [`FixedDispatcher`] or any callable).
        prompts: Plain prompts or [`Example`]s.
        max_new_tokens (`int`): Pass-2 generation budget.
        batch_size (`int`): Prompts per `generate` call.
        mixed_batch (`bool`): When prompts chose different adaptations, answer them in mixed-adapter batches
            (one `generate` call per batch whatever the choices); `False` groups prompts by adaptation.
        compare_paths (`bool`): Also run the other pass-2 path and report its time and whether outputs agree.

    Returns:
        [`TwoPassResult`] with the generated strings in `outputs`, in input order.
    """
    examples = _as_examples(prompts)
    choices, pass1 = run_pass1(library, dispatcher, examples)

    def generate(idx: list[int]) -> list[str]:
        group = [examples[i] for i in idx]
        return generate_answers(
            library.model, library.tokenizer, group, max_new_tokens=max_new_tokens, batch_size=batch_size
        )

    def run_grouped() -> tuple[list[str], float, float]:
        results, seconds, switch, _ = _run_groups(library, choices, generate)
        return [results[i] for i in range(len(examples))], seconds, switch

    def run_mixed() -> tuple[list[str], float, float]:
        lengths = [len(encode_prompt(library.tokenizer, ex)) for ex in examples]

        def work(batch):
            names = batch_names(choices, batch)
            group = [examples[i] for i in batch]
            return {len(batch): names}, lambda: generate_answers(
                library.model, library.tokenizer, group, max_new_tokens=max_new_tokens, batch_size=len(batch)
            )

        results, seconds, switch = _run_mixed(library, choices, sorted_batches(lengths, batch_size), work)
        return [results[i] for i in range(len(examples))], seconds, switch

    outputs, path, pass2, switch, by_path, agree = _run_paths(
        uses_mixed_batches(choices, mixed_batch), run_mixed, run_grouped, compare_paths and len(set(choices)) > 1
    )
    return TwoPassResult(
        choices=choices,
        outputs=outputs,
        pass1_seconds=pass1,
        pass2_seconds=pass2,
        switch_seconds=switch,
        groups=_groups_dict(choices),
        pass2_path=path,
        pass2_seconds_by_path=by_path,
        paths_agree=agree,
    )


def _run_paths(use_mixed: bool, run_mixed, run_grouped, compare: bool):
    """Run pass 2 by the chosen path (and the other one with `compare`); outputs, path, times, agreement."""
    path = "mixed" if use_mixed else "grouped"
    outputs, pass2, switch = (run_mixed if use_mixed else run_grouped)()
    by_path = {path: pass2}
    agree = None
    if compare:
        other = "grouped" if use_mixed else "mixed"
        other_outputs, other_seconds, _ = (run_grouped if use_mixed else run_mixed)()
        by_path[other] = other_seconds
        agree = _same_outputs(outputs, other_outputs)
    return outputs, path, pass2, switch, by_path, agree


def _same_outputs(a: list[Any], b: list[Any]) -> bool:
    """Same answers: equal strings/options; log-likelihoods equal within 1e-4."""
    for x, y in zip(a, b):
        if isinstance(x, tuple):
            if x[:2] != y[:2] or not (abs(x[2] - y[2]) <= 1e-4 or (x[2] != x[2] and y[2] != y[2])):
                return False
        elif x != y:
            return False
    return len(a) == len(b)


def two_pass_evaluate(
    library: ExpertLibrary,
    dispatcher: DispatcherLike,
    examples: Sequence[Example],
    *,
    kind: str = "multiple_choice",
    mode: str = "auto",
    batch_size: int = 8,
    max_new_tokens: int = 32,
    mixed_batch: bool = True,
    compare_paths: bool = False,
) -> TwoPassResult:
    """Accuracy of Transformer²'s two passes on labelled examples.

    Args:
        kind (`str`): `"multiple_choice"`, `"generation"` or `"code"`.
        mode (`str`): `"loglik"` (multiple choice: most likely option, the `"auto"` choice), or `"generate"`
            (greedy answer judged by [`peft_spectral.evaluation.score_prediction`]).
        batch_size (`int`): Prompts per forward pass / `generate` call.
        max_new_tokens (`int`): Generation budget in `"generate"` mode.
        mixed_batch (`bool`): Answer prompts that chose different adaptations in mixed-adapter batches (default);
            `False` groups them by adaptation.
        compare_paths (`bool`): Also run the other pass-2 path and report its time and whether results agree.

    Returns:
        [`TwoPassResult`] with `correct`, `accuracy` and `mean_loglik` filled in.
    """
    examples = list(examples)
    if not examples:
        raise ValueError("examples is empty")
    if mode == "auto":
        mode = "loglik" if kind == "multiple_choice" else "generate"
    if mode not in ("loglik", "generate"):
        raise ValueError(f"mode must be 'auto', 'loglik' or 'generate', got {mode!r}")
    if mode == "loglik" and kind != "multiple_choice":
        raise ValueError(f"mode='loglik' needs kind='multiple_choice', got kind={kind!r}")
    choices, pass1 = run_pass1(library, dispatcher, examples)
    tok = library.tokenizer

    def judge_scores(scores: OptionScores, group: Sequence[Example]) -> list[tuple[Any, bool, float]]:
        picks = scores.argmax()
        return [
            (p, p == ex.label, scores.mean_token_loglik(k, ex.label) if ex.label is not None else float("nan"))
            for k, (p, ex) in enumerate(zip(picks, group))
        ]

    def answer(idx: list[int]) -> list[tuple[Any, bool, float]]:
        group = [examples[i] for i in idx]
        if mode == "loglik":
            prompts, options = encode_examples(tok, group)
            scores = score_option_ids(
                library.model, prompts, options, pad_id=pad_token_id(tok, library.model), batch_size=batch_size
            )
            return judge_scores(scores, group)
        texts = generate_answers(library.model, tok, group, max_new_tokens=max_new_tokens, batch_size=batch_size)
        lls = answer_logliks(library.model, tok, group, batch_size=batch_size).tolist()
        return [(t, score_prediction(kind, t, ex), ll) for t, ex, ll in zip(texts, group, lls)]

    def run_grouped():
        results, seconds, switch, _ = _run_groups(library, choices, answer)
        return [results[i] for i in range(len(examples))], seconds, switch

    def run_mixed():
        if mode == "loglik":
            prompts, options = encode_examples(tok, examples)

            def work(batch):
                names = batch_names(choices, batch)
                sizes = {len(batch): names}
                if max(len(o) for i in batch for o in options[i]) > 1:  # option tokens run in a second forward
                    sizes[sum(len(options[i]) for i in batch)] = [n for i, n in zip(batch, names) for _ in options[i]]

                def run():
                    scores = score_option_ids(
                        library.model,
                        [prompts[i] for i in batch],
                        [options[i] for i in batch],
                        pad_id=pad_token_id(tok, library.model),
                        batch_size=len(batch),
                        share_prefix=False,  # a prefix's keys/values differ between adapters
                    )
                    return judge_scores(scores, [examples[i] for i in batch])

                return sizes, run

            lengths = [len(p) for p in prompts]
            results, seconds, switch = _run_mixed(library, choices, sorted_batches(lengths, batch_size), work)
            return [results[i] for i in range(len(examples))], seconds, switch

        def gen_work(batch):
            group = [examples[i] for i in batch]
            return {len(batch): batch_names(choices, batch)}, lambda: generate_answers(
                library.model, tok, group, max_new_tokens=max_new_tokens, batch_size=len(batch)
            )

        def ll_work(batch):
            group = [examples[i] for i in batch]
            return {len(batch): batch_names(choices, batch)}, lambda: answer_logliks(
                library.model, tok, group, batch_size=len(batch)
            ).tolist()

        prompt_lengths = [len(encode_prompt(tok, ex)) for ex in examples]
        pair_lengths = [n + len(encode_answer(tok, ex.target)) for n, ex in zip(prompt_lengths, examples)]
        texts, s1, switch = _run_mixed(library, choices, sorted_batches(prompt_lengths, batch_size), gen_work)
        lls, s2, _ = _run_mixed(library, choices, sorted_batches(pair_lengths, batch_size), ll_work)
        out = [(texts[i], score_prediction(kind, texts[i], ex), lls[i]) for i, ex in enumerate(examples)]
        return out, s1 + s2, switch

    ordered, path, pass2, switch, by_path, agree = _run_paths(
        uses_mixed_batches(choices, mixed_batch), run_mixed, run_grouped, compare_paths and len(set(choices)) > 1
    )
    correct = [bool(r[1]) for r in ordered]
    lls = [r[2] for r in ordered if r[2] == r[2]]
    return TwoPassResult(
        choices=choices,
        outputs=[r[0] for r in ordered],
        pass1_seconds=pass1,
        pass2_seconds=pass2,
        switch_seconds=switch,
        groups=_groups_dict(choices),
        correct=correct,
        accuracy=sum(correct) / len(correct),
        mean_loglik=sum(lls) / len(lls) if lls else float("nan"),
        pass2_path=path,
        pass2_seconds_by_path=by_path,
        paths_agree=agree,
    )


__all__ = [
    "TwoPassResult",
    "group_by_choice",
    "multiple_choice_metrics",
    "run_pass1",
    "two_pass_evaluate",
    "two_pass_generate",
]
