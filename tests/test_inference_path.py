"""The one inference path (issue 13): options resolved and checked before queueing, equivalent options in one
batch, admission before decoding, the decoded-pixel budget, one record per image whichever way it comes
(route, job, offline CLI), and a default model that failed to load is named, not quietly replaced."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time

import httpx
import pytest

from captioning import inference
from service.app import create_app
from service.settings import Settings
from service.testing import LiveServer, assert_problem, image_bytes, metric, random_store, wait_ready


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return random_store(tmp_path_factory.mktemp("path-store") / "store", lightcap=True)


def settings_for(store, tmp_path, **overrides) -> Settings:
    base = dict(model_store=store.root, data_dir=tmp_path / "data", max_image_pixels=4_000_000,
                max_images_per_request=8, max_batch_size=8, max_wait_ms=5, replicas=1, torch_threads=1,
                intake_threads=2)
    base.update(overrides)
    return Settings(_env_file=None, **base)


def png(seed: int, size=(96, 64)) -> tuple[str, bytes, str]:
    return (f"{seed}.png", image_bytes(*size, seed=seed), "image/png")


def wait_job(url: str, job_id: str, timeout: float = 120.0) -> dict:
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        job = httpx.get(f"{url}/v1/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish: {job}")


TASK_NAMES = {"ucm": "ucm-captioner", "lightcap": "lightcap"}


def test_a_max_length_below_the_models_min_length_is_a_422_before_any_work(store, tmp_path):
    with LiveServer(create_app(settings_for(store, tmp_path))) as url:
        wait_ready(url)
        with httpx.Client(base_url=url) as client:
            for model in ("ucm", "lightcap"):
                r = client.post("/v1/caption", params={"model": model, "max_length": 2},
                                content=image_bytes(seed=1), headers={"Content-Type": "image/png"})
                body = assert_problem(r, 422, "invalid-parameter")
                assert body["errors"][0]["parameter"] == "max_length", body
                top = min(64, inference.load_model(store, TASK_NAMES[model]).max_caption_length or 64)
                assert "min_length 3" in body["detail"] and f"3..{top}" in body["detail"], body["detail"]
            r = client.post("/v1/caption", params={"model": "ucm", "max_length": 65},
                            content=image_bytes(seed=1), headers={"Content-Type": "image/png"})
            assert "CAPTIONER_MAX_LENGTH_LIMIT" in assert_problem(r, 422, "invalid-parameter")["detail"]
            # LightCap's fusion has a fixed number of positions: past what its prefix leaves, a 422 (was a 500)
            room = inference.load_model(store, "lightcap").max_caption_length
            r = client.post("/v1/caption", params={"model": "lightcap", "max_length": room + 1},
                            content=image_bytes(seed=1), headers={"Content-Type": "image/png"})
            assert "positions" in assert_problem(r, 422, "invalid-parameter")["detail"]
            r = client.post("/v1/caption", params={"model": "lightcap", "max_length": room, "beam_size": 1},
                            content=image_bytes(seed=1), headers={"Content-Type": "image/png"})
            assert r.status_code == 200, r.text
            # a job with that setting is refused when submitted, not failed entry by entry
            r = client.post("/v1/jobs", files=[("files", png(1))], data={"max_length": "2", "model": "ucm"})
            assert assert_problem(r, 422, "invalid-parameter")["errors"][0]["parameter"] == "max_length"
            r = client.post("/v1/jobs", files=[("files", png(1))], data={"tasks": "caption,colours"})
            assert assert_problem(r, 422, "invalid-parameter")["errors"][0]["parameter"] == "tasks"
            assert client.get("/v1/jobs").json()["jobs"] == []
            # the connection stays usable after the refusals
            r = client.post("/v1/caption", params={"model": "ucm", "max_length": 3},
                            content=image_bytes(seed=1), headers={"Content-Type": "image/png"})
            assert r.status_code == 200 and 1 <= len(r.json()["results"][0]["tokens"]) <= 3


def test_requests_with_equivalent_options_share_a_batch(store, tmp_path):
    published = inference.load_model(store, "ucm-captioner").decoding
    with LiveServer(create_app(settings_for(store, tmp_path, max_wait_ms=400))) as url:
        wait_ready(url)

        async def three():
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                async def one(seed, **params):
                    r = await client.post("/v1/caption", params={"model": "ucm", **params},
                                          content=image_bytes(seed=seed), headers={"Content-Type": "image/png"})
                    assert r.status_code == 200, r.text
                    return r.json()["results"][0]["timings_ms"]["batch_size"]
                return await asyncio.gather(
                    one(1), one(2, beam_size=published.beam_size, max_length=published.max_length), one(3, beam_size=1))

        plain, explicit, greedy = asyncio.run(three())
        count = metric(url, "captioner_batch_size_count", {"model": "ucm-captioner"})
    assert (plain, explicit, greedy) == (2, 2, 1)
    assert count == 2  # two batches ran: the two equivalent requests together, the greedy one alone


def count_decodes_and_slow_captions(monkeypatch, seconds: float) -> list[int]:
    """Every caption batch takes ``seconds`` longer (so a queue surely builds up), and every image that is
    decoded is recorded: -> the list of decoded images' indices, filled as the server runs."""
    from service import inference as path

    decoded: list[int] = []
    real_prepare = path.prepare_one

    def counting(raw, *args, **kwargs):
        decoded.append(raw.index)
        return real_prepare(raw, *args, **kwargs)

    real = inference.KINDS["caption"]

    def slow(runtime, options, images):
        time.sleep(seconds)
        return real.run(runtime, options, images)

    monkeypatch.setattr(path, "prepare_one", counting)
    monkeypatch.setitem(inference.KINDS, "caption", dataclasses.replace(real, run=slow))
    return decoded


