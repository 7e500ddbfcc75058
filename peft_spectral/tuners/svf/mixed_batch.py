"""Mixed-adapter batches for SVF: one adapter (or the base model) per example of a batch.

As with PEFT's LoRA (`model(..., adapter_names=[...])` / `model.generate(..., adapter_names=[...])`, `"__base__"` for
the unadapted model), each row of the batch is answered by its own SVF adapter in a single forward pass. SVF makes
this cheap: the adapters of a layer share `Q`, so the correction `((x Q_k) ⊙ (s_row - 1)) Q_kᵀ` is computed for the
whole batch at once with one scale vector per row, for the rows that use an adapter only (rows of the base model go
through the base layer alone: exactly its output, at its cost).

* [`mixed_batch_forward`]: the layer computation, called by `SVFLinear.forward` when it receives `adapter_names`.
* [`mixed_batch_hooks`]: the context that hands `adapter_names` to every SVF layer (used by
  `SVFModel._enable_peft_forward_hooks`, and directly by callers whose inner code runs forwards of several batch
  sizes over the same rows, e.g. option scoring).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from typing import Any, Union

import torch
from torch import nn

from .factor_dtype import scaled_matmul


BASE_ADAPTER = "__base__"

AdapterNames = Union[Sequence[str], Mapping[int, Sequence[str]]]


def per_row_delta(layer: nn.Module, adapter_names: Sequence[str]) -> torch.Tensor | None:
    """`s_row - 1` for each row (zero rows for `"__base__"` and adapters this layer lacks), padded to the longest `k`.

    Args:
        layer (`SVFLayer`): The layer.
        adapter_names (`Sequence[str]`): One adapter name per row.

    Returns:
        `torch.Tensor` of shape `(rows, k)`, or `None` when no row uses an adapter of this layer.
    """
    unique = [a for a in dict.fromkeys(adapter_names) if a != BASE_ADAPTER and a in layer.svf_z]
    if not unique:
        return None
    scales = {a: layer.svf_scale(a) for a in unique}
    k = max(s.shape[0] for s in scales.values())
    ref = next(iter(scales.values()))
    delta = torch.zeros((len(adapter_names), k), dtype=ref.dtype, device=ref.device)
    for a, s in scales.items():
        rows = [i for i, name in enumerate(adapter_names) if name == a]
        delta[rows, : s.shape[0]] = (s - 1).to(delta.dtype)
    return delta


def mixed_batch_forward(layer: nn.Module, x: torch.Tensor, *args: Any, adapter_names: Sequence[str], **kwargs: Any):
    """Forward of an SVF layer where row `i` of `x` is answered by adapter `adapter_names[i]`.

    Equals running each group of rows through the layer with its adapter active (up to float rounding: the
    factored form is used here, or, when every row names the same adapter and no gradient is needed, that adapter's
    composed weight as in `SVFLinear.forward`), and the base layer exactly for `"__base__"` rows.

    Args:
        layer (`SVFLinear`): The layer.
        x (`torch.Tensor`): Input of shape `(rows, ..., in_features)`.
        adapter_names (`Sequence[str]`): One adapter name per row.
    """
    if len(adapter_names) != x.shape[0]:
        raise ValueError(
            f"adapter_names has {len(adapter_names)} entries but the batch has {x.shape[0]} rows; give one adapter "
            f"name per example (use {BASE_ADAPTER!r} for the base model)"
        )
    if layer.merged:
        raise ValueError("cannot use adapter_names (mixed-adapter batches) while adapters are merged; unmerge first")
    adapted = [i for i, name in enumerate(adapter_names) if name != BASE_ADAPTER and name in layer.svf_z]
    if not adapted:
        return layer.base_layer(x, *args, **kwargs)
    if len(adapted) == x.shape[0] and len(set(adapter_names)) == 1:
        # every row uses the same adapter: its composed weight where no gradient is needed (cached across batches)
        y = layer.composed_output(x, [adapter_names[0]])
        if y is not None:
            return y
    delta = per_row_delta(layer, [adapter_names[i] for i in adapted])
    q = layer.svf_Q[:, : delta.shape[1]]  # in the factor dtype; `delta` stays float32 (see `scaled_matmul`)
    delta = delta.reshape(delta.shape[0], *([1] * (x.ndim - 2)), delta.shape[1])
    # Only the adapted rows pay for the correction: the base model's rows go through the plain layer.
    rows = None if len(adapted) == x.shape[0] else torch.tensor(adapted, device=x.device)
    base = layer.get_base_layer()
    if layer.svf_side == "right":
        part = x if rows is None else x.index_select(0, rows)
        correction = scaled_matmul(part.to(q.dtype) @ q, delta, q.T).to(x.dtype)
        x = x + correction if rows is None else x.index_add(0, rows, correction)
        return layer.base_layer(x, *args, **kwargs)
    y = layer.base_layer(x, *args, **kwargs)
    lin = y if base.bias is None else y - base.bias
    part = lin if rows is None else lin.index_select(0, rows)
    correction = scaled_matmul(part.to(q.dtype) @ q, delta, q.T).to(y.dtype)
    return y + correction if rows is None else y.index_add(0, rows, correction)


def _names_for(adapter_names: AdapterNames, rows: int) -> Sequence[str]:
    if isinstance(adapter_names, Mapping):
        if rows not in adapter_names:
            raise ValueError(
                f"mixed-adapter batch of {rows} rows, but adapter names were given for batch sizes {sorted(adapter_names)}"
            )
        return adapter_names[rows]
    return adapter_names


def _pre_forward_hook(module, args, kwargs, adapter_names):
    x = args[0] if args else kwargs.get("x", kwargs.get("input"))
    kwargs["adapter_names"] = _names_for(adapter_names, x.shape[0])
    return args, kwargs


def check_adapter_names(model: nn.Module, adapter_names: AdapterNames, layer_cls: type) -> None:
    """Raise `ValueError` when `adapter_names` names an adapter no SVF layer of `model` holds."""
    known: set[str] = set()
    for module in model.modules():
        if isinstance(module, layer_cls):
            known |= set(module.svf_z.keys())
    lists = adapter_names.values() if isinstance(adapter_names, Mapping) else [adapter_names]
    for names in lists:
        if isinstance(names, str) or not isinstance(names, Sequence):
            raise TypeError(f"adapter_names must be a list of str (one per example), got {type(names).__name__}")
        unknown = sorted({n for n in names if n != BASE_ADAPTER} - known)
        if unknown:
            raise ValueError(
                f"adapter_names names non-existing adapter(s) {unknown}; loaded: {sorted(known)} "
                f"(or {BASE_ADAPTER!r} for the base model)"
            )


@contextlib.contextmanager
def mixed_batch_hooks(
    model: nn.Module, adapter_names: AdapterNames, *, layer_cls: type, num_beams: int | None = None
) -> Iterator[None]:
    """Context in which every SVF layer of `model` answers row `i` of its input with adapter `adapter_names[i]`.

    Args:
        model (`nn.Module`): The model holding the SVF layers (the tuner's model or the `PeftModel`).
        adapter_names (`Sequence[str]` or `Mapping[int, Sequence[str]]`): One adapter name per example
            (`"__base__"` for the base model); or, for code that runs forwards of several batch sizes over the same
            examples, a mapping from batch size to the names of that forward's rows.
        layer_cls (`type`): The SVF layer class (`SVFLayer`).
        num_beams (`int`, *optional*): With beam search, each name is repeated `num_beams` times (as in PEFT).

    Raises:
        `ValueError`: unknown adapter names, or the model is in training mode.
    """
    if model.training:
        raise ValueError("cannot pass `adapter_names` when the model is in training mode; call model.eval() first")
    check_adapter_names(model, adapter_names, layer_cls)
    if isinstance(num_beams, int) and num_beams > 1 and not isinstance(adapter_names, Mapping):
        adapter_names = [n for n in adapter_names for _ in range(num_beams)]
    handles = []
    try:
        for module in model.modules():
            if isinstance(module, layer_cls):
                hook = partial(_pre_forward_hook, adapter_names=adapter_names)
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
