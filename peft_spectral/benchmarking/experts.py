"""Expert libraries for the benchmarks: where the library is, the check that it holds enough experts, and random SVF
experts of the tiny model that a smoke run builds on the fly.

```python
from peft_spectral.benchmarking.experts import default_library_dir, library_experts, random_svf_experts

experts, problem = library_experts(args.experts_dir or default_library_dir(), minimum=2)
if problem:                                          # one line, then exit status 2
    print(problem, file=sys.stderr)
    return 2
root = random_svf_experts(tmp / "experts", 3)        # smoke runs: random experts of the tiny model
```
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch


__all__ = [
    "MLP_TARGETS",
    "LibraryJobKeys",
    "default_library_dir",
    "expert_digest",
    "library_experts",
    "library_specs",
    "random_svf_experts",
]

#: The projections the random experts adapt.
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


def default_library_dir() -> Path:
    """The expert library shipped with the package ([`peft_spectral.paths.library_dir`], `peft_spectral/library/`:
    one directory per expert with its adapter and `expert.json`); it may hold no expert yet."""
    from ..paths import library_dir

    return library_dir()


def library_experts(root: Union[str, os.PathLike], minimum: int = 1, *, option: str = "--experts-dir") -> tuple:
    """The experts of the library `root` ([`~peft_spectral.transformer2.find_experts`]) and, when there are fewer
    than `minimum`, the one line a benchmark prints before it exits with status 2.

    Args:
        root (`str` or `os.PathLike`): The library directory.
        minimum (`int`, defaults to 1): Experts the benchmark needs.
        option (`str`, defaults to `"--experts-dir"`): The option that names `root`, quoted in the message.

    Returns:
        `tuple[list[SavedExpert], str]`: every expert found (sorted by directory name) and the message (`""` when
        there are enough).
    """
    from ..transformer2 import find_experts

    found = find_experts(root)
    if len(found) >= minimum:
        return found, ""
    return found, (
        f"{option} {root}: {len(found)} expert(s) (*/expert.json next to adapter_config.json), this benchmark needs "
        f"at least {minimum}; train them (python benchmarks/bench_experts.py --train) or pass {option}"
    )


def library_specs(root: Union[str, os.PathLike]) -> tuple[list[dict], dict[str, str]]:
    """The experts of the library `root` as [`~peft_spectral.transformer2.ExpertLibrary`] specs (`name`, `source`,
    `description` cut to 120 characters) and `expert name -> task spec` (from each `expert.json`).

    Args:
        root (`str` or `os.PathLike`): The library directory.
    """
    from ..model_card import read_expert_json
    from ..transformer2 import find_experts

    specs, tasks = [], {}
    for expert in find_experts(root):
        name = expert.path.name
        meta = read_expert_json(expert.path)
        specs.append({"name": name, "source": str(expert.path), "description": meta.get("description", "")[:120]})
        tasks[name] = meta.get("task_spec") or expert.task
    return specs, tasks


def expert_digest(path: Union[str, os.PathLike], length: int = 12) -> str:
    """A short content digest of the expert saved in `path` (xxh3-128 of its `adapter_model.safetensors`): benchmark
    jobs that used an expert put it in their key, so a retrained expert never reuses the old expert's results."""
    import xxhash

    return xxhash.xxh3_128(Path(path, "adapter_model.safetensors").read_bytes()).hexdigest()[:length]


