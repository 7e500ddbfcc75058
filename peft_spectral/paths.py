"""Where peft_spectral keeps its caches (embedded model, HumanEval, extracted BigBench tasks, SVD factors) and the
shipped expert library.

Every location comes from the user: an explicit argument, or the environment. Nothing read from a model or adapter
file (e.g. an `adapter_config.json` downloaded from the Hub) decides where the library reads or writes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union


#: Environment variable moving every cache of the package.
CACHE_ENV = "PEFT_SPECTRAL_CACHE"
#: Environment variable moving the SVD cache only (takes precedence over `CACHE_ENV` for it).
SVD_CACHE_ENV = "PEFT_SPECTRAL_SVD_CACHE"


def cache_root() -> Path:
    """Root cache directory: `$PEFT_SPECTRAL_CACHE`, else `$XDG_CACHE_HOME/peft_spectral`, else `~/.cache/peft_spectral`."""
    env = os.environ.get(CACHE_ENV)
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


def svd_cache_dir(explicit: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Directory of the SVD cache, resolved without touching the disk.

    Args:
        explicit (`str` or `os.PathLike`, *optional*): A directory chosen by the caller at runtime; wins when given.

    Returns:
        `Path`: `explicit`, else `$PEFT_SPECTRAL_SVD_CACHE`, else `<cache_root()>/svd`. The directory is not created
        here; the cache creates it on its first write.
    """
    if explicit is not None and str(explicit) != "":
        return Path(explicit).expanduser()
    env = os.environ.get(SVD_CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return cache_root() / "svd"


def library_dir() -> Path:
    """The SVF expert library shipped with the package (`peft_spectral/library/`: one directory per expert, with its
    adapter, `expert.json` and model card), as package data: present in a wheel install too."""
    return Path(__file__).resolve().parent / "library"
