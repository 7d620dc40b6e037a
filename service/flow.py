"""The path every interactive image takes: intake (decode + preprocess in the intake thread pool) ->
the model pools -> results with per-stage timings. Pool outcomes become problems here."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from service.intake import DecodedImage, ImageProblem, RawImage, combine, decode_image
from service.pool import (
    BACKGROUND,
    INTERACTIVE,
    DeadlineExceeded,
    Dropped,
    Overloaded,
    PoolClosed,
    WorkItem,
    cancel_items,
    wait_items,
)
from service.problems import Problem
from service.registry import ModelRegistry, Served
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Ctx:
    """What routes need, kept on ``app.state.ctx``."""

    settings: Settings
    metrics: Any
    registry: ModelRegistry
    decode_executor: Executor
    jobs: Any = None
    draining: bool = False


@dataclass
class Prepared:
    decoded: DecodedImage
    tensors: list[Any]  # one per model handle, in the order given to ``prepare``
    preprocess_ms: float


def prepare_one(raw: RawImage, settings: Settings, handles: Sequence[Any], keep_image: bool = False) -> Prepared:
    decoded = decode_image(raw, formats=settings.format_list, max_pixels=settings.max_image_pixels)
    start = time.perf_counter()
    tensors = [handle.preprocess(decoded.image) for handle in handles]
    if not keep_image:  # a full-size decode can be 150 MB; only the (small) tensors wait in the queue
        decoded.image = None
    return Prepared(decoded, tensors, (time.perf_counter() - start) * 1000.0)


async def prepare(ctx: Ctx, raws: Sequence[RawImage], handles: Sequence[Any], *, keep_image: bool = False
                  ) -> list[Prepared]:
    """Decode and preprocess every image in the intake pool; all per-image errors in one problem."""
    loop = asyncio.get_running_loop()
    futures = [loop.run_in_executor(ctx.decode_executor, prepare_one, raw, ctx.settings, handles, keep_image)
               for raw in raws]
    results = await asyncio.gather(*futures, return_exceptions=True)
    errors = [r for r in results if isinstance(r, ImageProblem)]
    for r in results:
        if isinstance(r, BaseException) and not isinstance(r, ImageProblem):
            raise r
    if errors:
        raise combine(sorted(errors, key=lambda e: e.index), len(raws))
    return results  # type: ignore[return-value]


async def client_gone(request: Request) -> None:
    """Finishes when the client disconnects (the body has been read, so only http.disconnect can come)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


@dataclass
class Work:
    served: Served
    handle: Any
    group: Hashable
    payloads: list[Any]


async def run(ctx: Ctx, works: Sequence[Work], *, deadline: float, request: Request | None = None,
              priority: int = INTERACTIVE) -> list[list[WorkItem]]:
    """Queue every work's payloads (all or nothing), wait until all ran; -> items per work (results in
    ``item.future``). Maps pool outcomes to problems: 429 overloaded, 504 deadline, 503 shutting down."""
    if ctx.draining:
        raise Problem("shutting-down", "the server is shutting down and takes no new work")
    submitted: list[list[WorkItem]] = []
    timeout = deadline - time.monotonic()
    try:
        for work in works:
            submitted.append(
                work.served.pool.submit(
                    work.payloads, handle=work.handle, group=work.group, priority=priority, timeout=timeout
                )
            )
    except Overloaded as exc:
        cancel_items([i for items in submitted for i in items])
        raise Problem(
            "overloaded", str(exc), headers={"Retry-After": str(exc.retry_after)}, retry_after_s=exc.retry_after
        ) from None
    except PoolClosed as exc:
        cancel_items([i for items in submitted for i in items])
        raise Problem("shutting-down", str(exc)) from None
    every = [i for items in submitted for i in items]
    try:
        await wait_items(every, timeout=deadline - time.monotonic(),
                         disconnected=client_gone(request) if request is not None else None)
    except DeadlineExceeded:
        raise Problem(
            "deadline-exceeded",
            f"not answered within {ctx.settings.request_timeout_s:g} s; queued images were dropped",
        ) from None
    except Dropped:
        raise Problem("client-closed", "the client disconnected; its queued images were dropped") from None
    except PoolClosed as exc:
        raise Problem("shutting-down", str(exc)) from None
    return submitted


def timings(prepared: Prepared, item: WorkItem) -> dict[str, float]:
    return {
        "decode_ms": round(prepared.decoded.decode_ms, 3),
        "preprocess_ms": round(prepared.preprocess_ms, 3),
        "queue_ms": round(item.queue_ms, 3),
        "inference_ms": round(item.batch_ms, 3),
        "batch_size": item.batch_size,
    }


__all__ = ["BACKGROUND", "INTERACTIVE", "Ctx", "Prepared", "Work", "client_gone", "prepare", "prepare_one", "run"]
