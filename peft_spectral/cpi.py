"""CPI-FT: Core Parameter Isolation Fine-Tuning (arXiv 2508.21741) on TRL's SFT loop.

The pipeline has five steps, each of which writes its result to a state directory so that a run can resume after
any of them (and after any single probe or stage):

1. **probe** – SFT each task alone from the same base θ0 with TRL's `SFTTrainer`; Δ_t = θ_t − θ0 of the tracked
   tensors is written to `probe/<task>.safetensors` (one task in memory at a time, never T full copies).
2. **cores** – the core region C_t: the top `p` entries by |Δ_t| (over all tracked tensors together, or per tensor),
   stored as packed bitmasks in `cores/<task>.safetensors` (1 bit per parameter).
3. **grouping** – Jaccard similarity J(C_i, C_j) = |C_i ∩ C_j| / |C_i ∪ C_j| of every pair; tasks with J ≥ τ are
   joined and the groups are the connected components.
4. **fusion** – a single delta: core entries are transplanted from the task whose core holds them (an entry in
   several cores takes the value of the task with the larger |Δ|, ties to the earlier task); all other entries are
   the SLERP of the task vectors restricted to those entries, tensor by tensor. With more than two tasks the merge is
   iterative, m_1 = Δ_1, m_k = slerp(m_{k-1}, Δ_k, t_k) with t_k = 1/k (every task weighted equally) or a fixed
   `slerp_t`; nearly parallel vectors (1 − |cos Ω| < `slerp_eps`) are interpolated linearly.
5. **staged** – one SFT stage per group, starting from the fused model, on the group's mixed and balanced data
   (every task of the group up-sampled to the same number of examples, shuffled), with the cores of all earlier
   groups frozen. Frozen entries stay bit-identical: no gradient reaches them and [`FreezeMaskCallback`] writes their
   saved values back after every optimizer step, which undoes weight decay and any momentum update.

Stage order (`stage_order`): `"input"` (default) runs the groups in the order of their first task in the task list;
`"random"` shuffles them with `seed`; `"small_first"` runs the groups with the smallest total core first.

By default (`train_params="adapter"`) the tracked tensors are the dense deltas of a [`CoreIsolationConfig`] adapter
on all linear layers (equivalent to full fine-tuning of those weights, base frozen); the final result is a PEFT
adapter (`final/`) whose masks are the union of all cores. `train_params="full"` trains and tracks every parameter
and saves a plain model (one copy of θ0 is kept in memory to form Δ).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import random
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from .linalg import slerp
from .prompting import encode_prompt
from .tasks import Example, Task
from .tuners.core_isolation import CoreIsolationConfig
from .tuners.core_isolation.config import validate_core_fraction, validate_similarity_threshold


logger = logging.getLogger(__name__)

__all__ = [
    "CPIConfig",
    "CPIPipeline",
    "FreezeMaskCallback",
    "base_model_fingerprint",
    "build_sft_dataset",
    "connected_groups",
    "core_masks",
    "fuse_deltas",
    "jaccard_matrix",
    "mixed_examples",
    "pack_mask",
    "plot_jaccard",
    "slerp_merge",
    "unpack_mask",
]

STEPS: tuple[str, ...] = ("probe", "cores", "grouping", "fusion", "staged")
STATE_VERSION = 1

# ======================================================================================================= config


@dataclass
class CPIConfig:
    """Hyper-parameters of a [`CPIPipeline`] run.

    Args:
        core_fraction (`float`): p, the fraction of tracked parameters (by |Δ|) forming a task's core, in (0, 1).
        similarity_threshold (`float`): τ in [0, 1]; tasks with Jaccard J ≥ τ are grouped.
        core_scope (`str`): `"global"` (top p over all tracked tensors) or `"per_tensor"` (top p of each tensor).
        train_params (`str`): `"adapter"` (CoreIsolation deltas of `target_modules`) or `"full"` (every parameter).
        target_modules (`list[str]` or `str`): Modules adapted in `"adapter"` mode (default `"all-linear"`).
        probe_steps (`int`): Optimizer steps of each probe SFT.
        stage_steps (`int`, *optional*): Optimizer steps of each staged-SFT stage; defaults to `probe_steps`.
        total_stage_steps (`int`, *optional*): Instead of `stage_steps`, a budget shared by all stages: each of the
            G stages gets `total // G` steps (the first `total % G` one more). Useful to compare methods at one budget.
        learning_rate (`float`): Probe learning rate. `stage_learning_rate` defaults to it.
        weight_decay (`float`): AdamW weight decay (frozen cores are restored after each step regardless).
        batch_size (`int`), grad_accum (`int`): Per-step batch and gradient accumulation.
        max_length (`int`): Maximum tokens per example (prompts are cut from the left to keep the answer).
        lr_scheduler_type (`str`), warmup_steps (`int`), optim (`str`): Passed to `SFTConfig`.
        slerp_t (`float`, *optional*): Fixed SLERP weight; `None` weights all tasks equally.
        slerp_eps (`float`): Linear-interpolation threshold on `1 - |cos Ω|`.
        stage_order (`str`): `"input"`, `"random"` or `"small_first"` (see module docs).
        seed (`int`): Seed of data shuffling and training.
        max_train_examples (`int`, *optional*): Cap on the training examples used per task.
        chat (`bool`, *optional*): Apply the tokenizer's chat template (`None`: when it has one).
    """

    core_fraction: float = 0.01
    similarity_threshold: float = 0.1
    core_scope: Literal["global", "per_tensor"] = "global"
    train_params: Literal["adapter", "full"] = "adapter"
    target_modules: Union[list[str], str] = "all-linear"
    probe_steps: int = 50
    stage_steps: Optional[int] = None
    total_stage_steps: Optional[int] = None
    learning_rate: float = 1e-4
    stage_learning_rate: Optional[float] = None
    weight_decay: float = 0.0
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 256
    lr_scheduler_type: str = "constant"
    warmup_steps: int = 0
    optim: str = "adamw_torch"
    slerp_t: Optional[float] = None
    slerp_eps: float = 1e-4
    stage_order: Literal["input", "random", "small_first"] = "input"
    seed: int = 0
    max_train_examples: Optional[int] = None
    chat: Optional[bool] = None

    def __post_init__(self):
        self.core_fraction = validate_core_fraction(self.core_fraction)
        self.similarity_threshold = validate_similarity_threshold(self.similarity_threshold)
        if self.core_scope not in ("global", "per_tensor"):
            raise ValueError(f"`core_scope` must be 'global' or 'per_tensor', got {self.core_scope!r}")
        if self.train_params not in ("adapter", "full"):
            raise ValueError(f"`train_params` must be 'adapter' or 'full', got {self.train_params!r}")
        if self.stage_order not in ("input", "random", "small_first"):
            raise ValueError(f"`stage_order` must be 'input', 'random' or 'small_first', got {self.stage_order!r}")
        for name in ("probe_steps", "batch_size", "grad_accum", "max_length"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)!r}")
        if self.stage_steps is not None and self.stage_steps < 1:
            raise ValueError(f"`stage_steps` must be >= 1, got {self.stage_steps!r}")
        if self.total_stage_steps is not None and self.total_stage_steps < 1:
            raise ValueError(f"`total_stage_steps` must be >= 1, got {self.total_stage_steps!r}")
        if self.slerp_t is not None and not 0.0 <= self.slerp_t <= 1.0:
            raise ValueError(f"`slerp_t` must be in [0, 1] or None, got {self.slerp_t!r}")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)

    def steps_for_stage(self, k: int, num_stages: int) -> int:
        """Optimizer steps of stage `k` (0-based) out of `num_stages`."""
        if self.total_stage_steps is not None:
            base, extra = divmod(self.total_stage_steps, num_stages)
            return max(1, base + (1 if k < extra else 0))
        return self.stage_steps if self.stage_steps is not None else self.probe_steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CPIConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# ================================================================================================ core masks


def core_masks(deltas: dict[str, torch.Tensor], p: float, scope: str = "global") -> dict[str, torch.Tensor]:
    """The core region: the top `p` fraction of entries by |Δ|.

    Args:
        deltas (`dict[str, torch.Tensor]`): Task vector, by tensor name.
        p (`float`): Fraction in (0, 1). `"global"`: k = max(1, round(p·N)) entries over all tensors together;
            `"per_tensor"`: k_i = max(1, round(p·N_i)) entries of each tensor.
        scope (`str`): `"global"` or `"per_tensor"`.

    Returns:
        `dict[str, torch.Tensor]`: Bool masks shaped like the deltas, with exactly k (or k_i) `True` entries, every
        selected |Δ| ≥ every unselected one (ties broken by `torch.topk`).
    """
    p = validate_core_fraction(p, "core_fraction")
    if scope not in ("global", "per_tensor"):
        raise ValueError(f"`core_scope` must be 'global' or 'per_tensor', got {scope!r}")
    if not deltas:
        raise ValueError("core_masks: no tensors given")
    names = list(deltas)
    if scope == "per_tensor":
        out = {}
        for name in names:
            flat = deltas[name].detach().reshape(-1).abs().float()
            k = max(1, round(p * flat.numel()))
            mask = torch.zeros(flat.numel(), dtype=torch.bool)
            mask[torch.topk(flat, k, sorted=False).indices] = True
            out[name] = mask.reshape(deltas[name].shape)
        return out
    flat = torch.cat([deltas[n].detach().reshape(-1).abs().float() for n in names])
    k = max(1, round(p * flat.numel()))
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[torch.topk(flat, k, sorted=False).indices] = True
    del flat
    out, offset = {}, 0
    for name in names:
        n = deltas[name].numel()
        out[name] = mask[offset : offset + n].reshape(deltas[name].shape)
        offset += n
    return out


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor into a 1-D uint8 tensor, 8 entries per byte (numpy `packbits`, big-endian bit order)."""
    return torch.from_numpy(np.packbits(mask.reshape(-1).cpu().numpy().astype(np.uint8)))


