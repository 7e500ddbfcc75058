"""Building the TRL trainer for an SVF adapter, with the fixes SVF needs under TRL/PEFT."""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections.abc import Callable
from typing import Any, Optional, Union

import torch
from transformers import TrainerCallback, TrainingArguments

from ..assets import as_plain_fp32
from ..rewards import checked_reward
from ..tuners.svf import SVFConfig, SVFLinear
from .packing import MAX_LENGTH_ATTRIBUTE, supports_padding_free, truncate_tokenized
from .presets import Algorithm, Method


__all__ = [
    "build_trainer",
    "causal_lm_config",
    "fix_reference_adapter",
    "load_trainable_adapter",
    "svf_parameters",
]

logger = logging.getLogger(__name__)


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
                module.svf_z[reference].copy_(module.svf_z[source])  # not `.data`: the composed-weight cache sees it
            module.svf_z[reference].requires_grad_(False)
            fixed += 1
    return fixed


def load_trainable_adapter(model: torch.nn.Module, adapter: Union[str, os.PathLike]):
    """Load a saved SVF adapter onto `model` for further training (a warm start, e.g. SFT then RL).

    The adapter is checked ([`peft_spectral.adapter_io.validate_adapter_dir`]: an SVF adapter with finite z in
    safetensors) and loaded with `PeftModel.from_pretrained(..., is_trainable=True)` as the `"default"` adapter, with
    `task_type="CAUSAL_LM"` when its config has none. Pass the result to [`train_svf`] (with `svf_config=None`):
    training starts from the loaded z, and with `beta > 0` the KL term pulls towards it (see
    [`fix_reference_adapter`]).

    Args:
        model (`torch.nn.Module`): The base model the adapter was trained on.
        adapter (`str` or `os.PathLike`): The adapter directory (or Hub id).

    Returns:
        `PeftModel` with the adapter's z trainable.

    Raises:
        [`~peft_spectral.adapter_io.AdapterLoadError`]: when `adapter` is not a loadable SVF adapter.
    """
    from peft import PeftModel

    from ..adapter_io import validate_adapter_dir

    folder, config = validate_adapter_dir(adapter, expected_type="SVF")
    config = causal_lm_config(config)
    config.inference_mode = False
    return PeftModel.from_pretrained(model, str(folder), config=config, is_trainable=True, use_safetensors=True)


