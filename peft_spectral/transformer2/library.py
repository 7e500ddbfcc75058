"""The expert library: one base model, K saved SVF experts loaded once as adapters of one `PeftModel`.

Every expert is an ordinary SVF adapter (a directory or a Hub id holding `adapter_config.json` and
`adapter_model.safetensors`). They are loaded as named adapters of a single [`~peft.PeftModel`], so the base weights
and the spectral factors `U`/`σ`/`V` (the `svf_S`/`svf_Q` buffers of each [`~peft_spectral.SVFLinear`]) exist once;
switching experts only changes which `z` is active and never recomputes an SVD.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import torch
from torch import nn

from ..adapter_io import load_adapter, validate_adapter_dir
from ..model_card import EXPERT_FILE, read_expert_json
from ..tuners.svf.config import SVFConfig
from ..tuners.svf.layer import SVFLinear
from ..tuners.svf.model import SVFBaseWeightsWarning, layer_index


logger = logging.getLogger(__name__)

#: Category name that means "no expert fits": the unadapted base model answers.
OTHERS = "others"
#: File name of a saved library manifest ([`ExpertLibrary.save_manifest`]).
LIBRARY_MANIFEST = "transformer2_library.json"
#: Names that cannot be given to an expert (`"__base__"` is the base model in mixed-adapter batches).
RESERVED_NAMES = frozenset({OTHERS, "base", "none", "default", "__base__"})
_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


class ExpertLibraryError(ValueError):
    """The experts given to an [`ExpertLibrary`] cannot be used together."""


@dataclass
class Expert:
    """One SVF expert of an [`ExpertLibrary`].

    Args:
        name (`str`): Short category name, also the adapter name (letters, digits, `_` and `-`; not `others`).
        source (`str`): Local directory or Hub id of the saved SVF adapter.
        description (`str`): One line describing the questions this expert is for (shown to the dispatcher).
        config (`SVFConfig`, *optional*): The adapter's config, filled in when the library loads it.
        folder (`str`, *optional*): The local adapter directory (a Hub id's download), filled in with `config`.
    """

    name: str
    source: str
    description: str = ""
    config: Optional[SVFConfig] = field(default=None, repr=False)
    folder: Optional[str] = field(default=None, repr=False)


ExpertSpec = Union[str, os.PathLike, Expert, Mapping[str, Any]]


def _expert_from_spec(spec: ExpertSpec, index: int) -> Expert:
    if isinstance(spec, Expert):
        return spec
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"name", "source", "path", "description"}
        if unknown:
            raise ExpertLibraryError(f"experts[{index}] has unknown key(s) {sorted(unknown)}")
        source = spec.get("source", spec.get("path"))
        if not source:
            raise ExpertLibraryError(f"experts[{index}] names no 'source' (adapter directory or Hub id)")
        return Expert(
            name=str(spec.get("name") or _default_name(str(source))),
            source=str(source),
            description=str(spec.get("description", "")),
        )
    if isinstance(spec, (str, os.PathLike)):
        return Expert(name=_default_name(str(spec)), source=str(spec))
    raise ExpertLibraryError(
        f"experts[{index}] must be a path, a Hub id, an Expert or a mapping, got {type(spec).__name__}"
    )


def expert_name(task: str) -> str:
    """The expert (adapter) name of a task, also its directory in a library: every character other than a letter, a
    digit, `_` or `-` becomes `_` (`"arithmetic/2_digit_addition"` -> `"arithmetic_2_digit_addition"`)."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", task)


def _default_name(source: str) -> str:
    return expert_name(Path(source.rstrip("/")).name or source)


class SavedExpert(NamedTuple):
    """One expert of a library directory, as [`find_experts`] returns it (unpacks as `task, path, meta`).

    Args:
        task (`str`): The task the expert was trained on (the `task` of its `expert.json`).
        path (`Path`): The adapter directory.
        meta (`dict`): Its `expert.json`.
    """

    task: str
    path: Path
    meta: dict[str, Any]


