"""``captioner scene IN.tif --out DIR``: labels, object instances and (optionally) captions over a scene of
any size, tile by tile, resumable; outputs in DIR (docs/scenes.md). The work itself is
``captioning.scenes``; this module loads the models from the store and drives ``run_scene`` with a progress
bar in tiles."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from captioning.errors import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "scene",
        help="label, find objects in and optionally caption a GeoTIFF scene of any size, tile by tile",
        description=(
            "Process IN (a GeoTIFF or any raster GDAL reads) in overlapping tiles resampled to the models' "
            "ground sample distance: per tile the 17 labels with probabilities, object instances (merged across "
            "tile overlaps) and optionally a caption. Writes DIR/scene.geojson, coverage.tif, overlay.png and "
            "summary.json. Re-running with the same DIR resumes where it stopped. See docs/scenes.md."
        ),
    )
    p.add_argument("input", type=Path, metavar="IN.tif")
    p.add_argument("--out", type=Path, required=True, help="output folder (holds the resumable job)")
    p.add_argument("--tile", type=int, default=256, help="tile side in model pixels (default 256)")
    p.add_argument("--overlap", type=int, default=32, help="overlap between tiles in model pixels (default 32)")
    p.add_argument("--caption", default="none", choices=["none", "lightcap", "ucm"], help="caption each tile")
    p.add_argument("--no-concepts", action="store_true", help="labels only, no object instances")
    p.add_argument("--crs", default="scene", help="output CRS of scene.geojson: scene (default) or EPSG:4326")
    p.add_argument("--bands", default=None, help="bands to read as R,G,B (or one grey band), 1-based, e.g. 4,3,2")
    p.add_argument("--gsd", type=float, default=None,
                   help="the models' ground sample distance in m/pixel (default 0.3, UC Merced's)")
    p.add_argument("--native", action="store_true", help="do not resample: process at the scene's own resolution")
    p.add_argument("--min-valid", type=float, default=0.0,
                   help="skip tiles with less than this share of valid pixels (default 0: only all-nodata tiles)")
    p.add_argument("--batch-size", type=int, default=16, help="tiles per forward pass (default 16)")
    p.add_argument("--store", type=Path, default=None, help="model store root (default: CAPTIONER_MODEL_STORE)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: CAPTIONER_DEVICE, auto)")
    p.add_argument("--precision", default=None, help="auto | fp32 | bf16 (default: CAPTIONER_PRECISION, auto)")
    p.add_argument("--restart", action="store_true", help="discard the job recorded in --out and start again")
    p.set_defaults(func=run_scene_cmd)


def run_scene_cmd(args: argparse.Namespace) -> int:
    import torch

    from captioning.scenes import UCM_GSD, SceneJob, SceneParams, run_scene
    from service.scenes import EngineInfer

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    bands = None
    if args.bands:
        try:
            bands = tuple(int(b) for b in args.bands.split(","))
        except ValueError:
            raise UsageError(f"--bands must be comma-separated band numbers, got {args.bands!r}") from None
    if args.native and args.gsd is not None:
        raise UsageError("--native and --gsd exclude each other")
    from captioning.scenes import SceneReader

    SceneReader(args.input, bands=bands).close()  # a bad file is named before the models load
    # the same models, options and records as POST /v1/scenes (service.scenes), without the pools
    infer = EngineInfer.from_store(args.store, concepts=not args.no_concepts, caption=args.caption,
                                   device=args.device, precision=args.precision)
    params = SceneParams(
        tile=args.tile, overlap=args.overlap, bands=bands, target_gsd=None if args.native else (args.gsd or UCM_GSD),
        min_valid=args.min_valid, models=infer.models, crs=args.crs,
    )  # fmt: skip
    with SceneJob(args.input, args.out, params, restart=args.restart) as job:
        for w in job.warnings:
            print(f"warning: {w}", file=sys.stderr)
        bar = None
        if not os.environ.get("CAPTIONER_NO_PROGRESS"):
            from tqdm.auto import tqdm

            bar = tqdm(total=job.total, initial=job.done, desc="scene", unit="tile")
        try:
            outputs = run_scene(job, infer, batch_size=args.batch_size, progress=bar.update if bar else None)
        finally:
            if bar is not None:
                bar.close()
    s = outputs.summary
    print(s["description"])
    print(f"{s['tiles']['processed']} tiles processed, {s['tiles']['skipped_nodata']} without data; "
          f"{s['objects_total']} objects; models {infer.engine.describe()}", file=sys.stderr)
    for path in (outputs.geojson, outputs.coverage, outputs.overlay, outputs.summary_path):
        print(path)
    return 0
