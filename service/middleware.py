"""Pure ASGI middleware (no BaseHTTPMiddleware: it would buffer streaming responses and hide disconnects).

* :class:`BodyLimit` caps the request body *while it is read*: a declared ``Content-Length`` over the cap
  is answered 413 before reading anything; a body without one (chunked) is counted as it arrives and the
  read fails with 413 as soon as the cap is passed, so an oversize body is never held in memory.
* :class:`UnexpectedErrors` answers an exception no handler took as 500 ``internal-error`` and *returns*:
  Starlette's outermost ``ServerErrorMiddleware`` would send the same answer and then re-raise, and uvicorn
  closes a connection whose app raised -- after a response without ``Connection: close``, so a keep-alive
  client's next request on it was reset. Here the exception ends with the answer and the connection stays
  usable. An exception after the response has started cannot be answered any more: it propagates (uvicorn
  then closes the connection, the only honest end of a half-sent body).
* :class:`RequestMetrics` counts requests and observes latency by route template (``/v1/jobs/{job_id}``,
  never the raw path, so label cardinality stays bounded) and status.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from service.problems import PROBLEM_MEDIA_TYPE, Problem

log = logging.getLogger(__name__)


async def send_problem(send, problem: Problem, instance: str | None = None) -> None:
    body = json.dumps(problem.body(instance)).encode()
    headers = [(b"content-type", PROBLEM_MEDIA_TYPE.encode()), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in problem.headers.items()]
    await send({"type": "http.response.start", "status": problem.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ResponseWatch:
    """Wraps an ASGI ``send``: ``status`` is the response's status once it has started (None before), so a
    middleware knows whether it may still answer with a problem and what was answered."""

    def __init__(self, send):
        self.send = send
        self.status: int | None = None

    async def __call__(self, message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        await self.send(message)


class BodyLimit:
    def __init__(self, app, limit_for: Callable[[dict], int]):
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope)
        declared = None
        for key, value in scope["headers"]:
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
        if declared is not None and declared > limit:
            return await send_problem(send, too_large(declared, limit, declared=True), scope.get("path"))
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large(received, limit, declared=False)
            return message

        watch = ResponseWatch(send)
        try:
            await self.app(scope, limited_receive, watch)
        except Problem as problem:  # raised while reading, outside the app's own handlers
            if watch.status is not None:
                raise
            await send_problem(send, problem, scope.get("path"))


def too_large(size: int, limit: int, *, declared: bool) -> Problem:
    what = f"Content-Length {size}" if declared else f"more than {limit} bytes received"
    return Problem("payload-too-large", f"request body too large ({what}; the cap is {limit} bytes)", limit_bytes=limit)


class UnexpectedErrors:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        watch = ResponseWatch(send)
        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            if watch.status is not None:
                raise
            log.error("%s %s failed", scope.get("method"), scope.get("path"), exc_info=exc)
            problem = Problem("internal-error", f"an unexpected {type(exc).__name__}; see the server log")
            await send_problem(send, problem, scope.get("path"))


class RequestMetrics:
    def __init__(self, app, metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        watch = ResponseWatch(send)
        try:
            await self.app(scope, receive, watch)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "<unmatched>"
            labels = (template, scope.get("method", ""), str(watch.status or 500))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - start)
