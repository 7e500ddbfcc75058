"""Resumable JSON state: atomic writes, fingerprints, and one clear error for a file that cannot be used.

Every long job of the package (the LASER grid, the CPI-FT pipeline, the demo) saves its progress as JSON so that a
later call continues where the last one stopped. A state file is only reused when its fingerprint equals the one
of the job asking for it; the fingerprint covers everything that defines the job, every byte of the model's weights
included ([`model_fingerprint`]).

State files are trusted input (see `docs/security.md`): a state written with `digest=True` carries a digest of its own
contents, so a hand edit or a corrupted file is refused, but the digest is not a signature. Whoever can write the file
can recompute it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Union

import torch
import xxhash

from .svd_cache import tensor_bytes


logger = logging.getLogger(__name__)

__all__ = ["StateFileError", "fingerprint", "load_state", "model_fingerprint", "write_json_atomic"]

PathLike = Union[str, os.PathLike]

#: The key under which [`write_json_atomic`] stores the digest of a state's contents.
DIGEST_KEY = "digest"


class StateFileError(ValueError):
    """A state file exists but cannot be used: empty, truncated, not JSON, or made by another job."""


def _contents_digest(state: dict) -> str:
    """sha256 of a JSON object as it reads back from disk (keys sorted, compact), without its digest entry."""
    body = {k: v for k, v in state.items() if k != DIGEST_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_json_atomic(path: PathLike, data: Any, *, digest: bool = False) -> None:
    """Write `data` as JSON to `path` so that a reader never sees a half-written file.

    Args:
        path (`str` or `os.PathLike`): Destination; parent directories are created.
        data: Anything `json.dumps` can write (other objects are written with `str`).
        digest (`bool`, defaults to `False`): Add a `"digest"` entry (sha256 of the other entries) that
            [`load_state`] checks, so that a state edited by hand or corrupted is refused. `data` must be a `dict`.
    """
    path = Path(path)
    text = json.dumps(data, indent=1, default=str)
    if digest:
        if not isinstance(data, dict):
            raise TypeError(f"a state with a digest must be a dict, got {type(data).__name__}")
        written = json.loads(text)  # what a reader will see: tuples as lists, keys as strings, objects as str
        written[DIGEST_KEY] = _contents_digest(written)
        text = json.dumps(written, indent=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
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
        `dict` or `None`: The state (without its digest entry), or `None` when the file does not exist.

    Raises:
        [`StateFileError`]: One line naming the file, what is wrong with it (empty, not JSON, its contents changed
            since [`write_json_atomic`] wrote its digest, another job's fingerprint), and what to do.
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
    if DIGEST_KEY in state:
        if state[DIGEST_KEY] != _contents_digest(state):
            raise StateFileError(
                f"{what} file {path} was changed after it was written (its contents do not match its digest: edited "
                f"by hand or corrupted); {advice}"
            )
        state = {k: v for k, v in state.items() if k != DIGEST_KEY}
    else:
        logger.debug("%s file %s has no digest (written without one or by an older version)", what, path)
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


def model_fingerprint(model: torch.nn.Module, skip: Iterable[str] = ()) -> str:
    """A hash of a model's weights: every tensor's name, shape and dtype, and every byte of its values.

    PEFT wrappers are looked through (`.base_layer` is dropped from names and adapter tensors whose names contain one
    of `skip` are left out), so the fingerprint of a wrapped model equals that of its base while no adapter is merged.
    Tied tensors (one tensor under two names, e.g. tied embeddings) are hashed once. The model's config is not part of
    it: two models with the same weights and, say, another `rope_theta` hash alike.

    Cost: xxh3-128 over the bytes, about 0.08 s on the CPU for a SmolLM2-135M-sized model (134.5M float32 parameters,
    538 MB; one core), plus the copy to the CPU for weights on an accelerator.

    Args:
        model (`torch.nn.Module`): The model (or a `PeftModel`).
        skip (`Iterable[str]`): Name fragments of tensors to leave out (e.g. `"lora_"`).

    Returns:
        `str`: 32 hex digits.

    Raises:
        `ValueError`: A tensor has no data here (on the meta device, or a DeepSpeed ZeRO-3 partition): gather the
            model first.
    """
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    skip = tuple(skip)
    h = xxhash.xxh3_128()
    seen: dict[tuple, str] = {}
    for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
        if any(s in name for s in skip):
            continue
        name = name.replace(".base_layer", "")
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        if tensor.device.type == "meta" or (tensor.numel() == 0 and getattr(tensor, "ds_numel", 0)):
            raise ValueError(
                f"cannot fingerprint the model: tensor {name!r} has no data here (meta device or a ZeRO-3 partition); "
                "fingerprint the gathered model"
            )
        if not tensor.numel():
            continue
        key = (tensor.device, tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if key in seen:
            h.update(f"=({seen[key]})".encode())
            continue
        seen[key] = name
        h.update(tensor_bytes(tensor))
    return h.hexdigest()