def test_overload_is_refused_before_the_image_is_decoded(store, tmp_path, monkeypatch):
    decoded = count_decodes_and_slow_captions(monkeypatch, 0.6)
    with LiveServer(create_app(settings_for(store, tmp_path, max_batch_size=1, max_wait_ms=0, queue_size=1,
                                                  admission_wait_ms=0))) as url:
        wait_ready(url)

        async def burst():
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                async def one(seed):
                    return await client.post("/v1/caption", params={"model": "ucm", "beam_size": 1},
                                             content=image_bytes(seed=seed), headers={"Content-Type": "image/png"})
                first = asyncio.create_task(one(0))
                await asyncio.sleep(0.3)  # the first is running; one more fits the queue, the rest do not
                return [await first, *await asyncio.gather(*(one(s) for s in range(1, 7)))]

        responses = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    assert statuses.count(429) >= 4 and set(statuses) <= {200, 429}, statuses
    assert len(decoded) == statuses.count(200), (decoded, statuses)  # a refused image was never decoded


def test_a_full_queue_lets_requests_wait_in_line_then_refuses_them_undecoded(store, tmp_path, monkeypatch):
    """CAPTIONER_ADMISSION_WAIT_MS: a request that finds the queue full waits for room (nothing decoded
    meanwhile) and is answered; when the wait ends without room it gets its 429, still undecoded; a raw image
    refused before its body was read leaves the keep-alive connection usable."""
    decoded = count_decodes_and_slow_captions(monkeypatch, 0.3)

    async def burst(url, n):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            async def one(seed):
                return await client.post("/v1/caption", params={"model": "ucm", "beam_size": 1},
                                         content=image_bytes(seed=seed), headers={"Content-Type": "image/png"})
            first = asyncio.create_task(one(0))
            await asyncio.sleep(0.15)  # running; one more fits the queue, the rest wait in line
            return [await first, *await asyncio.gather(*(one(s) for s in range(1, n)))]

    patient = settings_for(store, tmp_path, max_batch_size=1, max_wait_ms=0, queue_size=1,
                           admission_wait_ms=20_000, max_waiting=8)
    with LiveServer(create_app(patient)) as url:
        wait_ready(url)
        waited = asyncio.run(burst(url, 5))
    assert [r.status_code for r in waited] == [200] * 5  # 1 running + 1 queued + 3 waiting: none refused
    assert len(decoded) == 5

    decoded.clear()
    brief = settings_for(store, tmp_path, max_batch_size=1, max_wait_ms=0, queue_size=1,
                         admission_wait_ms=100, max_waiting=8)
    with LiveServer(create_app(brief)) as url:
        wait_ready(url)
        responses = asyncio.run(burst(url, 6))
        statuses = [r.status_code for r in responses]
        with httpx.Client(base_url=url, timeout=30, limits=httpx.Limits(max_connections=1)) as client:
            def post():
                return client.post("/v1/caption", params={"model": "ucm", "beam_size": 1},
                                   content=image_bytes(seed=9), headers={"Content-Type": "image/png"})

            def port(r):
                return r.extensions["network_stream"].get_extra_info("client_addr")[1]

            def hold_one(seed):
                httpx.post(f"{url}/v1/caption", params={"model": "ucm"}, content=image_bytes(seed=seed),
                           headers={"Content-Type": "image/png"}, timeout=30)

            hold = [threading.Thread(target=hold_one, args=(s,)) for s in (20, 21)]
            for t in hold:  # one running, one queued: the next raw image is refused after its 0.1 s wait
                t.start()
                time.sleep(0.1)
            refused = post()
            ports = [port(refused)]
            health = client.get("/healthz")
            ports.append(port(health))
            for t in hold:
                t.join()
            again = post()
            ports.append(port(again))
    assert statuses.count(429) >= 3 and set(statuses) <= {200, 429}, statuses
    for r in responses:
        if r.status_code == 429:
            assert_problem(r, 429, "overloaded")
            assert int(r.headers["Retry-After"]) >= 1
    assert refused.status_code == 429 and health.status_code == 200 and again.status_code == 200
    assert len(set(ports)) == 1, ports  # one connection: it survived the early refusal
    assert len(decoded) == statuses.count(200) + 2 + 1, (decoded, statuses)  # refused images never decoded


