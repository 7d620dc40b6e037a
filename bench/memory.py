"""Where the serving process's memory goes: resident memory after each library the serve path imports, after
each served model loads, and the server's idle and peak RSS under the caption route's load (32 clients,
batching on, the defaults): a first start (every OpenVINO network converted), a later one (read back from the
network cache) and a later one with glibc's mmap threshold fixed at 4 MiB, side by side in the same run; with
``--baseline REV`` the same first and later start of another revision's code beside them (before/after).

    .venv/bin/python bench/memory.py                                  # default store, 3 rounds of 15 s
    .venv/bin/python bench/memory.py --cpu-torch-python /tmp/cpu/bin/python   # + `import torch` of a CPU-only wheel
    .venv/bin/python bench/memory.py --baseline 0190b22               # + servers of that revision

Every figure is read from /proc (VmRSS, VmHWM, RssAnon, RssFile) of a fresh child process, so one stage's
memory does not leak into the next. ``--cpu-torch-python``: an interpreter with a CPU-only torch (no
torchvision needed) whose ``import torch`` is measured beside this environment's; the "libraries only" row
imports what a serve path without torch would still need (OpenVINO, numba, numpy, Pillow, the web stack).

Writes ``bench/results/memory.json`` and ``bench/results/memory.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
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
    baseline_tree,
    loadavg,
    machine,
    record,
    rss_mib,
    run_wrk,
    scene_images,
    server_env,
    start_servers,
    stop_servers,
)

PROBE = """
import json, sys
def rss():
    out = {}
    for line in open("/proc/self/status"):
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = round(int(line.split()[1]) / 1024, 1)
    return out
rows = [("python", rss())]
"""

# cumulative: each stage is imported on top of the ones before it, in the order the serve path meets them
IMPORT_STAGES = [
    ("import captioning", "import captioning"),
    ("+ torch", "import torch"),
    ("+ torchvision (imports torch._dynamo; triton kept out, as on a CPU server)",
     "from captioning.accel import keep_triton_out; keep_triton_out('cpu'); import torchvision.ops"),
    ("+ numba (the compiled caption search)", "import numba"),
    ("+ openvino (the CPU networks)", "import openvino"),
    ("+ ultralytics (the YOLO network's modules)", "import ultralytics.nn.tasks"),
    ("+ the service (FastAPI, prometheus, ...)", "import service.app"),
]
TORCH_FREE = ("import numpy, PIL.Image, openvino, numba, tokenizers, fastapi, uvicorn, prometheus_client, "
              "pydantic_settings, safetensors")

# a process that never loads torch, holding what a torch-free server would still run: the libraries, the beam
# search kernels, and every network the servers cached (OpenVINO IR), compiled as the servers compile them
NETWORKS = """
import glob, numpy as np, openvino as ov
flags = open("/proc/cpuinfo").read()
precision = "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "f32"  # what `auto` picks
core, nets = ov.Core(), []
for xml in sorted(glob.glob({cache!r} + "/*/model.xml")):
    model = core.read_model(xml)
    compiled = core.compile_model(model, "CPU", {{"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": 1,
                                                 "PERFORMANCE_HINT": "LATENCY"}})
    nets.append((model, compiled.create_infer_request()))
"""
RUN_NETWORKS = """
for model, request in nets:
    shape = [8] + [d.get_length() for d in list(model.inputs[0].get_partial_shape())[1:]]
    request.infer({0: np.random.default_rng(0).random(shape, dtype=np.float32)})
