"""The one path every image takes inside the service, for routes, batch jobs and scene jobs alike:

    plan (the request's parameters resolved against the chosen models, validated: 422 before any work)
      -> admission (room in each model's queue reserved, decoded-pixel budget taken: 429 before decoding)
      -> decode + preprocess (intake thread pool, off the event loop)
      -> the model pools (batches of equal ``(kind, options)``)
      -> one record per image (``captioning.inference`` record builders: the same dict everywhere)

Routes say which kinds they ask for and how the request's parameters map to them; everything else is here.
Pool outcomes become problems here: 429 overloaded, 504 deadline, 499 client gone, 503 shutting down.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from pydantic import BaseModel

from captioning.inference import KINDS, Frame, Limits, OptionError, combine_records
from service.intake import DecodedImage, ImageProblem, RawImage, combine, decode_image, pillow_open
from service.pool import (
    BACKGROUND,
    INTERACTIVE,
    DeadlineExceeded,
    Dropped,
    Overloaded,
    PoolClosed,
    Reservation,
    WorkItem,
    cancel_items,
    wait_items,
)
from service.problems import Problem, problem_type
from service.registry import ModelRegistry, Served
from service.settings import Settings

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- context
class PixelBudget:
    """Decoded pixels in memory at once, across every request and job (``CAPTIONER_MAX_INFLIGHT_PIXELS``).

    An image takes its pixels (from its header) before it is decoded and gives them back once it is
    preprocessed (the full-size decode is dropped then). Lives on the event loop; no locks."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._changed: asyncio.Condition | None = None

    async def take(self, pixels: int, timeout: float) -> int:
        pixels = min(max(pixels, 1), self.limit)
        if self._changed is None:
            self._changed = asyncio.Condition()
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.used + pixels <= self.limit),
                                       max(timeout, 0.0))
            except TimeoutError:
                raise Overloaded("decoded-image memory", self.used, 1) from None
            self.used += pixels
            self.peak = max(self.peak, self.used)
        return pixels

    async def give(self, pixels: int) -> None:
        if not pixels:
            return
        async with self._changed:
            self.used -= pixels
            self._changed.notify_all()


@dataclass
class Ctx:
    """What routes and jobs need, kept on ``app.state.ctx``."""

    settings: Settings
    metrics: Any
    registry: ModelRegistry
    decode_executor: Executor
    pixels: PixelBudget = None  # type: ignore[assignment]
    jobs: Any = None
    scenes: Any = None
    draining: bool = False

    def __post_init__(self) -> None:
        if self.pixels is None:
            self.pixels = PixelBudget(self.settings.max_inflight_pixels)

    @property
    def limits(self) -> Limits:
        return Limits(self.settings.max_beam_size, self.settings.max_length_limit)


# ---------------------------------------------------------------------------------------------- plans
@dataclass(frozen=True)
class Plan:
    """One kind of a request, resolved before any image is decoded: the model object it runs on (a reload
    meanwhile does not change it), the resolved options and the batch key that equal options share."""

    kind: str
    served: Served
    runtime: Any
    options: Any

    @property
    def key(self) -> BatchKey:
        return BatchKey(self.kind, KINDS[self.kind].batch_key(self.options), self.options)


@dataclass(frozen=True)
class BatchKey:
    """What the pool groups items by: the kind and its options' key; equal keys may share a batch, and the
    batch runs with the (equivalent) options of its first item."""

    kind: str
    key: Hashable
    options: Any = field(compare=False, hash=False)


def plan(ctx: Ctx, kind: str, params: BaseModel, model: str | None = None) -> Plan:
    """Pick the model (404 unknown / 503 unavailable) and resolve ``params`` against it (422 naming the
    parameter and the allowed range)."""
    served = ctx.registry.pick(kind, model)
    runtime = served.runtime
    spec = KINDS[kind]
    try:
        options = spec.resolve(runtime, spec.params.model_validate(params.model_dump(include=set(spec.params.model_fields))),
                               ctx.limits)
    except OptionError as exc:
        raise Problem("invalid-parameter", str(exc), errors=[{"parameter": exc.parameter, "detail": exc.message}]) from None
    return Plan(kind, served, runtime, options)


# ---------------------------------------------------------------------------------------------- images
@dataclass
class Prepared:
    decoded: DecodedImage
    tensors: list[Any]  # one per plan, in plan order
    preprocess_ms: float

    def frame(self, i: int) -> Frame:
        height, width = self.tensors[i].shape[-2:]
        return Frame(self.decoded.width, self.decoded.height, int(width), int(height))


KEPT_SIDE = 1024  # longest side of an image kept after preprocessing (e.g. to draw its boxes on)


@dataclass
class ReadyImage:
    """An image decoded elsewhere (a scene's tile, read and resampled by ``captioning.scenes``): RGB PIL."""

    index: int
    filename: str | None
    image: Any


