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
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional, Protocol, Union

from ..evaluation import generate_answers
from ..option_scoring import PrefixState, common_prefix_length, run_prefix, score_option_ids
from ..prompting import encode_answer, encode_prompt, pad_token_id
from ..tasks import Example
from .library import OTHERS, ExpertLibrary


logger = logging.getLogger(__name__)

DEFAULT_INSTRUCTION = (
    "Classify the question below into one of these categories. Answer with the category name only.\n"
    "Categories:\n{categories}\n"
)
QUESTION_HEADER = "Question:\n"


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
    ):
        if mode not in ("loglik", "generate"):
            raise ValueError(f"mode must be 'loglik' or 'generate', got {mode!r}")
        if label_tokens not in ("distinct", "full"):
            raise ValueError(f"label_tokens must be 'distinct' or 'full', got {label_tokens!r}")
        self.label_tokens = label_tokens
        self.adapter = adapter
        self.mode = mode
        self.prompt = prompt or DispatchPrompt()
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.last_answers: list[str] = []
        self._prefix: dict[tuple, PrefixState] = {}

    def category_examples(self, library: ExpertLibrary, examples: Sequence[Example]) -> list[Example]:
        """The category questions for `examples` (as multiple-choice examples over the categories)."""
        names = library.names
        descriptions = [library.experts[n].description for n in names]
        return [self.prompt.example(library.tokenizer, names, descriptions, ex.prompt) for ex in examples]

    def clear_cache(self) -> None:
        """Forget cached prefix keys/values (call after changing the adapter's weights)."""
        self._prefix.clear()

    def __call__(self, library: ExpertLibrary, examples: Sequence[Example]) -> list[Optional[str]]:
        if not examples:
            return []
        if self.adapter is not None and self.adapter not in library.model.peft_config:
            raise ValueError(
                f"dispatch adapter {self.adapter!r} is not loaded; loaded: {sorted(library.model.peft_config)}"
            )
        questions = self.category_examples(library, examples)
        with library.use(self.adapter):
            if self.mode == "generate":
                answers = generate_answers(
                    library.model,
                    library.tokenizer,
                    questions,
                    max_new_tokens=self.max_new_tokens,
                    batch_size=self.batch_size,
                )
                self.last_answers = answers
                return [parse_category(a, library.names) for a in answers]
            return self._loglik(library, questions)

    def _loglik(self, library: ExpertLibrary, questions: list[Example]) -> list[Optional[str]]:
        tok = library.tokenizer
        prompts = [encode_prompt(tok, q) for q in questions]
        choices = questions[0].choices
        labels = [encode_answer(tok, c) for c in choices]
        if self.label_tokens == "distinct":
            labels = distinct_prefixes(labels)
        options = [labels for _ in questions]
        prefix = self._shared_prefix(library, prompts)
        scores = score_option_ids(
            library.model,
            prompts,
            options,
            pad_id=pad_token_id(tok, library.model),
            batch_size=self.batch_size,
            prefix=prefix,
            share_prefix=False,
        )
        picks = [choices[i] for i in scores.argmax()]
        self.last_answers = picks
        return picks

    def _shared_prefix(self, library: ExpertLibrary, prompts: list[list[int]]) -> Optional[PrefixState]:
        """The constant part of the category question (instructions + categories), run once per adapter state."""
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
            self._prefix[key] = run_prefix(library.model, prompts[0][:plen])
        return self._prefix[key]


class FixedDispatcher:
    """Give every prompt the same adapter (e.g. a task's CEM mixture), or the base model for `None`."""

    def __init__(self, adapter: Optional[str]):
        self.adapter = adapter

    def __call__(self, library: ExpertLibrary, examples: Sequence[Example]) -> list[Optional[str]]:
        return [self.adapter] * len(examples)


DispatcherLike = Union[Dispatcher, Callable[[ExpertLibrary, Sequence[Example]], list[Optional[str]]]]
