"""Batch jobs: safe archive extraction (refused entries reported one by one), the job routes through a live
server, exactly-once results, cancel, and -- with real server processes -- a SIGKILL in the middle of a job
resumed by the next process with no result lost or duplicated, and a SIGTERM that drains in-flight work."""

from __future__ import annotations

import asyncio
import io
import json
import os
import tarfile
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from service.archive import Entry, Extractor, Limits, unsafe_name
from service.jobs import JobStore
from service.testing import (
    LiveServer,
    ServerProcess,
    assert_problem,
    image_bytes,
    metric,
    random_store,
    wait_ready,
)

FORMATS = ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"]


def zip_bytes(entries: list[tuple[str, bytes] | zipfile.ZipInfo | tuple[zipfile.ZipInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for entry in entries:
            if isinstance(entry, zipfile.ZipInfo):
                z.writestr(entry, b"/etc/passwd")  # a symlink's target is its content
            elif isinstance(entry[0], zipfile.ZipInfo):
                z.writestr(entry[0], entry[1])
            else:
                z.writestr(*entry)
    return buf.getvalue()


def symlink_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (0o120777 << 16)
    return info


def tar_bytes(mode="w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as t:
        def add(name, data=b"", **kw):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            for k, v in kw.items():
                setattr(info, k, v)
            t.addfile(info, io.BytesIO(data) if data else None)

        add("imgs/a.png", image_bytes(seed=1))
        add("imgs/link.png", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        add("imgs/hard.png", type=tarfile.LNKTYPE, linkname="imgs/a.png")
        add("dev/tty0", type=tarfile.CHRTYPE, devmajor=4, devminor=0)
        add("fifo", type=tarfile.FIFOTYPE)
        add("../../escape.png", image_bytes(seed=2))
        add("/abs.png", image_bytes(seed=3))
        add("imgs/b.jpg", image_bytes(seed=4, fmt="JPEG"))
    return buf.getvalue()


EVIL_ZIP_ENTRIES = [
    ("good/one.png", image_bytes(seed=1)),
    ("../../../../tmp/evil.png", image_bytes(seed=2)),
    ("/etc/cron.d/evil.png", image_bytes(seed=3)),
    "symlink",
    ("readme.txt", b"this archive has pictures\n"),
    ("empty.png", b""),
    ("good/two.jpg", image_bytes(seed=4, fmt="JPEG")),
    ("inside/../three.png", image_bytes(seed=5)),  # stays inside the archive: fine
]


def evil_zip() -> bytes:
    return zip_bytes([symlink_info("good/link.png") if e == "symlink" else e for e in EVIL_ZIP_ENTRIES])


def extract(tmp_path, payload: bytes, name: str, **limits) -> list[Entry]:
    upload = tmp_path / "upload"
    tmp_path.mkdir(parents=True, exist_ok=True)
    upload.write_bytes(payload)
    lim = Limits(FORMATS, limits.get("entry", 10_000_000), limits.get("total", 100_000_000), limits.get("count", 1000))
    return Extractor(tmp_path / "job", lim).run([(upload, name)])


# --- extraction -----------------------------------------------------------------------------------------
def test_unsafe_names():
    assert unsafe_name("a/b.png") is None and unsafe_name("a/../b.png") is None
    assert "escapes" in unsafe_name("../b.png") and "escapes" in unsafe_name("a/../../b.png")
    assert unsafe_name("/etc/passwd") == "absolute path" and unsafe_name("C:\\x.png") == "absolute path"
    assert unsafe_name("..\\..\\x.png").startswith("path escapes")


def test_zip_slip_links_and_non_images_are_refused_per_entry(tmp_path):
    entries = extract(tmp_path, evil_zip(), "evil.zip")
    by_name = {e.name: e for e in entries}
    assert [e.name for e in entries if e.refused is None] == ["good/one.png", "good/two.jpg", "inside/../three.png"]
    assert "escapes" in by_name["../../../../tmp/evil.png"].refused
    assert by_name["/etc/cron.d/evil.png"].refused == "absolute path"
    assert by_name["good/link.png"].refused == "symbolic link"
    assert "looks like text" in by_name["readme.txt"].refused and by_name["readme.txt"].slug == "unsupported-image"
    assert "empty" in by_name["empty.png"].refused
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["job/files/000000-one.png", "job/files/000006-two.jpg", "job/files/000007-three.png", "upload"]
    assert not Path("/tmp/evil.png").exists() or Path("/tmp/evil.png").stat().st_mtime < time.time() - 3600


def test_tar_links_devices_and_traversal_are_refused(tmp_path):
    entries = extract(tmp_path, tar_bytes(), "set.tar.gz")
    why = {e.name: e.refused for e in entries}
    assert why["imgs/a.png"] is None and why["imgs/b.jpg"] is None
    assert why["imgs/link.png"].startswith("symbolic link") and why["imgs/hard.png"].startswith("hard link")
    assert why["dev/tty0"].startswith("device") and why["fifo"].startswith("device")
    assert "escapes" in why["../../escape.png"] and why["/abs.png"] == "absolute path"


def test_size_and_count_caps(tmp_path):
    big = image_bytes(400, 400)  # ~480 kB of noise as PNG
    payload = zip_bytes([("small.png", image_bytes(seed=1)), ("big.png", big), ("small2.png", image_bytes(seed=2))])
    entries = extract(tmp_path / "a", payload, "x.zip", entry=len(big) - 1)
    assert [e.refused is None for e in entries] == [True, False, True]
    assert "entry cap" in entries[1].refused
    entries = extract(tmp_path / "b", payload, "x.zip", count=2)
    assert [e.name for e in entries] == ["small.png", "big.png", "(1 more entries)"]
    assert "entry limit (2)" in entries[2].refused


def test_zip_bomb_entry_is_cut_while_decompressing(tmp_path):
    info = zipfile.ZipInfo("bomb.png")
    info.compress_type = zipfile.ZIP_DEFLATED
    payload = zip_bytes([(info, b"\x89PNG\r\n\x1a\n" + b"\0" * 5_000_000)])
    assert len(payload) < 20_000
    (entry,) = extract(tmp_path, payload, "bomb.zip", entry=1_000_000)
    assert "entry cap" in entry.refused


def test_job_store_records_each_entry_once_and_rebuilds_results(tmp_path):
    store = JobStore(tmp_path)
    store.create("j1", "ucm-captioner", {}, [["000-x.zip", "x.zip"]])
    (tmp_path / "jobs" / "j1").mkdir()
    assert store.set_state("j1", "preparing")
    assert store.add_items("j1", [Entry("a.png", "files/a.png"), Entry("b.png", "files/b.png"),
                                  Entry("../c.png", refused="path escapes the archive ('..')")])
    assert store.complete("j1", 0, "done", {"index": 0, "name": "a.png", "caption": "x"})
    assert not store.complete("j1", 0, "done", {"index": 0, "name": "a.png", "caption": "again"})  # exactly once
    job = store.get("j1")
    assert (job["total"], job["done"], job["refused"], job["state"]) == (3, 1, 1, "running")
    assert store.pending("j1") == [(1, "b.png", "files/b.png")]
    results = tmp_path / "jobs" / "j1" / "results.jsonl"
    with open(results, "a") as fh:
        fh.write('{"index": 1, "name": "b.png", "capt')  # a torn line from a crash
    assert store.rebuild_results("j1") == 2
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert [x["index"] for x in lines] == [0, 2] and lines[0]["caption"] == "x"
    assert lines[1]["error"] == {"type": "/problems/refused-entry", "status": 422,
                                 "detail": "path escapes the archive ('..')"}
    store.close()


def test_refused_entries_carry_type_status_and_detail(tmp_path):
    """docs/service.md promises {type, status, detail} for every failed or refused entry."""
    store = JobStore(tmp_path)
    store.create("j1", "ucm-captioner", {}, [])
    (tmp_path / "jobs" / "j1").mkdir()
    store.set_state("j1", "preparing")
    store.add_items("j1", [Entry("a", refused="absolute path"),
                           Entry("b.txt", refused="not an image", slug="unsupported-image"),
                           Entry("c.zip", refused="truncated", slug="invalid-archive")])
    errors = [json.loads(text)["error"] for _, text in store.results("j1")]
    assert [(e["type"], e["status"]) for e in errors] == [
        ("/problems/refused-entry", 422), ("/problems/unsupported-image", 415), ("/problems/invalid-archive", 400)]
    assert all(set(e) == {"type", "status", "detail"} and e["detail"] for e in errors)
    store.close()


def tar_of_images(mode: str, n: int = 3) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as t:
        for i in range(n):
            data = image_bytes(seed=i)
            info = tarfile.TarInfo(f"{i}.png")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["zip", "tar.bz2", "gzip garbage"])
def test_a_truncated_archive_is_invalid_archive_not_unsupported_image(tmp_path, kind):
    if kind == "zip":
        whole = zip_bytes([(f"{i}.png", image_bytes(seed=i)) for i in range(3)])
    elif kind == "tar.bz2":
        whole = tar_of_images("w:bz2")
    else:
        whole = b"\x1f\x8b" + b"not really gzip" * 10
    (entry,) = extract(tmp_path, whole[: len(whole) // 2], "cut")
    assert entry.slug == "invalid-archive", entry
    assert "cannot be read as a zip/tar archive: truncated or corrupt" in entry.refused
    assert ("zip archive" in entry.refused) == (kind == "zip")


def test_a_truncated_tar_gz_keeps_the_entries_before_the_cut(tmp_path):
    whole = tar_of_images("w:gz")
    entries = extract(tmp_path, whole[: len(whole) // 2], "cut.tar.gz")
    assert entries[0].refused is None  # read in full before the cut
    assert entries[-1].name == "cut.tar.gz" and entries[-1].slug == "invalid-archive"
    assert all(e.slug == "invalid-archive" for e in entries if e.refused)


def test_a_file_that_is_neither_image_nor_archive_stays_unsupported_image(tmp_path):
    (entry,) = extract(tmp_path, b"just some notes\n" * 20, "notes.txt")
    assert entry.slug == "unsupported-image" and "looks like text" in entry.refused


# --- through a live server --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return random_store(tmp_path_factory.mktemp("jobs-store") / "store", concepts=False)


def wait_job(url, job_id, states=("succeeded", "failed", "cancelled"), timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} still {job['state']}: {job}")


def results_of(url, job_id) -> list[dict]:
    r = httpx.get(f"{url}/v1/jobs/{job_id}/results")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in r.text.splitlines()]


def test_job_routes_end_to_end(store, tmp_path):
    from service.app import create_app
    from service.settings import Settings

    settings = Settings(_env_file=None, model_store=store.root, data_dir=tmp_path / "data", torch_threads=1,
                        max_batch_size=4, intake_threads=2)
    with LiveServer(create_app(settings)) as url:
        wait_ready(url)
        r = httpx.post(f"{url}/v1/jobs", files={"archive": ("evil.zip", evil_zip(), "application/zip")},
                       data={"beam_size": "1", "max_length": "6"})
        assert r.status_code == 202, r.text
        job = r.json()
        assert r.headers["location"] == f"/v1/jobs/{job['id']}" and job["state"] == "queued"
        job = wait_job(url, job["id"])
        assert job["state"] == "succeeded", job
        assert (job["total"], job["done"], job["failed"], job["refused"]) == (8, 3, 0, 5)
        assert job["progress"] == 1.0 and job["params"] == {"beam_size": 1, "max_length": 6}
        lines = results_of(url, job["id"])
        assert [x["index"] for x in lines] == list(range(8))
        assert [x["name"] for x in lines] == [e[0] if e != "symlink" else "good/link.png" for e in EVIL_ZIP_ENTRIES]
        good = [x for x in lines if "caption" in x]
        assert [x["name"] for x in good] == ["good/one.png", "good/two.jpg", "inside/../three.png"]
        assert all(x["model"] == "ucm-captioner" and x["version"] == 1 for x in good)
        on_disk = (tmp_path / "data" / "jobs" / job["id"] / "results.jsonl").read_text().splitlines()
        assert [json.loads(x) for x in on_disk] == lines

        # several plain files (one not an image) and a raw tar.gz body
        files = [("files", ("x.png", image_bytes(seed=7), "image/png")),
                 ("files", ("notes.jpg", b"hello", "image/jpeg")),
                 ("files", ("cut.png", image_bytes(200, 200)[:3000], "image/png")),
                 ("files", ("cut.zip", evil_zip()[:2000], "application/zip"))]
        job2 = httpx.post(f"{url}/v1/jobs", files=files).json()
        job3 = httpx.post(f"{url}/v1/jobs?filename=set.tar.gz", content=tar_bytes(),
                          headers={"Content-Type": "application/gzip"}).json()
        job2, job3 = wait_job(url, job2["id"]), wait_job(url, job3["id"])
        assert (job2["done"], job2["failed"], job2["refused"]) == (1, 1, 2)
        errors = {x["name"]: x.get("error", {}).get("type") for x in results_of(url, job2["id"])}
        assert errors == {"x.png": None, "notes.jpg": "/problems/unsupported-image", "cut.png": "/problems/invalid-image",
                          "cut.zip": "/problems/invalid-archive"}
        for job_id in (job["id"], job2["id"], job3["id"]):  # every error entry is {type, status, detail}
            for error in [x["error"] for x in results_of(url, job_id) if "error" in x]:
                assert set(error) == {"type", "status", "detail"}, error
                assert error["status"] == {"/problems/refused-entry": 422, "/problems/unsupported-image": 415,
                                           "/problems/invalid-image": 400, "/problems/invalid-archive": 400}[error["type"]]
        assert (job3["done"], job3["refused"]) == (2, 6)

        assert_problem(httpx.delete(f"{url}/v1/jobs/{job['id']}"), 409, "job-not-active")
        assert httpx.delete(f"{url}/v1/jobs/{job['id']}?purge=true").status_code == 204
        assert_problem(httpx.get(f"{url}/v1/jobs/{job['id']}"), 404, "not-found")
        assert not (tmp_path / "data" / "jobs" / job["id"]).exists()
        assert_problem(httpx.post(f"{url}/v1/jobs", content=b"x", headers={"Content-Type": "text/plain"}),
                       415, "unsupported-media-type")
        assert_problem(httpx.post(f"{url}/v1/jobs?model=nope", content=evil_zip(),
                                  headers={"Content-Type": "application/zip"}), 404, "unknown-model")
        assert len(os.listdir(tmp_path / "data" / "jobs")) == 2  # the refused uploads left nothing behind
        assert metric(url, "captioner_jobs_total", {"event": "succeeded"}) == 3
        assert metric(url, "captioner_job_items_total", {"outcome": "refused"}) == 13


def many_images_zip(n: int) -> bytes:
    return zip_bytes([(f"img/{i:04d}.png", image_bytes(48, 48, seed=i)) for i in range(n)])


def test_cancel_stops_a_running_job(store, tmp_path):
    from service.app import create_app
    from service.settings import Settings

    settings = Settings(_env_file=None, model_store=store.root, data_dir=tmp_path / "data", torch_threads=1,
                        max_batch_size=1, job_inflight=1)
    with LiveServer(create_app(settings)) as url:
        wait_ready(url)
        job = httpx.post(f"{url}/v1/jobs", content=many_images_zip(200), headers={"Content-Type": "application/zip"}).json()
        wait_job(url, job["id"], states=("running",))
        while httpx.get(f"{url}/v1/jobs/{job['id']}").json()["done"] < 2:
            time.sleep(0.02)
        cancelled = httpx.delete(f"{url}/v1/jobs/{job['id']}").json()
        assert cancelled["state"] == "cancelled"
        time.sleep(0.5)
        first = httpx.get(f"{url}/v1/jobs/{job['id']}").json()
        time.sleep(0.5)
        later = httpx.get(f"{url}/v1/jobs/{job['id']}").json()
        assert later["state"] == "cancelled" and later["done"] == first["done"] < 200 and later["pending"] > 0


def test_a_server_stopped_mid_job_is_resumed_by_the_next_one(store, tmp_path):
    from service.app import create_app
    from service.settings import Settings

    settings = Settings(_env_file=None, model_store=store.root, data_dir=tmp_path / "data", torch_threads=1,
                        max_batch_size=1, job_inflight=1, models="ucm-captioner")
    n = 60
    with LiveServer(create_app(settings)) as url:
        wait_ready(url)
        job = httpx.post(f"{url}/v1/jobs?beam_size=1&max_length=6", content=many_images_zip(n),
                         headers={"Content-Type": "application/zip"}).json()
        while httpx.get(f"{url}/v1/jobs/{job['id']}").json()["done"] < 3:
            time.sleep(0.01)
    stopped = JobStore(tmp_path / "data").get(job["id"])
    assert stopped["state"] == "running" and 3 <= stopped["done"] < n
    with LiveServer(create_app(settings)) as url:
        wait_ready(url)
        done = wait_job(url, job["id"])
        assert (done["state"], done["runs"], done["done"]) == ("succeeded", 2, n)
        assert [x["index"] for x in results_of(url, job["id"])] == list(range(n))
        assert metric(url, "captioner_jobs_total", {"event": "resumed"}) == 1


# --- real processes: SIGKILL mid-job, restart resumes; SIGTERM drains --------------------------------------
@pytest.mark.slow  # two full server processes (torch import and model load each)
def test_restart_resumes_a_killed_job_exactly_once_and_sigterm_drains(store, tmp_path):
    env = {
        "CAPTIONER_MODEL_STORE": str(store.root), "CAPTIONER_DATA_DIR": str(tmp_path / "data"),
        "CAPTIONER_MODELS": "ucm-captioner", "CAPTIONER_MAX_BATCH_SIZE": "1", "CAPTIONER_JOB_INFLIGHT": "2",
        "CAPTIONER_TORCH_THREADS": "1", "CAPTIONER_LOG_LEVEL": "warning", "CAPTIONER_API_KEY": "",
    }
    env = {k: v for k, v in env.items() if v}
    n = 120
    first = ServerProcess(env, log_path=tmp_path / "server1.log").start()
    try:
        job = httpx.post(f"{first.url}/v1/jobs?beam_size=1&max_length=6", content=many_images_zip(n),
                         headers={"Content-Type": "application/zip"}, timeout=60).json()
        while (state := httpx.get(f"{first.url}/v1/jobs/{job['id']}").json())["done"] < 5:
            time.sleep(0.01)
    finally:
        first.kill()  # a crash: no drain, no cleanup
    assert state["done"] < n, "the job finished before the kill; make it longer"

    second = ServerProcess(env, log_path=tmp_path / "server2.log").start()
    try:
        done = wait_job(second.url, job["id"], timeout=300)
        assert done["state"] == "succeeded" and done["runs"] == 2
        assert (done["total"], done["done"], done["failed"]) == (n, n, 0)
        lines = results_of(second.url, job["id"])
        assert [x["index"] for x in lines] == list(range(n))  # none lost, none twice
        assert [x["name"] for x in lines] == [f"img/{i:04d}.png" for i in range(n)]
        on_disk = (tmp_path / "data" / "jobs" / job["id"] / "results.jsonl").read_text().splitlines()
        assert [json.loads(x) for x in on_disk] == lines
        assert metric(second.url, "captioner_jobs_total", {"event": "resumed"}) == 1

        # graceful shutdown: requests in flight when SIGTERM arrives are all answered
        async def in_flight():
            async with httpx.AsyncClient(timeout=120) as client:
                async def one(i):
                    return await client.post(f"{second.url}/v1/caption", params={"beam_size": 5},
                                             content=image_bytes(seed=i), headers={"Content-Type": "image/png"})
                tasks = [asyncio.create_task(one(i)) for i in range(8)]
                while metric(second.url, "captioner_queue_depth", {"model": "ucm-captioner"}) < 2:
                    await asyncio.sleep(0.01)
                second.proc.send_signal(15)  # SIGTERM
                return await asyncio.gather(*tasks, return_exceptions=True)

        responses = asyncio.run(in_flight())
        assert [getattr(r, "status_code", r) for r in responses] == [200] * 8
        assert second.proc.wait(60) in (0, -15)  # uvicorn re-raises SIGTERM after its graceful shutdown
    finally:
        second.kill()
