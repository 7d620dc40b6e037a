"""The model store: versioned, hash-verified models that training publishes and the service loads.

Layout (Triton-like folders, MLflow-like aliases)::

    <root>/<name>/<version>/manifest.json   what the version is (see ``publish``) and every file's sha256 + size
    <root>/<name>/<version>/...             the version's files (weights, vocab, loss curve ...)
    <root>/<name>/aliases.json              {"aliases": {"production": 3, "candidate": 4}, "history": {...}}
    <root>/.store.lock                      the writers' lock (filelock); readers never touch it
    <root>/.staging/                        publishes in progress and leftovers of crashed ones

Versions are increasing integers and immutable. Readers only look at folders whose name is a version
number, so whatever a crashed writer left behind (``.staging/*``, ``.aliases.json.*.tmp``) is invisible
to them; ``gc`` removes it.

Atomic publish: the files are copied and hashed into ``.staging/<name>-<id>/`` (same filesystem as the
versions), re-hashed from the copy, then -- holding the store lock -- the next version number is taken,
``manifest.json`` is written and read back, and the folder is renamed to ``<name>/<version>``. A crash at
any point before the rename leaves no visible version; the rename itself is atomic.

``aliases.json`` is replaced atomically (temporary file + ``os.replace``), so a reader sees the old or the
new file, never half of one. It also keeps, per alias, the versions it pointed at before (``rollback``).

Reading (``list``, ``resolve``, ``latest``, ``load``, ``verify``) needs no write access and takes no lock,
so a read-only store (a ConfigMap, an image layer, a read-only volume) serves fine.

Hashes are not cached: every ``load(verify=True)`` re-reads every file. A cache keyed by
(path, size, mtime) would miss a same-size corruption with a restored mtime (``touch -r``, ``rsync -t``)
and a bit flipped on the medium, which is exactly what verification is for. Hashing runs at disk/page-cache
speed (see docs/store.md for the figure), which is small next to building a model.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PurePosixPath
from typing import Any

from filelock import FileLock, Timeout
from pydantic import ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

import captioning
from captioning.errors import StoreError

EMBEDDED_PACKAGE = "captioner_models"  # the wheel's copy of the repository's model_store/ (pyproject.toml)


def embedded_root() -> Path:
    """The embedded default store: a checkout's (or editable install's) ``model_store/`` next to the
    ``captioning`` package; else, installed from a wheel, the ``captioner_models`` data package. Only
    located here (never imported): the store's readers look at model-name folders and version numbers,
    so nothing Python leaves in it (``__init__.py``, ``__pycache__``) is mistaken for a model."""
    checkout = Path(captioning.__file__).resolve().parents[1] / "model_store"
    if checkout.is_dir():
        return checkout
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if locations:
        return Path(locations[0]).resolve()
    return checkout  # neither: the "does not exist" error names the path a checkout would have


DEFAULT_ROOT = embedded_root()
MANIFEST = "manifest.json"
ALIASES = "aliases.json"
STAGING = ".staging"
LOCK = ".store.lock"
FORMAT = 1  # manifest / aliases layout version
PRODUCTION = "production"
LATEST = "latest"
HISTORY_LIMIT = 20  # previous versions remembered per alias (for rollback)
LOCK_TIMEOUT_S = 600.0
_CHUNK = 1 << 20

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class StoreSettings(BaseSettings):
    """Where the model store lives: ``CAPTIONER_MODEL_STORE`` (default: the embedded store, the repository's
    ``model_store/``, or in a wheel install its copy, the ``captioner_models`` package: :func:`embedded_root`)."""

    model_config = SettingsConfigDict(env_prefix="CAPTIONER_", extra="ignore", protected_namespaces=())

    model_store: Path = DEFAULT_ROOT

    @field_validator("model_store", mode="before")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            raise ValueError("must name a folder, got an empty string")
        return value


def default_root() -> Path:
    try:
        return StoreSettings().model_store.expanduser()
    except ValidationError as exc:
        raise StoreError(f"CAPTIONER_MODEL_STORE: {exc.errors()[0]['msg']}") from exc


# ---------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class ModelVersion:
    """One published version. ``manifest`` is the parsed manifest.json; ``error`` is set (and ``manifest``
    empty) only for versions that ``ModelStore.list`` found unreadable."""

    name: str
    version: int
    path: Path
    manifest: dict[str, Any]
    error: str | None = None

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def task(self) -> str | None:
        return self.manifest.get("task")

    @property
    def profile(self) -> str | None:
        return self.manifest.get("profile")

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.manifest.get("files", {})

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics", {})

    @property
    def size(self) -> int:
        return sum(int(f["size"]) for f in self.files.values())

    def file(self, relpath: str | PurePath) -> Path:
        """The path of one of the version's files; a StoreError if the manifest does not list it."""
        key = PurePosixPath(str(relpath).replace(os.sep, "/")).as_posix()
        if key not in self.files:
            listed = ", ".join(sorted(self.files)) or "none"
            raise StoreError(f"{self.spec}: no file {key!r} in its manifest (files: {listed})")
        return self.path / key

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "version": self.version, "path": str(self.path), "manifest": self.manifest}
        if self.error:
            out["error"] = self.error
        return out


