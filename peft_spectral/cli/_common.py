"""What every `peft-spectral` subcommand shares: the help formatter, option builders, argument types and the model
loader.

The conventions (stated for users at the top of `docs/cli.md`):

* list options take space-separated values (`nargs="+"`): `--target-modules q_proj v_proj`;
* `--output DIR` is always a directory; results JSON is written inside it;
* one option name, one meaning; every option has help text and `--help` shows its default;
* `--model`, `--device`, `--dtype` wherever a model is loaded, `--device-map` where it is loaded for inference only;
* `--no-progress` wherever progress bars are shown, `--push-to-hub REPO` wherever an adapter is produced;
* every option is checked before the model loads and before any long work (ranges, finiteness, a writable
  `--output`); a bad input ends the command with one line, `peft-spectral COMMAND: error: ...` naming it, and exit
  status 2 ([`CommandError`], handled in `peft_spectral.cli.main`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Optional


logger = logging.getLogger(__name__)

#: Values of `--dtype`; `auto` keeps the checkpoint's dtype (float32 for the embedded GGUF model).
DTYPES = ("auto", "float32", "bfloat16", "float16")


class CommandError(ValueError):
    """A bad input to a command (an option, a file it names, a state or adapter it points at).

    `peft_spectral.cli.main` prints it as one line, `peft-spectral COMMAND: error: MESSAGE`, and returns exit status 2;
    the message names the option or file.
    """


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`ArgumentDefaultsHelpFormatter` that leaves out the uninformative `(default: None)` / `(default: False)`:
    an option without a default says in its help what leaving it out means."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def add_command(subparsers, name: str, *, help: str, description: str) -> argparse.ArgumentParser:
    """Add the subcommand `name` with the shared formatter.

    Args:
        subparsers: The `add_subparsers()` object of the `peft-spectral` parser.
        name (`str`): Command name, e.g. `"train-svf"`.
        help (`str`): One line for `peft-spectral --help`.
        description (`str`): The paragraph at the top of `peft-spectral NAME --help`.
    """
    return subparsers.add_parser(name, help=help, description=description, formatter_class=HelpFormatter)


# ---------------------------------------------------------------------------------------------------- option builders


def add_model_options(parser: argparse.ArgumentParser, *, inference: bool = False) -> None:
    """`--model`, `--device`, `--dtype` and, when `inference` is true, `--device-map`.

    Args:
        parser (`argparse.ArgumentParser`): The subcommand's parser.
        inference (`bool`): The command only runs the model forward (no training), so accelerate may spread it over
            several devices with `--device-map auto`.
    """
    parser.add_argument(
        "--model", default=None, help="Hub id or local directory; left out: the embedded SmolLM2-135M-Instruct"
    )
    parser.add_argument(
        "--device",
        type=device_name,
        default="auto",
        help="where the model runs: 'auto' (cuda when available, else cpu), 'cpu', 'cuda', 'cuda:1', ...",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="dtype of the model weights; 'auto' keeps the checkpoint's",
    )
    if inference:
        parser.add_argument(
            "--device-map",
            choices=("auto", "balanced", "sequential"),
            default=None,
            help="let accelerate place a --model over the available devices (overrides --device; the embedded "
            "model always goes on --device); left out: the whole model on --device",
        )


def add_output_option(parser: argparse.ArgumentParser, what: str, *, default: Optional[str] = None) -> None:
    """`--output DIR`, required unless `default` is given.

    Args:
        parser (`argparse.ArgumentParser`): The subcommand's parser.
        what (`str`): What the command writes into the directory, for the help text.
        default (`str`, *optional*): A default directory (then the option is optional).
    """
    parser.add_argument(
        "--output",
        metavar="DIR",
        required=default is None,
        default=default,
        help=f"directory (created when missing) for {what}",
    )


def add_progress_option(parser: argparse.ArgumentParser) -> None:
    """`--no-progress`: hide every progress bar (the package's, transformers', datasets' and TRL's)."""
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars (e.g. for log files)")


def add_push_option(parser: argparse.ArgumentParser) -> None:
    """`--push-to-hub REPO`: upload the adapter the command produced (see [`push_adapter_if_requested`])."""
    parser.add_argument(
        "--push-to-hub",
        metavar="REPO",
        default=None,
        help="also upload the adapter to this Hub repository (created when missing); left out: nothing is uploaded",
    )


def add_seed_option(parser: argparse.ArgumentParser) -> None:
    """`--seed`: seeds task splits, sampling and training."""
    parser.add_argument("--seed", type=int, default=0, help="random seed of task splits, sampling and training")


# ---------------------------------------------------------------------------------------------------- argument types


def number(text: str) -> float:
    """A float, with an argparse error naming the bad text."""
    try:
        return float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from err


def finite_number(text: str) -> float:
    """A finite float (not `nan` or `inf`)."""
    value = number(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from err
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A finite float >= 0."""
    value = number(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite float > 0."""
    value = number(text)
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def number_in(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """An argument type: a float in the interval from `low` to `high` (`nan` is never in it).

    Args:
        low (`float`): Lower bound.
        high (`float`): Upper bound.
        low_open (`bool`): Exclude `low`.
        high_open (`bool`): Exclude `high`.
    """
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        value = number(text)
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (above and below):
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text!r}")
        return value

    parse.__name__ = f"number in {interval}"
    return parse


#: A rank fraction rho: a number in (0, 1].
rank_fraction = number_in(0, 1, low_open=True)


# ---------------------------------------------------------------------------------------------------- paths


def output_directory(path: str, option: str = "--output") -> Path:
    """Check, before any work, that the command will be able to create `path` (a directory) and write in it.

    Nothing is created: a missing directory needs its nearest existing ancestor to be a writable directory.

    Args:
        path (`str`): The directory.
        option (`str`): The option that named it, for the message.

    Raises:
        [`CommandError`]: `path` (or an ancestor) is a file, or the place is not writable.
    """
    folder = Path(path).expanduser()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == folder else f"is inside {existing}, which is a file"
        raise CommandError(f"{option} {path}: {where}, not a directory (the command writes several files into it)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CommandError(f"{option} {path}: {existing} is not writable")
    return folder


def state_file(path: str, option: str = "--state", what: str = "state") -> Path:
    """Check a JSON state file before any work: not a directory, its directory writable, and, when it exists, a
    readable state (see [`peft_spectral.state.load_state`]; whether it belongs to this job is checked later).

    Raises:
        [`CommandError`] or [`~peft_spectral.state.StateFileError`]: naming the file.
    """
    from ..state import load_state

    file = Path(path).expanduser()
    if file.is_dir():
        raise CommandError(f"{option} {path}: is a directory; give a file name such as {file / 'state.json'}")
    output_directory(str(file.parent), option=f"{option} (its directory)")
    if file.exists():
        if not os.access(file, os.R_OK | os.W_OK):
            raise CommandError(f"{option} {path}: cannot read and rewrite it")
        load_state(file, what=f"{option} {what}")
    return file


def device_name(text: str) -> str:
    """`"auto"` or anything `torch.device` accepts (`"cpu"`, `"cuda"`, `"cuda:1"`, `"mps"`)."""
    if text == "auto":
        return text
    import torch

    try:
        torch.device(text)
    except (RuntimeError, ValueError) as err:
        raise argparse.ArgumentTypeError(
            f"expected 'auto' or a torch device such as 'cpu' or 'cuda:0', got {text!r}"
        ) from err
    return text


class UnionAction(argparse.Action):
    """For `nargs="+"` options whose `type` returns a list, or `None` for "all": store the sorted union of the lists,
    or `None` when any value means all (e.g. `--layers 0-5 27` → `[0, 1, 2, 3, 4, 5, 27]`, `--layers all` → `None`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if any(v is None for v in values):
            setattr(namespace, self.dest, None)
        else:
            setattr(namespace, self.dest, sorted({x for v in values for x in v}))


# ---------------------------------------------------------------------------------------------------- model loading


def load_model_or_exit(args: argparse.Namespace):
    """`(model, tokenizer)` as the options of [`add_model_options`] ask: `args.model` (the embedded default model when
    `None`), `args.dtype`, and `args.device` or `args.device_map` (see [`peft_spectral.assets.load_model`]).

    A model that cannot be loaded ends the command with a message naming `--model`.

    Args:
        args (`argparse.Namespace`): The parsed arguments of a command built with [`add_model_options`].
    """
    from ..assets import load_model

    device_map = getattr(args, "device_map", None)
    if device_map and args.model is not None:
        placement: dict[str, Any] = {"device_map": device_map}
    else:  # the embedded model is small: it goes on one device
        placement = {"device": getattr(args, "device", "auto")}
    try:
        return load_model(args.model, dtype=getattr(args, "dtype", "float32"), **placement)
    except OSError as err:
        raise SystemExit(f"--model {args.model!r}: cannot load it ({err})") from None


# ---------------------------------------------------------------------------------------------------- after the run


def push_adapter_if_requested(args: argparse.Namespace, folder) -> Optional[str]:
    """Upload `folder` to `args.push_to_hub` when that option was given; returns the commit URL (or `None`).

    Raises:
        `SystemExit`: when `folder` holds no adapter (`adapter_config.json`).
    """
    repo = getattr(args, "push_to_hub", None)
    if not repo:
        return None
    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise SystemExit(f"--push-to-hub {repo}: no adapter was saved in {folder}, nothing to upload")
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo)
    url = str(getattr(info, "commit_url", info))
    print(f"pushed {folder} to {url}")
    return url


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Within the block, transformers', datasets' and huggingface_hub's progress bars are off unless `enabled`.

    The package's own bars and the trainers' follow the commands' `progress`/`disable_tqdm` arguments.
    """
    if enabled:
        yield
        return
    import datasets
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    switches: Sequence[tuple[Any, Any, Any]] = (
        (hf_logging.is_progress_bar_enabled, hf_logging.disable_progress_bar, hf_logging.enable_progress_bar),
        (datasets.is_progress_bar_enabled, datasets.disable_progress_bars, datasets.enable_progress_bars),
        (
            lambda: not hub_utils.are_progress_bars_disabled(),
            hub_utils.disable_progress_bars,
            hub_utils.enable_progress_bars,
        ),
    )
    restore = []
    for is_on, off, on in switches:
        if is_on():
            off()
            restore.append(on)
    try:
        yield
    finally:
        for on in restore:
            on()