def find_experts(root: Union[str, os.PathLike]) -> list[SavedExpert]:
    """The saved SVF experts of a library directory: every `root/<name>/expert.json` next to an `adapter_config.json`.

    This is the layout `peft-spectral train-svf`, `benchmarks/bench_experts.py` and the shipped library
    (`peft_spectral/library/`) use: one directory per expert, one level below `root`, holding the adapter and the
    `expert.json` of [`peft_spectral.model_card.write_expert_files`] (its `task` names the task).

    Args:
        root (`str` or `os.PathLike`): The library directory.

    Returns:
        `list[SavedExpert]`, sorted by directory name; empty when `root` does not exist or holds no expert. A
        directory with an `expert.json` but no `adapter_config.json` is not an expert: it is skipped with a warning.

    Raises:
        [`ExpertLibraryError`]: an `expert.json` is not a valid JSON object or names no `task`.
    """
    found = []
    for meta_file in sorted(Path(root).glob(f"*/{EXPERT_FILE}")):
        folder = meta_file.parent
        if not (folder / "adapter_config.json").is_file():
            logger.warning("%s has an %s but no adapter_config.json: not an expert, skipped", folder, EXPERT_FILE)
            continue
        try:
            meta = read_expert_json(folder)
        except ValueError as err:
            raise ExpertLibraryError(str(err)) from None
        if not isinstance(meta.get("task"), str) or not meta["task"]:
            raise ExpertLibraryError(
                f"{meta_file} names no 'task' (the task the expert was trained on); add it, e.g. "
                '{"task": "rg:gcd?max_value=30", "description": "..."}'
            )
        found.append(SavedExpert(meta["task"], folder, meta))
    return found


def read_expert_metadata(source: Union[str, os.PathLike]) -> dict[str, str]:
    """Name and description an expert directory declares, if any, from its metadata
    ([`peft_spectral.model_card.read_expert_json`]: `expert.json`, or an older version's `transformer2_expert.json`):
    the name is the old file's `name`, else derived from the task by [`expert_name`]. Returns an empty dict when there
    is none (Hub ids are not fetched for this).

    Raises:
        [`ExpertLibraryError`]: naming the file, when it is malformed.
    """
    try:
        data = read_expert_json(source)
    except ValueError as err:
        raise ExpertLibraryError(str(err)) from None
    out = {}
    if data.get("name") or data.get("task"):
        out["name"] = str(data.get("name") or expert_name(str(data["task"])))
    if data.get("description"):
        out["description"] = " ".join(str(data["description"]).split())
    return out


