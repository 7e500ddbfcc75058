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
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import torch
from transformers import TrainerCallback, TrainingArguments

from .assets import as_plain_fp32
from .prompting import uses_chat_template
from .rewards import checked_reward, make_reward
from .tasks import Example, Task
from .tuners.svf import SVFConfig, SVFLinear


logger = logging.getLogger(__name__)

__all__ = [
    "MetricsLogger",
    "NonFiniteGuard",
    "SVFTrainingResult",
    "as_plain_fp32",
    "build_trainer",
    "examples_to_dataset",
    "fix_reference_adapter",
    "paper_rl_preset",
    "reward_for_task",
    "sft_answer",
    "sft_preset",
    "svf_parameters",
    "task_dataset",
    "train_svf",
    "with_lettered_options",
]

Method = Literal["rl", "sft"]
Algorithm = Literal["grpo", "rloo"]

#: Paper hyper-parameters (Transformer² reference code): AdamW, lr 2e-3, grad-norm clip 1e-3, batch 256, 200 steps.
PAPER_LEARNING_RATE = 2e-3
PAPER_MAX_GRAD_NORM = 1e-3
PAPER_BATCH_SIZE = 256
PAPER_STEPS = 200

_LETTERED = re.compile(r"(?m)^\s*\(?A[.):]\s")

# --------------------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------------------


def with_lettered_options(
    example: Example, instruction: str = "Answer with the letter of the correct option."
) -> Example:
    """A multiple-choice example whose prompt lists its options as `A. ...`, `B. ...` and asks for the letter.

    BigBench prompts often do not show the options; a policy that generates its answer (RL) must see them. A prompt
    that already lists lettered options is returned unchanged. The options, label and target are kept, so the
    letter (`"B"`) and the option text are both scored right by [`peft_spectral.rewards.extract_choice`].
    """
    if not example.choices:
        raise ValueError(
            f"with_lettered_options needs a multiple-choice example, got one without choices: {example.prompt[:60]!r}"
        )
    if len(example.choices) > 26:
        raise ValueError(f"with_lettered_options supports at most 26 options, got {len(example.choices)}")
    if _LETTERED.search(example.prompt):
        return example
    options = "\n".join(f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(example.choices))
    prompt = f"{example.prompt.rstrip()}\n\nOptions:\n{options}\n\n{instruction}".rstrip()
    return Example(
        prompt=prompt, target=example.target, choices=example.choices, label=example.label, meta=example.meta
    )


def sft_answer(example: Example, kind: str) -> str:
    """The supervised target text of `example`.

    Multiple choice: `"B. <option>"` when the prompt lists lettered options (`A. ...`, `(A) ...`), else the option
    text; both are what [`peft_spectral.rewards.extract_choice`] reads back. Generation and code: `example.target`.
    """
    if kind == "multiple_choice":
        if example.label is None or not example.choices:
            raise ValueError(
                f"multiple-choice example without choices/label cannot be an SFT target: {example.prompt[:60]!r}"
            )
        option = example.choices[example.label]
        if _LETTERED.search(example.prompt):
            return f"{chr(ord('A') + example.label)}. {option}"
        return option
    return example.target


