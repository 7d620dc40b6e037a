"""Inference without a server: ``captioner caption`` and ``captioner batch`` / ``batch-merge``, and the
``Engine`` that the Ray engine's actors run.

One code path with the service: the same task table and record builders (``captioning.inference``), the
same intake (``service.intake.decode_image``) and ``service.inference.prepare_one``; no pools, no HTTP. So an
image gives the same record here as from ``/v1/caption`` or a job (``path`` instead of ``index``/``filename``).

Sharding (``--shard I/N``): an image belongs to shard ``sha256(relative path) mod N``, so shards are
disjoint, their union is every image exactly once, and adding files does not move the others between
shards. A Kubernetes Indexed Job runs ``--shard $(JOB_COMPLETION_INDEX)/N`` per pod; ``batch-merge`` joins
the shard files into exactly what one process would have written (lines in relative-path order).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captioning.errors import CaptionerError, UsageError
from captioning.inference import (
    KINDS,
    TASKS,
    Limits,
    combine_records,
    load_model,
    parse_kinds,
    run_kind_batch,
)
from service.inference import Prepared, ReadyImage, error_of, prepare_one
from service.intake import ImageProblem, RawImage
from service.settings import Settings

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def store_name(store: Any, kind: str, requested: str | None, alias: str) -> str:
    """The store name for ``kind``: what ``requested`` names (``lightcap``, ``ucm``, a store name), else the
    task of that kind with the lowest rank that the store has under ``alias``."""
    if requested:
        for spec in TASKS.values():
            if spec.kind == kind and requested in spec.request_names:
                return spec.task
        return requested
    for spec in sorted((t for t in TASKS.values() if t.kind == kind), key=lambda t: t.rank):
        if spec.task in store.models() and alias in store.aliases(spec.task):
            return spec.task
    looked = ", ".join(t.task for t in TASKS.values() if t.kind == kind)
    raise UsageError(f"no {KINDS[kind].noun} with alias {alias!r} in the model store {store.root} (looked for {looked}); "
                     "train one or pass --store")


@dataclass
class Preparer:
    """Decode + validate + preprocess one image for every kind of an engine. Small and picklable (it holds
    the runtimes' preprocessing, not their weights), so it can run in other processes (Ray tasks)."""

    formats: list[str]
    max_pixels: int
    preprocessors: list[Callable[[Any], Any]]

    def __call__(self, key: str, data: bytes, index: int = 0) -> Prepared | dict[str, Any]:
        """-> the prepared image, or its error record (``{"path", "error": {type, status, detail}}``)."""
        try:
            return prepare_one(RawImage(index, key, data), self.formats, self.max_pixels, self.preprocessors)
        except ImageProblem as problem:
            return {"path": key, "error": error_of(problem)}

    def image(self, key: str, image: Any, index: int = 0) -> Prepared:
        """An image decoded elsewhere (a scene's tile, RGB PIL) -> prepared for every kind."""
        return prepare_one(ReadyImage(index, key, image), self.formats, self.max_pixels, self.preprocessors)


class Engine:
    """Runtimes of the chosen kinds with their resolved options; ``records`` turns files into result records."""

    def __init__(self, runtimes: Sequence[Any], options: Sequence[Any], settings: Settings):
        self.kinds = [TASKS[r.manifest["task"]].kind for r in runtimes]
        self.runtimes = list(runtimes)
        self.options = list(options)
        self.settings = settings

    @classmethod
    def from_store(cls, store_root: str | Path | None = None, *, tasks: str | Sequence[str] = ("caption",),
                   model: str | None = None, alias: str | None = None, options: dict[str, Any] | None = None,
                   device: str | None = None, precision: str | None = None, settings: Settings | None = None
                   ) -> Engine:
        """Load the kinds' models from the store (``CAPTIONER_*`` settings fill what is not given) and resolve
        ``options`` (request parameters: beam_size, max_length, threshold, top_k, min_score, group) against them."""
        from captioning.accel import keep_triton_out, trim_heap
        from captioning.store import ModelStore

        overrides = {"model_store": store_root, "device": device, "precision": precision}
        settings = settings or _settings(**overrides)
        keep_triton_out(settings.device_name)  # as the server does (create_app): unused on the CPU, 80 MiB
        store = ModelStore(settings.model_store)
        alias = alias or settings.alias
        options = {k: v for k, v in (options or {}).items() if v is not None}
        runtimes, resolved = [], []
        for kind in parse_kinds(tasks):
            spec = KINDS[kind]
            name = store_name(store, kind, model if kind == "caption" else None, alias)
            runtime = load_model(store, f"{name}@{alias}", device=settings.device_name,
                                 precision=settings.precision_name, vision_runtime=settings.vision_runtime_name)
            if TASKS[runtime.manifest["task"]].kind != kind:
                raise UsageError(f"{name}@{alias} is a {runtime.manifest['task']!r} model, not a {kind} model")
            params = spec.params.model_validate({k: v for k, v in options.items() if k in spec.params.model_fields})
            runtimes.append(runtime)
            resolved.append(spec.resolve(runtime, params, Limits()))
        trim_heap()  # as the server does after each load
        return cls(runtimes, resolved, settings)

    def preparer(self) -> Preparer:
        return Preparer(self.settings.format_list, self.settings.max_image_pixels,
                        [r.preprocessor for r in self.runtimes])

    def infer(self, prepared: Sequence[Prepared | dict[str, Any]], keys: Sequence[str] | None = None
              ) -> list[dict[str, Any]]:
        """One record per item, in order; error records pass through. ``keys`` name the items (default: the
        prepared images' filenames)."""

        ok = [i for i, p in enumerate(prepared) if isinstance(p, Prepared)]
        results: dict[int, dict[str, dict[str, Any]]] = {i: {} for i in ok}
        if ok:
            for k, (kind, runtime, options) in enumerate(zip(self.kinds, self.runtimes, self.options, strict=True)):
                outs = run_kind_batch(kind, runtime, options, [prepared[i].tensors[k] for i in ok])
                for i, out in zip(ok, outs, strict=True):
                    results[i][kind] = KINDS[kind].record(out, runtime, options, prepared[i].frame(k))
        records = []
        for i, p in enumerate(prepared):
            if isinstance(p, Prepared):
                key = keys[i] if keys is not None else p.decoded.filename
                records.append({"path": key, **combine_records(results[i])})
            else:
                records.append(p)
        return records

    def records(self, items: Iterable[tuple[str, bytes | Path]], batch_size: int = 8) -> Iterator[dict[str, Any]]:
        """``(key, bytes or path)`` pairs -> one record each, in input order, ``batch_size`` images per batch."""
        prepare = self.preparer()
        pending: list[Prepared | dict[str, Any]] = []
        for index, (key, data) in enumerate(items):
            if isinstance(data, (str, Path)):
                try:
                    data = Path(data).read_bytes()
                except OSError as exc:
                    problem = ImageProblem("invalid-image", index, key, f"cannot read ({exc.strerror})")
                    pending.append({"path": key, "error": error_of(problem)})
                    continue
            pending.append(prepare(key, data, index))
            if len(pending) >= batch_size:
                yield from self.infer(pending)
                pending = []
        if pending:
            yield from self.infer(pending)

    def infer_images(self, images: Sequence[Any], keys: Sequence[str]) -> list[dict[str, Any]]:
        """Decoded RGB images (scene tiles) -> one record each, in order."""
        prepare = self.preparer()
        return self.infer([prepare.image(k, im, i) for i, (k, im) in enumerate(zip(keys, images, strict=True))], keys)

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(f"{r.name}@{r.version}" for r in self.runtimes)

    def describe(self) -> str:
        return ", ".join(self.models)


def _settings(**overrides: Any) -> Settings:
    from pydantic import ValidationError

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        raise UsageError(f"setting {where} (CAPTIONER_{where.upper()}): {err['msg']}") from None


# --- batch: listing, sharding, resuming ----------------------------------------------------------------
def list_images(root: Path) -> list[str]:
    """Relative POSIX paths of the image files under ``root`` (by suffix), sorted."""
    if not root.is_dir():
        raise UsageError(f"{root}: not a directory")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.append((Path(dirpath) / name).relative_to(root).as_posix())
    return sorted(found)


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"--shard {text!r}: need 0 <= I < N")
    return index, count


