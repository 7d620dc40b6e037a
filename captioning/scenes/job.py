"""A scene job: the tile plan of one scene, a durable record of the tiles done, and the outputs.

``SceneJob(input_path, out_dir, params)`` opens the scene (``SceneReader``), plans the grid
(``TileGrid``) and keeps two files in ``out_dir``:

* ``job.json`` - what the job is (the input file's identity, the parameters, the grid); opening a job folder
  that holds another scene or other parameters is refused (``SceneError``), so results never mix;
* ``tiles.jsonl`` - one JSON line per finished tile, appended and fsync'ed by ``record``; a restart reads it
  back, drops a torn last line (a crash mid-write), and ``pending()`` lists exactly the tiles not recorded.
  Recording a tile twice keeps the first record, so a replayed batch cannot duplicate a tile.

Drivers (the CLI loop in ``run_scene``, or the service's async job loop):

    job = SceneJob(path, out_dir, SceneParams(tile=256, overlap=32, models=(...)))
    for tile in job.pending():
        image = job.read(tile)            # PIL RGB tile x tile, or None when the tile is all nodata
        result = infer([image])[0] if image is not None else None
        job.record(tile, result)          # durable; None records an empty (skipped) tile
    outputs = job.finish()                # scene.geojson, coverage.tif, overlay.png, summary.json

``read`` uses the job's rasterio dataset, which is not thread-safe: call it from one thread at a time.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from captioning.errors import SceneError
from captioning.scenes.grid import Tile, TileGrid
from captioning.scenes.reader import SceneReader

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
RECORDS_FILE = "tiles.jsonl"
JOB_FORMAT = "captioner-scene-job/1"
UCM_GSD = 0.3  # metres per pixel of UC Merced (and of the synthetic pictures the default models learnt from)


@dataclass(frozen=True)
class Instance:
    """One object found in a tile: box in the tile image's pixels (x1, y1, x2, y2)."""

    concept: str
    score: float
    box: tuple[float, float, float, float]
    label: str | None = None


@dataclass
class TileResult:
    """What ``infer`` returns for one tile image."""

    probabilities: dict[str, float]  # label -> probability (every label the labeller knows)
    threshold: float  # a label is predicted when its probability >= threshold
    instances: list[Instance] = field(default_factory=list)
    caption: str | None = None

    @property
    def labels(self) -> list[str]:
        return [k for k, p in self.probabilities.items() if p >= self.threshold]


Infer = Callable[[list[Image.Image]], list[TileResult]]


@dataclass(frozen=True)
class SceneParams:
    """How a scene is processed. ``tile`` and ``overlap`` are in model pixels (after resampling to
    ``target_gsd``; None keeps the native resolution). ``models`` names what produced the results (e.g.
    ``("ucm-classifier@1", "concepts@3")``) so a resumed job cannot mix models. ``crs`` is an output option:
    "scene" (the scene's CRS) or "EPSG:4326"; it may change between runs."""

    tile: int = 256
    overlap: int = 32
    bands: tuple[int, ...] | None = None
    target_gsd: float | None = UCM_GSD
    min_valid: float = 0.0  # a tile is skipped when its valid share is 0 or below this
    nms_iou: float = 0.5
    merge_ios: float = 0.5
    models: tuple[str, ...] = ()
    crs: str = "scene"

    def check(self) -> None:
        if not isinstance(self.tile, int) or not 32 <= self.tile <= 4096:
            raise SceneError(f"tile must be an integer from 32 to 4096 pixels, got {self.tile!r}")
        if not isinstance(self.overlap, int) or not 0 <= self.overlap <= self.tile // 2:
            raise SceneError(f"overlap must be an integer from 0 to tile / 2 ({self.tile // 2}), got {self.overlap!r}")
        if not 0.0 <= float(self.min_valid) < 1.0:
            raise SceneError(f"min_valid must be in [0, 1), got {self.min_valid!r}")
        for name in ("nms_iou", "merge_ios"):
            if not 0.0 < float(getattr(self, name)) <= 1.0:
                raise SceneError(f"{name} must be in (0, 1], got {getattr(self, name)!r}")
        if self.crs != "scene" and self.crs.upper() != "EPSG:4326":
            raise SceneError(f"crs must be 'scene' or 'EPSG:4326', got {self.crs!r}")

    def identity(self) -> dict:
        """The parameters a resumed job must share with the run that started it."""
        d = asdict(self)
        d.pop("crs")
        d["bands"] = list(self.bands) if self.bands else None
        d["models"] = list(self.models)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SceneParams:
        d = dict(d)
        if d.get("bands") is not None:
            d["bands"] = tuple(int(b) for b in d["bands"])
        d["models"] = tuple(d.get("models") or ())
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise SceneError(f"unknown scene parameter(s): {', '.join(sorted(unknown))}")
        return cls(**d)


