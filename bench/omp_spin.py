"""torch's OpenMP spin against the fast path: libgomp's default against ``GOMP_SPINCOUNT`` values, same run.

The fast path alternates torch ops with OpenVINO networks (their own TBB threads) and numba loops on the same
cores; after every parallel op libgomp's threads spin (busy-wait) for the next one, about 2 ms by default,
and take the cores from whatever runs next. ``captioning/__init__.py`` sets ``GOMP_SPINCOUNT`` (unless the
environment sets it or ``OMP_WAIT_POLICY``); this benchmark measures what that changes.

libgomp reads the variable once, when torch loads, so each setting runs in its own child process; the
settings alternate for ``--rounds`` rounds (a shared machine drifts) and the table quotes, per setting, the
median over rounds of each child's median wall and process-CPU milliseconds per image of the served
runtimes' whole ``caption`` call (fast path, ``auto`` vision runtime, the published decoding).

    python bench/omp_spin.py --rounds 3 --out bench/results/omp-spin
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(ROOT / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

DEFAULT = "default"  # libgomp's own default: GOMP_SPINCOUNT removed before torch loads
MODELS = {"lightcap": "lightcap@production", "ucm-captioner": "ucm-captioner@production"}


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One setting in this process: returns {"spin": ..., "cells": [{model, precision, batch, wall_ms, cpu_ms}]}."""
    import captioning  # noqa: F401  - sets GOMP_SPINCOUNT; replaced or removed below, before torch loads

    if args.child == DEFAULT:
        os.environ.pop("GOMP_SPINCOUNT", None)
    else:
        os.environ["GOMP_SPINCOUNT"] = args.child
    import inference as bench
    import torch

    from captioning import accel
    from captioning.models.lightcap.pipeline import load_lightcap
    from captioning.models.ucm.runtime import load_captioner
    from captioning.store import ModelStore

    torch.set_num_threads(args.threads)
    store = ModelStore(Path(args.store))
    pictures, _ = bench.synth_test_images(0, max(args.batches))
    loaders = {"lightcap": load_lightcap, "ucm-captioner": load_captioner}
    cells = []
    with torch.no_grad():
        for precision in args.precisions:
            for model in args.models:
                rt = loaders[model](store.load(MODELS[model]), store, device="cpu", precision=precision, fast=True)
                for batch in args.batches:
                    images = torch.stack([rt.preprocess(p) for p in pictures[:batch]])
                    def call(rt=rt, images=images):
                        return rt.caption(images, rt.decoding)

                    wall, cpu = bench.time_call(call, args.repeats, torch.device("cpu"))
                    cells.append({"model": model, "precision": precision, "batch": batch,
                                  "wall_ms": 1000 * wall / batch, "cpu_ms": 1000 * cpu / batch})
                del rt
    return {"spin": accel.openmp_spin(), "cells": cells, "machine": bench.machine(torch.device("cpu"))}


def run_child(setting: str, args: argparse.Namespace) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    cmd = [sys.executable, __file__, "--child", setting, "--threads", str(args.threads), "--repeats", str(args.repeats),
           "--store", args.store, "--models", ",".join(args.models), "--precisions", ",".join(args.precisions),
           "--batches", ",".join(map(str, args.batches))]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"child for {setting} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarise(runs: dict[str, list[dict]], settings: list[str]) -> list[dict[str, Any]]:
    rows = []
    first = runs[settings[0]][0]["cells"]
    for cell in first:
        key = (cell["model"], cell["precision"], cell["batch"])
        row: dict[str, Any] = {"model": key[0], "precision": key[1], "batch": key[2]}
        for s in settings:
            mine = [c for r in runs[s] for c in r["cells"] if (c["model"], c["precision"], c["batch"]) == key]
            row[f"{s} wall"] = round(statistics.median(c["wall_ms"] for c in mine), 2)
            row[f"{s} cpu"] = round(statistics.median(c["cpu_ms"] for c in mine), 2)
            row[f"{s} walls"] = [round(c["wall_ms"], 2) for c in mine]
        rows.append(row)
    return rows


