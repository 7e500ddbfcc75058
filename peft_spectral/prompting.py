"""Prompt formatting and tokenisation shared by every pipeline.

Every method of the package (SVF training, Transformer² dispatch, SpectralCompress search, CoreIsolation) shows a
model the same text for an [`~peft_spectral.tasks.Example`] and scores the same answer tokens, so these functions are a
contract:

- [`format_prompt`] is the text a model is given (the chat template when the tokenizer has one).
- [`encode_prompt`] / [`encode_answer`] are its token ids; the answer is the tokenizer's encoding of the answer text
  alone (no special tokens), appended to the encoded prompt, so the prompt/answer boundary is always a token boundary.
"""

from __future__ import annotations

from .data import Example


__all__ = ["encode_answer", "encode_prompt", "format_prompt", "uses_chat_template"]


def uses_chat_template(tokenizer, chat: bool | None = None) -> bool:
    """Whether prompts for `tokenizer` are rendered with its chat template.

    Args:
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): The model's tokenizer.
        chat (`bool`, *optional*): `None` (default) follows the tokenizer (template present or not); `True` requires a
            template (a clear error otherwise); `False` never uses it.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat is None:
        return has_template
    if chat and not has_template:
        raise ValueError("chat=True but the tokenizer has no chat template; pass chat=None or chat=False")
    return bool(chat)


def format_prompt(tokenizer, example: Example | str, *, chat: bool | None = None) -> str:
    """The text a model is given for `example`.

    Args:
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): The model's tokenizer.
        example ([`Example`] or `str`): The example (or a bare prompt string).
        chat (`bool`, *optional*): `None` (default) applies the chat template when the tokenizer has one; `True`
            requires it; `False` uses the plain prompt.

    Returns:
        `str`: With a chat template, the rendered single user turn followed by the assistant generation prompt.
        Without, the prompt stripped of trailing whitespace plus a newline, so the answer starts a new line.
    """
    prompt = example if isinstance(example, str) else example.prompt
    if uses_chat_template(tokenizer, chat):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt.rstrip() + "\n"


def encode_prompt(tokenizer, example: Example | str, chat: bool | None = None) -> list[int]:
    """Token ids of [`format_prompt`]'s text; special tokens are added only to a plain (non-chat) prompt."""
    # A rendered chat template already contains its special tokens; a plain prompt gets the tokenizer's BOS etc.
    use_chat = uses_chat_template(tokenizer, chat)
    text = format_prompt(tokenizer, example, chat=use_chat)
    return list(tokenizer(text, add_special_tokens=not use_chat)["input_ids"])


def encode_answer(tokenizer, text: str) -> list[int]:
    """Token ids of an answer text alone (no special tokens); an empty encoding is an error."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"answer text {text!r} encodes to zero tokens")
    return ids
