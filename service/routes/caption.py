"""POST /v1/caption: a caption per image, from lightcap (default once served) or the UCM captioner."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from service.deps import get_ctx, require_api_key
from service.flow import Ctx, Work, prepare, run, timings
from service.reading import parse_params, read_images
from service.routes.common import IMAGE_RESPONSES, check_limit, finite, image_body
from service.routes.concepts import concept_dicts

router = APIRouter(prefix="/v1", tags=["caption"], dependencies=[Depends(require_api_key)])


class CaptionParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="`lightcap` or `ucm` (or a served store name); default: lightcap "
                              "when served, else ucm (CAPTIONER_DEFAULT_CAPTION_MODEL)")
    beam_size: int | None = Field(None, ge=1, description="beam width (1: greedy; default: the model's published "
                                  "decoding); at most CAPTIONER_MAX_BEAM_SIZE")
    max_length: int | None = Field(None, ge=1, description="longest caption in tokens (default: the model's)")
    include_concepts: bool = Field(False, description="also return the concept extractor's concepts")


@router.post(
    "/caption",
    summary="Caption one or several images",
    openapi_extra=image_body(CaptionParams),
    responses=IMAGE_RESPONSES,
)
async def caption(request: Request, ctx: Annotated[Ctx, Depends(get_ctx)]) -> dict[str, Any]:
    started = time.monotonic()
    deadline = started + ctx.settings.request_timeout_s
    raws, params = await read_images(request, ctx.settings.max_images_per_request)
    p = parse_params(CaptionParams, params)
    check_limit("beam_size", p.beam_size, ctx.settings.max_beam_size, "CAPTIONER_MAX_BEAM_SIZE")
    check_limit("max_length", p.max_length, ctx.settings.max_length_limit, "CAPTIONER_MAX_LENGTH_LIMIT")
    registry = ctx.registry
    served = registry.get(p.model, "caption") if p.model else registry.default_captioner()
    handle = served.model  # this request runs on this object even if a reload swaps it meanwhile
    handles = [handle]
    if p.include_concepts:
        concept_served = registry.first("concepts")
        handles.append(concept_served.model)
    prepared = await prepare(ctx, raws, handles)
    works = [Work(served, handle, (p.beam_size, p.max_length), [pr.tensors[0] for pr in prepared])]
    if p.include_concepts:
        works.append(Work(concept_served, handles[1], None, [pr.tensors[1] for pr in prepared]))
    ran = await run(ctx, works, deadline=deadline, request=request)
    results = []
    for i, pr in enumerate(prepared):
        item = ran[0][i]
        out = item.future.result()
        result = {
            "index": pr.decoded.index,
            "filename": pr.decoded.filename,
            "caption": out.text,
            "score": finite(out.score),
            "tokens": list(out.tokens),
            **({"extra": out.extra} if getattr(out, "extra", None) else {}),  # model-specific, e.g. LightCap's concepts
            "model": handle.name,
            "version": handle.version,
            "input": pr.decoded.info(),
            "timings_ms": timings(pr, item),
        }
        if p.include_concepts:
            result["concepts"] = concept_dicts(ran[1][i].future.result(), pr, pr.tensors[1])
            result["concepts_model"] = {"name": handles[1].name, "version": handles[1].version}
        results.append(result)
    ctx.metrics.images.labels("/v1/caption").inc(len(results))
    return {"results": results, "total_ms": round((time.monotonic() - started) * 1000.0, 3)}
