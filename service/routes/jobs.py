"""Batch caption jobs: POST /v1/jobs, GET /v1/jobs, GET /v1/jobs/{id}, GET /v1/jobs/{id}/results, DELETE."""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import Field
from starlette.datastructures import UploadFile

from captioning.inference import CaptionParams, ConceptParams, LabelParams, OptionError, parse_kinds
from service.deps import get_ctx, require_api_key
from service.inference import Ctx, Plan, plan
from service.problems import Problem
from service.reading import media_type, parse_params, read_form

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(require_api_key)])

RAW_TYPES = (
    "application/zip", "application/x-zip-compressed", "application/x-tar", "application/gzip", "application/x-gzip",
    "application/x-bzip2", "application/x-xz", "application/octet-stream",
)
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
PROBLEMS = {"content": {"application/problem+json": {}}}


class JobParams(CaptionParams, LabelParams, ConceptParams):
    """Every kind's parameters (validated against the chosen models when the job is submitted: 422 then, not
    a failure per entry) plus which kinds to run and the captioner."""

    tasks: str = Field("caption", description="comma-separated kinds to run per image: caption, labels, concepts "
                       "(one record per image carries them all)")
    model: str | None = Field(None, description="captioner (`lightcap`, `ucm`); default as for /v1/caption")

    def plans(self, ctx: Ctx) -> list[Plan]:
        try:
            kinds = parse_kinds(self.tasks)
        except OptionError as exc:
            raise Problem("invalid-parameter", str(exc), errors=[{"parameter": "tasks", "detail": exc.message}]) from None
        return [plan(ctx, kind, self, self.model if kind == "caption" else None) for kind in kinds]


def _stored_name(n: int, original: str) -> str:
    return f"{n:03d}-{_SAFE.sub('_', Path(original.replace(chr(92), '/')).name)[-80:] or 'upload'}"


async def save_uploads(request: Request, folder: Path) -> tuple[list[list[str]], dict[str, Any]]:
    """Store the body's files under ``folder``; -> ([[stored name, original name]], parameters)."""
    params: dict[str, Any] = dict(request.query_params)
    uploads: list[list[str]] = []
    kind = media_type(request)
    if kind == "multipart/form-data":
        form = await read_form(request, max_files=10_000)
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                original = value.filename or f"upload-{len(uploads)}"
                stored = _stored_name(len(uploads), original)
                await asyncio.to_thread(_copy, value.file, folder / stored)
                await value.close()
                uploads.append([stored, original])
            else:
                params[key] = value
    elif kind in RAW_TYPES or kind.startswith("image/"):
        original = params.pop("filename", None) or "upload"
        stored = _stored_name(0, original)
        with open(folder / stored, "wb") as out:
            async for chunk in request.stream():
                if chunk:
                    await asyncio.to_thread(out.write, chunk)
        uploads.append([stored, original])
    else:
        raise Problem(
            "unsupported-media-type",
            f"Content-Type {kind or 'none'!r} is not accepted; send multipart/form-data files, or a zip/tar "
            "archive or image as the body",
        )
    return uploads, params


def _copy(src, target: Path) -> None:
    src.seek(0)
    with open(target, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)


@router.post(
    "",
    status_code=202,
    summary="Start a batch caption job from a zip/tar archive or several image files",
    responses={s: PROBLEMS for s in (400, 401, 404, 413, 415, 422)},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
                    "files": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1,
                              "description": "zip / tar(.gz/.bz2/.xz) archives and/or images"},
                    **JobParams.model_json_schema()["properties"]},
                    "additionalProperties": {"type": "string", "format": "binary"}}},
                "application/zip": {"schema": {"type": "string", "format": "binary"}},
                "application/x-tar": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    },
)
async def create_job(request: Request, ctx: Annotated[Ctx, Depends(get_ctx)]) -> JSONResponse:
    if ctx.draining:
        raise Problem("shutting-down", "the server is shutting down and takes no new jobs")
    job_id, folder = ctx.jobs.new_job_dir()
    try:
        uploads, params = await save_uploads(request, folder / "uploads")
        p = parse_params(JobParams, params)
        plans = p.plans(ctx)  # 422 / 404 / 503 now, not per entry
        if not uploads:
            raise Problem("no-image", "the job carried no file (send an archive or images)")
        stored = {**p.model_dump(exclude_unset=True), "models": {pl.kind: pl.served.name for pl in plans}}
        job = await ctx.jobs.create(job_id, plans[0].served.name, stored, uploads)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return JSONResponse(job, status_code=202, headers={"Location": f"/v1/jobs/{job_id}"})


@router.get("", summary="Recent jobs, newest first")
async def list_jobs(ctx: Annotated[Ctx, Depends(get_ctx)],
                    limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> dict[str, Any]:
    from service.jobs import describe

    rows = await asyncio.to_thread(ctx.jobs.store.list, limit)
    return {"jobs": [describe(r) for r in rows]}


@router.get("/{job_id}", summary="A job's state and progress", responses={404: PROBLEMS})
async def get_job(job_id: str, ctx: Annotated[Ctx, Depends(get_ctx)]) -> dict[str, Any]:
    return await ctx.jobs.get(job_id)


@router.get(
    "/{job_id}/results",
    summary="The job's finished entries as JSON lines (input order); a running job streams what is done so far",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-ndjson": {}}}, 404: PROBLEMS},
)
async def job_results(job_id: str, ctx: Annotated[Ctx, Depends(get_ctx)]) -> StreamingResponse:
    job = await ctx.jobs.get(job_id)
    store = ctx.jobs.store

    async def lines():
        after = -1
        while page := await asyncio.to_thread(store.results, job_id, after):
            yield "".join(text + "\n" for _, text in page).encode()
            after = page[-1][0]

    return StreamingResponse(lines(), media_type="application/x-ndjson",
                             headers={"X-Job-State": job["state"], "X-Job-Progress": str(job["progress"])})


@router.delete(
    "/{job_id}",
    summary="Cancel a queued or running job (purge=true: also delete its record and files)",
    responses={204: {"description": "purged"}, 404: PROBLEMS, 409: PROBLEMS},
)
async def cancel_job(job_id: str, ctx: Annotated[Ctx, Depends(get_ctx)],
                     purge: Annotated[bool, Query(description="delete the job and its files")] = False):
    job = await ctx.jobs.cancel(job_id, purge=purge)
    if job is None:
        return Response(status_code=204)
    return job
