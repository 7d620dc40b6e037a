"""Every interactive route through a real uvicorn server on a loopback port, with httpx, on freshly
published random-weight models (UCM captioner + classifier, concept extractor) in a temporary store."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import pytest
from PIL import Image

from captioning.data import LABELS
from service.app import create_app
from service.settings import Settings
from service.testing import (
    LiveServer,
    assert_problem,
    image_bytes,
    metric,
    png_bomb,
    random_store,
    wait_ready,
)

API_KEY = "test-api-key-123"
ADMIN_KEY = "test-admin-key-456"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return random_store(tmp_path_factory.mktemp("service-store") / "store", lightcap=True)


def settings_for(store, tmp_path, **overrides) -> Settings:
    base = dict(
        model_store=store.root, data_dir=tmp_path / "data", api_key=API_KEY, admin_key=ADMIN_KEY,
        max_body_bytes=2 * 1024 * 1024, max_image_pixels=4_000_000, max_images_per_request=8,
        max_batch_size=8, max_wait_ms=20, replicas=1, torch_threads=1, intake_threads=2,
    )
    base.update(overrides)
    return Settings(_env_file=None, **base)


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    settings = settings_for(store, tmp_path_factory.mktemp("service-data"))
    app = create_app(settings)
    with LiveServer(app) as url:
        wait_ready(url)
        yield url, app


# --- the three image routes --------------------------------------------------------------------------
def test_caption_accepts_multipart_json_and_raw_bodies(server):
    url, _ = server
    files = [("files", ("a.png", image_bytes(seed=1), "image/png")),
             ("files", ("b.jpg", image_bytes(seed=2, fmt="JPEG"), "image/jpeg"))]
    r = httpx.post(f"{url}/v1/caption", files=files, data={"model": "ucm", "beam_size": "2", "max_length": "8"},
                   headers=AUTH)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [(x["index"], x["filename"]) for x in results] == [(0, "a.png"), (1, "b.jpg")]
    for x in results:
        assert x["model"] == "ucm-captioner" and x["version"] == 1
        assert isinstance(x["caption"], str) and 1 <= len(x["tokens"]) <= 8
        assert x["input"] == {"format": x["input"]["format"], "width": 96, "height": 64, "notes": []}
        assert set(x["timings_ms"]) == {"decode_ms", "preprocess_ms", "queue_ms", "inference_ms", "batch_size"}
        assert x["timings_ms"]["batch_size"] == 2  # both images of the request ran as one batch

    payload = {"images": [{"data": base64.b64encode(image_bytes(seed=1)).decode(), "filename": "a.png"},
                          "data:image/png;base64," + base64.b64encode(image_bytes(seed=3)).decode()],
               "model": "ucm", "beam_size": 2, "max_length": 8}
    r = httpx.post(f"{url}/v1/caption", json=payload, headers=AUTH)
    assert r.status_code == 200, r.text
    first = r.json()["results"][0]
    assert first["caption"] == results[0]["caption"]  # same image, same parameters, same model

    r = httpx.post(f"{url}/v1/caption?filename=raw.png&include_concepts=true", content=image_bytes(seed=4),
                   headers={**AUTH, "Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    assert (result["model"], result["version"]) == ("lightcap", 1)  # the default once LightCap is served
    assert result["filename"] == "raw.png" and result["concepts_model"]["name"] == "concepts"
    assert "concepts" in result["extra"]  # the concepts LightCap itself was given
    for c in result["concepts"]:
        x1, y1, x2, y2 = c["box"]
        assert 0 <= x1 <= x2 <= 96.01 and 0 <= y1 <= y2 <= 64.01  # in the uploaded image's pixels


def test_labels_with_threshold_override(server):
    url, _ = server
    files = {"file": ("scene.png", image_bytes(seed=5), "image/png")}
    r = httpx.post(f"{url}/v1/labels", files=files, headers=AUTH)
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    assert list(result["labels"]) == list(LABELS)
    assert result["threshold"] == 0.5
    assert result["predicted"] == [k for k, v in result["labels"].items() if v >= 0.5]
    r = httpx.post(f"{url}/v1/labels?threshold=0", files=files, headers=AUTH)
    assert r.json()["results"][0]["predicted"] == list(LABELS)


def test_concepts_with_annotated_png(server):
    url, _ = server
    r = httpx.post(f"{url}/v1/concepts", files={"f": ("x.png", image_bytes(120, 80, seed=6), "image/png")},
                   data={"annotate": "true", "top_k": "3"}, headers=AUTH)
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    assert 1 <= len(result["concepts"]) <= 3
    scores = [c["score"] for c in result["concepts"]]
    assert scores == sorted(scores, reverse=True)
    drawn = Image.open(io.BytesIO(base64.b64decode(result["annotated_png"])))
    assert drawn.format == "PNG" and drawn.size == (120, 80)


def test_models_listing_and_unknown_model(server):
    url, _ = server
    body = httpx.get(f"{url}/v1/models", headers=AUTH).json()
    by_name = {m["name"]: m for m in body["models"]}
    assert set(by_name) == {"lightcap", "ucm-captioner", "ucm-classifier", "concepts"}
    assert by_name["lightcap"]["parents"] == [{"name": "concepts", "version": 1}]
    cap = by_name["ucm-captioner"]
    assert cap["serving_version"] == 1 and cap["aliases"]["production"] == 1 and cap["kind"] == "caption"
    assert cap["metrics"] == {"note": "random weights"} and cap["versions"][0]["version"] == 1
    assert body["default_caption_model"] == "lightcap"
    assert_problem(httpx.get(f"{url}/v1/models/nope", headers=AUTH), 404, "unknown-model")
    r = httpx.post(f"{url}/v1/caption?model=nope", content=image_bytes(), headers={**AUTH, "Content-Type": "image/png"})
    assert_problem(r, 404, "unknown-model")


# --- bad input: each gets its 4xx and a problem+json body --------------------------------------------
def post_file(url, name, data, **kw):
    return httpx.post(f"{url}/v1/caption", files={"file": (name, data, "application/octet-stream")}, headers=AUTH, **kw)


def test_bad_images_get_their_own_problem_types(server):
    url, _ = server
    body = assert_problem(post_file(url, "bomb.png", png_bomb()), 413, "image-too-large")
    assert body["errors"][0]["filename"] == "bomb.png"
    png = image_bytes(200, 200)
    assert_problem(post_file(url, "cut.png", png[: len(png) // 2]), 400, "invalid-image")
    body = assert_problem(post_file(url, "notes.jpg", b"just some text\n" * 20), 415, "unsupported-image")
    assert "notes.jpg" in body["detail"] and "text" in body["detail"]
    assert_problem(post_file(url, "empty.png", b""), 400, "empty-image")
    buf = io.BytesIO()
    Image.new("RGB", (2500, 2000), (40, 120, 60)).save(buf, format="PNG")  # 5 MP > this server's 4 MP cap
    assert len(buf.getvalue()) < 100_000
    body = assert_problem(post_file(url, "big.png", buf.getvalue()), 413, "image-too-large")
    assert "2500x2000 = 5000000 pixels" in body["detail"]


def test_one_bad_image_names_itself_among_good_ones(server):
    url, _ = server
    files = [("files", ("ok.png", image_bytes(seed=1), "image/png")), ("files", ("bad.jpg", b"text", "image/jpeg")),
             ("files", ("ok2.png", image_bytes(seed=2), "image/png"))]
    body = assert_problem(httpx.post(f"{url}/v1/caption", files=files, headers=AUTH), 415, "unsupported-image")
    assert [(e["index"], e["filename"]) for e in body["errors"]] == [(1, "bad.jpg")]


def test_body_cap_is_enforced_while_reading(server):
    url, _ = server
    big = b"\0" * (2 * 1024 * 1024 + 1)
    r = httpx.post(f"{url}/v1/caption", content=big, headers={**AUTH, "Content-Type": "image/png"})
    assert_problem(r, 413, "payload-too-large")

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(40):
            yield b"\0" * 65536

    r = httpx.post(f"{url}/v1/caption", content=chunks(), headers={**AUTH, "Content-Type": "image/png"})
    body = assert_problem(r, 413, "payload-too-large")
    assert "more than 2097152 bytes received" in body["detail"]


def test_request_shape_errors(server):
    url, _ = server
    img = ("files", ("a.png", image_bytes(), "image/png"))
    assert_problem(httpx.post(f"{url}/v1/caption", files=[img] * 9, headers=AUTH), 413, "too-many-images")
    body = assert_problem(httpx.post(f"{url}/v1/caption", files=[img], data={"beam_size": "0"}, headers=AUTH),
                          422, "invalid-parameter")
    assert body["errors"][0]["parameter"] == "beam_size"
    assert_problem(httpx.post(f"{url}/v1/caption", files=[img], data={"beam_size": "99"}, headers=AUTH),
                   422, "invalid-parameter")
    assert_problem(httpx.post(f"{url}/v1/caption", files=[img], data={"bem_size": "2"}, headers=AUTH),
                   422, "invalid-parameter")
    assert_problem(httpx.post(f"{url}/v1/caption", json={"images": []}, headers=AUTH), 400, "no-image")
    assert_problem(httpx.post(f"{url}/v1/caption", json={"images": ["!!"]}, headers=AUTH), 400, "invalid-base64")
    assert_problem(httpx.post(f"{url}/v1/caption", content=b"{", headers={**AUTH, "Content-Type": "application/json"}),
                   400, "invalid-request")
    assert_problem(httpx.post(f"{url}/v1/caption", content=b"x", headers={**AUTH, "Content-Type": "text/plain"}),
                   415, "unsupported-media-type")
    assert_problem(httpx.get(f"{url}/v1/nothing", headers=AUTH), 404, "not-found")
    assert_problem(httpx.get(f"{url}/v1/caption", headers=AUTH), 405, "method-not-allowed")


# --- auth, health, metrics, docs ----------------------------------------------------------------------
def test_api_key_and_admin_key(server):
    url, _ = server
    r = httpx.post(f"{url}/v1/caption", content=image_bytes(), headers={"Content-Type": "image/png"})
    body = assert_problem(r, 401, "unauthorized")
    assert r.headers["www-authenticate"] == "Bearer" and "no API key" in body["detail"]
    assert_problem(httpx.get(f"{url}/v1/models", headers={"X-API-Key": "wrong-key-000"}), 401, "unauthorized")
    assert httpx.get(f"{url}/v1/models", headers={"X-API-Key": API_KEY}).status_code == 200
    assert_problem(httpx.post(f"{url}/v1/models/ucm-captioner/reload"), 401, "unauthorized")
    assert_problem(httpx.post(f"{url}/v1/models/ucm-captioner/reload", headers=AUTH), 403, "forbidden")
    r = httpx.post(f"{url}/v1/models/ucm-captioner/reload", headers=ADMIN)
    assert r.status_code == 200 and r.json()["outcome"] == "unchanged"
    for path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json", "/problems/overloaded"):
        assert httpx.get(f"{url}{path}").status_code == 200, path  # no key needed


def test_docs_page_needs_no_cdn(server):
    url, _ = server
    page = httpx.get(f"{url}/docs").text
    assert "cdn." not in page and "/docs-static/swagger-ui-bundle.js" in page
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        r = httpx.get(f"{url}/docs-static/{asset}")
        assert r.status_code == 200 and len(r.content) > 10_000, asset


def test_health_ready_metrics_and_openapi(server):
    url, app = server
    assert httpx.get(f"{url}/healthz").json() == {"status": "alive"}
    assert httpx.get(f"{url}/readyz").json()["models"] == {"lightcap": 1, "ucm-captioner": 1, "ucm-classifier": 1,
                                                           "concepts": 1}
    httpx.post(f"{url}/v1/labels", content=image_bytes(), headers={**AUTH, "Content-Type": "image/png"})
    text = httpx.get(f"{url}/metrics").text
    for name in ("captioner_http_request_duration_seconds_bucket", "captioner_queue_wait_seconds_bucket",
                 "captioner_inference_seconds_bucket", "captioner_batch_size_bucket", "captioner_queue_depth",
                 "captioner_http_requests_total", "captioner_jobs_total", "captioner_model_info"):
        assert name in text, name
    precision, vision = app.state.settings.precision_name, app.state.settings.vision_runtime_name
    assert ('captioner_model_info{alias="production",device="cpu",name="ucm-captioner",'
            f'precision="{precision}",profile="tiny",task="ucm-captioner",version="1",'
            f'vision_runtime="{vision}"}} 1.0') in text
    assert metric(url, "captioner_http_requests_total", {"route": "/v1/labels", "status": "200"}) >= 1
    spec = httpx.get(f"{url}/openapi.json").json()
    body = spec["paths"]["/v1/caption"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json", "image/*"} <= set(body)
    assert set(httpx.get(f"{url}/problems").json()[0]) == {"type", "status", "title", "description"}


# --- batching under concurrency -----------------------------------------------------------------------
async def _burst(url, n, *, path="/v1/caption", params=None, timeout=60.0):
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=n)) as client:
        async def one(i):
            return await client.post(f"{url}{path}", params=params, content=image_bytes(seed=i),
                                     headers={**AUTH, "Content-Type": "image/png"})
        return await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)


def test_concurrent_requests_are_batched(server):
    url, _ = server
    before_count = metric(url, "captioner_batch_size_count", {"model": "ucm-classifier"})
    before_sum = metric(url, "captioner_batch_size_sum", {"model": "ucm-classifier"})
    responses = asyncio.run(_burst(url, 24, path="/v1/labels"))
    assert all(r.status_code == 200 for r in responses)
    batches = metric(url, "captioner_batch_size_count", {"model": "ucm-classifier"}) - before_count
    images = metric(url, "captioner_batch_size_sum", {"model": "ucm-classifier"}) - before_sum
    assert images == 24
    assert images / batches > 1, f"{batches} batches for 24 concurrent images: no batching happened"
    assert max(r.json()["results"][0]["timings_ms"]["batch_size"] for r in responses) > 1
