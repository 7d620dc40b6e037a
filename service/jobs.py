"""Batch caption jobs: SQLite (WAL) + files under ``CAPTIONER_DATA_DIR``; resumable, exactly-once results.

Layout::

    <data_dir>/jobs.sqlite3           jobs and items tables (the source of truth)
    <data_dir>/jobs-runner.lock       held by the one process that runs jobs (flock: freed when it dies)
    <data_dir>/jobs/<id>/uploads/     what the client sent (archives or images)
    <data_dir>/jobs/<id>/files/       extracted images, ``<index>-<name>``
    <data_dir>/jobs/<id>/results.jsonl  one line per finished entry, input order once the job is finished

Exactly once: an entry is finished by one transaction, ``UPDATE items SET state=... WHERE state='pending'``
plus the job's counters, so a result is recorded once even if the entry ran twice (a crash after the
batch, before the commit). The JSONL file is derived from the table: lines are appended after each
commit, and the file is rebuilt from the table when a job (re)starts and when it finishes, so a crash
between commit and append (or a torn line) loses nothing and duplicates nothing. ``GET .../results``
streams from the table.

States: queued -> preparing (extracting) -> running -> succeeded | failed | cancelled. On start the runner
takes the oldest active job: ``preparing`` starts extraction over; ``running`` continues with the entries
still pending. Job entries go through the same model pool as interactive requests, at background
priority, at most ``job_inflight`` at a time.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from captioning.inference import parse_kinds
from service.archive import Extractor, Limits
from service.inference import error_of, infer_background, plan
from service.intake import ImageProblem, RawImage
from service.pool import Dropped, PoolClosed, cancel_items
from service.problems import CATALOG, Problem, problem_type

log = logging.getLogger(__name__)

ACTIVE = ("queued", "preparing", "running")
FINAL = ("succeeded", "failed", "cancelled")
ITEM_TIMEOUT_S = 24 * 3600.0  # job entries wait as long as interactive traffic keeps the pool busy

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    model TEXT NOT NULL,
    params TEXT NOT NULL,
    uploads TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    started REAL,
    finished REAL,
    total INTEGER NOT NULL DEFAULT 0,
    done INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    refused INTEGER NOT NULL DEFAULT 0,
    runs INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    kind TEXT NOT NULL DEFAULT 'images'
);
CREATE TABLE IF NOT EXISTS items (
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    name TEXT NOT NULL,
    path TEXT,
    state TEXT NOT NULL,
    result TEXT,
    finished REAL,
    PRIMARY KEY (job_id, idx)
);
CREATE INDEX IF NOT EXISTS items_by_state ON items (job_id, state, idx);
"""


def iso(ts: float | None) -> str | None:
    return None if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds")


