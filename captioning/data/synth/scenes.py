"""The scene grammar: one composer per UCM class.

A composer lays out surfaces on the canvas, calls ``layout_done``, adds objects, and records in
``cv.facts`` what the captions may say beyond counts and colours (road shape, arrangement, relations such
as "cars beside the airplane"). Optional elements appear with fixed probabilities, so the labels of a class
vary from picture to picture and every label is visibly present when it is 1. The grammar is written out
in docs/synthetic.md; keep the two in step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from captioning.data.synth import objects as O
from captioning.data.synth.canvas import Canvas, Obj
from captioning.data.synth.geom import (
    CENTRE,
    SCENE,
    blob,
    curve_across,
    line_across,
    offset,
    place,
    points_inside,
    rect,
    rect_at,
    resample,
    rotate,
)

WHITE = (236, 236, 232)
YELLOW = (226, 196, 70)
GROUND = ("grass", "soil", "chaparral", "pavement", "sand", "field", "forest")


# ------------------------------------------------------------------------------------------ helpers


def base(cv: Canvas, concept: str, colour: str | None = None, **params) -> int:
    rid = cv.region(concept, colour, **params)
    cv.fill(rid)
    return rid


def side_poly(curve: np.ndarray, side: int = 1, far: float = 600.0) -> np.ndarray:
    """The polygon on one side of a curve that crosses the scene (a half-plane with a wavy edge)."""
    d = curve[-1] - curve[0]
    d = d / np.linalg.norm(d)
    n = np.array([-d[1], d[0]]) * side
    return np.concatenate([curve, [curve[-1] + n * far, curve[0] + n * far]])


def patch(
    cv: Canvas, concept: str, cx: float, cy: float, r: float, colour: str | None = None, **params
) -> int:
    rid = cv.region(concept, colour, **params)
    shape = blob(r, cv.rng, n=20, wobble=0.3, stretch=cv.rng.uniform(1.0, 1.7))
    cv.poly(rid, place(shape, cx, cy, cv.rng.uniform(0, math.pi)))
    return rid


def edge_strip(
    cv: Canvas, concept: str, angle: float, depth: float, colour: str | None = None, bend: float = 12
) -> int:
    """A surface along one picture edge: the side beyond a wavy line ``depth`` units in from that edge."""
    rid = cv.region(concept, colour)
    direction = np.array([math.cos(angle), math.sin(angle)])  # towards the edge
    reach = abs(direction[0]) * 128 + abs(direction[1]) * 128
    curve = curve_across(cv.rng, angle + math.pi / 2, bend, shift=0)
    curve = curve - CENTRE
    curve = curve + CENTRE + direction * (reach - depth)
    # side +1 of a curve running along angle+90deg is the direction (-sin, cos) of that heading = -direction
    cv.poly(rid, side_poly(curve, side=-1))
    return rid


@dataclass
class Road:
    pts: np.ndarray  # centre line, scene units, runs past the picture edges
    width: float
    curved: bool
    rid: int

    def lane_points(self, step: float = 2.0, margin: float = 6.0):
        p, a = resample(self.pts, step)
        keep = points_inside(p, margin)
        return p[keep], a[keep]


def road(
    cv: Canvas,
    pts: np.ndarray,
    width: float,
    *,
    rid: int | None = None,
    centre: str | None = "dash",
    edges: bool = False,
    colour: str | None = None,
) -> Road:
    rid = rid if rid is not None else cv.region("pavement", colour)
    cv.band(rid, pts, width)
    if centre == "dash":
        cv.line(pts, WHITE, 1.0, dash=(6, 6), alpha=210)
    elif centre == "yellow":
        cv.line(offset(pts, 0.8), YELLOW, 0.9, alpha=220)
        cv.line(offset(pts, -0.8), YELLOW, 0.9, alpha=220)
    if edges:
        cv.line(offset(pts, width / 2 - 2), WHITE, 0.8, alpha=200)
        cv.line(offset(pts, -width / 2 + 2), WHITE, 0.8, alpha=200)
    return Road(np.asarray(pts, dtype=np.float64), width, bool(len(pts) > 2), rid)


def straight_or_curved(cv: Canvas, angle: float, p_curved: float, bend: float = 50, shift: float = 0.0):
    if cv.rng.random() < p_curved:
        return curve_across(cv.rng, angle, bend, shift), True
    return line_across(angle, shift), False


def scatter(
    cv: Canvas, n: int, make: Callable[[float, float], Obj], on=None, area=None, tries: int = 25, **kw
) -> int:
    """Try to add ``n`` objects at random points of ``area`` (x0, y0, x1, y1; default the picture)."""
    x0, y0, x1, y1 = area or (0, 0, SCENE, SCENE)
    added = 0
    for _ in range(n * tries):
        if added >= n:
            break
        if cv.try_add(make(cv.rng.uniform(x0, x1), cv.rng.uniform(y0, y1)), on, **kw):
            added += 1
    return added


def around(
    cv: Canvas,
    anchors: list[Obj],
    n: int,
    make: Callable[[float, float], Obj],
    dist: tuple[float, float],
    on=None,
    tries: int = 25,
) -> int:
    """Add up to n objects at a distance in ``dist`` from the centres of ``anchors``."""
    added = 0
    if not anchors:
        return 0
    for _ in range(n * tries):
        if added >= n:
            break
        a = anchors[int(cv.rng.integers(len(anchors)))]
        ax, ay = a.centre
        t = cv.rng.uniform(0, 2 * math.pi)
        d = cv.rng.uniform(*dist)
        if cv.try_add(make(ax + d * math.cos(t), ay + d * math.sin(t)), on):
            added += 1
    return added


def cars_on(cv: Canvas, rd: Road, n: int, *, trucks: int = 0, two_way: bool = True, lanes: int = 1) -> int:
    """Up to n cars (and some trucks) driving on a road, in its lanes."""
    pts, angs = rd.lane_points()
    if len(pts) == 0:
        return 0
    lane_w = rd.width / (2 * lanes if two_way else lanes)
    added = 0
    want = [("truck", trucks)] + [("car", n)]
    for kind, k in want:
        got = 0
        for _ in range(k * 20):
            if got >= k:
                break
            i = int(cv.rng.integers(len(pts)))
            lane = int(cv.rng.integers(lanes))
            side = 1 if (not two_way or cv.rng.random() < 0.5) else -1
            off = side * lane_w * (lane + 0.5) - (0 if two_way else rd.width / 2)
            normal = np.array([-math.sin(angs[i]), math.cos(angs[i])])
            x, y = pts[i] + normal * off
            heading = angs[i] + (0 if side > 0 or not two_way else math.pi)
            obj = O.truck(cv.rng, x, y, heading) if kind == "truck" else O.car(cv.rng, x, y, heading)
            if cv.try_add(obj, ("pavement",), min_inside=0.9):
                got += 1
        added += got
    return added


def along(
    cv: Canvas,
    pts: np.ndarray,
    dist: float,
    spacing: float,
    make: Callable[[float, float, float], Obj],
    on=None,
    sides=(1, -1),
    jitter: float = 2.0,
    limit: int = 99,
) -> list[Obj]:
    """Objects in rows beside a line (houses along a street, trees along a river). Slots run along one side
    and back along the other; filling starts at a random slot, so a limit leaves one contiguous block."""
    slots = []
    for side in sides:
        p, a = resample(pts, spacing, start=cv.rng.uniform(0, spacing))
        keep = points_inside(p, -10)
        slots += [(side, xy, ang) for xy, ang in zip(p[keep], a[keep], strict=True)]
    if not slots:
        return []
    first = int(cv.rng.integers(len(slots)))
    placed: list[Obj] = []
    for side, xy, ang in slots[first:] + slots[:first]:
        if len(placed) >= limit:
            break
        normal = np.array([-math.sin(ang), math.cos(ang)]) * side
        cx, cy = xy + normal * (dist + cv.rng.uniform(-jitter, jitter))
        obj = make(cx, cy, ang)
        if cv.try_add(obj, on):
            placed.append(obj)
    return placed


def maybe(cv: Canvas, p: float) -> bool:
    return bool(cv.rng.random() < p)


def randint(cv: Canvas, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi]."""
    return int(cv.rng.integers(lo, hi + 1))


