"""Where peft_spectral keeps its caches (embedded model, BigBench tasks, SVD factors)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Root cache directory: `$PEFT_SPECTRAL_CACHE`, else `$XDG_CACHE_HOME/peft_spectral`, else `~/.cache/peft_spectral`."""
    env = os.environ.get("PEFT_SPECTRAL_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "peft_spectral"


def cache_subdir(name: str) -> Path:
    """A named sub-directory of [`cache_root`], created on first use."""
    path = cache_root() / name
    path.mkdir(parents=True, exist_ok=True)
    return path
