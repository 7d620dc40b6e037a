"""Profiles are configuration files, not code paths (open_clip style).

``captioning/configs/<family>/<profile>.yaml`` holds every size and hyper-parameter of one model family
in one profile (``paper`` or ``tiny``). ``load_config`` reads one, checks it against the family's typed
schema (``captioning.config_schema``: unknown keys and wrong types are a ``ConfigError`` naming the file
and the dotted key), applies ``key.sub=value`` overrides (checked the same way, errors naming the
override) and returns the typed config. ``config.to_dict()`` is the plain dict stored verbatim in the
published manifest, so a model can be rebuilt from its manifest alone; ``validate_manifest_config`` reads
such a dict back into the typed config.
"""

from __future__ import annotations

import copy
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from captioning.config_schema import FAMILIES, TASK_FAMILY, AnyConfig, Section
from captioning.errors import ConfigError, StoreError

S = TypeVar("S", bound=Section)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PROFILES = ("paper", "tiny")


def config_path(family: str, profile: str) -> Path:
    return CONFIG_DIR / family / f"{profile}.yaml"


def available_profiles(family: str) -> list[str]:
    folder = CONFIG_DIR / family
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def schema_for(family: str) -> type[Section]:
    try:
        return FAMILIES[family]
    except KeyError:
        raise ConfigError(f"no config family {family!r} (known: {', '.join(FAMILIES)})") from None


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


# ---------------------------------------------------------------------------------------------- schema walk
def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The config model an annotation holds (``X``, ``X | None``, ``Annotated[X, ...]``), or None for a leaf."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _section_type(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _section_type(arg)
            if found is not None:
                return found
    return None


