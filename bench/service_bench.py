"""Load benchmark of the REST service: throughput and p50/p95/p99 latency per route at several concurrencies,
with batching on (``CAPTIONER_MAX_BATCH_SIZE=8``) and off (``=1``) measured in the same run, plus the peak
resident memory of each server process.

Two ``captioner serve`` processes (one per mode) run side by side on the same store; every cell (route x
concurrency) is measured on both, one right after the other, so background load on the machine hits both
modes alike and the on/off ratio stays meaningful. The load is closed-loop: ``concurrency`` clients, each
sending its next request as soon as the previous one is answered, for ``--duration`` seconds after a short
warm-up. Images are synthetic aerial scenes (captioning.data.synth, seed 999: not a training seed), 256x256
PNG, one image per request.

    .venv/bin/python bench/service_bench.py                       # default store (model_store/)
    .venv/bin/python bench/service_bench.py --duration 5 --concurrency 1,8 --store /tmp/store --tag smoke

Writes ``bench/results/service.json`` and ``bench/results/service.md`` (``--tag`` adds a suffix).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.testing import ServerProcess, metric  # noqa: E402

MODES = {"batching on": 8, "batching off": 1}


def scene_images(count: int, size: int = 256) -> list[bytes]:
    from captioning.data.synth.concepts import UCM_CLASSES
    from captioning.data.synth.generator import render

    out = []
    for i in range(count):
        image = render(UCM_CLASSES[i % len(UCM_CLASSES)], 999, i, size).image
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def machine() -> dict:
    import torch

    from captioning.accel import describe_cpu

    cpu = describe_cpu()["cpu"]
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem, "python": platform.python_version(),
        "torch": torch.__version__, "platform": platform.platform(),
    }


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def rss_mib(pid: int, field: str = "VmHWM") -> float | None:
    """VmHWM: peak resident memory; VmRSS: now."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def record(out: Path, result: dict, text: str) -> None:
    """Write a bench's recorded result: ``out`` + ``.json`` (the figures) and ``.md`` (``text``, their table),
    and print the table."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(text)
    print(text)


def big_png(side: int = 7000) -> bytes:
    """A PNG of side x side pixels that compresses to a few dozen KB (flat colour): cheap to send, costly to
    decode -- what an overloaded server must refuse before decoding."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (90, 140, 60)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def server_env(store: Path, work: Path, name: str, served: list[str], batch: int, args, **extra: str) -> dict:
    env = {
        "CAPTIONER_MODEL_STORE": str(store), "CAPTIONER_DATA_DIR": str(work / f"data-{name}"),
        "CAPTIONER_MODELS": ",".join(served), "CAPTIONER_MAX_BATCH_SIZE": str(batch),
        "CAPTIONER_MAX_WAIT_MS": str(args.max_wait_ms), "CAPTIONER_QUEUE_SIZE": "256",
        "CAPTIONER_REQUEST_TIMEOUT_S": "300", "CAPTIONER_LOG_LEVEL": "warning",
        "CAPTIONER_TORCH_THREADS": str(args.threads), "CAPTIONER_API_KEY": "", "CAPTIONER_ADMIN_KEY": "",
        **({"CAPTIONER_PRECISION": args.precision} if args.precision else {}), **extra,
    }
    return {k: v for k, v in env.items() if v}


ADMISSION_MODES = {"wait in line": "1000", "refuse at once": "0"}  # CAPTIONER_ADMISSION_WAIT_MS


