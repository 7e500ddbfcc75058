"""CPI-FT: Core Parameter Isolation Fine-Tuning (arXiv 2508.21741) on TRL's SFT loop.

Probe (SFT each task alone) → cores (top p of |Δ_t|) → grouping (Jaccard ≥ τ, connected components) → fusion (cores
transplanted, the rest merged by SLERP of the fine-tuned parameters) → staged SFT (one stage per group, in a seeded
random or chosen order, earlier groups' cores frozen bit-identically). [`CPIPipeline`] runs the steps, resumably;
the modules hold its parts: `config`, `masks`, `grouping`, `scheduling`, `fusion`, `freezing`, `sft`,
`run_directory`, `report`, `pipeline`. See `docs/core_isolation.md`.
"""

from .config import FUSION_MODES, STAGE_ORDERS, CPIConfig, adapter_config_dict
from .freezing import FreezeMaskCallback, TrackedParameters
from .fusion import fuse_deltas, slerp_merge
from .grouping import connected_groups
from .masks import core_masks, jaccard_matrix, pack_mask, unpack_mask
from .pipeline import STEPS, CPIPipeline
from .report import plot_jaccard, report_markdown
from .run_directory import STATE_VERSION, RunDirectory, base_model_fingerprint, tasks_fingerprint
from .scheduling import order_groups
from .sft import build_sft_dataset, encode_example, mixed_examples, sft_train


__all__ = [
    "FUSION_MODES",
    "STAGE_ORDERS",
    "STATE_VERSION",
    "STEPS",
    "CPIConfig",
    "CPIPipeline",
    "FreezeMaskCallback",
    "RunDirectory",
    "TrackedParameters",
    "adapter_config_dict",
    "base_model_fingerprint",
    "build_sft_dataset",
    "connected_groups",
    "core_masks",
    "encode_example",
    "fuse_deltas",
    "jaccard_matrix",
    "mixed_examples",
    "order_groups",
    "pack_mask",
    "plot_jaccard",
    "report_markdown",
    "sft_train",
    "slerp_merge",
    "tasks_fingerprint",
    "unpack_mask",
]
