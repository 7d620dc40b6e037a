"""Profiles are configuration files, not code paths (open_clip style).

``captioning/configs/<family>/<profile>.yaml`` holds every size and hyper-parameter of one model family
in one profile (``paper`` or ``tiny``). ``load_config`` reads one, applies ``key.sub=value`` overrides,
and returns a plain dict that is stored verbatim in the published manifest, so a model can be rebuilt
from its manifest alone.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from captioning.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PROFILES = ("paper", "tiny")


def config_path(family: str, profile: str) -> Path:
    return CONFIG_DIR / family / f"{profile}.yaml"


def available_profiles(family: str) -> list[str]:
    folder = CONFIG_DIR / family
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"captioner.epochs=3"`` -> (["captioner", "epochs"], 3); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from exc
    return keys, value


def apply_overrides(config: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    config = copy.deepcopy(config)
    for item in overrides or []:
        keys, value = parse_override(item)
        node = config
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {item!r}: {'.'.join(keys[: depth + 1])} is not a section of the config"
                )
            node = child
        if keys[-1] not in node:
            raise ConfigError(f"override {item!r}: unknown key {'.'.join(keys)}")
        node[keys[-1]] = value
    return config


def load_config(
    family: str,
    profile: str = "tiny",
    *,
    path: str | Path | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Load ``configs/<family>/<profile>.yaml`` (or an explicit ``path``) and apply overrides.

    The returned dict always carries ``profile`` and ``family``.
    """
    if path is None:
        path = config_path(family, profile)
        if not path.is_file():
            known = ", ".join(available_profiles(family)) or "none"
            raise ConfigError(f"no profile {profile!r} for {family!r} (known: {known}); expected {path}")
    config = read_yaml(Path(path))
    declared = config.get("profile")
    if declared is not None and declared != profile:
        raise ConfigError(f"{path}: declares profile {declared!r} but {profile!r} was requested")
    config["profile"] = profile
    config["family"] = family
    return apply_overrides(config, overrides)
