"""[`CPIPipeline`]: the five CPI-FT steps (probe, cores, grouping, fusion, staged SFT), resumable after each."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import Example, Task
from ..state import fingerprint, write_json_atomic
from .config import CPIConfig
from .freezing import FreezeMaskCallback, TrackedParameters
from .fusion import fuse_deltas
from .grouping import connected_groups
from .masks import core_masks, jaccard_matrix, pack_mask, unpack_mask
from .report import plot_jaccard, report_markdown
from .run_directory import STATE_VERSION, RunDirectory, base_model_fingerprint, tasks_fingerprint
from .scheduling import order_groups
from .sft import mixed_examples, sft_train


logger = logging.getLogger(__name__)

__all__ = ["STEPS", "CPIPipeline"]

STEPS: tuple[str, ...] = ("probe", "cores", "grouping", "fusion", "staged")


class CPIPipeline:
    """Runs CPI-FT on a list of tasks, resumable from its state directory after any step.

    Args:
        model (`transformers.PreTrainedModel`): The base model θ0 (not a `PeftModel`). It is trained in place.
        tokenizer: Its tokenizer (a pad token is set to EOS when missing).
        tasks (`Sequence[Task]`): The tasks (their `train` split is used for SFT, `test` for the optional report).
        config ([`CPIConfig`]): Hyper-parameters.
        output_dir (`str` or `Path`): The state directory (`state.json`, `probe/`, `cores/`, `fusion.safetensors`,
            `stages/`, `final/`, `report.{json,md}`, `jaccard.png`). An existing one is resumed; its fingerprint
            (the base model's weights, the tasks' training data and the config) must match.
        progress (`bool`): Show a progress bar per pipeline step.
        eval_fn (`Callable[[model, tokenizer, Task], dict]`, *optional*): Called per task at the end; its result goes
            into the report (e.g. a wrapper around `peft_spectral.evaluation.evaluate`).
        callbacks (`list[TrainerCallback]`, *optional*): Extra callbacks for every SFT run.
        on_stage_end (`Callable[[CPIPipeline, int, list[str]], None]`, *optional*): Called after each stage with its
            index and task names (e.g. to measure forgetting).

    Example:

        ```py
        >>> cfg = CPIConfig(adapter=CoreIsolationConfig(target_modules=["up_proj"]), probe_steps=20)
        >>> pipe = CPIPipeline(model, tok, [task_a, task_b, task_c], cfg, "runs/cpi")
        >>> result = pipe.run()  # or pipe.run(until="grouping"), then pipe.run() later
        >>> result["groups"], result["jaccard"]
        ```
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        tasks: Sequence[Task],
        config: Optional[CPIConfig] = None,
        output_dir: Union[str, Path] = "cpi_state",
        *,
        progress: bool = True,
        eval_fn: Optional[Callable[[torch.nn.Module, Any, Task], dict]] = None,
        callbacks: Optional[list] = None,
        on_stage_end: Optional[Callable[[CPIPipeline, int, list[str]], None]] = None,
    ):
        from peft import PeftModel

        if isinstance(model, PeftModel):
            raise TypeError("CPIPipeline takes the base model, not a PeftModel (merge_and_unload() it first)")
        self.config = config or CPIConfig()
        self.tasks = list(tasks)
        self._check_tasks()
        self.tokenizer = tokenizer
        if getattr(tokenizer, "pad_token", None) is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.output_dir = Path(output_dir)
        self.progress = progress
        self.eval_fn = eval_fn
        self.extra_callbacks = list(callbacks or [])
        self.on_stage_end = on_stage_end
        self.trainer_runs: list[str] = []  # SFT runs done by this object (for tests and logs)
        self.identity = {
            "model_fingerprint": base_model_fingerprint(model),
            "tasks": [t.name for t in self.tasks],
            "tasks_fingerprint": tasks_fingerprint(self.tasks, self.config.max_train_examples),
            "config": self.config.to_dict(),
        }
        self.fingerprint = fingerprint(self.identity)
        self.files = RunDirectory(self.output_dir, self.fingerprint)
        self.tracked = TrackedParameters(model, self.config)
        self.model = self.tracked.model
        self.state = self._load_or_init_state()
        if len(self.tasks) == 1:
            warnings.warn(
                "CPI-FT with a single task reduces to plain SFT: the probe run is the result and the core, grouping, "
                "fusion and staged steps are skipped.",
                UserWarning,
                stacklevel=2,
            )

    # ------------------------------------------------------------------------------------------- validation/state
    def _check_tasks(self) -> None:
        if not self.tasks:
            raise ValueError("`tasks` is empty: CPI-FT needs at least one task")
        names = [t.name for t in self.tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"`tasks` has duplicate names: {dupes}")
        for t in self.tasks:
            if not t.train:
                raise ValueError(f"task {t.name!r} has no training examples (empty `train` split)")
        unknown = sorted({n for pair in self.config.stage_dependencies or [] for n in pair} - set(names))
        if unknown:
            raise ValueError(f"`stage_dependencies` names unknown tasks {unknown} (tasks: {names})")

    @property
    def state_path(self) -> Path:
        return self.files.state_path

    def _load_or_init_state(self) -> dict:
        state = self.files.read_state(self.identity)
        if state is not None:
            logger.info("resuming CPI-FT from %s (completed: %s)", self.output_dir, state["completed"])
            return state
        self.output_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            **self.identity,
            "completed": [],
            "probes_done": [],
            "stages_done": 0,
            "losses": {},
            "timings": {},
        }
        self.files.write_state(state)
        return state

    def _write_state(self) -> None:
        self.files.write_state(self.state)

    def _mark(self, step: str, seconds: float) -> None:
        if step not in self.state["completed"]:
            self.state["completed"].append(step)
        self.state["timings"][step] = self.state["timings"].get(step, 0.0) + seconds
        self._write_state()

    def is_done(self, step: str) -> bool:
        """Whether pipeline step `step` (one of `STEPS`) has finished."""
        return step in self.state["completed"]

    def load_probe_delta(self, task: str) -> dict[str, torch.Tensor]:
        """Δ_t of a finished probe (checked against the run's fingerprint)."""
        return self.files.load_tensors(self.files.probe_path(task))

    def load_core(self, task: str) -> dict[str, torch.Tensor]:
        """The core mask of a task as bool tensors."""
        return self.files.load_core(task)

    # ------------------------------------------------------------------------------------------- training
    def _train_examples(self, task: Task) -> list[Example]:
        ex = list(task.train)
        if self.config.max_train_examples is not None:
            ex = ex[: self.config.max_train_examples]
        return ex

    def _sft(self, examples: Sequence[Example], *, steps: int, lr: float, label: str, freeze=None) -> list[float]:
        """One TRL SFT run on the current model; returns the logged training losses."""
        callbacks = list(self.extra_callbacks) + ([freeze] if freeze is not None else [])
        losses = sft_train(
            self.model,
            self.tokenizer,
            examples,
            self.config,
            steps=steps,
            learning_rate=lr,
            output_dir=self.output_dir / "trainer",
            callbacks=callbacks,
        )
        self.trainer_runs.append(label)
        if freeze is not None and not freeze.is_intact():  # pragma: no cover - guarded by the callback
            raise RuntimeError(f"{label}: frozen core entries changed during training")
        return losses

    def _bar(self, iterable, desc: str, total: Optional[int] = None):
        return tqdm(iterable, desc=desc, total=total, disable=not self.progress)

    # ------------------------------------------------------------------------------------------- steps
    def probe(self) -> None:
        """Step 1: SFT each task alone from θ0 and store Δ_t (skips tasks already probed)."""
        if self.is_done("probe"):
            return
        start = time.time()
        todo = [t for t in self.tasks if t.name not in self.state["probes_done"]]
        for task in self._bar(todo, "CPI probe (SFT per task)"):
            self.tracked.clear_frozen()
            self.tracked.reset()
            label = f"probe:{task.name}"
            losses = self._sft(
                self._train_examples(task), steps=self.config.probe_steps, lr=self.config.learning_rate, label=label
            )
            deltas = self.tracked.deltas()
            if all(not bool(d.any()) for d in deltas.values()):
                warnings.warn(f"probe of task {task.name!r} left every tracked parameter unchanged", UserWarning)
            self.files.save_tensors(deltas, self.files.probe_path(task.name), {"task": task.name})
            del deltas
            self.state["probes_done"].append(task.name)
            self.state["losses"][label] = losses
            self._write_state()
        self.tracked.reset()
        self._mark("probe", time.time() - start)

    def cores(self) -> None:
        """Step 2: the core region of each task (top p by |Δ_t|), stored as packed bitmasks."""
        if self.is_done("cores"):
            return
        start = time.time()
        adapter = self.config.adapter
        sizes = {}
        for task in self._bar(self.tasks, "CPI cores (top-p |Δ|)"):
            masks = core_masks(self.load_probe_delta(task.name), adapter.core_fraction, adapter.core_scope)
            shapes = {k: list(v.shape) for k, v in masks.items()}
            sizes[task.name] = int(sum(int(m.sum()) for m in masks.values()))
            packed = {k: pack_mask(v) for k, v in masks.items()}
            self.files.save_tensors(packed, self.files.core_path(task.name), {"shapes": shapes})
        self.state["core_sizes"] = sizes
        self.state["num_tracked"] = int(sum(t.numel() for t in self.tracked.tensors.values()))
        self._mark("cores", time.time() - start)

    def grouping(self) -> None:
        """Step 3: Jaccard matrix of the cores, groups (connected components of J ≥ τ) and their stage order."""
        if self.is_done("grouping"):
            return
        start = time.time()
        packed = [self.files.load_tensors(self.files.core_path(t.name)) for t in self._bar(self.tasks, "CPI grouping")]
        jac = jaccard_matrix(packed)
        groups = connected_groups(jac, self.config.adapter.similarity_threshold)
        self.state["jaccard"] = jac.tolist()
        self.state["groups"] = [[self.tasks[i].name for i in g] for g in groups]
        self.state["probe_difficulty"] = self.probe_difficulty()
        self.state["stage_order"] = order_groups(
            self.state["groups"],
            self.config.stage_order,
            tasks=[t.name for t in self.tasks],
            seed=self.config.seed,
            difficulty=self.state["probe_difficulty"],
            jaccard=self.state["jaccard"],
            core_sizes=self.state.get("core_sizes"),
            dependencies=self.config.stage_dependencies,
        )
        self._mark("grouping", time.time() - start)

    def probe_difficulty(self) -> dict[str, float]:
        """Each task's difficulty for `stage_order="difficulty"`: the last training loss its probe logged (the mean
        over its last `max(1, probe_steps // 10)` steps; lower is easier)."""
        losses = {t.name: self.state["losses"].get(f"probe:{t.name}") for t in self.tasks}
        return {name: float(values[-1]) for name, values in losses.items() if values}

    def fusion(self) -> None:
        """Step 4: the fused model (core transplant + SLERP of the rest) as a delta, saved to `fusion.safetensors`."""
        if self.is_done("fusion"):
            return
        start = time.time()
        delta_files = [self.files.open_tensors(self.files.probe_path(t.name)) for t in self.tasks]
        core_files = [self.files.open_tensors(self.files.core_path(t.name)) for t in self.tasks]
        shapes = [self.files.core_shapes(t.name) for t in self.tasks]
        fused = fuse_deltas(
            [f.get_tensor for f in delta_files],
            [lambda n, f=f, s=s: unpack_mask(f.get_tensor(n), s[n]) for f, s in zip(core_files, shapes)],
            self.tracked.names,
            base=self.tracked.base,
            fusion=self.config.fusion,
            slerp_t=self.config.adapter.slerp_t,
            slerp_eps=self.config.adapter.slerp_eps,
            progress=self.progress,
        )
        self.files.save_tensors(fused, self.files.fusion_path)
        del delta_files, core_files
        self._mark("fusion", time.time() - start)

    def _group_core(self, task_names: Sequence[str]) -> dict[str, torch.Tensor]:
        union: dict[str, torch.Tensor] = {}
        for name in task_names:
            for k, m in self.load_core(name).items():
                union[k] = union[k] | m if k in union else m
        return union

    def staged(self) -> None:
        """Step 5: one SFT stage per group, from the fused model, earlier groups' cores frozen bit-identically."""
        if self.is_done("staged"):
            return
        start = time.time()
        order: list[list[str]] = self.state["stage_order"]
        k0 = self.state["stages_done"]
        source = self.files.stage_path(k0 - 1) if k0 else self.files.fusion_path
        self.tracked.set_deltas(self.files.load_tensors(source))
        frozen = self._group_core([n for group in order[:k0] for n in group])
        for k in self._bar(range(k0, len(order)), "CPI staged SFT", total=len(order) - k0):
            self._stage(k, order[k], frozen)
            for name, m in self._group_core(order[k]).items():
                frozen[name] = frozen[name] | m if name in frozen else m
            if self.on_stage_end is not None:
                self.tracked.clear_frozen()
                self.on_stage_end(self, k, list(order[k]))
        self.tracked.clear_frozen()
        self._mark("staged", time.time() - start)

    def _stage(self, k: int, group: Sequence[str], frozen: dict[str, torch.Tensor]) -> None:
        """Stage `k`: SFT on the group's balanced mix with `frozen` kept intact; saves the deltas and the state."""
        by_name = {t.name: t for t in self.tasks}
        callback: FreezeMaskCallback = self.tracked.set_frozen(frozen)
        examples = mixed_examples([self._train_examples(by_name[n]) for n in group], seed=self.config.seed + k)
        losses = self._sft(
            examples,
            steps=self.config.steps_for_stage(k, len(self.state["stage_order"])),
            lr=self.config.stage_learning_rate or self.config.learning_rate,
            label=f"stage:{k}",
            freeze=callback,
        )
        self.files.save_tensors(self.tracked.deltas(), self.files.stage_path(k), {"group": list(group)})
        self.state["stages_done"] = k + 1
        self.state["losses"][f"stage:{k}"] = losses
        self.state.setdefault("frozen_counts", {})[str(k)] = callback.num_frozen
        self._write_state()

    # ------------------------------------------------------------------------------------------- driver
    def run(self, until: Optional[str] = None) -> dict:
        """Run (or resume) the pipeline.

        Args:
            until (`str`, *optional*): Stop after this step (one of `STEPS`); `None` runs everything and finalises.

        Returns:
            `dict`: The report (see [`report`]); the trained model is `self.model`.
        """
        if until is not None and until not in STEPS:
            raise ValueError(f"`until` must be one of {STEPS}, got {until!r}")
        if len(self.tasks) == 1:
            self.probe()
            if until is None:
                return self._finalise(self.files.probe_path(self.tasks[0].name))
            return self.report(write=False)
        for step in STEPS:
            getattr(self, step)()
            if step == until:
                return self.report(write=False)
        return self._finalise(self.files.stage_path(len(self.state["stage_order"]) - 1))

    def _finalise(self, source: Path) -> dict:
        """Load the final deltas, set the adapter masks to the union of all cores, save `final/`, write the report."""
        deltas = self.files.load_tensors(source)
        self.tracked.clear_frozen()
        self.tracked.set_deltas(deltas)
        final_dir = self.output_dir / "final"
        if self.tracked.mode == "adapter" and len(self.tasks) > 1:
            self.model.base_model.set_core_masks(self._group_core([t.name for t in self.tasks]))
        self.model.save_pretrained(str(final_dir))
        self.tokenizer.save_pretrained(str(final_dir))
        if "final" not in self.state["completed"]:
            self.state["completed"].append("final")
            self._write_state()
        return self.report(write=True)

    def report(self, write: bool = True) -> dict:
        """The run's summary: config, tasks, core sizes, Jaccard matrix, groups, stage order, losses, timings and,
        with `eval_fn`, per-task scores. With `write`, also `report.json`, `report.md` and `jaccard.png`."""
        s = self.state
        keys = ("num_tracked", "core_sizes", "jaccard", "groups", "probe_difficulty", "stage_order", "frozen_counts")
        rep = {
            "tasks": s["tasks"],
            "fingerprint": s["fingerprint"],
            "config": s["config"],
            "completed": s["completed"],
            **{k: s.get(k) for k in keys},
            "losses": s.get("losses"),
            "timings_s": s.get("timings"),
            "trainer_runs_this_process": list(self.trainer_runs),
        }
        if write and self.eval_fn is not None:
            rep["scores"] = {t.name: self.eval_fn(self.model, self.tokenizer, t) for t in self.tasks}
        if write:
            write_json_atomic(self.output_dir / "report.json", rep)
            (self.output_dir / "report.md").write_text(report_markdown(rep))
            if rep["jaccard"] is not None:
                try:
                    path = self.output_dir / "jaccard.png"
                    plot_jaccard(np.array(rep["jaccard"]), rep["tasks"], path, rep["groups"])
                except ImportError:  # pragma: no cover - matplotlib missing
                    logger.warning("matplotlib is not installed: no jaccard.png")
        return rep
