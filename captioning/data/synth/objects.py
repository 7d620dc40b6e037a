"""Builders for the countable things (boxed concepts). Each returns an ``Obj`` whose parts are polygons in
scene units; nothing is drawn until the canvas accepts it (``Canvas.try_add``) and renders.

Every builder takes the picture's RNG and varies size, proportions and colour, so no kind is one template.
The first two polygons of an object cast its shadow.
"""

from __future__ import annotations

import math

import numpy as np

from captioning.data.synth.canvas import Obj, object_colour
from captioning.data.synth.geom import blob, ellipse, place, rect

WHITE = np.array([236, 236, 232], dtype=np.float32)
DARK = np.array([40, 42, 46], dtype=np.float32)


def shade(rgb, f: float) -> np.ndarray:
    return np.clip(np.asarray(rgb, dtype=np.float32) * f, 0, 255)


def mirror(half: list[tuple[float, float]]) -> np.ndarray:
    """A polygon symmetric about the x axis from its upper half (listed nose to tail)."""
    pts = np.array(half, dtype=np.float64)
    return np.concatenate([pts, pts[::-1] * [1, -1]])


def airplane(rng, cx, cy, angle, length=None, colour=None) -> Obj:
    L = length or rng.uniform(40, 92)
    name, body = object_colour(rng, "airplane", colour)
    span = L * rng.uniform(0.85, 1.1)
    sweep = rng.uniform(0.15, 0.32) * L
    fus_w = L * rng.uniform(0.045, 0.065)
    fuselage = mirror([(0.5 * L, 0), (0.44 * L, fus_w), (-0.4 * L, fus_w * 0.9), (-0.5 * L, fus_w * 0.35)])
    root = 0.12 * L
    wings = mirror(
        [
            (root, fus_w),
            (root - sweep, span / 2),
            (root - sweep - 0.08 * L, span / 2),
            (root - 0.2 * L, fus_w),
        ]
    )
    tail = mirror([(-0.36 * L, fus_w), (-0.44 * L, 0.19 * span), (-0.5 * L, 0.19 * span), (-0.47 * L, fus_w)])
    accent = object_colour(rng, "car")[1]
    fin = mirror([(-0.38 * L, fus_w * 0.5), (-0.5 * L, fus_w * 0.5)])
    parts = [
        ("poly", place(fuselage, cx, cy, angle), body, None),
        ("poly", place(wings, cx, cy, angle), shade(body, 0.93), None),
        ("poly", place(tail, cx, cy, angle), shade(body, 0.93), None),
        ("poly", place(fin, cx, cy, angle), accent, None),
    ]
    for side in (-1, 1):  # engines under the wings
        eng = rect(0.1 * L, 0.045 * L) + [root - 0.42 * sweep, side * 0.2 * span]
        parts.append(("poly", place(eng, cx, cy, angle), shade(body, 0.6), None))
    parts.append(
        ("line", place(np.array([[0.46 * L, 0], [0.3 * L, 0]]), cx, cy, angle), shade(body, 0.55), 1.0)
    )
    return Obj("airplane", name, parts, height=L * 0.12, attrs={"length": L})


def car(rng, cx, cy, angle, colour=None, length=None) -> Obj:
    L = length or rng.uniform(13, 19)
    W = L * rng.uniform(0.44, 0.52)
    name, body = object_colour(rng, "car", colour)
    glass = shade(DARK, rng.uniform(0.8, 1.3))
    parts = [
        ("poly", place(rect(L, W), cx, cy, angle), body, None),
        ("poly", place(rect(0.2 * L, W * 0.8) + [0.16 * L, 0], cx, cy, angle), glass, None),
        ("poly", place(rect(0.12 * L, W * 0.75) + [-0.3 * L, 0], cx, cy, angle), glass, None),
        ("poly", place(rect(0.26 * L, W * 0.7) + [-0.07 * L, 0], cx, cy, angle), shade(body, 1.08), None),
    ]
    return Obj("car", name, parts, height=2.0)


