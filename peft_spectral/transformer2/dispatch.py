"""Pass 1 of Transformer²: deciding, for each prompt, which adaptation answers it.

A *dispatcher* maps prompts to adapter names (or `None`, the base model):

* [`PromptDispatcher`]: the model itself is asked which of the experts' categories (or `others`) the question
  belongs to. With `adapter=None` it is the paper's *prompt engineering* strategy (the base model answers the
  category question); with `adapter="<classifier>"` it is the *classification expert* strategy (an SVF adapter
  trained for that question, see [`peft_spectral.transformer2.classifier`]).
* [`FixedDispatcher`]: every prompt gets the same adapter (the few-shot CEM mixture of a task, or the base model).
* Any callable `(library, examples) -> list[str | None]` works too.

Answers are resolved with [`ExpertLibrary.resolve`]: `others`, unparseable text and unknown names mean the base
model (unknown names are logged).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional, Protocol, Union

from ..data import Example
from ..evaluation import generate_answers
from ..model_utils import pad_token_id
from ..option_scoring import PrefixState, common_prefix_length, run_prefix, score_option_ids
from ..prompting import encode_answer, encode_prompt
from .library import OTHERS, ExpertLibrary


logger = logging.getLogger(__name__)

DEFAULT_INSTRUCTION = (
    "Classify the question below into one of these categories. Answer with the category name only.\n"
    "Categories:\n{categories}\n"
)
QUESTION_HEADER = "Question:\n"
#: Prefix keys/values a [`PromptDispatcher`] keeps (oldest dropped first).
MAX_CACHED_PREFIXES = 8


class Dispatcher(Protocol):
    """Anything that chooses an adapter (a name, `"others"` or `None`) for each example."""

    def __call__(self, library: ExpertLibrary, examples: Sequence[Example]) -> list[Optional[str]]: ...


def category_lines(names: Sequence[str], descriptions: Sequence[str], others_description: str) -> str:
    """The bulleted category list of the dispatch prompt (experts, then `others`)."""
    lines = [f"- {n}: {d}" if d else f"- {n}" for n, d in zip(names, descriptions)]
    lines.append(f"- {OTHERS}: {others_description}")
    return "\n".join(lines)


def parse_category(text: str, names: Sequence[str]) -> Optional[str]:
    """The category named in a generated answer, `"others"`, or `None` when nothing can be read.

    The first category name (or `others`) that appears as a whole word wins, case-insensitively; a leading
    `Category:`/`Classification:` tag and quotes or brackets around the name are ignored.

    Args:
        text (`str`): The model's answer.
        names (`Sequence[str]`): The expert names.
    """
    if not text:
        return None
    cleaned = re.sub(r"^\s*(category|classification|answer)\s*[:=]\s*", "", text.strip(), flags=re.IGNORECASE)
    candidates = list(names) + [OTHERS]
    best: Optional[tuple[int, str]] = None
    for name in candidates:
        match = re.search(r"(?<![A-Za-z0-9_])" + re.escape(name) + r"(?![A-Za-z0-9_])", cleaned, flags=re.IGNORECASE)
        if match and (best is None or match.start() < best[0]):
            best = (match.start(), name)
    return best[1] if best else None


def distinct_prefixes(labels: Sequence[Sequence[int]]) -> list[list[int]]:
    """Each token sequence cut after the first token that no other sequence shares at that point.

    A sequence that is a prefix of another stays whole. `[[5, 1], [6, 2, 3], [6, 4]]` → `[[5], [6, 2], [6, 4]]`.
    """
    out = []
    for i, seq in enumerate(labels):
        k = 1
        while k < len(seq) and any(list(o[:k]) == list(seq[:k]) for j, o in enumerate(labels) if j != i):
            k += 1
        out.append(list(seq[:k]))
    return out


def truncate_text(tokenizer, text: str, max_tokens: Optional[int]) -> str:
    """The first `max_tokens` tokens of `text` (decoded back to text); `text` itself when it is shorter."""
    if max_tokens is None:
        return text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    return tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)


@dataclass
class DispatchPrompt:
    """How the category question is asked.

    Args:
        instruction (`str`): Text before the question; `{categories}` is replaced by the category list.
        others_description (`str`): Description of the `others` category.
        max_question_tokens (`int`, *optional*): Only the first tokens of each question are shown (pass 1 stays
            cheap next to pass 2); `None` shows it whole.
    """

    instruction: str = DEFAULT_INSTRUCTION
    others_description: str = "none of the above; general questions"
    max_question_tokens: Optional[int] = 96

    def render(self, tokenizer, names: Sequence[str], descriptions: Sequence[str], question: str) -> str:
        """The plain-text category question for one prompt (the chat template is applied later)."""
        head = self.instruction.format(categories=category_lines(names, descriptions, self.others_description))
        return head + QUESTION_HEADER + truncate_text(tokenizer, question, self.max_question_tokens).strip()

    def example(
        self, tokenizer, names: Sequence[str], descriptions: Sequence[str], question: str, label: Optional[str] = None
    ) -> Example:
        """An [`Example`] whose choices are the categories (experts then `others`); `label` names the gold one."""
        choices = tuple(names) + (OTHERS,)
        idx = choices.index(label) if label is not None else None
        return Example(
            prompt=self.render(tokenizer, names, descriptions, question),
            target=label if label is not None else "",
            choices=choices,
            label=idx,
        )


class PromptDispatcher:
    """Ask the model (optionally with a classifier adapter active) which category each question belongs to.

    With a `threshold`, pass 1 can say "no expert fits": a prompt goes to its most likely category only when that
    category wins by at least `threshold` (see `confidence`), and to `others` (the base model) otherwise. Fit the
    threshold on labelled validation prompts with
    [`~peft_spectral.transformer2.calibration.calibrate_threshold`], which also records it in the library
    (`threshold="library"` reads it back, e.g. after [`ExpertLibrary.from_manifest`]).

    Args:
        adapter (`str`, *optional*): Adapter active during pass 1: `None` for the base model (prompt dispatch), or
            the name of a classifier expert loaded in the library (classification-expert dispatch).
        mode (`str`): `"loglik"` (default) scores every category name as an answer and takes the most likely one
            — one forward pass per prompt, always a valid category; `"generate"` decodes greedily and parses the
            text with [`parse_category`] (unparseable → base model).
        prompt ([`DispatchPrompt`], *optional*): The category question.
        batch_size (`int`): Prompts per forward pass.
        max_new_tokens (`int`): Generation budget in `"generate"` mode.
        label_tokens (`str`): In `"loglik"` mode, `"distinct"` (default) scores each category name only up to the
            first token that tells it apart from the others (usually one token: no second forward pass, the answer
            greedy decoding would start), `"full"` scores every token of the names.
        threshold (`float` or `str`, *optional*): Minimal confidence of the top category (`"loglik"` mode only);
            below it the prompt goes to `others`. `None` or `0` is the plain argmax; `"library"` uses the threshold
            fitted for this dispatcher and stored in `library.dispatch_thresholds`.
        confidence (`str`): `"margin"` (default): log-likelihood of the top category minus that of the second;
            `"probability"`: probability of the top category, normalised over the categories.
        prefix_sharing (`str`): Which prefix of the category questions is run once per call (`"loglik"` mode):
            `"prompts"` (default) the longest common prefix of this call's category questions — the instructions,
            the category list *and* whatever text the questions start with (e.g. a task's own instructions);
            `"instruction"` only the instructions and category list (the former behaviour, cached across calls).
            Both give the same scores up to float rounding; `"prompts"` runs fewer tokens when the questions share a
            beginning.
        content_free (`Sequence[str]`, *optional*): Contextual calibration (Zhao et al., 2021, "Calibrate Before
            Use"; `"loglik"` mode): the category question is also asked of these content-free questions (e.g.
            `("N/A", "", "?")`), and each category's mean log-probability over them (normalised over the categories)
            is subtracted from every prompt's scores. A small model that favours one category name whatever the
            question (a prior of the label, not of the question) then no longer sends every prompt to it. `None`
            (default): the raw scores, as in the paper. The prior is cached per adapter and library (`last_prior`);
            [`clear_cache`] forgets it.
    """

    def __init__(
        self,
        adapter: Optional[str] = None,
        *,
        mode: str = "loglik",
        prompt: Optional[DispatchPrompt] = None,
        batch_size: int = 8,
        max_new_tokens: int = 8,
        label_tokens: str = "distinct",
        threshold: Optional[Union[float, str]] = None,
        confidence: str = "margin",
        prefix_sharing: str = "prompts",
        content_free: Optional[Sequence[str]] = None,
    ):
        if mode not in ("loglik", "generate"):
            raise ValueError(f"mode must be 'loglik' or 'generate', got {mode!r}")
        if label_tokens not in ("distinct", "full"):
            raise ValueError(f"label_tokens must be 'distinct' or 'full', got {label_tokens!r}")
        if confidence not in CONFIDENCE_MEASURES:
            raise ValueError(f"confidence must be one of {CONFIDENCE_MEASURES}, got {confidence!r}")
        if prefix_sharing not in ("prompts", "instruction"):
            raise ValueError(f"prefix_sharing must be 'prompts' or 'instruction', got {prefix_sharing!r}")
        if threshold is not None and not isinstance(threshold, (int, float)) and threshold != "library":
            raise ValueError(f"threshold must be a number, None or 'library', got {threshold!r}")
        if threshold is not None and mode != "loglik":
            raise ValueError("threshold needs mode='loglik' (category scores); generate mode has none")
        if content_free is not None:
            if isinstance(content_free, str) or not content_free or not all(isinstance(t, str) for t in content_free):
                raise ValueError(f"content_free must be a non-empty sequence of strings, got {content_free!r}")
            if mode != "loglik":
                raise ValueError("content_free needs mode='loglik' (category scores); generate mode has none")
        self.content_free = tuple(content_free) if content_free is not None else None
        self.label_tokens = label_tokens
        self.adapter = adapter
        self.mode = mode
        self.prompt = prompt or DispatchPrompt()
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.threshold = threshold
        self.confidence = confidence
        self.prefix_sharing = prefix_sharing
        self.last_answers: list[str] = []
        self.last_scores: list[list[float]] = []
        self.last_confidences: list[float] = []
        #: Tokens run through the model by the last `"loglik"` call (shared prefix once + each question's rest).
        self.last_tokens_run: int = 0
        #: The content-free prior subtracted from the scores (per category), when `content_free` is set.
        self.last_prior: Optional[list[float]] = None
        self._prefix: dict[tuple, PrefixState] = {}
        self._priors: dict[tuple, list[float]] = {}

    @property
    def key(self) -> str:
        """Name of this dispatcher's entry in `library.dispatch_thresholds`: `"prompt"` or the classifier adapter."""
        return self.adapter if self.adapter is not None else "prompt"

    def category_examples(self, library: ExpertLibrary, examples: Sequence[Example]) -> list[Example]:
        """The category questions for `examples` (as multiple-choice examples over the categories)."""
        names = library.names
        descriptions = [library.experts[n].description for n in names]
        return [self.prompt.example(library.tokenizer, names, descriptions, ex.prompt) for ex in examples]

    def clear_cache(self) -> None:
        """Forget cached prefix keys/values and content-free priors (call after changing the adapter's weights)."""
        self._prefix.clear()
        self._priors.clear()

    def resolved_threshold(self, library: ExpertLibrary) -> Optional[float]:
        """The threshold in use: the number given, the library's fitted one for `"library"`, or `None`."""
        if self.threshold != "library":
            return self.threshold
        entry = library.dispatch_thresholds.get(self.key)
        if entry is None:
            raise ValueError(
                f"threshold='library' but the library holds no fitted threshold for dispatcher {self.key!r} "
                f"(fitted: {sorted(library.dispatch_thresholds)}); run calibrate_threshold first"
            )
        if entry.get("confidence", self.confidence) != self.confidence:
            raise ValueError(
                f"the library's threshold for {self.key!r} was fitted for confidence={entry['confidence']!r}, "
                f"this dispatcher uses confidence={self.confidence!r}"
            )
        return float(entry["threshold"])

    def __call__(self, library: ExpertLibrary, examples: Sequence[Example]) -> list[Optional[str]]:
        if not examples:
            return []
        if self.mode == "generate":
            self._check_adapter(library)
            questions = self.category_examples(library, examples)
            with library.use(self.adapter):
                answers = generate_answers(
                    library.model,
                    library.tokenizer,
                    questions,
                    max_new_tokens=self.max_new_tokens,
                    batch_size=self.batch_size,
                )
            self.last_answers = answers
            return [parse_category(a, library.names) for a in answers]
        threshold = self.resolved_threshold(library)
        scores = self.scores(library, examples)
        picks = decide_categories(scores, library.names + [OTHERS], threshold=threshold, confidence=self.confidence)
        self.last_answers = picks
        return picks

    def scores(self, library: ExpertLibrary, examples: Sequence[Example]) -> list[list[float]]:
        """Log-likelihood of each category (experts in order, then `others`) as the answer, per example; with
        `content_free`, minus the content-free prior of each category.

        Also sets `last_scores`, `last_confidences`, `last_tokens_run` and `last_prior`.
        """
        self._check_adapter(library)
        if not examples:
            return []
        # the prior first, so that `last_tokens_run` counts this call's examples only
        prior = self.prior(library) if self.content_free is not None else None
        sums = self._raw_scores(library, examples)
        if prior is not None:
            sums = [[s - p for s, p in zip(row, prior)] for row in sums]
        self.last_prior = prior
        self.last_scores = sums
        self.last_confidences = [category_confidence(s, self.confidence) for s in sums]
        return sums

    def prior(self, library: ExpertLibrary) -> list[float]:
        """The content-free prior: per category, the mean over the `content_free` questions of its log-probability
        normalised over the categories (`score - logsumexp(scores)`)."""
        if self.content_free is None:
            raise ValueError("this dispatcher has no content_free questions")
        names = tuple(library.names)
        key = (self.adapter, names, tuple(library.experts[n].description for n in names))
        if key not in self._priors:
            rows = self._raw_scores(library, [Example(prompt=t, target="") for t in self.content_free])
            normalised = [[v - _logsumexp(row) for v in row] for row in rows]
            self._priors[key] = [sum(col) / len(col) for col in zip(*normalised)]
        return list(self._priors[key])

    def _raw_scores(self, library: ExpertLibrary, examples: Sequence[Example]) -> list[list[float]]:
        questions = self.category_examples(library, examples)
        tok = library.tokenizer
        prompts = [encode_prompt(tok, q) for q in questions]
        labels = [encode_answer(tok, c) for c in questions[0].choices]
        if self.label_tokens == "distinct":
            labels = distinct_prefixes(labels)
        options = [labels for _ in questions]
        with library.use(self.adapter):
            prefix = self._shared_prefix(library, prompts)
            result = score_option_ids(
                library.model,
                prompts,
                options,
                pad_id=pad_token_id(tok, library.model),
                batch_size=self.batch_size,
                prefix=prefix,
                share_prefix=False,
            )
        plen = len(prefix.ids) if prefix is not None else 0
        self.last_tokens_run = plen + sum(len(p) - plen for p in prompts)
        return [list(row) for row in result.sums]

    def _check_adapter(self, library: ExpertLibrary) -> None:
        if self.adapter is not None and self.adapter not in library.model.peft_config:
            raise ValueError(
                f"dispatch adapter {self.adapter!r} is not loaded; loaded: {sorted(library.model.peft_config)}"
            )

    def _shared_prefix(self, library: ExpertLibrary, prompts: list[list[int]]) -> Optional[PrefixState]:
        """The constant part of the category questions, run once (per adapter state for `"instruction"`)."""
        if self.prefix_sharing == "prompts":
            plen = common_prefix_length(prompts)
        else:
            tok = library.tokenizer
            names = library.names
            descriptions = [library.experts[n].description for n in names]
            probe = [encode_prompt(tok, self.prompt.render(tok, names, descriptions, q)) for q in ("a", "Z")]
            plen = common_prefix_length(probe + prompts)
        plen = min(plen, min(len(p) for p in prompts) - 1)
        if plen <= 0:
            return None
        key = (self.adapter, tuple(prompts[0][:plen]))
        if key not in self._prefix:
            while len(self._prefix) >= MAX_CACHED_PREFIXES:
                self._prefix.pop(next(iter(self._prefix)))
            self._prefix[key] = run_prefix(library.model, prompts[0][:plen])
        return self._prefix[key]


CONFIDENCE_MEASURES = ("margin", "probability")


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def category_confidence(scores: Sequence[float], confidence: str = "margin") -> float:
    """How clearly the top category wins.

    Args:
        scores (`Sequence[float]`): Log-likelihood of each category.
        confidence (`str`): `"margin"`: top log-likelihood minus the second (`inf` with one category);
            `"probability"`: softmax probability of the top category over the categories.
    """
    if confidence not in CONFIDENCE_MEASURES:
        raise ValueError(f"confidence must be one of {CONFIDENCE_MEASURES}, got {confidence!r}")
    ordered = sorted(scores, reverse=True)
    if confidence == "margin":
        return ordered[0] - ordered[1] if len(ordered) > 1 else math.inf
    top = ordered[0]
    return 1.0 / sum(math.exp(v - top) for v in ordered)


def decide_categories(
    scores: Sequence[Sequence[float]],
    categories: Sequence[str],
    *,
    threshold: Optional[float] = None,
    confidence: str = "margin",
) -> list[str]:
    """The category of each row of scores, or `others` when the top one does not win by `threshold`.

    Args:
        scores (`Sequence[Sequence[float]]`): Per prompt, the log-likelihood of each category.
        categories (`Sequence[str]`): The category names, in the order of the scores (experts, then `others`).
        threshold (`float`, *optional*): Minimal confidence of the top category; `None` or `0`: plain argmax.
        confidence (`str`): `"margin"` or `"probability"` (see [`category_confidence`]).
    """
    out = []
    for row in scores:
        if len(row) != len(categories):
            raise ValueError(f"a score row has {len(row)} values for {len(categories)} categories")
        best = categories[max(range(len(row)), key=row.__getitem__)]
        if threshold is not None and category_confidence(row, confidence) < threshold:
            best = OTHERS
        out.append(best)
    return out


class FixedDispatcher:
    """Give every prompt the same adapter (e.g. a task's CEM mixture), or the base model for `None`."""

    def __init__(self, adapter: Optional[str]):
        self.adapter = adapter

    def __call__(self, library: ExpertLibrary, examples: Sequence[Example]) -> list[Optional[str]]:
        return [self.adapter] * len(examples)


DispatcherLike = Union[Dispatcher, Callable[[ExpertLibrary, Sequence[Example]], list[Optional[str]]]]
