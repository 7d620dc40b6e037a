"""Weights files: state dicts as safetensors, in a chosen floating dtype, read back in float32.

* ``save_state(state, path, dtype)``: floating tensors cast to ``dtype`` (``float16`` / ``bfloat16`` /
  ``float32``: a config's ``weights_dtype``), every other tensor (ids, counters, masks) kept as it is;
* ``load_state(path, prefix="")``: the file's tensors with floating ones back in float32 (for compute);
  with ``prefix``, only those keys, the prefix removed;
* ``load_into(module, path, prefix="", strict=True)``: ``load_state`` + ``module.load_state_dict``.

A missing, unreadable or unfitting file is a ``StoreError`` naming the file; an unknown dtype a
``ConfigError``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from captioning.errors import ConfigError, StoreError

DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def torch_dtype(name: str) -> torch.dtype:
    """``"float16"`` -> ``torch.float16`` (only the three weights dtypes)."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"weights_dtype must be one of {', '.join(DTYPES)}, got {name!r}") from None


def save_state(state: Mapping[str, torch.Tensor], path: str | Path, dtype: str = "float32") -> Path:
    """Write ``state`` to ``path`` as safetensors, floating tensors cast to ``dtype``; returns ``path``."""
    from safetensors.torch import save_file

    target = torch_dtype(dtype)
    path = Path(path)
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise StoreError(f"{path}: {key!r} is a {type(value).__name__}, not a tensor")
        value = value.detach()
        out[key] = (value.to(target) if value.is_floating_point() else value).contiguous().cpu()
    try:
        save_file(out, str(path))
    except (OSError, RuntimeError, ValueError) as exc:
        raise StoreError(f"{path}: cannot write weights ({exc})") from exc
    return path


def load_state(path: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """A safetensors file as a state dict, floating tensors in float32; ``prefix`` selects (and strips) keys."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        state = load_file(str(path))
    except FileNotFoundError:
        raise StoreError(f"{path}: weights file missing") from None
    except Exception as exc:  # noqa: BLE001 - a corrupt file is a store problem with its name
        raise StoreError(f"{path}: not a readable safetensors file ({exc})") from None
    out = {}
    for key, value in state.items():
        if prefix and not key.startswith(prefix):
            continue
        out[key[len(prefix) :]] = value.float() if value.is_floating_point() else value
    if prefix and not out:
        raise StoreError(f"{path}: no weights under {prefix!r}")
    return out


def load_into(module: torch.nn.Module, path: str | Path, prefix: str = "", strict: bool = True) -> None:
    """Load a weights file (or its ``prefix`` part) into ``module``; shapes or names that do not fit are a
    ``StoreError`` naming the file."""
    state = load_state(path, prefix)
    where = f" under {prefix!r}" if prefix else ""
    try:
        result = module.load_state_dict(state, strict=strict)
    except RuntimeError as exc:
        raise StoreError(f"{path}: weights{where} do not fit the model: {exc}") from None
    if not strict and result.unexpected_keys:
        raise StoreError(f"{path}: unexpected weights {result.unexpected_keys[:3]}")
