"""Per-model batching pool: bounded priority queue -> batcher -> worker replicas.

Why asyncio for the queue and threads for the work: admission, deadlines, cancellation and batch forming
are bookkeeping that must react within microseconds to many concurrent requests, which is what the event
loop is for (no locks: everything but ``run_batch`` runs on the loop). The model forward pass is a blocking
torch call that releases the GIL, so it runs on a ``ThreadPoolExecutor`` with one thread per replica, each
thread pinned to ``torch_threads`` intra-op threads (torch's thread count is per calling thread). Replicas
share the model's read-only weights, so a second replica costs threads, not memory.

Life of an item: ``reserve`` / ``admit`` (admission, before the caller decodes anything: at most ``capacity``
queued or reserved items per priority; ``admit`` lets a request wait up to ``wait_s`` in a bounded FIFO waiting
room for that room to free, else :class:`Overloaded` with a Retry-After estimate) -> ``submit`` with that
reservation -> queued -> the batcher, once a replica is free, takes the
oldest highest-priority item and adds compatible items (same model object, same decode parameters) until
``max_batch_size`` or ``max_wait_ms`` has passed, waiting only while more are on their way (admitted
requests still being read and decoded hold reservations; with none, nothing can join, so the batch runs at
once) -> items whose deadline has passed or whose caller went away are dropped right before the batch runs
-> ``run_batch(handle, group, payloads)`` in a replica thread -> each item's future gets its result (or the
batch's exception).

Because an item carries the model object (``handle``) that preprocessed it, a hot swap never mixes
versions in one batch: items queued before the swap run on the old object, later ones on the new.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

INTERACTIVE = 0
BACKGROUND = 1
PRIORITY_NAMES = {INTERACTIVE: "interactive", BACKGROUND: "background"}


class Overloaded(Exception):
    def __init__(self, name: str, depth: int, retry_after: int):
        super().__init__(f"model {name!r}: queue full ({depth} queued); retry after {retry_after} s")
        self.retry_after = retry_after


class DeadlineExceeded(Exception):
    pass


class Dropped(Exception):
    """The item was cancelled (caller gone or gave up) before it ran."""


class PoolClosed(Exception):
    pass


@dataclass(eq=False)
class WorkItem:
    payload: Any
    handle: Any  # the model object that runs it
    group: Hashable  # items with equal handle and group may share a batch
    priority: int
    deadline: float  # time.monotonic()
    enqueued: float
    future: asyncio.Future
    owner: BatchPool
    state: str = "queued"  # queued -> forming -> running -> done | dropped
    started: float = 0.0
    batch_size: int = 0
    batch_ms: float = 0.0

    @property
    def queue_ms(self) -> float:
        return (self.started - self.enqueued) * 1000.0 if self.started else 0.0


@dataclass
class PoolStats:
    batches: int = 0
    items: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: {"deadline": 0, "cancelled": 0})
    ewma_batch_s: float = 0.0


BatchFn = Callable[[Any, Hashable, list[Any]], Sequence[Any]]  # (runtime, batch key, payloads) -> results


@dataclass(eq=False)
class Reservation:
    """Room in a pool's queue held for ``count`` items that are still being decoded (see ``BatchPool.reserve``)."""

    pool: BatchPool
    priority: int
    count: int

    def release(self, *, grant: bool = True) -> None:
        """Give the room back (``grant=False``: to the caller that turns it into queued items at once, so no
        waiting request takes it in between)."""
        if self.count:
            self.pool._reserved[self.priority] -= self.count
            self.count = 0
            if grant:
                self.pool._grant_waiters()

    def grow(self, extra: int) -> bool:
        """Hold room for ``extra`` more items if the queue has it now (never waits); -> whether it did."""
        pool = self.pool
        if extra <= 0:
            return True
        if pool._closing or not pool._has_room(self.priority, extra):
            return False
        pool._reserved[self.priority] += extra
        self.count += extra
        return True


@dataclass(eq=False)
class _RoomWaiter:
    """A request waiting in ``BatchPool.admit`` for room for ``count`` items; ``future`` gets its Reservation."""

    count: int
    priority: int
    future: asyncio.Future


