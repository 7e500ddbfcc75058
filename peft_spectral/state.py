"""Resumable JSON state: atomic writes, fingerprints, and one clear error for a file that cannot be used.

Every long job of the package (the LASER grid, the CPI-FT pipeline, the demo) saves its progress as JSON so that a
later call continues where the last one stopped. A state file is only reused when its fingerprint equals the one
of the job asking for it; the fingerprint covers everything that defines the job, the model's weights included
([`model_fingerprint`]).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Union

import torch


__all__ = ["StateFileError", "fingerprint", "load_state", "model_fingerprint", "write_json_atomic"]

PathLike = Union[str, os.PathLike]


class StateFileError(ValueError):
    """A state file exists but cannot be used: empty, truncated, not JSON, or made by another job."""


def write_json_atomic(path: PathLike, data: Any) -> None:
    """Write `data` as JSON to `path` so that a reader never sees a half-written file.

    Args:
        path (`str` or `os.PathLike`): Destination; parent directories are created.
        data: Anything `json.dumps` can write (other objects are written with `str`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1, default=str))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_state(path: PathLike, expected_fingerprint: str | None = None, *, what: str = "state") -> dict | None:
    """Read a JSON state file written by [`write_json_atomic`].

    Args:
        path (`str` or `os.PathLike`): The state file.
        expected_fingerprint (`str`, *optional*): When given, the file's `"fingerprint"` entry must equal it.
        what (`str`): What the file holds, for the error message (e.g. `"LASER search state"`).

    Returns:
        `dict` or `None`: The state, or `None` when the file does not exist.

    Raises:
        [`StateFileError`]: One line naming the file, what is wrong with it, and what to do.
    """
    path = Path(path)
    if not path.exists():
        return None
    text = path.read_text()
    advice = f"delete {path} to start over, or pass another path"
    if not text.strip():
        raise StateFileError(f"{what} file {path} is empty (an interrupted write?); {advice}")
    try:
        state = json.loads(text)
    except json.JSONDecodeError as err:
        raise StateFileError(
            f"{what} file {path} is not valid JSON ({err.msg} at line {err.lineno}); {advice}"
        ) from None
    if not isinstance(state, dict):
        raise StateFileError(f"{what} file {path} holds a {type(state).__name__}, not a JSON object; {advice}")
    if expected_fingerprint is not None and state.get("fingerprint") != expected_fingerprint:
        raise StateFileError(
            f"{what} file {path} belongs to another job (fingerprint {state.get('fingerprint')!r} != "
            f"{expected_fingerprint!r}: another model, other data or other settings); {advice}"
        )
    return state


def fingerprint(*parts: Any) -> str:
    """A short stable hash of `parts` (strings, numbers, lists, dicts: anything JSON can write, keys sorted).

    Args:
        parts: What defines a job, e.g. a model fingerprint, example texts, the search settings.

    Returns:
        `str`: 32 hex digits.
    """
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()[:32]


def model_fingerprint(model: torch.nn.Module, samples_per_tensor: int = 64, skip: Iterable[str] = ()) -> str:
    """A hash of a model's weights: every tensor's name, shape and dtype, plus strided samples of its values.

    PEFT wrappers are looked through (`.base_layer` is dropped from names and adapter tensors whose names contain one
    of `skip` are left out), so the fingerprint of a wrapped model equals that of its base while no adapter is merged.

    Args:
        model (`torch.nn.Module`): The model (or a `PeftModel`).
        samples_per_tensor (`int`): How many evenly spaced values of each tensor enter the hash. Two models that differ
            only between the samples hash alike; fine-tuned or other models differ everywhere.
        skip (`Iterable[str]`): Name fragments of tensors to leave out (e.g. `"lora_"`).

    Returns:
        `str`: 32 hex digits.
    """
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    skip = tuple(skip)
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if any(s in name for s in skip):
            continue
        name = name.replace(".base_layer", "")
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        if tensor.numel() and tensor.is_floating_point():
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // samples_per_tensor)
            h.update(flat[::step][:samples_per_tensor].to(torch.float64).cpu().numpy().tobytes())
    return h.hexdigest()[:32]
