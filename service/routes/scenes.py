"""Scene jobs: POST /v1/scenes, GET /v1/scenes, GET /v1/scenes/{id}, GET /v1/scenes/{id}/results (GeoJSON),
GET /v1/scenes/{id}/files/{name}, DELETE /v1/scenes/{id}. The work is service/scenes.py's."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from captioning.errors import CaptionerError
from service.deps import get_ctx, require_api_key
from service.inference import Ctx
from service.problems import Problem
from service.reading import media_type, parse_params
from service.routes.jobs import save_uploads
from service.scenes import FILES, OUT_DIR, SceneRequest, scene_plans

router = APIRouter(prefix="/v1/scenes", tags=["scenes"], dependencies=[Depends(require_api_key)])
PROBLEMS = {"content": {"application/problem+json": {}}}
MEDIA = {"scene.geojson": "application/geo+json", "coverage.tif": "image/tiff", "overlay.png": "image/png",
         "preview.png": "image/png", "summary.json": "application/json"}


def allowed_path(ctx: Ctx, text: str) -> Path:
    """``path`` resolved, and inside one of CAPTIONER_SCENE_ROOTS (403 otherwise)."""
    roots = ctx.settings.scene_root_list
    if not roots:
        raise Problem("forbidden", "reading scenes by path is off on this server (CAPTIONER_SCENE_ROOTS is unset); "
                      "upload the file instead")
    path = Path(text).expanduser().resolve()
    if not any(path.is_relative_to(root) for root in roots):
        shown = ", ".join(str(r) for r in roots)
        raise Problem("forbidden", f"parameter 'path': {text!r} is not under an allowed folder ({shown}; "
                      "CAPTIONER_SCENE_ROOTS)")
    if not path.is_file():
        raise Problem("invalid-scene", f"parameter 'path': {text!r} is not a file")
    return path


def check_raster(path: Path, bands: tuple[int, ...] | None) -> list[str]:
    """Open the raster once (a corrupt or unreadable file is named now, not when the job runs) -> warnings."""
    from captioning.scenes import SceneReader

    try:
        reader = SceneReader(path, bands=bands)
    except CaptionerError as exc:
        raise Problem("invalid-scene", str(exc)) from None
    try:
        return list(reader.warnings)
    finally:
        reader.close()


@router.post(
    "",
    status_code=202,
    summary="Start a scene job: labels, object instances and optionally captions over a GeoTIFF of any size",
    responses={s: PROBLEMS for s in (400, 401, 403, 404, 413, 415, 422, 503)},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
                    "file": {"type": "string", "format": "binary", "description": "the raster (GeoTIFF, COG, ...)"},
                    **{k: v for k, v in SceneRequest.model_json_schema()["properties"].items() if k != "path"}}}},
                "image/tiff": {"schema": {"type": "string", "format": "binary"}},
                "application/json": {"schema": {
                    **SceneRequest.model_json_schema(), "required": ["path"],
                    "properties": {**SceneRequest.model_json_schema()["properties"],
                                   "path": {"type": "string", "minLength": 1,
                                            "description": "a raster under CAPTIONER_SCENE_ROOTS"}}}},
            },
        }
    },
)
async def create_scene(request: Request, ctx: Annotated[Ctx, Depends(get_ctx)]) -> JSONResponse:
    if ctx.draining:
        raise Problem("shutting-down", "the server is shutting down and takes no new jobs")
    job_id, folder = ctx.jobs.new_job_dir()
    try:
        if media_type(request) == "application/json":
            try:
                params = {**request.query_params, **json.loads(await request.body())}
            except (ValueError, TypeError) as exc:
                raise Problem("invalid-request", f"the JSON body cannot be parsed: {exc}") from None
            uploads: list[list[str]] = []
        else:
            uploads, params = await save_uploads(request, folder / "uploads")
        req = parse_params(SceneRequest, params)
        plans = scene_plans(ctx, req)  # 404 / 503 / 422 now, not when the job runs
        req.scene_params(plans)
        if req.path and uploads:
            raise Problem("invalid-request", "send either a file or `path`, not both")
        if len(uploads) > 1:
            raise Problem("invalid-request", f"a scene job takes one raster, got {len(uploads)} files")
        if req.path:
            source = allowed_path(ctx, req.path)
            req = req.model_copy(update={"path": str(source)})
        elif uploads:
            source = folder / "uploads" / uploads[0][0]
        else:
            raise Problem("no-image", "the scene job carried no raster (upload a file or give `path`)")
        warnings = await asyncio.to_thread(check_raster, source, req.band_tuple())
        stored = {**req.model_dump(exclude_unset=True), **({"path": req.path} if req.path else {}),
                  "models": {p.kind: p.served.name for p in plans}}
        job = await ctx.jobs.create(job_id, plans[0].served.name, stored, uploads, kind="scene")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return JSONResponse({**job, "warnings": warnings}, status_code=202, headers={"Location": f"/v1/scenes/{job_id}"})


@router.get("", summary="Recent scene jobs, newest first")
async def list_scenes(ctx: Annotated[Ctx, Depends(get_ctx)],
                      limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> dict[str, Any]:
    from service.jobs import describe

    rows = await asyncio.to_thread(ctx.jobs.store.list, limit, "scene")
    return {"scenes": [describe(r) for r in rows]}


@router.get("/{job_id}", summary="A scene job's state and progress in tiles", responses={404: PROBLEMS})
async def get_scene(job_id: str, ctx: Annotated[Ctx, Depends(get_ctx)]) -> dict[str, Any]:
    return await ctx.jobs.get(job_id, "scene")


async def _output(ctx: Ctx, job_id: str, name: str) -> Path:
    job = await ctx.jobs.get(job_id, "scene")
    if name not in FILES:
        raise Problem("not-found", f"no output {name!r} (outputs: {', '.join(FILES)})")
    if job["state"] != "succeeded":
        raise Problem("scene-not-ready", f"scene job {job_id} is {job['state']} ({job['done']} of {job['total']} "
                      "tiles); its outputs are written when it succeeds")
    path = ctx.jobs.store.job_dir(job_id) / OUT_DIR / name
    if not path.is_file():
        raise Problem("not-found", f"scene job {job_id} has no {name}")
    return path


@router.get("/{job_id}/results", summary="The scene's GeoJSON FeatureCollection (tiles and objects)",
            response_class=FileResponse,
            responses={200: {"content": {"application/geo+json": {}}}, 404: PROBLEMS, 409: PROBLEMS})
async def scene_results(job_id: str, ctx: Annotated[Ctx, Depends(get_ctx)]) -> FileResponse:
    return FileResponse(await _output(ctx, job_id, "scene.geojson"), media_type=MEDIA["scene.geojson"])


@router.get("/{job_id}/files/{name}", summary="An output file: scene.geojson, coverage.tif, overlay.png, preview.png, summary.json",
            response_class=FileResponse, responses={404: PROBLEMS, 409: PROBLEMS})
async def scene_file(job_id: str, name: str, ctx: Annotated[Ctx, Depends(get_ctx)]) -> FileResponse:
    return FileResponse(await _output(ctx, job_id, name), media_type=MEDIA[name], filename=name)


@router.delete("/{job_id}", summary="Cancel a queued or running scene job (purge=true: also delete it and its files)",
               responses={204: {"description": "purged"}, 404: PROBLEMS, 409: PROBLEMS})
async def cancel_scene(job_id: str, ctx: Annotated[Ctx, Depends(get_ctx)],
                       purge: Annotated[bool, Query(description="delete the job and its files")] = False):
    job = await ctx.jobs.cancel(job_id, purge=purge, kind="scene")
    return Response(status_code=204) if job is None else job