def examples_to_dataset(
    examples: Sequence[Example],
    kind: str,
    *,
    tokenizer=None,
    conversational: Optional[bool] = None,
    with_completion: bool = False,
):
    """A `datasets.Dataset` in TRL's prompt(-completion) format, keeping the columns the rewards read.

    Args:
        examples (`Sequence[Example]`): The examples.
        kind (`str`): `"multiple_choice"`, `"generation"` or `"code"`.
        tokenizer (*optional*): Decides `conversational` when it is `None` (a chat template → conversational).
        conversational (`bool`, *optional*): `True`: `prompt` is `[{"role": "user", ...}]` (TRL applies the chat
            template, exactly as [`peft_spectral.evaluation.format_prompt`] does); `False`: plain strings, the prompt
            ending with a newline.
        with_completion (`bool`): Add a `completion` column (the [`sft_answer`]) for SFT.

    Returns:
        `datasets.Dataset` with `prompt` [, `completion`] and, by kind, `choices`/`label`/`target` (multiple choice),
        `target` (generation), `test`/`entry_point`/`code_prompt`/`target` (code).
    """
    from datasets import Dataset

    if kind not in ("multiple_choice", "generation", "code"):
        raise ValueError(f"kind must be 'multiple_choice', 'generation' or 'code', got {kind!r}")
    examples = list(examples)
    if not examples:
        raise ValueError("examples is empty: nothing to train on")
    if conversational is None:
        conversational = tokenizer is not None and uses_chat_template(tokenizer)
    rows = []
    for ex in examples:
        prompt_text = ex.prompt if conversational else ex.prompt.rstrip() + "\n"
        row: dict[str, Any] = {
            "prompt": [{"role": "user", "content": ex.prompt}] if conversational else prompt_text,
            "target": ex.target,
        }
        if kind == "multiple_choice":
            if not ex.choices or ex.label is None:
                raise ValueError(f"multiple-choice example needs `choices` and `label`: {ex.prompt[:60]!r}")
            row["choices"] = list(ex.choices)
            row["label"] = int(ex.label)
        elif kind == "code":
            row["test"] = ex.meta.get("test", "")
            row["entry_point"] = ex.meta.get("entry_point", "")
            row["code_prompt"] = ex.prompt
        if with_completion:
            answer = sft_answer(ex, kind)
            row["completion"] = [{"role": "assistant", "content": answer}] if conversational else answer
        rows.append(row)
    return Dataset.from_list(rows)


def task_dataset(
    task: Task,
    split: str = "train",
    *,
    tokenizer=None,
    conversational: Optional[bool] = None,
    with_completion: bool = False,
    limit: Optional[int] = None,
):
    """[`examples_to_dataset`] of one split of a [`~peft_spectral.tasks.Task`] (the first `limit` examples)."""
    examples = task.split(split)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {limit}")
        examples = examples[:limit]
    if not examples:
        raise ValueError(f"task {task.name!r} has no {split!r} examples")
    return examples_to_dataset(
        examples, task.kind, tokenizer=tokenizer, conversational=conversational, with_completion=with_completion
    )


def reward_for_task(
    task_or_kind: Union[Task, str], *, positive: float = 1.0, negative: float = -1.0, **options
) -> Callable:
    """The paper's reward for a task: +1 for a right answer, -1 (or `negative`) for a wrong one.

    Multiple choice → letter/option match, generation → normalised exact match (numbers compared as numbers), code →
    tests run in the sandbox. The function is wrapped by [`~peft_spectral.rewards.checked_reward`], so a NaN or `None`
    reward stops training with an error naming it.
    """
    kind = task_or_kind.kind if isinstance(task_or_kind, Task) else task_or_kind
    return checked_reward(make_reward(kind, positive=positive, negative=negative, **options))


# --------------------------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------------------------


def _common_args(output_dir: str, max_steps: int, seed: int, save_steps: Optional[int], logging_steps: int) -> dict:
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    return {
        "output_dir": output_dir,
        "max_steps": max_steps,
        "seed": seed,
        "data_seed": seed,
        "optim": "adamw_torch",
        "weight_decay": 0.0,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "logging_steps": logging_steps,
        "save_strategy": "steps" if save_steps else "no",
        "save_steps": save_steps or 500,
        "save_only_model": False,
        "report_to": [],
        "bf16": False,
        "fp16": False,
        "disable_tqdm": False,
        "use_cpu": not torch.cuda.is_available(),
        "dataloader_num_workers": 0,
    }


