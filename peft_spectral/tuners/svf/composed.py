"""Composed weights: an SVF layer's adapted weight `W'` built once per change of `z` and reused by every forward that
needs no gradient (sampling rollouts, evaluation, the experts of Transformer²'s pass 2, CEM's shots).

The factored forms of [`SVFLinear`] apply a targeted weight as two matmuls (`x Q`, then `· (s ⊙ ·) Pᵀ`): on a square
matrix twice the base layer's multiply-adds per token. Without a gradient nothing needs the factors, so the layer
composes `W' = W + P diag(s - 1) Qᵀ` (the exact form: `W + W Q_k diag(s - 1) Q_kᵀ`) once, in float32, rounds it to
the base weight's dtype (as a merge would), keeps it, and runs each such forward as the base layer does, one matmul
with `W'`. The loss and backward keep the factored form: a forward whose output needs a gradient never uses `W'`,
and it frees the cached one, so that a training step's peak memory holds no dense copy.

**When it composes** (`SVFConfig.compose_inference=True`, the default). Composing costs `out·in·m` multiply-adds,
as much as `out·in·m / (m·(out + in) - out·in)` tokens of the factored form's extra cost (1,540 tokens for
SmolLM2-135M's 576×1536 MLP matrices, 576 for its square ones; `SVFLinear.compose_break_even_tokens`). A layer
composes once the tokens it has run without gradient at the current `z`, plus those it will still run in the current
generation, reach that break-even (a ski-rental rule: never more than about twice the cheaper choice in hindsight).
A decoding step (one new token per row) counts as [`decoding_step_tokens`] tokens or its rows, whichever is more: its
small matmuls are bound by reading the weights, where one dense `W'` beats two factors by more than the arithmetic
says. How many steps a generation still has is known inside `generate` of an SVF `PeftModel` (`max_new_tokens`,
`generation_config.max_new_tokens` or `max_length`; see [`generation_length`]): a long generation composes at its
first decoding step, a short one (a few tokens on a CPU) stays factored, and repeated short ones at the same `z` (an
evaluation's batches) compose once their count makes it pay — or at once where the caller says how many decoding
steps its later calls will run ([`later_decoding_steps`]; `peft_spectral.evaluation`'s generation does, so an
evaluation whose batches together pay composes in its first batch). Where the length is unknown (a hand-written decoding
loop, `generate` of the base model under the adapter) a decoding step composes at once. A sampling round of
GRPO/RLOO therefore composes once and decodes every token with `W'`; a validation evaluation or Transformer²'s pass 2
likewise from its first or second batch; CEM's few shots per candidate stay factored unless they are many.
`composed_inference(model, True)` composes at the first forward without gradient, whatever the count.

**When `W'` is rebuilt.** A cached `W'` belongs to one set of active adapters and to the exact tensors it was built
from: each `z`, the base weight and its bias, by identity, storage and in-place version (`_version`, which
`optimizer.step()` of torch's foreach/for-loop optimizers, `load_state_dict` and any in-place op under
`torch.no_grad()` bump). Some writes do not bump it: fused optimizers (`AdamW(fused=True)`, DeepSpeed's), and writes
through `.data` (`param.data.copy_(...)`). For the first, every `optimizer.step()` of any torch optimizer in the
process (a global post-step hook, registered when this module is imported) invalidates every cached `W'`. For the
second, call [`clear_composed_weights`] after such a write (or write under `torch.no_grad()` without `.data`).
Switching adapters (`set_adapter`), adding or deleting one, merging, and disabling adapters are all seen: the layer
then composes for the new set at its next forward, or does not use `W'` at all (merged, disabled).

**Where it is not used.** Weights partitioned by DeepSpeed ZeRO-3 or flattened by FSDP (a cached dense `W'` would
undo the partitioning on every rank), inside `torch.compile` tracing, and integer (quantized) base weights: there the
layer keeps its per-call choice between the factored forms and recomposing.

**Memory.** One dense weight per adapted layer (in the base weight's dtype) while cached: as much as the targeted
weights themselves. It is freed by the next forward that needs a gradient, by `merge`, by [`clear_composed_weights`]
and by leaving `composed_inference(model, enabled=False)`; `SVFConfig(compose_inference=False)` never builds it.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from typing import Optional

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .._merge import is_zero3_partitioned


__all__ = [
    "ComposedWeightCache",
    "clear_composed_weights",
    "composed_inference",
    "composed_weight_bytes",
    "decoding_step_tokens",
    "generation_length",
    "is_sharded",
    "later_decoding_steps",
]

#: Per device type: the tokens of the factored form whose extra multiply-adds cost as much time as one decoding step
#: loses to the composed weight (a decoding step reads the factors, `m·(out + in)` values, instead of `out·in`).
#: The CPU figure is measured: on 2 cores, composing SmolLM2-135M's 90 MLP matrices (~0.9 s) paid for itself after
#: ~22 decoding steps of a batch of 8 (`benchmarks/bench_rollout.py`), i.e. `1540 / 22 ≈ 70` tokens per step. The
#: other devices' figure is an estimate from their ratio of arithmetic to memory bandwidth, not a measurement; edit
#: this mapping to tune it for a machine.
DECODING_STEP_TOKENS: dict[str, int] = {"cpu": 64}
#: [`DECODING_STEP_TOKENS`] of a device type the mapping does not name (accelerators: compose within a few steps).
DEFAULT_DECODING_STEP_TOKENS = 512


def decoding_step_tokens(device: torch.device) -> int:
    """Tokens of the factored form one decoding step on `device` counts as (see [`DECODING_STEP_TOKENS`])."""
    return DECODING_STEP_TOKENS.get(torch.device(device).type, DEFAULT_DECODING_STEP_TOKENS)


# Bumped by every optimizer step in the process; part of every cache key (see the module docstring).
_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


_STEP_HOOK = register_optimizer_step_post_hook(_count_optimizer_step)


def optimizer_steps() -> int:
    """How many `optimizer.step()` calls (of any torch optimizer) this process has made since the import."""
    return _optimizer_steps


def is_sharded(param: torch.Tensor) -> bool:
    """Whether `param` is partitioned across processes (DeepSpeed ZeRO-3, FSDP's flat parameters, a DTensor)."""
    return (
        is_zero3_partitioned(param)
        or bool(getattr(param, "_fsdp_flattened", False))
        or type(param).__name__ == "DTensor"
    )


class ComposedWeightCache:
    """One cached composed weight, the key it was built for, and the tokens run without it at the current key.

    The key holds weak references to the tensors (so that a freed tensor whose memory and `id` are reused never
    matches) with their storage address and in-place version, the adapter names and the optimizer-step count.
    Copies (`copy.deepcopy`) and pickles of a layer get an empty cache.
    """

    __slots__ = ("_key", "pending_tokens", "weight")

    def __init__(self) -> None:
        self._key: Optional[tuple] = None
        self.weight: Optional[torch.Tensor] = None
        self.pending_tokens = 0

    def __reduce__(self):
        return (ComposedWeightCache, ())

    def matches(self, names: tuple[str, ...], tensors: Sequence[torch.Tensor]) -> bool:
        """Whether the key is that of `names` and exactly `tensors` as they are now."""
        key = self._key
        if key is None or key[0] != _optimizer_steps or key[1] != names or len(key[2]) != len(tensors):
            return False
        return all(
            ref() is t and ptr == t.data_ptr() and version == t._version
            for (ref, ptr, version), t in zip(key[2], tensors)
        )

    def lookup(self, names: tuple[str, ...], tensors: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
        """The cached weight if it was composed for `names` from exactly `tensors` as they are now, else `None`."""
        return self.weight if self.weight is not None and self.matches(names, tensors) else None

    def add_tokens(self, names: tuple[str, ...], tensors: Sequence[torch.Tensor], tokens: int) -> int:
        """Count `tokens` run without a composed weight at the current key (restarting at a new key); the total."""
        if not self.matches(names, tensors):
            self._set_key(names, tensors)
            self.weight, self.pending_tokens = None, 0
        self.pending_tokens += tokens
        return self.pending_tokens

    def store(self, names: tuple[str, ...], tensors: Sequence[torch.Tensor], weight: torch.Tensor) -> None:
        """Keep `weight` as the composition of `names` from `tensors` (their current versions)."""
        self._set_key(names, tensors)
        self.weight, self.pending_tokens = weight, 0

    def _set_key(self, names: tuple[str, ...], tensors: Sequence[torch.Tensor]) -> None:
        self._key = (_optimizer_steps, names, tuple((weakref.ref(t), t.data_ptr(), t._version) for t in tensors))

    def clear(self) -> int:
        """Drop the cached weight and the token count; returns the bytes it held."""
        freed = self.nbytes
        self._key, self.weight, self.pending_tokens = None, None, 0
        return freed

    @property
    def nbytes(self) -> int:
        """Bytes of the cached weight (0 when none)."""
        return 0 if self.weight is None else self.weight.numel() * self.weight.element_size()


def _svf_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "svf_composed", None), ComposedWeightCache)]