@dataclass(frozen=True)
class Finding:
    """One thing ``verify`` found wrong; ``str()`` names the model, version and file."""

    name: str
    version: int | None
    message: str
    path: str | None = None

    def __str__(self) -> str:
        where = self.name if self.version is None else f"{self.name}@{self.version}"
        return f"{where}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "message": self.message, "path": self.path}


@dataclass
class GcReport:
    removed: list[str] = field(default_factory=list)  # "name@version"
    kept: list[str] = field(default_factory=list)
    removed_temp: list[str] = field(default_factory=list)  # paths of stale staging/temp leftovers
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"removed": self.removed, "kept": self.kept, "removed_temp": self.removed_temp, "dry_run": self.dry_run}


# ---------------------------------------------------------------------------------------------- helpers
def check_name(value: str, what: str = "model name") -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise StoreError(
            f"invalid {what} {value!r}: use letters, digits, '.', '_' or '-' (at most 128), "
            "starting with a letter or digit (no path separators, no leading dot)"
        )
    return value


def check_alias(alias: str) -> str:
    check_name(alias, "alias")
    if alias.isdigit() or alias == LATEST:
        raise StoreError(f"invalid alias {alias!r}: numbers and {LATEST!r} are version references, not aliases")
    return alias


def parse_spec(spec: str) -> tuple[str, str]:
    """``"name"`` -> (name, "production"); ``"name@3"`` -> (name, "3"); ``"name@candidate"`` -> (name, "candidate")."""
    if not isinstance(spec, str) or not spec:
        raise StoreError(f"invalid model reference {spec!r}: expected NAME, NAME@VERSION or NAME@ALIAS")
    name, sep, ref = spec.partition("@")
    if sep and not ref:
        raise StoreError(f"invalid model reference {spec!r}: nothing after '@'")
    check_name(name)
    ref = ref or PRODUCTION
    if not ref.isdigit():
        check_name(ref, f"alias in {spec!r}")
    return name, ref


def _is_version_dirname(entry: str) -> bool:
    return entry.isdigit() and entry == str(int(entry)) and int(entry) > 0


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _canonical(manifest: dict[str, Any]) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its ``digest`` field: an edited manifest shows."""
    return hashlib.sha256(_canonical(manifest)).hexdigest()


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def to_json(value: Any, where: str) -> Any:
    """``value`` as plain JSON data (Paths -> str, numpy/torch scalars -> numbers, tuples -> lists,
    non-finite floats -> null); anything else is a StoreError naming ``where`` (e.g. ``metrics.bleu``)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise StoreError(f"{where}: key {key!r} is a {type(key).__name__}, JSON keys must be strings")
            out[str(key)] = to_json(item, f"{where}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [to_json(item, f"{where}[{i}]") for i, item in enumerate(value)]
    shape = getattr(value, "shape", None)
    if hasattr(value, "item") and shape is not None and tuple(shape) == ():  # numpy / torch scalar
        return to_json(value.item(), where)
    raise StoreError(f"{where}: a {type(value).__name__} cannot be stored in a manifest (not JSON)")


def _write_json_atomic(path: Path, data: Any) -> None:
    """Write ``path`` so that readers see the old file or the new one, never a partial one."""
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, allow_nan=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def code_revision() -> str:
    """The git commit of the repository the code runs from (``+dirty`` with uncommitted tracked changes),
    else ``captioner <package version>``."""
    repo = Path(captioning.__file__).resolve().parents[1]
    if (repo / ".git").exists():
        env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # never take index.lock from a shared checkout
        try:
            sha = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=repo, env=env, capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=repo, env=env, capture_output=True, text=True, timeout=30, check=True,
            ).stdout.strip()
            if sha:
                return sha + ("+dirty" if dirty else "")
        except (OSError, subprocess.SubprocessError):
            pass
    return f"captioner {captioning.__version__}"


