"""The canvas a scene is composed on, and the renderer that turns it into pixels, labels and boxes.

Composition happens in three passes (see docs/synthetic.md):

1. **layout** - surfaces are painted as numbered regions into a region map (``fill``, ``poly``, ``band``);
   ``layout_done`` folds away slivers too small to be seen and freezes the map;
2. **objects** - composers build objects (``objects.py``) and ``try_add`` them; an object is accepted only
   if it lies mostly inside the picture, overlaps no other object, and stands on the surfaces it may
   stand on. Decals (road markings, foam) are queued with ``line`` / ``mark``;
3. **render** - surfaces are textured region by region (vectorised numpy over noise fields), decals and
   object shadows are drawn, then the objects themselves, then lighting, haze, sensor noise and blur.

Beside the RGB picture the renderer paints a *concept map* (one concept id per pixel). The 17 labels are
read off that map, so a label is 1 exactly when its concept is visible. All geometry is in scene units
(a 256 x 256 square) and scaled to the output size only when drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from captioning.data.synth.concepts import (
    COLOURS,
    CONCEPT_BY_ID,
    CONCEPT_IDS,
    CONCEPTS,
    LABELS,
    PALETTES,
    STUFF,
    STUFF_COLOURS,
)
from captioning.data.synth.geom import SCENE

MIN_REGION = 0.004  # a region smaller than this share of the picture is folded into the largest one
MIN_STUFF = 0.02  # a surface concept covering less than this (after layout) is folded away
VISIBLE_STUFF = 0.006  # a surface counts as present (label 1) when at least this share stays visible
VISIBLE_OBJECT_PX = 12  # ... and an object concept when this many scene-pixels of it are visible


def pick(rng: np.random.Generator, options: list[tuple]) -> tuple:
    """One option from a list whose last element is the weight."""
    w = np.array([o[-1] for o in options], dtype=np.float64)
    return options[int(rng.choice(len(options), p=w / w.sum()))]


def jitter(rng: np.random.Generator, rgb, amount: float = 10.0) -> np.ndarray:
    """Vary brightness (mostly) and hue (a little) around an anchor colour, so named colours stay true."""
    rgb = np.asarray(rgb, dtype=np.float32)
    return np.clip(rgb * (1 + rng.normal(0, amount / 160)) + rng.normal(0, amount / 3, 3), 0, 255)


def object_colour(rng: np.random.Generator, concept: str, name: str | None = None) -> tuple[str, np.ndarray]:
    """A named colour for an object (from its palette unless given) and a jittered RGB near its anchor."""
    if name is None:
        name = pick(rng, PALETTES[concept])[0]
    return name, jitter(rng, COLOURS[name], 9.0)


class Noise:
    """Smooth random fields for one picture, made on demand (so the RNG order is fixed by the code path)."""

    def __init__(self, rng: np.random.Generator, size: int):
        self.rng = rng
        self.size = size
        self._fields: dict[tuple, np.ndarray] = {}

    def smooth(self, cells: int, key: int = 0) -> np.ndarray:
        """A [size, size] field varying over about ``cells`` cells across the picture, unit std."""
        k = (cells, key)
        if k not in self._fields:
            grid = self.rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
            field_ = np.asarray(Image.fromarray(grid).resize((self.size, self.size), Image.BICUBIC))
            self._fields[k] = (field_ - field_.mean()) / (field_.std() + 1e-6)
        return self._fields[k]

    def fine(self, key: int = 0) -> np.ndarray:
        k = ("fine", key)
        if k not in self._fields:
            self._fields[k] = self.rng.standard_normal((self.size, self.size), dtype=np.float32)
        return self._fields[k]


@dataclass
class Region:
    concept: str
    colour: str  # colour name (for captions)
    rgb: np.ndarray
    params: dict = field(default_factory=dict)


@dataclass
class Obj:
    """A countable thing. ``parts`` are drawn in order: ("poly", pts, rgb, concept|None) paints a polygon
    (and the concept map unless concept is None, which keeps the object's own concept), ("line", pts, rgb,
    width) paints a line on top (markings; no concept change). ``height`` sets the shadow length."""

    concept: str
    colour: str | None
    parts: list[tuple]
    height: float = 0.0
    attrs: dict = field(default_factory=dict)
    box: tuple[float, float, float, float] | None = None  # pixels, set when accepted

    def polys(self) -> list[np.ndarray]:
        return [p[1] for p in self.parts if p[0] == "poly"]

    def bounds(self) -> tuple[float, float, float, float]:
        pts = np.concatenate(self.polys())
        return float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max())

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.bounds()
        return (x0 + x1) / 2, (y0 + y1) / 2


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class Canvas:
    def __init__(self, size: int, rng: np.random.Generator):
        self.size = size
        self.k = size / SCENE  # pixels per scene unit
        self.rng = rng
        self.noise = Noise(rng, size)
        self.regions: list[Region | None] = [None]  # region id 0 = unpainted
        self._region_img = Image.new("L", (size, size), 0)
        self._region_draw = ImageDraw.Draw(self._region_img)
        self.region_map: np.ndarray | None = None  # [size, size] uint8 after layout_done
        self.objects: list[Obj] = []
        self._occupied = np.zeros((int(SCENE), int(SCENE)), dtype=bool)
        self._decals: list[tuple] = []
        # lighting of this picture: the direction shadows fall and how long they are
        angle = rng.uniform(0, 2 * math.pi)
        self.sun = np.array([math.cos(angle), math.sin(angle)]) * rng.uniform(0.45, 1.0)
        self.facts: dict = {}  # what the composer wants the captions to know (layout, relations ...)

    # ------------------------------------------------------------------ pass 1: surfaces (layout)

    def region(self, concept: str, colour: str | None = None, **params) -> int:
        """A new surface region of ``concept`` in a colour from its palette (or the named one)."""
        assert concept in STUFF, concept
        options = STUFF_COLOURS[concept]
        if colour is None:
            name, rgb, _ = pick(self.rng, options)
        else:
            name, rgb, _ = next(o for o in options if o[0] == colour)
        self.regions.append(Region(concept, name, jitter(self.rng, rgb, 7.0), params))
        if len(self.regions) > 250:
            raise RuntimeError("too many regions in one scene")
        return len(self.regions) - 1

    def _px(self, pts: np.ndarray) -> list[float]:
        return (np.asarray(pts, dtype=np.float64) * self.k).ravel().tolist()

    def fill(self, rid: int) -> None:
        self._region_draw.rectangle((0, 0, self.size, self.size), fill=rid)

    def poly(self, rid: int, pts: np.ndarray) -> None:
        self._region_draw.polygon(self._px(pts), fill=rid)

    def band(self, rid: int, pts: np.ndarray, width: float) -> None:
        """A thick polyline (roads, rivers, paths)."""
        self._region_draw.line(self._px(pts), fill=rid, width=max(1, round(width * self.k)), joint="curve")

    def layout_done(self) -> None:
        """Fold slivers away and freeze the region map (objects are checked against it)."""
        arr = np.asarray(self._region_img).copy()
        n = len(self.regions)
        area = arr.size
        counts = np.bincount(arr.ravel(), minlength=n)
        if counts[0]:
            raise RuntimeError("layout left pixels unpainted")
        lut = np.arange(n, dtype=np.uint8)
        largest = int(np.argmax(counts))
        for rid in range(1, n):
            if 0 < counts[rid] < MIN_REGION * area:
                lut[rid] = largest
        per_concept: dict[str, int] = {}
        for rid in range(1, n):
            if lut[rid] == rid:
                per_concept[self.regions[rid].concept] = (
                    per_concept.get(self.regions[rid].concept, 0) + counts[rid]
                )
        for concept, total in per_concept.items():
            if 0 < total < MIN_STUFF * area:
                others = [r for r in range(1, n) if lut[r] == r and self.regions[r].concept != concept]
                target = max(others, key=lambda r: counts[r])
                for rid in range(1, n):
                    if self.regions[rid].concept == concept:
                        lut[rid] = target
        self.region_map = lut[arr]
        self._region_concepts = np.array(
            [0] + [CONCEPT_IDS[r.concept] for r in self.regions[1:]], dtype=np.uint8
        )

    def concept_at(self, pts: np.ndarray) -> np.ndarray:
        """Surface concept ids under scene points (after layout_done); points outside give 0."""
        p = np.floor(np.asarray(pts) * self.k).astype(np.int64)
        inside = (p[:, 0] >= 0) & (p[:, 1] >= 0) & (p[:, 0] < self.size) & (p[:, 1] < self.size)
        out = np.zeros(len(p), dtype=np.uint8)
        out[inside] = self._region_concepts[self.region_map[p[inside, 1], p[inside, 0]]]
        return out

    def surface_share(self, concept: str) -> float:
        """Share of the picture covered by a surface concept after layout."""
        return float((self._region_concepts[self.region_map] == CONCEPT_IDS[concept]).mean())

    # ------------------------------------------------------------------ pass 2: objects and decals

    def line(
        self, pts: np.ndarray, rgb, width: float, dash: tuple[float, float] | None = None, alpha: int = 255
    ):
        """A painted line drawn over the surfaces (lane markings, foam); dashed if ``dash=(on, off)``."""
        self._decals.append(
            ("line", np.asarray(pts, dtype=np.float64), tuple(int(c) for c in rgb), width, dash, alpha)
        )

    def mark(self, pts: np.ndarray, rgb, alpha: int = 255):
        """A painted polygon over the surfaces (stall marks, crosswalk bars)."""
        self._decals.append(("poly", np.asarray(pts, dtype=np.float64), tuple(int(c) for c in rgb), alpha))

    def _raster(self, polys: list[np.ndarray]):
        pts = np.concatenate(polys)
        x0, y0 = np.floor(pts.min(axis=0)).astype(int) - 1
        x1, y1 = np.ceil(pts.max(axis=0)).astype(int) + 2
        x0, y0 = max(x0, 0), max(y0, 0)
        x1, y1 = min(x1, int(SCENE)), min(y1, int(SCENE))
        if x1 <= x0 or y1 <= y0:
            return None
        im = Image.new("1", (x1 - x0, y1 - y0), 0)
        d = ImageDraw.Draw(im)
        for p in polys:
            d.polygon((p - [x0, y0]).ravel().tolist(), fill=1)
        return x0, y0, np.asarray(im, dtype=bool)

    def try_add(
        self,
        obj: Obj,
        on: set[str] | tuple[str, ...] | None = None,
        *,
        min_inside: float = 0.75,
        max_iou: float = 0.25,
        gap: int = 1,
    ) -> bool:
        """Accept ``obj`` if it is mostly inside the picture, touches no other object, and (when ``on`` is
        given) stands on those surface concepts."""
        x0, y0, x1, y1 = obj.bounds()
        cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, SCENE), min(y1, SCENE)
        if cx1 - cx0 < 4 or cy1 - cy0 < 4:
            return False
        if (cx1 - cx0) * (cy1 - cy0) < min_inside * (x1 - x0) * (y1 - y0):
            return False
        ras = self._raster(obj.polys())
        if ras is None:
            return False
        rx, ry, mask = ras
        h, w = mask.shape
        if (self._occupied[ry : ry + h, rx : rx + w] & mask).any():
            return False
        if on is not None:
            ys, xs = np.nonzero(mask)
            if len(xs) == 0:
                return False
            step = max(1, len(xs) // 60)
            pts = np.stack([xs[::step] + rx + 0.5, ys[::step] + ry + 0.5], axis=1)
            allowed = np.array([CONCEPT_IDS[c] for c in on], dtype=np.uint8)
            if np.isin(self.concept_at(pts), allowed).mean() < 0.97:
                return False
        box = (cx0 * self.k, cy0 * self.k, cx1 * self.k, cy1 * self.k)
        if any(_iou(box, o.box) > max_iou for o in self.objects):
            return False
        grown = mask.copy()
        for _ in range(gap):  # keep a small gap to the next object
            g = grown.copy()
            g[1:, :] |= grown[:-1, :]
            g[:-1, :] |= grown[1:, :]
            g[:, 1:] |= grown[:, :-1]
            g[:, :-1] |= grown[:, 1:]
            grown = g
        self._occupied[ry : ry + h, rx : rx + w] |= grown
        obj.box = tuple(round(float(v), 1) for v in box)
        self.objects.append(obj)
        return True

    def count(self, concept: str) -> int:
        return sum(1 for o in self.objects if o.concept == concept)

    def of(self, concept: str) -> list[Obj]:
        return [o for o in self.objects if o.concept == concept]

    # ------------------------------------------------------------------ pass 3: render

    def render(self) -> tuple[Image.Image, np.ndarray, dict[str, float]]:
        """-> (RGB picture, label vector [17] of 0/1, {surface concept: visible share})."""
        assert self.region_map is not None, "layout_done() first"
        size, k, rng = self.size, self.k, self.rng
        rgb = np.empty((size * size, 3), dtype=np.float32)
        flat = self.region_map.ravel()
        order = np.argsort(flat, kind="stable")
        bounds = np.searchsorted(flat[order], np.arange(len(self.regions) + 1))
        for rid in range(1, len(self.regions)):
            idx = order[bounds[rid] : bounds[rid + 1]]
            if len(idx):
                rgb[idx] = texture(self, self.regions[rid], idx)
        img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8).reshape(size, size, 3))
        cmap = Image.fromarray(self._region_concepts[self.region_map])

        draw = ImageDraw.Draw(img, "RGBA")
        for d in self._decals:
            if d[0] == "line":
                _, pts, colour, width, dash, alpha = d
                w = max(1, round(width * k))
                if dash is None:
                    draw.line(self._px(pts), fill=colour + (alpha,), width=w)
                else:
                    for seg in _dashes(pts, *dash):
                        draw.line(self._px(seg), fill=colour + (alpha,), width=w)
            else:
                _, pts, colour, alpha = d
                draw.polygon(self._px(pts), fill=colour + (alpha,))

        # shadows: one mask for all objects (so overlapping shadows do not double up), then bodies
        shadow = Image.new("L", (size, size), 0)
        sdraw = ImageDraw.Draw(shadow)
        for obj in self.objects:
            if obj.height <= 0:
                continue
            for t in (0.35, 0.7, 1.0):
                off = self.sun * obj.height * t
                for p in obj.polys()[:2]:
                    sdraw.polygon(self._px(p + off), fill=255)
        arr = np.asarray(img, dtype=np.float32)
        strength = rng.uniform(0.35, 0.55)
        arr = arr * (1 - strength * np.asarray(shadow, dtype=np.float32)[..., None] / 255.0)
        img = Image.fromarray(arr.astype(np.uint8))
        draw = ImageDraw.Draw(img)
        cdraw = ImageDraw.Draw(cmap)
        for obj in self.objects:
            own = CONCEPT_IDS[obj.concept]
            for part in obj.parts:
                if part[0] == "poly":
                    _, pts, colour, concept = part
                    draw.polygon(self._px(pts), fill=tuple(int(c) for c in colour))
                    cdraw.polygon(self._px(pts), fill=CONCEPT_IDS[concept] if concept else own)
                else:
                    _, pts, colour, width = part
                    draw.line(
                        self._px(pts), fill=tuple(int(c) for c in colour), width=max(1, round(width * k))
                    )

        # labels from what is visible
        concept_map = np.asarray(cmap)
        counts = np.bincount(concept_map.ravel(), minlength=len(CONCEPT_BY_ID) + 1)
        area = size * size
        labels = np.zeros(len(LABELS), dtype=np.uint8)
        visible: dict[str, float] = {}
        for cid, name in CONCEPT_BY_ID.items():
            c = CONCEPTS[name]
            share = counts[cid] / area
            present = share >= VISIBLE_STUFF if not c.boxed else counts[cid] >= VISIBLE_OBJECT_PX * k * k
            if not c.boxed and present:
                visible[name] = share
            if present and c.label is not None:
                labels[LABELS.index(c.label)] = 1
        return self._finish(img), labels, visible

    def _finish(self, img: Image.Image) -> Image.Image:
        """Lighting, colour cast, haze, sensor noise and a little blur."""
        rng, size = self.rng, self.size
        arr = np.asarray(img, dtype=np.float32)
        gain = (rng.uniform(0.88, 1.12) * (1 + rng.normal(0, 0.03, 3))).astype(np.float32)
        direction = rng.uniform(0, 2 * math.pi)
        ramp = np.linspace(-1, 1, size, dtype=np.float32)
        gradient = (math.cos(direction) * ramp[None, :] + math.sin(direction) * ramp[:, None]) * rng.uniform(
            0, 0.08
        )
        light = (1 + gradient + rng.uniform(0.02, 0.07) * self.noise.smooth(3, key=99)).astype(np.float32)
        arr *= light[..., None]
        arr *= gain
        contrast = np.float32(rng.uniform(0.9, 1.15))
        mean = arr.mean()
        arr -= mean
        arr *= contrast
        arr += mean
        if rng.random() < 0.3:
            haze = np.float32(rng.uniform(0.04, 0.14))
            arr *= 1 - haze
            arr += haze * np.array([200, 205, 215], dtype=np.float32)
        noise = rng.standard_normal(arr.shape, dtype=np.float32)
        noise *= np.float32(rng.uniform(1.5, 5.0))
        arr += noise
        np.clip(arr, 0, 255, out=arr)
        out = Image.fromarray(arr.astype(np.uint8))
        if rng.random() < 0.3:
            out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 0.8) * self.k))
        return out


def _dashes(pts: np.ndarray, on: float, off: float) -> list[np.ndarray]:
    """Cut a polyline into dashes of length ``on`` separated by ``off`` (scene units)."""
    seg = np.diff(pts, axis=0)
    seg_len = np.linalg.norm(seg, axis=1)
    cum = np.concatenate([[0.0], np.cumsum(seg_len)])
    out = []
    s = 0.0
    while s < cum[-1]:
        e = min(s + on, cum[-1])
        ts = np.concatenate([[s], cum[(cum > s) & (cum < e)], [e]])
        i = np.clip(np.searchsorted(cum, ts, side="right") - 1, 0, len(seg) - 1)
        frac = (ts - cum[i]) / np.maximum(seg_len[i], 1e-9)
        out.append(pts[i] + seg[i] * frac[:, None])
        s += on + off
    return out


# ---------------------------------------------------------------------------------------- textures


def texture(cv: Canvas, reg: Region, idx: np.ndarray) -> np.ndarray:
    """Colours [len(idx), 3] of one surface region at flat pixel indices ``idx``."""
    n = cv.noise
    base = reg.rgb
    c = reg.concept
    k = cv.k
    ys, xs = np.divmod(idx, cv.size)
    x, y = xs / k, ys / k  # scene units
    p = reg.params

    def f(cells, key=0):
        return n.smooth(cells, key).ravel()[idx]

    if c == "grass":
        v = 1 + 0.07 * f(4) + 0.06 * f(24) + 0.035 * n.fine().ravel()[idx]
        if "stripes" in p:  # mowing stripes (golf fairways, sports lawns)
            a, period = p["stripes"]
            v += 0.05 * np.sign(np.sin(2 * math.pi * (x * math.cos(a) + y * math.sin(a)) / period))
        col = base[None, :] * v[:, None]
        col[:, 0] += 6 * f(5, 1)
    elif c == "field":
        a, period, depth = p.get("rows", (0.0, 5.0, 0.2))
        rows = 0.5 + 0.5 * np.sin(2 * math.pi * (x * math.cos(a) + y * math.sin(a)) / period)
        v = 1 - depth * rows + 0.05 * f(4) + 0.04 * n.fine().ravel()[idx]
        col = base[None, :] * v[:, None]
    elif c == "soil":
        v = 1 + 0.10 * f(4) + 0.07 * f(20) + 0.05 * n.fine().ravel()[idx]
        col = base[None, :] * v[:, None]
        col[:, 2] -= 5 * f(6, 2)
    elif c == "sand":
        a = p.get("ripple", 0.7)
        v = (
            1
            + 0.04 * f(4)
            + 0.03 * n.fine().ravel()[idx]
            + 0.025 * np.sin((x * math.cos(a) + y * math.sin(a)) / 1.6)
        )
        col = base[None, :] * v[:, None]
    elif c == "sea":
        a = p.get("deep", 0.0)  # direction towards deep water
        s = x * math.cos(a) + y * math.sin(a)
        s0 = p.get("shore", float(s.min()))
        depth = np.clip((s - s0) / 90.0, 0, 1)
        shallow = np.clip(base * 1.35 + 18, 0, 255)
        col = shallow[None, :] * (1 - depth[:, None]) + (base * 0.85)[None, :] * depth[:, None]
        crest = np.sin(2 * math.pi * s / p.get("wave", 9.0) + 2.2 * f(10, 3))
        foam = np.clip((crest - 0.86) / 0.14, 0, 1) * (0.35 + 0.65 * (1 - depth))
        col = col * (1 + 0.03 * f(6)[:, None]) + foam[:, None] * 70
    elif c == "water":
        v = 1 + 0.05 * f(4) + 0.025 * f(16) + 0.015 * n.fine().ravel()[idx]
        col = base[None, :] * v[:, None]
    elif c == "pavement":
        stain = np.clip(f(14, 4) - 0.8, 0, None)
        v = 1 + 0.04 * f(5) - 0.08 * stain + 0.05 * n.fine().ravel()[idx]
        col = base[None, :] * v[:, None]
    elif c == "chaparral":
        density = p.get("density", 0.55)
        shrubby = f(60, 5) + 0.6 * f(18, 6)
        shrub = shrubby > np.quantile(shrubby, 1 - density) if len(idx) > 100 else shrubby > 0
        ground = base[None, :] * (1 + 0.06 * f(4) + 0.04 * n.fine().ravel()[idx])[:, None]
        bush = (
            np.array([72, 88, 52], dtype=np.float32) * (0.8 + 0.2 * f(30, 7))[:, None] * p.get("green", 1.0)
        )
        col = np.where(shrub[:, None], bush, ground)
    elif c == "forest":
        field_ = n.smooth(34, 8)
        crowns = field_.ravel()[idx]
        shift = max(1, round(1.5 * k))  # light from the upper left: crowns look round
        relief_ = np.zeros_like(field_)
        relief_[shift:, shift:] = field_[shift:, shift:] - field_[:-shift, :-shift]
        relief = relief_.ravel()[idx]
        v = 0.72 + 0.28 * np.clip(crowns * 0.5 + 0.5, 0, 1.2) + 0.22 * relief
        v = np.where(crowns < -1.2, 0.45, v) + 0.04 * n.fine().ravel()[idx]
        col = base[None, :] * v[:, None]
        col[:, 0] += 8 * f(5, 9)
    else:  # pragma: no cover - every surface concept has a texture
        raise ValueError(c)
    return col