class LibraryJobKeys:
    """Job keys of a benchmark over an expert library and unseen tasks, each naming the inputs its result depends on
    beyond the run's settings, so that a retrained expert or a changed task re-runs only the jobs that used it: the
    task's spec (digest), the expert's saved weights ([`expert_digest`]), the whole library (a mixture of every
    expert), the classifier's training tasks, the experts' descriptions (what a prompt dispatcher reads).

    Args:
        unseen (`dict`): Task name -> `(role, spec, related expert)`.
        specs (`list[dict]`): The library's expert specs ([`library_specs`]: `name`, `source`, `description`).
        expert_tasks (`dict[str, str]`): Expert name -> its task spec.
        others (`Sequence[str]`): The task specs of the `others` class.
        labels (`dict[str, str]`): Dispatcher label -> what its scores depend on: `"descriptions"` or `"classifier"`.
    """

    def __init__(self, unseen: dict, specs: list[dict], expert_tasks: dict[str, str], others, labels: dict) -> None:
        from ..state import fingerprint

        self.task = {n: f"{n}@{fingerprint(spec)[:8]}" for n, (_, spec, _) in unseen.items()}
        self.expert = {s["name"]: f"{s['name']}@{expert_digest(s['source'])}" for s in specs}
        self.library = fingerprint(sorted(self.expert.values()))[:8]
        self.classifier = f"classifier@{fingerprint(expert_tasks, list(others))[:8]}"
        depends = {
            "descriptions": fingerprint([(s["name"], s["description"]) for s in specs])[:8],
            "classifier": self.classifier,
        }
        self.label = {label: f"{label}@{depends[on]}" for label, on in labels.items()}
        self.calibrate = {n: f"{n}@{fingerprint(spec)[:8]}" for n, spec in expert_tasks.items()}

    def answers(self, who: Optional[str], task: str) -> str:
        """Answers of the base model (`who=None`), an expert, or the mixture of the library (`who="cem"`) on `task`."""
        if who is None:
            return f"answers:base:{self.task[task]}"
        if who == "cem":
            return f"answers:cem@{self.library}:{self.task[task]}"
        return f"answers:{self.expert[who]}:{self.task[task]}"

    def pass1(self, label: str, task: str, calibrate: bool = False) -> str:
        """Pass-1 scores of dispatcher `label` on unseen `task`, or on validation prompts of an expert's task or an
        `others` task (`calibrate=True`)."""
        if calibrate:
            return f"pass1:{self.label[label]}:calibrate:{self.calibrate.get(task, task)}"
        return f"pass1:{self.label[label]}:{self.task[task]}"

    def cem(self, task: str) -> str:
        """The CEM search of the library's mixing weights on `task`."""
        return f"cem@{self.library}:{self.task[task]}"


def random_svf_experts(root: Union[str, os.PathLike], n: int, *, seed: int = 0, scale: float = 0.5) -> Path:
    """Save `n` SVF experts of [`tiny_model`]`(seed)` on the MLP projections, with random non-identity
    `z = 1 + scale · N(0, 1)` (generator seeds 1..n), each in `root/random_<k>/` with an `expert.json` (task
    `random_<k>`), the layout [`~peft_spectral.transformer2.find_experts`] reads.

    Args:
        root (`str` or `os.PathLike`): Where the experts go.
        n (`int`): How many.
        seed (`int`, defaults to 0): Seed of the tiny base model (use the same for the model they are loaded on).
        scale (`float`, defaults to 0.5): Spread of `z` around 1.

    Returns:
        `Path`: `root`.
    """
    from peft import get_peft_model

    from .. import SVFConfig
    from ..model_card import write_expert_files
    from .tiny import tiny_model

    root = Path(root)
    for k in range(n):
        base, _ = tiny_model(seed=seed)
        model = get_peft_model(base, SVFConfig(target_modules=list(MLP_TARGETS), use_svd_cache=False))
        generator = torch.Generator().manual_seed(k + 1)
        with torch.no_grad():
            for _, layer in model.base_model.svf_layers():
                z = layer.svf_z["default"]
                z.copy_(1 + scale * torch.randn(z.shape, generator=generator))
        folder = root / f"random_{k}"
        model.save_pretrained(str(folder), save_embedding_layers=False)
        write_expert_files(folder, task=f"random_{k}", description=f"random SVF expert {k} (benchmark smoke run)")
    return root
