"""The searches on more than one process, through Accelerate: shard work, sum gradients, gather results.

Under `accelerate launch --num_processes N` (or torchrun), [`launched_state`] returns Accelerate's `PartialState`
and the searches split their work: C2I's gradient pass splits the calibration examples and sums the singular-value
gradients ([`sum_across_processes`]); LASER's grid, C2I's top candidates and each generation of the CEM population
(Transformer²'s few-shot mixing) are evaluated in rounds of N, one candidate per process, and the results gathered
on every process ([`map_across_processes`]). In a plain Python process nothing is initialised and nothing is
imported: the searches run as on one process.

Every process must call the same search with the same arguments (as with any collective operation).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Optional, TypeVar

import torch


__all__ = ["launched_state", "map_across_processes", "sum_across_processes"]

T = TypeVar("T")
R = TypeVar("R")


def _launched() -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launched_state():
    """Accelerate's `PartialState` when this process is one of several launched ones, else `None`.

    Only a launch with more than one process (`WORLD_SIZE > 1` in the environment, as `accelerate launch` and
    torchrun set it, or an initialised process group) initialises the state; a plain process returns `None` without
    importing Accelerate. On a machine without an accelerator the processes talk over gloo (Accelerate's
    MULTI_CPU).

    Returns:
        `accelerate.PartialState` or `None`.
    """
    if not _launched():
        return None
    from accelerate import PartialState

    # without an accelerator, a multi-process launch is MULTI_CPU over gloo only when asked for the CPU
    state = PartialState(cpu=not torch.accelerator.is_available())
    return state if state.num_processes > 1 else None


def sum_across_processes(tensor: torch.Tensor, state) -> torch.Tensor:
    """The sum of `tensor` over all processes, on every process (on `tensor`'s device and dtype).

    Args:
        tensor (`torch.Tensor`): This process's share.
        state (`accelerate.PartialState` or `None`): From [`launched_state`]; `None` returns `tensor` unchanged.
    """
    if state is None:
        return tensor
    from accelerate.utils import reduce

    return reduce(tensor.to(state.device), reduction="sum").to(tensor.device)


def map_across_processes(
    fn: Callable[[T], R],
    items: Sequence[T],
    state,
    on_round: Optional[Callable[[list[tuple[int, R]]], Any]] = None,
) -> list[R]:
    """`[fn(item) for item in items]`, the items shared out across processes, the full list on every process.

    The items go in rounds of `num_processes`, split with `state.split_between_processes`; after each round the
    results are gathered (`accelerate.utils.gather_object`, so they must pickle) and `on_round` is called on every
    process with that round's `(index, result)` pairs (one pair per round on one process), e.g. to write a checkpoint.

    Args:
        fn (`Callable`): The work on one item.
        items (`Sequence`): The items.
        state (`accelerate.PartialState` or `None`): From [`launched_state`]; `None` runs every item here.
        on_round (`Callable`, *optional*): Called after each round with its `(index, result)` pairs.

    Returns:
        `list`: `fn(item)` for every item, in order.
    """
    out: list = [None] * len(items)
    step = 1 if state is None else state.num_processes
    for start in range(0, len(items), step):
        indices = list(range(start, min(start + step, len(items))))
        if state is None:
            done = [(i, fn(items[i])) for i in indices]
        else:
            from accelerate.utils import gather_object

            with state.split_between_processes(indices) as mine:
                local = [(i, fn(items[i])) for i in mine]
            done = sorted(gather_object(local), key=lambda pair: pair[0])
        for i, result in done:
            out[i] = result
        if on_round is not None:
            on_round(done)
    return out
