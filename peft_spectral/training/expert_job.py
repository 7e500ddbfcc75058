"""The one expert job: [`SVFTrainingConfig`] says everything about an expert, [`train_expert`] trains it and writes its
files.

The recipe is Transformer²'s phase 1 made to work on a small model: an optional SFT warm start (the model first
learns the answer format and the easy cases from the gold answers), then RL (GRPO or RLOO, ±1 rewards from the
task's own scorer, KL weight β to the model it starts from), with the checkpoint of each stage chosen on validation.
Every stage is resumable; running the same job again continues where it stopped. The command line
(`peft-spectral train-svf`), the demo and the benchmarks all train experts through [`train_expert`].

```python
from peft_spectral.training import SVFTrainingConfig, train_expert

config = SVFTrainingConfig(task="rg:gcd?max_value=30", output_dir="experts/gcd", sft_steps=60, rl_steps=20,
                           val_examples=64, test_examples=300)
result = train_expert(config)          # the adapter, README.md, expert.json, test_eval.json in experts/gcd
```
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..data import Task, cap_answer_share, check_task_spec, load_task
from ..state import load_state, write_json_atomic


__all__ = ["ExpertResult", "SVFTrainingConfig", "train_expert"]

logger = logging.getLogger(__name__)

#: The file a finished stage writes in its directory (read back on resume).
STAGE_FILE = "stage.json"
#: The file with the run's log (config, stages, test evaluation) in the expert directory.
LOG_FILE = "training_log.json"


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass
class SVFTrainingConfig:
    """Everything that defines an SVF expert (or a LoRA baseline trained the same way).

    Every field has a default and a help text; `peft-spectral train-svf` has one option per field (`--sft-steps`,
    ...), and `SVFTrainingConfig.from_json` reads the same fields from a recipe file. Invalid values raise a
    `ValueError` naming the field, before any model is loaded.
    """

    task: str = field(
        default="rg:basic_arithmetic?allow_negation=false&allow_parentheses=false&max_digits=2&max_terms=2"
        "&operators=+,-",
        metadata=_help("task spec, e.g. 'rg:gcd?max_value=30' or 'jsonl:data.jsonl' (several joined by ';')"),
    )
    output_dir: str = field(default="svf-expert", metadata=_help("the expert directory (adapter, card, logs)"))
    model: Optional[str] = field(
        default=None, metadata=_help("Hub id or local path of the base model; left out: the embedded SmolLM2-135M")
    )
    device: str = field(default="auto", metadata=_help("'auto' (cuda when available), 'cpu', 'cuda', ..."))
    dtype: str = field(default="float32", metadata=_help("weight dtype", choices=("float32", "bfloat16", "float16")))
    seed: int = field(default=0, metadata=_help("seed of the task splits, sampling and training"))
    max_examples: Optional[int] = field(
        default=None, metadata=_help("examples of the task in all (before the splits); left out: the source's default")
    )
    train_examples: Optional[int] = field(default=None, metadata=_help("use only the first N train examples"))
    max_answer_share: Optional[float] = field(
        default=None,
        metadata=_help(
            "drop train examples so that no answer is more than this share of them (a task whose answers are "
            "mostly one value otherwise teaches that value); validation and test are left as they are"
        ),
    )
    peft_method: str = field(
        default="svf", metadata=_help("'svf', or 'lora' for a LoRA baseline on the same path", choices=("svf", "lora"))
    )
    target_modules: Optional[list[str]] = field(
        default=None, metadata=_help("modules to adapt; left out: the MLP projections (gate/up/down)")
    )
    svf_mode: str = field(default="linear", metadata=_help("SVF scale function of z", choices=("linear", "sigmoid")))
    lora_r: int = field(default=16, metadata=_help("LoRA rank (peft_method='lora')"))
    init_adapter: Optional[str] = field(
        default=None, metadata=_help("start from this saved adapter (its targets and mode are kept)")
    )
    sft_steps: int = field(default=0, metadata=_help("SFT warm-start steps (0: no SFT stage)"))
    sft_learning_rate: float = field(default=2e-3, metadata=_help("SFT learning rate (AdamW, constant)"))
    sft_batch_size: int = field(default=8, metadata=_help("SFT examples per step"))
    sft_target: str = field(
        default="answer",
        metadata=_help("SFT target: the answer, or a generator's worked solution", choices=("answer", "solution")),
    )
    sft_max_seconds: Optional[float] = field(
        default=None, metadata=_help("SFT wall-clock budget (validation excluded)")
    )
    rl_steps: int = field(default=40, metadata=_help("RL steps (0: no RL stage)"))
    rl_algorithm: str = field(default="grpo", metadata=_help("RL algorithm", choices=("grpo", "rloo")))
    rl_learning_rate: float = field(default=2e-3, metadata=_help("RL learning rate (the paper's 2e-3)"))
    beta: float = field(default=0.1, metadata=_help("KL weight to the starting model (paper grid 0, 0.1, 0.2, 0.3)"))
    prompts_per_step: int = field(default=2, metadata=_help("RL prompts per step"))
    num_generations: int = field(default=4, metadata=_help("RL samples per prompt"))
    max_completion_length: int = field(default=16, metadata=_help("RL new tokens per sample"))
    temperature: float = field(default=1.0, metadata=_help("RL sampling temperature"))
    reward_extraction: str = field(
        default="strict",
        metadata=_help("how rewards read the answer (strict also teaches the format)", choices=("strict", "lenient")),
    )
    partial_credit: bool = field(default=False, metadata=_help("reward a verifier's partial credit"))
    rl_max_seconds: Optional[float] = field(default=None, metadata=_help("RL wall-clock budget (validation excluded)"))
    val_examples: Optional[int] = field(
        default=None, metadata=_help("validation examples for checkpoint selection (each stage keeps its best)")
    )
    eval_every: int = field(default=10, metadata=_help("steps between validations"))
    patience: Optional[int] = field(default=None, metadata=_help("stop a stage after N validations without gain"))
    val_metric: str = field(
        default="accuracy", metadata=_help("validation score", choices=("accuracy", "balanced_accuracy"))
    )
    eval_max_new_tokens: int = field(default=16, metadata=_help("generation budget of validation and test"))
    test_examples: int = field(
        default=0, metadata=_help("score base and expert on the first N test examples (lenient and strict); 0 skips")
    )
    progress: bool = field(default=True, metadata=_help("progress bars"))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field; raises a `ValueError` naming the first bad one."""
        positive = ["sft_batch_size", "prompts_per_step", "eval_every", "eval_max_new_tokens", "lora_r"]
        positive += ["max_completion_length"]
        for name in positive:
            _check_int(self, name, minimum=1)
        for name in ("sft_steps", "rl_steps", "test_examples"):
            _check_int(self, name, minimum=0)
        for name in ("max_examples", "train_examples", "val_examples", "patience"):
            if getattr(self, name) is not None:
                _check_int(self, name, minimum=1)
        _check_int(self, "num_generations", minimum=2)
        for name in ("sft_learning_rate", "rl_learning_rate", "temperature"):
            _check_float(self, name, positive=True)
        _check_float(self, "beta", positive=False)
        if self.max_answer_share is not None:
            _check_float(self, "max_answer_share", positive=True)
            if self.max_answer_share > 1:
                raise ValueError(f"max_answer_share must be in (0, 1], got {self.max_answer_share!r}")
        for name in ("sft_max_seconds", "rl_max_seconds"):
            if getattr(self, name) is not None:
                _check_float(self, name, positive=True)
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} must be one of {choices}, got {getattr(self, f.name)!r}")
        if self.sft_steps == 0 and self.rl_steps == 0:
            raise ValueError("sft_steps and rl_steps are both 0: nothing to train")
        if not isinstance(self.task, str) or not self.task.strip():
            raise ValueError(f"task must be a task spec, got {self.task!r}")
        if self.init_adapter is not None and (self.target_modules is not None or self.peft_method != "svf"):
            raise ValueError("init_adapter keeps the saved adapter's targets and method: leave target_modules unset")

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> SVFTrainingConfig:
        """A config from a dict (e.g. one recipe of a library's recipe file); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown SVFTrainingConfig field(s) {unknown}; known: {sorted(names)}")
        return cls(**{**data, **overrides})

    @classmethod
    def from_json(cls, path, **overrides: Any) -> SVFTrainingConfig:
        """A config from a JSON file of fields."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: cannot read an SVFTrainingConfig from it ({err})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: an SVFTrainingConfig file holds a JSON object of fields")
        return cls.from_dict(data, **overrides)