def _read_json_object(path: Path, example: str) -> dict[str, Any]:
    """The JSON object in `path`; [`ExpertLibraryError`] naming the file when it is unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExpertLibraryError(f"{path} is not valid JSON ({err}); fix or delete it") from err
    if not isinstance(data, dict):
        raise ExpertLibraryError(f"{path} holds a {type(data).__name__}, not a JSON object ({example})")
    return data


def _normalise_targets(targets: Any) -> Any:
    if isinstance(targets, (set, frozenset, list, tuple)):
        return tuple(sorted(targets))
    return targets


def prepare_experts(
    experts: Sequence[ExpertSpec],
    *,
    names: Optional[Sequence[str]] = None,
    descriptions: Optional[Sequence[str]] = None,
    check_base_model: bool = True,
    **hub_kwargs: Any,
) -> list[Expert]:
    """Everything [`ExpertLibrary.load`] checks before it touches a model: the experts' names and descriptions, their
    directories (valid SVF adapters, see [`~peft_spectral.adapter_io.validate_adapter_dir`]) and that they fit
    together. Commands call it before loading the base model, so that a bad expert fails in seconds.

    Args:
        experts, names, descriptions, check_base_model, **hub_kwargs: As for [`ExpertLibrary.load`].

    Returns:
        `list[Expert]`: The experts with their final name, description, `config` and local `folder`.

    Raises:
        [`ExpertLibraryError`] or [`~peft_spectral.adapter_io.AdapterLoadError`]: as for [`ExpertLibrary.load`].
    """
    if experts is None or len(experts) == 0:
        raise ExpertLibraryError("`experts` is empty: give at least one saved SVF adapter (directory or Hub id)")
    specs = [_expert_from_spec(s, i) for i, s in enumerate(experts)]
    for arg, values in (("names", names), ("descriptions", descriptions)):
        if values is not None and len(values) != len(specs):
            raise ExpertLibraryError(f"`{arg}` has {len(values)} entries but {len(specs)} experts were given")
    for i, spec in enumerate(specs):
        meta = read_expert_metadata(spec.source) if Path(spec.source).is_dir() else {}
        explicit_name = isinstance(experts[i], (Expert, Mapping)) and (
            not isinstance(experts[i], Mapping) or "name" in experts[i]
        )
        if names is not None:
            spec.name = names[i]
        elif not explicit_name and meta.get("name"):
            spec.name = meta["name"]
        if descriptions is not None:
            spec.description = descriptions[i]
        elif not spec.description:
            spec.description = meta.get("description", "")
    _check_names([s.name for s in specs])
    for spec in specs:
        folder, config = validate_adapter_dir(spec.source, expected_type="SVF", **hub_kwargs)
        spec.config, spec.folder = config, str(folder)
    check_compatible(specs, check_base_model=check_base_model)
    return specs


class ExpertLibrary:
    """A base model with K SVF experts loaded once onto one `PeftModel`.

    Args:
        model (`PeftModel`): The model holding the experts as adapters (use [`ExpertLibrary.load`] to build it).
        tokenizer: Its tokenizer.
        experts (`Sequence[Expert]`): The experts, in order; their names are the adapter names.

    Example:

    ```py
    >>> from peft_spectral.transformer2 import ExpertLibrary
    >>> library = ExpertLibrary.load(base_model, tokenizer, [
    ...     {"name": "math", "source": "svf-math", "description": "arithmetic word problems"},
    ...     {"name": "logic", "source": "me/svf-logic", "description": "logical deduction puzzles"},
    ... ])
    >>> with library.use("math"):
    ...     out = library.model.generate(**inputs)
    ```
    """

    def __init__(self, model: nn.Module, tokenizer: Any, experts: Sequence[Expert]):
        if not experts:
            raise ExpertLibraryError("an ExpertLibrary needs at least one expert; `experts` is empty")
        self.model = model
        self.tokenizer = tokenizer
        self.experts: dict[str, Expert] = {e.name: e for e in experts}
        self.extra_adapters: dict[str, str] = {}  # name -> role ("classifier", "mixture")
        self.extra_sources: dict[str, str] = {}  # name -> saved directory / Hub id, where loaded from one
        #: Fitted dispatch thresholds per dispatcher key (`"prompt"` or the classifier's adapter name), see
        #: `peft_spectral.transformer2.calibration.calibrate_threshold`; saved by `save_manifest`.
        self.dispatch_thresholds: dict[str, dict[str, Any]] = {}
        self.switch_seconds: list[float] = []
        missing = [e.name for e in experts if e.name not in model.peft_config]
        if missing:
            raise ExpertLibraryError(f"the model holds no adapter(s) named {missing}")

    # ------------------------------------------------------------------ construction

    @classmethod
    def load(
        cls,
        base_model: nn.Module,
        tokenizer: Any,
        experts: Sequence[ExpertSpec],
        *,
        names: Optional[Sequence[str]] = None,
        descriptions: Optional[Sequence[str]] = None,
        check_base_model: bool = True,
        **hub_kwargs: Any,
    ) -> ExpertLibrary:
        """Validate K saved SVF adapters and load them onto `base_model` as one `PeftModel`.

        Args:
            base_model (`PreTrainedModel`): The unadapted model. It is wrapped in place (as `PeftModel.from_pretrained`
                does); use `library.model` afterwards.
            tokenizer: Its tokenizer.
            experts: Adapter directories / Hub ids, [`Expert`]s, or mappings with `source`, `name`, `description`.
            names (`Sequence[str]`, *optional*): Names overriding those of `experts` (default: the `name` given, the
                `transformer2_expert.json` of the directory, else the directory name).
            descriptions (`Sequence[str]`, *optional*): Descriptions overriding those of `experts`.
            check_base_model (`bool`): Refuse experts whose `base_model_name_or_path` differ from each other.
            **hub_kwargs: Passed to `huggingface_hub.snapshot_download` for Hub ids (e.g. `revision`, `token`).

        Raises:
            [`ExpertLibraryError`]: no experts; bad, reserved or duplicate names; experts of different base models,
                target modules, SVF mode or rank (the experts concerned are named); an expert saved from other base
                weights than `base_model`'s (see `SVFConfig.base_weights_sketch`; PEFT alone only warns).
            [`~peft_spectral.adapter_io.AdapterLoadError`]: an expert directory is missing, not SVF, corrupt, lacks
                tensors of the modules it targets, or holds out-of-range `z`.
        """
        specs = prepare_experts(
            experts, names=names, descriptions=descriptions, check_base_model=check_base_model, **hub_kwargs
        )
        folders = [Path(spec.folder) for spec in specs]
        _warn_base_mismatch(base_model, specs[0])

        model = _load_checked(base_model, folders[0], specs[0].name, specs[0].source)
        for spec, folder in zip(specs[1:], folders[1:]):
            _load_checked(model, folder, spec.name, spec.source)
        model.set_adapter(specs[0].name)
        model.eval()
        return cls(model, tokenizer, specs)

    # ------------------------------------------------------------------ introspection

    @property
    def names(self) -> list[str]:
        """Expert names, in order."""
        return list(self.experts)

    @property
    def svf_layers(self) -> list[tuple[str, SVFLinear]]:
        """The SVF layers of the model with their module names."""
        return self.model.base_model.svf_layers()

    @property
    def num_layers(self) -> int:
        """Number of transformer blocks with SVF layers (`1 +` the largest block index in module names)."""
        indices = [layer_index(n) for n, _ in self.svf_layers]
        indices = [i for i in indices if i is not None]
        return max(indices) + 1 if indices else 1

    def svd_cache_stats(self) -> dict[str, int]:
        """Hits / misses / stale entries of the tuner's SVD cache (misses = SVDs computed)."""
        cache = getattr(self.model.base_model, "_svd_cache", None)
        if cache is None:
            return {"hits": 0, "misses": 0, "stale": 0}
        return {"hits": cache.hits, "misses": cache.misses, "stale": cache.stale}

    def register_adapter(self, name: str, role: str) -> None:
        """Declare an extra adapter of `self.model` (a classifier or a mixture) that dispatch may select."""
        if name not in self.model.peft_config:
            raise ExpertLibraryError(f"the model holds no adapter named {name!r}")
        if name in self.experts:
            raise ExpertLibraryError(f"{name!r} is already an expert name")
        self.extra_adapters[name] = role

    def load_extra_adapter(self, source: Union[str, os.PathLike], name: str, role: str, **hub_kwargs: Any) -> str:
        """Load another saved SVF adapter (e.g. a classifier expert or a saved mixture) onto the same model.

        The adapter must fit the experts' base model; its target modules may differ.
        """
        if name in self.model.peft_config:
            raise ExpertLibraryError(f"an adapter named {name!r} is loaded already")
        folder, config = validate_adapter_dir(source, expected_type="SVF", **hub_kwargs)
        first = next(iter(self.experts.values()))
        base_a, base_b = getattr(config, "base_model_name_or_path", None), first.config.base_model_name_or_path
        if base_a and base_b and base_a != base_b:
            raise ExpertLibraryError(
                f"adapter {str(source)!r} was trained on base model {base_a!r}, the experts on {base_b!r}"
            )
        active = self.model.active_adapter
        _load_checked(self.model, folder, name, str(source))
        self.model.set_adapter(active)
        self.register_adapter(name, role)
        self.extra_sources[name] = str(source)
        return name

    # ------------------------------------------------------------------ manifest

    def manifest(self) -> dict[str, Any]:
        """The library as JSON-friendly data: experts, extra adapters with a source, fitted dispatch thresholds."""
        return {
            "experts": [
                {"name": e.name, "source": e.source, "description": e.description} for e in self.experts.values()
            ],
            "extra_adapters": [
                {"name": n, "role": self.extra_adapters[n], "source": src} for n, src in self.extra_sources.items()
            ],
            "dispatch_thresholds": self.dispatch_thresholds,
        }

    def save_manifest(self, path: Union[str, os.PathLike]) -> Path:
        """Write [`ExpertLibrary.manifest`] to `path` (a file, or a directory receiving `transformer2_library.json`).

        Returns:
            `Path`: The file written.
        """
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path.mkdir(parents=True, exist_ok=True)
            path = path / LIBRARY_MANIFEST
        path.write_text(json.dumps(self.manifest(), indent=2))
        return path

    @classmethod
    def from_manifest(
        cls, base_model: nn.Module, tokenizer: Any, path: Union[str, os.PathLike], **load_kwargs: Any
    ) -> ExpertLibrary:
        """Load a library saved with [`ExpertLibrary.save_manifest`]: experts, extra adapters and thresholds.

        Args:
            base_model (`PreTrainedModel`): The unadapted model (wrapped in place).
            tokenizer: Its tokenizer.
            path: The manifest file, or the directory holding `transformer2_library.json`.
            **load_kwargs: Passed to [`ExpertLibrary.load`].

        Raises:
            [`ExpertLibraryError`]: the manifest is missing or malformed.
        """
        path = Path(path)
        if path.is_dir():
            path = path / LIBRARY_MANIFEST
        if not path.is_file():
            raise ExpertLibraryError(f"library manifest {str(path)!r} does not exist")
        data = _read_json_object(path, '{"experts": [{"name": ..., "source": ...}], ...}')
        experts, extras = data.get("experts"), data.get("extra_adapters", [])
        thresholds = data.get("dispatch_thresholds", {})
        problem = None
        if not isinstance(experts, list) or not experts or not all(isinstance(e, dict) for e in experts):
            problem = "'experts' must be a non-empty list of objects with 'name' and 'source'"
        elif not isinstance(extras, list) or not all(
            isinstance(e, dict) and isinstance(e.get("source"), str) and isinstance(e.get("name"), str) for e in extras
        ):
            problem = "'extra_adapters' must be a list of objects with 'name', 'source' and 'role'"
        elif not isinstance(thresholds, dict):
            problem = "'dispatch_thresholds' must be an object"
        if problem:
            raise ExpertLibraryError(f"library manifest {str(path)!r} is not valid: {problem}")
        library = cls.load(base_model, tokenizer, experts, **load_kwargs)
        for extra in extras:
            library.load_extra_adapter(extra["source"], extra["name"], str(extra.get("role", "classifier")))
        library.dispatch_thresholds = dict(thresholds)
        return library

    # ------------------------------------------------------------------ switching

    def resolve(self, choice: Optional[str]) -> Optional[str]:
        """Map a dispatcher's answer to an adapter name, or `None` (the base model).

        `None`, `"others"` (any case) and `"base"` mean the base model. A name that is neither an expert nor a
        registered extra adapter also means the base model, with a warning in the log.
        """
        if choice is None:
            return None
        text = str(choice).strip()
        if text.lower() in (OTHERS, "base", "none", ""):
            return None
        if text in self.experts or text in self.extra_adapters:
            return text
        lowered = {n.lower(): n for n in list(self.experts) + list(self.extra_adapters)}
        if text.lower() in lowered:
            return lowered[text.lower()]
        logger.warning(
            "dispatcher chose unknown expert %r; answering with the base model (experts: %s)",
            choice,
            ", ".join(self.experts),
        )
        return None

    @contextlib.contextmanager
    def use(self, adapter: Optional[str]) -> Iterator[None]:
        """Context in which `adapter` (or the base model, for `None`) answers.

        For `None` every adapter layer is disabled (`PeftModel.disable_adapter`), so outputs are bit-identical to the
        unadapted model. The previously active adapter is restored afterwards. The time taken to switch is appended
        to `self.switch_seconds`.
        """
        model = self.model
        previous = model.active_adapter
        if adapter is None:
            start = time.perf_counter()
            with model.disable_adapter():
                self.switch_seconds.append(time.perf_counter() - start)
                yield
            return
        if adapter not in model.peft_config:
            raise ExpertLibraryError(f"unknown adapter {adapter!r}; loaded: {sorted(model.peft_config)}")
        start = time.perf_counter()
        model.set_adapter(adapter, inference_mode=True)
        self.switch_seconds.append(time.perf_counter() - start)
        try:
            yield
        finally:
            if previous != adapter:
                model.set_adapter(previous, inference_mode=True)


