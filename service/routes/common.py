"""What the image routes share: one request skeleton (``serve_images``) and the OpenAPI description of the
image body. A route says which request model it takes and which plans (kinds, models, options) that makes;
reading, admission, decoding, the pools and the records are ``service.inference``'s."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from pydantic import BaseModel

from service.inference import Ctx, Outcome, Plan, admit_early, infer
from service.problems import Problem
from service.reading import is_raw_image, parse_params, read_images

AfterHook = Callable[[list[Outcome], list[dict[str, Any]]], Awaitable[None]]


async def serve_images(request: Request, ctx: Ctx, route: str, request_model: type[BaseModel],
                       plans_for: Callable[[Any], list[Plan]],
                       after: Callable[[Any], AfterHook | None] = lambda p: None) -> dict[str, Any]:
    """Parameters in, records out: read the body, validate the parameters (422), plan (404/503/422), run
    every image through ``service.inference.infer``, answer one record per image with its input and timings.
    ``after(params)`` may return a hook that adds to the results; the images are then kept (at most
    ``service.inference.KEPT_SIDE`` pixels a side) for it to draw on."""
    started = time.monotonic()
    deadline = started + ctx.settings.request_timeout_s
    early = _plan_raw_image(request, request_model, plans_for)
    held = await admit_early(ctx, early[1], deadline=deadline) if early else []
    try:
        raws, params = await read_images(request, ctx.settings.max_images_per_request)
        if early:  # a raw image's parameters are the query: planned above
            p, plans = early
        else:
            p = parse_params(request_model, params)
            plans = plans_for(p)
        hook = after(p)
        outcomes = await infer(ctx, raws, plans, deadline=deadline, request=request, keep_image=hook is not None,
                               held=held)
    finally:
        for r in held:  # what infer did not use (or the request failed before it)
            r.release()
    results = [
        {
            "index": o.prepared.decoded.index,
            "filename": o.prepared.decoded.filename,
            **o.record(),
            "input": o.prepared.decoded.info(),
            "timings_ms": o.timings(),
        }
        for o in outcomes
    ]
    if hook is not None:
        await hook(outcomes, results)
    ctx.metrics.images.labels(route).inc(len(results))
    return {"results": results, "total_ms": round((time.monotonic() - started) * 1000.0, 3)}


def _plan_raw_image(request: Request, request_model: type[BaseModel],
                    plans_for: Callable[[Any], list[Plan]]) -> tuple[Any, list[Plan]] | None:
    """A raw image body is one image whose parameters are all in the query, so it is planned, and its queue
    room taken (or waited for, or refused: ``admit_early``), before the body is read. -> (parameters, plans),
    or None for other bodies and for queries that do not plan (their error is reported after reading, as for
    every body; they are admitted in ``infer``)."""
    if not is_raw_image(request):
        return None
    query = {k: v for k, v in request.query_params.items() if k != "filename"}
    try:
        p = parse_params(request_model, query)
        return p, plans_for(p)
    except Problem:
        return None


def image_body(params: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads images itself (multipart, JSON base64 or a raw image)."""
    props = params.model_json_schema().get("properties", {})
    image_item = {
        "oneOf": [
            {"type": "string", "contentEncoding": "base64", "description": "base64 (a data: URL is accepted)"},
            {
                "type": "object",
                "properties": {"data": {"type": "string", "contentEncoding": "base64"}, "filename": {"type": "string"}},
                "required": ["data"],
            },
        ]
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                                      "minItems": 1, "description": "one or more images (any file field name)"},
                            **props,
                        },
                        "required": ["files"],
                        # any other field name may carry a file too; an unknown text field is refused (422)
                        "additionalProperties": {"type": "string", "format": "binary"},
                    }
                },
                "application/json": {
                    "schema": {"type": "object",
                               "properties": {"images": {"type": "array", "items": image_item, "minItems": 1}, **props},
                               "required": ["images"], "additionalProperties": False}
                },
                "image/*": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    }


IMAGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"description": text, "content": {"application/problem+json": {}}}
    for status, text in (
        (400, "bad image or body (invalid-image, empty-image, invalid-base64, no-image, invalid-request)"),
        (401, "API key missing or wrong"),
        (404, "unknown model"),
        (413, "body, image or image count over the caps (payload-too-large, image-too-large, too-many-images)"),
        (415, "not an allowed image format / content type"),
        (422, "invalid parameter"),
        (429, "queue full (overloaded), with Retry-After"),
        (503, "no such model loaded, or shutting down"),
        (504, "deadline exceeded"),
    )
}