# ---------------------------------------------------------------------------------------------- the store
class ModelStore:
    """A model store rooted at ``root`` (default: the ``CAPTIONER_MODEL_STORE`` setting)."""

    def __init__(self, root: str | os.PathLike[str] | None = None):
        self.root = Path(root).expanduser() if root is not None else default_root()

    def __repr__(self) -> str:
        return f"ModelStore({str(self.root)!r})"

    # ------------------------------------------------------------------ reading (no writes, no locks)
    def _require_root(self) -> None:
        if not self.root.is_dir():
            raise StoreError(f"model store {self.root} does not exist (set CAPTIONER_MODEL_STORE or --store)")

    def models(self) -> list[str]:
        """Names of the models with at least one version."""
        self._require_root()
        return sorted(
            entry.name
            for entry in self.root.iterdir()
            if _NAME_RE.match(entry.name) and entry.is_dir() and self.versions(entry.name)
        )

    def versions(self, name: str) -> list[int]:
        """The version numbers of ``name`` (ascending); [] for an unknown model."""
        folder = self.root / check_name(name)
        try:
            entries = list(folder.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise StoreError(f"{folder}: cannot list versions ({exc.strerror})") from exc
        return sorted(int(e.name) for e in entries if _is_version_dirname(e.name) and e.is_dir())

    def _read_manifest(self, name: str, version: int) -> dict[str, Any]:
        """Parse and structurally check ``name/version/manifest.json`` (hashes are checked by ``load``/``verify``)."""
        path = self.root / name / str(version) / MANIFEST
        where = f"{name}@{version}"
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise StoreError(f"{where}: manifest missing ({path})") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise StoreError(f"{where}: cannot read manifest {path} ({exc})") from exc
        try:
            manifest = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StoreError(f"{where}: manifest {path} is not valid JSON ({exc})") from exc
        if not isinstance(manifest, dict):
            raise StoreError(f"{where}: manifest {path} must be a JSON object")
        if manifest.get("name") != name or manifest.get("version") != version:
            raise StoreError(
                f"{where}: manifest {path} names {manifest.get('name')!r} version {manifest.get('version')!r}"
            )
        files = manifest.get("files")
        if not isinstance(files, dict) or not files:
            raise StoreError(f"{where}: manifest {path} has no 'files' table")
        for rel, info in files.items():
            parts = PurePosixPath(rel).parts
            if (
                not rel
                or rel.startswith("/")
                or "\\" in rel
                or any(p in ("", ".", "..") for p in parts)
                or rel == MANIFEST
                or PurePosixPath(rel).as_posix() != rel
            ):
                raise StoreError(f"{where}: manifest {path} lists an unsafe file path {rel!r}")
            if (
                not isinstance(info, dict)
                or not isinstance(info.get("sha256"), str)
                or not _SHA256_RE.match(info["sha256"])
                or not isinstance(info.get("size"), int)
                or isinstance(info.get("size"), bool)
                or info["size"] < 0
            ):
                raise StoreError(f"{where}: manifest {path}: entry for {rel!r} needs a sha256 (64 hex) and a size")
        return manifest

    def _version(self, name: str, version: int) -> ModelVersion:
        if version not in self.versions(name):
            if not self.versions(name):
                raise self._unknown_model(name)
            known = ", ".join(map(str, self.versions(name)))
            raise StoreError(f"{name} has no version {version} (versions: {known})")
        return ModelVersion(name, version, self.root / name / str(version), self._read_manifest(name, version))

    def _unknown_model(self, name: str) -> StoreError:
        self._require_root()
        known = ", ".join(self.models()) or "none"
        return StoreError(f"unknown model {name!r} in store {self.root} (models: {known})")

    def _read_aliases(self, name: str) -> tuple[dict[str, int], dict[str, list[dict[str, Any]]]]:
        path = self.root / name / ALIASES
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}, {}
        except (OSError, UnicodeDecodeError) as exc:
            raise StoreError(f"{path}: cannot read aliases ({exc})") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StoreError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise StoreError(f"{path}: must be a JSON object")
        # the full form; a plain {"production": 3} map (hand-written, DESIGN.md's sketch) is read as well
        raw = data.get("aliases", {}) if "aliases" in data else data
        history = data.get("history", {}) if "aliases" in data else {}
        if not isinstance(raw, dict) or not isinstance(history, dict):
            raise StoreError(f"{path}: 'aliases' and 'history' must be JSON objects")
        aliases: dict[str, int] = {}
        for alias, version in raw.items():
            if isinstance(version, str) and _is_version_dirname(version):
                version = int(version)
            if not isinstance(version, int) or isinstance(version, bool) or version < 1:
                raise StoreError(f"{path}: alias {alias!r} must name a version number, got {version!r}")
            aliases[alias] = version
        for alias, entries in history.items():
            if not isinstance(entries, list) or not all(
                isinstance(e, dict) and isinstance(e.get("version"), int) for e in entries
            ):
                raise StoreError(f"{path}: history of {alias!r} must be a list of {{'version': N, ...}}")
        return aliases, history

    def aliases(self, name: str) -> dict[str, int]:
        """``{alias: version}`` of ``name`` ({} when it has none)."""
        return self._read_aliases(check_name(name))[0]

    def alias_history(self, name: str) -> dict[str, list[dict[str, Any]]]:
        """Per alias, the versions it pointed at before (oldest first); ``rollback`` goes back to the last."""
        return self._read_aliases(check_name(name))[1]

    def resolve(self, spec: str) -> ModelVersion:
        """``name`` (its production alias), ``name@3``, ``name@<alias>``, ``name@latest`` -> the version
        (manifest read, hashes not checked)."""
        name, ref = parse_spec(spec)
        if not self.versions(name):
            raise self._unknown_model(name)
        if ref.isdigit():
            return self._version(name, int(ref))
        if ref == LATEST:
            return self._version(name, self.versions(name)[-1])
        aliases = self.aliases(name)
        if ref not in aliases:
            known = ", ".join(f"{a}={v}" for a, v in sorted(aliases.items())) or "none"
            hint = f"; use {name}@latest or {name}@N" if ref == PRODUCTION else ""
            raise StoreError(f"{name} has no alias {ref!r} (aliases: {known}){hint}")
        version = aliases[ref]
        if version not in self.versions(name):
            raise StoreError(f"{name}@{ref} points at version {version}, which is not in the store")
        return self._version(name, version)

    def latest(self, name: str, profile: str | None = None) -> ModelVersion | None:
        """The newest version of ``name`` (of ``profile`` when given), or None."""
        for version in reversed(self.versions(name)):
            mv = self._version(name, version)
            if profile is None or mv.profile == profile:
                return mv
        return None

    def load(self, spec: str, verify: bool = True) -> ModelVersion:
        """``resolve`` and (by default) check every listed file's size and sha256 and the manifest digest."""
        mv = self.resolve(spec)
        if verify:
            problems = self._check_version(mv)
            if problems:
                asked = f" ({spec})" if spec != mv.spec else ""
                raise StoreError(f"{mv.spec}{asked} failed verification: " + "; ".join(p.message for p in problems))
        return mv

    def list(self, name: str | None = None) -> list[ModelVersion]:
        """Every version (of ``name``), sorted; an unreadable version comes with ``error`` set."""
        names = [check_name(name)] if name is not None else self.models()
        if name is not None and not self.versions(name):
            raise self._unknown_model(name)
        out = []
        for model in names:
            for version in self.versions(model):
                path = self.root / model / str(version)
                try:
                    out.append(ModelVersion(model, version, path, self._read_manifest(model, version)))
                except StoreError as exc:
                    out.append(ModelVersion(model, version, path, {}, error=str(exc)))
        return out

    def _check_version(self, mv: ModelVersion) -> list[Finding]:
        problems: list[Finding] = []

        def bad(message: str, path: Path | None = None) -> None:
            problems.append(Finding(mv.name, mv.version, message, str(path) if path else None))

        digest = mv.manifest.get("digest")
        if digest != manifest_digest(mv.manifest):
            bad(
                "manifest.json was edited after publishing (digest mismatch)"
                if digest
                else "manifest.json has no digest",
                mv.path / MANIFEST,
            )
        for rel, info in sorted(mv.files.items()):
            path = mv.path / rel
            try:
                st = path.stat()
            except FileNotFoundError:
                bad(f"file {rel} is missing", path)
                continue
            except OSError as exc:
                bad(f"file {rel} cannot be read ({exc.strerror})", path)
                continue
            if not path.is_file():
                bad(f"file {rel} is not a regular file", path)
            elif st.st_size != info["size"]:
                bad(f"file {rel} has {st.st_size} bytes, manifest says {info['size']}", path)
            else:
                try:
                    actual = sha256_file(path)
                except OSError as exc:
                    bad(f"file {rel} cannot be read ({exc.strerror})", path)
                    continue
                if actual != info["sha256"]:
                    bad(f"file {rel} is corrupt (sha256 {actual[:12]}..., manifest says {info['sha256'][:12]}...)", path)
        return problems

    def _unlisted_files(self, mv: ModelVersion) -> Iterator[str]:
        for dirpath, _dirnames, filenames in os.walk(mv.path):
            for filename in filenames:
                rel = (Path(dirpath) / filename).relative_to(mv.path).as_posix()
                if rel != MANIFEST and rel not in mv.files:
                    yield rel

    def verify(self, name: str | None = None) -> list[Finding]:
        """Check every version (of ``name``): manifest, digest, every file's size and sha256, files not in the
        manifest, parents present, aliases pointing at existing versions. [] means all is well."""
        self._require_root()
        if name is not None and not self.versions(name) and not (self.root / name / ALIASES).is_file():
            raise self._unknown_model(name)
        names = [name] if name is not None else sorted(
            e.name for e in self.root.iterdir() if _NAME_RE.match(e.name) and e.is_dir()
        )
        problems: list[Finding] = []
        for model in names:
            folder = self.root / model
            versions = self.versions(model)
            for entry in sorted(folder.iterdir()):
                if entry.name.startswith(".") or entry.name == ALIASES:
                    continue
                if not (_is_version_dirname(entry.name) and entry.is_dir()):
                    problems.append(Finding(model, None, f"unexpected entry {entry.name!r} in {folder}", str(entry)))
            try:
                aliases = self.aliases(model)
            except StoreError as exc:
                problems.append(Finding(model, None, str(exc), str(folder / ALIASES)))
                aliases = {}
            for alias, version in sorted(aliases.items()):
                if version not in versions:
                    problems.append(
                        Finding(model, None, f"alias {alias!r} points at version {version}, which is missing",
                                str(folder / ALIASES))
                    )
            for version in versions:
                try:
                    mv = self._version(model, version)
                except StoreError as exc:
                    problems.append(Finding(model, version, str(exc).split(": ", 1)[-1], str(folder / str(version))))
                    continue
                problems.extend(self._check_version(mv))
                for rel in self._unlisted_files(mv):
                    problems.append(Finding(model, version, f"file {rel} is not in the manifest", str(mv.path / rel)))
                for parent in mv.manifest.get("parents", []):
                    pname, pversion = parent.get("name"), parent.get("version")
                    if not (isinstance(pname, str) and _NAME_RE.match(pname) and pversion in self.versions(pname)):
                        problems.append(Finding(model, version, f"parent {pname}@{pversion} is not in the store"))
        return problems

    # ------------------------------------------------------------------ writing (under the store lock)
    def _lock(self) -> FileLock:
        return FileLock(str(self.root / LOCK), timeout=LOCK_TIMEOUT_S)

    def _locked(self):
        lock = self._lock()
        try:
            lock.acquire()
        except Timeout as exc:
            raise StoreError(f"timed out after {LOCK_TIMEOUT_S:.0f} s waiting for {lock.lock_file} "
                             "(another publish / promote / gc is running)") from exc
        except OSError as exc:
            raise StoreError(f"model store {self.root} is not writable ({exc.strerror})") from exc
        return lock

    def _ensure_writable_root(self) -> None:
        try:
            (self.root / STAGING).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"model store {self.root} is not writable ({exc.strerror})") from exc
        if not os.access(self.root, os.W_OK) or not os.access(self.root / STAGING, os.W_OK):
            raise StoreError(f"model store {self.root} is not writable (permission denied)")

    @staticmethod
    def _source_files(source_dir: Path) -> list[tuple[str, Path]]:
        if not source_dir.exists():
            raise StoreError(f"publish: source folder {source_dir} does not exist")
        if not source_dir.is_dir():
            raise StoreError(f"publish: {source_dir} is not a folder")
        files: list[tuple[str, Path]] = []
        for dirpath, dirnames, filenames in os.walk(source_dir):
            for d in dirnames:
                if (Path(dirpath) / d).is_symlink():
                    raise StoreError(f"publish: {Path(dirpath) / d} is a symlinked folder; copy it in instead")
            for filename in filenames:
                path = Path(dirpath) / filename
                rel = path.relative_to(source_dir).as_posix()
                if not path.is_file():
                    raise StoreError(f"publish: {path} is not a regular file")
                if rel == MANIFEST:
                    raise StoreError(f"publish: {path}: 'manifest.json' is written by the store, rename the file")
                files.append((rel, path))
        if not files:
            raise StoreError(f"publish: source folder {source_dir} is empty")
        return sorted(files)

    def publish(
        self,
        name: str,
        source_dir: str | os.PathLike[str],
        *,
        task: str,
        profile: str,
        metrics: dict[str, Any],
        config: dict[str, Any],
        command: str,
        data: dict[str, Any],
        parents: list[dict[str, Any]],
        extra: dict[str, Any] | None = None,
        alias: str | None = None,
    ) -> ModelVersion:
        """Copy ``source_dir`` in as the next version of ``name``, atomically (see the module docstring).

        Sets ``alias`` to the new version when given, and ``production`` when the model has none yet.
        """
        check_name(name)
        check_name(task, "task")
        check_name(profile, "profile")
        if alias is not None:
            check_alias(alias)
        if not isinstance(command, str) or not command.strip():
            raise StoreError("publish: command must be the exact training command line (a non-empty string)")
        for what, value in (("metrics", metrics), ("config", config), ("data", data)):
            if not isinstance(value, dict):
                raise StoreError(f"publish: {what} must be a mapping, got {type(value).__name__}")
        if "name" not in data:
            raise StoreError("publish: data must name the dataset it was trained on ('name', plus size and seed or path)")
        if extra is not None and not isinstance(extra, dict):
            raise StoreError(f"publish: extra must be a mapping, got {type(extra).__name__}")
        if not isinstance(parents, (list, tuple)):
            raise StoreError(f"publish: parents must be a list of {{'name', 'version'}}, got {type(parents).__name__}")
        parent_list = []
        for i, parent in enumerate(parents):
            pname = parent.get("name") if isinstance(parent, dict) else None
            pversion = parent.get("version") if isinstance(parent, dict) else None
            if not isinstance(pname, str) or not isinstance(pversion, int) or isinstance(pversion, bool):
                raise StoreError(f"publish: parents[{i}] must be {{'name': str, 'version': int}}, got {parent!r}")
            parent_list.append(to_json(parent, f"parents[{i}]"))
        fields = {
            "metrics": to_json(metrics, "metrics"),
            "config": to_json(config, "config"),
            "data": to_json(data, "data"),
            "extra": to_json(extra or {}, "extra"),
        }
        source = Path(source_dir)
        sources = self._source_files(source)
        self._ensure_writable_root()
        revision = code_revision()

        staging_id = f"{name}-{uuid.uuid4().hex}"
        staging = self.root / STAGING / staging_id
        # held while the staging folder exists: gc only removes staging folders that nobody holds
        staging_lock = FileLock(str(self.root / STAGING / f"{staging_id}.lock"), timeout=30)
        try:
            staging_lock.acquire()
        except (OSError, Timeout) as exc:
            raise StoreError(f"publish {name}: cannot lock {staging_lock.lock_file} ({exc})") from exc
        try:
            staging.mkdir()
            files = self._copy_in(sources, staging)
            # verify: the staged copy must hash to what was read from the source
            for rel, info in files.items():
                if sha256_file(staging / rel) != info["sha256"]:
                    raise StoreError(f"publish: {staging / rel} differs from {source / rel} after copying")
            lock = self._locked()
            try:
                for parent in parent_list:
                    if parent["version"] not in self.versions(parent["name"]):
                        raise StoreError(f"publish {name}: parent {parent['name']}@{parent['version']} is not in the store")
                existing = self.versions(name)
                version = (existing[-1] if existing else 0) + 1
                manifest: dict[str, Any] = {
                    "format": FORMAT,
                    "name": name,
                    "version": version,
                    "profile": profile,
                    "task": task,
                    "created": _now(),
                    "code_revision": revision,
                    "command": command,
                    "data": fields["data"],
                    "parents": parent_list,
                    "metrics": fields["metrics"],
                    "config": fields["config"],
                    "files": files,
                    "extra": fields["extra"],
                }
                manifest["digest"] = manifest_digest(manifest)
                with open(staging / MANIFEST, "w", encoding="utf-8") as fh:
                    json.dump(manifest, fh, indent=2, allow_nan=False)
                    fh.write("\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                if json.loads((staging / MANIFEST).read_text(encoding="utf-8")) != manifest:
                    raise StoreError(f"publish: {staging / MANIFEST} did not read back as written")
                _fsync_dir(staging)
                model_dir = self.root / name
                model_dir.mkdir(exist_ok=True)
                final = model_dir / str(version)
                os.rename(staging, final)  # the commit point: atomic on one filesystem
                _fsync_dir(model_dir)
                try:
                    aliases, history = self._read_aliases(name)
                    changed = False
                    if alias is not None:
                        changed |= self._point(aliases, history, alias, version, action="publish")
                    if PRODUCTION not in aliases:
                        changed |= self._point(aliases, history, PRODUCTION, version, action="publish")
                    if changed:
                        self._write_aliases(name, aliases, history)
                except (OSError, StoreError) as exc:
                    raise StoreError(
                        f"publish: {name}@{version} was published, but its aliases were not set: {exc}"
                    ) from exc
            finally:
                lock.release()
        except OSError as exc:
            raise StoreError(f"publish {name}: {exc}") from exc
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
            staging_lock.release()
            Path(staging_lock.lock_file).unlink(missing_ok=True)
        return ModelVersion(name, version, final, manifest)

    @staticmethod
    def _copy_in(sources: list[tuple[str, Path]], staging: Path) -> dict[str, dict[str, Any]]:
        files: dict[str, dict[str, Any]] = {}
        for rel, src in sources:
            dst = staging / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            size = 0
            with open(src, "rb") as fin, open(dst, "wb") as fout:
                while chunk := fin.read(_CHUNK):
                    digest.update(chunk)
                    fout.write(chunk)
                    size += len(chunk)
                fout.flush()
                os.fsync(fout.fileno())
            files[rel] = {"sha256": digest.hexdigest(), "size": size}
        return files

    @staticmethod
    def _point(aliases: dict[str, int], history: dict[str, list[dict[str, Any]]], alias: str, version: int,
               *, action: str) -> bool:
        previous = aliases.get(alias)
        if previous == version:
            return False
        if previous is not None:
            entries = history.setdefault(alias, [])
            entries.append({"version": previous, "replaced_by": version, "at": _now(), "action": action})
            del entries[:-HISTORY_LIMIT]
        aliases[alias] = version
        return True

    def _write_aliases(self, name: str, aliases: dict[str, int], history: dict[str, list[dict[str, Any]]]) -> None:
        data = {
            "aliases": dict(sorted(aliases.items())),
            "history": {a: h for a, h in sorted(history.items()) if h},
        }
        _write_json_atomic(self.root / name / ALIASES, data)

    def promote(self, name: str, version: int, alias: str = PRODUCTION) -> dict[str, Any]:
        """Point ``alias`` at ``version`` after verifying it; returns {name, alias, version, previous}."""
        check_name(name)
        check_alias(alias)
        if isinstance(version, bool) or not isinstance(version, int):
            raise StoreError(f"promote: version must be a number, got {version!r}")
        self.load(f"{name}@{version}", verify=True)  # never point an alias at a corrupt version
        lock = self._locked()
        try:
            if version not in self.versions(name):  # gc may have run meanwhile
                raise StoreError(f"{name} has no version {version}")
            aliases, history = self._read_aliases(name)
            previous = aliases.get(alias)
            if self._point(aliases, history, alias, version, action="promote"):
                self._write_aliases(name, aliases, history)
        except OSError as exc:
            raise StoreError(f"promote {name}: {exc}") from exc
        finally:
            lock.release()
        return {"name": name, "alias": alias, "version": version, "previous": previous}

    def rollback(self, name: str, alias: str = PRODUCTION) -> dict[str, Any]:
        """Move ``alias`` back to the version it pointed at before the last promote/publish that moved it."""
        check_name(name)
        check_alias(alias)
        if not self.versions(name):
            raise self._unknown_model(name)
        lock = self._locked()
        try:
            aliases, history = self._read_aliases(name)
            if alias not in aliases:
                raise StoreError(f"rollback: {name} has no alias {alias!r}")
            entries = history.get(alias, [])
            if not entries:
                raise StoreError(
                    f"rollback: {name}@{alias} (version {aliases[alias]}) has no earlier version to roll back to"
                )
            target = entries[-1]["version"]
            if target not in self.versions(name):
                raise StoreError(
                    f"rollback: {name}@{alias} would go back to version {target}, which is no longer in the store; "
                    f"use promote with an existing version"
                )
            self.load(f"{name}@{target}", verify=True)
            current = aliases[alias]
            entries.pop()
            aliases[alias] = target
            self._write_aliases(name, aliases, history)
        except OSError as exc:
            raise StoreError(f"rollback {name}: {exc}") from exc
        finally:
            lock.release()
        return {"name": name, "alias": alias, "version": target, "previous": current}

    def gc(self, keep: int = 3, *, dry_run: bool = False) -> GcReport:
        """Remove old versions: keep the ``keep`` newest of every model, every version an alias points at, the
        version each alias would roll back to, and (transitively) every parent of a kept version. Also removes
        stale temporary leftovers of crashed writers."""
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise StoreError(f"gc: keep must be at least 1 (the newest version is never removed), got {keep!r}")
        self._require_root()
        report = GcReport(dry_run=dry_run)
        lock = self._locked()
        try:
            names = sorted(e.name for e in self.root.iterdir() if _NAME_RE.match(e.name) and e.is_dir())
            keep_set: set[tuple[str, int]] = set()
            all_versions: dict[str, list[int]] = {}
            for name in names:
                versions = self.versions(name)
                all_versions[name] = versions
                keep_set.update((name, v) for v in versions[-keep:])
                aliases, history = self._read_aliases(name)
                keep_set.update((name, v) for v in aliases.values())
                keep_set.update((name, h[-1]["version"]) for h in history.values() if h)
            todo = list(keep_set)
            while todo:  # parents of kept versions are kept too
                name, version = todo.pop()
                try:
                    parents = self._read_manifest(name, version).get("parents", [])
                except StoreError:
                    continue
                for parent in parents:
                    key = (parent.get("name"), parent.get("version"))
                    if key not in keep_set and key[0] in all_versions and key[1] in all_versions[key[0]]:
                        keep_set.add(key)
                        todo.append(key)
            for name in names:
                for version in all_versions[name]:
                    spec = f"{name}@{version}"
                    if (name, version) in keep_set:
                        report.kept.append(spec)
                        continue
                    report.removed.append(spec)
                    if not dry_run:
                        trash = self.root / STAGING / f"gc-{name}-{version}-{uuid.uuid4().hex}"
                        (self.root / STAGING).mkdir(exist_ok=True)
                        os.rename(self.root / name / str(version), trash)  # vanishes atomically for readers
                        shutil.rmtree(trash)
                folder = self.root / name
                for entry in folder.iterdir():  # temp files of interrupted alias writes (we hold the lock)
                    if entry.name.startswith(f".{ALIASES}.") and entry.name.endswith(".tmp"):
                        report.removed_temp.append(str(entry))
                        if not dry_run:
                            entry.unlink(missing_ok=True)
                if not dry_run and not self.versions(name) and not (folder / ALIASES).exists():
                    try:
                        folder.rmdir()  # an empty model folder left by a crashed first publish
                    except OSError:
                        pass
            report.removed_temp.extend(self._gc_staging(dry_run))
        except OSError as exc:
            raise StoreError(f"gc: {exc}") from exc
        finally:
            lock.release()
        return report

    def _gc_staging(self, dry_run: bool) -> list[str]:
        staging_root = self.root / STAGING
        if not staging_root.is_dir():
            return []
        removed = []
        for entry in sorted(staging_root.iterdir()):
            if entry.name.endswith(".lock"):
                continue
            probe = FileLock(str(staging_root / f"{entry.name}.lock"), timeout=0)
            try:
                probe.acquire()
            except Timeout:
                continue  # a publish in progress holds it
            try:
                removed.append(str(entry))
                if not dry_run:
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink(missing_ok=True)
            finally:
                probe.release()
                if not dry_run:
                    Path(probe.lock_file).unlink(missing_ok=True)
        if not dry_run:
            for lock_file in staging_root.glob("*.lock"):  # orphaned lock files with no folder
                if not (staging_root / lock_file.name[: -len(".lock")]).exists():
                    probe = FileLock(str(lock_file), timeout=0)
                    try:
                        probe.acquire()
                    except Timeout:
                        continue
                    try:
                        lock_file.unlink(missing_ok=True)
                    finally:
                        probe.release()
        return removed