def truck(rng, cx, cy, angle, colour=None) -> Obj:
    L = rng.uniform(24, 34)
    W = rng.uniform(8.5, 10.5)
    name, trailer = object_colour(rng, "truck", colour)
    cab = object_colour(rng, "car")[1]
    parts = [
        ("poly", place(rect(0.74 * L, W) + [-0.13 * L, 0], cx, cy, angle), trailer, None),
        ("poly", place(rect(0.2 * L, W * 0.92) + [0.39 * L, 0], cx, cy, angle), cab, None),
        ("poly", place(rect(0.06 * L, W * 0.75) + [0.45 * L, 0], cx, cy, angle), shade(DARK, 1.0), None),
        ("line", place(np.array([[-0.45 * L, 0], [0.2 * L, 0]]), cx, cy, angle), shade(trailer, 0.85), 1.0),
    ]
    return Obj("truck", name, parts, height=3.5)


def ship(rng, cx, cy, angle, length=None, colour=None) -> Obj:
    L = length or rng.uniform(50, 110)
    W = L * rng.uniform(0.15, 0.2)
    name, hull = object_colour(rng, "ship", colour)
    hull_pts = mirror([(0.5 * L, 0), (0.3 * L, W / 2), (-0.5 * L, W / 2)])
    deck_pts = mirror([(0.42 * L, 0), (0.27 * L, W * 0.38), (-0.46 * L, W * 0.38)])
    deck = shade(
        np.array([120, 110, 100]) if rng.random() < 0.5 else np.array([90, 120, 90]), rng.uniform(0.8, 1.2)
    )
    parts = [
        ("poly", place(hull_pts, cx, cy, angle), hull, None),
        ("poly", place(deck_pts, cx, cy, angle), deck, None),
        ("poly", place(rect(0.13 * L, W * 0.7) + [-0.36 * L, 0], cx, cy, angle), WHITE, None),
    ]
    if rng.random() < 0.45:  # deck cargo
        for i in range(int(rng.integers(2, 6))):
            box = rect(0.08 * L, W * 0.55) + [0.2 * L - i * 0.1 * L, 0]
            parts.append(("poly", place(box, cx, cy, angle), object_colour(rng, "car")[1], None))
    return Obj("ship", name, parts, height=L * 0.06, attrs={"length": L})


def boat(rng, cx, cy, angle, colour=None, length=None) -> Obj:
    L = length or rng.uniform(20, 34)
    W = L * rng.uniform(0.32, 0.42)
    name, hull = object_colour(rng, "boat", colour)
    hull_pts = mirror([(0.5 * L, 0), (0.22 * L, W / 2), (-0.42 * L, W * 0.45), (-0.5 * L, W * 0.3)])
    cabin = WHITE * 0.97 if name != "white" else shade(np.array([120, 150, 180]), rng.uniform(0.8, 1.1))
    parts = [
        ("poly", place(hull_pts, cx, cy, angle), hull, None),
        ("poly", place(rect(0.3 * L, W * 0.55) + [-0.12 * L, 0], cx, cy, angle), cabin, None),
    ]
    return Obj("boat", name, parts, height=2.5, attrs={"length": L})


def tank(rng, cx, cy, r=None, colour=None) -> Obj:
    r = r or rng.uniform(9, 24)
    name, body = object_colour(rng, "tank", colour)
    rim = ellipse(r, r, 28)
    top = ellipse(r * 0.86, r * 0.86, 28)
    light = np.array([-0.25 * r, -0.25 * r])
    parts = [
        ("poly", rim + [cx, cy], shade(body, 0.78), None),
        ("poly", top + [cx, cy], body, None),
        ("poly", ellipse(r * 0.5, r * 0.5, 20) + [cx, cy] + light * 0.5, shade(body, 1.08), None),
        ("poly", ellipse(r * 0.12, r * 0.12, 10) + [cx, cy], shade(body, 0.7), None),
    ]
    return Obj("tank", name, parts, height=r * rng.uniform(0.6, 1.0), attrs={"radius": r})