class BatchPool:
    """One model's queue, batcher and replicas. Create, ``start()`` on the loop, ``close()`` to drain."""

    def __init__(
        self,
        name: str,
        run_batch: BatchFn,
        *,
        max_batch_size: int = 8,
        max_wait_ms: float = 5.0,
        capacity: int = 64,
        max_waiting: int = 0,
        replicas: int = 1,
        torch_threads: int = 1,
        metrics: Any = None,
    ):
        self.name = name
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.capacity = capacity
        self.max_waiting = max_waiting  # items that may wait in ``admit`` for room (0: refuse at once)
        self.replicas = replicas
        self.torch_threads = torch_threads
        self.metrics = metrics
        self.stats = PoolStats()
        self._queues: dict[int, deque[WorkItem]] = {INTERACTIVE: deque(), BACKGROUND: deque()}
        self._queued = {INTERACTIVE: 0, BACKGROUND: 0}
        self._reserved = {INTERACTIVE: 0, BACKGROUND: 0}
        self._waiters: deque[_RoomWaiter] = deque()  # FIFO: the first to wait is the first let in
        self._waiting = 0  # items in _waiters
        self._wakeup: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._batcher: asyncio.Task | None = None
        self._running_batches: set[asyncio.Future] = set()
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(self.replicas)
        self._executor = ThreadPoolExecutor(
            max_workers=self.replicas,
            thread_name_prefix=f"pool-{self.name}",
            initializer=_set_torch_threads,
            initargs=(self.torch_threads,),
        )
        self._batcher = asyncio.create_task(self._batch_loop(), name=f"batcher-{self.name}")
        self._report_depth()

    @property
    def alive(self) -> bool:
        return self._batcher is not None and not self._batcher.done() and not self._closing

    async def close(self, timeout: float = 30.0) -> None:
        """Stop admitting, run everything already queued, wait for running batches, stop the threads."""
        if self._batcher is None:
            return
        self._closing = True
        self._wakeup.set()
        for waiter in self._waiters:  # nobody waits for room in a pool that is closing
            if not waiter.future.done():
                waiter.future.set_exception(PoolClosed(f"model {self.name!r} is not accepting work (shutting down)"))
        self._waiters.clear()
        self._waiting = 0
        try:
            await asyncio.wait_for(asyncio.shield(self._batcher), timeout)
            if self._running_batches:
                await asyncio.wait_for(asyncio.gather(*self._running_batches, return_exceptions=True), timeout)
        except TimeoutError:
            log.warning("pool %s: drain did not finish within %.0f s; dropping what is left", self.name, timeout)
            self._batcher.cancel()
            for queue in self._queues.values():
                while queue:
                    self._drop(queue.popleft(), PoolClosed(f"model {self.name!r} stopped"), "cancelled")
        self._executor.shutdown(wait=False, cancel_futures=True)

    # --- admission ------------------------------------------------------------------------------------
    def depth(self, priority: int | None = None) -> int:
        if priority is None:
            return sum(self._queued.values())
        return self._queued[priority]

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained: queued batches x mean batch time / replicas."""
        batches = math.ceil(self.depth() / self.max_batch_size)
        per_batch = self.stats.ewma_batch_s or 0.1
        return max(1, math.ceil(batches * per_batch / self.replicas))

    def reserve(self, count: int, priority: int = INTERACTIVE) -> Reservation:
        """Hold room for ``count`` items before they are decoded, so overload is refused before it costs CPU.
        Raises :class:`Overloaded` (or :class:`PoolClosed`). Must be called on the pool's event loop."""
        if self._closing or self._batcher is None:
            raise PoolClosed(f"model {self.name!r} is not accepting work (shutting down)")
        if not self._has_room(priority, count):
            raise self._overloaded(priority)
        self._reserved[priority] += count
        return Reservation(self, priority, count)

    def _has_room(self, priority: int, count: int) -> bool:
        """Whether ``count`` more items fit the queue of ``priority`` (queued + reserved <= capacity)."""
        return self._queued[priority] + self._reserved[priority] + count <= self.capacity

    def _overloaded(self, priority: int) -> Overloaded:
        return Overloaded(self.name, self._queued[priority] + self._reserved[priority], self.retry_after())

    async def admit(self, count: int, priority: int = INTERACTIVE, wait_s: float = 0.0) -> Reservation:
        """``reserve``, but when the queue is full wait up to ``wait_s`` for room (first come, first served)
        in a waiting room of at most ``max_waiting`` items, so that a burst or clients that retry at once are
        paced by the queue instead of answered with a 429 they turn straight into another request. Nothing is
        decoded while waiting. Raises :class:`Overloaded` when the wait ends without room, when the waiting
        room is full, or when ``count`` could never fit; :class:`PoolClosed` if the pool closes meanwhile."""
        may_wait = wait_s > 0 and count <= self.capacity and self._waiting + count <= self.max_waiting
        if not self._waiters:  # nobody is ahead: take the room now if there is some
            try:
                return self.reserve(count, priority)
            except Overloaded:
                if not may_wait:
                    raise
        elif not may_wait:
            raise self._overloaded(priority)
        waiter = _RoomWaiter(count, priority, self._loop.create_future())
        self._waiters.append(waiter)
        self._waiting += count
        try:
            done, _ = await asyncio.wait({waiter.future}, timeout=wait_s)
        finally:
            if not waiter.future.done():  # timed out or cancelled (the client went away): leave the room
                waiter.future.cancel()
                self._remove_waiter(waiter)
        if not done:
            raise self._overloaded(priority)
        return waiter.future.result()

    def _remove_waiter(self, waiter: _RoomWaiter) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            return
        self._waiting -= waiter.count
        self._grant_waiters()  # the one behind may fit where this one did not

    def _grant_waiters(self) -> None:
        """Let waiting requests in, in order, while the head of the line fits."""
        while self._waiters and not self._closing:
            head = self._waiters[0]
            if head.future.done():
                self._waiters.popleft()
                self._waiting -= head.count
                continue
            if not self._has_room(head.priority, head.count):
                return
            self._waiters.popleft()
            self._waiting -= head.count
            self._reserved[head.priority] += head.count
            head.future.set_result(Reservation(self, head.priority, head.count))

    def submit(
        self,
        payloads: Sequence[Any],
        *,
        handle: Any,
        group: Hashable = None,
        priority: int = INTERACTIVE,
        timeout: float = 30.0,
        reservation: Reservation | None = None,
    ) -> list[WorkItem]:
        """Queue ``payloads`` together (all or none), into the room ``reservation`` holds when given (it is
        used up either way). Must be called on the pool's event loop."""
        if reservation is not None:
            reservation.release(grant=False)
        if self._closing or self._batcher is None:
            raise PoolClosed(f"model {self.name!r} is not accepting work (shutting down)")
        if not self._has_room(priority, len(payloads)):
            self._grant_waiters()  # the reservation's room, if any, goes to whoever waits for it
            raise self._overloaded(priority)
        now = time.monotonic()
        items = []
        for payload in payloads:
            item = WorkItem(
                payload=payload,
                handle=handle,
                group=group,
                priority=priority,
                deadline=now + timeout,
                enqueued=now,
                future=self._loop.create_future(),
                owner=self,
            )
            self._queues[priority].append(item)
            items.append(item)
        self._queued[priority] += len(items)
        self._report_depth()
        self._wakeup.set()
        return items

    def cancel(self, items: Sequence[WorkItem], reason: str = "cancelled") -> int:
        """Drop items that have not started; running ones finish (their result is discarded)."""
        dropped = 0
        for item in items:
            if item.state == "queued":
                exc = DeadlineExceeded() if reason == "deadline" else Dropped()
                self._drop(item, exc, reason)
                dropped += 1
        if dropped:
            self._report_depth()
        return dropped

    # --- batcher --------------------------------------------------------------------------------------
    def _drop(self, item: WorkItem, exc: BaseException, reason: str) -> None:
        if item.state == "queued":
            self._queued[item.priority] -= 1
            self._grant_waiters()
        item.state = "dropped"
        self.stats.dropped[reason] = self.stats.dropped.get(reason, 0) + 1
        if self.metrics is not None:
            self.metrics.dropped.labels(self.name, reason).inc()
        if not item.future.done():
            item.future.set_exception(exc)
            item.future.exception()  # mark retrieved: the caller may already have gone

    def _pop_first(self) -> WorkItem | None:
        for priority in (INTERACTIVE, BACKGROUND):
            queue = self._queues[priority]
            while queue:
                item = queue.popleft()
                if item.state == "queued":
                    return item
        return None

    def _take_compatible(self, first: WorkItem, room: int) -> list[WorkItem]:
        taken: list[WorkItem] = []
        for priority in (INTERACTIVE, BACKGROUND):
            queue = self._queues[priority]
            if not queue or room <= 0:
                continue
            kept: deque[WorkItem] = deque()
            while queue:
                item = queue.popleft()
                if item.state != "queued":
                    continue
                if room > 0 and item.handle is first.handle and item.group == first.group:
                    taken.append(item)
                    room -= 1
                else:
                    kept.append(item)
            self._queues[priority] = kept
        return taken

    async def _form_batch(self) -> list[WorkItem] | None:
        while True:
            first = self._pop_first()
            while first is None:
                if self._closing:
                    return None
                self._wakeup.clear()
                await self._wakeup.wait()
                first = self._pop_first()
            batch = [first]
            # the first item leaves the queue now: count it out so admission sees the room
            self._queued[first.priority] -= 1
            first.state = "forming"
            self._grant_waiters()
            until = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch_size:
                more = self._take_compatible(first, self.max_batch_size - len(batch))
                for item in more:
                    self._queued[item.priority] -= 1
                    item.state = "forming"
                if more:
                    self._grant_waiters()
                batch.extend(more)
                remaining = until - time.monotonic()
                if len(batch) >= self.max_batch_size or remaining <= 0 or self._closing:
                    break
                if not any(self._reserved.values()):  # nothing admitted is on its way: waiting only adds latency
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    pass
            self._report_depth()
            now = time.monotonic()
            live = []
            for item in batch:
                if item.future.done():  # the caller went away while the batch was forming
                    self._drop(item, Dropped(), "cancelled")
                elif item.deadline <= now:
                    self._drop(item, DeadlineExceeded(), "deadline")
                else:
                    live.append(item)
            if live:
                return live

    async def _batch_loop(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                batch = await self._form_batch()
            except BaseException:
                self._slots.release()
                raise
            if batch is None:
                self._slots.release()
                return
            now = time.monotonic()
            for item in batch:
                item.state = "running"
                item.started = now
                item.batch_size = len(batch)
                if self.metrics is not None:
                    self.metrics.queue_wait.labels(self.name).observe(now - item.enqueued)
            if self.metrics is not None:
                self.metrics.batch_size.labels(self.name).observe(len(batch))
            first = batch[0]
            payloads = [item.payload for item in batch]
            running = self._loop.run_in_executor(self._executor, self._run, first.handle, first.group, payloads)
            self._running_batches.add(running)
            running.add_done_callback(lambda fut, batch=batch: self._finish(batch, fut))

    def _run(self, handle: Any, group: Hashable, payloads: list[Any]) -> tuple[Sequence[Any], float]:
        start = time.perf_counter()
        results = self.run_batch(handle, group, payloads)
        if len(results) != len(payloads):
            raise RuntimeError(f"model {self.name!r}: the batch function returned {len(results)} results for {len(payloads)} inputs")
        return results, time.perf_counter() - start

    def _finish(self, batch: list[WorkItem], fut: asyncio.Future) -> None:
        self._running_batches.discard(fut)
        self._slots.release()
        exc = PoolClosed(f"model {self.name!r} stopped") if fut.cancelled() else fut.exception()
        if exc is None:
            results, seconds = fut.result()
            self.stats.batches += 1
            self.stats.items += len(batch)
            alpha = 0.2
            self.stats.ewma_batch_s = seconds if not self.stats.ewma_batch_s else (
                (1 - alpha) * self.stats.ewma_batch_s + alpha * seconds
            )
            if self.metrics is not None:
                self.metrics.inference.labels(self.name).observe(seconds)
            for item, result in zip(batch, results, strict=True):
                item.state = "done"
                item.batch_ms = seconds * 1000.0
                if not item.future.done():
                    item.future.set_result(result)
        else:
            log.error("model %s: batch of %d failed: %r", self.name, len(batch), exc, exc_info=exc)
            for item in batch:
                item.state = "done"
                if not item.future.done():
                    item.future.set_exception(exc)
                    item.future.exception()

    def _report_depth(self) -> None:
        if self.metrics is not None:
            for priority, count in self._queued.items():
                self.metrics.queue_depth.labels(self.name, PRIORITY_NAMES[priority]).set(count)


def _set_torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def cancel_items(items: Sequence[WorkItem], reason: str = "cancelled") -> None:
    by_pool: dict[int, tuple[BatchPool, list[WorkItem]]] = {}
    for item in items:
        by_pool.setdefault(id(item.owner), (item.owner, []))[1].append(item)
    for pool, group in by_pool.values():
        pool.cancel(group, reason)


async def wait_items(items: Sequence[WorkItem], *, timeout: float, disconnected=None) -> list[Any]:
    """Wait for every item's result (items may come from several pools). On timeout: cancel what has not
    run and raise DeadlineExceeded. When ``disconnected`` (an awaitable that finishes when the client goes
    away) finishes first: cancel, raise Dropped. An item's exception is raised after the rest are cancelled."""
    gathered = asyncio.gather(*(item.future for item in items))
    waiters = {gathered}
    watcher = None
    if disconnected is not None:
        watcher = asyncio.ensure_future(disconnected)
        waiters.add(watcher)
    try:
        done, _ = await asyncio.wait(waiters, timeout=max(timeout, 0), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        cancel_items(items)
        gathered.cancel()
        raise
    finally:
        if watcher is not None and not watcher.done():
            watcher.cancel()
    if gathered in done:
        try:
            return gathered.result()
        except BaseException:
            cancel_items(items)
            raise
    if watcher is not None and watcher in done:
        cancel_items(items, "cancelled")
        gathered.cancel()
        raise Dropped("client disconnected")
    cancel_items(items, "deadline")
    gathered.cancel()
    raise DeadlineExceeded()