def _check_int(config, name: str, minimum: int) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_float(config, name: str, positive: bool) -> None:
    value = getattr(config, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")


@dataclass
class ExpertResult:
    """What [`train_expert`] returns.

    Args:
        model (`PeftModel`): The trained model, the expert's adapter active.
        path (`Path`): The expert directory.
        stages (`list[dict]`): One summary per stage (`name`, `method`, `steps_run`, `wall_seconds`, `validation`).
        test_eval (`dict`, *optional*): The paired test report ([`peft_spectral.expert_eval.paired_report`], lenient
            extraction, with the strict one under `"strict"`).
        task ([`~peft_spectral.data.Task`]): The task.
    """

    model: Any
    path: Path
    stages: list[dict[str, Any]]
    test_eval: Optional[dict[str, Any]]
    task: Task


def _adapter_config(config: SVFTrainingConfig):
    if config.peft_method == "lora":
        from peft import LoraConfig

        targets = config.target_modules or ["gate_proj", "up_proj", "down_proj"]
        return LoraConfig(r=config.lora_r, lora_alpha=2 * config.lora_r, target_modules=targets, task_type="CAUSAL_LM")
    from ..tuners.svf import SVFConfig

    return SVFConfig(target_modules=config.target_modules, mode=config.svf_mode, task_type="CAUSAL_LM")


def _load_adapter(model, folder: str, peft_method: str):
    """`model` with the adapter saved in `folder`, trainable (the start of the next stage)."""
    if peft_method == "svf":
        from .trainer import load_trainable_adapter

        return load_trainable_adapter(model, folder)
    from peft import PeftModel

    return PeftModel.from_pretrained(model, folder, is_trainable=True)


def _stage_plan(config: SVFTrainingConfig) -> list[dict[str, Any]]:
    plan = []
    if config.sft_steps:
        plan.append({"name": "sft", "method": "sft", "steps": config.sft_steps})
    if config.rl_steps:
        plan.append({"name": "rl", "method": "rl", "steps": config.rl_steps})
    return plan


def train_split(task: Task, config: SVFTrainingConfig) -> list:
    """The train examples the stages use: the first `config.train_examples`, capped by `config.max_answer_share`."""
    train = task.train[: config.train_examples] if config.train_examples else list(task.train)
    if config.max_answer_share is not None and config.max_answer_share < 1:
        train = cap_answer_share(train, config.max_answer_share, seed=config.seed)
    return train


def _run_stage(stage, base, tokenizer, task, train, config, start_adapter, folder: Path, printer) -> dict[str, Any]:
    from .svf import train_svf

    model = copy.deepcopy(base)
    svf_config = None
    if start_adapter is not None:
        model = _load_adapter(model, start_adapter, config.peft_method)
    else:
        svf_config = _adapter_config(config)
    common = {
        "seed": config.seed,
        "disable_tqdm": not config.progress,
        "use_cpu": next(base.parameters()).device.type == "cpu",
    }
    if stage["method"] == "sft":
        preset = {
            "learning_rate": config.sft_learning_rate,
            "per_device_train_batch_size": config.sft_batch_size,
            **common,
        }
        budget = config.sft_max_seconds
    else:
        preset = {
            "learning_rate": config.rl_learning_rate,
            "prompts_per_step": config.prompts_per_step,
            "num_generations": config.num_generations,
            "max_completion_length": config.max_completion_length,
            "temperature": config.temperature,
            **common,
        }
        budget = config.rl_max_seconds
    from .datasets import reward_for_task

    rewards = None
    if stage["method"] == "rl":
        reward = reward_for_task(
            train, kind=task.kind, extraction=config.reward_extraction, partial_credit=config.partial_credit
        )
        rewards = [reward]
    start = time.perf_counter()
    result = train_svf(
        model,
        tokenizer,
        train,
        method=stage["method"],
        algorithm=config.rl_algorithm,
        kind=task.kind,
        output_dir=str(folder / "checkpoints"),
        max_steps=stage["steps"],
        beta=config.beta,
        svf_config=svf_config,
        reward_funcs=rewards,
        printer=printer,
        resume=True,
        eval_examples=task.validation[: config.val_examples] if config.val_examples else None,
        eval_every=config.eval_every,
        early_stopping_patience=config.patience,
        eval_metric=config.val_metric,
        eval_max_new_tokens=config.eval_max_new_tokens,
        max_train_seconds=budget,
        sft_target=config.sft_target,
        **preset,
    )
    result.model.save_pretrained(str(folder))
    summary = {
        "name": stage["name"],
        "method": stage["method"],
        "steps": stage["steps"],
        "steps_run": result.recipe.get("steps_run"),
        "wall_seconds": time.perf_counter() - start,
        "train_seconds": result.train_runtime,
        "init_from": start_adapter,
        "recipe": result.recipe,
        "validation": result.validation,
        "time_budget": result.time_budget,
        "logs": result.logs,
    }
    write_json_atomic(folder / STAGE_FILE, summary)
    return summary


def _evaluate(model, tokenizer, examples, task, config) -> dict[str, Any]:
    from ..evaluation import evaluate, rescore

    lenient = evaluate(model, tokenizer, examples, kind=task.kind, max_new_tokens=config.eval_max_new_tokens)
    if lenient.predictions is None:  # scored by option log-likelihood: one reading only
        return {"lenient": lenient.correct, "strict": lenient.correct}
    strict = rescore(lenient, examples, kind=task.kind, extraction="strict")
    return {"lenient": lenient.correct, "strict": strict.correct, "predictions": lenient.predictions}


def _test_report(base: dict, expert: dict, task: Task, config: SVFTrainingConfig) -> dict[str, Any]:
    from ..expert_eval import paired_report

    settings = {"split": "test", "max_new_tokens": config.eval_max_new_tokens, "seed": config.seed}
    report = paired_report(
        base["lenient"], expert["lenient"], task=task.name, settings={**settings, "extraction": "lenient"}
    )
    report["strict"] = paired_report(
        base["strict"], expert["strict"], task=task.name, settings={**settings, "extraction": "strict"}
    )
    return report


def train_expert(
    config: SVFTrainingConfig,
    model=None,
    tokenizer=None,
    *,
    task: Optional[Task] = None,
    printer: Optional[Callable[[str], None]] = None,
) -> ExpertResult:
    """Train (or finish training) the expert `config` describes and write its files.

    The task spec is checked before anything is loaded. Stages run in order (SFT, then RL from the SFT adapter), each
    in `<output_dir>/stages/<name>/` with resumable checkpoints; a finished stage (its `stage.json` written) is not
    run again. The expert directory gets the adapter, `README.md` and `expert.json` (through
    [`peft_spectral.model_card.write_expert_files`]: task spec and parameters, recipe, budget, validation curves,
    test accuracies with 95% intervals), `test_eval.json` and `training_log.json`.

    Args:
        config ([`SVFTrainingConfig`]): The expert.
        model, tokenizer (*optional*): The base model and its tokenizer; left out: loaded from `config.model`. The
            model itself is not modified (each stage trains a copy).
        task ([`~peft_spectral.data.Task`], *optional*): The task, when the caller has loaded it already (it must
            be `config.task` with `config.seed`).
        printer (*optional*): Receives progress lines (default: `print`).

    Returns:
        [`ExpertResult`].
    """
    printer = printer or print
    config.validate()
    check_task_spec(config.task)
    task = task or load_task(config.task, seed=config.seed, max_examples=config.max_examples)
    train = train_split(task, config)  # before the model loads: too few distinct answers is an error here
    if config.max_answer_share is not None:
        printer(f"[expert] max_answer_share={config.max_answer_share}: {len(train)} train examples kept")
    if model is None:
        from ..assets import load_model

        model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
    elif tokenizer is None:
        raise ValueError("pass the tokenizer with the model")
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / LOG_FILE
    log = load_state(log_path, what="expert training log") or {}
    if log and log.get("config") not in (None, config.to_dict()):
        raise ValueError(
            f"{out} holds an expert trained with another config ({log_path}); use another output_dir or delete it"
        )
    test = task.test[: config.test_examples] if config.test_examples else []
    if test and "base_test" not in log:
        printer(f"[expert] {task.name}: base model on {len(test)} test examples")
        log["base_test"] = _evaluate(model, tokenizer, test, task, config)
    log["config"] = config.to_dict()
    log["task"] = task.info()
    write_json_atomic(log_path, log)

    stages, start_adapter = [], config.init_adapter
    for stage in _stage_plan(config):
        folder = out / "stages" / stage["name"]
        done = load_state(folder / STAGE_FILE, what=f"stage {stage['name']!r}")
        if done is not None:
            printer(f"[expert] stage {stage['name']}: done already ({folder})")
        else:
            printer(f"[expert] stage {stage['name']}: {stage['method']} for {stage['steps']} steps")
            done = _run_stage(stage, model, tokenizer, task, train, config, start_adapter, folder, printer)
        stages.append(done)
        start_adapter = str(folder)

    expert = _load_adapter(copy.deepcopy(model), start_adapter, config.peft_method)
    expert.eval()
    expert.save_pretrained(str(out))
    test_eval = None
    if test:
        test_eval = _test_report(log["base_test"], _evaluate(expert, tokenizer, test, task, config), task, config)
        from ..expert_eval import report_lines, write_test_eval

        write_test_eval(out, test_eval)
        printer("\n".join([f"[expert] {task.name}, test (lenient):", *report_lines(test_eval)]))
    _write_card(out, expert, task, config, stages, test_eval, len(train))
    log["stages"] = [{k: v for k, v in s.items() if k != "logs"} for s in stages]
    write_json_atomic(log_path, log)
    return ExpertResult(model=expert, path=out, stages=stages, test_eval=test_eval, task=task)


def _write_card(out: Path, expert, task: Task, config: SVFTrainingConfig, stages, test_eval, n_train: int) -> None:
    from ..model_card import write_expert_files

    base = expert.get_base_model()
    last = stages[-1] if stages else {}
    recipe = {
        **last.get("recipe", {}),
        "task_spec": task.spec or task.name,
        "train_examples": n_train,
        "seed": config.seed,
    }
    write_expert_files(
        out,
        task=task.name,
        description=task.description,
        kind=task.kind,
        base_model=getattr(base, "name_or_path", None) or None,
        recipe=recipe,
        wall_seconds=sum(s.get("wall_seconds") or 0.0 for s in stages),
        validation=last.get("validation"),
        test_eval=test_eval,
        stages=[
            {k: s.get(k) for k in ("name", "method", "steps_run", "wall_seconds", "init_from", "validation")}
            for s in stages
        ],
        task_info=task.info(),
        config=config.to_dict(),
    )
