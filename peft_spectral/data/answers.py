r"""Reading the answer out of a model's text: normalisation, numbers, option letters, code blocks, and the two
extraction modes every scorer offers.

A small instruction-tuned model rarely answers with the bare answer: SmolLM2-135M writes "The GCD of 9 and 3 is 3."
Two modes decide what counts as the answer:

* **strict** ([`strict_answer`]): the answer is the text itself — the content of an `<answer>...</answer>` tag when
  there is one, else the first non-empty line, stripped, without one trailing period. "3" and "3." are read as "3";
  "The GCD is 3." is read as itself (and is wrong).
* **lenient** ([`lenient_answers`]): the strict reading and the places a sentence puts its answer are all tried, and
  an answer is right when any of them is: the content of `\boxed{...}` or `**...**`, the first clause (up to the first
  `,` `.` `;` `!`: "No, it does not follow" is read as "No"), the text after the last answer marker ("answer is",
  "answer:", "is", "=", ":"), the last line, the last number, and the whole text. "The GCD of 9 and 3 is 3." is read
  as "3". The price: an answer that lists several candidates may be counted right when one of
  the places holds the gold answer (e.g. the last of several numbers).

Learning the answer format alone moves strict accuracy, not lenient accuracy; comparing two models on lenient
accuracy measures the skill.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from typing import Literal, Optional


__all__ = [
    "EXTRACTIONS",
    "Extraction",
    "check_extraction",
    "extract_choice",
    "extract_choice_strict",
    "extract_code",
    "extract_number",
    "last_number_text",
    "lenient_answers",
    "normalize_answer",
    "strict_answer",
    "to_number",
]

Extraction = Literal["strict", "lenient"]
EXTRACTIONS: tuple[str, ...] = ("strict", "lenient")

_NUMBER = re.compile(r"[-−]?\$?\d[\d,]*(?:\.\d+)?|[-−]?\.\d+")
_NUMBER_TEXT = re.compile(r"[-−]?\d[\d,]*(?:\.\d+)?(?:/\d+)?|[-−]?\.\d+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ANSWER_TAG = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL | re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_BOLD = re.compile(r"\*\*([^*]+)\*\*")
_MARKER = re.compile(r"(?i)\b(?:final answer|answer|result|is|are|equals)\b|=|:")
_TRAILING = " \t.,;!"
_FIRST_CLAUSE = re.compile(r"[,;!]|\.(?=\s|$)")


def check_extraction(extraction: str) -> str:
    """`extraction` if it is `"strict"` or `"lenient"`, else a `ValueError`."""
    if extraction not in EXTRACTIONS:
        raise ValueError(f"extraction must be one of {EXTRACTIONS}, got {extraction!r}")
    return extraction


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces."""
    text = str(text).lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def to_number(token: str) -> Optional[float]:
    """`token` as a finite float (`$`, thousands commas and the Unicode minus accepted), else `None`."""
    token = str(token).replace("−", "-").replace("$", "").replace(",", "").strip()
    try:
        value = float(token)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def extract_number(text: str) -> Optional[float]:
    """GSM8K-style final number: the number after the last `####` if any, else the last number in the text.

    Thousands separators (`1,234`) and a leading `$` are accepted. Returns `None` when there is no number.
    """
    text = str(text)
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        match = _NUMBER.search(tail)
        if match:
            return to_number(match.group())
    for token in reversed(_NUMBER.findall(text)):
        value = to_number(token)
        if value is not None:
            return value
    return None


def last_number_text(text: str) -> Optional[str]:
    """The last number of `text` as written (fractions such as `3/4` kept, thousands commas and `−` normalised), or
    `None`."""
    found = _NUMBER_TEXT.findall(str(text))
    if not found:
        return None
    return found[-1].replace("−", "-").replace(",", "")


def strict_answer(text: str) -> str:
    """The strict reading of a completion: an `<answer>` tag's content, else the first non-empty line, stripped,
    without one trailing period."""
    text = str(text)
    tag = _ANSWER_TAG.search(text)
    if tag:
        text = tag.group(1)
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line[:-1].rstrip() if line.endswith(".") else line