def _model_at(schema: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The config model at a dotted location (list indices skipped), or None when it is not a section."""
    model: type[BaseModel] | None = schema
    for part in loc:
        if model is None:
            return None
        if not isinstance(part, str):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = _section_type(field.annotation)
    return model


def _dotted(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) if loc else "(top level)"


def _describe(schema: type[BaseModel], error: dict[str, Any]) -> str:
    loc = tuple(error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = _model_at(schema, loc[:-1])
        return f"{_dotted(loc)}: {_unknown(str(loc[-1]), list(parent.model_fields) if parent is not None else [])}"
    if kind == "missing":
        return f"{_dotted(loc)}: missing key"
    message = error["msg"].removeprefix("Value error, ")
    value = error.get("input")
    return f"{_dotted(loc)}: {message}" + ("" if isinstance(value, dict) else f" (got {value!r})")


def _unknown(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"unknown key ({hint}known: {', '.join(known)})"


def _errors(exc: ValidationError) -> list[dict[str, Any]]:
    """Unknown keys first: a misspelt key also leaves the right one missing, the misspelling is the news."""
    return sorted(exc.errors(), key=lambda err: err["type"] != "extra_forbidden")


def _validate(schema: type[Section], data: dict[str, Any], where: str) -> Section:
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        lines = [f"{where}: {_describe(schema, err)}" for err in _errors(exc)]
        raise ConfigError("\n".join(lines)) from None


def _display(path: Path) -> str:
    """A config file's name as the user knows it: relative to the working directory when inside it."""
    try:
        return os.path.relpath(path) if Path(path).resolve().is_relative_to(Path.cwd()) else str(path)
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------- overrides
def apply_overrides(
    config: dict[str, Any], overrides: list[str] | None, schema: type[BaseModel] | None = None
) -> dict[str, Any]:
    """A copy of ``config`` with each ``key.sub=value`` applied.

    With a ``schema`` the key must be one of its fields (a section the file left out, one with defaults,
    is created); without one, it must already be in ``config``.
    """
    config = copy.deepcopy(config)
    for item in overrides or []:
        keys, value = parse_override(item)
        node, model = config, schema
        for depth, key in enumerate(keys):
            path = ".".join(keys[: depth + 1])
            if model is not None:
                if key not in model.model_fields:
                    raise ConfigError(f"override {item!r}: {path}: {_unknown(key, list(model.model_fields))}")
                model = _section_type(model.model_fields[key].annotation)
            elif key not in node and depth == len(keys) - 1:
                raise ConfigError(f"override {item!r}: unknown key {path}")
            if depth == len(keys) - 1:
                node[key] = value
                break
            child = node.get(key)
            if child is None and model is not None:
                child = node[key] = {}
            if not isinstance(child, dict) or (schema is not None and model is None):
                raise ConfigError(f"override {item!r}: {path} is not a section of the config")
            node = child
    return config


def _override_errors(schema: type[Section], data: dict[str, Any], overrides: list[str]) -> Section:
    """Validate after overrides (the file alone was valid, so every error is an override's); each error names
    the override(s) whose key shares the longest leading part with the key the error is about."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        parsed = [(item, tuple(parse_override(item)[0])) for item in overrides]
        lines = []
        for err in _errors(exc):
            loc = tuple(p for p in err["loc"] if isinstance(p, str))
            shared = {item: _common(loc, keys) for item, keys in parsed}
            best = max(shared.values())
            culprits = [item for item, n in shared.items() if n == best]
            lines.append(f"{', '.join(f'override {c!r}' for c in culprits)}: {_describe(schema, err)}")
        raise ConfigError("\n".join(lines)) from None


def _common(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# ---------------------------------------------------------------------------------------------- loading
def load_config(
    family: str,
    profile: str = "tiny",
    *,
    path: str | Path | None = None,
    overrides: list[str] | None = None,
) -> AnyConfig:
    """Load ``configs/<family>/<profile>.yaml`` (or an explicit ``path``), check it, apply overrides.

    Returns the family's typed config (``captioning.config_schema``), with ``profile`` and ``family`` set.
    The file alone must be valid (its errors name the file); overrides are checked against the same schema
    (their errors name the override).
    """
    schema = schema_for(family)
    if path is None:
        path = config_path(family, profile)
        if not path.is_file():
            known = ", ".join(available_profiles(family)) or "none"
            raise ConfigError(f"no profile {profile!r} for {family!r} (known: {known}); expected {path}")
    path = Path(path)
    data = read_yaml(path)
    declared = data.get("profile")
    if declared is not None and declared != profile:
        raise ConfigError(f"{path}: declares profile {declared!r} but {profile!r} was requested")
    if "family" in data and data["family"] != family:
        raise ConfigError(f"{path}: declares family {data['family']!r} but {family!r} was requested")
    data["profile"] = profile
    data["family"] = family
    config = _validate(schema, data, _display(path))
    if not overrides:
        return config
    return _override_errors(schema, apply_overrides(config.to_dict(), overrides, schema), overrides)


def family_of_task(task: str) -> str:
    try:
        return TASK_FAMILY[task]
    except KeyError:
        raise ConfigError(f"no config family for task {task!r} (known: {', '.join(TASK_FAMILY)})") from None


def validate_manifest_config(config: dict[str, Any], *, task: str, where: str = "manifest") -> AnyConfig:
    """A published manifest's ``config`` dict -> the typed config of its task's family.

    The same strict schema as the YAML files: every manifest in the embedded model store validates as
    stored (tests/test_config_schema.py); older manifests that lack keys added since read them with the
    defaults the code has always used for them.
    """
    family = family_of_task(task)
    if config.get("family", family) != family:
        raise ConfigError(f"{where}: config.family is {config.get('family')!r}, task {task!r} is {family!r}")
    return _validate(schema_for(family), {**config, "family": family}, where)


def manifest_config(version: Any, family: type[S]) -> S:
    """The typed config of a published version (``version.manifest["config"]`` read by
    ``validate_manifest_config`` for its task), which must be a ``family`` config: what the runtimes build their
    models from. A manifest whose config is missing or does not fit the schema is a ``StoreError`` naming it."""
    spec = f"{version.name}@{version.version}"
    config = version.manifest.get("config")
    if not isinstance(config, dict):
        raise StoreError(f"{spec}: its manifest has no config")
    task = str(version.manifest.get("task") or version.name)
    try:
        typed = validate_manifest_config(config, task=task, where=f"{spec}: manifest config")
    except ConfigError as exc:
        raise StoreError(str(exc)) from None
    if not isinstance(typed, family):
        raise StoreError(f"{spec}: its manifest config is a {typed.family!r} config, this needs {family.__name__}")
    return typed


def config_dict(config: Section | dict[str, Any]) -> dict[str, Any]:
    """The plain dict of a typed config (what a manifest stores); a dict is returned as a copy."""
    return config.to_dict() if isinstance(config, Section) else copy.deepcopy(dict(config))
