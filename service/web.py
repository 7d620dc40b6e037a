"""The web page for people: ``/`` serves ``service/static/index.html``, ``/ui/*`` its modules and styles.

Plain HTML, CSS and JavaScript modules, no build step and nothing fetched from elsewhere (works offline).
The page itself, its files and ``/ui/config.json`` need no key: the page asks the user for the API key when
the server has one (``api_key_required``), keeps it in the tab's ``sessionStorage`` and sends it as
``Authorization: Bearer`` on every ``/v1`` call. ``POST /ui/preview`` turns an upload the browser cannot
show (TIFF, 16-bit, multi-band) into a PNG with the service's own intake (same checks, same key).
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

import captioning
from service.deps import get_ctx, require_api_key
from service.inference import Ctx
from service.intake import decode_image
from service.reading import read_images

STATIC = Path(__file__).resolve().parent / "static"
PREVIEW_SIDE = 1024  # the preview's longest side; boxes are drawn in the upload's pixels, so only the ratio counts
NO_CACHE = {"Cache-Control": "no-cache"}  # revalidate (ETag) so a new release's page is never mixed with old modules


def mount_web(app: FastAPI) -> None:
    """Serve the page at ``/`` and its files under ``/ui/`` on ``app``."""
    index = STATIC / "index.html"
    if not index.is_file():
        raise RuntimeError(f"the web page's files are missing: {index} (is service/static installed?)")
    app.mount("/ui/static", _Static(directory=str(STATIC)), name="web-static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(index, media_type="text/html; charset=utf-8", headers=NO_CACHE)

    @app.get("/ui/config.json", include_in_schema=False)
    async def config(request: Request) -> dict[str, Any]:
        settings = request.app.state.settings
        return {
            "api_key_required": settings.api_key is not None,
            "admin_routes": settings.admin_key is not None,
            "version": captioning.__version__,
        }

    @app.post("/ui/preview", include_in_schema=False, dependencies=[Depends(require_api_key)])
    async def preview(request: Request, ctx: Annotated[Ctx, Depends(get_ctx)]) -> Response:
        raws, _ = await read_images(request, 1)
        settings = ctx.settings

        def render() -> bytes:
            decoded = decode_image(raws[0], formats=settings.format_list, max_pixels=settings.max_image_pixels)
            image = decoded.image
            image.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            return buf.getvalue()

        png = await asyncio.get_running_loop().run_in_executor(ctx.decode_executor, render)
        return Response(png, media_type="image/png")


class _Static(StaticFiles):
    async def get_response(self, path: str, scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(NO_CACHE)
        return response
