"""POST /v1/caption: a caption per image, from lightcap (default once served) or the UCM captioner."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import Field

from captioning.inference import CaptionParams, ConceptParams
from service.deps import get_ctx, require_api_key
from service.inference import Ctx, plan
from service.routes.common import IMAGE_RESPONSES, image_body, serve_images

router = APIRouter(prefix="/v1", tags=["caption"], dependencies=[Depends(require_api_key)])


class CaptionRequest(CaptionParams):
    model: str | None = Field(None, description="`lightcap` or `ucm` (or a served store name); default: lightcap "
                              "when served, else ucm (CAPTIONER_DEFAULT_CAPTION_MODEL)")
    include_concepts: bool = Field(False, description="also return the concept extractor's instances (`concepts`, "
                                   "`counts`, `concepts_model`)")


@router.post(
    "/caption",
    summary="Caption one or several images",
    openapi_extra=image_body(CaptionRequest),
    responses=IMAGE_RESPONSES,
)
async def caption(request: Request, ctx: Annotated[Ctx, Depends(get_ctx)]) -> dict[str, Any]:
    def plans(p: CaptionRequest):
        chosen = [plan(ctx, "caption", p, p.model)]
        if p.include_concepts:
            chosen.append(plan(ctx, "concepts", ConceptParams()))
        return chosen

    return await serve_images(request, ctx, "/v1/caption", CaptionRequest, plans)
