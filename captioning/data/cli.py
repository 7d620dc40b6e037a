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


def _synth(args: argparse.Namespace) -> int:
    from captioning.data.synth import generate

    summary = generate(args.out, args.per_class, args.seed, args.size, args.workers, overwrite=args.overwrite)
    rate = summary.images / summary.seconds if summary.seconds > 0 else float("inf")
    print(f"wrote {summary.images} images in {summary.seconds:.1f} s ({rate:.1f} images/s)")
    print(summary.out)
    print(summary.gallery)
    return 0
