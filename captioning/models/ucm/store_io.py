"""Weights files and prerequisites of the UCM stages.

* ``prerequisite``: the store version a stage builds on (``--text-ae ucm-text-ae@3``, or by default the newest
  of that name in the same profile); a missing one raises ``PrerequisiteError`` naming the stage to run;
* ``check_architecture``: a prerequisite built with other sizes than this run's config is a ``ConfigError``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from captioning.errors import ConfigError, PrerequisiteError, StoreError

if TYPE_CHECKING:  # pragma: no cover
    from captioning.config_schema import UCMConfig
    from captioning.store import ModelStore, ModelVersion

__all__ = ["VOCAB", "WEIGHTS", "check_architecture", "parent_record", "prerequisite"]

WEIGHTS = "model.safetensors"
VOCAB = "vocab.json"

# the config keys that fix a model's shapes, per section
ARCHITECTURE_KEYS = {
    "text": ("embed_dim", "hidden_dim", "num_layers"),
    "image": ("block", "layers", "stages", "input_size"),
}


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
    from captioning.config import manifest_config
    from captioning.config_schema import UCMConfig

    ours = getattr(config, section)
    theirs = getattr(manifest_config(version, UCMConfig), section)  # keys it lacks read the schema's defaults
    diffs = []
    for key in ARCHITECTURE_KEYS[section]:
        there = getattr(theirs, key)
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
