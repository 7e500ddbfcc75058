"""Checked loading of saved adapters: safetensors only, with errors that say what is wrong.

`PeftModel.from_pretrained` works for every method of this package once `peft_spectral` is imported. The
functions here add the checks a user wants before touching a model: the directory holds an
`adapter_config.json` of the expected PEFT type and an `adapter_model.safetensors` whose header is readable and whose
tensors are finite. They never fall back to pickled `adapter_model.bin` files.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
from peft import PeftConfig, PeftModel, get_peft_model_state_dict
from safetensors import SafetensorError, safe_open


logger = logging.getLogger(__name__)


SAFETENSORS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"


class AdapterLoadError(ValueError):
    """A saved adapter cannot be loaded: missing, corrupt, foreign or not matching the model."""


def _local_dir(path_or_id: Union[str, os.PathLike], **hub_kwargs) -> Path:
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise AdapterLoadError(f"adapter path {str(path)!r} is a file; pass the directory holding {CONFIG_NAME}")
    try:  # a Hub id: download only the two files we accept
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                str(path_or_id), allow_patterns=[CONFIG_NAME, SAFETENSORS_NAME, "README.md"], **hub_kwargs
            )
        )
    except Exception as err:
        raise AdapterLoadError(
            f"adapter {str(path_or_id)!r} is neither a local directory nor a reachable Hub repo: {err}"
        ) from err


def validate_adapter_dir(
    path_or_id: Union[str, os.PathLike], expected_type: Optional[str] = None, **hub_kwargs
) -> tuple[Path, PeftConfig]:
    """Check a saved adapter and return its directory and config.

    Args:
        path_or_id (`str` or `PathLike`): Local directory or Hub repo id.
        expected_type (`str`, *optional*): Required PEFT type, e.g. `"SVF"`.

    Raises:
        [`AdapterLoadError`]: with the reason (no config, another PEFT type, no safetensors file, pickled weights only,
            unreadable or truncated safetensors, non-finite values).
    """
    import peft_spectral  # noqa: F401 - registers the PEFT types before the config is parsed

    folder = _local_dir(path_or_id, **hub_kwargs)
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise AdapterLoadError(f"{folder} holds no {CONFIG_NAME}: it is not a PEFT adapter directory")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise AdapterLoadError(f"{config_file} is not valid JSON: {err}") from err
    peft_type = raw.get("peft_type")
    if expected_type is not None and peft_type != expected_type:
        raise AdapterLoadError(f"{folder} holds a {peft_type!r} adapter, expected a {expected_type!r} adapter")
    weights = folder / SAFETENSORS_NAME
    if not weights.is_file():
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        hint = f" (found pickled {pickled}; only safetensors are loaded)" if pickled else ""
        raise AdapterLoadError(f"{folder} holds no {SAFETENSORS_NAME}{hint}")
    try:
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    raise AdapterLoadError(f"{weights}: tensor {key!r} has non-finite values")
    except SafetensorError as err:
        raise AdapterLoadError(f"{weights} is corrupt or truncated ({err})") from err
    try:
        config = PeftConfig.from_pretrained(str(folder))
    except (KeyError, TypeError, ValueError) as err:
        raise AdapterLoadError(f"{config_file} is not a config PEFT understands: {err}") from err
    return folder, config


def load_adapter(
    model: torch.nn.Module,
    path_or_id: Union[str, os.PathLike],
    *,
    adapter_name: str = "default",
    expected_type: Optional[str] = None,
    is_trainable: bool = False,
    **hub_kwargs,
) -> PeftModel:
    """Validate a saved adapter, then load it onto `model` (a base model or a `PeftModel`).

    Stricter than `PeftModel.from_pretrained`: an adapter file that lacks tensors of modules its config targets in
    `model` (PEFT warns "Found missing adapter keys" and leaves those layers at their initial values, the identity for
    SVF) is refused, and every error of the load is an [`AdapterLoadError`] naming the directory. On an error the
    adapter is removed again (from a `PeftModel`) or the base model is unwrapped.

    Args:
        model (`torch.nn.Module`): The base model, or a `PeftModel` to add the adapter to.
        path_or_id (`str` or `PathLike`): Local directory or Hub repo id.
        adapter_name (`str`): Name given to the loaded adapter.
        expected_type (`str`, *optional*): Required PEFT type, e.g. `"SVF"`.
        is_trainable (`bool`): Load for further training.

    Returns:
        `PeftModel`: the model with the adapter loaded (and active when `model` was a base model).

    Raises:
        [`AdapterLoadError`]: the directory does not validate (see [`validate_adapter_dir`]), the file lacks tensors,
            or PEFT or the tuner refuses it (shapes, values out of range, ...).
    """
    folder, _ = validate_adapter_dir(path_or_id, expected_type, **hub_kwargs)
    with safe_open(str(folder / SAFETENSORS_NAME), framework="pt") as f:
        saved = set(f.keys())
    added = isinstance(model, PeftModel)
    if added and adapter_name in model.peft_config:
        raise AdapterLoadError(f"the model holds an adapter named {adapter_name!r} already; pick another adapter_name")
    peft_model = model if added else None
    try:
        with warnings.catch_warnings():
            # reported below as an error, with the modules named
            warnings.filterwarnings("ignore", message="Found missing adapter keys", category=UserWarning)
            if added:
                model.load_adapter(
                    str(folder), adapter_name=adapter_name, is_trainable=is_trainable, use_safetensors=True
                )
            else:
                peft_model = PeftModel.from_pretrained(
                    model, str(folder), adapter_name=adapter_name, is_trainable=is_trainable, use_safetensors=True
                )
        # save_embedding_layers=False: "auto" looks the base model up on the Hub (a warning per load offline)
        expected = get_peft_model_state_dict(peft_model, adapter_name=adapter_name, save_embedding_layers=False)
        missing = sorted(set(expected) - saved)
        if missing:
            modules = sorted({k.removeprefix("base_model.model.").rsplit(".", 1)[0] for k in missing})
            raise AdapterLoadError(
                f"{folder / SAFETENSORS_NAME} lacks {len(missing)} tensor(s) of the modules its config targets in this "
                f"model, e.g. {modules[:3]}: those layers would stay at their initial values; re-save the adapter"
            )
    except (AdapterLoadError, ValueError, RuntimeError, KeyError, TypeError) as err:
        _undo_load(model, peft_model, adapter_name, added)
        if isinstance(err, AdapterLoadError):
            raise
        raise AdapterLoadError(f"adapter {folder} cannot be loaded onto this model: {err}") from err
    return peft_model


def _undo_load(model, peft_model, adapter_name: str, added: bool) -> None:
    """Best effort: take a half-loaded adapter out again (PEFT injects the layers before it loads the tensors)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    try:
        if added:
            if adapter_name in model.peft_config:
                model.delete_adapter(adapter_name)
        elif peft_model is not None:
            peft_model.unload()
        else:  # `PeftModel.from_pretrained` failed after wrapping the base model's layers in place
            for name, module in list(model.named_modules()):
                if isinstance(module, BaseTunerLayer) and name:
                    parent, _, child = name.rpartition(".")
                    setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
            model.__dict__.pop("peft_config", None)
    except Exception as err:  # the original error matters more
        logger.debug("could not undo the failed load of adapter %r: %s", adapter_name, err)
