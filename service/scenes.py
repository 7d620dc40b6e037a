"""Scene jobs: a GeoTIFF of any size, tile by tile through the same pools as every other image.

``POST /v1/scenes`` (service/routes/scenes.py) validates the parameters and the raster, and records a job of
kind ``scene`` in the job store; the job runner (``JobManager``, one job at a time, restart-safe) calls
``run_scene_job``: the scene's tiles are read and resampled by ``captioning.scenes.SceneJob`` in a thread of
their own (a rasterio dataset is one thread's), go through ``service.inference.infer_background`` at
background priority (labels, object instances and optionally a caption per tile, batched with interactive
work by the model pools), and are recorded durably by the SceneJob, so a restart resumes with the tiles not
yet recorded: none is lost or done twice. Progress is counted in tiles in the job store.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from captioning.errors import CaptionerError
from captioning.inference import CaptionParams, ConceptParams, LabelParams
from service.inference import Ctx, Plan, ReadyImage, infer_background, plan
from service.pool import Dropped, PoolClosed
from service.problems import Problem

log = logging.getLogger(__name__)

TILE_BATCH = 16  # tiles read and queued together
OUT_DIR = "scene"  # the SceneJob's folder inside the job's folder
FILES = ("scene.geojson", "coverage.tif", "overlay.png", "preview.png", "summary.json")


class SceneRequest(BaseModel):
    """What a scene job does; validated when it is submitted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str | None = Field(None, description="a raster on the server, under one of CAPTIONER_SCENE_ROOTS "
                             "(instead of an upload)")
    tile: int = Field(256, ge=32, le=4096, description="tile side in model pixels")
    overlap: int = Field(32, ge=0, le=2048, description="overlap of neighbouring tiles in model pixels (< tile)")
    caption: Literal["none", "lightcap", "ucm"] = Field("none", description="caption every tile with this model")
    concepts: bool = Field(True, description="find object instances (merged across tile overlaps)")
    crs: str = Field("scene", pattern=r"^(scene|EPSG:[0-9]{4,6})$",
                     description="CRS of scene.geojson: `scene` (the raster's) or an EPSG code, e.g. `EPSG:4326`")
    bands: str | None = Field(None, pattern=r"^[0-9]{1,3}(,[0-9]{1,3}){0,2}$",
                              description="bands read as R,G,B (or one grey band), 1-based, e.g. `4,3,2`")
    gsd: float | None = Field(None, ge=0.01, le=1000.0, description="the models' ground sample distance in m/pixel "
                              "(default 0.3, UC Merced's); tiles are resampled to it when the scene's is known")
    native: bool = Field(False, description="do not resample: process at the scene's own resolution")
    threshold: float | None = Field(None, ge=0.0, le=1.0, description="labels' decision threshold (default: the "
                                    "model's)")

    def band_tuple(self) -> tuple[int, ...] | None:
        if not self.bands:
            return None
        try:
            return tuple(int(b) for b in self.bands.split(","))
        except ValueError:
            raise Problem("invalid-parameter", f"parameter 'bands': {self.bands!r} is not comma-separated band "
                          "numbers", errors=[{"parameter": "bands", "detail": "e.g. 4,3,2"}]) from None

    def scene_params(self, plans: list[Plan]) -> Any:
        from captioning.scenes import UCM_GSD, SceneParams

        if self.overlap >= self.tile:
            raise Problem("invalid-parameter", f"parameter 'overlap': {self.overlap} must be less than tile "
                          f"({self.tile})", errors=[{"parameter": "overlap", "detail": "less than tile"}])
        return SceneParams(
            tile=self.tile, overlap=self.overlap, bands=self.band_tuple(),
            target_gsd=None if self.native else (self.gsd or UCM_GSD),
            models=tuple(f"{p.runtime.name}@{p.runtime.version}" for p in plans), crs=self.crs,
        )


def scene_plans(ctx: Ctx, req: SceneRequest, models: dict[str, str] | None = None) -> list[Plan]:
    """Labels, then instances and a caption when asked; ``models`` pins the store names chosen at submit."""
    models = models or {}
    plans = [plan(ctx, "labels", LabelParams(threshold=req.threshold), models.get("labels"))]
    if req.concepts:
        plans.append(plan(ctx, "concepts", ConceptParams(), models.get("concepts")))
    if req.caption != "none":
        plans.append(plan(ctx, "caption", CaptionParams(), models.get("caption", req.caption)))
    return plans


def tile_result(record: dict[str, Any]) -> Any:
    """A tile's combined record (``captioning.inference.combine_records``; boxes in the tile picture's pixels)
    as the ``captioning.scenes.TileResult`` a SceneJob records."""
    from captioning.scenes import Instance, TileResult

    return TileResult(
        probabilities=dict(record["labels"]),
        threshold=float(record["threshold"]),
        instances=[Instance(c["concept"], float(c["score"] or 0.0), tuple(c["box"]), c.get("label"))
                   for c in record.get("concepts", [])],
        caption=record.get("caption"),
    )


