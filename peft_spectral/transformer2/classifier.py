"""Strategy 2 of Transformer²: a *classification expert*, an SVF adapter trained to answer the category question.

[`build_classifier_examples`] turns the experts' own task data into category questions (the same prompt the
[`PromptDispatcher`] asks, with the expert's name as the answer); [`train_classifier_expert`] trains an SVF adapter
on them by supervised fine-tuning through [`peft_spectral.training.train_svf`] (`method="sft"`, TRL's `SFTTrainer`)
and saves it. Load it with
[`ExpertLibrary.load_extra_adapter`] and dispatch with `PromptDispatcher(adapter=<its name>)`.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

from torch import nn

from ..data import Example
from ..prompting import encode_answer, encode_prompt
from ..training import train_svf
from ..tuners.svf.config import SVFConfig
from .dispatch import DispatchPrompt
from .library import OTHERS, ExpertLibrary


logger = logging.getLogger(__name__)

CLASSIFIER_METADATA = "transformer2_classifier.json"


def build_classifier_examples(
    library: ExpertLibrary,
    task_examples: Mapping[str, Sequence[Example]],
    *,
    others: Optional[Union[Sequence[Example], Mapping[str, Sequence[Example]]]] = None,
    per_category: Optional[int] = None,
    prompt: Optional[DispatchPrompt] = None,
    seed: int = 0,
) -> list[Example]:
    """Category questions built from the experts' task data, optionally with an `others` class.

    The reference trains the classifier on the experts' data only, so it never learns to answer `others`. Give
    `others` — ideally a mapping of several unrelated tasks — to teach it "no expert fits".

    Args:
        library ([`ExpertLibrary`]): Gives the category names and descriptions.
        task_examples (`Mapping[str, Sequence[Example]]`): For each expert name, examples of its task (typically
            its training split).
        others (`Sequence[Example]` or `Mapping[str, Sequence[Example]]`, *optional*): Examples of unrelated tasks,
            labelled `others`. A mapping (task name → examples) is drawn from evenly, round robin over the tasks in
            a seeded random order, up to `per_category` examples (default: as many as the largest expert
            category), so that no single unrelated task dominates the class.
        per_category (`int`, *optional*): Cap of examples per category (classes are balanced to it).
        prompt ([`DispatchPrompt`], *optional*): The category question; must match the one used at dispatch.
        seed (`int`): Seed of the sub-sampling and shuffling.

    Returns:
        `list[Example]`: Multiple-choice examples whose choices are the categories and whose target is the expert
        name (or `others`), shuffled.
    """
    if not task_examples:
        raise ValueError("task_examples is empty: give examples of at least one expert's task")
    unknown = [n for n in task_examples if n not in library.experts]
    if unknown:
        raise ValueError(f"task_examples names unknown expert(s) {unknown}; experts: {library.names}")
    prompt = prompt or DispatchPrompt()
    rng = random.Random(seed)
    names = library.names
    descriptions = [library.experts[n].description for n in names]
    sources: list[tuple[str, Sequence[Example]]] = list(task_examples.items())
    if isinstance(others, Mapping) and others:
        cap = per_category or max(len(exs) for exs in task_examples.values())
        sources.append((OTHERS, draw_evenly(others, cap, rng)))
    elif others:
        sources.append((OTHERS, others))
    out: list[Example] = []
    for label, exs in sources:
        exs = list(exs)
        if not exs:
            raise ValueError(f"no examples for category {label!r}")
        if per_category is not None and len(exs) > per_category:
            exs = rng.sample(exs, per_category)
        out.extend(prompt.example(library.tokenizer, names, descriptions, ex.prompt, label) for ex in exs)
    rng.shuffle(out)
    return out


def draw_evenly(tasks: Mapping[str, Sequence[Example]], total: int, rng: random.Random) -> list[Example]:
    """Up to `total` examples taken round robin from several tasks (each task's examples in a seeded random order).

    Args:
        tasks (`Mapping[str, Sequence[Example]]`): Task name → examples.
        total (`int`): How many to take.
        rng (`random.Random`): Source of the shuffling.
    """
    empty = [name for name, exs in tasks.items() if not exs]
    if empty:
        raise ValueError(f"others task(s) {empty} have no examples")
    queues = [rng.sample(list(exs), len(exs)) for exs in tasks.values()]
    out: list[Example] = []
    while len(out) < total and any(queues):
        for queue in queues:
            if queue and len(out) < total:
                out.append(queue.pop())
    return out


def base_model_copy(library: ExpertLibrary) -> nn.Module:
    """A deep copy of the library's base model with every adapter removed (the original weights)."""
    return copy.deepcopy(library.model).unload()


def train_classifier_expert(
    library: ExpertLibrary,
    examples: Sequence[Example],
    output_dir: Union[str, Path],
    *,
    steps: int = 30,
    learning_rate: float = 5e-3,
    batch_size: int = 8,
    max_length: Optional[int] = None,
    svf_config: Optional[SVFConfig] = None,
    seed: int = 0,
    base_model: Optional[nn.Module] = None,
    trainer_kwargs: Optional[dict[str, Any]] = None,
) -> Path:
    """Train an SVF classification expert by SFT on category questions and save it to `output_dir`.

    Args:
        library ([`ExpertLibrary`]): The experts (the classifier is trained on a copy of their base model).
        examples (`Sequence[Example]`): From [`build_classifier_examples`].
        output_dir: Where the adapter is saved.
        steps (`int`): Optimiser steps.
        learning_rate (`float`): AdamW learning rate.
        batch_size (`int`): Examples per step.
        max_length (`int`, *optional*): Token limit of a training sequence; default: the longest example (none is
            cut, so no answer is truncated away).
        svf_config ([`SVFConfig`], *optional*): Adapter config; default: the experts' target modules, mode and rank.
        seed (`int`): Training seed.
        base_model (`nn.Module`, *optional*): A fresh copy of the base model to train on (default: a deep copy of the
            library's, without adapters).
        trainer_kwargs (`dict`, *optional*): Extra `SFTConfig` fields (overrides of
            [`peft_spectral.training.sft_preset`]).

    Returns:
        `Path`: `output_dir`, holding an SVF adapter plus `transformer2_classifier.json` (categories, prompt).
    """
    examples = list(examples)
    if not examples:
        raise ValueError("examples is empty: build them with build_classifier_examples")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    ref = next(iter(library.experts.values())).config
    if svf_config is None:
        svf_config = SVFConfig(
            target_modules=sorted(ref.target_modules)
            if isinstance(ref.target_modules, (set, list))
            else ref.target_modules,
            mode=ref.mode,
            rank=ref.rank,
        )
    model = base_model if base_model is not None else base_model_copy(library)
    if getattr(ref, "base_model_name_or_path", None):
        model.name_or_path = ref.base_model_name_or_path  # so the saved config names the experts' base
    if max_length is None:
        max_length = _longest(library.tokenizer, examples) + 8
    with tempfile.TemporaryDirectory() as tmp:
        result = train_svf(
            model,
            library.tokenizer,
            examples,
            method="sft",
            kind="multiple_choice",
            output_dir=tmp,
            max_steps=steps,
            svf_config=copy.deepcopy(svf_config),
            learning_rate=learning_rate,
            per_device_train_batch_size=batch_size,
            max_length=max_length,
            seed=seed,
            **(trainer_kwargs or {}),
        )
        result.model.save_pretrained(str(output_dir))
    meta = {
        "categories": library.names + [OTHERS],
        "n_examples": len(examples),
        "steps": steps,
        "learning_rate": learning_rate,
        "trained_with": "peft_spectral.training",
    }
    (output_dir / CLASSIFIER_METADATA).write_text(json.dumps(meta, indent=2))
    return output_dir


def _longest(tokenizer, examples: Sequence[Example]) -> int:
    return max(len(encode_prompt(tokenizer, ex)) + len(encode_answer(tokenizer, ex.target)) for ex in examples)
