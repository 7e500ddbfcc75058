"""What every `peft-spectral` subcommand shares: the help formatter, option builders, argument types and the model
loader.

The conventions (stated for users at the top of `docs/cli.md`):

* list options take space-separated values (`nargs="+"`): `--target-modules q_proj v_proj`;
* `--output DIR` is always a directory; results JSON is written inside it;
* one option name, one meaning; every option has help text and `--help` shows its default;
* `--model`, `--device`, `--dtype` wherever a model is loaded, `--device-map` where it is loaded for inference only;
* `--no-progress` wherever progress bars are shown, `--push-to-hub REPO` wherever an adapter is produced.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional


logger = logging.getLogger(__name__)

#: Values of `--dtype`; `auto` keeps the checkpoint's dtype (float32 for the embedded GGUF model).
DTYPES = ("auto", "float32", "bfloat16", "float16")


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


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A float >= 0."""
    value = number(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite float > 0."""
    value = number(text)
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


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
