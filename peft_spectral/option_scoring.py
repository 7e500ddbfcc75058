"""Fast option scoring for multiple-choice prompts: each prompt is run once, shared prefixes once per call.

[`peft_spectral.evaluation.option_logliks`] runs `prompt + option` as one sequence per option. Here the prompts
of a batch are run once (left-padded, after a shared prefix that is run once and broadcast through the KV cache),
and the options are scored from the cached keys/values. Single-token options (letters, short labels) need no second
forward at all. This is what makes a CEM fitness evaluation or a dispatch pass cheap; results match
`option_logliks` up to float rounding (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from .data import Example
from .model_utils import eval_mode, model_device, pad_token_id
from .prompting import encode_answer, encode_prompt


@dataclass
class OptionScores:
    """Log-likelihoods of the options of each prompt.

    Args:
        sums (`list[list[float]]`): Summed log p(option | prompt) per option.
        lengths (`list[list[int]]`): Number of tokens of each option.
    """

    sums: list[list[float]]
    lengths: list[list[int]]

    def argmax(self) -> list[int]:
        """Index of the most likely option (by summed log-likelihood) of each prompt."""
        return [max(range(len(s)), key=s.__getitem__) for s in self.sums]

    def mean_token_loglik(self, row: int, option: int) -> float:
        """Mean per-token log-likelihood of one option."""
        return self.sums[row][option] / self.lengths[row][option]


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of token sequences."""
    if not sequences:
        return 0
    first = sequences[0]
    n = min(len(s) for s in sequences)
    for i in range(n):
        tok = first[i]
        if any(s[i] != tok for s in sequences):
            return i
    return n