def building(rng, cx, cy, w, h, angle, colour=None) -> Obj:
    name, roof = object_colour(rng, "building", colour)
    inset = min(w, h) * 0.07 + 1
    parts = [
        ("poly", place(rect(w, h), cx, cy, angle), shade(roof, 0.8), None),
        ("poly", place(rect(w - 2 * inset, h - 2 * inset), cx, cy, angle), roof, None),
    ]
    for _ in range(int(rng.integers(0, 5))):  # roof units
        uw, uh = rng.uniform(3, 7), rng.uniform(3, 7)
        ux = rng.uniform(-w / 2 + inset + uw, w / 2 - inset - uw) if w > 2 * (inset + uw) else 0
        uy = rng.uniform(-h / 2 + inset + uh, h / 2 - inset - uh) if h > 2 * (inset + uh) else 0
        parts.append(
            (
                "poly",
                place(rect(uw, uh) + [ux, uy], cx, cy, angle),
                shade(WHITE, rng.uniform(0.6, 0.95)),
                None,
            )
        )
    if rng.random() < 0.4:  # a ridge or skylight strip
        parts.append(
            (
                "line",
                place(np.array([[-w / 2 + inset, 0], [w / 2 - inset, 0]]), cx, cy, angle),
                shade(roof, 0.7),
                1.5,
            )
        )
    return Obj("building", name, parts, height=rng.uniform(6, 18), attrs={"w": w, "h": h})


def house(rng, cx, cy, angle, w=None, h=None, colour=None) -> Obj:
    w = w or rng.uniform(16, 27)
    h = h or w * rng.uniform(0.6, 0.85)
    name, roof = object_colour(rng, "house", colour)
    parts = [
        ("poly", place(rect(w, h / 2) + [0, -h / 4], cx, cy, angle), shade(roof, 1.1), None),
        ("poly", place(rect(w, h / 2) + [0, h / 4], cx, cy, angle), shade(roof, 0.78), None),
        ("line", place(np.array([[-w / 2, 0], [w / 2, 0]]), cx, cy, angle), shade(roof, 0.6), 1.0),
    ]
    if rng.random() < 0.35:  # a wing of the house
        ww, wh = w * rng.uniform(0.3, 0.45), h * rng.uniform(0.4, 0.6)
        parts.insert(
            2,
            (
                "poly",
                place(rect(ww, wh) + [w / 2 - ww / 2, h / 2 + wh / 2 - 1], cx, cy, angle),
                shade(roof, 0.95),
                None,
            ),
        )
    return Obj("house", name, parts, height=rng.uniform(3.5, 7), attrs={"w": w, "h": h})


def mobile_home(rng, cx, cy, angle, colour=None) -> Obj:
    """A long box with a ribbed roof and a porch on one long side (cars are shorter and have windows)."""
    L = rng.uniform(22, 32)
    W = rng.uniform(8.5, 11)
    name, body = object_colour(rng, "mobile home", colour)
    side = 1 if rng.random() < 0.5 else -1
    porch_x = rng.uniform(-0.25, 0.25) * L
    porch = shade(
        np.array([120, 100, 80]) if rng.random() < 0.5 else np.array([150, 150, 145]), rng.uniform(0.85, 1.15)
    )
    parts = [
        ("poly", place(rect(L, W), cx, cy, angle), body, None),
        ("poly", place(rect(0.28 * L, 0.45 * W) + [porch_x, side * 0.72 * W], cx, cy, angle), porch, None),
    ]
    for y in (-0.25 * W, 0.25 * W):  # roof ribs
        parts.append(
            ("line", place(np.array([[-0.47 * L, y], [0.47 * L, y]]), cx, cy, angle), shade(body, 0.85), 0.7)
        )
    parts.append(
        ("line", place(np.array([[-0.5 * L, 0], [0.5 * L, 0]]), cx, cy, angle), shade(body, 0.7), 1.0)
    )
    return Obj("mobile home", name, parts, height=2.5, attrs={"length": L})