def _check_names(names: Sequence[str]) -> None:
    for name in names:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ExpertLibraryError(
                f"expert name {name!r} is not valid: use letters, digits, '_' and '-' only (it becomes an adapter name)"
            )
        if name.lower() in RESERVED_NAMES:
            raise ExpertLibraryError(f"expert name {name!r} is reserved ({sorted(RESERVED_NAMES)}); choose another")
    dupes = sorted({n for n in names if list(names).count(n) > 1})
    if dupes:
        raise ExpertLibraryError(f"expert names must be unique; repeated: {dupes}")


def check_compatible(experts: Sequence[Expert], *, check_base_model: bool = True) -> None:
    """Raise [`ExpertLibraryError`] unless all experts share base model, target modules, SVF mode and rank.

    Args:
        experts (`Sequence[Expert]`): Experts with their `config` filled in.
        check_base_model (`bool`): Compare `base_model_name_or_path` (skipped where it is unset).
    """
    if not experts:
        raise ExpertLibraryError("no experts given")
    ref = experts[0]
    for other in experts[1:]:
        a, b = ref.config, other.config
        if check_base_model:
            ba, bb = getattr(a, "base_model_name_or_path", None), getattr(b, "base_model_name_or_path", None)
            if ba and bb and ba != bb:
                raise ExpertLibraryError(
                    f"experts come from different base models: {ref.name!r} ({ref.source}) from {ba!r}, "
                    f"{other.name!r} ({other.source}) from {bb!r}"
                )
        checks = (
            ("target modules", _normalise_targets(a.target_modules), _normalise_targets(b.target_modules)),
            ("excluded modules", _normalise_targets(a.exclude_modules), _normalise_targets(b.exclude_modules)),
            (
                "layers_to_transform",
                _normalise_targets(a.layers_to_transform),
                _normalise_targets(b.layers_to_transform),
            ),
            ("SVF mode", a.mode, b.mode),
            ("SVF rank", a.rank, b.rank),
        )
        for what, va, vb in checks:
            if va != vb:
                raise ExpertLibraryError(
                    f"experts have different {what}: {ref.name!r} ({ref.source}) has {va!r}, "
                    f"{other.name!r} ({other.source}) has {vb!r}; their z vectors cannot be switched or mixed"
                )


