"""Training SVF experts with TRL (Transformer² phase 1): datasets, presets, callbacks and one entry point.

Transformer² trains one SVF "expert" per task with REINFORCE (reward +1/-1 for a right/wrong answer) and a KL
penalty to the base model. Here that is TRL's `GRPOTrainer` or `RLOOTrainer` with `peft_config=SVFConfig(...)`
(the reference model is the adapter disabled), or `SFTTrainer` for supervised training.

```python
from peft_spectral.training import train_svf
result = train_svf(model, tokenizer, task, method="rl", algorithm="grpo", max_steps=40, output_dir="svf-arith")
result.model.save_pretrained("svf-arith")          # a PEFT adapter: only the z vectors
```

What TRL does with a PEFT model and how SVF copes (checked by `tests/test_training*.py`):

* reference log-probs with `beta > 0`: `model.disable_adapter()`: SVF layers then run their base layer (exact).
* re-training an existing SVF adapter with `beta > 0`: TRL adds a `"ref"` adapter and copies parameters whose name
  contains `".default."` — SVF's `svf_z.default` has no trailing dot, so TRL leaves `ref` at its initial value.
  [`fix_reference_adapter`] copies `z` into it (called by [`build_trainer`]).
* generation backends that merge adapters (vLLM weight sync): `merge_adapter`/`unmerge_adapter` restore the base
  weight bit for bit (SVF keeps the original weight while merged).
* a model loaded from GGUF (the embedded default) is dequantized to fp32 but keeps transformers' GGUF quantizer flag,
  which makes `Trainer` refuse to train it: [`as_plain_fp32`] drops the flag (called by [`train_svf`]).
* checkpoints save only the adapter (`adapter_model.safetensors`, the z vectors); resuming loads it with
  `load_adapter(..., is_trainable=True)` and restores optimizer, scheduler and RNG states.

Modules: `datasets` (TRL datasets, SFT targets, rewards), `presets` (TRL configs), `callbacks` (divergence guard,
metrics, validation/early stopping, time budget), `trainer` (trainer construction and fixes), `svf` ([`train_svf`]:
one training run), `expert_job` ([`SVFTrainingConfig`] and [`train_expert`]: the staged SFT → RL expert job that the
CLI, the demo and the benchmarks run).
"""

from ..assets import as_plain_fp32
from .callbacks import (
    MetricsLogger,
    NonFiniteGuard,
    TimeBudget,
    ValidationCallback,
    load_trainable_state,
    trainable_state,
)
from .datasets import examples_to_dataset, reward_for_task, sft_answer, task_dataset, with_lettered_options
from .expert_job import ExpertResult, SVFTrainingConfig, train_expert
from .presets import (
    PAPER_BATCH_SIZE,
    PAPER_BETA,
    PAPER_LEARNING_RATE,
    PAPER_MAX_GRAD_NORM,
    PAPER_STEPS,
    Algorithm,
    Method,
    paper_rl_preset,
    sft_preset,
)
from .svf import VALIDATION_FILE, SVFTrainingResult, train_svf
from .trainer import build_trainer, causal_lm_config, fix_reference_adapter, load_trainable_adapter, svf_parameters


__all__ = [
    "PAPER_BATCH_SIZE",
    "PAPER_BETA",
    "PAPER_LEARNING_RATE",
    "PAPER_MAX_GRAD_NORM",
    "PAPER_STEPS",
    "VALIDATION_FILE",
    "Algorithm",
    "ExpertResult",
    "Method",
    "MetricsLogger",
    "NonFiniteGuard",
    "SVFTrainingConfig",
    "SVFTrainingResult",
    "TimeBudget",
    "ValidationCallback",
    "as_plain_fp32",
    "build_trainer",
    "causal_lm_config",
    "examples_to_dataset",
    "fix_reference_adapter",
    "load_trainable_adapter",
    "load_trainable_state",
    "paper_rl_preset",
    "reward_for_task",
    "sft_answer",
    "sft_preset",
    "svf_parameters",
    "task_dataset",
    "train_expert",
    "train_svf",
    "trainable_state",
    "with_lettered_options",
]