def markdown(result: dict[str, Any]) -> str:
    settings = result["settings"]
    m = result["machine"]
    ours = [s for s in settings if s != DEFAULT] if DEFAULT in settings else []  # ratio columns need the default
    lines = [
        "# OpenMP spin against the fast path (bench/omp_spin.py)", "",
        f"`{result['command']}` in {result['seconds']} s.", "",
        f"Machine: {m['cpu']}, {m['usable_cores']} usable of {m['logical_cores']} logical cores, native bf16 "
        f"{m['native_bf16']}; torch {m['torch']}, Python {m['python']}; load average {m['load_average_start']} "
        f"at the first child's start. {result['threads']} torch threads; each setting in its own process "
        f"(libgomp reads the variable when torch loads), {result['rounds']} alternating rounds; each cell is the "
        "median over rounds of a child's median of the whole `caption` call (fast path, `auto` vision runtime, "
        "published decoding), ms per image. CPU = process CPU time (all threads) per image: what spinning burns.",
        "", "Settings as the children reported them: " + "; ".join(f"`{s}`: {result['reported'][s]}" for s in settings), "",
        "| model | precision | batch | " + " | ".join(
            [f"{s} wall | {s} CPU" for s in settings] + [f"default / {s} wall | default / {s} CPU" for s in ours]
        ) + " |",
        "|---|---|---:|" + "---:|" * (2 * len(settings) + 2 * len(ours)),
    ]
    for r in result["rows"]:
        cells = [f"{r[f'{s} wall']} | {r[f'{s} cpu']}" for s in settings]
        ratios = [f"{r[f'{DEFAULT} wall'] / r[f'{s} wall']:.2f}x | {r[f'{DEFAULT} cpu'] / r[f'{s} cpu']:.2f}x"
                  for s in ours]
        lines.append(f"| {r['model']} | {r['precision']} | {r['batch']} | " + " | ".join(cells + ratios) + " |")
    lines += ["", "Per-round wall ms/img (each child's median), in round order:", ""]
    for r in result["rows"]:
        lines.append(f"- {r['model']} {r['precision']} b{r['batch']}: "
                     + "; ".join(f"{s} {r[f'{s} walls']}" for s in settings))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", default=f"{DEFAULT},10000,1000",
                    help="comma list: 'default' (libgomp's own) and GOMP_SPINCOUNT values")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--models", default="lightcap,ucm-captioner")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--store", default=str(ROOT / "model_store"))
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        ap.error(f"--models: unknown {unknown} (choose from {', '.join(MODELS)})")
    args.precisions = [p for p in args.precisions.split(",") if p]
    args.batches = [int(b) for b in args.batches.split(",") if b]
    if args.child is not None:
        print(json.dumps(child(args)))
        return 0
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    bad = [s for s in settings if s != DEFAULT and not s.isdigit()]
    if bad:
        ap.error(f"--settings: {bad} are neither 'default' nor a GOMP_SPINCOUNT (a whole number)")
    start = time.perf_counter()
    runs: dict[str, list[dict]] = {s: [] for s in settings}
    for round_ in range(args.rounds):
        for s in settings:
            runs[s].append(run_child(s, args))
            last = runs[s][-1]["cells"]
            print(f"round {round_ + 1} {s}: " + " ".join(
                f"{c['model']}-{c['precision']}-b{c['batch']}={c['wall_ms']:.2f}" for c in last), flush=True)
    result = {
        "command": "python bench/omp_spin.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seconds": round(time.perf_counter() - start, 1), "settings": settings, "rounds": args.rounds,
        "threads": args.threads, "machine": runs[settings[0]][0]["machine"],
        "reported": {s: runs[s][0]["spin"] for s in settings}, "rows": summarise(runs, settings),
    }
    text = markdown(result)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
