"""POST /v1/labels: the 17 remote-sensing labels with probabilities and the predicted set."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import Field

from captioning.inference import LabelParams
from service.deps import get_ctx, require_api_key
from service.inference import Ctx, plan
from service.routes.common import IMAGE_RESPONSES, image_body, serve_images

router = APIRouter(prefix="/v1", tags=["labels"], dependencies=[Depends(require_api_key)])


class LabelRequest(LabelParams):
    model: str | None = Field(None, description="label predictor (default: the one served)")


@router.post(
    "/labels",
    summary="Multi-label prediction (17 remote-sensing labels) for each image",
    openapi_extra=image_body(LabelRequest),
    responses=IMAGE_RESPONSES,
)
async def labels(request: Request, ctx: Annotated[Ctx, Depends(get_ctx)]) -> dict[str, Any]:
    return await serve_images(request, ctx, "/v1/labels", LabelRequest,
                              lambda p: [plan(ctx, "labels", p, p.model)])