def overload_and_memory(store: Path, work: Path, served: list[str], images: list[bytes], args) -> dict:
    """Goodput at 4x overload against the throughput at 8 clients, on a server whose queue holds 8 images (so
    32 clients overload it), for both admission modes in the same run: requests wait in line up to
    CAPTIONER_ADMISSION_WAIT_MS (the default, 1 s) or are refused at once (0). Clients either retry a 429 at
    once or wait its Retry-After as told. The Python clients (httpx) cost the 2 cores almost as much CPU as
    the server; ``wrk`` (a C load generator, when installed: ``apt-get install wrk``) retries at once at the
    server's own pace, the harshest client. Then the peak memory of one request carrying 32 PNGs of 49
    megapixels each on a fresh server."""
    out: dict = {"overload": {"queue_size": 8, "modes": {}}}
    for mode, wait_ms in ADMISSION_MODES.items():
        env = server_env(store, work, "overload", served, 8, args, CAPTIONER_QUEUE_SIZE="8",
                         CAPTIONER_ADMISSION_WAIT_MS=wait_ms)
        server = ServerProcess(env, log_path=work / f"server-overload-{wait_ms}.log").start()
        try:
            cells: dict = {}
            for name, clients, honor in (("clients_8", 8, False), ("clients_32", 32, False),
                                         ("clients_32_retry_after", 32, True)):
                cells[name] = asyncio.run(run_cell(server.url, "/v1/caption", {}, images, clients, args.duration,
                                                   args.warmup, honor_retry_after=honor))
            if shutil.which("wrk"):
                for clients in (8, 32):
                    cells[f"wrk_{clients}"] = run_wrk(server.url, "/v1/caption", images[0], clients, args.duration,
                                                      args.warmup, work)
            for name, cell in cells.items():
                print(f"overload [{mode}] {name}: {cell['throughput_rps']:.2f} answered/s, statuses "
                      f"{cell['statuses']}", flush=True)
            base, wrk_base = cells["clients_8"]["throughput_rps"], cells.get("wrk_8", {}).get("throughput_rps")
            cells["goodput_ratio"] = round(cells["clients_32"]["throughput_rps"] / base, 3) if base else None
            cells["goodput_ratio_retry_after"] = (round(cells["clients_32_retry_after"]["throughput_rps"] / base, 3)
                                                  if base else None)
            if wrk_base:
                cells["goodput_ratio_wrk"] = round(cells["wrk_32"]["throughput_rps"] / wrk_base, 3)
            out["overload"]["modes"][mode] = {"admission_wait_ms": int(wait_ms), **cells}
        finally:
            server.terminate(60)
    env = server_env(store, work, "bigpng", served, 8, args)
    server = ServerProcess(env, log_path=work / "server-bigpng.log").start()
    try:
        time.sleep(1.0)
        idle = rss_mib(server.proc.pid, "VmRSS")
        png = big_png()
        files = [("files", (f"{i}.png", png, "image/png")) for i in range(32)]
        start = time.perf_counter()
        r = httpx.post(f"{server.url}/v1/labels", files=files, timeout=600)
        out["big_request"] = {
            "images": 32, "pixels_each": 7000 * 7000, "body_bytes": len(png) * 32, "status": r.status_code,
            "seconds": round(time.perf_counter() - start, 2), "idle_rss_mib": idle,
            "peak_rss_mib": rss_mib(server.proc.pid), "max_inflight_pixels": "default (200,000,000)",
        }
        print(f"32 x 49 MP request: {out['big_request']}", flush=True)
    finally:
        server.terminate(60)
    return out