def court(rng, cx, cy, angle, kind="tennis", colour=None, length=None) -> Obj:
    name, surface = object_colour(rng, "court", colour)
    line_w = 1.0
    if kind == "tennis":
        L = length or rng.uniform(46, 64)
        W = L * 0.48
        # the apron around the playing area: a darker shade of it, or neutral gray
        gray = np.array([112, 112, 106])
        apron = (
            shade(surface, rng.uniform(0.7, 0.85))
            if rng.random() < 0.7
            else shade(gray, rng.uniform(0.8, 1.2))
        )
        pl, pw = L * 0.8, W * 0.62
        parts = [
            ("poly", place(rect(L, W), cx, cy, angle), apron, None),
            ("poly", place(rect(pl, pw), cx, cy, angle), surface, None),
        ]
        lines = [
            rect(pl, pw),
            rect(pl, pw * 0.75),
            np.array([[-pl * 0.27, 0], [pl * 0.27, 0]]),
            np.array([[-pl * 0.27, -pw * 0.375], [-pl * 0.27, pw * 0.375]]),
            np.array([[pl * 0.27, -pw * 0.375], [pl * 0.27, pw * 0.375]]),
        ]
        for ln in lines:
            pts = np.concatenate([ln, ln[:1]]) if len(ln) == 4 else ln
            parts.append(("line", place(pts, cx, cy, angle), WHITE, line_w))
        parts.append(
            (
                "line",
                place(np.array([[0, -W * 0.42], [0, W * 0.42]]), cx, cy, angle),
                shade(DARK, 1.2),
                line_w,
            )
        )
    else:  # basketball
        L = length or rng.uniform(34, 50)
        W = L * 0.55
        parts = [
            ("poly", place(rect(L, W), cx, cy, angle), surface, None),
            ("poly", place(rect(L * 0.9, W * 0.86), cx, cy, angle), shade(surface, 1.08), None),
        ]
        key = rect(L * 0.18, W * 0.3)
        for pts in (
            np.concatenate([rect(L * 0.9, W * 0.86), rect(L * 0.9, W * 0.86)[:1]]),
            np.array([[0, -W * 0.43], [0, W * 0.43]]),
            np.concatenate([ellipse(W * 0.14, W * 0.14, 16), ellipse(W * 0.14, W * 0.14, 16)[:1]]),
            np.concatenate([key, key[:1]]) + [-L * 0.36, 0],
            np.concatenate([key, key[:1]]) + [L * 0.36, 0],
        ):
            parts.append(("line", place(pts, cx, cy, angle), WHITE, line_w))
    return Obj("court", name, parts, height=0.8, attrs={"kind": kind, "length": L})


def dock(rng, x0, y0, angle, length, colour=None, head: bool | None = None) -> Obj:
    """A pier from (x0, y0) on the shore out along ``angle``."""
    W = rng.uniform(5, 7.5)
    name, deck = object_colour(rng, "dock", colour)
    local = rect(length, W) + [length / 2, 0]
    parts = [("poly", place(local, x0, y0, angle), deck, None)]
    if head if head is not None else rng.random() < 0.35:
        parts.append(
            (
                "poly",
                place(rect(W * 1.6, W * 3.2) + [length - W * 0.8, 0], x0, y0, angle),
                shade(deck, 0.95),
                None,
            )
        )
    parts.append(("line", place(np.array([[1, 0], [length - 1, 0]]), x0, y0, angle), shade(deck, 0.8), 0.8))
    return Obj("dock", name, parts, height=1.2, attrs={"length": length, "width": W})


