"""Weights files and prerequisites of the UCM stages.

* ``save_weights`` / ``load_state``: safetensors files (fp16 for the tiny profile's published weights,
  loaded back to fp32 for compute);
* ``prerequisite``: the store version a stage builds on (``--text-ae ucm-text-ae@3``, or by default the newest
  of that name in the same profile); a missing one raises ``PrerequisiteError`` naming the stage to run;
* ``check_architecture``: a prerequisite built with other sizes than this run's config is a ``ConfigError``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from captioning.errors import ConfigError, PrerequisiteError, StoreError

if TYPE_CHECKING:  # pragma: no cover
    from captioning.store import ModelStore, ModelVersion

WEIGHTS = "model.safetensors"
VOCAB = "vocab.json"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# the config keys that fix a model's shapes, per section
ARCHITECTURE_KEYS = {
    "text": ("embed_dim", "hidden_dim", "num_layers"),
    "image": ("block", "layers", "stages", "input_size"),
}


def save_weights(module: torch.nn.Module, path: str | Path, dtype: str = "float32") -> Path:
    """The module's state dict as safetensors, floating tensors cast to ``dtype``."""
    if dtype not in DTYPES:
        raise ConfigError(f"weights_dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    target = DTYPES[dtype]
    state = {
        key: (value.detach().to(target) if value.is_floating_point() else value.detach()).contiguous().cpu()
        for key, value in module.state_dict().items()
    }
    path = Path(path)
    save_file(state, str(path))
    return path


def load_state(path: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """A safetensors file as fp32 tensors; with ``prefix``, only those keys, prefix removed."""
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
    state = load_state(path, prefix)
    try:
        result = module.load_state_dict(state, strict=strict)
    except RuntimeError as exc:
        raise StoreError(f"{path}: weights{' under ' + repr(prefix) if prefix else ''} do not fit the model: {exc}") from None
    if not strict and result.unexpected_keys:
        raise StoreError(f"{path}: unexpected weights {result.unexpected_keys[:3]}")


def prerequisite(
    store: ModelStore, name: str, spec: str | None, profile: str, stage: str
) -> ModelVersion:
    """The version a stage builds on: ``spec`` when given, else the newest ``name`` of ``profile``."""
    if spec:
        try:
            version = store.load(spec, verify=True)
        except PrerequisiteError:
            raise
        except StoreError as exc:
            raise PrerequisiteError(
                f"{exc} -- train it with `captioner train {stage} --data DIR --profile {profile}`"
            ) from None
        if version.name != name:
            raise PrerequisiteError(f"{spec} is a {version.name} model, this needs {name}")
        if version.profile != profile:
            raise PrerequisiteError(
                f"{version.name}@{version.version} was trained in profile {version.profile!r}, this run is "
                f"{profile!r}: use --profile {version.profile}, or train {name} in {profile!r} "
                f"(`captioner train {stage} --data DIR --profile {profile}`)"
            )
        return version
    version = store.latest(name, profile)
    if version is None:
        raise PrerequisiteError(
            f"no {name} model of profile {profile!r} in the store {store.root}; "
            f"run `captioner train {stage} --data DIR --profile {profile}` first"
        )
    return store.load(f"{version.name}@{version.version}", verify=True)


def check_architecture(version: ModelVersion, config: dict[str, Any], section: str) -> None:
    """The prerequisite's ``section`` sizes must be this run's (the weights would not fit otherwise)."""
    theirs = (version.manifest.get("config") or {}).get(section) or {}
    ours = config.get(section) or {}
    diffs = [
        f"{section}.{key}: {theirs.get(key)!r} there, {ours.get(key)!r} here"
        for key in ARCHITECTURE_KEYS[section]
        if theirs.get(key) != ours.get(key)
    ]
    if diffs:
        raise ConfigError(
            f"{version.name}@{version.version} was built with other sizes than this run's config "
            f"({'; '.join(diffs)}); use the same profile/config or retrain {version.name}"
        )


def parent_record(version: ModelVersion) -> dict[str, Any]:
    return {"name": version.name, "version": version.version}