async def run_cell(url: str, path: str, params: dict, images: list[bytes], concurrency: int, duration: float,
                   warmup: float, honor_retry_after: bool = False) -> dict:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    stop_at = 0.0
    measuring = False

    async def client(worker: int, http: httpx.AsyncClient):
        i = worker
        while time.perf_counter() < stop_at:
            body = images[i % len(images)]
            i += concurrency
            start = time.perf_counter()
            r = await http.post(f"{url}{path}", params=params, content=body, headers={"Content-Type": "image/png"})
            elapsed = time.perf_counter() - start
            if measuring:
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    latencies.append(elapsed)
            if honor_retry_after and r.status_code == 429:  # as a well-behaved client does
                await asyncio.sleep(max(0.0, min(float(r.headers.get("retry-after", 1)), stop_at - time.perf_counter())))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        stop_at = time.perf_counter() + warmup
        await asyncio.gather(*(client(w, http) for w in range(concurrency)))
        measuring = True
        began = time.perf_counter()
        stop_at = began + duration
        await asyncio.gather(*(client(w, http) for w in range(concurrency)))
        elapsed = time.perf_counter() - began
    lat = np.array(latencies) * 1000.0
    return {
        "requests": len(latencies),
        "seconds": round(elapsed, 3),
        "throughput_rps": round(len(latencies) / elapsed, 3),
        "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
        "p95_ms": round(float(np.percentile(lat, 95)), 1) if len(lat) else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
        "mean_ms": round(float(lat.mean()), 1) if len(lat) else None,
        "statuses": statuses,
    }


def side_by_side(servers: dict[str, ServerProcess], routes: list[tuple], levels: list[int], images: list[bytes],
                 args, work: Path, *, tool: str = "httpx") -> list[dict]:
    """Every route x clients cell measured on each server, one right after the other (so background load hits
    them alike); ``tool``: ``httpx`` (the Python closed-loop clients) or ``wrk`` (one image, a C client)."""
    cells = []
    for label, path, params, _model in routes:
        for concurrency in levels:
            for name, server in servers.items():
                if tool == "wrk":
                    query = "?" + "&".join(f"{k}={v}" for k, v in params.items()) if params else ""
                    cell = run_wrk(server.url, path + query, images[0], concurrency, args.duration, args.warmup, work)
                else:
                    cell = asyncio.run(run_cell(server.url, path, params, images, concurrency, args.duration,
                                                args.warmup))
                cell.update(route=label, concurrency=concurrency, server=name, tool=tool)
                cells.append(cell)
                print(f"{name:22s} {tool:5s} {label:14s} c={concurrency:<3d} {cell['throughput_rps']:7.2f} req/s",
                      flush=True)
    return cells


def start_servers(envs: dict[str, dict], work: Path, cwd: dict[str, Path] | None = None) -> tuple[dict, dict]:
    servers, startup = {}, {}
    try:
        for name, env in envs.items():
            started = time.perf_counter()
            log = work / f"server-{re.sub(r'[^a-z0-9]+', '-', name.lower())}.log"
            servers[name] = ServerProcess(env, log_path=log, cwd=(cwd or {}).get(name)).start()
            startup[name] = round(time.perf_counter() - started, 1)
    except Exception:
        stop_servers(servers)
        raise
    return servers, startup


def stop_servers(servers: dict[str, ServerProcess]) -> None:
    for server in servers.values():
        try:
            server.terminate(60)
        except Exception:  # noqa: BLE001
            server.kill()


def compare_vision_runtimes(store: Path, work: Path, served: list[str], images: list[bytes], routes: list[tuple],
                            args) -> dict:
    """The served routes at 1 and 32 clients on two servers side by side, one running the convolutional
    networks on torch and one on OpenVINO (CAPTIONER_VISION_RUNTIME), each cell measured on both one right after
    the other; start-up time and idle / peak memory of each server."""
    envs = {runtime: server_env(store, work, f"vision-{runtime}", served, 8, args, CAPTIONER_VISION_RUNTIME=runtime)
            for runtime in ("torch", "openvino")}
    servers, startup = start_servers(envs, work)
    try:
        time.sleep(1.0)
        idle = {k: rss_mib(s.proc.pid, "VmRSS") for k, s in servers.items()}
        cells = side_by_side(servers, routes, [1, 32], images, args, work)
        peak = {k: rss_mib(s.proc.pid) for k, s in servers.items()}
    finally:
        stop_servers(servers)
    for cell in cells:
        cell["vision_runtime"] = cell["server"]
    return {"cells": cells, "startup_s": startup, "idle_rss_mib": idle, "peak_rss_mib": peak}


