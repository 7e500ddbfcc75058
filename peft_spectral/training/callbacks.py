"""Trainer callbacks for SVF training: divergence guard, metrics history, validation with early stopping, and a
wall-clock budget."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Optional

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState


__all__ = [
    "MetricsLogger",
    "NonFiniteGuard",
    "TimeBudget",
    "ValidationCallback",
    "load_trainable_state",
    "trainable_state",
]


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


class TimeBudget(TrainerCallback, ExportableState):
    """Stops training once the training time reaches a wall-clock budget: the same compute for methods whose steps
    cost differently (SVF vs LoRA, RL vs SFT).

    Training time runs from the start of `trainer.train()` and leaves out the time spent validating in
    `validation` (a [`ValidationCallback`]: its evaluations are not training). The check follows every optimizer
    step, so the last step may overrun the budget by up to one step; the seconds actually spent are recorded. Put
    this callback before the [`ValidationCallback`] so that the step at which the budget ends is validated too. Its
    spent seconds are written into every checkpoint (`trainer_state.json`), and `spent_before` continues them on
    resume.

    Args:
        max_seconds (`float`): The budget in seconds (> 0).
        validation ([`ValidationCallback`], *optional*): Whose evaluation time is not counted; each of its curve
            points then records `train_seconds`, the training seconds spent before it (`spent_before` included).
        spent_before (`float`, defaults to 0.0): Training seconds already spent (by the run this one resumes).
        clock (`Callable[[], float]`, *optional*): The clock; defaults to `time.perf_counter`, the clock of the
            validation's `seconds`.
    """

    def __init__(
        self,
        max_seconds: float,
        *,
        validation: Optional[ValidationCallback] = None,
        spent_before: float = 0.0,
        clock: Optional[Callable[[], float]] = None,
    ) -> None:
        if not (isinstance(max_seconds, (int, float)) and math.isfinite(max_seconds) and max_seconds > 0):
            raise ValueError(f"max_train_seconds must be a finite number > 0, got {max_seconds!r}")
        if not spent_before >= 0:
            raise ValueError(f"spent_before must be >= 0, got {spent_before!r}")
        self.max_seconds = float(max_seconds)
        self.validation = validation
        if validation is not None:  # each validation point records the training seconds spent before it
            validation.train_clock = lambda: self.spent
        self.spent_before = float(spent_before)
        self.clock = clock if clock is not None else time.perf_counter
        self.stopped_at: Optional[int] = None
        self.steps = 0
        self._start: Optional[float] = None
        self._validation_at_start = 0.0
        self._final: Optional[float] = None

    def _validation_seconds(self) -> float:
        if self.validation is None:
            return 0.0
        return sum(row.get("seconds", 0.0) for row in self.validation.curve)

    @property
    def validation_seconds(self) -> float:
        """Seconds spent validating since training (this call) started."""
        return self._validation_seconds() - self._validation_at_start if self._start is not None else 0.0

    @property
    def spent(self) -> float:
        """Training seconds spent so far, `spent_before` included, validation excluded."""
        if self._final is not None:
            return self._final
        if self._start is None:
            return self.spent_before
        return self.spent_before + max(0.0, self.clock() - self._start - self.validation_seconds)

    @property
    def exhausted(self) -> bool:
        """Whether the budget is used up."""
        return self.spent >= self.max_seconds

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = self.clock()
        self._validation_at_start = self._validation_seconds()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1
        if self.exhausted and not control.should_training_stop:
            self.stopped_at = state.global_step
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self._final = self.spent

    def state(self) -> dict:
        return {"args": {"max_seconds": self.max_seconds}, "attributes": {"spent_before": self.spent}}

    def summary(self) -> dict:
        """What the budget did, as `train_svf` records it: `max_train_seconds`, `train_seconds` (validation
        excluded, earlier runs of a resumed one included), `validation_seconds` and `steps` (this call), and
        `stopped_at` (the step at which the budget ended training; `None` when something else ended it)."""
        return {
            "max_train_seconds": self.max_seconds,
            "train_seconds": self.spent,
            "validation_seconds": self.validation_seconds,
            "steps": self.steps,
            "stopped_at": self.stopped_at,
            "exhausted": self.exhausted,
        }


VALIDATION_STATE_FILE = "validation_state.json"
VALIDATION_BEST_FILE = "validation_best.safetensors"


class ValidationCallback(TrainerCallback):
    """Scores the model on a validation split every `eval_every` steps, keeps the best trainable state (z), stops
    after `patience` evaluations without improvement, and restores the best state at the end of training.

    The Transformer² experts are early-stopped on validation accuracy; this is that, for any TRL trainer (they are
    `transformers.Trainer`s). It scores with [`peft_spectral.evaluation.evaluate`] (greedy answers by default, what RL
    rewards judge), not with `Trainer.evaluate`, which for GRPO/RLOO would sample and report rewards. The model before
    the first step is scored too (step 0 of a fresh run), so a run that never improves restores the initial z.
    A tie keeps the earlier step. Each curve point holds `step`, the score(s), `seconds` (the evaluation's own) and,
    when a [`TimeBudget`] is given this callback, `train_seconds` (training time before it, validation excluded).
    Its state (the curve, the best step and its parameters) is written into every checkpoint
    (`validation_state.json`, `validation_best.safetensors`) and read back by [`load_state`] on resume.

    Args:
        examples (`Sequence[Example]`, *optional*): Validation examples (required unless `score_fn` is given).
        kind (`str`, *optional*): The task kind (`"multiple_choice"`, `"generation"`, `"code"`).
        tokenizer (*optional*): The model's tokenizer (required with `examples`).
        eval_every (`int`, defaults to 10): Evaluate every this many optimizer steps (and at the last step).
        patience (`int`, *optional*): Stop after this many evaluations in a row without improvement; `None` never
            stops early.
        metric (`str`, defaults to `"accuracy"`): `"accuracy"` or `"balanced_accuracy"` (mean accuracy per gold
            answer text, e.g. per "yes"/"no"; robust to label imbalance of a small split, see
            [`peft_spectral.stats.balanced_accuracy`]).
        min_delta (`float`, defaults to 0.0): An improvement must exceed the best score by more than this.
        restore_best (`bool`, defaults to `True`): Load the best state into the model when training ends.
        mode (`str`, defaults to `"generate"`): [`peft_spectral.evaluation.evaluate`]'s `mode`.
        max_new_tokens (`int`, defaults to 16): Generation budget of the evaluation.
        batch_size (`int`, defaults to 8): Evaluation batch size.
        score_fn (`Callable[[model], float]`, *optional*): Replaces the evaluation: any score, higher is better.
        printer (`Callable[[str], None]`, *optional*): Receives one line per evaluation.
    """

    def __init__(
        self,
        examples: Optional[Sequence] = None,
        *,
        kind: Optional[str] = None,
        tokenizer=None,
        eval_every: int = 10,
        patience: Optional[int] = None,
        metric: str = "accuracy",
        min_delta: float = 0.0,
        restore_best: bool = True,
        mode: str = "generate",
        max_new_tokens: int = 16,
        batch_size: int = 8,
        score_fn: Optional[Callable[[torch.nn.Module], float]] = None,
        printer: Optional[Callable[[str], None]] = None,
    ) -> None:
        if eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {eval_every}")
        if patience is not None and patience < 1:
            raise ValueError(f"patience must be >= 1 or None, got {patience}")
        if metric not in ("accuracy", "balanced_accuracy"):
            raise ValueError(f"metric must be 'accuracy' or 'balanced_accuracy', got {metric!r}")
        if score_fn is None:
            if not examples:
                raise ValueError("examples is empty: validation needs examples (or a score_fn)")
            if kind is None or tokenizer is None:
                raise ValueError("kind and tokenizer are required to evaluate the validation examples")
        self.examples = list(examples or [])
        self.kind, self.tokenizer = kind, tokenizer
        self.eval_every, self.patience, self.metric, self.min_delta = eval_every, patience, metric, min_delta
        self.restore_best, self.mode, self.max_new_tokens, self.batch_size = (
            restore_best,
            mode,
            max_new_tokens,
            batch_size,
        )
        self.score_fn, self.printer = score_fn, printer
        self.curve: list[dict] = []
        self.best_step: Optional[int] = None
        self.best_score: Optional[float] = None
        self.best_state: dict[str, torch.Tensor] = {}
        self.evals_without_improvement = 0
        self.stopped_at: Optional[int] = None
        self.restored = False
        #: Training seconds so far (validation excluded); set by a [`TimeBudget`] given this callback.
        self.train_clock: Optional[Callable[[], float]] = None

    # scoring ----------------------------------------------------------------------------------------------------

    def _score(self, model) -> dict:
        if self.score_fn is not None:
            return {"score": float(self.score_fn(model))}
        from ..evaluation import evaluate
        from ..stats import balanced_accuracy

        result = evaluate(
            model,
            self.tokenizer,
            self.examples,
            kind=self.kind,
            mode=self.mode,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
        )
        labels = [ex.target.strip().lower() for ex in self.examples]  # the answer's content, not its position
        balanced = balanced_accuracy(result.correct, labels)
        score = result.accuracy if self.metric == "accuracy" else balanced
        return {"score": score, "accuracy": result.accuracy, "balanced_accuracy": balanced, "n": result.n}

    def _validate(self, model, step: int) -> None:
        trained = self.train_clock() if self.train_clock is not None else None
        start = time.perf_counter()
        row = {"step": step, **self._score(model), "seconds": time.perf_counter() - start}
        if trained is not None:
            row["train_seconds"] = trained
        self.curve.append(row)
        if self.best_score is None or row["score"] > self.best_score + self.min_delta:
            self.best_score, self.best_step = row["score"], step
            self.best_state = trainable_state(model)
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1
        if self.printer is not None:
            self.printer(
                f"validation at step {step}: {row['score']:.4f} (best {self.best_score:.4f} at {self.best_step})"
            )

    # Trainer events ---------------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self.curve:  # a fresh run (a resumed one has its curve from the checkpoint)
            self._validate(model, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        # the last step is scored too, also when an earlier callback (e.g. a TimeBudget) ends training at this step
        if step % self.eval_every != 0 and step < state.max_steps and not control.should_training_stop:
            return
        if self.curve and self.curve[-1]["step"] == step:
            return
        self._validate(model, step)
        if self.patience is not None and self.evals_without_improvement >= self.patience:
            self.stopped_at = step
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):
            self.save_state(folder)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.restore_best and self.best_state and model is not None:
            load_trainable_state(model, self.best_state)
            self.restored = True

    # persistence ------------------------------------------------------------------------------------------------

    def summary(self) -> dict:
        """The curve and the selection, as written to `validation.json`."""
        return {
            "metric": "score_fn" if self.score_fn is not None else self.metric,
            "eval_every": self.eval_every,
            "patience": self.patience,
            "n_examples": len(self.examples),
            "best_step": self.best_step,
            "best_score": self.best_score,
            "stopped_early_at": self.stopped_at,
            "restored_best": self.restored,
            "curve": self.curve,
        }

    def save_state(self, folder: str) -> None:
        """Write the curve, the counters and the best parameters into `folder` (a checkpoint)."""
        from safetensors.torch import save_file

        state = {**self.summary(), "evals_without_improvement": self.evals_without_improvement}
        with open(os.path.join(folder, VALIDATION_STATE_FILE), "w") as handle:
            json.dump(state, handle, indent=1)
        if self.best_state:
            save_file(
                {k: v.contiguous() for k, v in self.best_state.items()}, os.path.join(folder, VALIDATION_BEST_FILE)
            )

    def load_state(self, folder: str) -> bool:
        """Read what [`save_state`] wrote in `folder`; `False` (nothing loaded) when the checkpoint has none."""
        path = os.path.join(folder, VALIDATION_STATE_FILE)
        if not os.path.isfile(path):
            return False
        with open(path) as handle:
            state = json.load(handle)
        self.curve = list(state["curve"])
        self.best_step, self.best_score = state["best_step"], state["best_score"]
        self.stopped_at = state.get("stopped_early_at")
        self.evals_without_improvement = int(state.get("evals_without_improvement", 0))
        best = os.path.join(folder, VALIDATION_BEST_FILE)
        if os.path.isfile(best):
            from safetensors.torch import load_file

            self.best_state = load_file(best)
        return True


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the parameters of `model` that require grad (an SVF adapter's z), by name."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` (from [`trainable_state`]) back into the parameters of `model`."""
    params = dict(model.named_parameters())
    missing = sorted(set(state) - set(params))
    if missing:
        raise KeyError(f"the model has no parameter(s) {missing[:3]} of the saved state")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