def clear_composed_weights(model: nn.Module) -> int:
    """Free the composed weights cached by the SVF layers of `model`; returns the bytes freed.

    Call it after writing an adapter's `z` (or a base weight) through `.data`, which the cache cannot see, or to give
    the memory back; the next forward without gradient composes again.
    """
    return sum(layer.svf_composed.clear() for layer in _svf_layers(model))


def composed_weight_bytes(model: nn.Module) -> int:
    """Bytes held by the composed weights cached in the SVF layers of `model`."""
    return sum(layer.svf_composed.nbytes for layer in _svf_layers(model))


@contextlib.contextmanager
def composed_inference(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Context in which the SVF layers of `model` compose at their first forward without gradient (`enabled=True`)
    or never (`False`), whatever their adapters' `SVFConfig.compose_inference` says (whose `True` composes when it
    pays, see the module docstring).

    On exit each layer is back to its config's choice; with `enabled=False` the cached weights are freed on entry.

    Args:
        model (`nn.Module`): The model holding the SVF layers (a `PeftModel`, its base model or a layer).
        enabled (`bool`, defaults to `True`): Use the composed weight or the factored forms.
    """
    layers = _svf_layers(model)
    previous = [layer.svf_compose_override for layer in layers]
    try:
        for layer in layers:
            layer.svf_compose_override = bool(enabled)
            if not enabled:
                layer.svf_composed.clear()
        yield
    finally:
        for layer, value in zip(layers, previous):
            layer.svf_compose_override = value


def new_tokens_of_generate(kwargs: dict) -> Optional[int]:
    """How many tokens a `generate(**kwargs)` call will decode at most, or `None` where its kwargs do not say.

    Read from `max_new_tokens`, then `generation_config.max_new_tokens`, then `max_length` (of the kwargs or the
    generation config) minus the prompt's length. Only calls that pass one of `max_new_tokens`, `max_length` or
    `generation_config` are read (a `forward` passes none of them).
    """
    config = kwargs.get("generation_config")
    if "max_new_tokens" not in kwargs and "max_length" not in kwargs and config is None:
        return None
    new = kwargs.get("max_new_tokens")
    if new is None and config is not None:
        new = getattr(config, "max_new_tokens", None)
    if new is None:
        max_length = kwargs.get("max_length") or getattr(config, "max_length", None)
        ids = kwargs.get("input_ids")
        if max_length is None or ids is None:
            return None
        new = max_length - ids.shape[-1]
    return max(int(new), 0)


@contextlib.contextmanager
def generation_length(model: nn.Module, max_new_tokens: Optional[int]) -> Iterator[None]:
    """Context telling the SVF layers of `model` that the generation inside decodes at most `max_new_tokens` tokens,
    so that the automatic rule (see the module docstring) keeps a short generation factored.

    `generate` of an SVF `PeftModel` enters it by itself; call it around a generation that does not go through it
    (e.g. `generate` of the base model with the adapter active). `None` leaves the layers as they are.

    Args:
        model (`nn.Module`): The model holding the SVF layers.
        max_new_tokens (`int` or `None`): The generation's budget of new tokens.
    """
    if max_new_tokens is None:
        yield
        return
    layers = _svf_layers(model)
    previous = [layer.svf_decoding_steps_left for layer in layers]
    try:
        for layer in layers:
            # the first new token comes from the prompt's forward; the others from decoding steps
            layer.svf_decoding_steps_left = max(int(max_new_tokens) - 1, 0)
        yield
    finally:
        for layer, value in zip(layers, previous):
            layer.svf_decoding_steps_left = value


@contextlib.contextmanager
def later_decoding_steps(model: nn.Module, steps: int) -> Iterator[None]:
    """Context telling the SVF layers of `model` that, after the generation inside, later generations at the same `z`
    will run about `steps` more decoding steps (an evaluation's remaining batches), so that the automatic rule counts
    them with the current generation's and composes in the first call when the whole evaluation pays for it.

    Args:
        model (`nn.Module`): The model holding the SVF layers.
        steps (`int`): Decoding steps of the later calls (their batches times their new tokens, less the first token
            of each, which comes from the prompt's forward).
    """
    layers = _svf_layers(model)
    previous = [layer.svf_decoding_steps_later for layer in layers]
    try:
        for layer in layers:
            layer.svf_decoding_steps_later = max(int(steps), 0)
        yield
    finally:
        for layer, value in zip(layers, previous):
            layer.svf_decoding_steps_later = value