def test_decoded_pixels_in_flight_stay_within_the_budget(store, tmp_path):
    settings = settings_for(store, tmp_path, max_image_pixels=1_000_000, max_inflight_pixels=1_000_000)
    app = create_app(settings)
    with LiveServer(app) as url:
        wait_ready(url)
        files = [("files", png(seed, (1000, 1000))) for seed in range(6)]
        r = httpx.post(f"{url}/v1/labels", files=files, timeout=60)
        assert r.status_code == 200, r.text
        assert len(r.json()["results"]) == 6
        budget = app.state.ctx.pixels
        assert budget.peak <= 1_000_000 and budget.used == 0, (budget.peak, budget.used)
        r = httpx.post(f"{url}/v1/concepts", files=files[:3], data={"annotate": "true"}, timeout=60)
        assert r.status_code == 200 and all(x["annotated_png"] for x in r.json()["results"])
        assert budget.peak <= 1_000_000 and budget.used == 0, (budget.peak, budget.used)
    with pytest.raises(ValueError, match="CAPTIONER_MAX_INFLIGHT_PIXELS"):
        settings_for(store, tmp_path, max_image_pixels=2_000_000, max_inflight_pixels=1_000_000)


CAPTION_FIELDS = ("caption", "score", "tokens", "model", "version")


