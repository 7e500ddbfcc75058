"""Writing a merged weight into a wrapped layer and restoring the original, also under DeepSpeed ZeRO-3.

The three tuners merge the same way: compute the new weight from the full base weight, keep the original for an
exact `unmerge`, write the new one. Without DeepSpeed the original tensor itself is the backup (the layer's
`weight.data` is replaced, not written in place). Under ZeRO-3 every rank holds an empty `weight` and a shard of it
(`weight.ds_tensor`): the merge gathers the full weight on every rank (`deepspeed.zero.GatheredParameters`; rank 0's
result is re-partitioned), and the backup is this rank's shard of the original, so that an adapter's merge costs
each rank `1/world` of the weight, as the weight itself does. `unmerge` gathers the original's shards back into the
full weight. Both are collective under ZeRO-3: every rank must call them together.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional

import torch
from torch import nn


__all__ = ["is_zero3_partitioned", "restore_weight", "write_merged_weight"]


def is_zero3_partitioned(param: torch.Tensor) -> bool:
    """Whether `param` is partitioned by DeepSpeed ZeRO-3 (created under `deepspeed.zero.Init`)."""
    return hasattr(param, "ds_id") and hasattr(param, "ds_tensor")


def write_merged_weight(
    base: nn.Module,
    new_weight: Callable[[torch.Tensor], torch.Tensor],
    backup: Optional[torch.Tensor],
    params: Sequence[torch.Tensor] = (),
    safe_merge: bool = False,
    adapter_name: str = "",
) -> torch.Tensor:
    """Replaces `base.weight` by `new_weight(full weight)` and returns the backup to keep for [`restore_weight`].

    Args:
        base (`nn.Module`): The wrapped layer (its `weight` is written).
        new_weight (`Callable`): Maps the current full weight (in `base.weight`'s layout and dtype) to the merged one
            of the same shape; it may raise (e.g. on non-finite values) before anything is written.
        backup (`torch.Tensor`, *optional*): The backup kept by an earlier merge of this layer; it is returned
            unchanged, so that `unmerge` restores the weight from before the *first* merge.
        params (`Sequence[torch.Tensor]`, *optional*): The adapter's parameters that `new_weight` reads; under
            ZeRO-3 they are partitioned too (by `deepspeed.initialize`) and are gathered with the weight.
        safe_merge (`bool`, defaults to `False`): Check the new weight for NaN/inf before writing it.
        adapter_name (`str`, *optional*): The adapter being merged, for the error message.

    Raises:
        `ValueError`: with `safe_merge`, when the new weight holds NaN or inf (nothing is written).

    Returns:
        `torch.Tensor`: The original weight (this rank's shard of it under ZeRO-3).
    """

    def checked(weight: torch.Tensor) -> torch.Tensor:
        new = new_weight(weight)
        if safe_merge and not torch.isfinite(new).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter '{adapter_name}' seems to be broken")
        return new

    weight = base.weight
    with torch.no_grad():
        if not is_zero3_partitioned(weight):
            new = checked(weight.data)
            backup = weight.data if backup is None else backup
            weight.data = new
            return backup
        if backup is None:
            backup = weight.ds_tensor.detach().clone()
        with _gathered([weight, *(p for p in params if is_zero3_partitioned(p))]):
            weight.data.copy_(checked(weight.data))
        return backup


def _gathered(params: list[torch.Tensor]):
    """The full `params` on every rank; what rank 0 writes is partitioned again on exit.

    DeepSpeed's own context, not PEFT's `gather_params_ctx`: that one does nothing unless a transformers
    `HfDeepSpeedConfig` is alive, whereas a partitioned weight must be gathered whatever created it.
    """
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def restore_weight(base: nn.Module, backup: torch.Tensor) -> None:
    """Writes back the weight saved by [`write_merged_weight`], bit for bit.

    Args:
        base (`nn.Module`): The wrapped layer.
        backup (`torch.Tensor`): What [`write_merged_weight`] returned.
    """
    weight = base.weight
    with torch.no_grad():
        if not is_zero3_partitioned(weight):
            weight.data = backup
            return
        import torch.distributed as dist

        group = weight.ds_process_group
        with _gathered([weight]):
            # DeepSpeed's layout: rank r holds elements [r·n, (r+1)·n) of the flattened weight (the last shard padded)
            shard = backup.to(weight.data.device).contiguous()
            shards = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
            dist.all_gather(shards, shard, group=group)
            weight.data.copy_(torch.cat(shards)[: weight.ds_numel].view(weight.ds_shape))