def lenient_answers(text: str) -> list[str]:
    """The candidate answers of the lenient reading, most specific first, without duplicates or empty strings (see
    the module docstring)."""
    text = str(text)
    candidates = [strict_answer(text)]
    candidates += [m.strip() for m in _BOXED.findall(text)]
    candidates += [m.strip() for m in _BOLD.findall(text)]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if lines:
        candidates.append(_FIRST_CLAUSE.split(lines[0], maxsplit=1)[0].strip())
    for line in reversed(lines):
        markers = list(_MARKER.finditer(line))
        if markers:
            candidates.append(line[markers[-1].end() :].strip(" :").strip(_TRAILING))
            break
    if lines:
        candidates.append(lines[-1].strip(_TRAILING))
    number = last_number_text(text)
    if number is not None:
        candidates.append(number)
    candidates.append(" ".join(text.split()).strip(_TRAILING))
    out: list[str] = []
    for c in candidates:
        if c and c not in out:
            out.append(c)
    return out


_STRICT_LETTER_PATTERNS = (
    re.compile(r"^\s*\(?([A-Za-z])\)?\s*[.:)]?\s*$"),  # the whole answer is a letter: "B", "(b)", "C."
    re.compile(r"^\s*\(([A-Za-z])\)"),  # "(b) blue"
    re.compile(r"^\s*([A-Za-z])[.)]\s"),  # "B. blue", "b) blue"
    re.compile(r"(?i)\banswer\s*(?:is|:)?\s*\(?([A-Z])\)?(?:[.:)\s]|$)"),  # "the answer is (B)", "Answer: B"
    re.compile(r"(?i)\boption\s*\(?([A-Z])\)?(?:[.:)\s]|$)"),  # "option B"
)
_LOOSE_LETTER_PATTERN = re.compile(r"^\s*([A-Z])(?:[:\]]|\s|$)")  # "B is right" (capital letter only)
_LETTER_ALONE = re.compile(r"^\(?([A-Za-z])\)?\.?$")
_LETTER_AND_OPTION = re.compile(r"^\(?([A-Za-z])[.):]\s+(.+)$")


def _letter(pattern: re.Pattern, text: str, n: int) -> Optional[int]:
    match = pattern.search(text)
    if match:
        idx = ord(match.group(1).upper()) - ord("A")
        if 0 <= idx < n:
            return idx
    return None


def extract_choice(text: str, choices: Sequence[str]) -> Optional[int]:
    """Lenient: the index of the option that `text` picks, by letter (`B`, `(b)`, `B. ...`, `Answer: C`) or by
    option text. Returns `None` when nothing matches unambiguously."""
    text = str(text).strip()
    n = len(choices)
    if not text or n == 0:
        return None
    for pattern in _STRICT_LETTER_PATTERNS:
        idx = _letter(pattern, text, n)
        if idx is not None:
            return idx
    options = [normalize_answer(c) for c in choices]
    for candidate in (normalize_answer(text), normalize_answer(text.splitlines()[0])):
        exact = [i for i, opt in enumerate(options) if opt and opt == candidate]
        if len(exact) == 1:
            return exact[0]
    idx = _letter(_LOOSE_LETTER_PATTERN, text, n)
    if idx is not None:
        return idx
    # An option mentioned at the start of the answer (longest first so "non-entailment" beats "entailment").
    norm = normalize_answer(text)
    starts = [i for i, opt in enumerate(options) if opt and norm.startswith(opt)]
    if starts:
        return max(starts, key=lambda i: len(options[i]))
    return None


def extract_choice_strict(text: str, choices: Sequence[str]) -> Optional[int]:
    """Strict: the option picked when the [`strict_answer`] is a letter alone (`B`, `(B)`, `B.`), a letter followed
    by that option's text (`B. blue`), or exactly one option's text; else `None`."""
    answer = strict_answer(text)
    n = len(choices)
    options = [normalize_answer(c) for c in choices]
    alone = _LETTER_ALONE.match(answer)
    if alone:
        idx = ord(alone.group(1).upper()) - ord("A")
        return idx if 0 <= idx < n else None
    both = _LETTER_AND_OPTION.match(answer)
    if both:
        idx = ord(both.group(1).upper()) - ord("A")
        if 0 <= idx < n and normalize_answer(both.group(2)) == options[idx]:
            return idx
        return None
    exact = [i for i, opt in enumerate(options) if opt and opt == normalize_answer(answer)]
    return exact[0] if len(exact) == 1 else None


def extract_code(text: str, entry_point: str = "") -> str:
    """The code in a completion: the first fenced block (```python ...```) that defines `entry_point` if any, else the
    first fenced block, else the text itself."""
    blocks = re.findall(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|$)", str(text), flags=re.DOTALL)
    if not blocks:
        return str(text)
    if entry_point:
        for block in blocks:
            if re.search(rf"\bdef\s+{re.escape(entry_point)}\s*\(", block):
                return block
    return blocks[0]