def header_pixels(raw: RawImage | ReadyImage) -> int:
    """width x height from the image header (no pixel decoded); 1 when the header cannot be read (decoding
    then reports the problem)."""
    if isinstance(raw, ReadyImage):
        return max(1, raw.image.width * raw.image.height)
    try:
        with pillow_open()(io.BytesIO(raw.data)) as image:
            width, height = image.size
        return max(1, width * height)
    except Exception:  # noqa: BLE001 - not an image / corrupt: decode_image names it
        return 1


def prepare_one(raw: RawImage | ReadyImage, formats: list[str], max_pixels: int, preprocessors: Sequence[Any],
                keep_image: bool = False) -> Prepared:
    """Decode and validate one image (``ImageProblem`` names what is wrong), then make each model's input."""
    if isinstance(raw, ReadyImage):
        image = raw.image.convert("RGB")
        decoded = DecodedImage(raw.index, raw.filename, image, "decoded", image.width, image.height)
    else:
        decoded = decode_image(raw, formats=formats, max_pixels=max_pixels)
    start = time.perf_counter()
    tensors = [preprocess(decoded.image) for preprocess in preprocessors]
    # a full-size decode can be 150 MB: only the (small) tensors wait in the queue, and a kept image (to draw
    # on) is a copy of at most KEPT_SIDE pixels a side
    if keep_image and max(decoded.image.size) > KEPT_SIDE:
        kept = decoded.image.copy()
        kept.thumbnail((KEPT_SIDE, KEPT_SIDE))
        decoded.image = kept
    elif not keep_image:
        decoded.image = None
    return Prepared(decoded, tensors, (time.perf_counter() - start) * 1000.0)


@dataclass
class Outcome:
    """One image's answer: per-kind records and the primary kind's pool item (for its timings)."""

    prepared: Prepared
    records: dict[str, dict[str, Any]]
    item: WorkItem

    def record(self) -> dict[str, Any]:
        return combine_records(self.records)

    def timings(self) -> dict[str, float]:
        return {
            "decode_ms": round(self.prepared.decoded.decode_ms, 3),
            "preprocess_ms": round(self.prepared.preprocess_ms, 3),
            "queue_ms": round(self.item.queue_ms, 3),
            "inference_ms": round(self.item.batch_ms, 3),
            "batch_size": self.item.batch_size,
        }


async def client_gone(request: Request) -> None:
    """Finishes when the client disconnects (the body has been read, so only http.disconnect can come)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def error_of(problem: Problem) -> dict[str, Any]:
    """An image's problem as it is written into a job's or a batch's result record."""
    return {"type": problem_type(problem.slug), "status": problem.status,
            "detail": getattr(problem, "message", problem.detail)}


def overloaded(exc: Overloaded) -> Problem:
    return Problem("overloaded", str(exc), headers={"Retry-After": str(exc.retry_after)}, retry_after_s=exc.retry_after)


async def admit_early(ctx: Ctx, plans: Sequence[Plan], *, deadline: float) -> list[Reservation]:
    """Room for one image in every plan's queue, taken before the request's body is read (a raw image body
    holds exactly one image and its parameters are all in the query): a request that waits for room waits
    with its body unread, and one that is refused costs no reading, parsing or decoding. -> the reservations,
    for ``infer(held=...)``; the caller releases them (``Reservation.release``) if it does not get that far.

    Raises Problem: 429 (no room within CAPTIONER_ADMISSION_WAIT_MS), 503 (shutting down)."""
    if ctx.draining:
        raise Problem("shutting-down", "the server is shutting down and takes no new work")
    held: list[Reservation] = []
    try:
        for p in plans:
            held.append(await p.served.pool.admit(1, INTERACTIVE, _admission_wait(ctx, deadline)))
    except BaseException as exc:
        for r in held:
            r.release()
        if isinstance(exc, Overloaded):
            raise overloaded(exc) from None
        if isinstance(exc, PoolClosed):
            raise Problem("shutting-down", str(exc)) from None
        raise
    return held


def _admission_wait(ctx: Ctx, deadline: float) -> float:
    """Seconds a request may wait for queue room: CAPTIONER_ADMISSION_WAIT_MS, within its deadline."""
    return max(0.0, min(ctx.settings.admission_wait_ms / 1000.0, deadline - time.monotonic()))


async def infer(ctx: Ctx, raws: Sequence[RawImage], plans: Sequence[Plan], *, deadline: float,
                request: Request | None = None, keep_image: bool = False,
                held: Sequence[Reservation] = ()) -> list[Outcome]:
    """Run every image of an interactive request through every plan (all or nothing); -> one outcome per
    image, in order. ``held``: room already taken by ``admit_early`` (used here, or given back).

    Raises Problem: the images' problems combined (400/413/415), 429 (no room within
    CAPTIONER_ADMISSION_WAIT_MS: refused before decoding), 504 (deadline), 499 (client gone), 503 (shutting
    down)."""
    if ctx.draining:
        raise Problem("shutting-down", "the server is shutting down and takes no new work")
    try:
        return await _infer(ctx, raws, plans, deadline=deadline, priority=INTERACTIVE, keep_image=keep_image,
                            disconnected=(lambda: client_gone(request)) if request is not None else None,
                            held=held)
    except Overloaded as exc:
        raise overloaded(exc) from None
    except PoolClosed as exc:
        raise Problem("shutting-down", str(exc)) from None
    except DeadlineExceeded:
        raise Problem("deadline-exceeded", f"not answered within the deadline ({ctx.settings.request_timeout_s:g} s, "
                      "CAPTIONER_REQUEST_TIMEOUT_S); queued images were dropped") from None
    except Dropped:
        raise Problem("client-closed", "the client disconnected; its queued images were dropped") from None


