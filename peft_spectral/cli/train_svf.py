"""`peft-spectral train-svf`: train an SVF expert with [`peft_spectral.training.train_expert`].

Every option is a field of [`peft_spectral.training.SVFTrainingConfig`] (`--sft-steps` for `sft_steps`, ...), with
its default and help; `--config FILE` reads fields from a JSON file first and the options given on the command line
override them. The model options follow the CLI's conventions (`--model`, `--device`, `--dtype`, `--output`,
`--seed`, `--no-progress`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Any, Optional

from ._common import add_command, add_push_option, push_adapter_if_requested


#: Config fields whose option has the CLI-wide spelling rather than `--<field-name>`.
_RENAMED = {"output_dir": "--output"}
#: Fields given by a flag of the other sense.
_NEGATED = {"progress": "--no-progress"}


def _option_type(annotation: Any):
    """`(argparse type, nargs)` of a config field's annotation (`int`, `Optional[float]`, `Optional[list[str]]`)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union and len(args) == 1:
        annotation = args[0]
    if typing.get_origin(annotation) is list:
        return str, "+"
    return (annotation, None) if annotation in (bool, int, float) else (str, None)


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_config_arguments(parser: argparse.ArgumentParser, config_cls) -> None:
    """One option per field of a config dataclass: its default, help text and choices (defaults are shown but not
    set on the namespace, so that `--config FILE` values are overridden only by options given explicitly)."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.name in _NEGATED:
            parser.add_argument(
                _NEGATED[f.name], dest=f.name, action="store_const", const=False, help=f"no {help_text}"
            )
            continue
        kind, nargs = _option_type(hints[f.name])
        flag = _RENAMED.get(f.name, "--" + f.name.replace("_", "-"))
        if kind is bool and default is False:
            parser.add_argument(
                flag, dest=f.name, action="store_const", const=True, default=argparse.SUPPRESS, help=help_text
            )
            continue
        parser.add_argument(
            flag,
            dest=f.name,
            type=_bool if kind is bool else kind,
            nargs=nargs,
            choices=f.metadata.get("choices"),
            default=argparse.SUPPRESS,
            metavar=None if f.metadata.get("choices") else f.name.upper(),
            help=f"{help_text} (default: {default!r})",
        )


def config_from_args(config_cls, args: argparse.Namespace, base: Optional[dict] = None):
    """The config of `args`: `base` (e.g. read from `--config`), overridden by the options given."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls) if hasattr(args, f.name)}
    return config_cls.from_dict({**(base or {}), **given})


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..training.expert_job import SVFTrainingConfig

    p = add_command(
        subparsers,
        "train-svf",
        help="train an SVF expert (only singular-value scales z): SFT warm start, then RL (GRPO/RLOO) with TRL",
        description=(
            "Train an SVF adapter on a task's train split: an optional SFT warm start (--sft-steps) on the gold "
            "answers, then Transformer²'s RL (--rl-steps): GRPO or RLOO with +1/-1 rewards from the task's own "
            "scorer, AdamW lr 2e-3 and a KL weight --beta to the model it starts from. Each stage keeps its best "
            "checkpoint on --val-examples validation examples and is resumable (run the same command again). The "
            "expert directory --output gets the adapter (only z), a model card README.md, expert.json, "
            "test_eval.json (--test-examples: base vs expert, lenient and strict answer extraction, 95%% CIs) and "
            "training_log.json. Tasks are task specs, e.g. 'rg:gcd?max_value=30' (see `peft-spectral tasks`)."
        ),
    )
    p.add_argument("--config", metavar="FILE", default=None, help="JSON file of SVFTrainingConfig fields")
    add_config_arguments(p, SVFTrainingConfig)
    add_push_option(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..data import TaskSpecError, check_task_spec
    from ..training.expert_job import SVFTrainingConfig, train_expert

    try:
        base = SVFTrainingConfig.from_json(args.config).to_dict() if args.config else None
        config = config_from_args(SVFTrainingConfig, args, base)
        check_task_spec(config.task)  # a bad spec is one line, before the model loads
    except (ValueError, TaskSpecError) as err:
        print(f"peft-spectral train-svf: error: {err}", file=sys.stderr)
        return 2
    from tqdm.auto import tqdm

    result = train_expert(config, printer=tqdm.write)
    print(f"expert saved to {result.path} (adapter, README.md, expert.json)")
    push_adapter_if_requested(args, result.path)
    return 0
