"""The state directory of a CPI-FT run: `state.json`, the tensor checkpoints, and the run's fingerprint."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..data import Task
from ..state import StateFileError, fingerprint, load_state, model_fingerprint, write_json_atomic
from .config import CPIConfig
from .masks import unpack_mask


__all__ = ["STATE_VERSION", "RunDirectory", "base_model_fingerprint", "tasks_fingerprint"]

STATE_VERSION = 2
ADAPTER_TENSORS = ("core_isolation_", "lora_")


def base_model_fingerprint(model: torch.nn.Module) -> str:
    """[`~peft_spectral.state.model_fingerprint`] of the base model: adapter tensors are left out, so a model wrapped
    with a CoreIsolation (or LoRA) adapter that is not merged hashes like its base.

    Args:
        model (`torch.nn.Module`): The model (or a `PeftModel`).
    """
    return model_fingerprint(model, skip=ADAPTER_TENSORS)


def tasks_fingerprint(tasks: Sequence[Task], max_train_examples: Optional[int] = None) -> str:
    """A hash of the tasks' names, kinds and the training examples a run uses (prompt, target, choices, label)."""
    parts = []
    for task in tasks:
        train = list(task.train)[:max_train_examples] if max_train_examples else list(task.train)
        parts.append([task.name, task.kind, [[e.prompt, e.target, list(e.choices), e.label] for e in train]])
    return fingerprint(parts)


def _safe_name(task_name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in task_name)


class RunDirectory:
    """Paths, atomic writes and checked reads of a CPI-FT state directory.

    Every file carries the run's fingerprint (model weights, tasks and config); reading a file that is missing,
    unreadable or made by another run raises a one-line error naming it.

    Args:
        path (`str` or `Path`): The state directory.
        run_fingerprint (`str`): The fingerprint of the run (see [`CPIPipeline`]).
    """

    def __init__(self, path, run_fingerprint: str):
        self.path = Path(path)
        self.fingerprint = run_fingerprint

    @property
    def state_path(self) -> Path:
        return self.path / "state.json"

    def probe_path(self, task: str) -> Path:
        return self.path / "probe" / f"{_safe_name(task)}.safetensors"

    def core_path(self, task: str) -> Path:
        return self.path / "cores" / f"{_safe_name(task)}.safetensors"

    def stage_path(self, k: int) -> Path:
        return self.path / "stages" / f"stage_{k}.safetensors"

    @property
    def fusion_path(self) -> Path:
        return self.path / "fusion.safetensors"

    # ------------------------------------------------------------------------------------------------- state.json
    def read_state(self, expected: dict[str, Any]) -> Optional[dict]:
        """The saved state, or `None` when there is none; refuses one made by another run.

        Args:
            expected (`dict`): The new run's `model_fingerprint`, `tasks`, `tasks_fingerprint` and `config`, used to
                say what differs when the fingerprints do not match.

        Raises:
            [`~peft_spectral.state.StateFileError`]: The file is empty, truncated, not a CPI-FT state, or from
                another run.
        """
        path = self.state_path
        state = load_state(path, what="CPI-FT state")
        if state is None:
            return None
        advice = f"delete {self.path} (or pass another output_dir) to start over"
        missing = [k for k in ("fingerprint", "completed", "probes_done", "stages_done") if k not in state]
        if missing or state.get("version") != STATE_VERSION:
            raise StateFileError(
                f"CPI-FT state file {path} is not a version-{STATE_VERSION} CPI-FT state (version "
                f"{state.get('version')!r}, missing {missing}); {advice}"
            )
        if state["fingerprint"] != self.fingerprint:
            raise StateFileError(f"CPI-FT state file {path} {_difference(state, expected)}; {advice}")
        return state

    def write_state(self, state: dict) -> None:
        write_json_atomic(self.state_path, state, digest=True)

    # ------------------------------------------------------------------------------------------------ tensors
    def save_tensors(self, tensors: dict[str, torch.Tensor], path: Path, meta: Optional[dict] = None) -> None:
        """Write `tensors` to `path` atomically, with the run's fingerprint and `meta` (JSON) in the metadata."""
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"fingerprint": self.fingerprint, "format": "pt"}
        metadata.update({k: json.dumps(v) for k, v in (meta or {}).items()})
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        tmp.replace(path)

    def check_file(self, path: Path) -> dict:
        """The metadata of a checkpoint of this run (one-line errors for a missing, unreadable or foreign file)."""
        if not path.exists():
            raise FileNotFoundError(f"missing CPI-FT checkpoint {path}; delete {self.state_path} to start over")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as err:
            raise StateFileError(
                f"CPI-FT checkpoint {path} cannot be read ({err}); delete {self.path} to start over"
            ) from None
        if meta.get("fingerprint") != self.fingerprint:
            raise StateFileError(
                f"CPI-FT checkpoint {path} belongs to another run (fingerprint {meta.get('fingerprint')} != "
                f"{self.fingerprint}: another base model, other tasks or another config); delete {self.path} to "
                "start over"
            )
        return meta

    def load_tensors(self, path: Path) -> dict[str, torch.Tensor]:
        """A checked checkpoint's tensors."""
        self.check_file(path)
        return load_file(str(path))

    def open_tensors(self, path: Path):
        """A checked checkpoint opened lazily (`safe_open`): read one tensor at a time with `get_tensor`."""
        self.check_file(path)
        return safe_open(str(path), framework="pt")

    def load_core(self, task: str) -> dict[str, torch.Tensor]:
        """The core mask of a task as bool tensors."""
        path = self.core_path(task)
        shapes = json.loads(self.check_file(path)["shapes"])
        return {k: unpack_mask(v, shapes[k]) for k, v in load_file(str(path)).items()}

    def core_shapes(self, task: str) -> dict[str, list[int]]:
        """The tensor shapes recorded with a task's core mask."""
        return json.loads(self.check_file(self.core_path(task))["shapes"])


def _difference(saved: dict, expected: dict) -> str:
    """What makes a saved state another run's, in words."""
    if saved.get("model_fingerprint") != expected["model_fingerprint"]:
        return (
            f"was made from another base model (fingerprint {saved.get('model_fingerprint')} != "
            f"{expected['model_fingerprint']})"
        )
    if saved.get("tasks") != expected["tasks"]:
        return f"is for tasks {saved.get('tasks')}, not {expected['tasks']}"
    if saved.get("tasks_fingerprint") != expected["tasks_fingerprint"]:
        return f"was made with other training data for the tasks {expected['tasks']}"
    old = saved.get("config") or {}
    try:
        old = CPIConfig.from_dict(old).to_dict()
    except (TypeError, ValueError):
        pass
    diff = {k: (old.get(k), v) for k, v in expected["config"].items() if old.get(k) != v}
    return f"was made with another config (saved, now): {diff}"