"""

def torch_free(cache: Path) -> list[dict]:
    return probe([("python, torch marked absent (importing it would fail)", "sys.modules['torch'] = None"),
                  ("+ the libraries (OpenVINO, numba, numpy, Pillow, tokenizers, safetensors, the web stack)",
                   TORCH_FREE),
                  ("+ the beam search's compiled kernels (captioning.search_kernels)",
                   "from captioning import search_kernels\nsearch_kernels.warm_up()"),
                  (f"+ the {len(list(cache.glob('*/model.xml')))} networks the servers cached, compiled for one thread",
                   NETWORKS.format(cache=str(cache))),
                  ("+ each run once at batch 8", RUN_NETWORKS)])


def probe(lines: list[tuple[str, str]], python: str = sys.executable, env: dict | None = None) -> list[dict]:
    """Run ``lines`` (label, statement) one after another in a fresh interpreter; -> RSS after each."""
    body = PROBE + "".join(f"{stmt}\nrows.append(({label!r}, rss()))\n" for label, stmt in lines)
    body += "print(json.dumps(rows))\n"
    out = subprocess.run([python, "-c", body], capture_output=True, text=True, check=True, cwd=REPO,
                         timeout=600, env={**os.environ, **(env or {})}).stdout
    return [{"stage": label, **values} for label, values in json.loads(out.splitlines()[-1])]


def model_loads(store: Path, cache: Path) -> list[dict]:
    """Each default model loaded after the last in one fresh process; ``cache``: an empty OpenVINO network cache
    (so every network is converted, as at a first start)."""
    from captioning.inference import TASKS
    from captioning.store import ModelStore

    lines = [("import service.app (triton kept out, as create_app does)",
              "import service.app\nfrom captioning.accel import keep_triton_out\nkeep_triton_out('cpu')"),
             ("store", f"from captioning.inference import load_model\nfrom captioning.store import ModelStore\n"
                       f"store = ModelStore({str(store)!r})")]
    lines += [(f"+ load {name}", f"{name.replace('-', '_')} = load_model(store, {name!r})") for name in TASKS]
    # the concepts version LightCap was trained on: the runtime LightCap already holds (captioning.sharing)
    parent = next(p for p in ModelStore(store).resolve("lightcap").manifest["parents"] if p["name"] == "concepts")
    spec = f"concepts@{parent['version']}"
    lines.append((f"+ load {spec} (LightCap's own concepts version: its runtime, shared)",
                  f"own = load_model(store, {spec!r})\nassert own is lightcap.extractor"))
    return probe(lines, env={"CAPTIONER_OV_CACHE_DIR": str(cache)})


def smaps_split(pid: int) -> dict:
    """Anonymous and file-backed resident MiB now (the file part is shared libraries' pages)."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("Rss", "Anonymous"):
            out[key] = round(int(line.split()[1]) / 1024, 1)
    return {"anon_mib": out.get("Anonymous"), "file_mib": round(out["Rss"] - out.get("Anonymous", 0), 1)}


def servers_under_load(store: Path, work: Path, args) -> dict:
    """Servers of this code on one OpenVINO network cache, started in this order: the first finds it empty
    (converts every network, as a first start does, and fills it), the second reads the networks back (every
    later start), the third too, with glibc's mmap threshold fixed at 4 MiB (``MALLOC_MMAP_THRESHOLD_``: blocks
    this large are mapped and unmapped on free instead of kept in the heap; glibc's own threshold rises after
    each large free, up to 32 MiB). With ``--baseline REV``, two servers of that revision's code and embedded
    store follow, on a cache of their own: converting, then reading back. Then alternating rounds of the caption
    route at 32 clients (wrk)."""
    served = ["lightcap", "ucm-captioner", "ucm-classifier", "concepts"]
    run_args = argparse.Namespace(max_wait_ms=5.0, threads=0, precision=None)
    cache = {"CAPTIONER_OV_CACHE_DIR": str(work / "openvino-cache")}
    variants = {"serve (defaults), networks converted at start": cache,
                "serve (defaults), networks read from the cache": cache,
                "read from the cache, MALLOC_MMAP_THRESHOLD_=4194304": {**cache, "MALLOC_MMAP_THRESHOLD_": "4194304"}}
    envs = {name: server_env(store, work, f"server{i}", served, 8, run_args, **extra)
            for i, (name, extra) in enumerate(variants.items())}
    cwd: dict[str, Path] = {}
    result = {"variants": {}, "baseline": args.baseline or None}
    with contextlib.ExitStack() as stack:
        if args.baseline:
            commit, tree = stack.enter_context(baseline_tree(args.baseline, work))
            before = {"CAPTIONER_OV_CACHE_DIR": str(work / "openvino-cache-before"), "PYTHONPATH": str(tree)}
            for i, state in enumerate(("converted at start", "read from the cache")):
                name = f"before ({commit}), networks {state}"
                envs[name] = server_env(tree / "model_store", work, f"before{i}", served, 8, run_args, **before)
                cwd[name] = tree
        servers, startup = start_servers(envs, work, cwd=cwd)
        try:
            time.sleep(2)  # settle: what start-up leaves behind is freed
            for name, server in servers.items():
                result["variants"][name] = {"startup_s": startup[name], "rps": [],
                                            "idle_rss_mib": rss_mib(server.proc.pid, "VmRSS"),
                                            "idle": smaps_split(server.proc.pid)}
            image = scene_images(1)[0]
            for _ in range(args.rounds):
                for name, server in servers.items():
                    cell = run_wrk(server.url, "/v1/caption", image, 32, args.duration, args.warmup, work)
                    result["variants"][name]["rps"].append(cell["throughput_rps"])
                    print(f"{name:48s} {cell['throughput_rps']:7.2f} req/s  peak {rss_mib(server.proc.pid)} MiB",
                          flush=True)
            for name, server in servers.items():
                v = result["variants"][name]
                v["peak_rss_mib"] = rss_mib(server.proc.pid)
                v["after"] = smaps_split(server.proc.pid)
                v["median_rps"] = round(statistics.median(v["rps"]), 2)
        finally:
            stop_servers(servers)
    return result


def rss_table(header: str, stages: list[dict]) -> list[str]:
    return [f"| {header} | RSS | anonymous | file-backed |", "|---|---:|---:|---:|"] + [
        f"| {s['stage']} | {s['VmRSS']} | {s['RssAnon']} | {s['RssFile']} |" for s in stages]


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = ["# Serving memory (bench/memory.py)", "",
             f"`{r['command']}` in {r['seconds']} s.", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, torch {m['torch']}, Python "
             f"{m['python']}; load average {r['load_before']} / {r['load_after']}. MiB throughout.", "",
             "## Imports on the serve path (cumulative, one fresh process)", "", *rss_table("stage", r["imports"]),
             "", "Alone, each in a fresh process:", "", *rss_table("process", r["alone"]),
             "", "## Models (one fresh process, loaded one after another, every network converted; no inference yet)", "",
             *rss_table("stage", r["models"])]
    lines += ["", "## The server: idle, and peak under the caption route (32 clients, wrk, batching on)", "",
              f"{r['rounds']} alternating rounds of {r['duration']} s (after {r['warmup']} s of warm-up each); "
              "every server serves every default model with the default settings, on one OpenVINO network cache: "
              "the first started with it empty (converts every network, as a first start), the others read the "
              "networks back (every later start); the third runs with glibc's mmap threshold fixed at 4 MiB."
              + (f" Then two servers of revision `{r['servers']['baseline']}` (`--baseline`: its own code and "
                 "embedded store, the same default models) on a cache of their own, converting and reading back."
                 if r["servers"].get("baseline") else ""),
              "",
              "| server | start-up s | idle RSS (2 s after all started) | idle anon / file | peak RSS (VmHWM) | after: anon / file | req/s "
              "(rounds) | median req/s |", "|---|---:|---:|---:|---:|---:|---|---:|"]
    for name, v in r["servers"]["variants"].items():
        lines.append(f"| {name} | {v['startup_s']} | {v['idle_rss_mib']} | {v['idle']['anon_mib']} / "
                     f"{v['idle']['file_mib']} | {v['peak_rss_mib']} | {v['after']['anon_mib']} / "
                     f"{v['after']['file_mib']} | {', '.join(f'{x:.1f}' for x in v['rps'])} | {v['median_rps']} |")
    if r.get("torch_free"):
        lines += ["", "## Without torch: what a torch-free server would still hold (a lower bound, not a server)", "",
                  "One fresh process with torch marked absent: the libraries a serve path without torch needs, the "
                  "beam search's compiled kernels, and the networks the servers above cached (OpenVINO IR, read "
                  "back), compiled in the servers' precision for one thread and each run once at batch 8. What it "
                  "lacks against a server: the models' small non-convolutional parts (the LightCap prefix pass, the "
                  "UCM LSTM, the aligner, NMS and ROIAlign) and the requests in flight.", "",
                  *rss_table("stage", r["torch_free"])]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=REPO / "model_store")
    parser.add_argument("--duration", type=float, default=15.0, help="measured seconds per round and server")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cpu-torch-python", default=None, help="an interpreter with a CPU-only torch")
    parser.add_argument("--baseline", default="", help="also run servers of this git revision (before/after)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "memory")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        parser.error("wrk is not installed (apt-get install wrk): the load is wrk's closed loop")
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX"):  # the servers get what `captioner serve` sets
        os.environ.pop(name, None)
    start = time.perf_counter()
    result = {"command": "python bench/memory.py " + " ".join(sys.argv[1:]), "machine": machine(),
              "load_before": loadavg(), "rounds": args.rounds, "duration": args.duration, "warmup": args.warmup}
    result["imports"] = probe(IMPORT_STAGES)
    torches = [("this environment", sys.executable)]
    if args.cpu_torch_python:
        torches.append(("a CPU-only wheel", args.cpu_torch_python))
    result["alone"] = []
    for label, python in torches:
        version = subprocess.run([python, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                                 text=True, check=True).stdout.strip()
        result["alone"] += probe([(f"import torch {version} ({label})", "import torch")], python=python)[-1:]
    if importlib.util.find_spec("triton") is not None:  # the CUDA wheel's dependency; CPU-only wheels have none
        result["alone"] += probe([("import torchvision.ops, triton loaded (every server before keep_triton_out)",
                                   "import torchvision.ops; assert sys.modules['triton'] is not None")])[-1:]
    result["alone"] += probe([("import torchvision.ops, triton kept out (keep_triton_out)",
                               "from captioning.accel import keep_triton_out; keep_triton_out('cpu'); "
                               "import torchvision.ops")])[-1:]
    result["alone"] += probe([("the libraries a serve path without torch would need", TORCH_FREE)])[-1:]
    with tempfile.TemporaryDirectory(prefix="bench-memory-cache-") as cache:
        result["models"] = model_loads(args.store, Path(cache))
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        result["servers"] = servers_under_load(args.store, Path(tmp), args)
        result["torch_free"] = torch_free(Path(tmp) / "openvino-cache")
    result["load_after"] = loadavg()
    result["seconds"] = round(time.perf_counter() - start, 1)
    record(args.out, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
