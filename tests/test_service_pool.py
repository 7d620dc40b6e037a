"""The batching pool on a small real torch module: batches form, priorities hold, deadlines and
cancellations drop work before it runs, overload is refused, shutdown drains."""

import asyncio
import threading
import time

import pytest
import torch

from service.metrics import Metrics
from service.pool import (
    BACKGROUND,
    INTERACTIVE,
    BatchPool,
    DeadlineExceeded,
    Dropped,
    Overloaded,
    PoolClosed,
    wait_items,
)


class Recorder:
    """A runner that stacks the payloads and runs the handle (a torch module); records every batch."""

    def __init__(self, gate: threading.Event | None = None):
        self.batches: list[tuple[object, object, list[float]]] = []
        self.threads: list[int] = []
        self.gate = gate

    def __call__(self, handle, group, payloads):
        if self.gate is not None:
            assert self.gate.wait(10), "test gate never opened"
        self.threads.append(torch.get_num_threads())
        self.batches.append((handle, group, [float(p[0]) for p in payloads]))
        with torch.inference_mode():
            out = handle(torch.stack(payloads))  # [B, 2]
        return list(out)


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 2).eval()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_concurrent_items_form_full_batches_with_exact_results():
    model = make_model()
    runner = Recorder()
    metrics = Metrics()

    async def main():
        pool = BatchPool("m", runner, max_batch_size=8, max_wait_ms=50, capacity=64, metrics=metrics, torch_threads=1)
        await pool.start()
        xs = [torch.randn(4) for _ in range(20)]
        items = pool.submit(xs, handle=model, group=("beam", 1))
        results = await wait_items(items, timeout=10)
        await pool.close()
        return xs, results

    xs, results = run(main())
    with torch.inference_mode():
        expected = model(torch.stack(xs))
    assert torch.allclose(torch.stack(results), expected, atol=1e-6)
    assert [len(b[2]) for b in runner.batches] == [8, 8, 4]
    assert runner.threads == [1, 1, 1]  # the replica thread runs with the configured torch threads
    count = metrics.registry.get_sample_value("captioner_batch_size_count", {"model": "m"})
    total = metrics.registry.get_sample_value("captioner_batch_size_sum", {"model": "m"})
    assert (count, total) == (3, 20)


def test_a_batch_waits_for_more_only_while_admitted_requests_are_on_their_way():
    """max_wait_ms is long here (2 s): with no reservation outstanding the lone item runs at once; with one
    outstanding (a request still being decoded) the batcher waits for it and runs both together."""
    runner = Recorder()
    model = make_model()

    async def main():
        pool = BatchPool("m", runner, max_batch_size=8, max_wait_ms=2000, capacity=16)
        await pool.start()
        started = time.monotonic()
        alone = pool.submit([torch.randn(4)], handle=model)
        await wait_items(alone, timeout=10)
        alone_s = time.monotonic() - started
        coming = pool.reserve(1)  # admitted, still decoding
        first = pool.submit([torch.randn(4)], handle=model, reservation=pool.reserve(1))
        await asyncio.sleep(0.2)
        assert not first[0].future.done()  # held: one more is on its way
        second = pool.submit([torch.randn(4)], handle=model, reservation=coming)
        await wait_items(first + second, timeout=10)
        await pool.close()
        return alone_s

    alone_s = run(main())
    assert alone_s < 1.0  # did not wait out the 2 s max_wait_ms
    assert [len(b[2]) for b in runner.batches] == [1, 2]


def test_batch_size_one_turns_batching_off():
    runner = Recorder()

    async def main():
        pool = BatchPool("m", runner, max_batch_size=1, max_wait_ms=50)
        await pool.start()
        items = pool.submit([torch.randn(4) for _ in range(5)], handle=make_model())
        await wait_items(items, timeout=10)
        await pool.close()

    run(main())
    assert [len(b[2]) for b in runner.batches] == [1] * 5


def test_incompatible_groups_and_model_objects_never_share_a_batch():
    runner = Recorder()
    old, new = make_model(0), make_model(1)

    async def main():
        pool = BatchPool("m", runner, max_batch_size=16, max_wait_ms=20)
        await pool.start()
        a = pool.submit([torch.full((4,), 1.0)] * 3, handle=old, group=(1, 20))
        b = pool.submit([torch.full((4,), 2.0)] * 3, handle=old, group=(3, 20))
        c = pool.submit([torch.full((4,), 3.0)] * 3, handle=new, group=(1, 20))
        out = await wait_items(a + b + c, timeout=10)
        await pool.close()
        return out

    out = run(main())
    for handle, group, firsts in runner.batches:
        assert len(set(firsts)) == 1, "a batch mixed items of different groups / models"
        value = firsts[0]
        assert (handle, group) == {1.0: (old, (1, 20)), 2.0: (old, (3, 20)), 3.0: (new, (1, 20))}[value]
    # each item ran on the model object it was submitted with
    with torch.inference_mode():
        assert torch.allclose(out[0], old(torch.full((4,), 1.0)))
        assert torch.allclose(out[6], new(torch.full((4,), 3.0)))


