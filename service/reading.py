"""Reading a request's images and parameters, whatever the body type.

* ``multipart/form-data``: every file part is an image (in order); text parts are parameters;
* ``application/json``: ``{"images": ["<base64>" | {"data": "<base64>", "filename": "a.png"}, ...], ...params}``
  (or ``"image": "<base64>"`` for one; ``data:`` URLs accepted);
* ``image/*`` or ``application/octet-stream``: the body is one image.

Query parameters are read too; a body parameter wins over the query. The body-size cap is enforced by
:class:`service.middleware.BodyLimit` while these functions read.

A multipart body must end with its close delimiter (``--BOUNDARY--``): the parser silently drops a part
that is cut off, so a truncated upload would otherwise read as "no image" or lose its last file. The
stream is watched for the delimiter as it is parsed (nothing is buffered for that); without it the answer
is 400 ``invalid-request``.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from service.intake import ImageProblem, RawImage, combine, decode_base64
from service.problems import Problem

JSON_IMAGE_KEYS = ("images", "image")


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


class CloseDelimiterWatch:
    """An ASGI ``receive`` that passes messages through and notes whether ``--BOUNDARY--`` went by."""

    def __init__(self, receive, boundary: bytes):
        self.receive = receive
        self.delimiter = b"--" + boundary + b"--"
        self.tail = b""  # the last len(delimiter) - 1 bytes: a delimiter split across two chunks is found
        self.seen = False

    async def __call__(self):
        message = await self.receive()
        if message["type"] == "http.request" and not self.seen:
            window = self.tail + message.get("body", b"")
            self.seen = self.delimiter in window
            self.tail = window[-(len(self.delimiter) - 1):]
        return message


def multipart_boundary(request: Request) -> bytes | None:
    for part in request.headers.get("content-type", "").split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key.strip().lower() == "boundary" and value.strip().strip('"'):
            return value.strip().strip('"').encode("latin-1")
    return None


async def read_form(request: Request, max_files: int):
    boundary = multipart_boundary(request)
    if boundary is None:
        raise Problem("invalid-request", "the multipart body cannot be parsed: the Content-Type has no boundary")
    watch = CloseDelimiterWatch(request.receive, boundary)
    try:
        form = await Request(request.scope, watch).form(max_files=max_files, max_fields=100)
    except HTTPException as exc:  # starlette's MultiPartException, re-raised as a 400
        detail = str(exc.detail)
        if detail.startswith("Too many files"):
            raise Problem("too-many-images", f"more than {max_files} files in the form") from None
        raise Problem("invalid-request", f"the multipart body cannot be parsed: {detail}") from None
    if not watch.seen:
        await form.close()
        raise Problem("invalid-request", f"the multipart body has no closing boundary (--{boundary.decode('latin-1')}--): "
                      "it was cut off or is malformed, so its last part may be incomplete")
    return form


def is_raw_image(request: Request) -> bool:
    """The body is one image (``image/*`` or ``application/octet-stream``), its parameters in the query."""
    kind = media_type(request)
    return kind.startswith("image/") or kind == "application/octet-stream"


async def read_images(request: Request, max_images: int) -> tuple[list[RawImage], dict[str, Any]]:
    """-> (images in request order, parameters). Raises Problem for an unreadable body."""
    params: dict[str, Any] = dict(request.query_params)
    kind = media_type(request)
    raws: list[RawImage] = []
    if kind == "multipart/form-data":
        form = await read_form(request, max_images)
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                raws.append(RawImage(len(raws), value.filename or None, await value.read()))
                await value.close()
            else:
                params[key] = value
    elif kind == "application/json" or kind.endswith("+json"):
        body = await request.body()
        try:
            doc = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise Problem("invalid-request", f"the JSON body cannot be parsed: {exc}") from None
        if not isinstance(doc, dict):
            raise Problem("invalid-request", f"the JSON body must be an object, got {type(doc).__name__}")
        raws = json_images(doc, max_images)
        params.update({k: v for k, v in doc.items() if k not in JSON_IMAGE_KEYS})
    elif is_raw_image(request):
        raws = [RawImage(0, request.query_params.get("filename"), await request.body())]
        params.pop("filename", None)
    else:
        shown = kind or "none"
        raise Problem(
            "unsupported-media-type",
            f"Content-Type {shown!r} is not accepted; send multipart/form-data, application/json or image/*",
        )
    if not raws:
        raise Problem("no-image", "the request carried no image (multipart file parts, JSON `images`, or an image body)")
    if len(raws) > max_images:
        raise Problem("too-many-images", f"{len(raws)} images in one request; at most {max_images} (use /v1/jobs)")
    return raws, params


def json_images(doc: dict[str, Any], max_images: int) -> list[RawImage]:
    if "images" in doc and "image" in doc:
        raise Problem("invalid-request", "give either `image` or `images`, not both")
    entries = doc.get("images", [doc["image"]] if "image" in doc else [])
    if not isinstance(entries, list):
        raise Problem("invalid-request", "`images` must be a list of base64 strings or {data, filename} objects")
    if len(entries) > max_images:
        raise Problem("too-many-images", f"{len(entries)} images in one request; at most {max_images} (use /v1/jobs)")
    raws, errors = [], []
    for index, entry in enumerate(entries):
        filename = None
        if isinstance(entry, dict):
            filename = entry.get("filename") if isinstance(entry.get("filename"), str) else None
            entry = entry.get("data")
        try:
            raws.append(RawImage(index, filename, decode_base64(entry, index, filename)))
        except ImageProblem as exc:
            errors.append(exc)
    if errors:
        raise combine(errors, len(entries))
    return raws


def parse_params(model: type[BaseModel], params: dict[str, Any]) -> BaseModel:
    """Validate parameters (strings from forms and queries are coerced); unknown names are refused."""
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        errors = [
            {"parameter": ".".join(str(p) for p in err["loc"]) or None, "detail": err["msg"]}
            for err in exc.errors(include_url=False, include_input=False)
        ]
        first = errors[0]
        raise Problem(
            "invalid-parameter",
            f"parameter {first['parameter']!r}: {first['detail']}" + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""),
            errors=errors,
        ) from None
