"""`peft-spectral train-svf`: train an SVF expert with [`peft_spectral.training.train_expert`].

Every option is a field of [`peft_spectral.training.SVFTrainingConfig`] (`--sft-steps` for `sft_steps`, ...), with
its default and help; `--config FILE` reads fields from a JSON file first and the options given on the command line
override them. The model options follow the CLI's conventions (`--model`, `--device`, `--dtype`, `--output`,
`--seed`, `--no-progress`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any, Optional

from ._common import add_command, add_push_option, output_directory, push_adapter_if_requested


#: Config fields whose option has the CLI-wide spelling rather than `--<field-name>`: field -> (flag, dest).
_RENAMED = {"output_dir": ("--output", "output")}
#: Config fields given by a flag of the other sense: field -> (flag, dest).
_NEGATED = {"progress": ("--no-progress", "no_progress")}
#: Where `argparse` notes the options given on the command line (they win over `--config FILE`).
_GIVEN = "_given_options"


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


class _Given(argparse.Action):
    """Store the value and note that the option was given (so that it wins over a `--config` file's value)."""

    def __call__(self, parser, namespace, values, option_string=None):
        value = self.const if self.nargs == 0 else values
        setattr(namespace, self.dest, value)
        given = set(getattr(namespace, _GIVEN, set()))
        setattr(namespace, _GIVEN, given | {self.dest})


def add_config_arguments(parser: argparse.ArgumentParser, config_cls) -> None:
    """One option per field of a config dataclass, with its default, help text and choices; the options given on the
    command line are noted, so that [`config_from_args`] lets only them override a `--config` file."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.name in _NEGATED:
            flag, dest = _NEGATED[f.name]
            parser.add_argument(
                flag, dest=dest, action=_Given, nargs=0, const=True, default=False, help=f"no {help_text}"
            )
            continue
        kind, nargs = _option_type(hints[f.name])
        flag, dest = _RENAMED.get(f.name, ("--" + f.name.replace("_", "-"), f.name))
        if kind is bool and default is False:
            parser.add_argument(flag, dest=dest, action=_Given, nargs=0, const=True, default=False, help=help_text)
            continue
        shown = "" if default is None else f" (default: {default})"
        if isinstance(default, str) and len(default) > 40:  # a task spec: argparse would break it inside --help
            shown, default = f"; left out: {default}", None
        parser.add_argument(
            flag,
            dest=dest,
            action=_Given,
            type=_bool if kind is bool else kind,
            nargs=nargs,
            choices=f.metadata.get("choices"),
            default=default,
            metavar=None if f.metadata.get("choices") else f.name.upper(),
            help=f"{help_text}{shown}",
        )


def config_from_args(config_cls, args: argparse.Namespace, base: Optional[dict] = None):
    """The config of `args`: the options' defaults, then `base` (e.g. read from `--config`), then the options given
    on the command line."""
    values = {}
    given = getattr(args, _GIVEN, set())
    for f in dataclasses.fields(config_cls):
        negated = _NEGATED.get(f.name)
        dest = negated[1] if negated else _RENAMED.get(f.name, (None, f.name))[1]
        value = (not getattr(args, dest)) if negated else getattr(args, dest)
        if base is not None and dest not in given and f.name in base:
            values[f.name] = base[f.name]
        elif value is not None or f.default is None:
            values[f.name] = value  # (an option left out whose default is too long for --help is None: the field's)
    return config_cls.from_dict(values)


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


def _read_config(path: str) -> dict:
    """The fields of a `--config` JSON file (checked by building the config from them)."""
    from ..training.expert_job import SVFTrainingConfig

    fields = json.loads(Path(path).read_text())
    SVFTrainingConfig.from_dict(fields)
    return fields


def run(args: argparse.Namespace) -> int:
    from ..data import TaskSpecError, check_task_spec
    from ..training.expert_job import SVFTrainingConfig, train_expert

    try:
        base = _read_config(args.config) if args.config else None
        config = config_from_args(SVFTrainingConfig, args, base)
        check_task_spec(config.task)  # a bad spec is one line, before the model loads
        output_directory(config.output_dir)
    except (OSError, ValueError, TaskSpecError) as err:
        print(f"peft-spectral train-svf: error: {err}", file=sys.stderr)
        return 2
    from tqdm.auto import tqdm

    result = train_expert(config, printer=tqdm.write)
    print(f"expert saved to {result.path} (adapter, README.md, expert.json)")
    push_adapter_if_requested(args, result.path)
    return 0