def unpack_mask(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of [`pack_mask`]."""
    n = int(np.prod(shape)) if len(shape) else 1
    bits = np.unpackbits(packed.cpu().numpy(), count=n).astype(bool)
    return torch.from_numpy(bits).reshape(tuple(shape))


_POPCOUNT = np.array([(i).bit_count() for i in range(256)], dtype=np.int64)


def _popcount(packed: np.ndarray) -> int:
    return int(_POPCOUNT[packed].sum())


def jaccard_matrix(masks: Sequence[dict[str, torch.Tensor]]) -> np.ndarray:
    """Pairwise Jaccard similarity |A ∩ B| / |A ∪ B| of core regions (bool masks or packed uint8 masks by name).

    Masks are compared tensor by tensor over the union of names (a tensor missing from one mask counts as empty).
    Two empty regions have similarity 1 on the diagonal and 0 elsewhere.
    """
    t = len(masks)
    packed = [
        {k: (v.cpu().numpy() if v.dtype == torch.uint8 else pack_mask(v).numpy()) for k, v in m.items()} for m in masks
    ]
    sizes = [sum(_popcount(v) for v in m.values()) for m in packed]
    out = np.eye(t, dtype=np.float64)
    for i in range(t):
        for j in range(i + 1, t):
            inter = 0
            for name in set(packed[i]) & set(packed[j]):
                inter += _popcount(np.bitwise_and(packed[i][name], packed[j][name]))
            union = sizes[i] + sizes[j] - inter
            out[i, j] = out[j, i] = inter / union if union else 0.0
    return out


def connected_groups(similarity: np.ndarray, tau: float) -> list[list[int]]:
    """Groups of tasks: connected components of the graph with an edge wherever `similarity[i, j] >= tau` (i ≠ j).

    Returns:
        `list[list[int]]`: Groups as sorted task indices, ordered by their smallest index.
    """
    tau = validate_similarity_threshold(tau, "similarity_threshold")
    sim = np.asarray(similarity)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"similarity must be a square matrix, got shape {sim.shape}")
    n = sim.shape[0]
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            if sim[i, j] >= tau:
                parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return sorted((sorted(g) for g in groups.values()), key=lambda g: g[0])


# =================================================================================================== fusion


def slerp_merge(vectors: Sequence[torch.Tensor], t: Optional[float] = None, eps: float = 1e-4) -> torch.Tensor:
    """Iterative SLERP of several task vectors: m_1 = v_1, m_k = slerp(m_{k-1}, v_k, t_k).

    Args:
        vectors: Tensors of one shape (at least one).
        t (`float`, *optional*): Fixed weight of the newcomer at each step. `None` uses t_k = 1/k, which weights
            every task equally (it is exactly the mean when all vectors are parallel).
        eps (`float`): Linear-interpolation threshold on `1 - |cos Ω|` (see [`~peft_spectral.linalg.slerp`]).
    """
    if not vectors:
        raise ValueError("slerp_merge needs at least one vector")
    merged = vectors[0]
    for k, vec in enumerate(vectors[1:], start=2):
        merged = slerp(merged, vec, (1.0 / k) if t is None else t, eps=eps)
    return merged


def fuse_deltas(
    deltas: Sequence[Callable[[str], torch.Tensor] | dict[str, torch.Tensor]],
    masks: Sequence[Callable[[str], torch.Tensor] | dict[str, torch.Tensor]],
    names: Sequence[str],
    *,
    slerp_t: Optional[float] = None,
    slerp_eps: float = 1e-4,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Fuse task vectors tensor by tensor (only one tensor of every task is in memory at a time).

    For each tensor: entries in the union of the cores take Δ from the task whose core holds them (several cores:
    the task with the largest |Δ|, ties to the earlier task); the other entries are [`slerp_merge`] of the tasks'
    vectors restricted to those entries.

    Args:
        deltas, masks: Per task, a dict or a callable `name -> tensor` (lazy loading from disk).
        names: The tensor names to fuse.
    """
    if len(deltas) != len(masks) or not deltas:
        raise ValueError("fuse_deltas needs one delta source and one mask source per task (at least one task)")

    def get(src, name):
        return src(name) if callable(src) else src[name]

    out = {}
    for name in _maybe_tqdm(names, progress, "fusion"):
        ds = [get(d, name) for d in deltas]
        ms = [get(m, name).to(torch.bool) for m in masks]
        union = torch.zeros_like(ms[0])
        for m in ms:
            union |= m
        fused = torch.empty_like(ds[0])
        free = ~union
        if free.any():
            fused[free] = slerp_merge([d[free] for d in ds], t=slerp_t, eps=slerp_eps)
        if union.any():
            stacked = torch.stack([torch.where(m, d.abs(), torch.full_like(d, -1.0)) for d, m in zip(ds, ms)])
            winner = stacked.argmax(dim=0)  # first maximum on ties
            values = torch.gather(torch.stack(ds), 0, winner.unsqueeze(0)).squeeze(0)
            fused[union] = values[union]
        out[name] = fused
    return out


# ============================================================================================ freeze callback


class FreezeMaskCallback(TrainerCallback):
    """Keeps the masked entries of some parameters bit-identical through a `transformers.Trainer` run.

    The values under each mask are copied when the callback is built and written back after every optimizer step
    (`on_optimizer_step`), at the end of every step and at the end of training. This undoes every change the optimizer
    makes there — gradient, momentum and decoupled weight decay alike — so it holds for any optimizer. Gradients to
    those entries should also be zeroed (the CoreIsolation layer does this; [`CPIPipeline`] registers hooks in
    `"full"` mode) so that they do not enter the gradient-norm clipping.

    Args:
        frozen (`Iterable[tuple[torch.nn.Parameter, torch.Tensor]]`): `(parameter, bool mask)` pairs.
    """

    def __init__(self, frozen: Iterable[tuple[torch.Tensor, torch.Tensor]]):
        self.frozen = []
        for param, mask in frozen:
            mask = mask.to(device=param.device, dtype=torch.bool)
            if tuple(mask.shape) != tuple(param.shape):
                raise ValueError(f"mask shape {tuple(mask.shape)} does not match parameter {tuple(param.shape)}")
            if mask.any():
                self.frozen.append((param, mask, param.detach()[mask].clone()))

    @torch.no_grad()
    def restore(self) -> None:
        """Write the saved values back under the masks."""
        for param, mask, values in self.frozen:
            param.data[mask] = values

    def is_intact(self) -> bool:
        """Whether every frozen entry still equals its saved value bit for bit."""
        return all(torch.equal(p.detach()[m], v) for p, m, v in self.frozen)

    @property
    def num_frozen(self) -> int:
        return sum(int(m.sum()) for _, m, _ in self.frozen)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.restore()

    def on_step_end(self, args, state, control, **kwargs):
        self.restore()

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()


# ============================================================================================== data helpers


def encode_example(tokenizer, example: Example, *, max_length: int = 256, chat: Optional[bool] = None) -> dict:
    """Token ids of prompt + answer + EOS and the completion mask (1 on answer tokens), as the evaluation sees them.

    The prompt is [`~peft_spectral.evaluation.format_prompt`]'s text; the answer is the tokenizer's encoding of
    `example.target` alone. When too long, the prompt is cut from the left so that the answer stays.
    """
    prompt = encode_prompt(tokenizer, example, chat)
    answer = list(tokenizer(example.target, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        answer.append(tokenizer.eos_token_id)
    answer = answer[: max(1, max_length - 1)]
    keep = max_length - len(answer)
    if len(prompt) > keep:
        prompt = prompt[len(prompt) - keep :]
    return {"input_ids": prompt + answer, "completion_mask": [0] * len(prompt) + [1] * len(answer)}


def build_sft_dataset(tokenizer, examples: Sequence[Example], *, max_length: int = 256, chat: Optional[bool] = None):
    """A pre-tokenized `datasets.Dataset` (`input_ids`, `completion_mask`) that TRL's `SFTTrainer` uses as is."""
    from datasets import Dataset

    rows = [encode_example(tokenizer, ex, max_length=max_length, chat=chat) for ex in examples]
    return Dataset.from_dict(
        {"input_ids": [r["input_ids"] for r in rows], "completion_mask": [r["completion_mask"] for r in rows]}
    )


def mixed_examples(per_task: Sequence[Sequence[Example]], seed: int = 0) -> list[Example]:
    """Balanced mix: each task's (shuffled) examples are cycled up to the largest task's count, then all shuffled."""
    if not per_task or any(len(x) == 0 for x in per_task):
        raise ValueError("mixed_examples: every task needs at least one example")
    rng = random.Random(seed)
    n = max(len(x) for x in per_task)
    out = []
    for examples in per_task:
        order = list(examples)
        rng.shuffle(order)
        out.extend(order[i % len(order)] for i in range(n))
    rng.shuffle(out)
    return out


# ============================================================================================ fingerprinting


def base_model_fingerprint(model: torch.nn.Module, samples_per_tensor: int = 8) -> str:
    """A hash of the base model: every parameter's name, shape and dtype, plus a few strided values of each.

    PEFT wrappers are looked through (`base_layer.` is dropped from names and adapter tensors are skipped), so the
    fingerprint of a wrapped model equals that of its base while no adapter is merged.
    """
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if "core_isolation_" in name or "lora_" in name:
            continue
        name = name.replace(".base_layer", "")
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        if tensor.numel() and tensor.is_floating_point():
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // samples_per_tensor)
            h.update(flat[::step][:samples_per_tensor].to(torch.float64).cpu().numpy().tobytes())
    return h.hexdigest()[:32]


# ===================================================================================================== SFT


def sft_train(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Example],
    config: CPIConfig,
    *,
    steps: int,
    learning_rate: Optional[float] = None,
    output_dir: Union[str, Path] = "cpi_trainer",
    callbacks: Optional[list] = None,
) -> list[float]:
    """One supervised fine-tuning run with TRL's `SFTTrainer` (loss on the answer tokens only).

    The examples are tokenized with [`encode_example`] (the prompt exactly as the evaluation formats it), so what is
    trained is what is scored. Optimizer, batch size, schedule, weight decay and seed come from `config`. Used for
    every probe and stage of [`CPIPipeline`] and by the benchmark's baselines, so all methods share one training path.

    Returns:
        `list[float]`: The logged training losses.
    """
    from trl import SFTConfig, SFTTrainer

    if not examples:
        raise ValueError("sft_train: no training examples")
    cfg = config
    dataset = build_sft_dataset(tokenizer, examples, max_length=cfg.max_length, chat=cfg.chat)
    args = SFTConfig(
        output_dir=str(output_dir),
        max_steps=int(steps),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate if learning_rate is None else learning_rate,
        weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps,
        optim=cfg.optim,
        max_length=cfg.max_length,
        completion_only_loss=True,
        activation_checkpointing=False,
        bf16=False,
        fp16=False,
        logging_steps=max(1, int(steps) // 10),
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )
    with _quiet_datasets():
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=list(callbacks or [])
        )
    trainer.remove_callback(PrinterCallback)  # losses are returned (and recorded by the pipeline) instead
    trainer.train()
    return [round(float(h["loss"]), 6) for h in trainer.state.log_history if "loss" in h]


# ================================================================================================= pipeline


def _maybe_tqdm(iterable, enabled: bool, desc: str, total: Optional[int] = None):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total)


@contextlib.contextmanager
def _quiet_datasets():
    """Silence `datasets`' per-map progress bars while TRL prepares a dataset."""
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()


def _safe_name(task_name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in task_name)


class _Tracked:
    """The tensors CPI-FT tracks, behind one interface: CoreIsolation deltas (`"adapter"`) or raw parameters (`"full"`)."""

    def __init__(self, model: torch.nn.Module, config: CPIConfig):
        self.mode = config.train_params
        self._hooks: list = []
        if self.mode == "adapter":
            from peft import get_peft_model

            peft_config = CoreIsolationConfig(
                target_modules=config.target_modules,
                core_fraction=config.core_fraction,
                similarity_threshold=config.similarity_threshold,
                core_scope=config.core_scope,
                slerp_t=config.slerp_t,
                slerp_eps=config.slerp_eps,
            )
            self.model = get_peft_model(model, peft_config)
            self.layers = self.model.base_model.core_isolation_layers()
            self.tensors = {k: layer.core_isolation_delta["default"] for k, layer in self.layers.items()}
            self.theta0 = None
        else:
            self.model = model
            for p in model.parameters():
                p.requires_grad_(True)
            self.tensors = dict(model.named_parameters())
            self.theta0 = {k: p.detach().clone() for k, p in self.tensors.items()}
        if not self.tensors:
            raise ValueError(f"no tensors to train: target_modules={config.target_modules!r} matched nothing")

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def delta(self, name: str) -> torch.Tensor:
        p = self.tensors[name].detach()
        return p.clone() if self.theta0 is None else p - self.theta0[name]

    def deltas(self) -> dict[str, torch.Tensor]:
        return {k: self.delta(k).contiguous() for k in self.tensors}

    @torch.no_grad()
    def set_deltas(self, deltas: dict[str, torch.Tensor]) -> None:
        for k, p in self.tensors.items():
            d = deltas[k].to(p.dtype)
            p.data.copy_(d if self.theta0 is None else self.theta0[k] + d)

    @torch.no_grad()
    def reset(self) -> None:
        for k, p in self.tensors.items():
            if self.theta0 is None:
                p.data.zero_()
            else:
                p.data.copy_(self.theta0[k])

    def set_frozen(self, masks: dict[str, torch.Tensor]) -> FreezeMaskCallback:
        """Freeze the masked entries (blocking their gradients) and return the callback that keeps them intact."""
        self.clear_frozen()
        if self.mode == "adapter":
            self.model.base_model.set_core_masks(masks)
        else:
            for k, mask in masks.items():
                if mask.any():
                    m = mask.to(self.tensors[k].device)
                    self._hooks.append(self.tensors[k].register_hook(lambda g, m=m: g.masked_fill(m, 0)))
        return FreezeMaskCallback((self.tensors[k], m) for k, m in masks.items())

    def clear_frozen(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self.mode == "adapter":
            self.model.base_model.set_core_masks({})


class CPIPipeline:
    """Runs CPI-FT on a list of tasks, resumable from its state directory after any step.

    Args:
        model (`transformers.PreTrainedModel`): The base model θ0 (not a `PeftModel`). It is trained in place.
        tokenizer: Its tokenizer (a pad token is set to EOS when missing).
        tasks (`Sequence[Task]`): The tasks (their `train` split is used for SFT, `test` for the optional report).
        config ([`CPIConfig`]): Hyper-parameters.
        output_dir (`str` or `Path`): The state directory (`state.json`, `probe/`, `cores/`, `fusion.safetensors`,
            `stages/`, `final/`, `report.{json,md}`, `jaccard.png`). An existing one is resumed; it must come from the
            same base model (fingerprint), the same tasks and the same config.
        progress (`bool`): Show a progress bar per pipeline step.
        eval_fn (`Callable[[model, tokenizer, Task], dict]`, *optional*): Called per task at the end; its result goes
            into the report (e.g. a wrapper around `peft_spectral.evaluation.evaluate`).
        callbacks (`list[TrainerCallback]`, *optional*): Extra callbacks for every SFT run.
        on_stage_end (`Callable[[CPIPipeline, int, list[str]], None]`, *optional*): Called after each stage with its
            index and task names (e.g. to measure forgetting).

    Example:

        ```py
        >>> pipe = CPIPipeline(model, tok, [task_a, task_b, task_c], CPIConfig(probe_steps=20), "runs/cpi")
        >>> result = pipe.run()           # or pipe.run(until="grouping"), then pipe.run() later
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
        self.fingerprint = base_model_fingerprint(model)
        self.tracked = _Tracked(model, self.config)
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

    @property
    def state_path(self) -> Path:
        return self.output_dir / "state.json"

    def _load_or_init_state(self) -> dict:
        names = [t.name for t in self.tasks]
        if self.state_path.exists():
            state = json.loads(self.state_path.read_text())
            if state.get("fingerprint") != self.fingerprint:
                raise ValueError(
                    f"the state in {self.output_dir} was made from another base model (fingerprint "
                    f"{state.get('fingerprint')} != {self.fingerprint}); use a new output_dir"
                )
            if state.get("tasks") != names:
                raise ValueError(f"the state in {self.output_dir} is for tasks {state.get('tasks')}, not {names}")
            saved = CPIConfig.from_dict(state.get("config", {})).to_dict()
            if saved != self.config.to_dict():
                diff = {k: (saved.get(k), v) for k, v in self.config.to_dict().items() if saved.get(k) != v}
                raise ValueError(f"the state in {self.output_dir} was made with another config: {diff}")
            logger.info("resuming CPI-FT from %s (completed: %s)", self.output_dir, state["completed"])
            return state
        self.output_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "tasks": names,
            "config": self.config.to_dict(),
            "completed": [],
            "probes_done": [],
            "stages_done": 0,
            "losses": {},
            "timings": {},
        }
        self._write_state(state)
        return state

    def _write_state(self, state: Optional[dict] = None) -> None:
        state = state if state is not None else self.state
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_path)

    def _mark(self, step: str, seconds: float) -> None:
        if step not in self.state["completed"]:
            self.state["completed"].append(step)
        self.state["timings"][step] = self.state["timings"].get(step, 0.0) + seconds
        self._write_state()

    def is_done(self, step: str) -> bool:
        return step in self.state["completed"]

    # ------------------------------------------------------------------------------------------- file helpers
    def _probe_path(self, task: str) -> Path:
        return self.output_dir / "probe" / f"{_safe_name(task)}.safetensors"

    def _core_path(self, task: str) -> Path:
        return self.output_dir / "cores" / f"{_safe_name(task)}.safetensors"

    def _stage_path(self, k: int) -> Path:
        return self.output_dir / "stages" / f"stage_{k}.safetensors"

    def _save_tensors(self, tensors: dict[str, torch.Tensor], path: Path, meta: Optional[dict] = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"fingerprint": self.fingerprint, "format": "pt"}
        metadata.update({k: json.dumps(v) for k, v in (meta or {}).items()})
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        tmp.replace(path)

    def _check_file(self, path: Path) -> dict:
        if not path.exists():
            raise FileNotFoundError(f"missing CPI-FT checkpoint {path}; delete {self.state_path} to start over")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"checkpoint {path} was made from another base model (fingerprint {meta.get('fingerprint')} != "
                f"{self.fingerprint})"
            )
        return meta

    def load_probe_delta(self, task: str) -> dict[str, torch.Tensor]:
        """Δ_t of a finished probe (checked against the base-model fingerprint)."""
        path = self._probe_path(task)
        self._check_file(path)
        return load_file(str(path))

    def load_core(self, task: str) -> dict[str, torch.Tensor]:
        """The core mask of a task as bool tensors."""
        path = self._core_path(task)
        meta = self._check_file(path)
        shapes = json.loads(meta["shapes"])
        packed = load_file(str(path))
        return {k: unpack_mask(v, shapes[k]) for k, v in packed.items()}

    # ------------------------------------------------------------------------------------------- training
    def _train_examples(self, task: Task) -> list[Example]:
        ex = list(task.train)
        if self.config.max_train_examples is not None:
            ex = ex[: self.config.max_train_examples]
        return ex

    def _sft(
        self,
        examples: Sequence[Example],
        *,
        steps: int,
        lr: float,
        label: str,
        freeze: Optional[FreezeMaskCallback] = None,
    ) -> list[float]:
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

    # ------------------------------------------------------------------------------------------- steps
    def probe(self) -> None:
        """Step 1: SFT each task alone from θ0 and store Δ_t (skips tasks already probed)."""
        if self.is_done("probe"):
            return
        start = time.time()
        cfg = self.config
        todo = [t for t in self.tasks if t.name not in self.state["probes_done"]]
        for task in _maybe_tqdm(todo, self.progress, "CPI probe (SFT per task)"):
            self.tracked.clear_frozen()
            self.tracked.reset()
            losses = self._sft(
                self._train_examples(task), steps=cfg.probe_steps, lr=cfg.learning_rate, label=f"probe:{task.name}"
            )
            deltas = self.tracked.deltas()
            if all(not bool(d.any()) for d in deltas.values()):
                warnings.warn(f"probe of task {task.name!r} left every tracked parameter unchanged", UserWarning)
            self._save_tensors(deltas, self._probe_path(task.name), {"task": task.name})
            del deltas
            self.state["probes_done"].append(task.name)
            self.state["losses"][f"probe:{task.name}"] = losses
            self._write_state()
        self.tracked.reset()
        self._mark("probe", time.time() - start)

    def cores(self) -> None:
        """Step 2: the core region of each task (top p by |Δ_t|), stored as packed bitmasks."""
        if self.is_done("cores"):
            return
        start = time.time()
        cfg = self.config
        sizes = {}
        for task in _maybe_tqdm(self.tasks, self.progress, "CPI cores (top-p |Δ|)"):
            masks = core_masks(self.load_probe_delta(task.name), cfg.core_fraction, cfg.core_scope)
            shapes = {k: list(v.shape) for k, v in masks.items()}
            sizes[task.name] = int(sum(int(m.sum()) for m in masks.values()))
            self._save_tensors(
                {k: pack_mask(v) for k, v in masks.items()}, self._core_path(task.name), {"shapes": shapes}
            )
        self.state["core_sizes"] = sizes
        self.state["num_tracked"] = int(sum(t.numel() for t in self.tracked.tensors.values()))
        self._mark("cores", time.time() - start)

    def grouping(self) -> None:
        """Step 3: Jaccard matrix of the cores and groups (connected components of J ≥ τ), in stage order."""
        if self.is_done("grouping"):
            return
        start = time.time()
        packed = []
        for task in _maybe_tqdm(self.tasks, self.progress, "CPI grouping (Jaccard)"):
            path = self._core_path(task.name)
            self._check_file(path)
            packed.append(load_file(str(path)))
        jac = jaccard_matrix(packed)
        groups = connected_groups(jac, self.config.similarity_threshold)
        self.state["jaccard"] = jac.tolist()
        self.state["groups"] = [[self.tasks[i].name for i in g] for g in groups]
        self.state["stage_order"] = [[self.tasks[i].name for i in g] for g in self._order_groups(groups)]
        self._mark("grouping", time.time() - start)

    def _order_groups(self, groups: list[list[int]]) -> list[list[int]]:
        order = self.config.stage_order
        if order == "random":
            groups = list(groups)
            random.Random(self.config.seed).shuffle(groups)
            return groups
        if order == "small_first":
            sizes = self.state.get("core_sizes", {})
            return sorted(groups, key=lambda g: (sum(sizes.get(self.tasks[i].name, 0) for i in g), g[0]))
        return groups

    def fusion(self) -> None:
        """Step 4: fused delta (core transplant + SLERP of the rest), saved to `fusion.safetensors`."""
        if self.is_done("fusion"):
            return
        start = time.time()
        names = self.tracked.names
        handles, delta_src, mask_src = [], [], []
        for task in self.tasks:
            self._check_file(self._probe_path(task.name))
            f = safe_open(str(self._probe_path(task.name)), framework="pt")
            handles.append(f)
            delta_src.append(f.get_tensor)
            meta = self._check_file(self._core_path(task.name))
            shapes = json.loads(meta["shapes"])
            g = safe_open(str(self._core_path(task.name)), framework="pt")
            handles.append(g)
            mask_src.append(lambda n, g=g, shapes=shapes: unpack_mask(g.get_tensor(n), shapes[n]))
        fused = fuse_deltas(
            delta_src,
            mask_src,
            names,
            slerp_t=self.config.slerp_t,
            slerp_eps=self.config.slerp_eps,
            progress=self.progress,
        )
        self._save_tensors(fused, self.output_dir / "fusion.safetensors")
        del handles
        self._mark("fusion", time.time() - start)

    def _group_core(self, task_names: Sequence[str]) -> dict[str, torch.Tensor]:
        union: dict[str, torch.Tensor] = {}
        for name in task_names:
            for k, m in self.load_core(name).items():
                union[k] = union[k] | m if k in union else m
        return union

    def staged(self) -> None:
        """Step 5: one SFT stage per group, earlier groups' cores frozen bit-identically."""
        if self.is_done("staged"):
            return
        start = time.time()
        cfg = self.config
        order: list[list[str]] = self.state["stage_order"]
        k0 = self.state["stages_done"]
        source = self._stage_path(k0 - 1) if k0 else self.output_dir / "fusion.safetensors"
        self._check_file(source)
        self.tracked.set_deltas(load_file(str(source)))
        by_name = {t.name: t for t in self.tasks}
        frozen: dict[str, torch.Tensor] = {}
        for group in order[:k0]:
            for k, m in self._group_core(group).items():
                frozen[k] = frozen[k] | m if k in frozen else m
        bar = _maybe_tqdm(range(k0, len(order)), self.progress, "CPI staged SFT", total=len(order) - k0)
        for k in bar:
            group = order[k]
            callback = self.tracked.set_frozen(frozen)
            examples = mixed_examples([self._train_examples(by_name[n]) for n in group], seed=cfg.seed + k)
            losses = self._sft(
                examples,
                steps=cfg.steps_for_stage(k, len(order)),
                lr=cfg.stage_learning_rate or cfg.learning_rate,
                label=f"stage:{k}",
                freeze=callback,
            )
            self._save_tensors(self.tracked.deltas(), self._stage_path(k), {"group": group})
            self.state["stages_done"] = k + 1
            self.state["losses"][f"stage:{k}"] = losses
            self.state.setdefault("frozen_counts", {})[str(k)] = callback.num_frozen
            self._write_state()
            for kk, m in self._group_core(group).items():
                frozen[kk] = frozen[kk] | m if kk in frozen else m
            if self.on_stage_end is not None:
                self.tracked.clear_frozen()
                self.on_stage_end(self, k, list(group))
        self.tracked.clear_frozen()
        self._mark("staged", time.time() - start)

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
                return self._finalise(self._probe_path(self.tasks[0].name))
            return self.report(write=False)
        for step in STEPS:
            getattr(self, step)()
            if step == until:
                return self.report(write=False)
        last = self._stage_path(len(self.state["stage_order"]) - 1)
        return self._finalise(last)

    def _finalise(self, source: Path) -> dict:
        """Load the final deltas, set the adapter masks to the union of all cores, save `final/`, write the report."""
        self._check_file(source)
        self.tracked.clear_frozen()
        self.tracked.set_deltas(load_file(str(source)))
        final_dir = self.output_dir / "final"
        if self.tracked.mode == "adapter":
            if len(self.tasks) > 1:
                self.model.base_model.set_core_masks(self._group_core([t.name for t in self.tasks]))
            self.model.save_pretrained(str(final_dir))
        else:
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
        rep = {
            "tasks": s["tasks"],
            "fingerprint": s["fingerprint"],
            "config": s["config"],
            "completed": s["completed"],
            "num_tracked": s.get("num_tracked"),
            "core_sizes": s.get("core_sizes"),
            "jaccard": s.get("jaccard"),
            "groups": s.get("groups"),
            "stage_order": s.get("stage_order"),
            "frozen_counts": s.get("frozen_counts"),
            "losses": s.get("losses"),
            "timings_s": s.get("timings"),
            "trainer_runs_this_process": list(self.trainer_runs),
        }
        if write and self.eval_fn is not None:
            rep["scores"] = {t.name: self.eval_fn(self.model, self.tokenizer, t) for t in self.tasks}
        if write:
            (self.output_dir / "report.json").write_text(json.dumps(rep, indent=2))
            (self.output_dir / "report.md").write_text(_report_markdown(rep))
            if rep["jaccard"] is not None:
                try:
                    plot_jaccard(
                        np.array(rep["jaccard"]), rep["tasks"], self.output_dir / "jaccard.png", rep["groups"]
                    )
                except ImportError:  # pragma: no cover - matplotlib missing
                    logger.warning("matplotlib is not installed: no jaccard.png")
        return rep


def _report_markdown(rep: dict) -> str:
    lines = ["# CPI-FT report", "", f"Tasks: {', '.join(rep['tasks'])}", ""]
    cfg = rep["config"]
    lines += [
        f"p = {cfg['core_fraction']} ({cfg['core_scope']}), τ = {cfg['similarity_threshold']}, "
        f"train_params = {cfg['train_params']}, probe_steps = {cfg['probe_steps']}, "
        f"stage_steps = {cfg['stage_steps'] or cfg['probe_steps']}"
        + (f" (total {cfg['total_stage_steps']} shared by the stages)" if cfg.get("total_stage_steps") else ""),
        "",
    ]
    if rep.get("jaccard") is not None:
        names = rep["tasks"]
        lines += [
            "## Jaccard similarity of core regions",
            "",
            "| | " + " | ".join(names) + " |",
            "|---" * (len(names) + 1) + "|",
        ]
        for n, row in zip(names, rep["jaccard"]):
            lines.append(f"| {n} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
        lines += ["", f"Groups: {rep['groups']}", f"Stage order: {rep['stage_order']}", ""]
    if rep.get("scores"):
        lines += ["## Scores", "", "| task | score |", "|---|---|"]
        for n, sc in rep["scores"].items():
            lines.append(f"| {n} | {json.dumps(sc)} |")
        lines.append("")
    if rep.get("timings_s"):
        lines += ["## Time per step (s)", ""] + [f"- {k}: {v:.1f}" for k, v in rep["timings_s"].items()] + [""]
    return "\n".join(lines)


def plot_jaccard(
    jaccard: np.ndarray, names: Sequence[str], path: Union[str, Path], groups: Optional[list] = None
) -> Path:
    """Save a heat map of the Jaccard matrix (annotated with the values and, optionally, the groups)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    fig, ax = plt.subplots(figsize=(1.2 * n + 3, 1.0 * n + 2))
    im = ax.imshow(jaccard, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{jaccard[i, j]:.2f}", ha="center", va="center", color="w" if jaccard[i, j] < 0.6 else "k")
    title = "Jaccard similarity of core regions"
    if groups is not None:
        title += "\ngroups: " + "; ".join("{" + ", ".join(g) + "}" for g in groups)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
