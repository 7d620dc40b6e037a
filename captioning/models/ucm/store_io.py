"""Weights files and prerequisites of the UCM stages.

* ``save_weights`` / ``load_into``: a module's weights as safetensors (``captioning.weights``: fp16 for the
  tiny profile's published weights, loaded back to fp32 for compute);
* ``prerequisite``: the store version a stage builds on (``--text-ae ucm-text-ae@3``, or by default the newest
  of that name in the same profile); a missing one raises ``PrerequisiteError`` naming the stage to run;
* ``check_architecture``: a prerequisite built with other sizes than this run's config is a ``ConfigError``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from captioning.errors import ConfigError, PrerequisiteError, StoreError
from captioning.weights import load_into, save_state

if TYPE_CHECKING:  # pragma: no cover
    from captioning.config_schema import UCMConfig
    from captioning.store import ModelStore, ModelVersion

__all__ = ["VOCAB", "WEIGHTS", "check_architecture", "load_into", "parent_record", "prerequisite", "save_weights"]

WEIGHTS = "model.safetensors"
VOCAB = "vocab.json"

# the config keys that fix a model's shapes, per section
ARCHITECTURE_KEYS = {
    "text": ("embed_dim", "hidden_dim", "num_layers"),
    "image": ("block", "layers", "stages", "input_size"),
}


def save_weights(module: torch.nn.Module, path: str | Path, dtype: str = "float32") -> Path:
    """The module's state dict as safetensors, floating tensors cast to ``dtype`` (``captioning.weights``)."""
    return save_state(module.state_dict(), path, dtype)


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


def check_architecture(version: ModelVersion, config: UCMConfig, section: str) -> None:
    """The prerequisite's ``section`` sizes must be this run's (the weights would not fit otherwise)."""
    ours = getattr(config, section)
    fields = type(ours).model_fields
    theirs = (version.manifest.get("config") or {}).get(section) or {}
    diffs = []
    for key in ARCHITECTURE_KEYS[section]:
        there = theirs.get(key, fields[key].get_default(call_default_factory=True))
        here = getattr(ours, key)
        if there != here:
            diffs.append(f"{section}.{key}: {there!r} there, {here!r} here")
    if diffs:
        raise ConfigError(
            f"{version.name}@{version.version} was built with other sizes than this run's config "
            f"({'; '.join(diffs)}); use the same profile/config or retrain {version.name}"
        )


def parent_record(version: ModelVersion) -> dict[str, Any]:
    return {"name": version.name, "version": version.version}
