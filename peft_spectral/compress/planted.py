"""A planted problem with a known helpful truncation: for tests, benchmarks' smoke runs and demos on tiny models.

[`planted_problem`] takes a model, keeps the top singular directions of one weight (scaled up so that they matter)
and adds noise in the remaining directions, below the kept singular values. The examples are labelled by the clean
model, so truncating that weight to the clean rank recovers the clean model, and every answer, exactly.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass

import torch
from torch import nn

from ..data import Example
from ..linalg import thin_svd
from .weights import weight_matrix


__all__ = ["PlantedProblem", "planted_problem", "random_choice_examples"]


def random_choice_examples(n: int, seed: int = 0, prompt_chars: int = 12, option_chars: int = 3) -> list[Example]:
    """`n` two-option examples of random letters (label 0; relabel them with a model).

    Args:
        n (`int`): Number of examples.
        seed (`int`, defaults to 0): Seed of the text.
        prompt_chars (`int`, defaults to 12): Prompt length in characters.
        option_chars (`int`, defaults to 3): Option length in characters.
    """
    rng = random.Random(seed)

    def text(k):
        return "".join(rng.choice("abcdefghij klmnop") for _ in range(k))

    out = []
    for _ in range(n):
        choices = (text(option_chars), text(option_chars))
        out.append(Example(prompt=text(prompt_chars), target=choices[0], choices=choices, label=0))
    return out


@dataclass
class PlantedProblem:
    """The noisy model and its examples.

    Args:
        model (`nn.Module`): The model with the noisy weight.
        validation (`list[Example]`): `n_disagree` examples the noise answers wrongly, then `n_agree` it answers right.
        train (`list[Example]`): The remaining examples.
        module (`str`): The noisy weight's module.
        rank (`int`): The clean rank (truncating `module` to it recovers the clean model).
    """

    model: nn.Module
    validation: list
    train: list
    module: str
    rank: int


def _plant(clean: nn.Module, module: str, rank: int, scale: float) -> nn.Module:
    noisy = copy.deepcopy(clean)
    w = weight_matrix(clean.get_submodule(module)).detach()
    u, s, v = thin_svd(w)
    clean_w = (u[:, :rank] * (scale * s[:rank])) @ v[:, :rank].T
    noise_s = torch.linspace(0.95, 0.8, u.shape[1] - rank) * scale * s[rank - 1]  # below the clean spectrum
    noise = (u[:, rank:] * noise_s) @ v[:, rank:].T
    for model, new in ((clean, clean_w), (noisy, clean_w + noise)):
        target = model.get_submodule(module)
        with torch.no_grad():
            target.weight.copy_(new.T if type(target).__name__ == "Conv1D" else new)
    return noisy


def planted_problem(
    model: nn.Module,
    tokenizer,
    module: str,
    *,
    rank: int = 6,
    scale: float = 20.0,
    n_examples: int = 160,
    n_disagree: int = 12,
    n_agree: int = 8,
    seed: int = 7,
) -> PlantedProblem:
    """Plant a helpful truncation of `module` into (a copy of) `model` and label examples with the clean model.

    Args:
        model (`nn.Module`): A small causal LM (changed in place into the clean model; the noisy one is a copy).
        tokenizer: Its tokenizer.
        module (`str`): The weight to plant the noise in.
        rank (`int`, defaults to 6): The clean rank.
        scale (`float`, defaults to 20.0): Factor on the clean singular values (so the weight matters).
        n_examples (`int`, defaults to 160): Pool of random two-option examples.
        n_disagree (`int`, defaults to 12): Validation examples that the noise answers wrongly.
        n_agree (`int`, defaults to 8): Validation examples that it answers right.
        seed (`int`, defaults to 7): Seed of the example texts.

    Raises:
        `ValueError`: if the noise changes fewer than `n_disagree` answers (use more examples or a larger scale).
    """
    from ..evaluation import option_logliks

    noisy = _plant(model, module, rank, scale)
    pool = random_choice_examples(n_examples, seed=seed)
    clean_ll = option_logliks(model, tokenizer, pool, batch_size=32)
    noisy_ll = option_logliks(noisy, tokenizer, pool, batch_size=32)
    disagree, agree = [], []
    for ex, a, b in zip(pool, clean_ll, noisy_ll):
        label = int(torch.tensor(a).argmax())
        ex = Example(ex.prompt, ex.choices[label], ex.choices, label)
        (agree if int(torch.tensor(b).argmax()) == label else disagree).append(ex)
    if len(disagree) < n_disagree:
        raise ValueError(f"the planted noise changes only {len(disagree)} answers, fewer than n_disagree={n_disagree}")
    validation = disagree[:n_disagree] + agree[:n_agree]
    train = disagree[n_disagree:] + agree[n_agree:]
    return PlantedProblem(noisy, validation, train, module, rank)
