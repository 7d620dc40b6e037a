"""Batch captioning throughput: the Ray engine with 1 and 2 actors against the local engine, same images,
same run, and the Ray engine's per-image overhead.

Every engine captions the same synthetic images (captioning.data.synth, seed 999: not a training seed), at
two collection sizes (``--small`` and ``--large`` images). From the two wall times of one engine:

    per-image cost = (t_large - t_small) / (large - small)      fixed cost = t_small - small x per-image

so start-up (Ray workers, actors loading the models, the driver's Engine) is separated from the work per
image. The Ray engine's per-image overhead is its 1-actor per-image cost minus the local engine's (one
model replica each, the same batch size). Images/s is ``large / t_large``. Rounds alternate the engines
(local, ray x1, ray x2, local, ...) so background load hits them alike; the figures are medians over
``--repeats`` rounds, after one discarded warm-up round. The local engine is
``service.offline.Engine.records`` in this process (one torch thread, like one actor); Ray is started here
(``ray.init``, no dashboard) with ``--ray-cpus`` logical CPUs.

    .venv/bin/python bench/ray_bench.py                      # 64 and 320 images, 3 rounds
    .venv/bin/python bench/ray_bench.py --small 16 --large 48 --repeats 1 --tag smoke

Writes ``bench/results/ray.json`` and ``bench/results/ray.md`` (``--tag`` adds a suffix).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("CAPTIONER_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from service_bench import loadavg, machine  # noqa: E402

ENGINES = ("local", "ray x1", "ray x2")


def write_images(folder: Path, count: int, size: int) -> None:
    from captioning.data.synth.concepts import UCM_CLASSES
    from captioning.data.synth.generator import render

    folder.mkdir(parents=True)
    for i in range(count):
        render(UCM_CLASSES[i % len(UCM_CLASSES)], 999, i, size).image.save(folder / f"{i:05d}.png")


def time_local(folder: Path, engine_kwargs: dict, batch_size: int) -> float:
    from service.offline import Engine
    from service.ray_engine import list_source, read_bytes

    started = time.perf_counter()
    engine = Engine.from_store(**engine_kwargs)
    src = list_source(folder)
    records = list(engine.records(((k, read_bytes(u)) for k, u in zip(src.keys, src.uris, strict=True)),
                                  batch_size=batch_size))
    took = time.perf_counter() - started
    assert len(records) == len(src.keys) and not any("error" in r for r in records)
    return took


def time_ray(folder: Path, engine_kwargs: dict, batch_size: int, actors: int, work: Path) -> float:
    from service import ray_engine

    dest = work / f"out-{actors}-{time.monotonic_ns()}"
    started = time.perf_counter()
    stats = ray_engine.run(folder, dest, engine_kwargs, ray_engine.RayOptions(actors=actors, batch_size=batch_size),
                           progress=False)
    took = time.perf_counter() - started
    assert stats.captioned == stats.images and len(stats.actors) <= actors, stats
    shutil.rmtree(dest)
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=64)
    parser.add_argument("--large", type=int, default=320)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tasks", default="caption", help="comma-separated Engine tasks")
    parser.add_argument("--precision", default="fp32", help="Engine precision (fp32: the same path on any CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the local Ray instance")
    parser.add_argument("--tag", default="")
    parser.add_argument("--render", type=Path, default=None, help="only rewrite the .md of this result .json")
    args = parser.parse_args()
    if args.render:
        args.render.with_suffix(".md").write_text(markdown(json.loads(args.render.read_text())))
        return 0

    import ray
    import torch

    torch.set_num_threads(1)
    engine_kwargs = {"tasks": tuple(t for t in args.tasks.split(",") if t), "precision": args.precision}
    work = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    folders = {n: work / f"imgs-{n}" for n in (args.small, args.large)}
    for n, folder in folders.items():
        write_images(folder, n, args.size)
    load_before = loadavg()
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False,
             object_store_memory=300 * 1024**2)
    times: dict[str, dict[int, list[float]]] = {e: {n: [] for n in folders} for e in ENGINES}
    try:
        # warm-up, discarded: the first Ray run starts the worker processes and fills the OS file cache
        time_local(folders[args.small], engine_kwargs, args.batch_size)
        time_ray(folders[args.small], engine_kwargs, args.batch_size, 2, work)
        for round_ in range(args.repeats):
            for n, folder in folders.items():
                for engine in ENGINES:
                    if engine == "local":
                        took = time_local(folder, engine_kwargs, args.batch_size)
                    else:
                        took = time_ray(folder, engine_kwargs, args.batch_size, int(engine[-1]), work)
                    times[engine][n].append(took)
                    print(f"round {round_ + 1}: {engine:7s} {n:4d} images {took:7.2f} s", file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    small, large = args.small, args.large
    rows = {}
    for engine in ENGINES:
        t_small = statistics.median(times[engine][small])
        t_large = statistics.median(times[engine][large])
        per_image = (t_large - t_small) / (large - small)
        rows[engine] = {
            "seconds": {str(small): round(t_small, 3), str(large): round(t_large, 3)},
            "all_seconds": {str(n): [round(t, 3) for t in ts] for n, ts in times[engine].items()},
            "images_per_s": round(large / t_large, 3),
            "steady_images_per_s": round(1 / per_image, 3) if per_image > 0 else None,
            "per_image_ms": round(per_image * 1000, 2),
            "fixed_s": round(t_small - small * per_image, 3),
        }
    local = rows["local"]
    for engine in ENGINES[1:]:
        rows[engine]["images_per_s_vs_local"] = round(rows[engine]["images_per_s"] / local["images_per_s"], 3)
    overhead_ms = rows["ray x1"]["per_image_ms"] - local["per_image_ms"]
    result = {
        "machine": machine(), "loadavg_before": load_before, "loadavg_after": loadavg(),
        "ray": ray.__version__, "images": [small, large], "size": args.size, "batch_size": args.batch_size,
        "tasks": list(engine_kwargs["tasks"]), "precision": args.precision, "repeats": args.repeats, "ray_cpus": args.ray_cpus,
        "engines": rows, "ray_overhead_per_image_ms": round(overhead_ms, 2),
        "command": "bench/ray_bench.py " + " ".join(sys.argv[1:]),
    }
    out = REPO / "bench" / "results" / f"ray{('-' + args.tag) if args.tag else ''}"
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    small, large = r["images"]
    m = r["machine"]
    lines = [
        "# Batch captioning: Ray engine vs local engine", "",
        f"`{r['command']}` — {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, torch {m['torch']}, "
        f"Ray {r['ray']}; load average before/after: {r['loadavg_before']} / {r['loadavg_after']} (a shared "
        "machine: compare the engines within this run, not with other runs).", "",
        f"Images: synthetic {r['size']} px PNG, {small} and {large}; tasks {', '.join(r['tasks'])} ({r['precision']}); batch size "
        f"{r['batch_size']}; medians of {r['repeats']} round(s), engines alternating. Ray started locally with "
        f"{r['ray_cpus']} logical CPUs, one CPU (one torch thread) per actor; local: one torch thread.", "",
        f"| engine | {small} images (s) | {large} images (s) | images/s ({large}) | vs local | per image (ms) "
        "| fixed (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for engine, row in r["engines"].items():
        lines.append(
            f"| {engine} | {row['seconds'][str(small)]} | {row['seconds'][str(large)]} | {row['images_per_s']} | "
            f"{row.get('images_per_s_vs_local', 1.0)}x | {row['per_image_ms']} | {row['fixed_s']} |")
    ray1, local = r["engines"]["ray x1"], r["engines"]["local"]
    saved_ms = local["per_image_ms"] - ray1["per_image_ms"]
    lines += [
        "", f"Ray engine per-image overhead (1 actor minus local, per-image cost): **{r['ray_overhead_per_image_ms']} "
        f"ms** per image; fixed cost {ray1['fixed_s']} s against {local['fixed_s']} s.",
        "Per image = (t_large - t_small) / (large - small); fixed = t_small - small x per image (start-up: Ray "
        "workers, actors loading the models, the driver's Engine for the preparer).",
    ]
    if saved_ms > 0:
        lines.append(
            f"A negative overhead: with one actor the Ray engine decodes and preprocesses in tasks on the other "
            f"cores while the actor runs the model, where the local engine does both in turn; the start-up is "
            f"repaid after about {round((ray1['fixed_s'] - local['fixed_s']) / saved_ms * 1000)} images here.")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
