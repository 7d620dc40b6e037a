"""Captioning without a server: ``captioner caption`` and ``captioner batch`` / ``batch-merge``.

Same intake checks and the same backend code as the service (``service.intake``, ``service.backends``),
same models (``captioning.inference.load_model``), no HTTP.

Sharding (``--shard I/N``): an image belongs to shard ``sha256(relative path) mod N``, so shards are
disjoint, their union is every image exactly once, and adding files does not move the others between
shards. A Kubernetes Indexed Job runs ``--shard $(JOB_COMPLETION_INDEX)/N`` per pod; ``batch-merge`` joins
the shard files into exactly what one process would have written (lines in relative-path order).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captioning.errors import CaptionerError, UsageError
from captioning.inference import load_model
from service.backends import ROLES, caption_batch
from service.intake import ImageProblem, RawImage, decode_image
from service.problems import problem_type
from service.registry import FAMILIES
from service.settings import Settings

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def resolve_captioner(store: Any, model: str | None, alias: str) -> str:
    """``lightcap``/``ucm``/a store name -> the store name; None -> lightcap when the store has it, else ucm."""
    if model:
        return FAMILIES.get(model, model)
    for name in ("lightcap", "ucm-captioner"):
        if name in store.models() and alias in store.aliases(name):
            return name
    raise UsageError(
        f"no captioner with alias {alias!r} in the model store {store.root} (looked for lightcap, ucm-captioner); "
        "train one or pass --store"
    )


def load_captioner(store: Any, model: str | None, alias: str) -> Any:
    name = resolve_captioner(store, model, alias)
    loaded = load_model(store, f"{name}@{alias}")
    if ROLES.get(loaded.manifest.get("task")) != "caption":
        raise UsageError(f"{name}@{alias} is a {loaded.manifest.get('task')!r} model, not a captioner")
    return loaded


@dataclass
class Outcome:
    key: str  # the path as printed / recorded
    line: dict[str, Any]

    @property
    def ok(self) -> bool:
        return "error" not in self.line


def caption_files(model: Any, items: Iterable[tuple[str, Path]], settings: Settings, *, beam_size: int | None = None,
                  max_length: int | None = None, batch_size: int = 8) -> Iterator[Outcome]:
    """Caption ``(key, path)`` pairs in batches; yields one outcome per input, in input order."""
    pending: list[tuple[str, Any]] = []
    order: list[Outcome | str] = []

    def flush() -> Iterator[Outcome]:
        if pending:
            outs = caption_batch(model, (beam_size, max_length), [t for _, t in pending])
            done = {key: out for (key, _), out in zip(pending, outs, strict=True)}
            pending.clear()
        else:
            done = {}
        for entry in order:
            if isinstance(entry, Outcome):
                yield entry
            else:
                out = done[entry]
                yield Outcome(entry, {"path": entry, "caption": out.text, "score": _score(out.score),
                                      "model": model.name, "version": model.version})
        order.clear()

    for index, (key, path) in enumerate(items):
        try:
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                raise ImageProblem("invalid-image", index, key, f"cannot read ({exc.strerror})") from None
            decoded = decode_image(RawImage(index, key, data), formats=settings.format_list,
                                   max_pixels=settings.max_image_pixels)
            pending.append((key, model.preprocess(decoded.image)))
            order.append(key)
        except ImageProblem as problem:
            order.append(Outcome(key, {"path": key, "error": {
                "type": problem_type(problem.slug), "status": problem.status, "detail": problem.message}}))
        if len(pending) >= batch_size:
            yield from flush()
    yield from flush()


def _score(value: Any) -> float | None:
    value = float(value)
    return round(value, 6) if math.isfinite(value) else None


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


def run_batch(root: Path, out: Path, model: Any, settings: Settings, *, shard: tuple[int, int] = (0, 1),
              beam_size: int | None = None, max_length: int | None = None, batch_size: int = 8,
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
        for outcome in caption_files(model, ((p, root / p) for p in todo), settings, beam_size=beam_size,
                                     max_length=max_length, batch_size=batch_size):
            fh.write(json.dumps(outcome.line) + "\n")
            stats["captioned" if outcome.ok else "failed"] += 1
            bar.update(1)
            if bar.n % batch_size == 0:
                fh.flush()
        fh.flush()
        os.fsync(fh.fileno())
    bar.close()
    stats["seconds"] = round(time.perf_counter() - started, 3)
    return stats


__all__ = ["CaptionerError", "caption_files", "list_images", "load_captioner", "merge", "parse_shard",
           "read_results", "run_batch", "shard_of"]