def test_interactive_items_run_before_queued_background_items():
    gate = threading.Event()
    runner = Recorder(gate)
    model = make_model()

    async def main():
        pool = BatchPool("m", runner, max_batch_size=2, max_wait_ms=0)
        await pool.start()
        blocker = pool.submit([torch.full((4,), 0.0)], handle=model)
        await asyncio.sleep(0.05)  # the blocker is running; everything below queues behind it
        background = pool.submit([torch.full((4,), 9.0)] * 4, handle=model, priority=BACKGROUND)
        interactive = pool.submit([torch.full((4,), 1.0)] * 4, handle=model, priority=INTERACTIVE)
        gate.set()
        await wait_items(blocker + background + interactive, timeout=10)
        await pool.close()

    run(main())
    order = [b[2] for b in runner.batches]
    assert order == [[0.0], [1.0, 1.0], [1.0, 1.0], [9.0, 9.0], [9.0, 9.0]]


def test_full_queue_is_refused_and_every_accepted_item_answered():
    gate = threading.Event()
    runner = Recorder(gate)
    model = make_model()

    async def main():
        pool = BatchPool("m", runner, max_batch_size=2, max_wait_ms=0, capacity=4)
        await pool.start()
        accepted = pool.submit([torch.randn(4)], handle=model)
        await asyncio.sleep(0.05)  # running, so it no longer counts against the queue
        accepted += pool.submit([torch.randn(4) for _ in range(3)], handle=model)
        with pytest.raises(Overloaded) as info:
            pool.submit([torch.randn(4) for _ in range(2)], handle=model)  # all or nothing: 3 + 2 > 4
        accepted += pool.submit([torch.randn(4)], handle=model)  # exactly fills the queue
        with pytest.raises(Overloaded):
            pool.submit([torch.randn(4)], handle=model)
        assert pool.depth(INTERACTIVE) == 4
        # job items have their own bound: a full interactive queue does not stop them
        accepted += pool.submit([torch.randn(4)], handle=model, priority=BACKGROUND)
        gate.set()
        results = await wait_items(accepted, timeout=10)
        await pool.close()
        return info.value, results

    overloaded, results = run(main())
    assert overloaded.retry_after >= 1
    assert len(results) == 6 and all(r.shape == (2,) for r in results)
    assert sum(len(b[2]) for b in runner.batches) == 6


def test_expired_and_cancelled_items_are_dropped_before_they_run():
    gate = threading.Event()
    runner = Recorder(gate)
    model = make_model()
    metrics = Metrics()

    async def main():
        pool = BatchPool("m", runner, max_batch_size=8, max_wait_ms=0, metrics=metrics)
        await pool.start()
        blocker = pool.submit([torch.full((4,), 0.0)], handle=model)
        await asyncio.sleep(0.05)
        late = pool.submit([torch.full((4,), 5.0)], handle=model, timeout=0.1)
        with pytest.raises(DeadlineExceeded):
            await wait_items(late, timeout=0.1)
        gone = pool.submit([torch.full((4,), 6.0)] * 2, handle=model)
        client_left = asyncio.get_running_loop().create_future()
        client_left.set_result(None)
        with pytest.raises(Dropped):
            await wait_items(gone, timeout=10, disconnected=client_left)
        alive = pool.submit([torch.full((4,), 7.0)], handle=model)
        gate.set()
        await wait_items(blocker + alive, timeout=10)
        assert pool.depth() == 0
        await pool.close()

    run(main())
    assert [b[2] for b in runner.batches] == [[0.0], [7.0]]  # 5.0 and 6.0 never ran
    sample = metrics.registry.get_sample_value
    assert sample("captioner_dropped_items_total", {"model": "m", "reason": "deadline"}) == 1
    assert sample("captioner_dropped_items_total", {"model": "m", "reason": "cancelled"}) == 2


def test_a_failing_batch_fails_its_items_and_the_pool_keeps_serving():
    model = make_model()
    calls = []

    def runner(handle, group, payloads):
        calls.append(len(payloads))
        if group == "bad":
            raise ValueError("shape mismatch in the model")
        return list(handle(torch.stack(payloads)).detach())

    async def main():
        pool = BatchPool("m", runner, max_batch_size=4, max_wait_ms=0)
        await pool.start()
        bad = pool.submit([torch.randn(4)], handle=model, group="bad")
        with pytest.raises(ValueError, match="shape mismatch"):
            await wait_items(bad, timeout=10)
        good = pool.submit([torch.randn(4)], handle=model, group="ok")
        out = await wait_items(good, timeout=10)
        await pool.close()
        return out

    assert len(run(main())) == 1