def compare_replicas(store: Path, work: Path, served: list[str], images: list[bytes], routes: list[tuple],
                     args) -> dict:
    """CAPTIONER_REPLICAS=1 (one replica per model, all threads) and =2 (two per model, half the threads each)
    against the default (auto, on 2+ CPUs: three one-thread replicas for LightCap, two for the UCM captioner,
    one for the others), every route at 1 and 32 clients, side by side; wrk when installed."""
    tool = "wrk" if shutil.which("wrk") else "httpx"
    envs = {"1 replica": server_env(store, work, "replicas-1", served, 8, args, CAPTIONER_REPLICAS="1"),
            "2 replicas": server_env(store, work, "replicas-2", served, 8, args, CAPTIONER_REPLICAS="2"),
            "auto": server_env(store, work, "replicas-auto", served, 8, args)}
    servers, _ = start_servers(envs, work)
    try:
        cells = side_by_side(servers, routes, [1, 32], images, args, work, tool=tool)
        peak = {k: rss_mib(s.proc.pid) for k, s in servers.items()}
    finally:
        stop_servers(servers)
    return {"tool": tool, "cells": cells, "peak_rss_mib": peak, "servers": list(envs)}


def blip_images_per_s(threads: int) -> dict:
    """BLIP-base (transformers, random init, 384 px, greedy 20 tokens) in-process at batch 8, timed by
    bench/inference.py's own function: the peer the caption route's images/s is compared with in this run."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("bench_inference", REPO / "bench" / "inference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    row = module.blip_rows(threads, [8], 3, torch.device("cpu"))[0]
    torch.set_num_threads(1)  # the load generator's own process: leave the cores to the servers
    return {"batch": 8, "threads": threads, "images_per_s": row["images_per_s"], "ms_per_image": row["ms_per_image"]}


def compare_baseline(rev: str, store: Path, work: Path, images: list[bytes], args) -> dict:
    """The caption route (LightCap) of this code against the code of git revision ``rev`` (with its own embedded
    store), both with their default settings, side by side in one run at 1, 8 and 32 clients, with wrk (when
    installed) and the Python clients: the before/after ratio on today's machine, not against a figure
    recorded on another day."""
    with baseline_tree(rev, work) as (commit, tree):
        envs = {f"before ({commit})": {**server_env(tree / "model_store", work, "baseline", ["lightcap"], 8, args),
                                       "PYTHONPATH": str(tree)},
                "now": server_env(store, work, "now", ["lightcap"], 8, args)}
        servers, startup = start_servers(envs, work, cwd={f"before ({commit})": tree})
        try:
            routes = [("caption", "/v1/caption", {}, "lightcap")]
            cells = []
            if shutil.which("wrk"):
                cells += side_by_side(servers, routes, [1, 8, 32], images, args, work, tool="wrk")
            cells += side_by_side(servers, routes, [1, 32], images, args, work)
            peak = {k: rss_mib(s.proc.pid) for k, s in servers.items()}
        finally:
            stop_servers(servers)
    return {"rev": rev, "commit": commit, "cells": cells, "startup_s": startup, "peak_rss_mib": peak}


@contextlib.contextmanager
def baseline_tree(rev: str, work: Path):
    """A detached git worktree of revision ``rev`` under ``work`` (its code and embedded store, for servers run
    from it with ``PYTHONPATH`` and ``cwd`` set to it) -> ``(short commit, folder)``; removed on exit."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", rev], capture_output=True, text=True,
                            check=True).stdout.strip()
    tree = work / f"baseline-{commit}"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), commit], check=True,
                   capture_output=True)
    try:
        yield commit, tree
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], capture_output=True)


