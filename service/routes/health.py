"""GET /healthz (alive), GET /readyz (models loaded, workers up), GET /metrics, GET /problems/{slug}.
None of these needs an API key."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Response

from service.deps import get_ctx
from service.inference import Ctx
from service.problems import CATALOG, Problem, problem_type

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "alive"}


@router.get("/readyz", summary="Readiness: every configured model loaded and its workers up",
            responses={503: {"content": {"application/problem+json": {}}}})
async def readyz(ctx: Annotated[Ctx, Depends(get_ctx)]) -> dict[str, Any]:
    registry = ctx.registry
    reasons = []
    if ctx.draining:
        reasons.append("shutting down")
    if registry.loading:
        reasons.append("models are loading")
    reasons.extend(f"cannot serve {why}" for why in registry.failures.values())
    if not registry.loading and not registry.served and not registry.failures:
        reasons.append("no servable model in the store (nothing has the alias "
                       f"{ctx.settings.alias!r}); train and publish one, or set CAPTIONER_MODELS")
    reasons.extend(f"{s.name}: workers are down" for s in registry.served.values() if not s.pool.alive)
    if ctx.jobs is not None and not ctx.jobs.alive:
        reasons.append("the job runner is not running")
    if reasons:
        raise Problem("not-ready", "; ".join(reasons), reasons=reasons)
    return {
        "status": "ready",
        "models": {name: s.version for name, s in registry.served.items()},
    }


@router.get("/metrics", summary="Prometheus metrics (text format)", response_class=Response)
async def metrics(ctx: Annotated[Ctx, Depends(get_ctx)]) -> Response:
    body, content_type = ctx.metrics.render()
    return Response(body, media_type=content_type)


@router.get("/problems", summary="Every problem type this service answers with", tags=["problems"])
async def problems() -> list[dict[str, Any]]:
    return [_entry(slug) for slug in CATALOG]


@router.get("/problems/{slug}", summary="What one problem type means", tags=["problems"],
            responses={404: {"description": "no such problem type"}})
async def problem(slug: str) -> dict[str, Any]:
    if slug not in CATALOG:
        raise Problem("not-found", f"no problem type {slug!r} (GET /problems lists them)")
    return _entry(slug)


def _entry(slug: str) -> dict[str, Any]:
    status, title, text = CATALOG[slug]
    return {"type": problem_type(slug), "status": status, "title": title, "description": text}