def test_one_image_gives_one_record_through_route_job_and_offline_cli(store, tmp_path, capsys):
    from captioning.cli import main

    names = [f"{s}.png" for s in range(3)]
    folder = tmp_path / "images"
    folder.mkdir()
    for s, name in enumerate(names):
        (folder / name).write_bytes(image_bytes(seed=s))
    settings = settings_for(store, tmp_path, max_batch_size=1)  # batches of one everywhere: bit-identical runs
    with LiveServer(create_app(settings)) as url:
        wait_ready(url)
        files = [("files", (n, (folder / n).read_bytes(), "image/png")) for n in names]
        routed = {}
        for route, params in (("caption", {"model": "ucm"}), ("labels", {}), ("concepts", {})):
            r = httpx.post(f"{url}/v1/{route}", files=files, data=params, timeout=60)
            assert r.status_code == 200, r.text
            routed[route] = {x["filename"]: x for x in r.json()["results"]}
        r = httpx.post(f"{url}/v1/jobs", files=files, data={"tasks": "caption,labels,concepts", "model": "ucm"})
        assert r.status_code == 202, r.text
        job = wait_job(url, r.json()["id"])
        assert job["state"] == "succeeded" and job["tasks"] == ["caption", "labels", "concepts"], job
        lines = [json.loads(x) for x in httpx.get(f"{url}/v1/jobs/{job['id']}/results").text.splitlines()]
    jobbed = {x["name"]: x for x in lines}
    capsys.readouterr()
    status = main(["caption", *(str(folder / n) for n in names), "--store", str(store.root), "--model", "ucm",
                   "--tasks", "caption,labels,concepts", "--batch-size", "1"])
    assert status == 0
    offline = {json.loads(x)["path"].rsplit("/", 1)[-1]: json.loads(x) for x in capsys.readouterr().out.splitlines()}
    assert set(jobbed) == set(offline) == set(names)
    for name in names:
        caption, labels, concepts = (routed[k][name] for k in ("caption", "labels", "concepts"))
        for record in (jobbed[name], offline[name]):
            assert {k: record[k] for k in CAPTION_FIELDS} == {k: caption[k] for k in CAPTION_FIELDS}
            assert (record["labels"], record["predicted"], record["threshold"]) == (
                labels["labels"], labels["predicted"], labels["threshold"])
            assert record["labels_model"] == {"name": labels["model"], "version": labels["version"]}
            assert (record["concepts"], record["counts"]) == (concepts["concepts"], concepts["counts"])
            assert record["concepts_model"] == {"name": concepts["model"], "version": concepts["version"]}


def test_a_default_captioner_that_failed_to_load_is_named_not_replaced(store, tmp_path):
    import shutil

    broken = tmp_path / "store"
    shutil.copytree(store.root, broken)
    weights = broken / "lightcap" / "1" / "captioner.safetensors"
    weights.write_bytes(weights.read_bytes() + b"tampered")
    with LiveServer(create_app(settings_for(type(store)(broken), tmp_path))) as url:
        until = time.monotonic() + 60
        while httpx.get(f"{url}/readyz").json().get("detail", "").find("loading") >= 0 and time.monotonic() < until:
            time.sleep(0.2)
        assert httpx.get(f"{url}/readyz").status_code == 503
        r = httpx.post(f"{url}/v1/caption", content=image_bytes(seed=1), headers={"Content-Type": "image/png"})
        body = assert_problem(r, 503, "model-unavailable")
        assert "'lightcap' failed to load" in body["detail"] and "ucm-captioner" in body["detail"], body["detail"]
        r = httpx.post(f"{url}/v1/caption", params={"model": "ucm"}, content=image_bytes(seed=1),
                       headers={"Content-Type": "image/png"})
        assert r.status_code == 200 and r.json()["results"][0]["model"] == "ucm-captioner"


def test_concepts_answers_every_instance_with_counts_or_the_distinct_words(tmp_path):
    import io

    from captioning.data.synth.generator import render
    from captioning.store import ModelStore

    picture = render("denseresidential", 777, 3, 256).image
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    settings = settings_for(ModelStore(), tmp_path, models="concepts")  # the embedded, trained extractor
    with LiveServer(create_app(settings)) as url:
        wait_ready(url)
        post = lambda **params: httpx.post(f"{url}/v1/concepts", params=params, content=buf.getvalue(),  # noqa: E731
                                           headers={"Content-Type": "image/png"}, timeout=60).json()["results"][0]
        every = post()
        words = post(group="concept")
        top = post(top_k=2)
    assert every["counts"]["house"] > 3, every["counts"]  # a dense residential picture: many houses, not one
    assert len(every["concepts"]) == sum(every["counts"].values())
    assert sum(c["concept"] == "house" for c in every["concepts"]) == every["counts"]["house"]
    assert sorted(c["concept"] for c in words["concepts"]) == sorted(every["counts"])  # one entry per word
    assert words["counts"] == every["counts"]
    assert top["concepts"] == every["concepts"][:2] and top["counts"] == every["counts"]  # top_k trims the list
