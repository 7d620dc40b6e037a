"""The FastAPI application: ``create_app(settings)``; ``captioner serve`` runs it with uvicorn.

routes (service/routes/*: parameters in, records out) -> the one inference path (service/inference.py: plan,
admission, intake in a thread pool, pools, records) -> pools (service/pool.py, per model) -> runtimes
(captioning.inference protocols, built by its task table). Models load in the
background at start-up (``/healthz`` answers at once, ``/readyz`` once they are loaded); shutdown drains:
uvicorn stops accepting and waits for open requests, then the job runner stops feeding, then every pool
runs what is queued and stops.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import captioning
from captioning.store import ModelStore
from service.inference import Ctx
from service.jobs import JobManager
from service.metrics import Metrics
from service.middleware import BodyLimit, RequestMetrics
from service.problems import PROBLEM_MEDIA_TYPE, Problem
from service.registry import ModelRegistry
from service.routes import caption, concepts, health, jobs, labels, models
from service.settings import Settings

log = logging.getLogger("service")

HTTP_SLUGS = {400: "invalid-request", 401: "unauthorized", 403: "forbidden", 404: "not-found",
              405: "method-not-allowed", 413: "payload-too-large", 415: "unsupported-media-type"}


def problem_response(problem: Problem, request: Request) -> JSONResponse:
    return JSONResponse(problem.body(request.url.path), status_code=problem.status, headers=problem.headers,
                        media_type=PROBLEM_MEDIA_TYPE)


def _one_torch_thread() -> None:
    import torch

    torch.set_num_threads(1)  # preprocessing is per image; the replicas own the cores


def create_app(settings: Settings | None = None, *, store: ModelStore | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    store = store or ModelStore(settings.model_store)
    registry = ModelRegistry(settings, store, metrics)
    decode_executor = ThreadPoolExecutor(
        settings.decode_threads, thread_name_prefix="intake", initializer=_one_torch_thread
    )
    ctx = Ctx(settings=settings, metrics=metrics, registry=registry, decode_executor=decode_executor)
    ctx.jobs = JobManager(ctx)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(registry.start(), name="load-models")
        await ctx.jobs.start()
        try:
            yield
        finally:
            ctx.draining = True
            timeout = settings.shutdown_timeout_s
            await ctx.jobs.stop(timeout)
            if not loading.done():
                loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
            await registry.close(timeout)
            decode_executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="captioner",
        version=captioning.__version__,
        summary="Image captioning (LightCap, UCM), concepts and remote-sensing labels",
        description="Errors are `application/problem+json` (RFC 9457); `GET /problems` lists every `type`.",
        lifespan=lifespan,
        docs_url=None,  # served below from the bundled Swagger UI: no CDN is reachable offline
        redoc_url=None,
    )
    _mount_offline_docs(app)
    app.state.settings = settings
    app.state.ctx = ctx

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem):
        if exc.status >= 500 and exc.slug != "client-closed":
            log.warning("%s %s: %s", request.method, request.url.path, exc.detail)
        return problem_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = [
            {"parameter": ".".join(str(p) for p in err["loc"]), "detail": err["msg"]} for err in exc.errors()
        ]
        first = errors[0] if errors else {"parameter": None, "detail": "invalid"}
        return problem_response(
            Problem("invalid-parameter", f"parameter {first['parameter']!r}: {first['detail']}", errors=errors), request
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        slug = HTTP_SLUGS.get(exc.status_code, "invalid-request" if exc.status_code < 500 else "internal-error")
        detail = str(exc.detail)
        if exc.status_code == 404:
            detail = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}"
        return problem_response(Problem(slug, detail, status=exc.status_code, headers=exc.headers), request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return problem_response(
            Problem("internal-error", f"an unexpected {type(exc).__name__}; see the server log"), request
        )

    for router in (caption.router, concepts.router, labels.router, jobs.router, models.router, health.router):
        app.include_router(router)

    def body_limit(scope) -> int:
        if scope.get("method") == "POST" and scope.get("path", "").rstrip("/") == "/v1/jobs":
            return settings.max_job_body_bytes
        return settings.max_body_bytes

    app.add_middleware(BodyLimit, limit_for=body_limit)
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: sees every answer, 413s included
    return app


def _mount_offline_docs(app: FastAPI) -> None:
    """``/docs`` with Swagger UI's files from the swagger-ui-bundle package (FastAPI's self-hosting recipe)."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles
    from swagger_ui_bundle import swagger_ui_path

    app.mount("/docs-static", StaticFiles(directory=str(swagger_ui_path)), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui():
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title=f"{app.title} - API",
            swagger_js_url="/docs-static/swagger-ui-bundle.js",
            swagger_css_url="/docs-static/swagger-ui.css",
            swagger_favicon_url="/docs-static/favicon-32x32.png",
        )
