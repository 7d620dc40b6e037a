"""POST /v1/concepts: every object found in each image (concept word, score, box) with per-concept counts,
or the distinct concept words (``group=concept``); optionally drawn on a PNG."""

from __future__ import annotations

import asyncio
import base64
import io
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from PIL import Image
from pydantic import Field

from captioning.inference import Concept, ConceptParams
from service.deps import get_ctx, require_api_key
from service.inference import Ctx, Outcome, plan
from service.routes.common import IMAGE_RESPONSES, image_body, serve_images

router = APIRouter(prefix="/v1", tags=["concepts"], dependencies=[Depends(require_api_key)])


class ConceptRequest(ConceptParams):
    model: str | None = Field(None, description="concept extractor to use (default: the one served)")
    annotate: bool = Field(False, description="add `annotated_png`: the image with the listed boxes drawn (base64 PNG, "
                           "at most 1024 pixels a side)")


def annotate(image: Image.Image, size: tuple[int, int], concepts: list[dict[str, Any]]) -> str:
    """The uploaded image (``size`` as uploaded; ``image`` may be a smaller copy) with each listed concept's box
    and ``word score`` drawn (the library's drawing)."""
    from captioning.models.lightcap.concepts import draw_concepts

    drawn = [Concept(c["concept"], c["score"] or 0.0, tuple(c["box"]), c["label"]) for c in concepts]
    canvas = draw_concepts(image, drawn, size)  # the record's boxes are in the uploaded image's pixels
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@router.post(
    "/concepts",
    summary="Objects (concept word, score, box) found in each image, with per-concept counts",
    openapi_extra=image_body(ConceptRequest),
    responses=IMAGE_RESPONSES,
)
async def concepts(request: Request, ctx: Annotated[Ctx, Depends(get_ctx)]) -> dict[str, Any]:
    async def draw(outcomes: list[Outcome], results: list[dict[str, Any]]) -> None:
        loop = asyncio.get_running_loop()
        pngs = await asyncio.gather(*(
            loop.run_in_executor(ctx.decode_executor, annotate, o.prepared.decoded.image,
                                 (o.prepared.decoded.width, o.prepared.decoded.height), r["concepts"])
            for o, r in zip(outcomes, results, strict=True)
        ))
        for r, png in zip(results, pngs, strict=True):
            r["annotated_png"] = png

    return await serve_images(request, ctx, "/v1/concepts", ConceptRequest,
                              lambda p: [plan(ctx, "concepts", p, p.model)],
                              after=lambda p: draw if p.annotate else None)
