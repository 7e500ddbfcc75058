"""[`train_svf`]: one call from a task to a trained SVF expert (RL or SFT), with validation early stopping and resume."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from transformers import TrainerCallback, TrainingArguments

from ..data import Example, Task
from .callbacks import MetricsLogger, NonFiniteGuard, TimeBudget, ValidationCallback
from .datasets import examples_to_dataset, reward_for_task
from .presets import PAPER_BETA, Algorithm, Method, paper_rl_preset, sft_preset
from .trainer import build_trainer


__all__ = ["VALIDATION_FILE", "SVFTrainingResult", "train_svf"]

logger = logging.getLogger(__name__)

#: Name of the validation-curve file [`train_svf`] writes in its `output_dir`.
VALIDATION_FILE = "validation.json"
#: Checkpoint interval when `resume=True` and no `save_steps` is given.
RESUME_SAVE_STEPS = 10


@dataclass
class SVFTrainingResult:
    """What [`train_svf`] returns.

    Args:
        model (`PeftModel`): The trained model (adapter `"default"` active, unmerged); with validation, the best z.
        logs (`list[dict]`): Every logged row (loss, reward, kl, grad_norm, ...), with its `step`.
        step_times (`list[float]`): Wall seconds of each optimizer step (generation included for RL).
        train_runtime (`float`): Wall seconds of `trainer.train()`.
        trainable_parameters (`int`): Trainable parameters of the adapter.
        trainer: The TRL trainer (for `save_model`, state, ...).
        validation (`dict`, *optional*): With validation: the curve (`[{"step", "score", "accuracy", ...}]`),
            `best_step`, `best_score`, `stopped_early_at`, `restored_best` (see [`ValidationCallback.summary`]).
        resumed_from (`str`, *optional*): The checkpoint training continued from.
        time_budget (`dict`, *optional*): With `max_train_seconds`: `max_train_seconds`, `train_seconds`
            (validation excluded), `validation_seconds`, `steps`, `stopped_at` (the step at which the budget ended
            training, else `None`) and `exhausted` (see [`TimeBudget.summary`]).
        recipe (`dict`): The settings of the run, for the model card: `method`, `algorithm`, `beta`,
            `learning_rate`, `steps`, `steps_run` (the optimizer step reached), `batch_size` or `prompts_per_step` ×
            `num_generations`, `max_completion_length`, `target_modules`, `svf_mode`, `trainable_parameters`,
            `train_examples`, `seed`.
    """

    model: Any
    logs: list[dict[str, float]]
    step_times: list[float]
    train_runtime: float
    trainable_parameters: int
    trainer: Any = field(default=None, repr=False)
    validation: Optional[dict] = None
    resumed_from: Optional[str] = None
    time_budget: Optional[dict] = None
    recipe: dict[str, Any] = field(default_factory=dict)

    def final(self, key: str) -> Optional[float]:
        """The last logged value of `key` (e.g. `"reward"`, `"loss"`), or `None`."""
        for row in reversed(self.logs):
            if key in row:
                return row[key]
        return None

    def save_validation(self, directory: Union[str, os.PathLike]) -> Optional[str]:
        """Write the validation curve to `directory/validation.json` (e.g. next to a saved adapter); returns the path,
        or `None` when training ran without validation."""
        if self.validation is None:
            return None
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, VALIDATION_FILE)
        with open(path, "w") as handle:
            json.dump(self.validation, handle, indent=1)
        return path

    def save(
        self,
        directory: Union[str, os.PathLike],
        *,
        task: str,
        description: Optional[str] = None,
        kind: Optional[str] = None,
        recipe: Optional[dict[str, Any]] = None,
        wall_seconds: Optional[float] = None,
        test_eval: Optional[dict[str, Any]] = None,
    ) -> Path:
        """Save the trained expert: the PEFT adapter (only z), `validation.json` (with validation), and its model
        card `README.md` and `expert.json` ([`peft_spectral.model_card.write_expert_files`]).

        Args:
            directory (`str` or `os.PathLike`): The adapter directory (created when missing).
            task (`str`): The task's name.
            description (`str`, *optional*): What the task asks.
            kind (`str`, *optional*): The task's kind.
            recipe (`dict`, *optional*): Entries added to (or replacing) [`SVFTrainingResult.recipe`] in the card.
            wall_seconds (`float`, *optional*): The budget reported; defaults to `train_runtime`.
            test_eval (`dict`, *optional*): A [`peft_spectral.expert_eval.paired_report`] for the card.

        Returns:
            `Path`: `directory`.
        """
        from ..model_card import write_expert_files

        folder = Path(directory)
        self.model.save_pretrained(str(folder))
        self.save_validation(folder)
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        base_name = getattr(base, "name_or_path", None) or getattr(
            getattr(base, "config", None), "_name_or_path", None
        )
        write_expert_files(
            folder,
            task=task,
            description=description,
            kind=kind,
            base_model=base_name or None,
            recipe={**self.recipe, **(recipe or {})},
            wall_seconds=self.train_runtime if wall_seconds is None else wall_seconds,
            validation=self.validation,
            test_eval=test_eval,
        )
        return folder


def _examples_and_kind(task, kind) -> tuple[list[Example], str]:
    if isinstance(task, Task):
        return task.train, task.kind
    if kind is None:
        raise ValueError("kind is required when task is a list of examples")
    return list(task), kind


def _validation_callback(task, kind, tokenizer, eval_examples, callbacks, printer, **options):
    """The [`ValidationCallback`] of this run: one passed in `callbacks`, else one built from `eval_examples`."""
    given = [c for c in callbacks or [] if isinstance(c, ValidationCallback)]
    if len(given) > 1:
        raise ValueError("pass at most one ValidationCallback in callbacks")
    if given:
        if eval_examples is not None:
            raise ValueError("pass either eval_examples or a ValidationCallback in callbacks, not both")
        return given[0], list(callbacks)
    if eval_examples is None:
        return None, list(callbacks or [])
    if isinstance(eval_examples, int):
        if not isinstance(task, Task):
            raise ValueError(
                "eval_examples=<int> takes the first examples of the task's validation split: pass a Task"
            )
        if eval_examples < 1:
            raise ValueError(f"eval_examples must be >= 1, got {eval_examples}")
        eval_examples = task.validation[:eval_examples]
    callback = ValidationCallback(list(eval_examples), kind=kind, tokenizer=tokenizer, printer=printer, **options)
    return callback, [*(callbacks or []), callback]


def _checkpoint_to_resume(output_dir: str, resume: bool, resume_from_checkpoint) -> Optional[str]:
    from transformers.trainer_utils import get_last_checkpoint

    if resume_from_checkpoint not in (None, False, True):
        return str(resume_from_checkpoint)
    if not (resume or resume_from_checkpoint is True):
        return None
    last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    if last is None and resume_from_checkpoint is True:
        raise ValueError(f"resume_from_checkpoint=True but {output_dir!r} holds no checkpoint-<step> directory")
    if last is None:
        logger.info("resume=True: no checkpoint in %s yet, starting from step 0", output_dir)
    return last


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
    beta: float = PAPER_BETA,
    svf_config: Optional[Any] = None,
    args: Optional[TrainingArguments] = None,
    reward_funcs: Optional[Union[Callable, list[Callable]]] = None,
    train_limit: Optional[int] = None,
    conversational: Optional[bool] = None,
    callbacks: Optional[list[TrainerCallback]] = None,
    printer: Optional[Callable[[str], None]] = None,
    resume_from_checkpoint: Optional[Union[str, bool]] = None,
    resume: bool = False,
    eval_examples: Optional[Union[int, Sequence[Example]]] = None,
    eval_every: int = 10,
    early_stopping_patience: Optional[int] = None,
    eval_metric: str = "accuracy",
    eval_mode: str = "generate",
    eval_max_new_tokens: int = 16,
    max_train_seconds: Optional[float] = None,
    save_dir: Optional[Union[str, os.PathLike]] = None,
    sft_target: str = "answer",
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
        output_dir (`str`): Checkpoint directory (and where `validation.json` goes).
        max_steps (`int`): Optimizer steps.
        beta (`float`, defaults to 0.1): KL weight λ to the starting model (RL; the paper's grid is {0, 0.1, 0.2,
            0.3}).
        svf_config ([`SVFConfig`] or any `PeftConfig`, *optional*): The adapter; defaults to
            `SVFConfig(task_type="CAUSAL_LM")` (MLP projections, linear mode). A config without `task_type` gets
            `"CAUSAL_LM"` (on a copy). A `LoraConfig` trains a LoRA baseline through the same path.
        args (*optional*): A complete TRL config; overrides the preset (then `max_steps`/`beta`/`preset_kwargs` are
            ignored).
        reward_funcs (*optional*): RL rewards; default [`reward_for_task`].
        train_limit (`int`, *optional*): Use only the first examples of the split.
        callbacks (*optional*): Extra `TrainerCallback`s; a [`ValidationCallback`] among them is this run's validation
            (instead of `eval_examples`).
        printer (*optional*): Receives one line per logged step and per validation (e.g. `tqdm.write`).
        resume_from_checkpoint (`str` or `bool`, *optional*): A checkpoint directory to continue from, or `True` for
            the newest one in `output_dir` (an error when there is none).
        resume (`bool`, defaults to `False`): Make the run resumable: continue from the newest checkpoint in
            `output_dir` when there is one (else start at step 0), and write checkpoints every `save_steps` (10
            unless given). Optimizer, scheduler, RNG and data order are restored, so a run interrupted and resumed
            ends at the same z as an uninterrupted one.
        eval_examples (`int` or `Sequence[Example]`, *optional*): Validation examples (an int: the first N of the
            task's validation split). Enables checkpoint selection: the model is scored before training and every
            `eval_every` steps, and the best z is restored at the end.
        eval_every (`int`, defaults to 10): Steps between validations.
        early_stopping_patience (`int`, *optional*): Stop after this many validations without improvement.
        eval_metric (`str`, defaults to `"accuracy"`): `"accuracy"` or `"balanced_accuracy"`.
        eval_mode (`str`, defaults to `"generate"`): How validation scores answers (see
            [`peft_spectral.evaluation.evaluate`]).
        eval_max_new_tokens (`int`, defaults to 16): Validation generation budget.
        max_train_seconds (`float`, *optional*): A wall-clock budget: stop once training has taken this many seconds
            (validation time excluded; checked after every step, so the last step may overrun it), or at
            `max_steps`, whichever comes first. On resume the seconds spent before the checkpoint count. Recorded in
            `result.time_budget` (see [`TimeBudget`]).
        save_dir (`str` or `os.PathLike`, *optional*): Save the trained expert there: the adapter, its
            `validation.json`, a model card `README.md` and `expert.json` (see [`SVFTrainingResult.save`]); left
            out: nothing is saved besides the checkpoints in `output_dir`.
        sft_target (`str`, defaults to `"answer"`): SFT trains on the gold answer, or with `"solution"` on a
            generator's worked solution where it has one ([`~peft_spectral.training.sft_answer`]).
        preset_kwargs: Forwarded to [`paper_rl_preset`] or [`sft_preset`].

    Returns:
        [`SVFTrainingResult`].
    """
    examples, kind = _examples_and_kind(task, kind)
    if train_limit is not None:
        examples = examples[:train_limit]
    if method not in ("rl", "sft"):
        raise ValueError(f"method must be 'rl' or 'sft', got {method!r}")
    dataset = examples_to_dataset(
        examples,
        kind,
        tokenizer=tokenizer,
        conversational=conversational,
        with_completion=method == "sft",
        sft_target=sft_target,
    )
    if args is None:
        if resume and preset_kwargs.get("save_steps") is None:
            preset_kwargs["save_steps"] = RESUME_SAVE_STEPS
        if method == "rl":
            args = paper_rl_preset(output_dir, algorithm=algorithm, max_steps=max_steps, beta=beta, **preset_kwargs)
        else:
            args = sft_preset(output_dir, max_steps=max_steps, **preset_kwargs)
    validation, callbacks = _validation_callback(
        task,
        kind,
        tokenizer,
        eval_examples,
        callbacks,
        printer,
        eval_every=eval_every,
        patience=early_stopping_patience,
        metric=eval_metric,
        mode=eval_mode,
        max_new_tokens=eval_max_new_tokens,
    )
    if method == "rl" and reward_funcs is None:
        reward_funcs = [reward_for_task(examples, kind=kind)]
    checkpoint = _checkpoint_to_resume(args.output_dir, resume, resume_from_checkpoint)
    if checkpoint is not None and validation is not None:
        validation.load_state(checkpoint)
    metrics = MetricsLogger(printer=printer)
    budget = None
    if max_train_seconds is not None:
        spent = _budget_spent(checkpoint) if checkpoint is not None else 0.0
        budget = TimeBudget(max_train_seconds, validation=validation, spent_before=spent)
    trainer = build_trainer(
        model,
        tokenizer,
        dataset,
        method=method,
        algorithm=algorithm,
        args=args,
        peft_config=svf_config,
        reward_funcs=reward_funcs,
        # the budget before the validation: the step at which the budget ends is validated too
        callbacks=[NonFiniteGuard(), metrics, *([budget] if budget is not None else []), *callbacks],
    )
    start = time.perf_counter()
    stopped = validation is not None and validation.stopped_at is not None
    if stopped or (budget is not None and budget.exhausted):
        # the checkpoint's run had stopped early or used up its time: nothing to train, only the best z to restore
        why = f"stopped early at step {validation.stopped_at}" if stopped else "used up its time budget"
        message = f"{checkpoint} {why}: restoring the best z, not training"
        logger.info(message)
        if printer is not None:
            printer(message)
        if validation is not None:
            validation.on_train_end(trainer.args, trainer.state, trainer.control, model=trainer.model)
    else:
        first_step = trainer.state.global_step
        trainer.train(resume_from_checkpoint=checkpoint)
        _check_steps_ran(trainer, first_step, len(dataset), method)
    runtime = time.perf_counter() - start
    peft_model = trainer.model
    _warn_without_signal(metrics.history, printer)
    trainable = sum(p.numel() for n, p in peft_model.named_parameters() if p.requires_grad)
    result = SVFTrainingResult(
        model=peft_model,
        logs=metrics.history,
        step_times=metrics.step_times,
        train_runtime=runtime,
        trainable_parameters=trainable,
        trainer=trainer,
        validation=validation.summary() if validation is not None else None,
        resumed_from=checkpoint,
        time_budget=budget.summary() if budget is not None else None,
        recipe=_recipe(trainer, method, algorithm, len(dataset), trainable),
    )
    if budget is not None and budget.stopped_at is not None:
        message = (
            f"time budget of {budget.max_seconds:g} s used up at step {budget.stopped_at} "
            f"({budget.spent:.1f} s of training, validation excluded)"
        )
        logger.info(message)
        if printer is not None:
            printer(message)
    result.save_validation(args.output_dir)
    if save_dir is not None:
        name = task.name if isinstance(task, Task) else os.path.basename(os.path.normpath(str(save_dir)))
        description = task.description if isinstance(task, Task) else None
        result.save(save_dir, task=name, description=description, kind=kind)
    return result


