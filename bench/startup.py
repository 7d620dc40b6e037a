"""Start-up with and without the cache of converted OpenVINO networks (captioning/ov_runtime.py), in one run.

    .venv/bin/python bench/startup.py                 # 3 alternating rounds, default store

Each round: the server on every default model, started with an empty cache folder (cold: every network is
converted from torch, then written) and again on the folder that start left (warm: read back), time from launch
to ``/readyz``; then ``captioner caption`` of one image, cold and warm, wall time of the whole command (a CLI
call loads its models every time). The numba kernels' own cache is warm in both (it sits beside the code), so
the difference is the conversions. Medians of the rounds; writes ``bench/results/startup.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from service_bench import (  # noqa: E402
    loadavg,
    machine,
    record,
    scene_images,
    server_env,
    start_servers,
    stop_servers,
)

SERVED = ["lightcap", "ucm-captioner", "ucm-classifier", "concepts"]


def server_start(store: Path, work: Path, cache: Path) -> float:
    run_args = argparse.Namespace(max_wait_ms=5.0, threads=0, precision=None)
    env = server_env(store, work, "startup", SERVED, 8, run_args, CAPTIONER_OV_CACHE_DIR=str(cache))
    servers, startup = start_servers({"server": env}, work)
    stop_servers(servers)
    return startup["server"]


def cli_caption(store: Path, image: Path, cache: Path) -> float:
    env = {**os.environ, "CAPTIONER_MODEL_STORE": str(store), "CAPTIONER_OV_CACHE_DIR": str(cache),
           "CAPTIONER_NO_PROGRESS": "1"}  # like the servers (service.testing.ServerProcess): this environment + these
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "captioning.cli", "caption", str(image)], env=env, cwd=REPO, check=True,
                   capture_output=True, timeout=600)
    return round(time.perf_counter() - started, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=REPO / "model_store")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "startup")
    args = parser.parse_args()
    result = {"command": "python bench/startup.py " + " ".join(sys.argv[1:]), "machine": machine(),
              "load_before": loadavg(), "rounds": []}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        work = Path(tmp)
        image = work / "scene.png"
        image.write_bytes(scene_images(1)[0])
        for i in range(args.rounds):
            cache = work / f"cache-{i}"
            row = {"server_cold_s": server_start(args.store, work, cache)}
            row["cached_networks"] = len(list(cache.glob("*/model.xml")))
            row["server_warm_s"] = server_start(args.store, work, cache)
            shutil.rmtree(cache)
            row["cli_cold_s"] = cli_caption(args.store, image, cache)
            row["cli_warm_s"] = cli_caption(args.store, image, cache)
            print(row, flush=True)
            result["rounds"].append(row)
    for key in ("server_cold_s", "server_warm_s", "cli_cold_s", "cli_warm_s"):
        result[f"median_{key}"] = round(statistics.median(r[key] for r in result["rounds"]), 2)
    result["load_after"] = loadavg()
    result["seconds"] = round(time.perf_counter() - started, 1)
    record(args.out, result, markdown(result))
    return 0


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = ["# Start-up: converted OpenVINO networks cached or not (bench/startup.py)", "",
             f"`{r['command']}` in {r['seconds']} s. Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, "
             f"Python {m['python']}; load average {r['load_before']} / {r['load_after']}.", "",
             "Cold: an empty `CAPTIONER_OV_CACHE_DIR` (every network converted, then written); warm: the folder the "
             "cold start left. Server: launch to `/readyz`, every default model. CLI: `captioner caption` of one "
             "image, the whole command.", "",
             "| round | networks cached | server cold s | server warm s | warm / cold | CLI cold s | CLI warm s | "
             "warm / cold |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for i, row in enumerate(r["rounds"], 1):
        lines.append(f"| {i} | {row['cached_networks']} | {row['server_cold_s']} | {row['server_warm_s']} | "
                     f"{row['server_warm_s'] / row['server_cold_s']:.2f} | {row['cli_cold_s']} | {row['cli_warm_s']} "
                     f"| {row['cli_warm_s'] / row['cli_cold_s']:.2f} |")
    lines.append(f"| **median** | | **{r['median_server_cold_s']}** | **{r['median_server_warm_s']}** | "
                 f"**{r['median_server_warm_s'] / r['median_server_cold_s']:.2f}** | **{r['median_cli_cold_s']}** | "
                 f"**{r['median_cli_warm_s']}** | **{r['median_cli_warm_s'] / r['median_cli_cold_s']:.2f}** |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