def run_wrk(url: str, path: str, image: bytes, concurrency: int, duration: float, warmup: float, work: Path) -> dict:
    """``wrk`` closed loop (each connection sends its next request as soon as the last is answered, 429 or
    not), one thread: -> answered (2xx) per second and the status split."""
    body = work / "wrk-body.png"
    body.write_bytes(image)
    script = work / "wrk-post.lua"
    script.write_text(f'wrk.method = "POST"\nlocal f = io.open("{body}", "rb")\nwrk.body = f:read("*a")\nf:close()\n'
                      'wrk.headers["Content-Type"] = "image/png"\n')
    command = ["wrk", "-t1", f"-c{concurrency}", "-s", str(script), f"{url}{path}"]
    subprocess.run([*command[:-1], f"-d{max(1, round(warmup))}s", command[-1]], capture_output=True, check=True)
    text = subprocess.run([*command[:-1], f"-d{max(1, round(duration))}s", command[-1]], capture_output=True,
                          text=True, check=True).stdout
    total = int(re.search(r"(\d+) requests in", text).group(1))
    seconds = float(re.search(r"requests in ([\d.]+)s", text).group(1))
    other = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    refused = int(other.group(1)) if other else 0
    return {"tool": "wrk", "requests": total - refused, "seconds": seconds,
            "throughput_rps": round((total - refused) / seconds, 3), "statuses": {"2xx": total - refused,
                                                                               "other": refused}}