def grid_angle(cv: Canvas) -> float:
    """Street-grid orientation: mostly near the picture axes, sometimes diagonal."""
    if maybe(cv, 0.7):
        return float(cv.rng.choice([0.0, math.pi / 2]) + cv.rng.normal(0, 0.06))
    return float(cv.rng.uniform(0, math.pi))


def trees_near(cv: Canvas, n: int, on=("grass",), colour=None, r=(5.5, 12), **kw) -> int:
    return scatter(cv, n, lambda x, y: O.tree(cv.rng, x, y, cv.rng.uniform(*r), colour), on, **kw)


# ----------------------------------------------------------------------------------------- composers


def agricultural(cv: Canvas) -> None:
    rng = cv.rng
    a0 = grid_angle(cv)
    base(cv, "field", rows=(a0, rng.uniform(3, 6), rng.uniform(0.12, 0.3)))
    cuts_u = np.sort(rng.uniform(-120, 120, randint(cv, 1, 3)))
    cuts_v = np.sort(rng.uniform(-120, 120, randint(cv, 0, 2)))
    us = np.concatenate([[-200], cuts_u, [200]])
    vs = np.concatenate([[-200], cuts_v, [200]])
    bare = maybe(cv, 0.35)
    n_bare = 0
    plots = []
    for i in range(len(us) - 1):
        for j in range(len(vs) - 1):
            local = rect_at(us[i], vs[j], us[i + 1], vs[j + 1])
            pts = rotate(local, a0) + CENTRE
            if bare and n_bare == 0 and maybe(cv, 0.5):
                rid = cv.region("soil")
                n_bare += 1
            else:
                row_angle = a0 + (math.pi / 2 if maybe(cv, 0.4) else 0.0)
                rid = cv.region("field", rows=(row_angle, rng.uniform(2.5, 6.5), rng.uniform(0.1, 0.32)))
            cv.poly(rid, pts)
            plots.append(rid)
    if bare and n_bare == 0:
        patch(cv, "soil", rng.uniform(40, 216), rng.uniform(40, 216), rng.uniform(25, 45))
    road_ = None
    if maybe(cv, 0.35):
        shift = float(rng.choice(cuts_u)) if len(cuts_u) else 0.0
        road_ = road(cv, line_across(a0 + math.pi / 2, shift=-shift), rng.uniform(7, 11), centre=None)
    cv.layout_done()
    cv.facts.update(road=road_ is not None, axis=a0 + math.pi / 2, rows_axis=a0)
    if road_ is not None and maybe(cv, 0.4):
        cars_on(cv, road_, randint(cv, 1, 3))
    if maybe(cv, 0.35):  # a row of trees along a plot edge
        if len(cuts_u):
            line = (
                rotate(
                    np.array(
                        [[float(rng.choice(cuts_u)), -200.0], [float(rng.choice(cuts_u)) + 0.01, 200.0]]
                    ),
                    a0,
                )
                + CENTRE
            )
        else:
            line = line_across(a0, shift=rng.uniform(-90, 90))
        got = along(
            cv,
            line,
            7,
            rng.uniform(14, 22),
            lambda x, y, a: O.tree(rng, x, y, rng.uniform(5, 8)),
            on=("field", "soil", "grass"),
            sides=(1,),
            limit=randint(cv, 3, 12),
        )
        cv.facts["tree_row"] = len(got) > 0
    if maybe(cv, 0.2):  # a farmstead
        x, y = rng.uniform(30, 226), rng.uniform(30, 226)
        scatter(
            cv,
            randint(cv, 1, 2),
            lambda x_, y_: O.house(rng, x_, y_, a0, w=rng.uniform(18, 30)),
            on=("field", "soil"),
            area=(x - 25, y - 25, x + 25, y + 25),
        )


def airplane(cv: Canvas) -> None:
    rng = cv.rng
    base(cv, "pavement")
    if maybe(cv, 0.6):
        for _ in range(randint(cv, 1, 2)):
            edge_strip(cv, "grass", rng.uniform(0, 2 * math.pi), rng.uniform(25, 70))
    if maybe(cv, 0.25):
        edge_strip(cv, "soil", rng.uniform(0, 2 * math.pi), rng.uniform(25, 60))
    a0 = rng.uniform(0, math.pi)
    taxi_lines = randint(cv, 0, 2)
    for s in rng.uniform(-90, 90, taxi_lines):  # taxi lines
        cv.line(line_across(a0, s), YELLOW, 1.2, alpha=230)
    cv.facts["taxi_lines"] = taxi_lines
    terminal = maybe(cv, 0.35)
    cv.layout_done()
    if terminal:
        d = rng.uniform(0, 2 * math.pi)
        w, h = rng.uniform(70, 120), rng.uniform(30, 45)
        cx, cy = CENTRE + np.array([math.cos(d), math.sin(d)]) * 118
        cv.try_add(
            O.building(rng, cx, cy, w, h, d + math.pi / 2), ("pavement", "grass", "soil"), min_inside=0.55
        )
    n = int(rng.choice([1, 2, 3, 4], p=[0.45, 0.3, 0.15, 0.1]))
    in_row = n > 1 and maybe(cv, 0.4)
    heading = rng.uniform(0, 2 * math.pi)
    length = rng.uniform(40, 80)
    same_colour = None if maybe(cv, 0.5) else O.object_colour(rng, "airplane")[0]
    for _ in range(n * 30):
        if cv.count("airplane") >= n:
            break
        ang = heading if in_row else rng.uniform(0, 2 * math.pi)
        L = length * rng.uniform(0.95, 1.05) if in_row else rng.uniform(38, 92)
        cv.try_add(
            O.airplane(rng, rng.uniform(30, 226), rng.uniform(30, 226), ang, L, same_colour),
            ("pavement",),
            min_inside=0.9,
        )
    cv.facts["in_row"] = in_row and cv.count("airplane") > 1
    planes = cv.of("airplane")
    if maybe(cv, 0.5):
        got = around(
            cv,
            planes,
            randint(cv, 1, 8),
            lambda x, y: O.car(rng, x, y, rng.uniform(0, 2 * math.pi)),
            (25, 55),
            ("pavement",),
        )
        cv.facts["cars_beside_planes"] = got > 0
    cv.facts["terminal"] = cv.count("building") > 0