def paper_rl_preset(
    output_dir: str,
    *,
    algorithm: Algorithm = "grpo",
    max_steps: int = 40,
    beta: float = 0.0,
    prompts_per_step: int = 2,
    num_generations: int = 4,
    gradient_accumulation_steps: int = 1,
    max_completion_length: int = 8,
    temperature: float = 1.0,
    learning_rate: float = PAPER_LEARNING_RATE,
    max_grad_norm: float = PAPER_MAX_GRAD_NORM,
    seed: int = 0,
    save_steps: Optional[int] = None,
    logging_steps: int = 1,
    **overrides: Any,
):
    """TRL arguments with Transformer²'s RL hyper-parameters, scaled down for a CPU run.

    Paper: REINFORCE, AdamW lr 2e-3, max grad norm 1e-3, batch 256 prompts, 200 steps, ±1 rewards, KL weight λ ∈ {0,
    0.1, 0.2, 0.3}. Kept here: optimizer, learning rate (constant), clipping, `beta` = λ. Scaled down: the batch is
    `prompts_per_step × num_generations` completions per process per optimizer step (× `gradient_accumulation_steps`)
    and `max_steps`. The reference code uses one greedy rollout per prompt and no baseline; GRPO/RLOO need a group of
    sampled completions per prompt (`temperature`) to form their baseline, which also lowers the variance.

    For GRPO `scale_rewards="none"` keeps the advantage a centred ±1 reward (REINFORCE with a group-mean baseline) and
    `loss_type="grpo"` averages over each completion's tokens; RLOO is REINFORCE with a leave-one-out baseline and
    applies the KL as a reward penalty, as the paper's objective does.

    Args:
        output_dir (`str`): Where checkpoints go.
        algorithm (`str`): `"grpo"` ([`trl.GRPOConfig`]) or `"rloo"` ([`trl.RLOOConfig`]).
        max_steps (`int`): Optimizer steps.
        beta (`float`): KL coefficient λ; `0` skips the reference pass.
        prompts_per_step (`int`): Distinct prompts per process per micro-batch.
        num_generations (`int`): Sampled completions per prompt (≥ 2).
        max_completion_length (`int`): Generation budget in tokens (short answers: a letter, a number).
        overrides: Any other field of the TRL config (they win over the preset).

    Returns:
        `trl.GRPOConfig` or `trl.RLOOConfig`.
    """
    from trl import GRPOConfig, RLOOConfig

    if algorithm not in ("grpo", "rloo"):
        raise ValueError(f"algorithm must be 'grpo' or 'rloo', got {algorithm!r}")
    if num_generations < 2:
        raise ValueError(f"num_generations must be >= 2 (GRPO/RLOO baselines need a group), got {num_generations}")
    if prompts_per_step < 1:
        raise ValueError(f"prompts_per_step must be >= 1, got {prompts_per_step}")
    if beta < 0 or not math.isfinite(beta):
        raise ValueError(f"beta must be a finite number >= 0, got {beta}")
    if max_completion_length < 1:
        raise ValueError(f"max_completion_length must be >= 1, got {max_completion_length}")
    kwargs = _common_args(output_dir, max_steps, seed, save_steps, logging_steps)
    kwargs.update(
        learning_rate=learning_rate,
        max_grad_norm=max_grad_norm,
        adam_beta1=0.9,
        adam_beta2=0.999,
        per_device_train_batch_size=prompts_per_step * num_generations,
        gradient_accumulation_steps=gradient_accumulation_steps,
        num_generations=num_generations,
        max_completion_length=max_completion_length,
        temperature=temperature,
        beta=beta,
        disable_dropout=True,
        remove_unused_columns=False,
        log_completions=False,
    )
    if algorithm == "grpo":
        kwargs.update(scale_rewards="none", loss_type="grpo")
        kwargs.update(overrides)
        return GRPOConfig(**kwargs)
    kwargs.update(normalize_advantages=False)
    kwargs.update(overrides)
    return RLOOConfig(**kwargs)


def sft_preset(
    output_dir: str,
    *,
    max_steps: int = 40,
    per_device_train_batch_size: int = 8,
    gradient_accumulation_steps: int = 1,
    learning_rate: float = PAPER_LEARNING_RATE,
    max_grad_norm: float = 1.0,
    max_length: Optional[int] = 512,
    seed: int = 0,
    save_steps: Optional[int] = None,
    logging_steps: int = 1,
    **overrides: Any,
):
    """[`trl.SFTConfig`] for SVF: AdamW at the paper's lr 2e-3 (SVF's z needs a larger lr than LoRA), constant
    schedule, loss on the completion only (prompt-completion datasets), no packing."""
    from trl import SFTConfig

    kwargs = _common_args(output_dir, max_steps, seed, save_steps, logging_steps)
    kwargs.update(
        learning_rate=learning_rate,
        max_grad_norm=max_grad_norm,
        per_device_train_batch_size=per_device_train_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        max_length=max_length,
        packing=False,
        completion_only_loss=True,
        remove_unused_columns=True,
    )
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Callbacks
# --------------------------------------------------------------------------------------------------------------------