def _budget_spent(checkpoint: str) -> float:
    """Training seconds a [`TimeBudget`] had spent when `checkpoint` was written (0 when it had none)."""
    from transformers.trainer import TRAINER_STATE_NAME

    path = os.path.join(checkpoint, TRAINER_STATE_NAME)
    if not os.path.isfile(path):
        return 0.0
    with open(path) as handle:
        saved = json.load(handle).get("stateful_callbacks", {}).get(TimeBudget.__name__)
    if isinstance(saved, list):  # transformers keeps a list when several callbacks of the class were saved
        saved = saved[-1] if saved else None
    return float(saved["attributes"]["spent_before"]) if saved else 0.0


def _recipe(trainer, method: str, algorithm: str, n_examples: int, trainable: int) -> dict[str, Any]:
    """What the model card states about the run, read from the trainer's arguments and the adapter's config."""
    args = trainer.args
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    recipe: dict[str, Any] = {"method": method}
    if method == "rl":
        generations = int(getattr(args, "num_generations", 1) or 1)
        recipe.update(
            algorithm=algorithm,
            beta=float(getattr(args, "beta", 0.0)),
            prompts_per_step=per_step // generations,
            num_generations=generations,
            max_completion_length=getattr(args, "max_completion_length", None),
        )
    else:
        recipe["batch_size"] = per_step
    recipe.update(learning_rate=args.learning_rate, steps=args.max_steps, steps_run=trainer.state.global_step)
    model = trainer.model
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", "default"))
    if config is not None:
        targets = config.target_modules
        recipe["target_modules"] = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
        recipe["peft_type"] = str(getattr(config.peft_type, "value", config.peft_type))
        if getattr(config, "mode", None) is not None:
            recipe["svf_mode"] = config.mode
    recipe.update(trainable_parameters=trainable, train_examples=n_examples, seed=args.seed)
    return recipe


def _check_steps_ran(trainer, first_step: int, n_examples: int, method: str) -> None:
    """A run that took no optimizer step must not look trained (e.g. fewer examples than one step's prompts)."""
    if trainer.state.global_step > first_step or trainer.state.global_step >= trainer.args.max_steps:
        return
    args = trainer.args
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    unit = "examples"
    if method == "rl":
        per_step //= max(1, getattr(args, "num_generations", 1))
        unit = "prompts"
    raise ValueError(
        f"training ran 0 optimizer steps: the task has {n_examples} training examples and one step takes {per_step} "
        f"{unit} (prompts_per_step / per_device_train_batch_size x gradient_accumulation_steps x processes). Give "
        "more training examples or a smaller batch."
    )


def _warn_without_signal(history: list[dict], printer: Optional[Callable[[str], None]]) -> None:
    zero_std = [row["frac_reward_zero_std"] for row in history if "frac_reward_zero_std" in row]
    if zero_std and min(zero_std) >= 1.0:
        message = (
            "no learning signal: in every step all completions of each prompt got the same reward, so the policy "
            "gradient was 0 and the adapter did not move. Use more num_generations, a higher temperature, an easier "
            "task or SFT first."
        )
        logger.warning(message)
        if printer is not None:
            printer(message)