def baseballdiamond(cv: Canvas) -> None:
    rng = cv.rng
    a0 = grid_angle(cv)
    stripes = (a0, rng.uniform(8, 14)) if maybe(cv, 0.5) else None
    base(cv, "grass", **({"stripes": stripes} if stripes else {}))
    rd = None
    if maybe(cv, 0.4):
        cv.facts["axis"] = a0 + float(rng.choice([0, math.pi / 2]))
        pts, curved = straight_or_curved(
            cv, cv.facts["axis"], 0.3, shift=rng.choice([-1, 1]) * rng.uniform(80, 105)
        )
        rd = road(cv, pts, rng.uniform(10, 15))
    lot = None
    if maybe(cv, 0.25):
        lot = cv.region("pavement")
        corner = rng.choice([0, 1]) * 256, rng.choice([0, 1]) * 256
        w, h = rng.uniform(60, 100), rng.uniform(50, 80)
        cv.poly(lot, rect_at(corner[0] - w, corner[1] - h, corner[0] + w, corner[1] + h))
    cv.layout_done()
    n = 2 if maybe(cv, 0.2) else 1
    for _ in range(n * 40):
        if cv.count("diamond") >= n:
            break
        cv.try_add(
            O.diamond(
                rng,
                rng.uniform(40, 216),
                rng.uniform(40, 216),
                rng.uniform(0, 2 * math.pi),
                rng.uniform(40, 70) if n == 2 else None,
            ),
            ("grass",),
            min_inside=0.8,
        )
    if maybe(cv, 0.6):
        cv.facts["trees_around"] = (
            around(
                cv,
                cv.of("diamond"),
                randint(cv, 3, 12),
                lambda x, y: O.tree(rng, x, y),
                (60, 110),
                ("grass",),
            )
            > 0
        )
    if rd is not None and maybe(cv, 0.5):
        cars_on(cv, rd, randint(cv, 1, 5))
    if lot is not None:
        rows_of_cars(cv, lot_angle=a0, n=randint(cv, 2, 12))
    if maybe(cv, 0.3):
        scatter(
            cv,
            randint(cv, 1, 3),
            lambda x, y: O.building(rng, x, y, rng.uniform(26, 50), rng.uniform(22, 40), a0),
            ("grass", "pavement"),
            min_inside=0.6,
        )
    cv.facts["road"] = rd is not None
    cv.facts["lot"] = lot is not None


def rows_of_cars(cv: Canvas, lot_angle: float, n: int, area=None) -> int:
    """Cars parked side by side on pavement (anywhere pavement is, or within ``area``)."""
    rng = cv.rng
    return scatter(
        cv,
        n,
        lambda x, y: O.car(rng, x, y, lot_angle + math.pi / 2 + float(rng.choice([0, math.pi]))),
        ("pavement",),
        area=area,
        tries=30,
    )


def beach(cv: Canvas) -> None:
    rng = cv.rng
    to_sea = rng.uniform(0, 2 * math.pi)  # direction from land to sea
    base(cv, "sand")
    coast_shift = rng.uniform(-50, 30)
    curved = maybe(cv, 0.5)
    coast = curve_across(rng, to_sea + math.pi / 2, 30 if curved else 6, shift=0)
    d = np.array([math.cos(to_sea), math.sin(to_sea)])
    coast = coast + d * coast_shift
    s_coast = float((coast @ d).min())
    sea = cv.region("sea", deep=to_sea, shore=s_coast, wave=rng.uniform(7, 12))
    cv.poly(sea, side_poly(coast, side=-1))
    behind = None
    if maybe(cv, 0.5):
        behind = str(rng.choice(["grass", "forest", "soil"], p=[0.45, 0.4, 0.15]))
        inland = coast - d * rng.uniform(70, 120)
        rid = cv.region(behind)
        cv.poly(rid, side_poly(inland, side=1))
    rd = None
    if maybe(cv, 0.2):
        rd = road(cv, coast - d * rng.uniform(60, 100), rng.uniform(8, 12), centre="dash")
    cv.line(coast, WHITE, rng.uniform(2.5, 4.5), alpha=200)
    cv.line(coast + d * rng.uniform(5, 9), WHITE, 1.5, alpha=140)
    cv.layout_done()
    cv.facts.update(
        coast="curved" if curved else "straight",
        behind=behind,
        road=rd is not None,
        to_sea=to_sea,
        axis=to_sea + math.pi / 2,
    )
    if rd is not None and maybe(cv, 0.5):
        cars_on(cv, rd, randint(cv, 1, 4))
    if behind in ("grass", "soil") and maybe(cv, 0.4):
        scatter(cv, randint(cv, 1, 4), lambda x, y: O.house(rng, x, y, to_sea + math.pi / 2), (behind,))
    if maybe(cv, 0.3):
        scatter(cv, randint(cv, 1, 3), lambda x, y: O.boat(rng, x, y, rng.uniform(0, 2 * math.pi)), ("sea",))
    if maybe(cv, 0.2):
        trees_near(cv, randint(cv, 2, 6), on=("sand", "grass"))