def tree(rng, cx, cy, r=None, colour=None) -> Obj:
    r = r or rng.uniform(5.5, 13)
    name, crown = object_colour(rng, "tree", colour)
    outline = blob(r, rng, n=16, wobble=0.18)
    parts = [
        ("poly", outline + [cx, cy], shade(crown, 0.85), None),
        (
            "poly",
            blob(r * 0.62, rng, n=12, wobble=0.2) + [cx - 0.22 * r, cy - 0.22 * r],
            shade(crown, 1.12),
            None,
        ),
    ]
    return Obj("tree", name, parts, height=r * rng.uniform(0.9, 1.4), attrs={"radius": r})


def pool(rng, cx, cy, angle, colour=None) -> Obj:
    w, h = rng.uniform(12, 19), rng.uniform(8, 12)
    name, water = object_colour(rng, "pool", colour)
    if rng.random() < 0.35:
        outer, inner = ellipse(w / 2 + 1.5, h / 2 + 1.5), ellipse(w / 2, h / 2)
    else:
        outer, inner = rect(w + 3, h + 3), rect(w, h)
    parts = [
        ("poly", place(outer, cx, cy, angle), shade(WHITE, 0.95), None),
        ("poly", place(inner, cx, cy, angle), water, None),
    ]
    return Obj("pool", name, parts, height=0.0)


def pond(rng, cx, cy, r=None, colour=None) -> Obj:
    r = r or rng.uniform(12, 32)
    name, water = object_colour(rng, "pond", colour)
    shape = blob(r, rng, n=22, wobble=0.3, stretch=rng.uniform(1.0, 1.6))
    shape = place(shape, cx, cy, rng.uniform(0, math.pi))
    inner = cx + (shape - [cx, cy]) * 0.8
    parts = [
        ("poly", shape, shade(water, 1.1), None),
        ("poly", inner, water, None),
    ]
    return Obj("pond", name, parts, height=0.0, attrs={"radius": r})


def bunker(rng, cx, cy, r=None, colour=None) -> Obj:
    r = r or rng.uniform(6, 12)
    name, sand = object_colour(rng, "bunker", colour)
    shape = place(
        blob(r, rng, n=16, wobble=0.35, stretch=rng.uniform(1.0, 1.8)), cx, cy, rng.uniform(0, math.pi)
    )
    return Obj("bunker", name, [("poly", shape, sand, None)], height=0.0, attrs={"radius": r})


def diamond(rng, hx, hy, angle, radius=None, colour=None) -> Obj:
    """A baseball diamond with home plate at (hx, hy), facing ``angle``. Its dirt is bare soil and its
    inner square grass on the concept map; the box covers the whole infield."""
    R = radius or rng.uniform(44, 72)
    name, dirt = object_colour(rng, "diamond", colour)
    t = np.linspace(-math.pi / 4 - 0.12, math.pi / 4 + 0.12, 16)
    fan = np.concatenate([[[-0.08 * R, 0]], np.stack([R * np.cos(t), R * np.sin(t)], axis=1)])
    d = 0.4 * R  # half diagonal of the base square
    square = np.array([[0, 0], [d, d], [2 * d, 0], [d, -d]]) * 0.86 + [0.14 * d, 0]
    grass = shade(np.array([96, 146, 70]), rng.uniform(0.85, 1.1))
    parts = [
        ("poly", place(fan, hx, hy, angle), dirt, "soil"),
        ("poly", place(square, hx, hy, angle), grass, "grass"),
        ("poly", place(ellipse(0.07 * R, 0.07 * R, 12) + [d, 0], hx, hy, angle), shade(dirt, 1.05), "soil"),
        ("poly", place(ellipse(0.09 * R, 0.09 * R, 12), hx, hy, angle), shade(dirt, 1.05), "soil"),
    ]
    for end in ((R * 0.7, R * 0.7), (R * 0.7, -R * 0.7)):  # foul lines
        parts.append(("line", place(np.array([[0, 0], end]), hx, hy, angle), WHITE, 0.9))
    for b in ((d, d), (2 * d, 0), (d, -d), (0, 0)):
        parts.append(("poly", place(rect(2.2, 2.2) + b, hx, hy, angle), WHITE, "soil"))
    return Obj("diamond", name, parts, height=0.0, attrs={"radius": R})