class JobStore:
    """The jobs database. Thread-safe (one connection, one lock); call it from threads, not the loop."""

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.jobs_dir = self.data_dir / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.data_dir / "jobs.sqlite3"
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable across process crashes
        self._db.executescript(SCHEMA)
        columns = {row["name"] for row in self._db.execute("PRAGMA table_info(jobs)")}
        if "kind" not in columns:  # a database from before scene jobs: every job in it is an image job
            self._db.execute("ALTER TABLE jobs ADD COLUMN kind TEXT NOT NULL DEFAULT 'images'")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def _write(self, sql_and_args: list[tuple[str, tuple]]) -> list[int]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                counts = [self._db.execute(sql, args).rowcount for sql, args in sql_and_args]
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return counts

    # --- jobs -----------------------------------------------------------------------------------------
    def create(self, job_id: str, model: str, params: dict[str, Any], uploads: list[str], kind: str = "images") -> None:
        now = time.time()
        self._write([(
            "INSERT INTO jobs (id, state, model, params, uploads, created, updated, kind) "
            "VALUES (?, 'queued', ?, ?, ?, ?, ?, ?)",
            (job_id, model, json.dumps(params), json.dumps(uploads), now, now, kind),
        )])

    def progress(self, job_id: str, total: int, done: int) -> None:
        """A scene job's progress in tiles (its tiles are recorded by captioning.scenes, not in ``items``)."""
        self._write([("UPDATE jobs SET total = ?, done = ?, updated = ? WHERE id = ?", (total, done, time.time(), job_id))])

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return dict(row) if row else None

    def list(self, limit: int = 100, kind: str = "images") -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE kind = ? ORDER BY created DESC LIMIT ?",
                                    (kind, limit)).fetchall()
        return [dict(r) for r in rows]

    def next_active(self) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM jobs WHERE state IN ('queued', 'preparing', 'running') ORDER BY created, id LIMIT 1"
            ).fetchone()
        return dict(row) if row else None

    def set_state(self, job_id: str, state: str, *, only_from: tuple[str, ...] = ACTIVE, error: str | None = None) -> bool:
        now = time.time()
        marks = ", ".join("?" for _ in only_from)
        extra = ", finished = ?" if state in FINAL else ""
        args: tuple = (state, now, error) + ((now,) if state in FINAL else ()) + (job_id, *only_from)
        (count,) = self._write([(
            f"UPDATE jobs SET state = ?, updated = ?, error = COALESCE(?, error){extra} WHERE id = ? AND state IN ({marks})",
            args,
        )])
        return count == 1

    def begin_run(self, job_id: str) -> int:
        now = time.time()
        self._write([("UPDATE jobs SET runs = runs + 1, started = COALESCE(started, ?), updated = ? WHERE id = ?",
                      (now, now, job_id))])
        return self.get(job_id)["runs"]

    def add_items(self, job_id: str, entries: list[Any]) -> bool:
        """Record the extracted entries (refused ones already finished) and move preparing -> running."""
        now = time.time()
        rows = []
        refused = 0
        for idx, entry in enumerate(entries):
            if entry.refused is None:
                rows.append((job_id, idx, entry.name, entry.path, "pending", None, None))
            else:
                refused += 1
                line = {"index": idx, "name": entry.name, "error": {
                    "type": problem_type(entry.slug), "status": CATALOG[entry.slug][0], "detail": entry.refused}}
                rows.append((job_id, idx, entry.name, None, "refused", json.dumps(line), now))
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                state = self._db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
                if state is None or state["state"] != "preparing":
                    self._db.execute("ROLLBACK")
                    return False
                self._db.execute("DELETE FROM items WHERE job_id = ?", (job_id,))
                self._db.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
                self._db.execute(
                    "UPDATE jobs SET state = 'running', total = ?, refused = ?, done = 0, failed = 0, updated = ? WHERE id = ?",
                    (len(entries), refused, now, job_id),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return True

    def pending(self, job_id: str) -> list[tuple[int, str, str]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT idx, name, path FROM items WHERE job_id = ? AND state = 'pending' ORDER BY idx", (job_id,)
            ).fetchall()
        return [(r["idx"], r["name"], r["path"]) for r in rows]

    def complete(self, job_id: str, idx: int, state: str, line: dict[str, Any]) -> bool:
        """Finish one entry exactly once (``done`` or ``failed``) and append its line to results.jsonl."""
        text = json.dumps(line)
        column = "done" if state == "done" else "failed"
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                changed = self._db.execute(
                    "UPDATE items SET state = ?, result = ?, finished = ? WHERE job_id = ? AND idx = ? AND state = 'pending'",
                    (state, text, now, job_id, idx),
                ).rowcount
                if changed:
                    self._db.execute(
                        f"UPDATE jobs SET {column} = {column} + 1, updated = ? WHERE id = ?", (now, job_id)
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            if changed:
                results = self.job_dir(job_id) / "results.jsonl"
                if results.parent.is_dir():
                    with open(results, "a", encoding="utf-8") as fh:
                        fh.write(text + "\n")
        return bool(changed)

    def results(self, job_id: str, after: int = -1, limit: int = 500) -> list[tuple[int, str]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT idx, result FROM items WHERE job_id = ? AND idx > ? AND state != 'pending' ORDER BY idx LIMIT ?",
                (job_id, after, limit),
            ).fetchall()
        return [(r["idx"], r["result"]) for r in rows]

    def rebuild_results(self, job_id: str) -> int:
        """Rewrite results.jsonl from the table (input order), atomically; -> lines written."""
        folder = self.job_dir(job_id)
        if not folder.is_dir():
            return 0
        tmp = folder / f".results.{uuid.uuid4().hex}.tmp"
        count = 0
        with self._lock:
            with open(tmp, "w", encoding="utf-8") as fh:
                after = -1
                while page := self.results(job_id, after):
                    for idx, text in page:
                        fh.write(text + "\n")
                        after = idx
                        count += 1
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, folder / "results.jsonl")
        return count

    def delete(self, job_id: str) -> None:
        self._write([("DELETE FROM items WHERE job_id = ?", (job_id,)), ("DELETE FROM jobs WHERE id = ?", (job_id,))])
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)