def _cache_kwarg(model) -> str:
    """Name of the forward argument taking a KV cache (`cache` in recent transformers, else `past_key_values`)."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(inner.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _out_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _kv_pairs(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(k, v) for k, v, *_ in cache]


def _make_cache(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], index: torch.Tensor):
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(k.index_select(0, index), v.index_select(0, index)) for k, v in pairs])


class PrefixState:
    """Keys/values of a shared token prefix for one model state, reusable across calls.

    Args:
        ids (`list[int]`): The prefix tokens.
        pairs: Per-layer `(keys, values)` of batch size 1.
        last_logits (`torch.Tensor`): Logits after the last prefix token.
    """

    def __init__(self, ids: list[int], pairs, last_logits: torch.Tensor):
        self.ids = ids
        self.pairs = pairs
        self.last_logits = last_logits


@torch.no_grad()
def run_prefix(model, ids: Sequence[int]) -> PrefixState:
    """Run a token prefix once and keep its keys/values."""
    device = model_device(model)
    out = model(input_ids=torch.tensor([list(ids)], device=device), use_cache=True, logits_to_keep=1)
    return PrefixState(list(ids), _kv_pairs(_out_cache(out)), out.logits[:, -1])


@torch.no_grad()
def score_option_ids(
    model,
    prompts: Sequence[Sequence[int]],
    options: Sequence[Sequence[Sequence[int]]],
    *,
    pad_id: int,
    batch_size: int = 8,
    share_prefix: bool = True,
    prefix: Optional[PrefixState] = None,
    progress: bool = False,
) -> OptionScores:
    """Summed log-likelihood of every option token sequence given its prompt token sequence.

    Args:
        model: A causal LM supporting `past_key_values`, `position_ids` and a 2-D `attention_mask`.
        prompts: Token ids of each prompt (non-empty).
        options: For each prompt, the token ids of each option (each non-empty).
        pad_id (`int`): Padding token id.
        batch_size (`int`): Prompts per forward pass.
        share_prefix (`bool`): Run the longest common prefix of all prompts once.
        prefix ([`PrefixState`], *optional*): A precomputed prefix (for the current model state) that every prompt
            starts with; overrides `share_prefix`.
        progress (`bool`): Show a tqdm bar over the batches.

    Returns:
        [`OptionScores`]
    """
    if len(prompts) != len(options):
        raise ValueError(f"{len(prompts)} prompts but {len(options)} option lists")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for i, (p, opts) in enumerate(zip(prompts, options)):
        if not p:
            raise ValueError(f"prompt {i} encodes to zero tokens")
        if not opts or any(len(o) == 0 for o in opts):
            raise ValueError(f"prompt {i} has no options or an option with zero tokens")
    if not prompts:
        return OptionScores([], [])
    device = model_device(model)
    if prefix is not None:
        plen = len(prefix.ids)
        if any(list(p[:plen]) != prefix.ids or len(p) <= plen for p in prompts):
            raise ValueError("every prompt must start with the given prefix and be longer than it")
    elif share_prefix and len(prompts) > 1:
        plen = min(common_prefix_length(prompts), min(len(p) for p in prompts) - 1)
        prefix = run_prefix(model, prompts[0][:plen]) if plen > 0 else None
    else:
        plen = 0

    cache_kw = _cache_kwarg(model)
    sums: list[list[float]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    with eval_mode(model):
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc="scoring", disable=not progress, leave=False):
            rows = order[start : start + batch_size]
            segs = [list(prompts[i][plen:]) for i in rows]
            width = max(len(s) for s in segs)
            b = len(rows)
            ids = torch.full((b, width), pad_id, dtype=torch.long)
            seg_mask = torch.zeros((b, width), dtype=torch.long)
            for r, s in enumerate(segs):
                ids[r, width - len(s) :] = torch.tensor(s)
                seg_mask[r, width - len(s) :] = 1
            seg_pos = (seg_mask.cumsum(-1) - 1).clamp_min(0) + plen
            full_mask = torch.cat([torch.ones((b, plen), dtype=torch.long), seg_mask], dim=1)
            kwargs: dict[str, Any] = {}
            if prefix is not None:
                kwargs[cache_kw] = _make_cache(prefix.pairs, torch.zeros(b, dtype=torch.long, device=device))
            out = model(
                input_ids=ids.to(device),
                attention_mask=full_mask.to(device),
                position_ids=seg_pos.to(device),
                use_cache=True,
                logits_to_keep=1,
                **kwargs,
            )
            last_logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
            seg_lens = seg_mask.sum(-1)
            # options: (row, option) pairs
            pairs = [(r, j) for r, i in enumerate(rows) for j in range(len(options[i]))]
            opt_ids = [list(options[rows[r]][j]) for r, j in pairs]
            first = torch.tensor([o[0] for o in opt_ids], device=last_logp.device)
            row_idx = torch.tensor([r for r, _ in pairs], device=last_logp.device)
            totals = last_logp[row_idx, first].clone()
            longest = max(len(o) for o in opt_ids)
            if longest > 1:
                a = longest - 1  # feed all option tokens but the last
                n = len(pairs)
                o_ids = torch.full((n, a), pad_id, dtype=torch.long)
                o_mask = torch.zeros((n, a), dtype=torch.long)
                for k, o in enumerate(opt_ids):
                    if len(o) > 1:
                        o_ids[k, : len(o) - 1] = torch.tensor(o[:-1])
                        o_mask[k, : len(o) - 1] = 1
                cpu_rows = torch.tensor([r for r, _ in pairs])
                mask = torch.cat([full_mask[cpu_rows], o_mask], dim=1)
                pos = (plen + seg_lens[cpu_rows])[:, None] + torch.arange(a)[None, :]
                cache = _make_cache(_kv_pairs(_out_cache(out)), row_idx)
                o_out = model(
                    input_ids=o_ids.to(device),
                    attention_mask=mask.to(device),
                    position_ids=pos.to(device),
                    use_cache=True,
                    **{cache_kw: cache},
                )
                o_logp = torch.log_softmax(o_out.logits.float(), dim=-1)
                for k, o in enumerate(opt_ids):
                    if len(o) > 1:
                        tgt = torch.tensor(o[1:], device=o_logp.device)
                        totals[k] += o_logp[k, : len(o) - 1].gather(-1, tgt[:, None]).sum()
            for k, (r, j) in enumerate(pairs):
                sums[rows[r]].append(float(totals[k]))
    lengths = [[len(o) for o in opts] for opts in options]
    return OptionScores(sums, lengths)


def encode_examples(tokenizer, examples: Sequence[Example]) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Token ids of the formatted prompts and of the options of multiple-choice examples.

    Uses the same encoding as [`peft_spectral.evaluation.option_logliks`] (chat template when the tokenizer has one,
    options encoded alone without special tokens).
    """
    prompts, options = [], []
    for i, ex in enumerate(examples):
        if not ex.choices:
            raise ValueError(f"examples[{i}] has no choices; option scoring needs multiple-choice examples")
        prompts.append(encode_prompt(tokenizer, ex))
        options.append([encode_answer(tokenizer, c) for c in ex.choices])
    return prompts, options


def score_examples(
    model, tokenizer, examples: Sequence[Example], *, batch_size: int = 8, progress: bool = False
) -> OptionScores:
    """[`score_option_ids`] for multiple-choice [`Example`]s."""
    prompts, options = encode_examples(tokenizer, examples)
    return score_option_ids(
        model, prompts, options, pad_id=pad_token_id(tokenizer, model), batch_size=batch_size, progress=progress
    )


def multiple_choice_metrics(scores: OptionScores, labels: Sequence[Optional[int]]) -> tuple[list[bool], float]:
    """Per-example correctness (argmax of summed log-likelihood) and the mean gold per-token log-likelihood."""
    picks = scores.argmax()
    correct = [lab is not None and p == lab for p, lab in zip(picks, labels)]
    golds = [scores.mean_token_loglik(i, lab) for i, lab in enumerate(labels) if lab is not None]
    return correct, (sum(golds) / len(golds) if golds else float("nan"))
