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
from service.inference import Ctx, header_pixels, overloaded, prepare_one
from service.pool import Overloaded
from service.reading import read_images

STATIC = Path(__file__).resolve().parent / "static"
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
        """The service's own intake (same checks, the decoded-pixel budget) and its kept copy of the image
        (at most ``service.inference.KEPT_SIDE`` a side), as PNG."""
        raws, _ = await read_images(request, 1)
        settings = ctx.settings

        def render() -> bytes:
            kept = prepare_one(raws[0], settings.format_list, settings.max_image_pixels, [], keep_image=True)
            buf = io.BytesIO()
            kept.decoded.image.save(buf, format="PNG")
            return buf.getvalue()

        try:
            pixels = await ctx.pixels.take(header_pixels(raws[0]), 2.0)
        except Overloaded as exc:
            raise overloaded(exc) from None
        try:
            png = await asyncio.get_running_loop().run_in_executor(ctx.decode_executor, render)
        finally:
            await ctx.pixels.give(pixels)
        return Response(png, media_type="image/png")


class _Static(StaticFiles):
    async def get_response(self, path: str, scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(NO_CACHE)
        return response