def shard_of(relpath: str, count: int) -> int:
    return int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:8], "big") % count


def read_results(path: Path, *, repair: bool) -> dict[str, dict[str, Any]]:
    """The lines of a results file by path. A torn last line (a killed run) is cut off when ``repair``,
    else refused; a bad line elsewhere is always refused, naming the line."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    out: dict[str, dict[str, Any]] = {}
    for number, raw in enumerate(lines, 1):
        try:
            line = json.loads(raw)
            key = line["path"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise UsageError(f"{path}: line {number} is not a result line (JSON with 'path')") from None
        if key in out and out[key] != line:
            raise UsageError(f"{path}: line {number}: {key!r} appears twice with different results")
        out[key] = line
    if tail:
        if not repair:
            raise UsageError(f"{path}: the last line is incomplete (was that shard's run interrupted?)")
        with open(path, "r+b") as fh:
            fh.truncate(len(data) - len(tail))
    return out


def merge(out: Path, shards: list[Path], expect: list[str] | None = None) -> int:
    merged: dict[str, dict[str, Any]] = {}
    for shard in shards:
        for key, line in read_results(shard, repair=False).items():
            if key in merged and merged[key] != line:
                raise UsageError(f"{shard}: {key!r} is also in another shard with a different result")
            merged[key] = line
    if expect is not None:
        missing = sorted(set(expect) - set(merged))
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise UsageError(f"merge: {len(missing)} image(s) are in no shard: {shown}")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for key in sorted(merged):
            fh.write(json.dumps(merged[key]) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    return len(merged)


def run_batch(root: Path, out: Path, engine: Engine, *, shard: tuple[int, int] = (0, 1), batch_size: int = 8,
              progress: bool = True) -> dict[str, int]:
    index, count = shard
    images = [p for p in list_images(root) if shard_of(p, count) == index]
    done = read_results(out, repair=True)
    todo = [p for p in images if p not in done]
    stats = {"images": len(images), "skipped": len(images) - len(todo), "captioned": 0, "failed": 0}
    if out.parent != Path(""):
        out.parent.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc=f"batch {index}/{count}", unit="img",
               disable=not progress or bool(os.environ.get("CAPTIONER_NO_PROGRESS")))
    started = time.perf_counter()
    with open(out, "a", encoding="utf-8") as fh:
        for record in engine.records(((p, root / p) for p in todo), batch_size=batch_size):
            fh.write(json.dumps(record) + "\n")
            stats["failed" if "error" in record else "captioned"] += 1
            bar.update(1)
            if bar.n % batch_size == 0:
                fh.flush()
        fh.flush()
        os.fsync(fh.fileno())
    bar.close()
    stats["seconds"] = round(time.perf_counter() - started, 3)
    return stats


__all__ = ["CaptionerError", "Engine", "Preparer", "list_images", "merge", "parse_shard", "read_results",
           "run_batch", "shard_of", "store_name"]