def causal_lm_config(peft_config: Optional[Any]) -> Any:
    """The adapter config to train a causal LM with: `SVFConfig(task_type="CAUSAL_LM")` (MLP projections of known
    architectures) when `peft_config` is `None`, else `peft_config`, copied with `task_type="CAUSAL_LM"` when it has
    none (the caller's object is left unchanged).

    Every model this package trains is a causal LM (TRL's GRPO, RLOO and SFT trainers); a saved adapter whose
    `task_type` is set loads as a `PeftModelForCausalLM` (generation, `prepare_inputs_for_generation`).
    """
    if peft_config is None:
        return SVFConfig(task_type="CAUSAL_LM")
    if hasattr(peft_config, "task_type") and peft_config.task_type is None:
        peft_config = copy.copy(peft_config)
        peft_config.task_type = "CAUSAL_LM"
    return peft_config


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
        model: A transformers causal LM (then `peft_config`, default `SVFConfig()`, is applied by TRL, with
            `task_type="CAUSAL_LM"` unless it sets one, see [`causal_lm_config`]) or a
            `PeftModel` holding the adapter to (re-)train (then `peft_config` must be `None`).
        tokenizer: Its tokenizer (TRL's `processing_class`).
        train_dataset: From [`task_dataset`] / [`examples_to_dataset`].
        method (`str`): `"rl"` or `"sft"`.
        algorithm (`str`): `"grpo"` or `"rloo"` (RL only).
        args: A TRL config (see [`paper_rl_preset`], [`sft_preset`]); required.
        reward_funcs: Reward callables for RL (required for RL).

    SFT with padding-free batches (the default of [`sft_preset`]): the tokenized data is cut to the preset's
    `max_length` as TRL would, and a model whose attention lets packed examples see each other
    ([`~peft_spectral.training.packing.supports_padding_free`]) is trained on padded batches instead, with a warning.
    Sampling (RL) and evaluation run SVF's composed weight where it pays (`SVFConfig.compose_inference`); nothing
    here is needed for that.

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
        peft_config = causal_lm_config(peft_config)
    callbacks = list(callbacks or [])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if method == "sft":
        from trl import SFTConfig, SFTTrainer

        if not isinstance(args, SFTConfig):
            raise TypeError(f"method='sft' needs an SFTConfig (see sft_preset), got {type(args).__name__}")
        max_length = getattr(args, MAX_LENGTH_ATTRIBUTE, None)
        if args.padding_free and not args.packing and not supports_padding_free(model):
            warnings.warn(
                f"{type(model).__name__} lets examples packed into one row attend to each other (its attention "
                "ignores position_ids); training with padded batches instead of padding-free ones",
                UserWarning,
                stacklevel=2,
            )
            args = copy.copy(args)
            args.padding_free = False
            args.max_length = max_length if max_length is not None else args.max_length
            max_length = None
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=callbacks,
        )
        if max_length is not None and args.padding_free and args.max_length is None:
            trainer.train_dataset = truncate_tokenized(trainer.train_dataset, max_length)
            if isinstance(trainer.eval_dataset, dict):
                trainer.eval_dataset = {k: truncate_tokenized(v, max_length) for k, v in trainer.eval_dataset.items()}
            elif trainer.eval_dataset is not None:
                trainer.eval_dataset = truncate_tokenized(trainer.eval_dataset, max_length)
        _check_sft_examples_kept(train_dataset, trainer.train_dataset, max_length or args.max_length)
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
        # A user's reward that returns NaN or None would leave z unchanged behind TRL's generic warning: check them all.
        funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
        funcs = [checked_reward(f) if callable(f) and not isinstance(f, torch.nn.Module) else f for f in funcs]
        _check_prompts_fit(model, tokenizer, train_dataset, getattr(args, "max_completion_length", None))
        trainer = trainer_cls(
            model=model,
            reward_funcs=funcs,
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


def _check_sft_examples_kept(before, after, max_length: Optional[int]) -> None:
    """SFT drops the examples whose answer tokens all fall past `max_length`: none left is an error, some a warning."""
    if not hasattr(before, "__len__") or not hasattr(after, "__len__") or len(after) >= len(before):
        return
    lost = len(before) - len(after)
    if len(after) == 0:
        raise ValueError(
            f"every one of the {len(before)} SFT examples is longer than max_length={max_length} tokens before its "
            "answer starts, so none has a token to learn from: raise max_length (sft_preset) or shorten the prompts"
        )
    message = (
        f"{lost} of {len(before)} SFT examples dropped: their answer starts past max_length={max_length} tokens "
        "(raise max_length or shorten the prompts)"
    )
    logger.warning(message)
    warnings.warn(message, UserWarning, stacklevel=3)


def _prompt_lengths(tokenizer, dataset) -> list[int]:
    lengths = []
    for prompt in dataset["prompt"]:
        if isinstance(prompt, list):  # conversational: as TRL renders it for generation
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # a BatchEncoding in recent transformers
        else:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        lengths.append(len(ids))
    return lengths


def _check_prompts_fit(model, tokenizer, dataset, max_completion_length: Optional[int]) -> None:
    """RL samples a completion after the whole prompt: prompts that leave no room in the model's context are refused
    (all of them) or reported (some), instead of sampling past the positions the model was trained on."""
    config = getattr(model, "config", None)
    context = getattr(config, "max_position_embeddings", None)
    if not isinstance(context, int) or "prompt" not in getattr(dataset, "column_names", ()):
        return
    room = context - int(max_completion_length or 0)
    lengths = _prompt_lengths(tokenizer, dataset)
    too_long = sum(length > room for length in lengths)
    if not too_long:
        return
    detail = (
        f"prompt + max_completion_length={max_completion_length} exceeds the model's context of {context} tokens "
        f"(longest prompt: {max(lengths)} tokens)"
    )
    if too_long == len(lengths):
        raise ValueError(f"every one of the {len(lengths)} RL prompts is too long: {detail}; shorten the prompts")
    message = f"{too_long} of {len(lengths)} RL prompts are too long: {detail}; their completions will be unreliable"
    logger.warning(message)
    warnings.warn(message, UserWarning, stacklevel=3)
