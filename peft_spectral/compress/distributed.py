"""The multi-process helpers of the C2I and LASER searches; they live in [`peft_spectral.distributed`] (shared with
Transformer²'s CEM) and are re-exported here for the imports that name `peft_spectral.compress.distributed`."""

from ..distributed import launched_state, map_across_processes, sum_across_processes


__all__ = ["launched_state", "map_across_processes", "sum_across_processes"]
