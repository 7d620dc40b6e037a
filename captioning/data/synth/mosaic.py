"""Large synthetic scenes: a mosaic of synthetic pictures written as a georeferenced, tiled GeoTIFF with
overviews, plus the ground truth of every region (``captioner synth-scene``).

The scene is a grid of ``cell x cell`` regions (256 px: one synthetic picture each, drawn by ``render``
exactly as the training pictures are, so a region is at the models' resolution: ``gsd`` metres a pixel,
0.3 m by default like UC Merced). Classes are drawn per block of ``block x block`` regions (neighbouring
regions often share a class, as land use does), region ``(row, col)`` is picture ``imgid = row * cols + col``
of ``seed`` (so the output depends only on the arguments). Regions cut by the scene's right or bottom edge
are drawn cropped and marked ``complete: false`` in the truth (their labels are those of the whole picture).
``nodata_cells`` blanks that share of regions (an internal mask band says so; their pixels are 0).

The GeoTIFF is written strip by strip (``STRIP`` rows, aligned with its 512 x 512 blocks), so a 20,000 x
20,000 scene never sits in memory: peak memory is a few cell rows, the truth, and GDAL's block cache (held
to 128 MB; GDAL's default of 5 % of RAM filled to 1.2 GB while building a 20k scene's overviews). JPEG (YCbCr, quality 90) by default, like
the training pictures' JPEG-in-TIFF; ``compress="deflate"`` for lossless. Internal overviews (average) are built
at the end, halving until the scene fits in 256 px.

Truth (``<name>.truth.json`` beside the file): ``{"format", "generator", "seed", "width", "height", "cell",
"gsd", "crs", "transform" [a, b, c, d, e, f], "labels" (the 17), "regions": [{"row", "col", "x", "y", "w", "h",
"complete", "nodata", "class", "imgid", "labels": [names], "bounds": [minx, miny, maxx, maxy] (map),
"objects": [{"concept", "label", "box_px": [x1, y1, x2, y2] (scene pixels), "box_map": [minx, miny, maxx,
maxy], "center_map": [x, y]}]}]}``. Objects are kept when their centre lies in the scene.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from captioning.data.synth.concepts import LABELS, UCM_CLASSES
from captioning.data.synth.generator import GENERATOR_VERSION, render
from captioning.errors import UsageError

TRUTH_FORMAT = "synthetic-scene-truth/1"
STRIP = 512
BLOCK = 512
MAX_SIDE = 200_000


@dataclass
class MosaicSummary:
    path: Path
    truth: Path
    width: int
    height: int
    regions: int
    objects: int
    seconds: float


def truth_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.stem + ".truth.json")


def _check(width, height, cell, gsd, nodata_cells, block, classes) -> list[str]:
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_SIDE:
            raise UsageError(f"--{name} must be an integer from 1 to {MAX_SIDE} pixels, got {v!r}")
    if isinstance(cell, bool) or not isinstance(cell, int) or not 64 <= cell <= 1024:
        raise UsageError(f"--cell must be an integer from 64 to 1024 pixels, got {cell!r}")
    if not (isinstance(gsd, int | float) and gsd > 0):
        raise UsageError(f"--gsd must be a positive number of metres, got {gsd!r}")
    if not 0.0 <= nodata_cells < 1.0:
        raise UsageError(f"--nodata-cells must be in [0, 1), got {nodata_cells!r}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise UsageError(f"--block must be a positive integer, got {block!r}")
    classes = list(classes) if classes else list(UCM_CLASSES)
    bad = [c for c in classes if c not in UCM_CLASSES]
    if bad:
        raise UsageError(f"unknown class(es) {', '.join(bad)}; expected some of {', '.join(UCM_CLASSES)}")
    return classes


def write_mosaic(
    path: str | os.PathLike,
    width: int,
    height: int,
    seed: int,
    *,
    cell: int = 256,
    gsd: float = 0.3,
    crs: str = "EPSG:32633",
    origin: tuple[float, float] = (500_000.0, 5_000_000.0),
    classes: list[str] | None = None,
    block: int = 2,
    nodata_cells: float = 0.0,
    compress: str = "jpeg",
    overviews: bool = True,
    overwrite: bool = False,
    progress: bool = False,
) -> MosaicSummary:
    """Write the mosaic GeoTIFF at ``path`` and its truth JSON beside it (see the module docstring);
    ``origin`` is the map position of the top-left corner (UTM 33N easting/northing by default)."""
    import rasterio
    from rasterio.crs import CRS
    from rasterio.enums import Resampling
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    classes = _check(width, height, cell, gsd, nodata_cells, block, classes)
    if compress not in ("jpeg", "deflate", "lzw", "none"):
        raise UsageError(f"--compress must be jpeg, deflate, lzw or none, got {compress!r}")
    path, truth = Path(path), truth_path(path)
    for p in (path, truth):
        if p.exists() and not overwrite:
            raise UsageError(f"{p}: exists; pass --overwrite to replace it")
    try:
        crs_obj = CRS.from_user_input(crs)
    except Exception as exc:  # noqa: BLE001 - rasterio's CRSError
        raise UsageError(f"--crs {crs!r} is not a CRS rasterio knows ({exc})") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    transform = from_origin(origin[0], origin[1], gsd, gsd)
    rows, cols = -(-height // cell), -(-width // cell)
    block_class: dict[tuple[int, int], str] = {}
    blank = np.random.default_rng([seed, 0x5CE, 1]).random((rows, cols)) < nodata_cells

    def cell_class(r: int, c: int) -> str:
        key = (r // block, c // block)
        if key not in block_class:
            rng = np.random.default_rng([seed, 0x5CE, 2, key[0], key[1]])
            block_class[key] = classes[int(rng.integers(len(classes)))]
        return block_class[key]

    regions: list[dict] = []
    n_objects = 0

    def draw_row(r: int) -> np.ndarray:
        """Render cell row ``r`` -> [h, width, 3] uint8, appending its regions' truth."""
        nonlocal n_objects
        y, h = r * cell, min(cell, height - r * cell)
        strip = np.zeros((h, width, 3), dtype=np.uint8)
        for c in range(cols):
            x, w = c * cell, min(cell, width - c * cell)
            imgid = r * cols + c
            scene = cell_class(r, c)
            region = {"row": r, "col": c, "x": x, "y": y, "w": w, "h": h, "complete": w == cell and h == cell,
                      "nodata": bool(blank[r, c]), "class": scene, "imgid": imgid}  # fmt: skip
            x0, y0 = transform @ (x, y)
            x1, y1 = transform @ (x + w, y + h)
            region["bounds"] = [round(min(x0, x1), 3), round(min(y0, y1), 3), round(max(x0, x1), 3), round(max(y0, y1), 3)]
            if blank[r, c]:
                region.update(labels=[], objects=[])
                regions.append(region)
                continue
            pic = render(scene, seed, imgid, cell)
            arr = np.asarray(pic.image, dtype=np.uint8)[:h, :w]
            strip[:, x : x + w] = arr
            region["labels"] = [LABELS[k] for k in np.nonzero(pic.labels)[0]]
            objects = []
            for b in pic.boxes:
                bx1, by1, bx2, by2 = b["box"][0] + x, b["box"][1] + y, b["box"][2] + x, b["box"][3] + y
                cx, cy = (bx1 + bx2) / 2, (by1 + by2) / 2
                if cx >= width or cy >= height:
                    continue
                mx1, my1 = transform @ (bx1, by1)
                mx2, my2 = transform @ (bx2, by2)
                mcx, mcy = transform @ (cx, cy)
                objects.append({
                    "concept": b["concept"], "label": b["label"],
                    "box_px": [round(v, 2) for v in (bx1, by1, bx2, by2)],
                    "box_map": [round(v, 3) for v in (min(mx1, mx2), min(my1, my2), max(mx1, mx2), max(my1, my2))],
                    "center_map": [round(mcx, 3), round(mcy, 3)],
                })  # fmt: skip
            region["objects"] = objects
            n_objects += len(objects)
            regions.append(region)
        return strip

    profile = {
        "driver": "GTiff", "width": width, "height": height, "count": 3, "dtype": "uint8", "crs": crs_obj,
        "transform": transform, "tiled": True, "blockxsize": BLOCK, "blockysize": BLOCK, "interleave": "pixel",
        "BIGTIFF": "IF_SAFER",
    }  # fmt: skip
    if compress == "jpeg":
        profile.update(compress="jpeg", photometric="ycbcr", jpeg_quality=90)
    elif compress != "none":
        profile.update(compress=compress, predictor=2)
    bar = None
    if progress and not os.environ.get("CAPTIONER_NO_PROGRESS"):
        from tqdm.auto import tqdm

        bar = tqdm(total=rows * cols, desc="synth-scene", unit="region")
    tmp = path.with_name(path.name + ".part.tif")
    cache: dict[int, np.ndarray] = {}
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True, GDAL_CACHEMAX=128):  # GDAL's default cache: 5 % of RAM
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.colorinterp = [rasterio.enums.ColorInterp.red, rasterio.enums.ColorInterp.green,
                               rasterio.enums.ColorInterp.blue]  # fmt: skip
            for y0 in range(0, height, STRIP):
                y1 = min(height, y0 + STRIP)
                for r in range(y0 // cell, (y1 - 1) // cell + 1):
                    if r not in cache:
                        cache[r] = draw_row(r)
                        if bar is not None:
                            bar.update(cols)
                parts = []
                for r in range(y0 // cell, (y1 - 1) // cell + 1):
                    a, b = max(y0, r * cell) - r * cell, min(y1, (r + 1) * cell) - r * cell
                    parts.append(cache[r][a:b])
                data = np.concatenate(parts, axis=0)
                window = Window(0, y0, width, y1 - y0)
                dst.write(np.moveaxis(data, -1, 0), window=window)
                if nodata_cells > 0:
                    rr = np.arange(y0, y1) // cell
                    cc = np.arange(width) // cell
                    mask = ~blank[rr[:, None], cc[None, :]]
                    dst.write_mask((mask * 255).astype(np.uint8), window=window)
                for r in [k for k in cache if (k + 1) * cell <= y1]:
                    del cache[r]
            if overviews:
                factors, f = [], 2
                while max(width, height) / f >= 256:
                    factors.append(f)
                    f *= 2
                if factors:
                    dst.build_overviews(factors, Resampling.average)
                    dst.update_tags(ns="rio_overview", resampling="average")
            dst.update_tags(generator=GENERATOR_VERSION, seed=str(seed), truth=truth.name)
    if bar is not None:
        bar.close()
    os.replace(tmp, path)
    doc = {
        "format": TRUTH_FORMAT, "generator": GENERATOR_VERSION, "seed": seed, "width": width, "height": height,
        "cell": cell, "gsd": gsd, "crs": crs_obj.to_string(), "transform": list(transform)[:6], "labels": list(LABELS),
        "regions": sorted(regions, key=lambda g: (g["row"], g["col"])),
    }  # fmt: skip
    truth.write_text(json.dumps(doc, separators=(",", ":")) + "\n", encoding="utf-8")
    return MosaicSummary(path, truth, width, height, rows * cols, n_objects, time.perf_counter() - start)


def load_truth(path: str | os.PathLike) -> dict:
    """The truth JSON of a mosaic (``path`` is the GeoTIFF or the truth file itself)."""
    path = Path(path)
    p = path if path.name.endswith(".truth.json") else truth_path(path)
    return json.loads(p.read_text(encoding="utf-8"))
