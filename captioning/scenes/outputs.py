"""The outputs of a finished scene job (written into the job's folder by ``SceneJob.finish``).

* ``scene.geojson`` - a FeatureCollection in the scene's CRS (a ``crs`` member names it, as GDAL/QGIS
  read it) or in EPSG:4326 (``crs="EPSG:4326"``; no ``crs`` member then, per RFC 7946). Features:
  ``kind: "tile"`` (the tile's window as a polygon; ``tile``, ``row``, ``col``, ``labels``, ``probabilities``,
  ``threshold``, ``valid`` and ``caption`` when captioned) and ``kind: "concept"`` (the merged box as a
  polygon; ``concept``, ``label``, ``score``, ``tiles``: how many tile detections it merges). Tiles
  skipped as nodata are not features. A scene without georeferencing is written in pixel coordinates
  (x right, y down) and says so in ``summary.json``'s warnings.
* ``coverage.tif`` - float32 GeoTIFF, one band per label (band description = label), one pixel per tile
  stride, value = the probability of the tile that covers the cell centre, -1 (nodata) where skipped;
  always in the scene's CRS. Its last row/column may reach past the scene by less than one stride.
* ``overlay.png`` - a preview of the scene (from the overviews) with each tile coloured by its most probable
  predicted label, the merged object boxes outlined in white (where at least 3 preview pixels wide), and a
  legend (label, colour, share of tiles).
* ``summary.json`` - tile counts, share of processed tiles per predicted label, merged object counts per
  concept, a rule-based description composed from those numbers, the scene's facts and warnings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from captioning.errors import SceneError
from captioning.scenes.merge import merge_instances

if TYPE_CHECKING:  # pragma: no cover
    from captioning.scenes.job import SceneJob

GEOJSON, COVERAGE, OVERLAY, SUMMARY = "scene.geojson", "coverage.tif", "overlay.png", "summary.json"
PREVIEW = "preview.png"  # the plain scene preview (the overlay's background), for viewers that toggle it
SUMMARY_FORMAT = "captioner-scene-summary/1"
DESCRIPTION_METHOD = (
    "rule-based: composed from the share of tiles per predicted label and the merged object counts; "
    "not written by a captioning model"
)
PALETTE = [  # 17+ distinguishable colours (tab20-like)
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
    (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (219, 219, 141),
    (158, 218, 229), (57, 59, 121),
]


@dataclass
class SceneOutputs:
    out_dir: Path
    geojson: Path
    coverage: Path
    overlay: Path
    summary_path: Path
    summary: dict


# ------------------------------------------------------------------------------------ coordinates


class _Mapper:
    """Scene pixels -> output coordinates (map CRS, EPSG:4326, or pixels when not georeferenced)."""

    def __init__(self, job: SceneJob, crs: str):
        reader = job.reader
        self.georef = reader.crs_name() is not None
        self.t = reader.transform
        self.to_wgs84 = crs.upper() == "EPSG:4326"
        if self.to_wgs84 and not self.georef:
            raise SceneError("is not georeferenced: its outputs cannot be given in EPSG:4326", path=job.input_path)
        self.src_crs = reader.crs
        self.name = "EPSG:4326" if self.to_wgs84 else (reader.crs_name() if self.georef else None)

    def __call__(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
        if not self.georef:
            return xs, ys
        t = self.t
        mx, my = t.a * xs + t.b * ys + t.c, t.d * xs + t.e * ys + t.f
        if self.to_wgs84:
            from rasterio.warp import transform

            lon, lat = transform(self.src_crs, "EPSG:4326", mx.ravel().tolist(), my.ravel().tolist())
            return np.asarray(lon).reshape(mx.shape), np.asarray(lat).reshape(my.shape)
        return mx, my

    def rings(self, boxes: np.ndarray) -> np.ndarray:
        """[N,4] pixel boxes -> [N,5,2] closed rings (top-left, bottom-left, bottom-right, top-right: counter-
        clockwise on a north-up map)."""
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        xs = np.stack([b[:, 0], b[:, 0], b[:, 2], b[:, 2], b[:, 0]], axis=1)
        ys = np.stack([b[:, 1], b[:, 3], b[:, 3], b[:, 1], b[:, 1]], axis=1)
        mx, my = self(xs, ys)
        return np.stack([mx, my], axis=-1)


def _round(v: float, digits: int) -> float:
    return round(float(v), digits)


# ------------------------------------------------------------------------------------ main


def write_outputs(job: SceneJob, crs: str = "scene") -> SceneOutputs:
    grid, out = job.grid, job.out_dir
    records = [job.records[i] for i in range(len(grid))]
    done = [r for r in records if not r.get("skipped")]
    labels: list[str] = list(done[0]["probabilities"]) if done else []
    for r in done:
        if list(r["probabilities"]) != labels:
            raise SceneError(f"tile {r['i']} was labelled with other labels than tile {done[0]['i']}", path=out)
    mapper = _Mapper(job, crs)
    digits = 7 if mapper.to_wgs84 else (3 if mapper.georef else 2)

    # objects, merged across tiles
    concept_ids: dict[str, int] = {}
    concept_label: dict[str, str | None] = {}
    boxes, scores, cids, tiles = [], [], [], []
    for r in done:
        for concept, label, score, x1, y1, x2, y2 in r.get("objects", ()):
            cid = concept_ids.setdefault(concept, len(concept_ids))
            concept_label.setdefault(concept, label)
            boxes.append((x1, y1, x2, y2))
            scores.append(score)
            cids.append(cid)
            tiles.append(r["i"])
    edge_px = 3.0 * job.zoom
    mb, ms, mc, mm = merge_instances(
        np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(scores), np.asarray(cids, dtype=np.int64),
        np.asarray(tiles, dtype=np.int64), grid, nms_iou=job.params.nms_iou, merge_ios=job.params.merge_ios,
        edge_px=edge_px,
    )
    names = {v: k for k, v in concept_ids.items()}
    counts: dict[str, int] = {}
    for c in mc.tolist():
        counts[names[c]] = counts.get(names[c], 0) + 1
    counts = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    # scene.geojson
    geojson_path = out / GEOJSON
    tile_boxes = np.asarray([(grid[r["i"]].x, grid[r["i"]].y, grid[r["i"]].x + grid[r["i"]].w,
                              grid[r["i"]].y + grid[r["i"]].h) for r in done], dtype=np.float64).reshape(-1, 4)
    tile_rings = mapper.rings(tile_boxes)
    obj_rings = mapper.rings(mb)
    tmp = geojson_path.with_name(geojson_path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        head: dict[str, Any] = {"type": "FeatureCollection", "name": Path(job.input_path).stem}
        if mapper.name and not mapper.to_wgs84:
            head["crs"] = {"type": "name", "properties": {"name": _ogc_urn(mapper.name)}}
        f.write(json.dumps(head)[:-1] + ', "features": [\n')
        first = True
        for r, ring in zip(done, tile_rings, strict=True):
            t = grid[r["i"]]
            probs = r["probabilities"]
            props = {"kind": "tile", "tile": t.index, "row": t.row, "col": t.col,
                     "labels": [k for k, p in probs.items() if p >= r["threshold"]],
                     "probabilities": probs, "threshold": r["threshold"], "valid": r["valid"]}  # fmt: skip
            if "caption" in r:
                props["caption"] = r["caption"]
            f.write(("" if first else ",\n") + _feature(ring, props, digits))
            first = False
        for ring, c, s, m in zip(obj_rings, mc.tolist(), ms.tolist(), mm.tolist(), strict=True):
            props = {"kind": "concept", "concept": names[c], "label": concept_label[names[c]],
                     "score": _round(s, 4), "tiles": int(m)}  # fmt: skip
            f.write(("" if first else ",\n") + _feature(ring, props, digits))
            first = False
        f.write("\n]}\n")
    tmp.replace(geojson_path)

    # coverage.tif and overlay.png
    coverage_path = _write_coverage(job, labels, out / COVERAGE)
    shares = {lab: (sum(1 for r in done if r["probabilities"][lab] >= r["threshold"]) / len(done)) if done else 0.0
              for lab in labels}  # fmt: skip
    overlay_path = _write_overlay(job, labels, shares, out / OVERLAY, mb)
    _write_preview(job, out / PREVIEW)

    # summary.json
    info = job.reader.info().to_dict()
    warnings = list(info.pop("warnings"))
    if not mapper.georef:
        warnings.append("outputs are in pixel coordinates (x right, y down): the scene has no georeferencing")
    captioned = [r for r in done if "caption" in r]
    summary = {
        "format": SUMMARY_FORMAT,
        "input": str(job.input_path),
        "scene": info,
        "output_crs": mapper.name,
        "params": job.params.identity() | {"crs": crs},
        "grid": job.spec["grid"],
        "tiles": {"total": len(records), "processed": len(done), "skipped_nodata": len(records) - len(done),
                  "captioned": len(captioned)},
        "label_fraction": {k: round(v, 4) for k, v in sorted(shares.items(), key=lambda kv: (-kv[1], kv[0]))},
        "objects": counts,
        "objects_total": int(sum(counts.values())),
        "description": describe(job, shares, counts, len(records), len(done)),
        "description_method": DESCRIPTION_METHOD,
        "files": {"geojson": GEOJSON, "coverage": COVERAGE, "overlay": OVERLAY, "preview": PREVIEW},
        "warnings": warnings,
    }  # fmt: skip
    summary_path = out / SUMMARY
    tmp = summary_path.with_name(SUMMARY + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    tmp.replace(summary_path)
    return SceneOutputs(out, geojson_path, coverage_path, overlay_path, summary_path, summary)


def _ogc_urn(name: str) -> str:
    if name.upper().startswith("EPSG:"):
        return f"urn:ogc:def:crs:EPSG::{name.split(':', 1)[1]}"
    return name


def _feature(ring: np.ndarray, props: dict, digits: int) -> str:
    coords = [[round(float(x), digits), round(float(y), digits)] for x, y in ring]
    return json.dumps(
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [coords]}, "properties": props},
        separators=(",", ":"),
    )


def _cell_tiles(job: SceneJob) -> np.ndarray:
    """[rows, cols] tile index per coverage cell."""
    grid = job.grid
    rows, cols = grid.cell_shape()
    r_idx = np.array([grid.cell_tile(r, 0).row for r in range(rows)])
    c_idx = np.array([grid.cell_tile(0, c).col for c in range(cols)])
    return r_idx[:, None] * grid.cols + c_idx[None, :]


def _prob_table(job: SceneJob, labels: list[str]) -> np.ndarray:
    """[tiles, labels] probabilities, -1 for skipped tiles."""
    table = np.full((len(job.grid), max(1, len(labels))), -1.0, dtype=np.float32)
    for i, r in job.records.items():
        if not r.get("skipped"):
            table[i, : len(labels)] = [r["probabilities"][k] for k in labels]
    return table


def _write_coverage(job: SceneJob, labels: list[str], path: Path) -> Path:
    import rasterio
    from rasterio.transform import Affine

    cells = _cell_tiles(job)
    table = _prob_table(job, labels)
    data = np.moveaxis(table[cells], -1, 0)  # [labels, rows, cols]
    profile = {
        "driver": "GTiff", "width": data.shape[2], "height": data.shape[1], "count": data.shape[0],
        "dtype": "float32", "nodata": -1.0, "compress": "deflate",
        "transform": job.reader.transform @ Affine.scale(job.grid.stride),
    }  # fmt: skip
    if job.reader.crs_name() is not None:
        profile["crs"] = job.reader.crs
    tmp = path.with_name(path.name + ".tmp.tif")
    with rasterio.open(tmp, "w", **profile) as dst:
        dst.write(data)
        for k, lab in enumerate(labels, 1):
            dst.set_band_description(k, lab)
        dst.update_tags(stride_pixels=job.grid.stride, tile_pixels=job.grid.size, source=str(job.input_path))
    tmp.replace(path)
    return path


def _font(px: int):
    try:
        return ImageFont.load_default(size=px)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def _write_preview(job: SceneJob, path: Path, side: int = 900) -> Path:
    """The scene as the overlay shows it underneath (same side), nodata black, as a PNG."""
    from PIL import Image

    rgb, valid = job.reader.preview(side)
    Image.fromarray(np.where(valid[..., None], rgb, 0).astype(np.uint8), "RGB").save(path)
    return path


def _write_overlay(
    job: SceneJob, labels: list[str], shares: dict[str, float], path: Path, boxes: np.ndarray, side: int = 900
) -> Path:
    rgb, valid = job.reader.preview(side)
    ph, pw = valid.shape
    grid = job.grid
    table = _prob_table(job, labels)
    thresholds = np.array([job.records[i].get("threshold", 1.0) for i in range(len(grid))], dtype=np.float32)
    predicted = table >= thresholds[:, None]
    top = np.where(predicted.any(axis=1), np.argmax(np.where(predicted, table, -1.0), axis=1), -1)
    # preview pixel -> scene pixel -> coverage cell -> tile -> top label
    cells = _cell_tiles(job)
    ys = np.minimum(((np.arange(ph) + 0.5) * grid.height / ph) // grid.stride, cells.shape[0] - 1).astype(int)
    xs = np.minimum(((np.arange(pw) + 0.5) * grid.width / pw) // grid.stride, cells.shape[1] - 1).astype(int)
    top_px = top[cells[ys[:, None], xs[None, :]]]
    colours = np.array(PALETTE[: max(1, len(labels))] + [(0, 0, 0)], dtype=np.float32)
    tint = colours[top_px]  # -1 picks the last (unused)
    alpha = np.where((top_px >= 0) & valid, 0.45, 0.0)[..., None].astype(np.float32)
    blended = (rgb.astype(np.float32) * (1 - alpha) + tint * alpha).clip(0, 255).astype(np.uint8)
    # tile boundaries of the top-label map, drawn where the label changes
    edge = np.zeros((ph, pw), dtype=bool)
    edge[1:, :] |= top_px[1:, :] != top_px[:-1, :]
    edge[:, 1:] |= top_px[:, 1:] != top_px[:, :-1]
    blended[edge & valid] = (blended[edge & valid] * 0.5).astype(np.uint8)

    font = _font(14)
    present = [k for k in range(len(labels)) if (top == k).any()]
    row_h, legend_w, pad = 20, 230, 10
    height = max(ph, pad * 2 + row_h * (len(present) + 2))
    sheet = Image.new("RGB", (pw + legend_w, height), (250, 250, 248))
    sheet.paste(Image.fromarray(blended, "RGB"), (0, 0))
    draw = ImageDraw.Draw(sheet)
    kx, ky = pw / grid.width, ph / grid.height  # merged object boxes, where they are at least 3 preview pixels
    for x1, y1, x2, y2 in np.asarray(boxes).reshape(-1, 4).tolist():
        if (x2 - x1) * kx >= 3 and (y2 - y1) * ky >= 3:
            draw.rectangle((x1 * kx, y1 * ky, x2 * kx, y2 * ky), outline=(255, 255, 255))
    x0 = pw + pad
    draw.text((x0, pad), "most probable label per tile", fill=(20, 20, 20), font=font)
    draw.text((x0, height - pad - 16), "white: objects found", fill=(20, 20, 20), font=font)
    for n, k in enumerate(present, 1):
        y = pad + n * row_h + 4
        draw.rectangle((x0, y, x0 + 14, y + 14), fill=PALETTE[k], outline=(40, 40, 40))
        draw.text((x0 + 22, y), f"{labels[k]}  ({shares[labels[k]] * 100:.0f} % of tiles)", fill=(20, 20, 20),
                  font=font)
    sheet.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(path, optimize=True)
    return path


# ------------------------------------------------------------------------------------ description


def _plural(concept: str, n: int) -> str:
    if n == 1:
        return concept
    try:
        from captioning.data.synth.concepts import CONCEPTS

        if concept in CONCEPTS:
            return CONCEPTS[concept].plural
    except ImportError:  # pragma: no cover
        pass
    return concept + ("es" if concept.endswith(("s", "x", "ch", "sh")) else "s")


def _extent(job: SceneJob) -> str:
    r = job.reader
    if r.gsd is None:
        return f"{r.width:,} x {r.height:,} pixel scene (ground size unknown)"
    w, h = r.width * r.gsd, r.height * r.gsd
    if max(w, h) >= 2000:
        return f"{w / 1000:.1f} x {h / 1000:.1f} km scene"
    return f"{w:.0f} x {h:.0f} m scene"


def describe(job: SceneJob, shares: dict[str, float], counts: dict[str, int], total: int, processed: int) -> str:
    """A short description composed by rules from the evidence (no model writes it)."""
    parts = [f"A {_extent(job)} in {total:,} tiles"]
    if total > processed:
        parts[0] += f" ({(total - processed) / total * 100:.0f} % without data)"
    parts[0] += "."
    ranked = sorted(((v, k) for k, v in shares.items() if v > 0), reverse=True)
    major = [(v, k) for v, k in ranked if v >= 0.25]
    minor = [(v, k) for v, k in ranked if 0.05 <= v < 0.25]
    if major:
        parts.append(
            "Most tiles show " + _join([f"{k.replace('-', ' ')} ({v * 100:.0f} %)" for v, k in major]) + "."
        )
    if minor:
        parts.append("Some show " + _join([f"{k.replace('-', ' ')} ({v * 100:.0f} %)" for v, k in minor]) + ".")
    if not major and not minor and processed:
        parts.append("No label is predicted on more than 5 % of the tiles.")
    if counts:
        top = list(counts.items())[:6]
        parts.append("Counted: " + _join([f"{n:,} {_plural(c, n)}" for c, n in top]) + ".")
    return " ".join(parts)


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


__all__ = ["SceneOutputs", "describe", "write_outputs"]