def batch_stats(url: str, model: str) -> tuple[float, float]:
    return (metric(url, "captioner_batch_size_sum", {"model": model}),
            metric(url, "captioner_batch_size_count", {"model": model}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=REPO / "model_store")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--duration", type=float, default=15.0, help="measured seconds per cell")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each cell")
    parser.add_argument("--images", type=int, default=21)
    parser.add_argument("--threads", type=int, default=0, help="CAPTIONER_TORCH_THREADS (0: all cores)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--tag", default="", help="suffix of the result files (e.g. smoke)")
    parser.add_argument("--precision", default="", help="CAPTIONER_PRECISION for the servers (default: theirs, auto)")
    parser.add_argument("--skip-overload", action="store_true", help="skip the overload and 49 MP memory runs")
    parser.add_argument("--skip-vision", action="store_true",
                        help="skip the torch vs OpenVINO comparison of the convolutional networks")
    parser.add_argument("--skip-replicas", action="store_true", help="skip CAPTIONER_REPLICAS=1 against auto")
    parser.add_argument("--blip", action="store_true",
                        help="also time BLIP-base in-process (batch 8) and report the caption route's ratio to it")
    parser.add_argument("--baseline", default="",
                        help="a git revision whose caption route is measured side by side with this code's "
                             "(e.g. 1dbec48, the code issue 14 measured 25 req/s on)")
    parser.add_argument("--only-overload", action="store_true",
                        help="run only the overload and 49 MP memory runs, updating the recorded results")
    parser.add_argument("--only-replicas", action="store_true",
                        help="run only the CAPTIONER_REPLICAS comparison, updating the recorded results")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    from captioning.store import ModelStore

    store = ModelStore(args.store)
    names = set(store.models()) if store.root.is_dir() else set()
    served = [n for n in ("lightcap", "ucm-captioner", "ucm-classifier", "concepts") if n in names]
    if not served:
        print(f"no servable model in {store.root}; train the defaults first", file=sys.stderr)
        return 2
    default_captioner = "lightcap" if "lightcap" in served else "ucm-captioner"
    routes = [("caption", "/v1/caption", {}, default_captioner)]
    if default_captioner == "lightcap" and "ucm-captioner" in served:
        routes.append(("caption (ucm)", "/v1/caption", {"model": "ucm"}, "ucm-captioner"))
    if "ucm-classifier" in served:
        routes.append(("labels", "/v1/labels", {}, "ucm-classifier"))
    if "concepts" in served:
        routes.append(("concepts", "/v1/concepts", {}, "concepts"))
    versions = {n: store.resolve(f"{n}@production").version for n in served}

    images = scene_images(args.images)
    work = Path(tempfile.mkdtemp(prefix="service-bench-"))
    suffix = f"-{args.tag}" if args.tag else ""
    if args.only_overload or args.only_replicas:
        recorded = json.loads((args.out_dir / f"service{suffix}.json").read_text())
        if args.only_overload:
            recorded.update(overload_and_memory(store.root, work, served, images, args))
            recorded["overload_loadavg_after"] = loadavg()
        else:
            recorded["replicas"] = compare_replicas(store.root, work, served, images, routes, args)
            recorded["replicas"]["loadavg_after"] = loadavg()
        (args.out_dir / f"service{suffix}.json").write_text(json.dumps(recorded, indent=1) + "\n")
        (args.out_dir / f"service{suffix}.md").write_text(markdown(recorded))
        print(markdown(recorded))
        return 0
    started = time.time()
    result: dict = {
        "machine": machine(), "store": str(store.root), "models": versions, "concurrency": levels,
        "duration_s": args.duration, "warmup_s": args.warmup, "image": "256x256 PNG synthetic scene",
        "settings": {"torch_threads": args.threads or "CPUs / replicas", "replicas": "auto", "max_wait_ms": args.max_wait_ms,
                     "vision_runtime": "auto (OpenVINO on this CPU)", "malloc_arenas": 2,
                     "queue_size": 256, "intake_threads": "default"},
        "loadavg_before": loadavg(), "cells": [],
    }
    if args.blip:
        result["blip"] = blip_images_per_s(os.cpu_count() or 1)
        print(f"blip-base: {result['blip']}", flush=True)
    envs = {mode: server_env(store.root, work, str(batch), served, batch, args) for mode, batch in MODES.items()}
    servers, _ = start_servers(envs, work)
    try:
        time.sleep(1.0)
        result["idle_rss_mib"] = {mode: rss_mib(s.proc.pid, "VmRSS") for mode, s in servers.items()}
        for label, path, params, model in routes:
            for concurrency in levels:
                for mode, server in servers.items():
                    before = batch_stats(server.url, model)
                    cell = asyncio.run(run_cell(server.url, path, params, images, concurrency, args.duration,
                                                args.warmup))
                    after = batch_stats(server.url, model)
                    runs = after[1] - before[1]
                    cell.update(route=label, path=path, model=model, mode=mode, concurrency=concurrency,
                                mean_batch_size=round((after[0] - before[0]) / runs, 2) if runs else None)
                    result["cells"].append(cell)
                    print(f"{label:14s} c={concurrency:<3d} {mode:13s} {cell['throughput_rps']:7.2f} req/s  "
                          f"p50 {cell['p50_ms']} p95 {cell['p95_ms']} p99 {cell['p99_ms']} ms  "
                          f"batch {cell['mean_batch_size']}", flush=True)
        result["peak_rss_mib"] = {mode: rss_mib(s.proc.pid) for mode, s in servers.items()}
    finally:
        stop_servers(servers)
    if args.baseline:
        result["baseline"] = compare_baseline(args.baseline, store.root, work, images, args)
    if not args.skip_replicas:
        result["replicas"] = compare_replicas(store.root, work, served, images, routes, args)
    if not args.skip_vision:
        result["vision_runtimes"] = compare_vision_runtimes(store.root, work, served, images, routes, args)
    if not args.skip_overload:
        result.update(overload_and_memory(store.root, work, served, images, args))
    result["loadavg_after"] = loadavg()
    result["wall_s"] = round(time.time() - started, 1)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"service{suffix}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out_dir / f"service{suffix}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def comparison_table(cells: list[dict], names: list[str]) -> list[str]:
    """route | clients | client | req/s on each server | ratio last / first."""
    first, last = names[0], names[-1]
    lines = [f"| route | clients | client | {' | '.join(f'{n} req/s' for n in names)} | {last} / {first} |",
             "|---|---|---|" + "---|" * (len(names) + 1)]
    keys = []
    for c in cells:
        key = (c["route"], c["concurrency"], c.get("tool", "httpx"))
        if key not in keys:
            keys.append(key)
    for route, concurrency, tool in keys:
        row = {c["server"]: c["throughput_rps"] for c in cells
               if (c["route"], c["concurrency"], c.get("tool", "httpx")) == (route, concurrency, tool)}
        ratio = f"{row[last] / row[first]:.2f}x" if row.get(first) else ""
        lines.append(f"| {route} | {concurrency} | {tool} | {' | '.join(f'{row.get(n, 0):.2f}' for n in names)} | "
                     f"{ratio} |")
    return lines + [""]


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, torch {m['torch']}, no GPU; load generator "
        f"on the same machine. Load average before/after: {result['loadavg_before']} / {result['loadavg_after']}.",
        f"Models: {', '.join(f'{k}@{v}' for k, v in result['models'].items())}. One 256x256 PNG per request, "
        f"closed loop, {result['duration_s']:g} s per cell after {result['warmup_s']:g} s warm-up; replicas "
        f"{result['settings'].get('replicas', 1)}, torch threads = {result['settings']['torch_threads']}, "
        f"max_wait_ms = {result['settings']['max_wait_ms']}.",
        "",
        "| route | clients | batching | req/s | p50 ms | p95 ms | p99 ms | mean batch | speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    cells = result["cells"]
    for cell in cells:
        speedup = ""
        if cell["mode"] == "batching on":
            off = next((c for c in cells if c["route"] == cell["route"] and c["concurrency"] == cell["concurrency"]
                        and c["mode"] == "batching off"), None)
            if off and off["throughput_rps"]:
                speedup = f"{cell['throughput_rps'] / off['throughput_rps']:.2f}x"
        lines.append(
            f"| {cell['route']} | {cell['concurrency']} | {'on' if cell['mode'] == 'batching on' else 'off'} | "
            f"{cell['throughput_rps']:.2f} | {cell['p50_ms']} | {cell['p95_ms']} | {cell['p99_ms']} | "
            f"{cell['mean_batch_size']} | {speedup} |"
        )
    peak = result.get("peak_rss_mib", {})
    idle = result.get("idle_rss_mib", {})
    lines += ["", "Server memory: idle (VmRSS after start) " + ", ".join(f"{k}: {v} MiB" for k, v in idle.items())
              + "; peak under this load (VmHWM) " + ", ".join(f"{k}: {v} MiB" for k, v in peak.items()), ""]
    if "blip" in result:
        blip = result["blip"]["images_per_s"]
        lines += [f"BLIP-base in this run (in-process, batch {result['blip']['batch']}, {result['blip']['threads']} "
                  f"threads, greedy 20 tokens): {blip} images/s. Caption route at 32 clients, batching on, against "
                  "it: " + ", ".join(f"{c['route']} {c['throughput_rps'] / blip:.0f}x" for c in cells
                                     if c["mode"] == "batching on" and c["concurrency"] == 32
                                     and c["route"].startswith("caption")) + ".", ""]
    if "baseline" in result:
        b = result["baseline"]
        names = list(b["startup_s"])
        lines += [f"Before / after, side by side in this run: the caption route (LightCap) of revision {b['commit']} "
                  f"(`--baseline {b['rev']}`, its own code and embedded store, its default settings) and of this "
                  f"code (its defaults). Peak RSS {b['peak_rss_mib']} MiB.", ""]
        lines += comparison_table(b["cells"], names)
    if "replicas" in result:
        r = result["replicas"]
        names = r.get("servers", ["1 replica", "auto"])
        lines += [f"CAPTIONER_REPLICAS: {', '.join(n for n in names if n != 'auto')} per model against the default "
                  "(auto, on 2+ CPUs: three one-thread replicas for LightCap, two for the UCM captioner, one for the "
                  f"others), side by side ({r['tool']}); peak RSS {r['peak_rss_mib']} MiB.", ""]
        lines += comparison_table(r["cells"], names)
        if "2 replicas" in names:
            lines += ["The same cells, auto against CAPTIONER_REPLICAS=2 (LightCap's third replica; the other "
                      "routes run the same replicas on both servers, except labels and concepts, which auto gives "
                      "one):", ""]
            lines += comparison_table(r["cells"], ["2 replicas", "auto"])
    if "vision_runtimes" in result:
        v = result["vision_runtimes"]
        lines += ["CAPTIONER_VISION_RUNTIME, the same routes on two servers side by side (batching on; OpenVINO is "
                  f"what `auto` picks on this CPU): start-up {v['startup_s']} s, idle {v['idle_rss_mib']} MiB, "
                  f"peak {v['peak_rss_mib']} MiB.", "",
                  "| route | clients | torch req/s | openvino req/s | ratio | torch p50 ms | openvino p50 ms |",
                  "|---|---|---|---|---|---|---|"]
        for c in v["cells"]:
            if c["vision_runtime"] != "torch":
                continue
            o = next(x for x in v["cells"] if x["vision_runtime"] == "openvino" and x["route"] == c["route"]
                     and x["concurrency"] == c["concurrency"])
            ratio = f"{o['throughput_rps'] / c['throughput_rps']:.2f}x" if c["throughput_rps"] else ""
            lines.append(f"| {c['route']} | {c['concurrency']} | {c['throughput_rps']:.2f} | {o['throughput_rps']:.2f} | "
                         f"{ratio} | {c['p50_ms']} | {o['p50_ms']} |")
        lines.append("")
    if "overload" in result and "modes" in result["overload"]:
        o = result["overload"]
        lines += [f"Overload (caption route, queue of {o['queue_size']} images, batching on; goodput = answered/s at "
                  "32 clients / at 8 clients, target >= 0.9):", "",
                  "| admission | client | 8 clients answered/s | 32 clients answered/s | 32: statuses | goodput ratio |",
                  "|---|---|---|---|---|---|"]
        for mode, c in o["modes"].items():
            label = f"{mode} ({c['admission_wait_ms']} ms)"
            lines.append(f"| {label} | httpx, retries at once | {c['clients_8']['throughput_rps']:.2f} | "
                         f"{c['clients_32']['throughput_rps']:.2f} | {c['clients_32']['statuses']} | "
                         f"{c['goodput_ratio']} |")
            lines.append(f"| {label} | httpx, waits Retry-After | {c['clients_8']['throughput_rps']:.2f} | "
                         f"{c['clients_32_retry_after']['throughput_rps']:.2f} | "
                         f"{c['clients_32_retry_after']['statuses']} | {c['goodput_ratio_retry_after']} |")
            if "wrk_32" in c:
                lines.append(f"| {label} | wrk, retries at once | {c['wrk_8']['throughput_rps']:.2f} | "
                             f"{c['wrk_32']['throughput_rps']:.2f} | {c['wrk_32']['statuses']} | "
                             f"{c['goodput_ratio_wrk']} |")
        lines.append("")
    if "big_request" in result:
        b = result["big_request"]
        lines.append(
            f"One request of {b['images']} PNGs of 49 megapixels each ({b['body_bytes'] // 1024} KB body, /v1/labels): "
            f"status {b['status']} in {b['seconds']} s; server idle {b['idle_rss_mib']} MiB, peak {b['peak_rss_mib']} MiB "
            f"(CAPTIONER_MAX_INFLIGHT_PIXELS {b['max_inflight_pixels']}).")
    lines.append("")
    errors = [c for c in cells if {int(k) for k in c["statuses"]} - {200}]  # JSON keys are strings
    if errors:
        lines.append("Non-200 answers: " + "; ".join(f"{c['route']} c={c['concurrency']} {c['mode']}: {c['statuses']}"
                                                    for c in errors))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