class NonFiniteGuard(TrainerCallback):
    """Stops training with a clear error as soon as a logged loss/reward or a trainable parameter is NaN or infinite.

    Rewards are already checked per completion by [`reward_for_task`]; this catches the rest (a diverging step, a user
    reward without the check) before a broken adapter is saved.
    """

    WATCHED = ("loss", "reward", "kl", "grad_norm")

    def __init__(self, model: Optional[torch.nn.Module] = None) -> None:
        self.model = model

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key, value in (logs or {}).items():
            if (
                (key in self.WATCHED or key.startswith("rewards/"))
                and isinstance(value, float)
                and not math.isfinite(value)
            ):
                raise FloatingPointError(
                    f"training diverged at step {state.global_step}: logged {key} = {value}. Lower the learning rate "
                    f"or check the reward functions."
                )

    def on_step_end(self, args, state, control, model=None, **kwargs):
        model = self.model or model
        if model is None:
            return
        for name, param in model.named_parameters():
            if param.requires_grad and not torch.isfinite(param).all():
                raise FloatingPointError(
                    f"training diverged at step {state.global_step}: parameter {name} has non-finite values"
                )


class MetricsLogger(TrainerCallback):
    """Keeps every log row (`history`) and prints a compact line of the main metrics (reward, KL, loss).

    Args:
        keys (`Sequence[str]`): Metrics shown in the printed line when present.
        printer (`Callable[[str], None]`, *optional*): Where lines go (e.g. `tqdm.write`); `None` prints nothing.
    """

    def __init__(
        self,
        keys: Sequence[str] = ("loss", "reward", "reward_std", "kl", "grad_norm", "step_time"),
        printer: Optional[Callable[[str], None]] = None,
    ) -> None:
        self.keys = tuple(keys)
        self.printer = printer
        self.history: list[dict[str, float]] = []
        self.step_times: list[float] = []
        self._t0: Optional[float] = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._t0 is not None:
            self.step_times.append(time.perf_counter() - self._t0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        row = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        row["step"] = state.global_step
        self.history.append(row)
        if self.printer is not None and any(k in row for k in self.keys):
            parts = [f"{k}={row[k]:.4g}" for k in self.keys if k in row]
            self.printer(f"step {state.global_step}: " + " ".join(parts))


# --------------------------------------------------------------------------------------------------------------------
# Trainer construction and TRL/PEFT fixes
# --------------------------------------------------------------------------------------------------------------------


def svf_parameters(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """`{module name: z}` (detached copies) of one SVF adapter of `model`."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, SVFLinear) and adapter_name in module.svf_z:
            out[name] = module.svf_z[adapter_name].detach().clone()
    return out


def fix_reference_adapter(model: torch.nn.Module, source: str = "default", reference: str = "ref") -> int:
    """Make TRL's frozen `"ref"` adapter an exact copy of the trained adapter's starting z.

    TRL (GRPO/RLOO with `beta > 0` on a model that already is a `PeftModel`) adds a `"ref"` adapter and copies only
    parameters named `*.default.*`; an SVF parameter is named `*.svf_z.default`, so `ref` would stay at the identity.
    Returns the number of SVF layers fixed (0 when there is no `ref` adapter).
    """
    fixed = 0
    for module in model.modules():
        if isinstance(module, SVFLinear) and reference in module.svf_z and source in module.svf_z:
            with torch.no_grad():
                module.svf_z[reference].data.copy_(module.svf_z[source].data)
            module.svf_z[reference].requires_grad_(False)
            fixed += 1
    return fixed


def _default_svf_config(model: torch.nn.Module, svf_config: Optional[Any]) -> Any:
    if svf_config is not None:
        return svf_config
    return SVFConfig()  # MLP projections for known architectures


def build_trainer(
    model,
    tokenizer,
    train_dataset,
    *,
    method: Method = "rl",
    algorithm: Algorithm = "grpo",
    args: Optional[TrainingArguments] = None,
    peft_config: Optional[Any] = None,
    reward_funcs: Optional[Union[Callable, list[Callable]]] = None,
    callbacks: Optional[list[TrainerCallback]] = None,
    eval_dataset=None,
):
    """Construct the TRL trainer for `method`/`algorithm` and apply this package's SVF fixes.

    Args:
        model: A transformers causal LM (then `peft_config`, default `SVFConfig()`, is applied by TRL) or a
            `PeftModel` holding the adapter to (re-)train (then `peft_config` must be `None`).
        tokenizer: Its tokenizer (TRL's `processing_class`).
        train_dataset: From [`task_dataset`] / [`examples_to_dataset`].
        method (`str`): `"rl"` or `"sft"`.
        algorithm (`str`): `"grpo"` or `"rloo"` (RL only).
        args: A TRL config (see [`paper_rl_preset`], [`sft_preset`]); required.
        reward_funcs: Reward callables for RL (required for RL).

    Returns:
        The trainer (`GRPOTrainer`, `RLOOTrainer` or `SFTTrainer`).
    """
    from peft import PeftModel

    if method not in ("rl", "sft"):
        raise ValueError(f"method must be 'rl' or 'sft', got {method!r}")
    if args is None:
        raise ValueError("args is required: build it with paper_rl_preset(...) or sft_preset(...)")
    is_peft = isinstance(model, PeftModel)
    if is_peft and peft_config is not None:
        raise ValueError("model is already a PeftModel: pass peft_config=None to keep training its adapter")
    as_plain_fp32(model.get_base_model() if is_peft else model)
    if not is_peft:
        peft_config = _default_svf_config(model, peft_config)
    callbacks = list(callbacks or [])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if method == "sft":
        from trl import SFTConfig, SFTTrainer

        if not isinstance(args, SFTConfig):
            raise TypeError(f"method='sft' needs an SFTConfig (see sft_preset), got {type(args).__name__}")
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=callbacks,
        )
    else:
        from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

        if algorithm not in ("grpo", "rloo"):
            raise ValueError(f"algorithm must be 'grpo' or 'rloo', got {algorithm!r}")
        config_cls, trainer_cls = (GRPOConfig, GRPOTrainer) if algorithm == "grpo" else (RLOOConfig, RLOOTrainer)
        if not isinstance(args, config_cls):
            raise TypeError(
                f"algorithm={algorithm!r} needs a {config_cls.__name__} (see paper_rl_preset), got {type(args).__name__}"
            )
        if reward_funcs is None:
            raise ValueError("reward_funcs is required for method='rl' (see reward_for_task)")
        trainer = trainer_cls(
            model=model,
            reward_funcs=reward_funcs if isinstance(reward_funcs, list) else [reward_funcs],
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=callbacks,
        )
        fixed = fix_reference_adapter(trainer.model)
        if fixed:
            logger.info("copied the trained SVF z into TRL's 'ref' adapter in %d layers", fixed)
    return trainer


# --------------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class SVFTrainingResult:
    """What [`train_svf`] returns.

    Args:
        model (`PeftModel`): The trained model (adapter `"default"` active, unmerged).
        logs (`list[dict]`): Every logged row (loss, reward, kl, grad_norm, ...), with its `step`.
        step_times (`list[float]`): Wall seconds of each optimizer step (generation included for RL).
        train_runtime (`float`): Wall seconds of `trainer.train()`.
        trainable_parameters (`int`): Trainable parameters of the adapter.
        trainer: The TRL trainer (for `save_model`, state, ...).
    """

    model: Any
    logs: list[dict[str, float]]
    step_times: list[float]
    train_runtime: float
    trainable_parameters: int
    trainer: Any = field(default=None, repr=False)

    def final(self, key: str) -> Optional[float]:
        """The last logged value of `key` (e.g. `"reward"`, `"loss"`), or `None`."""
        for row in reversed(self.logs):
            if key in row:
                return row[key]
        return None


def train_svf(
    model,
    tokenizer,
    task: Union[Task, Sequence[Example]],
    method: Method = "rl",
    algorithm: Algorithm = "grpo",
    *,
    kind: Optional[str] = None,
    output_dir: str = "svf-output",
    max_steps: int = 40,
    beta: float = 0.0,
    svf_config: Optional[Any] = None,
    args: Optional[TrainingArguments] = None,
    reward_funcs: Optional[Union[Callable, list[Callable]]] = None,
    train_limit: Optional[int] = None,
    conversational: Optional[bool] = None,
    callbacks: Optional[list[TrainerCallback]] = None,
    printer: Optional[Callable[[str], None]] = None,
    resume_from_checkpoint: Optional[Union[str, bool]] = None,
    **preset_kwargs: Any,
) -> SVFTrainingResult:
    """Train an SVF expert on a task with TRL: RL (GRPO or RLOO, ±1 rewards, KL weight `beta`) or SFT.

    Args:
        model: A transformers causal LM (an SVF adapter is added from `svf_config`), or a `PeftModel` whose active
            adapter is trained further.
        tokenizer: The model's tokenizer. With a chat template, prompts are conversational.
        task ([`~peft_spectral.tasks.Task`] or a sequence of [`~peft_spectral.tasks.Example`]): Training data (the
            task's `train` split); a plain sequence needs `kind`.
        method (`str`, defaults to `"rl"`): `"rl"` or `"sft"`.
        algorithm (`str`, defaults to `"grpo"`): `"grpo"` or `"rloo"` for RL.
        output_dir (`str`): Checkpoint directory.
        max_steps (`int`): Optimizer steps.
        beta (`float`): KL weight λ (RL).
        svf_config ([`SVFConfig`] or any `PeftConfig`, *optional*): The adapter; defaults to `SVFConfig()` (MLP
            projections, linear mode). A `LoraConfig` trains a LoRA baseline through the same path.
        args (*optional*): A complete TRL config; overrides the preset (then `max_steps`/`beta`/`preset_kwargs` are
            ignored).
        reward_funcs (*optional*): RL rewards; default [`reward_for_task`].
        train_limit (`int`, *optional*): Use only the first examples of the split.
        callbacks (*optional*): Extra `TrainerCallback`s.
        printer (*optional*): Receives one line per logged step (e.g. `tqdm.write`).
        resume_from_checkpoint (`str` or `bool`, *optional*): Passed to `trainer.train`.
        preset_kwargs: Forwarded to [`paper_rl_preset`] or [`sft_preset`].

    Returns:
        [`SVFTrainingResult`].
    """
    if isinstance(task, Task):
        kind = task.kind
        examples = task.train
    else:
        if kind is None:
            raise ValueError("kind is required when task is a list of examples")
        examples = list(task)
    if train_limit is not None:
        examples = examples[:train_limit]
    if method not in ("rl", "sft"):
        raise ValueError(f"method must be 'rl' or 'sft', got {method!r}")
    dataset = examples_to_dataset(
        examples, kind, tokenizer=tokenizer, conversational=conversational, with_completion=method == "sft"
    )
    if args is None:
        if method == "rl":
            args = paper_rl_preset(output_dir, algorithm=algorithm, max_steps=max_steps, beta=beta, **preset_kwargs)
        else:
            args = sft_preset(output_dir, max_steps=max_steps, **preset_kwargs)
    if method == "rl" and reward_funcs is None:
        reward_funcs = [reward_for_task(kind)]
    metrics = MetricsLogger(printer=printer)
    trainer = build_trainer(
        model,
        tokenizer,
        dataset,
        method=method,
        algorithm=algorithm,
        args=args,
        peft_config=svf_config,
        reward_funcs=reward_funcs,
        callbacks=[NonFiniteGuard(), metrics, *(callbacks or [])],
    )
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    runtime = time.perf_counter() - start
    peft_model = trainer.model
    zero_std = [row["frac_reward_zero_std"] for row in metrics.history if "frac_reward_zero_std" in row]
    if zero_std and min(zero_std) >= 1.0:
        message = (
            "no learning signal: in every step all completions of each prompt got the same reward, so the policy "
            "gradient was 0 and the adapter did not move. Use more num_generations, a higher temperature, an easier "
            "task or SFT first."
        )
        logger.warning(message)
        if printer is not None:
            printer(message)
    trainable = sum(p.numel() for n, p in peft_model.named_parameters() if p.requires_grad)
    return SVFTrainingResult(
        model=peft_model,
        logs=metrics.history,
        step_times=metrics.step_times,
        train_runtime=runtime,
        trainable_parameters=trainable,
        trainer=trainer,
    )
