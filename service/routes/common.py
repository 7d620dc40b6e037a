"""Helpers shared by the image routes: the OpenAPI description of the image body, parameter limits."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel

from service.problems import Problem


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


def check_limit(name: str, value: int | None, limit: int, setting: str) -> None:
    if value is not None and value > limit:
        raise Problem(
            "invalid-parameter",
            f"parameter {name!r}: {value} is more than this server allows ({limit}, {setting})",
            errors=[{"parameter": name, "detail": f"at most {limit}"}],
        )


def finite(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


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