async def infer_background(ctx: Ctx, raws: Sequence[RawImage | ReadyImage], plans: Sequence[Plan], *,
                           timeout: float, inflight: set | None = None) -> list[Outcome]:
    """Images of a job (archive entries, scene tiles) at background priority: waits (never refused) while
    interactive work fills the queues. ``inflight`` holds their pool items while they are queued, so a cancel
    can drop them (``Dropped`` then propagates, as does ``PoolClosed`` at shutdown; one image's problem raises
    its ``ImageProblem``)."""
    inflight = set() if inflight is None else inflight
    while True:
        try:
            return await _infer(ctx, raws, plans, deadline=time.monotonic() + timeout, priority=BACKGROUND,
                                inflight=inflight)
        except Overloaded as exc:
            await asyncio.sleep(min(exc.retry_after, 5))


async def _infer(ctx: Ctx, raws: Sequence[RawImage | ReadyImage], plans: Sequence[Plan], *, deadline: float, priority: int,
                 keep_image: bool = False, disconnected=None, inflight: set | None = None,
                 held: Sequence[Reservation] = ()) -> list[Outcome]:
    combined = inflight is None
    reservations: list[Reservation] = []
    unused = list(held)
    try:
        # room in every queue first: overload is refused (or waits, interactive) before an image is decoded
        for p in plans:
            pool = p.served.pool
            taken = next((r for r in unused if r.pool is pool and r.priority == priority), None)
            if taken is not None:
                unused.remove(taken)
                if not taken.grow(len(raws) - taken.count):
                    taken.release()
                    taken = None
            if taken is None:
                taken = (await pool.admit(len(raws), priority, _admission_wait(ctx, deadline))
                         if priority == INTERACTIVE else pool.reserve(len(raws), priority))
            reservations.append(taken)
        prepared = await _prepare(ctx, raws, plans, deadline, keep_image, combined)
        submitted: list[list[WorkItem]] = []
        try:
            for i, (p, reservation) in enumerate(zip(plans, reservations, strict=True)):
                submitted.append(p.served.pool.submit(
                    [pr.tensors[i] for pr in prepared], handle=p.runtime, group=p.key, priority=priority,
                    timeout=deadline - time.monotonic(), reservation=reservation,
                ))
        except (Overloaded, PoolClosed):
            cancel_items([i for items in submitted for i in items])
            raise
    finally:
        for r in [*reservations, *unused]:
            r.release()
    every = [i for items in submitted for i in items]
    if inflight is not None:
        inflight.update(every)
    try:
        await wait_items(every, timeout=deadline - time.monotonic(),
                         disconnected=disconnected() if disconnected is not None else None)
    finally:
        if inflight is not None:
            inflight.difference_update(every)
    outcomes = []
    for n, pr in enumerate(prepared):
        records = {}
        for i, p in enumerate(plans):
            records[p.kind] = KINDS[p.kind].record(submitted[i][n].future.result(), p.runtime, p.options, pr.frame(i))
        outcomes.append(Outcome(pr, records, submitted[0][n]))
    return outcomes


async def _prepare(ctx: Ctx, raws: Sequence[RawImage | ReadyImage], plans: Sequence[Plan], deadline: float,
                   keep_image: bool, combined: bool = True) -> list[Prepared]:
    """Decode and preprocess every image in the intake pool, each after taking its pixels from the budget
    (given back once it is preprocessed); all per-image errors in one problem (``combined``), else the single
    image's own ``ImageProblem``."""
    loop = asyncio.get_running_loop()
    preprocessors = [p.runtime.preprocess for p in plans]
    formats, max_pixels = ctx.settings.format_list, ctx.settings.max_image_pixels

    async def one(raw: RawImage | ReadyImage) -> Prepared:
        pixels = await ctx.pixels.take(header_pixels(raw), min(deadline - time.monotonic(), 2.0))
        try:
            return await loop.run_in_executor(ctx.decode_executor, prepare_one, raw, formats, max_pixels,
                                              preprocessors, keep_image)
        finally:
            await ctx.pixels.give(pixels)

    results = await asyncio.gather(*(one(raw) for raw in raws), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException) and not isinstance(r, ImageProblem):
            raise r
    errors = sorted((r for r in results if isinstance(r, ImageProblem)), key=lambda e: e.index)
    if errors:
        raise combine(errors, len(raws)) if combined else errors[0]
    return results  # type: ignore[return-value]


__all__ = ["BACKGROUND", "INTERACTIVE", "Ctx", "Outcome", "Plan", "Prepared", "ReadyImage", "client_gone", "infer",
           "infer_background", "plan", "prepare_one"]