def _load_checked(model: nn.Module, folder: Path, name: str, source: str) -> nn.Module:
    """[`load_adapter`] that refuses an adapter saved from other base weights (PEFT itself only warns)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SVFBaseWeightsWarning)  # raised below instead
        peft_model = load_adapter(model, folder, adapter_name=name, expected_type="SVF")
    mismatch = peft_model.base_model.base_weights_mismatch(name)
    if mismatch:
        if len(peft_model.peft_config) > 1:
            peft_model.delete_adapter(name)
        else:  # the first expert: give the base model back unwrapped
            peft_model.unload()
        raise ExpertLibraryError(f"expert {name!r} ({source}): {mismatch}")
    return peft_model


def _warn_base_mismatch(model: nn.Module, expert: Expert) -> None:
    expected = getattr(expert.config, "base_model_name_or_path", None)
    actual = model.__dict__.get("name_or_path") or getattr(getattr(model, "config", None), "_name_or_path", None)
    if expected and actual and str(expected) != str(actual):
        logger.warning(
            "the experts were trained on %r but the given base model is %r; loading goes on (shapes are checked)",
            expected,
            actual,
        )


def svf_z_snapshot(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """A copy of every `z` of `adapter` (module name → tensor), for tests and comparisons."""
    return {n: m.svf_z[adapter].detach().clone() for n, m in model.base_model.svf_layers() if adapter in m.svf_z}
