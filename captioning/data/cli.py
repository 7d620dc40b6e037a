"""``captioner synth``: write a synthetic aerial-scene dataset in the UCM-captions layout."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "synth",
        help="generate the synthetic aerial-scene dataset (UCM-captions layout)",
        description=(
            "Render top-down scenes for the 21 UCM classes and write OUT/imgs/*.tif, OUT/dataset.json, "
            "OUT/multilabels.txt, OUT/boxes.json and OUT/gallery.png. The output depends only on "
            "--seed, --per-class and --size (not on --workers). See docs/synthetic.md."
        ),
    )
    p.add_argument("out", type=Path, metavar="OUT", help="output folder (new or empty)")
    p.add_argument(
        "--per-class", type=int, default=100, help="pictures per class (default 100: 2,100 in all)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--size", type=int, default=256, help="picture side in pixels (default 256, like UCM)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (default: every core this process may use)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in OUT")
    p.set_defaults(func=_synth)
    register_scene(subparsers)


def _synth(args: argparse.Namespace) -> int:
    from captioning.data.synth import generate

    summary = generate(args.out, args.per_class, args.seed, args.size, args.workers, overwrite=args.overwrite)
    rate = summary.images / summary.seconds if summary.seconds > 0 else float("inf")
    print(f"wrote {summary.images} images in {summary.seconds:.1f} s ({rate:.1f} images/s)")
    print(summary.out)
    print(summary.gallery)
    return 0


def register_scene(subparsers) -> None:
    p = subparsers.add_parser(
        "synth-scene",
        help="generate a large synthetic scene: a georeferenced, tiled GeoTIFF with overviews and its truth",
        description=(
            "Draw a mosaic of synthetic pictures (one per --cell region, at --gsd metres a pixel) into OUT.tif, "
            "a tiled (512 blocks), compressed GeoTIFF with internal overviews in --crs, written strip by strip "
            "(a 20,000 x 20,000 scene never sits in memory), and OUT.truth.json beside it: per region its "
            "class, labels and object boxes in scene pixels and map coordinates. See docs/scenes.md."
        ),
    )
    p.add_argument("out", type=Path, metavar="OUT.tif", help="the GeoTIFF to write")
    p.add_argument("--width", type=int, default=4096, help="pixels (default 4096)")
    p.add_argument("--height", type=int, default=None, help="pixels (default: --width)")
    p.add_argument("--seed", type=int, default=4242, help="random seed (default 4242, unseen by the default models)")
    p.add_argument("--cell", type=int, default=256, help="region side in pixels (default 256: one picture)")
    p.add_argument("--gsd", type=float, default=0.3, help="metres per pixel (default 0.3, like UC Merced)")
    p.add_argument("--crs", default="EPSG:32633", help="CRS (default EPSG:32633, UTM zone 33N)")
    p.add_argument("--origin", default="500000,5000000", help="map x,y of the top-left corner (default 500000,5000000)")
    p.add_argument("--block", type=int, default=2, help="regions per side that share a class (default 2)")
    p.add_argument("--classes", default=None, help="comma-separated classes to draw from (default: all 21)")
    p.add_argument("--nodata-cells", type=float, default=0.0, help="share of regions left as nodata (default 0)")
    p.add_argument("--compress", default="jpeg", choices=["jpeg", "deflate", "lzw", "none"], help="default jpeg")
    p.add_argument("--no-overviews", action="store_true", help="do not build overviews")
    p.add_argument("--overwrite", action="store_true", help="replace OUT.tif and its truth")
    p.set_defaults(func=_synth_scene)


def _synth_scene(args: argparse.Namespace) -> int:
    from captioning.data.synth.mosaic import write_mosaic
    from captioning.errors import UsageError

    try:
        ox, oy = (float(v) for v in args.origin.split(","))
    except ValueError:
        raise UsageError(f"--origin must be two numbers x,y, got {args.origin!r}") from None
    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
    s = write_mosaic(
        args.out, args.width, args.height or args.width, args.seed, cell=args.cell, gsd=args.gsd, crs=args.crs,
        origin=(ox, oy), classes=classes, block=args.block, nodata_cells=args.nodata_cells, compress=args.compress,
        overviews=not args.no_overviews, overwrite=args.overwrite, progress=True,
    )  # fmt: skip
    print(f"wrote {s.width} x {s.height} px, {s.regions} regions, {s.objects} objects in {s.seconds:.1f} s")
    print(s.path)
    print(s.truth)
    return 0
