"""POST /v1/concepts: the visual concepts in each image, with scores and boxes (optionally drawn on a PNG)."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from service.deps import get_ctx, require_api_key
from service.flow import Ctx, Prepared, Work, prepare, run, timings
from service.reading import parse_params, read_images
from service.routes.common import IMAGE_RESPONSES, finite, image_body

router = APIRouter(prefix="/v1", tags=["concepts"], dependencies=[Depends(require_api_key)])


class ConceptParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="concept extractor to use (default: the one served)")
    top_k: int | None = Field(None, ge=1, le=100, description="keep the k highest-scoring concepts")
    min_score: float = Field(0.0, ge=0.0, le=1.0, description="drop concepts scoring below this")
    annotate: bool = Field(False, description="add `annotated_png`: the image with the boxes drawn (base64 PNG)")


def select(concepts: list[Any], *, top_k: int | None = None, min_score: float = 0.0) -> list[Any]:
    """Best first, at least ``min_score``, at most ``top_k``."""
    kept = [c for c in sorted(concepts, key=lambda c: -float(c.score)) if float(c.score) >= min_score]
    return kept[:top_k] if top_k else kept


def concept_dicts(concepts: list[Any], prepared: Prepared, tensor: Any) -> list[dict[str, Any]]:
    """Concepts as JSON, boxes mapped from the model's input pixels to the uploaded image's pixels (after
    EXIF orientation); preprocessing resizes the whole image, so the map is a per-axis scale."""
    height, width = tensor.shape[-2:]
    sx, sy = prepared.decoded.width / width, prepared.decoded.height / height
    out = []
    for c in concepts:
        x1, y1, x2, y2 = (float(v) for v in c.box)
        out.append({
            "concept": c.concept,
            "score": finite(c.score),
            "box": [round(x1 * sx, 2), round(y1 * sy, 2), round(x2 * sx, 2), round(y2 * sy, 2)],
            "label": getattr(c, "label", None),
        })
    return out


def annotate(image: Image.Image, concepts: list[Any], tensor: Any) -> str:
    """The uploaded image with each concept's box and ``word score`` drawn (the library's drawing), base64 PNG."""
    from captioning.models.lightcap.concepts import draw_concepts

    height, width = tensor.shape[-2:]
    canvas = draw_concepts(image, concepts, (width, height))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@router.post(
    "/concepts",
    summary="Concepts (words) found in each image, with scores and boxes",
    openapi_extra=image_body(ConceptParams),
    responses=IMAGE_RESPONSES,
)
async def concepts(request: Request, ctx: Annotated[Ctx, Depends(get_ctx)]) -> dict[str, Any]:
    started = time.monotonic()
    deadline = started + ctx.settings.request_timeout_s
    raws, params = await read_images(request, ctx.settings.max_images_per_request)
    p = parse_params(ConceptParams, params)
    served = ctx.registry.get(p.model, "concepts") if p.model else ctx.registry.first("concepts")
    handle = served.model
    prepared = await prepare(ctx, raws, [handle], keep_image=p.annotate)
    (items,) = await run(ctx, [Work(served, handle, None, [pr.tensors[0] for pr in prepared])],
                         deadline=deadline, request=request)
    results, chosen = [], []
    for pr, item in zip(prepared, items, strict=True):
        kept = select(item.future.result(), top_k=p.top_k, min_score=p.min_score)
        chosen.append(kept)
        found = concept_dicts(kept, pr, pr.tensors[0])
        results.append({
            "index": pr.decoded.index,
            "filename": pr.decoded.filename,
            "concepts": found,
            "model": handle.name,
            "version": handle.version,
            "input": pr.decoded.info(),
            "timings_ms": timings(pr, item),
        })
    if p.annotate:
        loop = asyncio.get_running_loop()
        pngs = await asyncio.gather(*(
            loop.run_in_executor(ctx.decode_executor, annotate, pr.decoded.image, kept, pr.tensors[0])
            for pr, kept in zip(prepared, chosen, strict=True)
        ))
        for r, png in zip(results, pngs, strict=True):
            r["annotated_png"] = png
    ctx.metrics.images.labels("/v1/concepts").inc(len(results))
    return {"results": results, "total_ms": round((time.monotonic() - started) * 1000.0, 3)}
