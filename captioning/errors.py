"""Errors whose message is meant for a user: the CLI prints them without a traceback and the
service maps them to problem+json answers. Every message names what was wrong (file, field, record)."""

from __future__ import annotations


class CaptionerError(Exception):
    """Base class for expected, user-facing errors."""


class UsageError(CaptionerError):
    """Wrong command-line usage or arguments."""


class ConfigError(CaptionerError):
    """A profile/config file is missing, malformed or inconsistent."""


class DataError(CaptionerError):
    """A dataset file or record is missing or malformed."""

    def __init__(self, message: str, *, path: object = None, record: object = None):
        where = []
        if path is not None:
            where.append(str(path))
        if record is not None:
            where.append(f"record {record}")
        super().__init__(f"{': '.join(where)}: {message}" if where else message)
        self.path = path
        self.record = record


class StoreError(CaptionerError):
    """The model store is missing a model/version/alias, or a version failed verification."""


class PrerequisiteError(StoreError):
    """A training stage needs a model that is not (yet) in the store, or was trained in another profile."""


class SceneError(CaptionerError):
    """A scene (GeoTIFF / raster) cannot be read or processed, or a scene job's folder does not fit it.
    The message names the file and what is wrong with it (not a raster, no bands to read, ...)."""

    def __init__(self, message: str, *, path: object = None):
        super().__init__(f"{path}: {message}" if path is not None else message)
        self.path = path