def buildings(cv: Canvas) -> None:
    rng = cv.rng
    a0 = grid_angle(cv)
    base(cv, "pavement", colour=str(rng.choice(["gray", "light gray"])))
    roads = []
    for s in rng.uniform(-100, 100, randint(cv, 1, 2)):
        roads.append(road(cv, line_across(a0, s), rng.uniform(12, 18), centre="dash", colour="dark gray"))
    if maybe(cv, 0.4):
        roads.append(
            road(
                cv,
                line_across(a0 + math.pi / 2, rng.uniform(-80, 80)),
                rng.uniform(12, 18),
                colour="dark gray",
            )
        )
        cv.facts["cross_street"] = True
    if maybe(cv, 0.35):
        for _ in range(randint(cv, 1, 2)):
            patch(cv, "grass", rng.uniform(20, 236), rng.uniform(20, 236), rng.uniform(14, 26))
    cv.layout_done()
    n = randint(cv, 3, 9)
    big = n <= 4
    scatter(
        cv,
        n,
        lambda x, y: O.building(
            rng,
            x,
            y,
            rng.uniform(40, 90) if big else rng.uniform(26, 60),
            rng.uniform(30, 70) if big else rng.uniform(22, 46),
            a0,
        ),
        ("pavement", "grass"),
        min_inside=0.6,
        tries=30,
    )
    n_cars = randint(cv, 0, 14)
    got = 0
    for rd in roads:
        got += cars_on(cv, rd, n_cars // len(roads))
    if maybe(cv, 0.4):
        got += rows_of_cars(cv, a0, randint(cv, 2, 8))
    if cv.surface_share("grass") > 0 and maybe(cv, 0.6):
        trees_near(cv, randint(cv, 1, 6), on=("grass",))
    cv.facts.update(road=len(roads) > 0, n_roads=len(roads), road_shape="straight", axis=a0)


def chaparral(cv: Canvas) -> None:
    rng = cv.rng
    density = rng.uniform(0.3, 0.7)
    base(cv, "chaparral", density=density, green=rng.uniform(0.85, 1.2))
    if maybe(cv, 0.5):
        for _ in range(randint(cv, 1, 3)):
            patch(cv, "soil", rng.uniform(20, 236), rng.uniform(20, 236), rng.uniform(16, 34))
    dirt = maybe(cv, 0.25)
    if dirt:
        rid = cv.region("soil")
        cv.facts["dirt_axis"] = rng.uniform(0, math.pi)
        cv.band(rid, curve_across(rng, cv.facts["dirt_axis"], 60), rng.uniform(6, 9))
    rd = None
    if maybe(cv, 0.2):
        cv.facts["axis"] = rng.uniform(0, math.pi)
        pts, curved = straight_or_curved(cv, cv.facts["axis"], 0.6)
        rd = road(cv, pts, rng.uniform(8, 11), centre=None)
    cv.layout_done()
    cv.facts.update(
        density="dense" if density > 0.5 else "sparse",
        dirt_road=dirt,
        road=rd is not None,
        road_shape="curved" if rd is not None and rd.curved else "straight",
    )
    if rd is not None and maybe(cv, 0.5):
        along(
            cv,
            rd.pts,
            rd.width / 2 + 14,
            rng.uniform(30, 60),
            lambda x, y, a: O.house(rng, x, y, a),
            ("chaparral", "soil"),
            limit=randint(cv, 1, 3),
        )


def residential(cv: Canvas, density: str) -> None:
    """dense / medium / sparse residential: houses along streets, trees, lawns, pools, cars."""
    rng = cv.rng
    a0 = grid_angle(cv)
    ground = "grass"
    if density == "sparse" and maybe(cv, 0.35):
        ground = str(rng.choice(["chaparral", "soil"]))
    base(cv, ground, **({"density": rng.uniform(0.3, 0.55)} if ground == "chaparral" else {}))
    streets = []
    if density == "dense":
        spacing = rng.uniform(62, 80)
        shifts = np.arange(-140, 140, spacing) + rng.uniform(0, spacing)
        shifts = shifts[np.abs(shifts) < 120]
        for s in shifts:
            streets.append(road(cv, line_across(a0, s), rng.uniform(9, 12), centre=None))
        if maybe(cv, 0.5):
            streets.append(
                road(cv, line_across(a0 + math.pi / 2, rng.uniform(-60, 60)), rng.uniform(9, 12), centre=None)
            )
            cv.facts["cross_street"] = True
    else:
        n = 1 if density == "sparse" else randint(cv, 1, 2)
        for i in range(n):
            pts, curved = straight_or_curved(
                cv, a0 + i * math.pi / 2, 0.45 if density == "medium" else 0.6, shift=rng.uniform(-40, 40)
            )
            streets.append(road(cv, pts, rng.uniform(8, 12), centre=None))
        cv.facts["cross_street"] = n > 1
    cv.layout_done()
    house_size = {"dense": (18, 24), "medium": (18, 25), "sparse": (20, 28)}[density]
    spacing = {"dense": (22, 27), "medium": (30, 42), "sparse": (50, 80)}[density]
    limit = {"dense": randint(cv, 16, 28), "medium": randint(cv, 6, 13), "sparse": randint(cv, 2, 6)}[density]
    houses = []
    per_street = math.ceil(limit / len(streets))
    for i in rng.permutation(len(streets)):
        st = streets[int(i)]
        w_mean = rng.uniform(*house_size)
        houses += along(
            cv,
            st.pts,
            st.width / 2 + w_mean * 0.55 + rng.uniform(2, 6),
            rng.uniform(*spacing),
            lambda x, y, a, w_mean=w_mean: O.house(rng, x, y, a, w=w_mean * rng.uniform(0.9, 1.1)),
            (ground,),
            limit=min(per_street, limit - len(houses)),
        )
    if density != "dense" and len(houses) < limit:
        scatter(cv, limit - len(houses), lambda x, y: O.house(rng, x, y, a0), (ground,))
    pools = 0
    if density != "dense" and maybe(cv, 0.4) or density == "dense" and maybe(cv, 0.12):
        pools = around(
            cv, cv.of("house"), randint(cv, 1, 3), lambda x, y: O.pool(rng, x, y, a0), (16, 26), (ground,)
        )
    n_trees = {"dense": randint(cv, 0, 5), "medium": randint(cv, 3, 12), "sparse": randint(cv, 5, 14)}[
        density
    ]
    trees = scatter(cv, n_trees, lambda x, y: O.tree(rng, x, y), (ground,))
    if maybe(cv, 0.6):
        n_cars = randint(cv, 1, 6 if density == "dense" else 4)
        for i, st in enumerate(streets):
            cars_on(cv, st, n_cars // len(streets) + (1 if i < n_cars % len(streets) else 0))
    cv.facts.update(
        road=len(streets) > 0,
        n_roads=len(streets),
        ground=ground,
        pools_beside_houses=pools > 0,
        axis=a0,
        road_shape="curved" if any(s.curved for s in streets) else "straight",
        houses_along_road=len(houses) > 0,
        trees=trees,
    )


def forest(cv: Canvas) -> None:
    rng = cv.rng
    base(cv, "forest")
    clearing = None
    if maybe(cv, 0.25):
        clearing = "soil"
        patch(cv, "soil", rng.uniform(40, 216), rng.uniform(40, 216), rng.uniform(18, 36))
    if maybe(cv, 0.25):
        clearing = "grass"
        patch(cv, "grass", rng.uniform(40, 216), rng.uniform(40, 216), rng.uniform(18, 36))
    path = maybe(cv, 0.2)
    if path:
        cv.facts["path_axis"] = rng.uniform(0, math.pi)
        cv.band(cv.region("soil"), curve_across(rng, cv.facts["path_axis"], 50), rng.uniform(6, 9))
    stream = maybe(cv, 0.1)
    if stream:
        cv.facts["stream_axis"] = rng.uniform(0, math.pi)
        cv.band(cv.region("water"), curve_across(rng, cv.facts["stream_axis"], 60), rng.uniform(10, 18))
    cv.layout_done()
    cv.facts.update(clearing=clearing, path=path, stream=stream)


def freeway(cv: Canvas) -> None:
    rng = cv.rng
    side = str(rng.choice(["grass", "soil", "chaparral", "forest"], p=[0.4, 0.25, 0.2, 0.15]))
    base(cv, side)
    a0 = grid_angle(cv)
    curved = maybe(cv, 0.4)
    lane_w = rng.uniform(16, 22)
    median_w = rng.uniform(6, 11)
    median = str(rng.choice(["grass", "pavement", "soil"], p=[0.5, 0.3, 0.2]))
    centre = curve_across(rng, a0, 45) if curved else line_across(a0, 0, n=8)
    pave = cv.region("pavement")
    road_w = 2 * lane_w + median_w
    cv.band(pave, centre, road_w)
    if median != "pavement":
        cv.band(cv.region(median), centre, median_w)
    carriageways = []
    for s in (1, -1):
        c = offset(centre, s * (median_w + lane_w) / 2)
        carriageways.append(Road(c, lane_w, curved, pave))
        cv.line(c, WHITE, 0.9, dash=(7, 7), alpha=220)
        cv.line(offset(c, lane_w / 2 - 1.5), WHITE, 0.8, alpha=200)
        cv.line(offset(c, -lane_w / 2 + 1.5), WHITE if median == "pavement" else YELLOW, 0.8, alpha=200)
    ramp = False
    if maybe(cv, 0.25):
        ramp = True
        r = curve_across(rng, a0 + rng.uniform(0.3, 0.6), 30, shift=rng.uniform(30, 60))
        cv.band(pave, r, rng.uniform(8, 11))
    cv.layout_done()
    n_cars = int(rng.choice([0, randint(cv, 1, 5), randint(cv, 6, 16)], p=[0.15, 0.45, 0.4]))
    trucks = randint(cv, 0, 2) if maybe(cv, 0.4) else 0
    for i, cw in enumerate(carriageways):
        k = n_cars // 2 + (n_cars % 2 if i == 0 else 0)
        cars_on(cv, cw, k, trucks=trucks if i == 0 else 0, two_way=False, lanes=2)
    trees_side = 0
    if side in ("grass", "soil") and maybe(cv, 0.5):
        trees_side = along(
            cv,
            centre,
            road_w / 2 + rng.uniform(12, 30),
            rng.uniform(14, 30),
            lambda x, y, a: O.tree(rng, x, y),
            (side,),
            limit=randint(cv, 2, 10),
            jitter=6,
        )
        trees_side = len(trees_side)
    if side == "grass" and maybe(cv, 0.2):
        along(
            cv,
            centre,
            road_w / 2 + rng.uniform(30, 45),
            rng.uniform(30, 45),
            lambda x, y, a: O.house(rng, x, y, a),
            ("grass",),
            limit=randint(cv, 1, 5),
        )
    cv.facts.update(
        road_shape="curved" if curved else "straight",
        median=median,
        side=side,
        ramp=ramp,
        axis=a0,
        trees_along=trees_side > 0,
        road=True,
    )


def golfcourse(cv: Canvas) -> None:
    rng = cv.rng
    base(cv, "grass", colour=str(rng.choice(["dark green", "green"])))
    fair = cv.region("grass", colour="light green", stripes=(rng.uniform(0, math.pi), rng.uniform(8, 14)))
    cv.facts["axis"] = rng.uniform(0, math.pi)
    fairway = curve_across(rng, cv.facts["axis"], 50, shift=rng.uniform(-40, 40))
    cv.band(fair, fairway, rng.uniform(50, 80))
    path = maybe(cv, 0.3)
    if path:
        road(
            cv,
            curve_across(rng, rng.uniform(0, math.pi), 40, shift=rng.uniform(-70, 70)),
            rng.uniform(5, 7),
            centre=None,
        )
    woods = maybe(cv, 0.3)
    if woods:
        edge_strip(cv, "forest", rng.uniform(0, 2 * math.pi), rng.uniform(25, 45))
    cv.layout_done()
    n_ponds = int(rng.choice([0, 1, 2], p=[0.5, 0.4, 0.1]))
    scatter(cv, n_ponds, lambda x, y: O.pond(rng, x, y), ("grass",))
    scatter(cv, randint(cv, 1, 5), lambda x, y: O.bunker(rng, x, y), ("grass",))
    trees = scatter(cv, randint(cv, 2, 14), lambda x, y: O.tree(rng, x, y), ("grass",))
    cv.facts.update(path=path, woods=woods, trees=trees)
    if path:
        cv.facts["road"] = True


def harbor(cv: Canvas) -> None:
    rng = cv.rng
    base(cv, "water", colour=str(rng.choice(["blue", "dark blue", "green"])))
    land_dir = (
        rng.uniform(0, 2 * math.pi) if maybe(cv, 0.6) else float(rng.choice([0, 0.5, 1, 1.5]) * math.pi)
    )
    d = np.array([math.cos(land_dir), math.sin(land_dir)])
    depth = rng.uniform(25, 60)
    # the quay: a straight edge ``depth`` in from the picture edge in direction d
    reach = abs(d[0]) * 128 + abs(d[1]) * 128
    quay = line_across(land_dir + math.pi / 2, 0) + d * (reach - depth)
    land = cv.region("pavement")
    cv.poly(land, side_poly(quay, side=-1))
    cv.layout_done()
    n_docks = randint(cv, 1, 4)
    spacing = rng.uniform(45, 70)
    qdir = np.array([-d[1], d[0]])
    start = -spacing * (n_docks - 1) / 2 + rng.uniform(-30, 30)
    docks = []
    for i in range(n_docks):
        foot = CENTRE + d * (reach - depth + 1) + qdir * (start + i * spacing)
        L = rng.uniform(70, 170)
        obj = O.dock(rng, foot[0], foot[1], land_dir + math.pi, L)
        obj.attrs["foot"] = foot
        if cv.try_add(obj, ("water", "pavement"), min_inside=0.5, max_iou=0.5):
            docks.append(obj)
    # boats moored along both sides of each dock
    boat_colour = None if maybe(cv, 0.6) else "white"
    for dk in docks:
        L = dk.attrs["length"]
        step = rng.uniform(9, 13)
        for side in (1, -1):
            if maybe(cv, 0.2):
                continue
            for t in np.arange(12, L - 6, step):
                if maybe(cv, 0.25):
                    continue
                bl = rng.uniform(15, 24)
                pos = dk.attrs["foot"] - d * (t + 1)
                pos = pos + qdir * side * (dk.attrs["width"] / 2 + bl / 2 + 1.5)
                cv.try_add(
                    O.boat(rng, pos[0], pos[1], land_dir + math.pi / 2 * side + math.pi, boat_colour, bl),
                    ("water",),
                    min_inside=0.8,
                )
                if cv.count("boat") >= 24:
                    break
    if maybe(cv, 0.3):
        scatter(
            cv,
            randint(cv, 1, 2),
            lambda x, y: O.ship(rng, x, y, land_dir + math.pi / 2 + rng.normal(0, 0.3)),
            ("water",),
            min_inside=0.8,
        )
    if maybe(cv, 0.3):
        scatter(
            cv, randint(cv, 1, 3), lambda x, y: O.boat(rng, x, y, rng.uniform(0, 2 * math.pi)), ("water",)
        )
    if maybe(cv, 0.45):
        scatter(
            cv,
            randint(cv, 1, 3),
            lambda x, y: O.building(rng, x, y, rng.uniform(26, 50), rng.uniform(20, 35), land_dir),
            ("pavement",),
            min_inside=0.5,
        )
    if maybe(cv, 0.4):
        rows_of_cars(cv, land_dir, randint(cv, 1, 6))
    cv.facts.update(road=False, land_dir=land_dir)


def intersection(cv: Canvas) -> None:
    rng = cv.rng
    corner = str(rng.choice(["grass", "soil", "pavement"], p=[0.55, 0.2, 0.25]))
    base(cv, corner)
    a0 = grid_angle(cv)
    a1 = a0 + math.pi / 2 + rng.normal(0, 0.15)
    w0, w1 = rng.uniform(14, 22), rng.uniform(12, 20)
    rid = cv.region("pavement", colour="dark gray" if corner == "pavement" else None)
    cv.facts["yellow"] = maybe(cv, 0.5)
    roads = [
        road(cv, line_across(a0, 0), w0, rid=rid, centre="yellow" if cv.facts["yellow"] else "dash"),
        road(cv, line_across(a1, 0), w1, rid=rid, centre="dash"),
    ]
    for rd, other in ((roads[0], roads[1]), (roads[1], roads[0])):  # crosswalks
        ang = math.atan2(rd.pts[-1, 1] - rd.pts[0, 1], rd.pts[-1, 0] - rd.pts[0, 0])
        for sgn in (1, -1):
            c = CENTRE + sgn * np.array([math.cos(ang), math.sin(ang)]) * (other.width / 2 + 5)
            for k in np.linspace(-rd.width / 2 + 2, rd.width / 2 - 2, 5):
                cv.mark(
                    place(rect(6, 1.6), *(c + np.array([-math.sin(ang), math.cos(ang)]) * k), ang), WHITE, 200
                )
    cv.layout_done()
    n = int(rng.choice([0, randint(cv, 1, 4), randint(cv, 5, 12)], p=[0.15, 0.5, 0.35]))
    for i, rd in enumerate(roads):
        cars_on(cv, rd, n // 2 + (n % 2 if i == 0 else 0), trucks=1 if maybe(cv, 0.15) else 0)
    corners_with = None
    if maybe(cv, 0.6):
        if corner == "pavement":
            corners_with = "building"
            scatter(
                cv,
                randint(cv, 2, 5),
                lambda x, y: O.building(rng, x, y, rng.uniform(30, 60), rng.uniform(25, 50), a0),
                ("pavement",),
                min_inside=0.6,
            )
        else:
            corners_with = "house"
            scatter(cv, randint(cv, 2, 8), lambda x, y: O.house(rng, x, y, a0), (corner,))
    if corner in ("grass", "soil") and maybe(cv, 0.5):
        trees_near(cv, randint(cv, 2, 8), on=(corner,))
    cv.facts.update(road=True, n_roads=2, road_shape="straight", corners_with=corners_with, axis=a0, axis2=a1)


def mobilehomepark(cv: Canvas) -> None:
    rng = cv.rng
    ground = str(rng.choice(["grass", "soil", "pavement"], p=[0.5, 0.3, 0.2]))
    base(cv, ground)
    a0 = grid_angle(cv)
    spacing = rng.uniform(58, 72)
    streets = []
    for s in np.arange(-130, 130, spacing) + rng.uniform(0, spacing):
        if abs(s) < 125:
            streets.append(
                road(
                    cv,
                    line_across(a0, s),
                    rng.uniform(8, 10),
                    centre=None,
                    colour="dark gray" if ground == "pavement" else None,
                )
            )
    cv.layout_done()
    perpendicular = maybe(cv, 0.5)
    limit = randint(cv, 12, 28)
    homes = []
    colour = None if maybe(cv, 0.5) else "white"
    per_street = math.ceil(limit / max(1, len(streets)))
    for i in rng.permutation(len(streets)):
        st = streets[int(i)]
        cap = min(per_street, limit - len(homes))
        if perpendicular:
            homes += along(
                cv,
                st.pts,
                st.width / 2 + 18,
                rng.uniform(15, 17),
                lambda x, y, a: O.mobile_home(rng, x, y, a + math.pi / 2, colour),
                (ground,),
                limit=cap,
                jitter=1,
            )
        else:
            homes += along(
                cv,
                st.pts,
                st.width / 2 + 10,
                rng.uniform(35, 38),
                lambda x, y, a: O.mobile_home(rng, x, y, a, colour),
                (ground,),
                limit=cap,
                jitter=1,
            )
    trees = (
        scatter(cv, randint(cv, 0, 6), lambda x, y: O.tree(rng, x, y, rng.uniform(5, 9)), (ground,))
        if ground != "pavement"
        else 0
    )
    if maybe(cv, 0.5):
        for st in streets:
            cars_on(cv, st, randint(cv, 0, 2))
    cv.facts.update(
        road=len(streets) > 0,
        n_roads=len(streets),
        road_shape="straight",
        ground=ground,
        axis=a0,
        in_rows=len(homes) > 3,
        trees=trees,
    )


def overpass(cv: Canvas) -> None:
    rng = cv.rng
    ground = str(rng.choice(["grass", "soil", "chaparral"], p=[0.55, 0.3, 0.15]))
    base(cv, ground)
    a0 = grid_angle(cv)
    a1 = a0 + rng.uniform(0.9, 2.2)
    pave = cv.region("pavement")
    lower = road(
        cv, line_across(a0, rng.uniform(-30, 30)), rng.uniform(20, 30), rid=pave, centre="dash", edges=True
    )
    upper_curved = maybe(cv, 0.3)
    upper_pts = curve_across(rng, a1, 25) if upper_curved else line_across(a1, rng.uniform(-30, 30))
    bridge = cv.region("pavement", colour="light gray")
    upper = road(cv, upper_pts, rng.uniform(16, 24), rid=bridge, centre="dash")
    # the bridge's barriers and the shadow it throws on the road below
    cv.line(offset(upper.pts, upper.width / 2), (215, 215, 210), 1.6)
    cv.line(offset(upper.pts, -upper.width / 2), (215, 215, 210), 1.6)
    cv.line(offset(upper.pts, upper.width / 2 + 3), (30, 30, 30), 5, alpha=110)
    ramp = maybe(cv, 0.35)
    if ramp:
        road(
            cv,
            curve_across(rng, a0 + rng.uniform(0.3, 0.7), 35, shift=rng.uniform(25, 60)),
            rng.uniform(9, 12),
            rid=pave,
            centre=None,
        )
    cv.layout_done()
    n = int(rng.choice([0, randint(cv, 1, 4), randint(cv, 5, 12)], p=[0.1, 0.5, 0.4]))
    cars_on(cv, lower, n - n // 3, trucks=1 if maybe(cv, 0.3) else 0, lanes=2)
    cars_on(cv, upper, n // 3)
    if ground != "chaparral" and maybe(cv, 0.5):
        trees_near(cv, randint(cv, 2, 10), on=(ground,))
    cv.facts.update(
        road=True,
        n_roads=2,
        road_shape="curved" if upper_curved else "straight",
        ramp=ramp,
        ground=ground,
        axis=a0,
        axis2=a1,
    )


def parkinglot(cv: Canvas) -> None:
    rng = cv.rng
    base(cv, "pavement")
    a0 = grid_angle(cv)
    islands = maybe(cv, 0.45)
    if islands:
        for s in rng.uniform(-110, 110, randint(cv, 1, 2)):
            rid = cv.region("grass")
            cv.band(rid, line_across(a0, s), rng.uniform(8, 14))
    building_edge = maybe(cv, 0.4)
    cv.layout_done()
    if building_edge:
        d = a0 + float(rng.choice([0.5, 1.5])) * math.pi
        cx, cy = CENTRE + np.array([math.cos(d), math.sin(d)]) * rng.uniform(100, 120)
        cv.try_add(
            O.building(rng, cx, cy, rng.uniform(100, 180), rng.uniform(40, 60), a0),
            ("pavement", "grass"),
            min_inside=0.4,
        )
    # stall rows: pairs of rows back to back, stall width ~ 11 units
    fill = rng.uniform(0.25, 1.0)
    stall_w, stall_l = rng.uniform(10, 12), rng.uniform(20, 24)
    cap = randint(cv, 8, 30)
    for v in np.arange(-140, 140, 2 * stall_l + 26) + rng.uniform(0, 20):
        for side in (-1, 1):
            row_c = v + side * stall_l / 2
            for u in np.arange(-140, 140, stall_w):
                p = rotate(np.array([[u, v], [u, v + side * stall_l]]), a0) + CENTRE
                cv.line(p, WHITE, 0.8, alpha=210)
                if cv.count("car") < cap and maybe(cv, fill):
                    c = rotate(np.array([[u + stall_w / 2, row_c]]), a0)[0] + CENTRE
                    cv.try_add(
                        O.car(
                            rng,
                            c[0],
                            c[1],
                            a0 + math.pi / 2 + (math.pi if side < 0 else 0),
                            length=stall_l * rng.uniform(0.62, 0.78),
                        ),
                        ("pavement",),
                        min_inside=0.9,
                    )
    trees = 0
    if islands and maybe(cv, 0.6):
        trees = trees_near(cv, randint(cv, 2, 8), on=("grass",), r=(5, 9))
    cars = cv.count("car")
    cv.facts.update(
        axis=a0,
        fullness="full" if fill > 0.8 and cars >= 10 else ("empty" if fill < 0.45 else None),
        islands=islands,
        trees=trees,
    )


def river(cv: Canvas) -> None:
    rng = cv.rng
    bank = str(rng.choice(["forest", "grass", "soil", "field"], p=[0.4, 0.3, 0.15, 0.15]))
    base(cv, bank)
    a0 = rng.uniform(0, math.pi)
    curved = maybe(cv, 0.65)
    pts = curve_across(rng, a0, 70 if curved else 8, shift=rng.uniform(-30, 30))
    width = rng.uniform(28, 64)
    other = None
    if maybe(cv, 0.4):
        other = str(rng.choice([b for b in ("forest", "grass", "soil") if b != bank]))
        cv.poly(cv.region(other), side_poly(offset(pts, width / 2 + rng.uniform(5, 30)), side=1))
    sandbar = maybe(cv, 0.25)
    if sandbar:
        q = pts[len(pts) // 2 + randint(cv, -6, 6)]
        sand = cv.region("sand")
        cv.poly(sand, place(blob(width * 0.55, rng, stretch=1.8), q[0], q[1], a0))
    water = cv.region("water")
    cv.band(water, pts, width)
    bridge = None
    if maybe(cv, 0.15):
        bridge = road(
            cv, line_across(a0 + math.pi / 2 + rng.normal(0, 0.2), rng.uniform(-60, 60)), rng.uniform(10, 14)
        )
    cv.layout_done()
    trees = 0
    open_banks = [b for b in (bank, other) if b in ("grass", "soil", "field")]
    if open_banks and maybe(cv, 0.6):
        trees = len(
            along(
                cv,
                pts,
                width / 2 + rng.uniform(9, 16),
                rng.uniform(14, 28),
                lambda x, y, a: O.tree(rng, x, y),
                tuple(open_banks),
                limit=randint(cv, 2, 12),
                jitter=4,
            )
        )
    if bridge is not None and maybe(cv, 0.5):
        cars_on(cv, bridge, randint(cv, 1, 3))
    if maybe(cv, 0.15):
        scatter(cv, randint(cv, 1, 3), lambda x, y: O.boat(rng, x, y, a0 + rng.normal(0, 0.3)), ("water",))
    cv.facts.update(
        river_shape="curved" if curved else "straight",
        bank=bank,
        other_bank=other,
        axis=a0,
        sandbar=sandbar,
        bridge=bridge is not None,
        trees_along=trees > 0,
        road=bridge is not None,
        river_width="wide" if width > 48 else "narrow",
    )


def runway(cv: Canvas) -> None:
    rng = cv.rng
    ground = "grass" if maybe(cv, 0.7) else "soil"
    base(cv, ground)
    a0 = grid_angle(cv) if maybe(cv, 0.7) else rng.uniform(0, math.pi)
    pave = cv.region("pavement", colour=str(rng.choice(["gray", "dark gray", "light gray"])))
    W = rng.uniform(34, 52)
    shift = rng.uniform(-30, 30)
    rw = road(cv, line_across(a0, shift), W, rid=pave, centre=None)
    cv.line(line_across(a0, shift), WHITE, 1.4, dash=(14, 10))
    cv.line(offset(rw.pts, W / 2 - 2), WHITE, 1.0)
    cv.line(offset(rw.pts, -W / 2 + 2), WHITE, 1.0)
    threshold = maybe(cv, 0.5)
    if threshold:  # piano keys across the runway near one end
        u = rng.uniform(-60, 60)
        for k in np.linspace(-W / 2 + 4, W / 2 - 4, 8):
            cv.mark(
                place(rect(22, 2.2), *(rotate(np.array([[u, k + shift]]), a0)[0] + CENTRE), a0), WHITE, 235
            )
    taxiway = maybe(cv, 0.5)
    if taxiway:
        ts = shift + float(rng.choice([-1, 1])) * (W / 2 + rng.uniform(25, 45))
        road(cv, line_across(a0, ts), rng.uniform(12, 18), rid=pave, centre=None)
        cv.line(line_across(a0, ts), YELLOW, 1.0)
        for u in rng.uniform(-100, 100, randint(cv, 1, 2)):
            conn = rotate(np.array([[u, shift], [u + 20, ts]]), a0) + CENTRE
            cv.band(pave, conn, 12)
    n_runways = 1
    if maybe(cv, 0.15):
        n_runways = 2
        road(
            cv,
            line_across(a0 + rng.uniform(0.4, 0.9), rng.uniform(-40, 40)),
            W * 0.8,
            rid=pave,
            centre="dash",
        )
    cv.layout_done()
    if maybe(cv, 0.1):
        cv.try_add(
            O.airplane(
                rng,
                *(rotate(np.array([[rng.uniform(-60, 60), shift]]), a0)[0] + CENTRE),
                a0,
                length=rng.uniform(40, 60),
            ),
            ("pavement",),
            min_inside=0.9,
        )
    cv.facts.update(
        road=False, threshold=threshold, taxiway=taxiway, n_runways=n_runways, ground=ground, axis=a0
    )


def storagetanks(cv: Canvas) -> None:
    rng = cv.rng
    ground = str(rng.choice(["soil", "pavement", "grass"], p=[0.4, 0.4, 0.2]))
    base(cv, ground)
    a0 = grid_angle(cv)
    rd = None
    if maybe(cv, 0.5):
        rd = road(
            cv,
            line_across(a0, float(rng.choice([-1, 1])) * rng.uniform(70, 105)),
            rng.uniform(9, 13),
            centre=None,
            colour="dark gray" if ground == "pavement" else None,
        )
    if ground != "grass" and maybe(cv, 0.3):
        patch(cv, "grass", rng.uniform(30, 226), rng.uniform(30, 226), rng.uniform(18, 30))
    cv.layout_done()
    grid = maybe(cv, 0.6)
    colour = None if maybe(cv, 0.5) else "white"
    if grid:
        r = rng.uniform(9, 22)
        pitch = 2 * r + rng.uniform(5, 14)
        rows, cols = randint(cv, 1, 3), randint(cv, 2, 4)
        ox, oy = rng.uniform(-20, 20), rng.uniform(-20, 20)
        for i in range(rows):
            for j in range(cols):
                c = (
                    rotate(
                        np.array([[(j - (cols - 1) / 2) * pitch + ox, (i - (rows - 1) / 2) * pitch + oy]]), a0
                    )[0]
                    + CENTRE
                )
                cv.try_add(
                    O.tank(rng, c[0], c[1], r * rng.uniform(0.97, 1.03), colour),
                    (ground, "grass"),
                    min_inside=0.85,
                )
    else:
        scatter(
            cv,
            randint(cv, 2, 9),
            lambda x, y: O.tank(rng, x, y, None, colour),
            (ground, "grass"),
            min_inside=0.85,
        )
    if maybe(cv, 0.4):
        scatter(
            cv,
            randint(cv, 1, 3),
            lambda x, y: O.building(rng, x, y, rng.uniform(26, 60), rng.uniform(20, 40), a0),
            (ground, "grass"),
            min_inside=0.6,
        )
    if rd is not None and maybe(cv, 0.5):
        cars_on(cv, rd, randint(cv, 1, 3), trucks=randint(cv, 0, 1))
    cv.facts.update(
        tanks_grid=grid and cv.count("tank") >= 4, road=rd is not None, ground=ground, road_shape="straight"
    )


def tenniscourt(cv: Canvas) -> None:
    rng = cv.rng
    ground = str(rng.choice(["grass", "pavement"], p=[0.6, 0.4]))
    base(cv, ground)
    a0 = grid_angle(cv)
    rd = None
    if maybe(cv, 0.4):
        rd = road(
            cv,
            line_across(
                a0 + float(rng.choice([0, math.pi / 2])), float(rng.choice([-1, 1])) * rng.uniform(85, 110)
            ),
            rng.uniform(10, 14),
            colour="dark gray" if ground == "pavement" else None,
        )
    cv.layout_done()
    n = int(rng.choice([1, 2, 3, 4], p=[0.3, 0.35, 0.2, 0.15]))
    kind = "tennis" if maybe(cv, 0.85) else "basketball"
    L = rng.uniform(46, 60) if kind == "tennis" else rng.uniform(34, 46)
    colour = None if maybe(cv, 0.4) else O.object_colour(rng, "court")[0]
    pitch = L * 0.48 + rng.uniform(3, 8) if kind == "tennis" else L * 0.55 + rng.uniform(4, 10)
    ox, oy = rng.uniform(-25, 25), rng.uniform(-25, 25)
    for i in range(n):
        c = rotate(np.array([[ox, oy + (i - (n - 1) / 2) * pitch]]), a0)[0] + CENTRE
        cv.try_add(O.court(rng, c[0], c[1], a0, kind, colour, L), (ground,), min_inside=0.85)
    trees = 0
    if ground == "grass" and maybe(cv, 0.6):
        trees = around(
            cv,
            cv.of("court"),
            randint(cv, 2, 10),
            lambda x, y: O.tree(rng, x, y),
            (L * 0.6, L * 1.3),
            ("grass",),
        )
    if maybe(cv, 0.35):
        scatter(
            cv,
            randint(cv, 1, 3),
            lambda x, y: O.building(rng, x, y, rng.uniform(28, 56), rng.uniform(22, 40), a0),
            (ground,),
            min_inside=0.6,
        )
    if rd is not None and maybe(cv, 0.5):
        cars_on(cv, rd, randint(cv, 1, 4))
    if ground == "pavement" and maybe(cv, 0.35):
        rows_of_cars(cv, a0, randint(cv, 1, 6))
    cv.facts.update(
        court_kind=kind, trees_around=trees > 0, road=rd is not None, ground=ground, road_shape="straight"
    )


COMPOSERS: dict[str, Callable[[Canvas], None]] = {
    "agricultural": agricultural,
    "airplane": airplane,
    "baseballdiamond": baseballdiamond,
    "beach": beach,
    "buildings": buildings,
    "chaparral": chaparral,
    "denseresidential": lambda cv: residential(cv, "dense"),
    "forest": forest,
    "freeway": freeway,
    "golfcourse": golfcourse,
    "harbor": harbor,
    "intersection": intersection,
    "mediumresidential": lambda cv: residential(cv, "medium"),
    "mobilehomepark": mobilehomepark,
    "overpass": overpass,
    "parkinglot": parkinglot,
    "river": river,
    "runway": runway,
    "sparseresidential": lambda cv: residential(cv, "sparse"),
    "storagetanks": storagetanks,
    "tenniscourt": tenniscourt,
}