def _fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class SceneJob:
    """One scene's resumable work record (see the module docstring)."""

    def __init__(
        self,
        input_path: str | os.PathLike,
        out_dir: str | os.PathLike,
        params: SceneParams | dict | None = None,
        *,
        restart: bool = False,
    ):
        params = SceneParams() if params is None else params
        self.params = params if isinstance(params, SceneParams) else SceneParams.from_dict(params)
        self.params.check()
        self.input_path = Path(input_path)
        self.out_dir = Path(out_dir)
        self.reader = SceneReader(self.input_path, bands=self.params.bands, target_gsd=self.params.target_gsd)
        try:
            self._plan()
            self._open_records(restart)
        except BaseException:
            self.reader.close()
            raise

    # ------------------------------------------------------------------ plan and records

    def _plan(self) -> None:
        r, p = self.reader, self.params
        self.zoom = r.zoom
        tile_src = max(1, round(p.tile * self.zoom))
        overlap_src = min(round(p.overlap * self.zoom), tile_src - 1)
        self.grid = TileGrid(r.width, r.height, tile_src, overlap_src)
        self.warnings = list(r.warnings)
        self.spec = {
            "format": JOB_FORMAT,
            "input": {**_fingerprint(self.input_path), "width": r.width, "height": r.height},
            "params": self.params.identity(),
            "grid": {"tile_src": tile_src, "overlap_src": overlap_src, "rows": self.grid.rows,
                     "cols": self.grid.cols, "tiles": len(self.grid)},
            "scene": r.info().to_dict(),
        }  # fmt: skip

    def _open_records(self, restart: bool) -> None:
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise SceneError("exists and is not a folder", path=self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        job_file, rec_file = self.out_dir / JOB_FILE, self.out_dir / RECORDS_FILE
        if restart:
            for f in (job_file, rec_file):
                f.unlink(missing_ok=True)
        if job_file.exists():
            try:
                old = json.loads(job_file.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise SceneError(f"unreadable job file ({exc}); delete the folder or restart", path=job_file) from None
            for key in ("format", "input", "params", "grid"):
                if old.get(key) != self.spec[key]:
                    raise SceneError(
                        f"holds a job for another {'scene' if key == 'input' else key} "
                        f"({json.dumps(old.get(key))[:160]} != {json.dumps(self.spec[key])[:160]}); "
                        "use another output folder or restart the job", path=self.out_dir,
                    )
        else:
            _atomic_write(job_file, json.dumps(self.spec, indent=1) + "\n")
        self.records: dict[int, dict] = {}
        if rec_file.exists():
            raw = rec_file.read_bytes()
            end = raw.rfind(b"\n") + 1
            if end < len(raw):  # a torn last line from a crash mid-write: that tile is done again
                log.warning("%s: dropping a torn last record (%d bytes)", rec_file, len(raw) - end)
                with open(rec_file, "r+b") as f:
                    f.truncate(end)
                    f.flush()
                    os.fsync(f.fileno())
            for n, line in enumerate(raw[:end].splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    idx = int(rec["i"])
                except (ValueError, KeyError, TypeError) as exc:
                    raise SceneError(f"record on line {n} is not valid ({exc})", path=rec_file) from None
                if not 0 <= idx < len(self.grid):
                    raise SceneError(f"record on line {n} names tile {idx}, not in the plan", path=rec_file)
                self.records.setdefault(idx, rec)
        self._records_fh = open(rec_file, "a", encoding="utf-8")
        self._valid: dict[int, float] = {}

    # ------------------------------------------------------------------ the driver's calls

    def tiles(self) -> list[Tile]:
        """The whole plan, in row-major order."""
        return list(self.grid.tiles)

    def pending(self) -> list[Tile]:
        """Tiles without a record yet, in plan order."""
        return [t for t in self.grid.tiles if t.index not in self.records]

    @property
    def total(self) -> int:
        return len(self.grid)

    @property
    def done(self) -> int:
        return len(self.records)

    @property
    def complete(self) -> bool:
        return len(self.records) == len(self.grid)

    def read(self, tile: Tile) -> Image.Image | None:
        """The tile as an RGB picture of ``params.tile`` pixels a side (resampled to the target GSD; a window
        shorter than a tile at the scene's edge is padded with black, counted as nodata), or None when the
        tile holds no valid pixel (or less than ``min_valid``)."""
        size = self.params.tile
        out_w = max(1, min(size, round(tile.w / self.zoom)))
        out_h = max(1, min(size, round(tile.h / self.zoom)))
        rgb, valid = self.reader.read(tile.x, tile.y, tile.w, tile.h, out_w, out_h)
        share = float(valid.sum()) / (size * size)
        self._valid[tile.index] = share
        if share == 0.0 or share < self.params.min_valid:
            return None
        if rgb.shape[:2] != (size, size):
            padded = np.zeros((size, size, 3), dtype=np.uint8)
            padded[:out_h, :out_w] = rgb
            rgb = padded
        return Image.fromarray(rgb, "RGB")

    def _line(self, tile: Tile, result: TileResult | None) -> dict:
        rec: dict[str, Any] = {"i": tile.index, "valid": round(self._valid.pop(tile.index, 0.0), 4)}
        if result is None:
            rec["skipped"] = True
            return rec
        size = self.params.tile
        out_w = max(1, min(size, round(tile.w / self.zoom)))
        out_h = max(1, min(size, round(tile.h / self.zoom)))
        sx, sy = tile.w / out_w, tile.h / out_h
        rec["probabilities"] = {k: round(float(v), 5) for k, v in result.probabilities.items()}
        rec["threshold"] = round(float(result.threshold), 5)
        objects = []
        for inst in result.instances:
            concept, score, box = inst.concept, float(inst.score), inst.box
            label = getattr(inst, "label", None)
            x1 = min(max(tile.x + float(box[0]) * sx, tile.x), tile.x + tile.w)
            y1 = min(max(tile.y + float(box[1]) * sy, tile.y), tile.y + tile.h)
            x2 = min(max(tile.x + float(box[2]) * sx, tile.x), tile.x + tile.w)
            y2 = min(max(tile.y + float(box[3]) * sy, tile.y), tile.y + tile.h)
            if x2 - x1 < 1e-6 or y2 - y1 < 1e-6:
                continue  # a box wholly in the padding beyond the scene
            objects.append([concept, label, round(score, 5), round(x1, 2), round(y1, 2), round(x2, 2), round(y2, 2)])
        rec["objects"] = objects
        if result.caption is not None:
            rec["caption"] = result.caption
        return rec

    def record(self, tile: Tile, result: TileResult | None) -> None:
        """Durably record one tile (None: skipped as nodata)."""
        self.record_many([(tile, result)])

    def record_many(self, pairs: Iterable[tuple[Tile, TileResult | None]]) -> None:
        """Durably record several tiles with one fsync; tiles already recorded are ignored."""
        lines = []
        for tile, result in pairs:
            if tile.index in self.records or not 0 <= tile.index < len(self.grid):
                continue
            rec = self._line(tile, result)
            self.records[tile.index] = rec
            lines.append(json.dumps(rec, separators=(",", ":")))
        if lines:
            self._records_fh.write("\n".join(lines) + "\n")
            self._records_fh.flush()
            os.fsync(self._records_fh.fileno())

    def finish(self, crs: str | None = None):
        """Write the outputs (see ``captioning.scenes.outputs``) once every tile is recorded."""
        from captioning.scenes.outputs import write_outputs

        if not self.complete:
            raise SceneError(
                f"{len(self.grid) - len(self.records)} of {len(self.grid)} tiles are not processed yet",
                path=self.out_dir,
            )
        return write_outputs(self, crs or self.params.crs)

    def close(self) -> None:
        if not self._records_fh.closed:
            self._records_fh.close()
        self.reader.close()

    def __enter__(self) -> SceneJob:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_scene(
    job: SceneJob,
    infer: Infer,
    *,
    batch_size: int = 16,
    progress: Callable[[int], Any] | None = None,
    should_stop: Callable[[], bool] | None = None,
    finish: bool = True,
):
    """Process ``job.pending()`` in batches: read, ``infer`` the non-empty tiles, record each batch durably.
    ``progress(n)`` is called with the tiles done in each batch; ``should_stop()`` is checked between
    batches (then it returns None: the job resumes later). Returns ``job.finish()`` when ``finish``."""
    if batch_size < 1:
        raise SceneError(f"batch_size must be at least 1, got {batch_size}")
    pending = job.pending()
    for start in range(0, len(pending), batch_size):
        if should_stop is not None and should_stop():
            return None
        batch = pending[start : start + batch_size]
        images = [(t, job.read(t)) for t in batch]
        todo = [(t, im) for t, im in images if im is not None]
        results: Sequence[TileResult] = infer([im for _, im in todo]) if todo else []
        if len(results) != len(todo):
            raise SceneError(f"infer returned {len(results)} results for {len(todo)} tiles")
        by_index = {t.index: r for (t, _), r in zip(todo, results, strict=True)}
        job.record_many([(t, by_index.get(t.index)) for t in batch])
        if progress is not None:
            progress(len(batch))
    return job.finish() if finish else None
