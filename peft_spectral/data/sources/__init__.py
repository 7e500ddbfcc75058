"""The task sources, one module each, registered under their spec prefix: `rg` (reasoning-gym, the default),
`humaneval`, `jsonl`, `hf` (`datasets.load_dataset`) and `bigbench` (optional, needs a copy of the data)."""

from .base import TaskSource, get_source, list_sources, register_source
from .bigbench import BigBenchSource
from .hf import HFSource
from .humaneval import HumanEvalSource
from .jsonl import JsonlSource
from .reasoning_gym import ReasoningGymScorer, ReasoningGymSource


for _source in (ReasoningGymSource(), HumanEvalSource(), JsonlSource(), HFSource(), BigBenchSource()):
    register_source(_source)


__all__ = [
    "BigBenchSource",
    "HFSource",
    "HumanEvalSource",
    "JsonlSource",
    "ReasoningGymScorer",
    "ReasoningGymSource",
    "TaskSource",
    "get_source",
    "list_sources",
    "register_source",
]
