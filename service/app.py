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
import copy
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Mount

import captioning
from captioning.store import ModelStore
from service.inference import Ctx
from service.jobs import JobManager
from service.metrics import Metrics
from service.middleware import BodyLimit, RequestMetrics, UnexpectedErrors
from service.problems import PROBLEM_MEDIA_TYPE, Problem
from service.registry import ModelRegistry
from service.routes import caption, concepts, health, jobs, labels, models, scenes
from service.settings import Settings
from service.web import mount_web

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
    from captioning.accel import keep_triton_out

    keep_triton_out(settings.device_name)  # before the models import torchvision: 80 MiB a CPU server never uses
    if settings.ov_cache_dir is not None:  # read by captioning.ov_runtime at each load (set here for a .env file)
        os.environ["CAPTIONER_OV_CACHE_DIR"] = settings.ov_cache_dir
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
    _truthful_openapi(app, settings)
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
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            allowed = allowed_methods(request.app, request.scope)
            if allowed:
                headers["Allow"] = ", ".join(allowed)
            else:  # under a mount (the Swagger UI files): the mounted app said what it allows
                allowed = [m.strip() for m in headers.get("Allow", "").split(",") if m.strip()]
            detail = f"{request.method} is not allowed on {request.url.path} (allowed: {', '.join(allowed)})"
        return problem_response(Problem(slug, detail, status=exc.status_code, headers=headers), request)

    for router in (caption.router, concepts.router, labels.router, jobs.router, scenes.router, models.router,
                   health.router):
        app.include_router(router)
    mount_web(app)  # the page at / (no key; it asks for one) and its files under /ui/

    def body_limit(scope) -> int:
        if scope.get("method") == "POST":
            path = scope.get("path", "").rstrip("/")
            if path == "/v1/jobs":
                return settings.max_job_body_bytes
            if path == "/v1/scenes":
                return settings.max_scene_body_bytes
        return settings.max_body_bytes

    # innermost: an unexpected exception is answered 500 here and goes no further, so uvicorn keeps the
    # keep-alive connection (Starlette's ServerErrorMiddleware would answer, re-raise, and uvicorn would close it)
    app.add_middleware(UnexpectedErrors)
    app.add_middleware(BodyLimit, limit_for=body_limit)
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: sees every answer, 413s included
    return app


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")


def allowed_methods(app: FastAPI, scope: dict) -> list[str]:
    """Every method the router would fully match on this path. Starlette's 405 names only the methods of
    the first route whose path matched (``/v1/jobs`` is two routes, GET and POST), so the Allow header is
    computed here, by asking the routes (``BaseRoute.matches``) about each method in turn."""
    probe = {key: scope[key] for key in ("path", "root_path", "headers", "query_string") if key in scope}
    probe["type"] = "http"
    routes = [route for route in app.router.routes if not isinstance(route, Mount)]  # a mount takes any method
    return sorted(
        method for method in HTTP_METHODS
        if any(route.matches({**probe, "method": method})[0] == Match.FULL for route in routes)
    )


def openapi_problem_details(schema: dict) -> dict:
    """Make /openapi.json say what is sent: every error response is ``application/problem+json`` with the
    ``Problem`` schema (FastAPI documents 422 as its own ``HTTPValidationError`` JSON, which is never sent)."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["Problem"] = copy.deepcopy(PROBLEM_SCHEMA)
    ref = {"$ref": "#/components/schemas/Problem"}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            for status, response in operation.get("responses", {}).items():
                if str(status)[0] not in "45" and status != "default":
                    continue
                response["content"] = {PROBLEM_MEDIA_TYPE: {"schema": ref}}
                if str(status) == "422" and response.get("description") == "Validation Error":
                    response["description"] = "invalid parameter (type /problems/invalid-parameter; `errors` lists each)"
    for name in ("HTTPValidationError", "ValidationError"):  # in this order: the first refers to the second
        if f'"#/components/schemas/{name}"' not in json.dumps(schema):
            components.pop(name, None)
    return schema


PROBLEM_SCHEMA = {
    "type": "object",
    "description": "RFC 9457 problem details; `GET /problems` lists every `type`.",
    "properties": {
        "type": {"type": "string", "description": "/problems/<slug>"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "errors": {"type": "array", "items": {"type": "object"}, "description": "per-parameter or per-image errors"},
    },
    "required": ["type", "title", "status", "detail"],
}


def openapi_server_limits(schema: dict, settings: Settings) -> dict:
    """The limits this server's settings put on request fields, as schema bounds: ``beam_size`` <=
    CAPTIONER_MAX_BEAM_SIZE, ``max_length`` <= CAPTIONER_MAX_LENGTH_LIMIT, and at most
    CAPTIONER_MAX_IMAGES_PER_REQUEST images on the interactive routes. A value the schema allows is then one
    the server accepts (the parameter models only know the lower bounds; the caps are settings)."""
    caps = {"beam_size": settings.max_beam_size, "max_length": settings.max_length_limit}
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            for content in operation.get("requestBody", {}).get("content", {}).values():
                props = content.get("schema", {}).get("properties", {})
                for name, cap in caps.items():
                    if name in props:
                        _set_maximum(props[name], cap)
                for name in ("images", "files"):
                    if name in props and not path.startswith("/v1/jobs"):
                        props[name]["maxItems"] = settings.max_images_per_request
            for parameter in operation.get("parameters", []):
                if parameter.get("name") in caps:
                    _set_maximum(parameter.setdefault("schema", {}), caps[parameter["name"]])
    return schema


def _set_maximum(prop: dict, maximum: int) -> None:
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") == "integer":
            branch["maximum"] = maximum


def _truthful_openapi(app: FastAPI, settings: Settings) -> None:
    generate = app.openapi  # FastAPI's generator (caches its result in app.openapi_schema)

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = openapi_server_limits(openapi_problem_details(generate()), settings)
        return app.openapi_schema

    app.openapi = openapi


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
