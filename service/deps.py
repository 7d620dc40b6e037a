"""FastAPI dependencies: the app's state objects and the API-key / admin-key checks.

Keys are read from ``Authorization: Bearer KEY`` or ``X-API-Key: KEY`` and compared in constant time.
``/healthz``, ``/readyz``, ``/metrics``, ``/docs``, ``/openapi.json`` and ``/problems/*`` need no key.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request

from service.problems import Problem
from service.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_ctx(request: Request):
    return request.app.state.ctx


def presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    key = request.headers.get("x-api-key")
    return key.strip() if key else None


def _matches(key: str | None, secret) -> bool:
    return key is not None and secret is not None and secrets.compare_digest(
        key.encode(), secret.get_secret_value().encode()
    )


def require_api_key(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> None:
    if settings.api_key is None:
        return
    key = presented_key(request)
    if _matches(key, settings.api_key) or _matches(key, settings.admin_key):
        return
    why = "no API key was sent" if key is None else "the API key is not valid"
    raise Problem("unauthorized", f"{why}; send `Authorization: Bearer KEY`", headers={"WWW-Authenticate": "Bearer"})


def require_admin_key(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> None:
    if settings.admin_key is None:
        raise Problem("forbidden", "admin routes are disabled on this server (CAPTIONER_ADMIN_KEY is not set)")
    key = presented_key(request)
    if key is None:
        raise Problem(
            "unauthorized", "this admin route needs the admin key: `Authorization: Bearer KEY`",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not _matches(key, settings.admin_key):
        raise Problem("forbidden", "the key sent is not the admin key")
