"""POST /v1/scenes as a durable job on the job machinery, through the same pools: upload (streamed past the
interactive body cap) or path under an allowed root, progress in tiles, GeoJSON and files when done, a bad
raster named at submit, and a server restart mid-scene that resumes without a lost or duplicated tile."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from captioning.data.synth.mosaic import write_mosaic
from service.app import create_app
from service.settings import Settings
from service.testing import LiveServer, assert_problem, random_store, wait_ready


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return random_store(tmp_path_factory.mktemp("scene-store") / "store")


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    path = tmp_path_factory.mktemp("scenes") / "scene.tif"
    write_mosaic(path, 700, 520, 4321, classes=["airplane", "storagetanks", "forest"], block=1)
    return path


def settings_for(store, tmp_path, **overrides) -> Settings:
    base = dict(model_store=store.root, data_dir=tmp_path / "data", max_body_bytes=64 * 1024, max_batch_size=8,
                max_wait_ms=5, replicas=1, torch_threads=1, intake_threads=2, scene_roots=str(tmp_path / "roots"))
    base.update(overrides)
    return Settings(_env_file=None, **base)


def wait_scene(url: str, job_id: str, timeout: float = 300.0, until=("succeeded", "failed", "cancelled")) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/scenes/{job_id}").json()
        if job["state"] in until:
            return job
        time.sleep(0.2)
    raise AssertionError(f"scene job {job_id} did not finish: {job}")


def test_an_uploaded_scene_runs_through_the_pools_and_answers_geojson(store, scene, tmp_path):
    assert scene.stat().st_size > 64 * 1024  # bigger than the interactive body cap set below
    with LiveServer(create_app(settings_for(store, tmp_path))) as url:
        wait_ready(url)
        r = httpx.post(f"{url}/v1/scenes", files={"file": ("scene.tif", scene.read_bytes(), "image/tiff")},
                       data={"tile": "256", "overlap": "32"})
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["kind"] == "scene" and r.headers["location"] == f"/v1/scenes/{job['id']}"
        assert set(job["models"]) == {"labels", "concepts"}
        early = httpx.get(f"{url}/v1/scenes/{job['id']}/results")
        if early.status_code != 200:  # it may already be done on a fast machine
            assert_problem(early, 409, "scene-not-ready")
        done = wait_scene(url, job["id"])
        assert done["state"] == "succeeded" and done["done"] == done["total"] > 0 and done["progress"] == 1.0, done
        geo = httpx.get(f"{url}/v1/scenes/{job['id']}/results")
        assert geo.status_code == 200 and geo.headers["content-type"].startswith("application/geo+json")
        features = geo.json()["features"]
        tiles = [f for f in features if f["properties"]["kind"] == "tile"]
        assert len(tiles) == done["total"]
        assert all(set(f["properties"]["probabilities"]) and f["geometry"]["type"] == "Polygon" for f in tiles)
        overlay = httpx.get(f"{url}/v1/scenes/{job['id']}/files/overlay.png")
        assert overlay.status_code == 200 and overlay.content.startswith(b"\x89PNG")
        summary = httpx.get(f"{url}/v1/scenes/{job['id']}/files/summary.json").json()
        assert summary
        assert_problem(httpx.get(f"{url}/v1/scenes/{job['id']}/files/secrets.txt"), 404, "not-found")
        assert [s["id"] for s in httpx.get(f"{url}/v1/scenes").json()["scenes"]] == [job["id"]]
        assert httpx.get(f"{url}/v1/jobs").json()["jobs"] == []  # scene jobs are not image jobs
        assert_problem(httpx.get(f"{url}/v1/jobs/{job['id']}"), 404, "not-found")


def test_scene_by_path_only_under_the_allowed_roots_and_bad_rasters_named(store, scene, tmp_path):
    roots = tmp_path / "roots"
    roots.mkdir()
    inside = roots / "inside.tif"
    inside.write_bytes(scene.read_bytes())
    corrupt = roots / "corrupt.tif"
    corrupt.write_bytes(scene.read_bytes()[:2000])
    with LiveServer(create_app(settings_for(store, tmp_path))) as url:
        wait_ready(url)
        r = httpx.post(f"{url}/v1/scenes", json={"path": str(scene)})
        assert "CAPTIONER_SCENE_ROOTS" in assert_problem(r, 403, "forbidden")["detail"]
        r = httpx.post(f"{url}/v1/scenes", json={"path": str(corrupt)})
        assert "corrupt.tif" in assert_problem(r, 422, "invalid-scene")["detail"]
        r = httpx.post(f"{url}/v1/scenes", files={"file": ("notes.tif", b"just text", "image/tiff")})
        assert_problem(r, 422, "invalid-scene")
        r = httpx.post(f"{url}/v1/scenes", json={"path": str(inside), "tile": 128, "overlap": 128})
        assert assert_problem(r, 422, "invalid-parameter")["errors"][0]["parameter"] == "overlap"
        r = httpx.post(f"{url}/v1/scenes", json={"path": str(inside), "tile": 128, "overlap": 16, "concepts": False})
        assert r.status_code == 202, r.text
        done = wait_scene(url, r.json()["id"])
        assert done["state"] == "succeeded" and done["models"] == {"labels": "ucm-classifier"}


def test_a_restart_mid_scene_resumes_without_lost_or_duplicated_tiles(store, scene, tmp_path):
    settings = settings_for(store, tmp_path, max_batch_size=1)
    with LiveServer(create_app(settings)) as url:
        wait_ready(url)
        r = httpx.post(f"{url}/v1/scenes", files={"file": ("scene.tif", scene.read_bytes(), "image/tiff")},
                       data={"tile": "96", "overlap": "16"})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            job = httpx.get(f"{url}/v1/scenes/{job_id}").json()
            if job["done"] >= 16:
                break
            time.sleep(0.05)
        assert 0 < job["done"] < job["total"], job  # stopped mid-scene
    with LiveServer(create_app(settings)) as url:  # the same data folder: the job resumes
        wait_ready(url)
        done = wait_scene(url, job_id)
        assert done["state"] == "succeeded" and done["runs"] == 2 and done["done"] == done["total"], done
    records = (settings.data_dir / "jobs" / job_id / "scene").glob("*.jsonl")
    lines = [json.loads(x) for f in records for x in f.read_text().splitlines() if x.strip()]
    tiles = [rec["i"] for rec in lines]
    assert sorted(tiles) == sorted(set(tiles)) and len(set(tiles)) == done["total"]