def test_close_drains_queued_work_then_refuses_new_work():
    runner = Recorder()
    model = make_model()

    def slow(handle, group, payloads):
        time.sleep(0.02)
        return runner(handle, group, payloads)

    async def main():
        pool = BatchPool("m", slow, max_batch_size=2, max_wait_ms=0, replicas=2)
        await pool.start()
        items = pool.submit([torch.randn(4) for _ in range(9)], handle=model)
        await pool.close(timeout=10)
        assert all(item.future.done() and item.future.exception() is None for item in items)
        with pytest.raises(PoolClosed):
            pool.submit([torch.randn(4)], handle=model)

    run(main())
    assert sum(len(b[2]) for b in runner.batches) == 9


def test_admit_waits_in_line_for_room_and_refuses_when_the_wait_or_the_waiting_room_runs_out():
    gate = threading.Event()
    runner = Recorder(gate)
    model = make_model()

    async def main():
        pool = BatchPool("m", runner, max_batch_size=1, max_wait_ms=0, capacity=2, max_waiting=3)
        await pool.start()
        running = pool.submit([torch.randn(4)], handle=model)
        await asyncio.sleep(0.05)  # running: it no longer counts against the queue
        queued = pool.submit([torch.randn(4) for _ in range(2)], handle=model)  # the queue is full
        order: list[str] = []

        async def waiter(name, count, wait_s):
            reservation = await pool.admit(count, INTERACTIVE, wait_s)
            order.append(name)
            return pool.submit([torch.randn(4) for _ in range(count)], handle=model, reservation=reservation)

        first = asyncio.create_task(waiter("first", 1, 10))
        second = asyncio.create_task(waiter("second", 2, 10))
        await asyncio.sleep(0.05)
        assert pool._waiting == 3
        with pytest.raises(Overloaded):  # the waiting room holds 3 items: a fourth is refused at once
            await pool.admit(1, INTERACTIVE, 10)
        started = time.monotonic()
        with pytest.raises(Overloaded):  # nor can a request fit that is larger than the queue itself
            await pool.admit(3, INTERACTIVE, 10)
        assert time.monotonic() - started < 0.5
        gate.set()  # batches run, room frees, the waiters get in in the order they came
        items = [*running, *queued, *await first, *await second]
        results = await wait_items(items, timeout=10)
        assert pool._waiting == 0 and not pool._waiters

        gate.clear()  # a wait that ends without room is a refusal, and leaves the line
        blocker = pool.submit([torch.randn(4)], handle=model)
        await asyncio.sleep(0.05)
        full = pool.submit([torch.randn(4) for _ in range(2)], handle=model)
        started = time.monotonic()
        with pytest.raises(Overloaded) as info:
            await pool.admit(1, INTERACTIVE, 0.2)
        waited = time.monotonic() - started
        assert pool._waiting == 0 and not pool._waiters
        gate.set()
        await wait_items([*blocker, *full], timeout=10)
        await pool.close()
        return order, results, waited, info.value

    order, results, waited, refused = run(main())
    assert order == ["first", "second"]
    assert len(results) == 6
    assert 0.15 < waited < 2.0 and refused.retry_after >= 1


def test_admit_hands_room_to_the_waiter_and_not_to_a_later_arrival():
    gate = threading.Event()
    model = make_model()

    async def main():
        pool = BatchPool("m", Recorder(gate), max_batch_size=1, max_wait_ms=0, capacity=1, max_waiting=4)
        await pool.start()
        running = pool.submit([torch.randn(4)], handle=model)
        await asyncio.sleep(0.05)
        reservation = pool.reserve(1)  # the queue's only room, held while "decoding"
        waiting = asyncio.create_task(pool.admit(1, INTERACTIVE, 10))
        await asyncio.sleep(0.05)
        reservation.release()  # given back (the request failed): the waiter gets it, no later arrival can
        granted = await asyncio.wait_for(waiting, 1)
        with pytest.raises(Overloaded):
            pool.reserve(1)
        count = granted.count
        gate.set()
        items = [*running, *pool.submit([torch.randn(4)], handle=model, reservation=granted)]
        await wait_items(items, timeout=10)
        await pool.close()
        return count

    assert run(main()) == 1


def test_closing_the_pool_refuses_whoever_waits_for_room():
    gate = threading.Event()
    model = make_model()

    async def main():
        pool = BatchPool("m", Recorder(gate), max_batch_size=1, max_wait_ms=0, capacity=1, max_waiting=4)
        await pool.start()
        items = pool.submit([torch.randn(4)], handle=model)
        await asyncio.sleep(0.05)
        items += pool.submit([torch.randn(4)], handle=model)
        waiting = asyncio.create_task(pool.admit(1, INTERACTIVE, 10))
        await asyncio.sleep(0.05)
        closing = asyncio.create_task(pool.close())
        with pytest.raises(PoolClosed):
            await asyncio.wait_for(waiting, 1)
        gate.set()
        await closing
        return [i.state for i in items]

    assert run(main()) == ["done", "done"]
