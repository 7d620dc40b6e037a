"""GET /v1/models, GET /v1/models/{name}, POST /v1/models/{name}/reload (admin)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends

from service.deps import get_ctx, require_admin_key, require_api_key
from service.inference import Ctx
from service.problems import Problem

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", summary="Served models: versions, aliases, metrics", dependencies=[Depends(require_api_key)])
async def list_models(ctx: Annotated[Ctx, Depends(get_ctx)]) -> dict[str, Any]:
    registry = ctx.registry
    try:
        default = registry.pick("caption").name
    except Problem:
        default = None
    return {
        "models": await asyncio.to_thread(lambda: [registry.describe(name) for name in list(registry.served)]),
        "default_caption_model": default,
        "alias": ctx.settings.alias,
        "device": ctx.settings.device_name,
        "precision": ctx.settings.precision_name,
        "loading": registry.loading,
        "failures": registry.failures,
    }


@router.get("/{name}", summary="One served model", dependencies=[Depends(require_api_key)],
            responses={404: {"content": {"application/problem+json": {}}}})
async def get_model(name: str, ctx: Annotated[Ctx, Depends(get_ctx)]) -> dict[str, Any]:
    if name not in ctx.registry.served:
        raise Problem("unknown-model", f"model {name!r} is not served here (served: {', '.join(ctx.registry.served) or 'none'})")
    return await asyncio.to_thread(ctx.registry.describe, name)


@router.post(
    "/{name}/reload",
    summary="Swap to the alias's current version (admin); a version failing verification is refused",
    dependencies=[Depends(require_admin_key)],
    responses={s: {"content": {"application/problem+json": {}}} for s in (401, 403, 404, 409)},
)
async def reload_model(name: str, ctx: Annotated[Ctx, Depends(get_ctx)]) -> dict[str, Any]:
    outcome = await ctx.registry.reload(name)
    return {**outcome, "model": await asyncio.to_thread(ctx.registry.describe, name)}
