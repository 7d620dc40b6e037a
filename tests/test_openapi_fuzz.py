"""HTTP truth: what /openapi.json promises is what the server sends.

* a schemathesis run (every built-in check, the Python equivalent of ``--checks all``) over the image,
  job, model and problem routes of a real uvicorn server on loopback serving the embedded default models,
  bounded in time (a few examples per operation); generated image fields are drawn from real pictures as
  well as random bytes, so image + parameter combinations reach the models, not only the decoder;
* 405 answers name every method of the path in ``Allow``;
* an unexpected 500 leaves the keep-alive connection usable for the client's next request.
"""

from __future__ import annotations

import base64
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from service.app import create_app
from service.settings import Settings
from service.testing import LiveServer, assert_problem, image_bytes, wait_ready

IMAGES = [image_bytes(48, 32, fmt, seed=i) for i, fmt in enumerate(("PNG", "JPEG", "WEBP", "BMP", "GIF"))]
MAX_EXAMPLES = 6  # per operation and phase: the run takes seconds, not minutes

# Operations fuzzed: every route but /metrics (Prometheus text, not part of the JSON API) and /docs.
FUZZED = r"^/(v1/|problems|healthz|readyz)"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The embedded default store (the repository's model_store/), every model it serves."""
    data = tmp_path_factory.mktemp("fuzz-data")
    settings = Settings(_env_file=None, data_dir=data, torch_threads=1, intake_threads=1, replicas=1,
                        max_batch_size=4, max_wait_ms=1, job_inflight=2)
    app = create_app(settings)
    with LiveServer(app) as url:
        started = time.monotonic()
        ready = wait_ready(url, timeout=300)
        print(f"embedded models ready in {time.monotonic() - started:.1f} s: {ready['models']}")
        yield url


def _real_images(draw_binary: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly real pictures (so the models run), sometimes what the fuzzer drew (so intake is probed)."""
    return st.one_of(st.sampled_from(IMAGES), st.sampled_from(IMAGES), draw_binary)


@pytest.fixture(scope="module")
def api_schema(served):
    schema = schemathesis.openapi.from_url(f"{served}/openapi.json").include(path_regex=FUZZED)

    @schema.hook
    def flatmap_body(context, body):
        """Put real images where the body carries images: JSON ``images`` (base64) and multipart ``files``."""
        if not isinstance(body, dict):
            return st.just(body)
        if isinstance(body.get("images"), list) and body["images"]:
            encoded = _real_images(st.just(None)).map(
                lambda raw: None if raw is None else base64.b64encode(raw).decode())
            pictures = st.lists(encoded, min_size=len(body["images"]), max_size=len(body["images"]))
            return pictures.map(lambda new: {**body, "images": [
                old if fresh is None else fresh for old, fresh in zip(body["images"], new, strict=True)]})
        if isinstance(body.get("files"), list) and body["files"]:
            files = st.lists(_real_images(st.just(None)), min_size=len(body["files"]), max_size=len(body["files"]))
            return files.map(lambda new: {**body, "files": [
                old if fresh is None else fresh for old, fresh in zip(body["files"], new, strict=True)]})
        return st.just(body)

    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_api_does_what_its_schema_says(case):
    """No 5xx; status codes, content types, headers and bodies as documented; valid data accepted,
    invalid data refused (schemathesis' built-in checks, all enabled)."""
    case.call_and_validate(timeout=60)


# --- 405 and keep-alive: no models needed ------------------------------------------------------------
@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """The app over an empty store (no models: starts at once), plus a route that fails unexpectedly."""
    root = tmp_path_factory.mktemp("bare")
    (root / "store").mkdir()
    app = create_app(Settings(_env_file=None, model_store=root / "store", data_dir=root / "data"))

    async def fails():
        raise RuntimeError("a bug in a route")

    app.add_api_route("/fails", fails, include_in_schema=False)
    with LiveServer(app) as url:
        yield url


@pytest.mark.parametrize("method,path,allowed", [
    ("PATCH", "/v1/jobs", "GET, POST"),
    ("PUT", "/v1/jobs", "GET, POST"),
    ("PUT", "/v1/jobs/0123abcd", "DELETE, GET"),
    ("POST", "/v1/jobs/0123abcd", "DELETE, GET"),
    ("GET", "/v1/caption", "POST"),
    ("DELETE", "/v1/jobs/0123abcd/results", "GET"),
])
def test_405_allow_lists_every_method_of_the_path(bare, method, path, allowed):
    r = httpx.request(method, bare + path)
    body = assert_problem(r, 405, "method-not-allowed")
    assert r.headers["allow"] == allowed
    assert f"(allowed: {allowed})" in body["detail"]


def test_a_500_leaves_the_keep_alive_connection_usable(bare):
    """uvicorn closed the connection after an unexpected exception although the 500 said nothing of it, so
    the client's next request on the same connection failed with a reset."""
    with httpx.Client(base_url=bare, timeout=10) as client:
        r = client.get("/fails")
        body = assert_problem(r, 500, "internal-error")
        assert "RuntimeError" in body["detail"] and "a bug in a route" not in r.text  # no internals leak
        assert r.headers.get("connection", "").lower() != "close"
        for _ in range(3):  # the same connection, reused
            assert client.get("/healthz").status_code == 200
            assert_problem(client.get("/fails"), 500, "internal-error")
        assert client.get("/healthz").status_code == 200


def test_openapi_documents_problem_details_and_refuses_empty_image_lists(bare):
    doc = httpx.get(f"{bare}/openapi.json").json()
    schemas = doc["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    problem_ref = {"$ref": "#/components/schemas/Problem"}
    errors = 0
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if status[0] in "45":
                    errors += 1
                    assert response["content"] == {"application/problem+json": {"schema": problem_ref}}, \
                        (method, path, status)
    assert errors > 30
    assert set(schemas["Problem"]["required"]) == {"type", "title", "status", "detail"}
    body = doc["paths"]["/v1/caption"]["post"]["requestBody"]["content"]
    assert body["application/json"]["schema"]["properties"]["images"]["minItems"] == 1
    assert body["multipart/form-data"]["schema"]["properties"]["files"]["minItems"] == 1
    # and what the schema refuses, the server refuses
    assert_problem(httpx.post(f"{bare}/v1/caption", json={"images": []}), 400, "no-image")