ROUTES = {"images": "/v1/jobs", "scene": "/v1/scenes"}


def describe(job: dict[str, Any]) -> dict[str, Any]:
    total, done, failed, refused = job["total"], job["done"], job["failed"], job["refused"]
    params = json.loads(job["params"])
    models = params.pop("models", {"caption": job["model"]})
    finished = done + failed + refused
    base = f"{ROUTES[job['kind']]}/{job['id']}"
    links = {"self": base, "results": f"{base}/results"}
    if job["kind"] == "scene":
        links["files"] = f"{base}/files/"
    return {
        "id": job["id"],
        "kind": job["kind"],
        "state": job["state"],
        "model": job["model"],
        "models": models,
        "tasks": list(models),
        "params": params,
        "uploads": [original for _, original in json.loads(job["uploads"])],
        "total": total,
        "done": done,
        "failed": failed,
        "refused": refused,
        "pending": total - finished,
        "progress": round(finished / total, 4) if total else (1.0 if job["state"] in FINAL else 0.0),
        "created": iso(job["created"]),
        "started": iso(job["started"]),
        "finished": iso(job["finished"]),
        "runs": job["runs"],
        "error": job["error"],
        "links": links,
    }


class JobManager:
    """Owns the job store and the runner task. Only the process holding ``jobs-runner.lock`` runs jobs (one
    at a time, oldest first); with several uvicorn workers the others accept uploads and answer queries, and
    one of them takes over within a few seconds if the runner process dies."""

    POLL_S = 1.0
    TAKEOVER_S = 3.0

    def __init__(self, ctx: Any):
        self.ctx = ctx  # service.inference.Ctx: settings, registry, pools, intake threads
        self.settings = ctx.settings
        self.registry = ctx.registry
        self.metrics = ctx.metrics
        self.store: JobStore | None = None
        self._task: asyncio.Task | None = None
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._lock = FileLock(
            str(Path(self.settings.data_dir) / "jobs-runner.lock"), timeout=0, thread_local=False, preserve_lock_file=True
        )
        self._holding = False
        self._cancelled: set[str] = set()
        self._inflight: dict[str, set] = {}

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        Path(self.settings.data_dir).mkdir(parents=True, exist_ok=True)
        self.store = await asyncio.to_thread(JobStore, self.settings.data_dir)
        self._task = asyncio.create_task(self._main(), name="job-runner")

    async def stop(self, timeout: float) -> None:
        self._stopping = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                log.warning("job runner did not stop within %.0f s", timeout)
                self._task.cancel()
            except Exception:  # noqa: BLE001 - already logged by _main
                pass
        if self._holding:
            self._lock.release()
            self._holding = False
        if self.store is not None:
            await asyncio.to_thread(self.store.close)

    # --- API used by the routes -----------------------------------------------------------------------
    def new_job_dir(self) -> tuple[str, Path]:
        job_id = uuid.uuid4().hex
        folder = self.store.job_dir(job_id)
        (folder / "uploads").mkdir(parents=True)
        return job_id, folder

    async def create(self, job_id: str, model: str, params: dict[str, Any], uploads: list[str],
                     kind: str = "images") -> dict[str, Any]:
        await asyncio.to_thread(self.store.create, job_id, model, params, uploads, kind)
        self.metrics.jobs.labels("created").inc()
        self._wakeup.set()
        return await self.get(job_id, kind)

    async def get(self, job_id: str, kind: str = "images") -> dict[str, Any]:
        job = await asyncio.to_thread(self.store.get, job_id)
        if job is None or job["kind"] != kind:
            raise Problem("not-found", f"no {'scene' if kind == 'scene' else 'job'} {job_id!r}")
        return describe(job)

    async def cancel(self, job_id: str, purge: bool = False, kind: str = "images") -> dict[str, Any] | None:
        job = await self.get(job_id, kind)
        if job["state"] in ACTIVE:
            if await asyncio.to_thread(self.store.set_state, job_id, "cancelled"):
                self.metrics.jobs.labels("cancelled").inc()
            self._cancelled.add(job_id)
            cancel_items(list(self._inflight.get(job_id, ())))
        elif not purge:
            raise Problem("job-not-active", f"job {job_id} is {job['state']}; nothing to cancel (purge=true deletes it)")
        if purge:
            await asyncio.to_thread(self.store.delete, job_id)
            return None
        return await self.get(job_id, kind)

    # --- the runner -----------------------------------------------------------------------------------
    async def _main(self) -> None:
        while not self._stopping:
            if not self._holding:
                try:
                    await asyncio.to_thread(self._lock.acquire)
                    self._holding = True
                    log.info("job runner: this process runs jobs (pid %d)", os.getpid())
                except Timeout:
                    await self._sleep(self.TAKEOVER_S)
                    continue
            if self.registry.loading:
                await self._sleep(0.1)
                continue
            job = await asyncio.to_thread(self.store.next_active)
            if job is None:
                await self._sleep(self.POLL_S)
                continue
            try:
                await self._run(job)
            except Exception as exc:  # noqa: BLE001 - a job's failure must not stop the runner
                log.exception("job %s failed", job["id"])
                await asyncio.to_thread(self.store.set_state, job["id"], "failed", error=f"internal error: {exc}")
                self.metrics.jobs.labels("failed").inc()

    async def _sleep(self, seconds: float) -> None:
        self._wakeup.clear()
        try:
            await asyncio.wait_for(self._wakeup.wait(), seconds)
        except TimeoutError:
            pass

    def _plans(self, job: dict[str, Any]) -> list[Any]:
        """The job's plans on the models served now (params were validated at submit; a model that is no
        longer served, or options it cannot take, fail the job with a Problem naming why)."""
        from service.routes.jobs import JobParams  # the route's parameter model is the job's

        stored = json.loads(job["params"])
        models = stored.pop("models", {"caption": job["model"]})
        params = JobParams.model_validate(stored)
        ctx = self.ctx
        kinds = parse_kinds(params.tasks)
        return [plan(ctx, kind, params, models.get(kind)) for kind in kinds]

    async def _run(self, job: dict[str, Any]) -> None:
        if job["kind"] == "scene":
            from service.scenes import run_scene_job

            return await run_scene_job(self, job)
        job_id = job["id"]
        store = self.store
        try:
            plans = self._plans(job)
        except Problem as problem:
            await asyncio.to_thread(store.set_state, job_id, "failed", error=problem.detail)
            self.metrics.jobs.labels("failed").inc()
            return
        runs = await asyncio.to_thread(store.begin_run, job_id)
        if job["state"] in ("queued", "preparing"):
            await asyncio.to_thread(store.set_state, job_id, "preparing", only_from=("queued", "preparing"))
            entries = await asyncio.to_thread(self._extract, job)
            if not await asyncio.to_thread(store.add_items, job_id, entries):
                return  # cancelled meanwhile
            self.metrics.jobs.labels("started").inc()
            refused = sum(1 for e in entries if e.refused)
            if refused:
                self.metrics.job_items.labels("refused").inc(refused)
        elif runs > 1:
            self.metrics.jobs.labels("resumed").inc()
        await asyncio.to_thread(store.rebuild_results, job_id)
        pending = await asyncio.to_thread(store.pending, job_id)
        await self._feed(job_id, plans, pending)
        if self._stopping or job_id in self._cancelled:
            return
        left = await asyncio.to_thread(store.pending, job_id)
        if not left and await asyncio.to_thread(store.set_state, job_id, "succeeded", only_from=("running",)):
            self.metrics.jobs.labels("succeeded").inc()
            await asyncio.to_thread(store.rebuild_results, job_id)

    def _extract(self, job: dict[str, Any]) -> list[Any]:
        folder = self.store.job_dir(job["id"])
        s = self.settings
        limits = Limits(s.format_list, s.job_max_entry_bytes, s.job_max_total_bytes, s.job_max_entries)
        uploads = [(folder / "uploads" / stored, original) for stored, original in json.loads(job["uploads"])]
        return Extractor(folder, limits).run(uploads)

    async def _feed(self, job_id: str, plans: list[Any], pending: list[tuple[int, str, str]]) -> None:
        slots = asyncio.Semaphore(self.settings.job_inflight)
        tasks: set[asyncio.Task] = set()
        inflight: set = set()
        self._inflight[job_id] = inflight
        last_check = time.monotonic()
        try:
            for idx, name, path in pending:
                await slots.acquire()
                if time.monotonic() - last_check > self.POLL_S:  # a cancel from another process
                    last_check = time.monotonic()
                    job = await asyncio.to_thread(self.store.get, job_id)
                    if job is None or job["state"] != "running":
                        self._cancelled.add(job_id)
                if self._stopping or job_id in self._cancelled:
                    slots.release()
                    break
                task = asyncio.create_task(self._item(job_id, plans, idx, name, path, inflight))
                task.add_done_callback(lambda _t: slots.release())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self._inflight.pop(job_id, None)

    async def _item(self, job_id: str, plans: list[Any], idx: int, name: str, path: str, inflight: set) -> None:
        line: dict[str, Any] = {"index": idx, "name": name}
        try:
            raw = await asyncio.to_thread(_read_entry, self.store.job_dir(job_id) / path, idx, name)
            (outcome,) = await infer_background(self.ctx, [raw], plans, timeout=ITEM_TIMEOUT_S, inflight=inflight)
            line.update(outcome.record())
            state = "done"
        except ImageProblem as problem:
            line["error"] = error_of(problem)
            state = "failed"
        except (Dropped, PoolClosed, asyncio.CancelledError):
            return  # cancelled or shutting down: the entry stays pending (a resume runs it)
        except Exception as exc:  # noqa: BLE001 - the model failed on this entry: record it, go on
            log.exception("job %s entry %d (%s) failed", job_id, idx, name)
            line["error"] = {"type": problem_type("internal-error"), "status": 500,
                             "detail": f"{type(exc).__name__}: {exc}"}
            state = "failed"
        if job_id in self._cancelled:
            return
        if await asyncio.to_thread(self.store.complete, job_id, idx, state, line):
            self.metrics.job_items.labels("done" if state == "done" else "failed").inc()


def _read_entry(path: Path, idx: int, name: str) -> RawImage:
    try:
        return RawImage(idx, name, path.read_bytes())
    except OSError as exc:
        raise ImageProblem("invalid-image", idx, name, f"cannot read the extracted file ({exc.strerror})") from None
