"""The service under pressure, through real uvicorn servers: a full queue answers 429 and every accepted
request is answered; deadlines give 504 and expired images never run; a client that leaves has its images
dropped; a reload under load drops nothing and a corrupt version is refused while the old keeps serving."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from service.app import create_app
from service.settings import Settings
from service.testing import (
    LiveServer,
    assert_problem,
    image_bytes,
    metric,
    publish_ucm,
    random_store,
    wait_ready,
)

API_KEY = "pressure-api-key"
ADMIN_KEY = "pressure-admin-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return random_store(tmp_path_factory.mktemp("pressure-store") / "store", concepts=False)


def serve(store, tmp_path, **overrides):
    base = dict(model_store=store.root, data_dir=tmp_path / "data", api_key=API_KEY, admin_key=ADMIN_KEY,
                replicas=1, torch_threads=1, intake_threads=2)
    base.update(overrides)
    return LiveServer(create_app(Settings(_env_file=None, **base)))


async def burst(url, n, *, params=None, timeout=60.0, seed0=0):
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=n + 4)) as client:
        async def one(i):
            try:
                return await client.post(f"{url}/v1/caption", params=params, content=image_bytes(seed=seed0 + i),
                                         headers={**AUTH, "Content-Type": "image/png"})
            except httpx.TimeoutException as exc:
                return exc
        return await asyncio.gather(*(one(i) for i in range(n)))


SLOW = {"beam_size": 5, "max_length": 22}  # random weights never stop early: every request decodes 22 steps


@pytest.fixture
def slow_batches(monkeypatch):
    """Every caption batch takes at least 0.15 s more, so that with one image per batch the queue surely
    builds up however fast this machine decodes (the deadline and disconnect tests were flaky without)."""
    import dataclasses

    from captioning import inference

    real = inference.KINDS["caption"]

    def slow(runtime, options, images):
        time.sleep(0.15)
        return real.run(runtime, options, images)

    monkeypatch.setitem(inference.KINDS, "caption", dataclasses.replace(real, run=slow))


def test_full_queue_answers_429_and_every_accepted_request_is_answered(store, tmp_path):
    with serve(store, tmp_path, max_batch_size=1, max_wait_ms=0, queue_size=2, admission_wait_ms=0) as url:
        wait_ready(url)
        responses = asyncio.run(burst(url, 20, params=SLOW))
    statuses = [r.status_code for r in responses]
    refused = [r for r in responses if r.status_code == 429]
    assert refused, f"no 429 among {statuses}"
    assert all(s in (200, 429) for s in statuses), statuses
    for r in refused:
        body = assert_problem(r, 429, "overloaded")
        assert int(r.headers["Retry-After"]) >= 1 and body["retry_after_s"] == int(r.headers["Retry-After"])
    for r in responses:
        if r.status_code == 200:
            assert r.json()["results"][0]["caption"]


def test_deadline_gives_504_and_expired_images_never_run(store, tmp_path, slow_batches):
    with serve(store, tmp_path, max_batch_size=1, max_wait_ms=0, queue_size=64, request_timeout_s=0.4) as url:
        wait_ready(url)
        responses = asyncio.run(burst(url, 16, params=SLOW))
        time.sleep(0.5)  # let the last batch finish
        ran = metric(url, "captioner_batch_size_sum", {"model": "ucm-captioner"})
        expired = metric(url, "captioner_dropped_items_total", {"model": "ucm-captioner", "reason": "deadline"})
    late = [r for r in responses if r.status_code == 504]
    assert late, [r.status_code for r in responses]
    for r in late:
        assert_problem(r, 504, "deadline-exceeded")
    assert all(r.status_code in (200, 504) for r in responses)
    assert expired >= 1, "no queued image was dropped at its deadline"
    assert ran + expired == 16, (ran, expired)  # each image either ran once or was dropped, never both


def test_a_client_that_disconnects_has_its_queued_images_dropped(store, tmp_path, slow_batches):
    with serve(store, tmp_path, max_batch_size=1, max_wait_ms=0, queue_size=64) as url:
        wait_ready(url)

        async def scenario():
            patient = asyncio.create_task(burst(url, 10, params=SLOW))
            await asyncio.sleep(0.2)  # the patient requests fill the queue first
            impatient = await burst(url, 6, params=SLOW, timeout=0.3, seed0=100)
            return await patient, impatient

        patient, impatient = asyncio.run(scenario())
        time.sleep(0.5)
        ran = metric(url, "captioner_batch_size_sum", {"model": "ucm-captioner"})
        dropped = metric(url, "captioner_dropped_items_total", {"model": "ucm-captioner", "reason": "cancelled"})
        gone = metric(url, "captioner_http_requests_total", {"route": "/v1/caption", "status": "499"})
    assert all(r.status_code == 200 for r in patient)
    assert all(isinstance(r, httpx.TimeoutException) for r in impatient)
    assert dropped >= 1 and gone >= 1
    assert ran + dropped == 16, (ran, dropped)


def test_reload_under_load_drops_nothing_and_refuses_a_corrupt_version(store, tmp_path):
    with serve(store, tmp_path, max_batch_size=4, max_wait_ms=5) as url:
        wait_ready(url)
        stop = threading.Event()
        outcomes: list[tuple[int, int | None]] = []

        def load():
            with httpx.Client(timeout=60) as client:
                i = 0
                while not stop.is_set():
                    r = client.post(f"{url}/v1/caption", params={"beam_size": 1, "max_length": 6},
                                    content=image_bytes(seed=i), headers={**AUTH, "Content-Type": "image/png"})
                    outcomes.append((r.status_code, r.json()["results"][0]["version"] if r.status_code == 200 else None))
                    i += 1

        clients = [threading.Thread(target=load) for _ in range(4)]
        for t in clients:
            t.start()
        try:
            time.sleep(0.5)
            v2 = publish_ucm(store, tmp_path / "work2", seed=1, classifier=False)["ucm-captioner"]
            store.promote("ucm-captioner", v2)
            r = httpx.post(f"{url}/v1/models/ucm-captioner/reload", headers=ADMIN, timeout=60)
            assert r.status_code == 200, r.text
            assert (r.json()["previous_version"], r.json()["version"], r.json()["outcome"]) == (1, v2, "swapped")
            time.sleep(0.5)

            v3 = publish_ucm(store, tmp_path / "work3", seed=2, classifier=False)["ucm-captioner"]
            store.promote("ucm-captioner", v3)
            weights = store.resolve(f"ucm-captioner@{v3}").file("model.safetensors")
            data = bytearray(weights.read_bytes())
            data[-10] ^= 0xFF  # one flipped byte: the hash check must catch it
            weights.write_bytes(bytes(data))
            r = httpx.post(f"{url}/v1/models/ucm-captioner/reload", headers=ADMIN, timeout=60)
            body = assert_problem(r, 409, "reload-failed")
            assert body["serving_version"] == v2 and "model.safetensors" in body["detail"]
            time.sleep(0.3)
        finally:
            stop.set()
            for t in clients:
                t.join(60)
        served = httpx.get(f"{url}/v1/models/ucm-captioner", headers=AUTH).json()
        refused = metric(url, "captioner_model_reloads_total", {"name": "ucm-captioner", "outcome": "refused"})
    assert served["serving_version"] == v2 and served["alias_version"] == v3
    assert refused == 1
    statuses = {s for s, _ in outcomes}
    assert statuses == {200}, statuses  # nothing dropped or failed during either reload
    versions = [v for _, v in outcomes]
    assert versions[0] == 1 and versions[-1] == v2 and set(versions) == {1, v2}


def test_a_model_that_failed_to_load_is_reported_and_can_be_reloaded_once_fixed(tmp_path):
    store = random_store(tmp_path / "store", concepts=False)
    weights = store.resolve("ucm-classifier@production").file("model.safetensors")
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated on disk: fails verification
    with serve(store, tmp_path) as url:
        deadline = time.monotonic() + 60
        while (r := httpx.get(f"{url}/readyz")).json().get("detail", "").endswith("loading"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        body = assert_problem(r, 503, "not-ready")
        assert any("ucm-classifier@production" in reason for reason in body["reasons"])
        ok = httpx.post(f"{url}/v1/caption", content=image_bytes(), headers={**AUTH, "Content-Type": "image/png"})
        assert ok.status_code == 200  # the rest is served
        assert_problem(httpx.post(f"{url}/v1/labels", content=image_bytes(),
                                  headers={**AUTH, "Content-Type": "image/png"}), 503, "model-unavailable")
        assert_problem(httpx.post(f"{url}/v1/models/ucm-classifier/reload", headers=ADMIN), 409, "reload-failed")
        fixed = publish_ucm(store, tmp_path / "fix", seed=3, captioner=False)["ucm-classifier"]
        store.promote("ucm-classifier", fixed)
        r = httpx.post(f"{url}/v1/models/ucm-classifier/reload", headers=ADMIN)
        assert r.status_code == 200 and r.json()["version"] == fixed
        assert httpx.get(f"{url}/readyz").status_code == 200
        labels = httpx.post(f"{url}/v1/labels", content=image_bytes(), headers={**AUTH, "Content-Type": "image/png"})
        assert labels.status_code == 200 and labels.json()["results"][0]["version"] == fixed
