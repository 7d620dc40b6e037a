"""POST /v1/labels: the 17 remote-sensing labels with probabilities and the predicted set."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from service.deps import get_ctx, require_api_key
from service.flow import Ctx, Work, prepare, run, timings
from service.reading import parse_params, read_images
from service.routes.common import IMAGE_RESPONSES, image_body

router = APIRouter(prefix="/v1", tags=["labels"], dependencies=[Depends(require_api_key)])


class LabelParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="label predictor (default: the one served)")
    threshold: float | None = Field(None, ge=0.0, le=1.0, description="override the model's decision threshold")


@router.post(
    "/labels",
    summary="Multi-label prediction (17 remote-sensing labels) for each image",
    openapi_extra=image_body(LabelParams),
    responses=IMAGE_RESPONSES,
)
async def labels(request: Request, ctx: Annotated[Ctx, Depends(get_ctx)]) -> dict[str, Any]:
    started = time.monotonic()
    deadline = started + ctx.settings.request_timeout_s
    raws, params = await read_images(request, ctx.settings.max_images_per_request)
    p = parse_params(LabelParams, params)
    served = ctx.registry.get(p.model, "labels") if p.model else ctx.registry.first("labels")
    handle = served.model
    prepared = await prepare(ctx, raws, [handle])
    (items,) = await run(ctx, [Work(served, handle, None, [pr.tensors[0] for pr in prepared])],
                         deadline=deadline, request=request)
    names = list(handle.labels)
    threshold = float(handle.threshold) if p.threshold is None else p.threshold
    results = []
    for pr, item in zip(prepared, items, strict=True):
        probs = item.future.result()
        results.append({
            "index": pr.decoded.index,
            "filename": pr.decoded.filename,
            "labels": {name: round(float(v), 6) for name, v in zip(names, probs, strict=True)},
            "predicted": [name for name, v in zip(names, probs, strict=True) if v >= threshold],
            "threshold": threshold,
            "model": handle.name,
            "version": handle.version,
            "input": pr.decoded.info(),
            "timings_ms": timings(pr, item),
        })
    ctx.metrics.images.labels("/v1/labels").inc(len(results))
    return {"results": results, "total_ms": round((time.monotonic() - started) * 1000.0, 3)}
