"""Scene processing benchmark: throughput in tiles/s and peak memory (RSS) of `captioning.scenes` on a large
synthetic scene (`captioning.data.synth.mosaic`).

Each stage runs in a fresh child process so its peak RSS (VmHWM from /proc/self/status, and
``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own:

1. ``generate``: write the mosaic GeoTIFF (strip by strip) and its truth, unless it exists;
2. ``scene``: ``SceneJob`` + ``run_scene`` with the store's models (``--mode labels`` = ucm-classifier only,
   ``labels+concepts`` = plus the concept extractor; ``truth`` = no model: every tile is read, and its result is
   the mosaic's true objects clipped to the tile, which exercises reading, records, merging and outputs at
   full scale), then ``finish()`` (merge, GeoJSON, coverage, overlay,
   summary) unless ``--subset N`` stops after N tiles (then tiles/s is measured on those N and the full
   scene's time is extrapolated, said so in the record).

    python bench/scene_bench.py --size 20000 --mode labels --work /tmp/scene-bench
    python bench/scene_bench.py --size 20000 --mode labels+concepts --subset 160 --work /tmp/scene-bench

Results are appended to bench/results/scene.json (one record per run, with the machine described) and
bench/results/scene.md is rewritten from it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def peak_rss_mib() -> dict:
    hwm = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    except OSError:
        pass
    return {"vmhwm_mib": round(hwm, 1) if hwm else None,
            "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def machine() -> dict:
    from captioning.accel import describe_cpu

    cpu = describe_cpu()["cpu"]
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    import torch

    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "loadavg_at_start": [round(v, 2) for v in load] if load else None,
            "note": "shared 2-core VM, other jobs running (see loadavg)"}


# ------------------------------------------------------------------------------------ children


def child_generate(args) -> dict:
    from captioning.data.synth.mosaic import write_mosaic

    s = write_mosaic(args.scene, args.size, args.size, args.seed, overwrite=True)
    return {"stage": "generate", "width": s.width, "height": s.height, "regions": s.regions, "objects": s.objects,
            "seconds": round(s.seconds, 1), "bytes": Path(args.scene).stat().st_size, **peak_rss_mib()}


def truth_infer(job, truth_file):
    """Per tile: the mosaic's true objects clipped to the tile (what a perfect detector would report, cut pieces
    included) and constant labels. Exercises reading, recording, merging and the outputs at full scale
    without a model's cost; it is not a model's throughput."""
    from captioning.data.synth.mosaic import load_truth
    from captioning.scenes import Instance, TileResult

    truth = load_truth(truth_file)
    cell = truth["cell"]
    by_cell: dict[tuple[int, int], list] = {}
    for reg in truth["regions"]:
        by_cell[(reg["row"], reg["col"])] = [(o["concept"], o["label"], o["box_px"]) for o in reg["objects"]]
    del truth
    size = job.params.tile

    def result(tile):
        insts = []
        for r in range(tile.y // cell, (tile.y + tile.h - 1) // cell + 2):
            for c in range(tile.x // cell, (tile.x + tile.w - 1) // cell + 2):
                for concept, label, (x1, y1, x2, y2) in by_cell.get((r, c), ()):
                    cx1, cy1 = max(x1, tile.x), max(y1, tile.y)
                    cx2, cy2 = min(x2, tile.x + tile.w), min(y2, tile.y + tile.h)
                    if cx2 - cx1 > 1 and cy2 - cy1 > 1:
                        s = size / tile.w
                        insts.append(Instance(concept, 0.9, ((cx1 - tile.x) * s, (cy1 - tile.y) * s,
                                                             (cx2 - tile.x) * s, (cy2 - tile.y) * s), label))
        return TileResult({"x": 1.0}, 0.5, insts)

    return result


def child_scene(args) -> dict:
    import torch

    from captioning.scenes import SceneJob, SceneParams, run_scene
    from service.scenes import EngineInfer

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.mode == "truth":
        models = ("mosaic-truth",)
    else:
        infer = EngineInfer.from_store(concepts=args.mode == "labels+concepts")
        models = infer.models
    t_load = time.perf_counter() - t0
    params = SceneParams(tile=256, overlap=32, models=models)
    job = SceneJob(args.scene, args.out, params, restart=True)
    t_plan = time.perf_counter() - t0 - t_load
    limit = args.subset or job.total
    done = {"n": 0}

    def progress(n):
        done["n"] += n

    t1 = time.perf_counter()
    if args.mode == "truth":
        result = truth_infer(job, args.scene.with_name(args.scene.stem + ".truth.json"))
        pending = job.pending()[:limit]
        for start in range(0, len(pending), args.batch_size):
            batch = pending[start : start + args.batch_size]
            job.record_many([(t, result(t) if job.read(t) is not None else None) for t in batch])
            progress(len(batch))
    else:
        run_scene(job, infer, batch_size=args.batch_size, progress=progress,
                  should_stop=lambda: done["n"] >= limit, finish=False)
    t_tiles = time.perf_counter() - t1
    rec = {"stage": "scene", "mode": args.mode, "tiles_total": job.total, "tiles_run": done["n"],
           "load_s": round(t_load, 1), "plan_s": round(t_plan, 1), "tiles_s": round(t_tiles, 1),
           "tiles_per_s": round(done["n"] / t_tiles, 2), "batch_size": args.batch_size}  # fmt: skip
    if job.complete:
        t2 = time.perf_counter()
        outputs = job.finish()
        rec["finish_s"] = round(time.perf_counter() - t2, 1)
        rec["objects_total"] = outputs.summary["objects_total"]
        rec["skipped_nodata"] = outputs.summary["tiles"]["skipped_nodata"]
        rec["geojson_bytes"] = outputs.geojson.stat().st_size
        rec["full_scene_s"] = round(time.perf_counter() - t0, 1)
    else:
        rec["extrapolated_full_scene_s"] = round(t_load + t_plan + job.total / rec["tiles_per_s"], 1)
        rec["note"] = f"stopped after {done['n']} of {job.total} tiles; finish() not run; full time extrapolated"
    job.close()
    rec.update(peak_rss_mib())
    return rec


# ------------------------------------------------------------------------------------ parent


def run_child(stage: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", stage, "--scene", str(args.scene), "--out", str(args.out),
           "--size", str(args.size), "--seed", str(args.seed), "--mode", args.mode, "--subset", str(args.subset or 0),
           "--batch-size", str(args.batch_size)] + (["--threads", str(args.threads)] if args.threads else [])
    env = dict(os.environ, CAPTIONER_NO_PROGRESS="1", HF_HUB_OFFLINE="1", YOLO_OFFLINE="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{stage} failed ({proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_md(records: list[dict]) -> None:
    lines = [
        "# Scene benchmark (`bench/scene_bench.py`)", "",
        "Each row is one run; peak RSS is the child process's VmHWM. `tiles/s` counts every planned tile",
        "(nodata tiles too) over the tile loop only (reading, inference, durable records); model loading,",
        "planning and `finish()` are separate columns. Rows with `subset` stopped early and extrapolate.", "",
        "| when (UTC) | stage | scene | mode | batch | tiles run / total | tiles/s | finish s | total s | objects | peak RSS MiB | machine |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    notes = []
    for r in records:
        if r["stage"] == "observed":
            notes.append(f"* {r['when']}: {r['note']}")
            continue
        m = r["machine"]
        mach = f"{m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, load {m['loadavg_at_start']}"
        size = f"{r['size']} x {r['size']}"
        if r["stage"] == "generate":
            lines.append(f"| {r['when']} | generate | {size} | - | - | {r['regions']} regions | - | - | {r['seconds']} | "
                         f"{r['objects']} | {r['vmhwm_mib']} | {mach} |")
        else:
            total = r.get("full_scene_s", f"~{r.get('extrapolated_full_scene_s')} (extrapolated)")
            mode = r["mode"] + (" (merged main)" if r.get("code") else "")
            lines.append(f"| {r['when']} | scene | {size} | {mode} | {r['batch_size']} | {r['tiles_run']} / "
                         f"{r['tiles_total']} | {r['tiles_per_s']} | {r.get('finish_s', '-')} | {total} | "
                         f"{r.get('objects_total', '-')} | {r['vmhwm_mib']} | {mach} |")
    if any(r.get("code") for r in records):
        notes.append("* (merged main): run from an export of main 7d83d9c merged with this branch (the runtime contract "
                     "with its faster runtimes, and the instance-returning concept extractor); the other rows ran "
                     "this branch alone (the older runtimes; the extractor returning distinct words).")
    if notes:
        lines += ["", "Notes:", "", *notes]
    (RESULTS / "scene.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=20000)
    p.add_argument("--seed", type=int, default=4242)
    p.add_argument("--work", type=Path, default=Path("/tmp/scene-bench"))
    p.add_argument("--mode", choices=["labels", "labels+concepts", "truth"], default="labels")
    p.add_argument("--subset", type=int, default=0, help="stop after N tiles and extrapolate (0: whole scene)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-record", action="store_true", help="print, do not append to bench/results")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--scene", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        rec = child_generate(args) if args.child == "generate" else child_scene(args)
        print(json.dumps(rec))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    args.scene = args.work / f"mosaic-{args.size}-{args.seed}.tif"
    args.out = args.work / f"out-{args.size}-{args.mode.replace('+', '-')}"
    new = []
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    mach = machine()
    if not args.scene.exists():
        new.append(run_child("generate", args))
    new.append(run_child("scene", args))
    for r in new:
        r.update(when=when, size=args.size, seed=args.seed, machine=mach,
                 command="python bench/scene_bench.py " + " ".join(sys.argv[1:]))
        print(json.dumps(r))
    if not args.no_record:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / "scene.json"
        records = json.loads(path.read_text()) if path.exists() else []
        records.extend(new)
        path.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
        write_md(records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