class EngineInfer:
    """``infer(images) -> list[TileResult]`` over an offline ``service.offline.Engine`` (labels, concepts and
    optionally caption): the CLI's and the benchmark's tiles take the same path and records as the service's."""

    def __init__(self, engine: Any):
        self.engine = engine
        order = {"labels": 0, "concepts": 1, "caption": 2}  # as scene_plans orders them
        self.models = tuple(m for _, m in sorted(zip(engine.kinds, engine.models, strict=True), key=lambda km: order[km[0]]))

    def __call__(self, images: list[Any]) -> list[Any]:
        keys = [f"tile {i}" for i in range(len(images))]
        return [tile_result(record) for record in self.engine.infer_images(images, keys)]

    @classmethod
    def from_store(cls, store_root: Any = None, *, concepts: bool = True, caption: str = "none",
                   **load: Any) -> EngineInfer:
        from service.offline import Engine

        tasks = ["labels"] + (["concepts"] if concepts else []) + ([] if caption == "none" else ["caption"])
        return cls(Engine.from_store(store_root, tasks=tasks, model=None if caption == "none" else caption, **load))


async def run_scene_job(manager: Any, job: dict[str, Any]) -> None:
    """Run (or resume) one scene job to its end, a cancel, or shutdown."""
    from captioning.scenes import SceneJob

    store, ctx, job_id = manager.store, manager.ctx, job["id"]

    async def fail(why: str) -> None:
        await asyncio.to_thread(store.set_state, job_id, "failed", error=why)
        manager.metrics.jobs.labels("failed").inc()

    stored = json.loads(job["params"])
    models = stored.pop("models", {})
    try:
        req = SceneRequest.model_validate(stored)
        plans = scene_plans(ctx, req, models)
        params = req.scene_params(plans)
    except Problem as problem:
        return await fail(problem.detail)
    folder = store.job_dir(job_id)
    uploads = json.loads(job["uploads"])
    source = Path(req.path) if req.path else folder / "uploads" / uploads[0][0]
    reader = ThreadPoolExecutor(1, thread_name_prefix=f"scene-{job_id[:8]}")
    loop = asyncio.get_running_loop()

    def in_reader(fn, *args):
        return loop.run_in_executor(reader, fn, *args)

    try:
        try:
            scene = await in_reader(SceneJob, source, folder / OUT_DIR, params)
        except CaptionerError as exc:
            return await fail(str(exc))
        try:
            await _drive(manager, job, scene, plans, req, in_reader)
        finally:
            await in_reader(scene.close)
    finally:
        reader.shutdown(wait=False)


async def _drive(manager: Any, job: dict[str, Any], scene: Any, plans: list[Plan], req: SceneRequest,
                 in_reader) -> None:
    store, ctx, job_id = manager.store, manager.ctx, job["id"]
    runs = await asyncio.to_thread(store.begin_run, job_id)
    if job["state"] == "queued":
        await asyncio.to_thread(store.set_state, job_id, "running", only_from=("queued",))
        manager.metrics.jobs.labels("started").inc()
    elif runs > 1:
        manager.metrics.jobs.labels("resumed").inc()
    await asyncio.to_thread(store.progress, job_id, scene.total, scene.done)
    pending = await in_reader(scene.pending)
    inflight: set = set()
    manager._inflight[job_id] = inflight
    last_check = time.monotonic()
    try:
        for start in range(0, len(pending), TILE_BATCH):
            if time.monotonic() - last_check > manager.POLL_S:  # a cancel from another process
                last_check = time.monotonic()
                current = await asyncio.to_thread(store.get, job_id)
                if current is None or current["state"] != "running":
                    manager._cancelled.add(job_id)
            if manager._stopping or job_id in manager._cancelled:
                return
            batch = pending[start : start + TILE_BATCH]
            images = await in_reader(lambda b=batch: [scene.read(t) for t in b])
            ready = [ReadyImage(i, f"tile {t.index}", im) for i, (t, im) in enumerate(zip(batch, images, strict=True))
                     if im is not None]
            try:
                outcomes = await infer_background(ctx, ready, plans, timeout=24 * 3600.0, inflight=inflight)
            except (Dropped, PoolClosed, asyncio.CancelledError):
                return  # cancelled or shutting down: these tiles stay pending (a resume runs them)
            results = {r.index: tile_result(o.record()) for r, o in zip(ready, outcomes, strict=True)}
            await in_reader(scene.record_many, [(t, results.get(i)) for i, t in enumerate(batch)])
            await asyncio.to_thread(store.progress, job_id, scene.total, scene.done)
    finally:
        manager._inflight.pop(job_id, None)
    if job_id in manager._cancelled:
        return
    await in_reader(scene.finish, req.crs)
    if await asyncio.to_thread(store.set_state, job_id, "succeeded", only_from=("running",)):
        manager.metrics.jobs.labels("succeeded").inc()
