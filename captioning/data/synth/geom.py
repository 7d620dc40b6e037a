"""Small 2-D geometry for the scene composers. Points are float arrays ``[N, 2]`` of (x, y) in *scene
units*: a scene is always laid out on a 256 x 256 square and scaled to the output size when drawn."""

from __future__ import annotations

import math

import numpy as np

SCENE = 256.0  # scene units per image side
CENTRE = np.array([SCENE / 2, SCENE / 2])


def rotate(pts: np.ndarray, angle: float, about: np.ndarray | tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Rotate points by ``angle`` radians (counter-clockwise on screen is negative y; we do not care)."""
    c, s = math.cos(angle), math.sin(angle)
    about = np.asarray(about, dtype=np.float64)
    p = np.asarray(pts, dtype=np.float64) - about
    return np.stack([p[:, 0] * c - p[:, 1] * s, p[:, 0] * s + p[:, 1] * c], axis=1) + about


def place(local: np.ndarray, cx: float, cy: float, angle: float) -> np.ndarray:
    """Points drawn around the origin (object frame, +x = forward) moved to (cx, cy) and turned by angle."""
    return rotate(local, angle) + np.array([cx, cy])


def rect(w: float, h: float) -> np.ndarray:
    """Axis-aligned rectangle centred on the origin (object frame)."""
    return np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]])


def rect_at(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def ellipse(rx: float, ry: float, n: int = 20) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return np.stack([rx * np.cos(t), ry * np.sin(t)], axis=1)


def blob(
    r: float, rng: np.random.Generator, n: int = 18, wobble: float = 0.25, stretch: float = 1.0
) -> np.ndarray:
    """An irregular closed outline of mean radius r (ponds, bunkers, clearings)."""
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    k = np.arange(1, 4)[:, None]
    phases = rng.uniform(0, 2 * math.pi, (3, 1))
    amps = rng.uniform(0, wobble, (3, 1)) / k
    radius = r * (1 + (amps * np.sin(k * t[None, :] + phases)).sum(axis=0))
    return np.stack([radius * np.cos(t) * stretch, radius * np.sin(t)], axis=1)


def bezier(p0, p1, p2, p3, n: int = 32) -> np.ndarray:
    t = np.linspace(0, 1, n)[:, None]
    p0, p1, p2, p3 = (np.asarray(p, dtype=np.float64) for p in (p0, p1, p2, p3))
    return (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3


def polyline_length(pts: np.ndarray) -> float:
    return float(np.linalg.norm(np.diff(pts, axis=0), axis=1).sum())


def resample(pts: np.ndarray, step: float, start: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Points every ``step`` along a polyline from arc length ``start``; returns (points, tangent angles)."""
    seg = np.diff(pts, axis=0)
    seg_len = np.linalg.norm(seg, axis=1)
    cum = np.concatenate([[0.0], np.cumsum(seg_len)])
    s = np.arange(start, cum[-1], step)
    if len(s) == 0:
        return np.zeros((0, 2)), np.zeros(0)
    i = np.clip(np.searchsorted(cum, s, side="right") - 1, 0, len(seg) - 1)
    frac = (s - cum[i]) / np.maximum(seg_len[i], 1e-9)
    out = pts[i] + seg[i] * frac[:, None]
    ang = np.arctan2(seg[i, 1], seg[i, 0])
    return out, ang


def offset(pts: np.ndarray, d: float) -> np.ndarray:
    """The polyline shifted sideways by d (positive = to the right of travel in image coordinates)."""
    seg = np.diff(pts, axis=0)
    seg = seg / np.maximum(np.linalg.norm(seg, axis=1, keepdims=True), 1e-9)
    tang = np.concatenate([seg[:1], seg[:-1] + seg[1:], seg[-1:]], axis=0)
    tang = tang / np.maximum(np.linalg.norm(tang, axis=1, keepdims=True), 1e-9)
    normal = np.stack([-tang[:, 1], tang[:, 0]], axis=1)
    return pts + normal * d


def line_across(angle: float, shift: float = 0.0, extra: float = 40.0, n: int = 2) -> np.ndarray:
    """A straight line through the scene centre (moved sideways by ``shift``) that runs past both edges."""
    half = SCENE * 0.75 + extra
    t = np.linspace(-half, half, n)
    direction = np.array([math.cos(angle), math.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    return CENTRE + normal * shift + t[:, None] * direction


def curve_across(
    rng: np.random.Generator, angle: float, bend: float, shift: float = 0.0, n: int = 40
) -> np.ndarray:
    """A smooth curve crossing the whole scene roughly along ``angle``, bending sideways by up to ``bend``."""
    half = SCENE * 0.75
    local = bezier(
        (-half, shift),
        (-half / 3, shift + rng.uniform(-1, 1) * bend),
        (half / 3, shift + rng.uniform(-1, 1) * bend),
        (half, shift + rng.uniform(-0.3, 0.3) * bend),
        n,
    )
    return rotate(local, angle) + CENTRE


def points_inside(pts: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """Mask of points inside the scene square (shrunk by margin)."""
    return np.all((pts >= margin) & (pts <= SCENE - margin), axis=1)
