"""Caption grammar: five UCM-style sentences per picture, each stating facts true of *that* picture.

Facts come from what the renderer actually put there: object counts (from the accepted boxes), object and
surface colours, which surfaces are visible, and the composer's notes (road shape, arrangement, relations).
Counts are said with fixed words (``count_words``): one/two/three/four/five, "several" for 6-9 and
"many"/"lots of" for 10 or more; "a"/"an" only for exactly one. Surfaces are never counted.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from captioning.data.synth.canvas import Canvas
from captioning.data.synth.concepts import CONCEPTS

NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
# what each count word means: word -> (min, max) count of the objects it counts
COUNT_WORDS: dict[str, tuple[int, float]] = {
    "a": (1, 1), "an": (1, 1), "one": (1, 1), "two": (2, 2), "three": (3, 3), "four": (4, 4), "five": (5, 5),
    "several": (6, 9), "many": (10, math.inf), "lots": (10, math.inf),
}  # fmt: skip
# caption nouns of the boxed concepts (singular and plural) -> concept
OBJECT_NOUNS: dict[str, str] = {}
for _c in CONCEPTS.values():
    if _c.boxed:
        OBJECT_NOUNS[_c.name.split()[-1]] = _c.name
        OBJECT_NOUNS[_c.plural.split()[-1]] = _c.name
# words that may stand between a count word and its noun
ADJECTIVES = {
    "white", "gray", "black", "red", "blue", "green", "yellow", "brown", "orange", "beige", "turquoise", "light",
    "dark", "and", "colorful", "large", "small", "big", "little", "long", "short", "tall", "round", "storage",
    "tennis", "basketball", "baseball", "mobile", "sand", "neat", "parked", "moored", "of",
}  # fmt: skip
# caption words that claim a label is in the picture
LABEL_WORDS: dict[str, str] = {
    **{w: "airplane" for w in ("airplane", "airplanes", "plane", "planes")},
    **{w: "cars" for w in ("car", "cars", "truck", "trucks", "vehicles")},
    **{w: "buildings" for w in ("building", "buildings", "house", "houses")},
    **{w: "tanks" for w in ("tank", "tanks")},
    **{w: "ship" for w in ("ship", "ships", "boat", "boats")},
    **{w: "court" for w in ("court", "courts")},
    **{w: "dock" for w in ("dock", "docks", "pier", "piers")},
    **{w: "trees" for w in ("tree", "trees", "forest", "woods")},
    **{w: "grass" for w in ("grass", "lawn", "lawns", "meadow", "fairway")},
    **{w: "water" for w in ("water", "river", "pond", "ponds", "stream")},
    **{w: "sea" for w in ("sea", "ocean", "waves")},
    **{w: "sand" for w in ("sand", "beach", "bunker", "bunkers")},
    **{w: "bare-soil" for w in ("soil", "dirt")},
    **{w: "field" for w in ("field", "fields", "farmland", "crops")},
    **{w: "chaparral" for w in ("chaparral", "shrubs", "bushes")},
    **{w: "pavement" for w in ("road", "roads", "street", "streets", "freeway", "highway", "runway", "runways",
                               "pavement", "taxiway", "parking", "bridge", "crossroads", "quay")},
    "homes": "mobile-home",
}  # fmt: skip

SCENE_COLOURS = {"dark gray": "dark gray", "light gray": "light gray", "gray": "gray"}


def count_word(n: int, rng: np.random.Generator) -> str:
    if n <= 0:
        raise ValueError("nothing to count")
    if n == 1:
        return str(rng.choice(["a", "one"]))
    if n <= 5:
        return NUMBERS[n]
    if n <= 9:
        return "several"
    return str(rng.choice(["many", "lots of"]))


def axis_words(angle: float) -> str:
    """How a line at ``angle`` (radians, image coordinates) runs across the picture."""
    a = angle % math.pi
    if a < 0.4 or a > math.pi - 0.4:
        return "horizontally"
    if abs(a - math.pi / 2) < 0.4:
        return "vertically"
    return "diagonally"


SIDES = (
    "on the right side",
    "in the lower right part",
    "at the bottom",
    "in the lower left part",
    "on the left side",
    "in the upper left part",
    "at the top",
    "in the upper right part",
)


def side_words(angle: float) -> str:
    """Where the direction ``angle`` from the picture centre points to: 'at the top', 'on the left side' ..."""
    return SIDES[int(((angle + math.pi / 8) % (2 * math.pi)) // (math.pi / 4)) % 8]


def where_words(box, size: float) -> str:
    """Where a box's centre lies, in thirds of the picture: 'in the upper left corner', 'in the middle' ..."""
    cx, cy = (box[0] + box[2]) / 2 / size, (box[1] + box[3]) / 2 / size
    col, row = min(int(cx * 3), 2), min(int(cy * 3), 2)
    return {
        (0, 0): "in the upper left corner", (1, 0): "at the top", (2, 0): "in the upper right corner",
        (0, 1): "on the left", (1, 1): "in the middle", (2, 1): "on the right",
        (0, 2): "in the lower left corner", (1, 2): "at the bottom", (2, 2): "in the lower right corner",
    }[(col, row)]  # fmt: skip


def merge_shades(names) -> list[str]:
    """Distinct colour names, with shades of one colour said once: {dark green, green} -> [green]."""
    names = set(names)
    hues = {n.split()[-1] for n in names}
    out = []
    for hue in sorted(hues):
        shades = sorted(n for n in names if n.split()[-1] == hue)
        out.append(shades[0] if len(shades) == 1 else hue)
    return out


def fix_articles(text: str) -> str:
    words = text.split()
    for i in range(len(words) - 1):
        if words[i].lower() == "a" and words[i + 1][0] in "aeiou":
            words[i] = words[i][0] + "n" if words[i] == "A" else "an"
    return " ".join(words)


class Facts:
    """What is true of one picture, in the words captions use."""

    def __init__(self, scene: str, cv: Canvas, visible: dict[str, float], rng: np.random.Generator):
        self.scene = scene
        self.cv = cv
        self.f = cv.facts
        self.rng = rng
        self.visible = visible
        self.counts = Counter(o.concept for o in cv.objects)
        self.colours: dict[str, list[str]] = {}
        for o in cv.objects:
            self.colours.setdefault(o.concept, []).append(o.colour)
        # colour of each surface = colour of its largest region; all colours of visible field plots
        shares = np.bincount(cv.region_map.ravel(), minlength=len(cv.regions)) / cv.region_map.size
        self.region_shares = shares
        best: dict[str, tuple[float, str]] = {}
        self.plot_colours: list[str] = []
        self.plots = 0
        for rid in range(1, len(cv.regions)):
            reg = cv.regions[rid]
            if shares[rid] <= 0:
                continue
            if reg.concept not in best or shares[rid] > best[reg.concept][0]:
                best[reg.concept] = (shares[rid], reg.colour)
            if reg.concept == "field" and shares[rid] >= 0.02:
                self.plots += 1
                self.plot_colours.append(reg.colour)
        self.surface_colour = {c: v[1] for c, v in best.items()}

    # -- questions
    def n(self, concept: str) -> int:
        return self.counts.get(concept, 0)

    def has(self, surface: str) -> bool:
        return surface in self.visible

    def choice(self, options):
        return options[int(self.rng.integers(len(options)))]

    def maybe(self, p: float = 0.5) -> bool:
        return bool(self.rng.random() < p)

    # -- words
    def colour(self, concept: str) -> str | None:
        """One colour phrase for all objects of a concept: "white", "white and red", "colorful" or None."""
        names = merge_shades(self.colours.get(concept, []))
        if len(names) == 1:
            return names[0]
        if len(names) == 2:
            return f"{names[0]} and {names[1]}"
        if len(names) >= 3 and concept in ("car", "boat", "house", "building", "truck", "ship"):
            return "colorful"
        return None

    def np(
        self,
        concept: str,
        *,
        colour: bool | None = None,
        adj: str | None = None,
        mod: str | None = None,
        count: bool = True,
    ) -> str:
        """'two large white airplanes', 'a red car', 'three white storage tanks': count, ``adj`` (size),
        colour (said with probability 0.6 unless ``colour`` is given), ``mod`` (noun modifier), noun."""
        n = self.n(concept)
        c = CONCEPTS[concept]
        noun = c.name if n == 1 else c.plural
        words = [count_word(n, self.rng)] if count else []
        if adj:
            words.append(adj)
        col = self.colour(concept)
        if col and (colour if colour is not None else self.maybe(0.6)):
            words.append(col)
        if mod:
            words.append(mod)
        words.append(noun)
        return " ".join(words)

    def be(self, concept: str) -> str:
        return "is" if self.n(concept) == 1 else "are"

    def it(self, concept: str) -> str:
        return "it" if self.n(concept) == 1 else "them"

    def noun(self, concept: str) -> str:
        return CONCEPTS[concept].name if self.n(concept) == 1 else CONCEPTS[concept].plural

    def where(self, concept: str) -> str:
        """Position of the only object of a concept, 'in the upper left corner of the picture'."""
        (obj,) = self.cv.of(concept)
        return where_words(obj.box, self.cv.size) + " of the picture"

    def axis(self, key: str = "axis") -> str:
        return axis_words(self.f[key])

    def only(self, *surfaces: str) -> bool:
        """True when no other surface than these is visible."""
        return set(self.visible) <= set(surfaces)

    def sc(self, surface: str) -> str:
        """The colour word(s) of a surface."""
        return self.surface_colour.get(surface, "")

    def ground(self) -> str:
        """The main ground surface in words: 'green grass', 'bare soil', 'gray pavement' ..."""
        return self.surface_words(self.f.get("ground", "grass"))

    def surface_words(self, s: str) -> str:
        col = self.sc(s)
        return {
            "grass": f"{col} grass", "soil": "bare soil", "chaparral": "chaparral", "pavement": f"{col} pavement",
            "field": "farmland", "forest": f"{col} forest", "sand": f"{col} sand", "water": f"{col} water",
            "sea": f"{col} sea",
        }[s]  # fmt: skip

    def cars_np(self) -> str | None:
        """Cars and trucks together: 'three cars and a truck'."""
        parts = [self.np(c) for c in ("car", "truck") if self.n(c)]
        return " and ".join(parts) if parts else None


# ---------------------------------------------------------------------------------------- per class


def _agricultural(F: Facts) -> list[str]:
    cols = merge_shades(F.plot_colours)
    colour_words = " and ".join(cols[:2]) if cols else ""
    out = []
    if F.plots >= 2:
        out += [
            f"There are {count_word(F.plots, F.rng)} pieces of {colour_words} farmland",
            f"The farmland is divided into {count_word(F.plots, F.rng)} neat plots with crops in rows",
            f"{count_word(F.plots, F.rng)} rectangular fields are arranged side by side in the farmland",
        ]
    else:
        out += [f"There is a large piece of {colour_words} farmland with crops in rows"]
    out += [
        f"It is a piece of farmland with {colour_words} crops in straight rows",
        f"Many crops are planted in neat rows on the {colour_words} fields",
        f"The {colour_words} fields are full of crops planted in lines",
    ]
    if len(cols) >= 2:
        out.append(f"Some fields are {cols[0]} while the others are {cols[1]}")
    if F.has("soil"):
        out.append(f"A piece of {F.sc('soil')} bare soil lies beside the {colour_words} fields")
    if F.f.get("road") and F.has("pavement"):
        out.append(f"A straight road passes between the {colour_words} fields")
        if F.n("car"):
            out.append(f"{F.np('car')} {F.be('car')} on the road between the fields")
    if F.n("tree"):
        if F.f.get("tree_row"):
            out.append(f"{F.np('tree')} {F.be('tree')} planted in a row along the edge of the fields")
        else:
            out.append(f"{F.np('tree')} {F.be('tree')} beside the fields")
    if F.n("house"):
        out.append(f"{F.np('house')} {F.be('house')} next to the farmland")
    if F.f.get("road") and F.has("pavement"):
        out.append(f"A road runs {F.axis()} across the picture between the fields")
    axes = {
        axis_words(F.cv.regions[r].params["rows"][0])
        for r in range(1, len(F.cv.regions))
        if F.cv.regions[r].concept == "field" and F.region_shares[r] >= 0.02
    }
    if len(axes) == 1:
        out.append(f"The crop rows in the fields all run {axes.pop()}")
    elif len(axes) > 1:
        out.append("The crops are planted in rows of different directions")
    if F.plots >= 2 and len(cols) >= 2:
        out.append(f"The farmland looks like a patchwork of {colour_words} plots")
    return out


def _airplane(F: Facts) -> list[str]:
    n = F.n("airplane")
    if n == 0:
        return _fallback(F)
    big = max(o.attrs["length"] for o in F.cv.of("airplane"))
    size = "large" if big > 70 else ("small" if big < 50 else None)
    be = F.be("airplane")
    ground = F.sc("pavement")
    out = [
        f"There {be} {F.np('airplane')} at the airport",
        f"There {be} {F.np('airplane')} on the {ground} apron at the airport",
        f"{F.np('airplane')} {be} stopped at the airport and the ground is {ground}",
        f"{F.np('airplane', colour=True)} {be} parked on the {ground} apron of the airport",
        f"An airport with {F.np('airplane')} parked on the {ground} ground",
    ]
    if size and n == 1:
        out.append(f"A {size} {F.colour('airplane')} airplane is stopped at the airport")
    if F.f.get("cars_beside_planes") and F.cars_np():
        out.append(
            f"{F.np('airplane')} {be} stopped at the airport with {F.cars_np()} beside {F.it('airplane')}"
        )
        out.append(
            f"{F.cars_np()} {'is' if F.n('car') == 1 else 'are'} parked beside the {F.noun('airplane')}"
        )
    if F.f.get("in_row"):
        out.append(f"{F.np('airplane')} {be} parked in a row on the apron")
    if F.f.get("terminal"):
        out.append(f"{F.np('airplane')} {be} parked near the terminal of the airport")
    if F.has("grass"):
        out.append(f"{F.np('airplane')} {be} on the apron next to some {F.sc('grass')} grass")
    if F.has("soil"):
        out.append(f"{F.np('airplane')} {be} stopped near a piece of bare soil")
    if F.f.get("taxi_lines"):
        out.append(f"Yellow lines are painted on the ground near the {F.noun('airplane')}")
    if n == 1:
        out.append(f"{F.np('airplane')} is parked {F.where('airplane')}")
    out.append(f"{F.np('airplane')} {be} waiting on the {ground} tarmac of the airport")
    return out


def _baseballdiamond(F: Facts) -> list[str]:
    n = F.n("diamond")
    if n == 0:
        return _fallback(F)
    be = F.be("diamond")
    out = [
        f"There {be} {F.np('diamond', mod='baseball', colour=False)} on the {F.sc('grass')} lawn",
        f"{F.np('diamond', mod='baseball', colour=False)} {be} surrounded by the {F.sc('grass')} grass of the park",
        f"The infield of the baseball {F.noun('diamond')} is {F.colour('diamond')} dirt with white lines",
        f"The picture shows {F.np('diamond', mod='baseball', colour=False)} with {F.colour('diamond')} dirt and green grass",
    ]
    if F.f.get("trees_around") and F.n("tree"):
        out.append(f"{F.np('diamond', mod='baseball', colour=False)} {be} surrounded by {F.np('tree')}")
        out.append(f"{F.np('tree')} {F.be('tree')} around the baseball {F.noun('diamond')}")
    if F.f.get("road") and F.has("pavement"):
        if F.cars_np():
            out.append(f"A road with {F.cars_np()} runs beside the baseball {F.noun('diamond')}")
        else:
            out.append(f"A road runs beside the baseball {F.noun('diamond')} on the lawn")
    if F.f.get("lot") and F.n("car"):
        out.append(f"A parking lot with {F.np('car')} is next to the baseball {F.noun('diamond')}")
    if F.n("building"):
        out.append(f"{F.np('building')} {F.be('building')} near the baseball {F.noun('diamond')}")
    if n == 1:
        out.append(f"A baseball diamond is located {F.where('diamond')}")
    if F.f.get("road") and F.has("pavement"):
        out.append(f"A road runs {F.axis()} past the lawn of the baseball {F.noun('diamond')}")
    return out


def _beach(F: Facts) -> list[str]:
    sea = F.sc("sea")
    sand = F.sc("sand")
    out = []
    if F.has("sea") and F.has("sand"):
        out += [
            f"The {sea} sea is next to the {sand} beach",
            f"Many white waves are on the {sea} sea beside the beach",
            f"There is a {F.f['coast']} coastline between the {sea} sea and the {sand} sand",
            f"Waves of the {sea} ocean wash the {sand} sand of the beach",
            f"It is a {sand} beach beside the {sea} sea with white waves",
        ]
    elif F.has("sea"):
        out += [
            f"The {sea} sea with many white waves is near the coast",
            f"White waves roll on the {sea} sea",
        ]
    behind = F.f.get("behind")
    if behind and F.has(behind) and F.has("sand"):
        out.append(f"The beach lies between the {sea} sea and the {F.surface_words(behind)}")
    if F.n("boat"):
        out.append(f"{F.np('boat')} {F.be('boat')} sailing on the {sea} sea near the coast")
    if F.n("house"):
        out.append(f"{F.np('house')} {F.be('house')} behind the beach near the sea")
    if F.f.get("road") and F.has("pavement"):
        out.append("A road runs along the coast behind the beach")
    if F.n("tree"):
        out.append(f"{F.np('tree')} {F.be('tree')} growing near the {sand} sand")
    if F.n("car"):
        out.append(f"{F.np('car')} {F.be('car')} driving on the road along the coast")
    if F.has("sea"):
        out.append(
            f"The sea is {side_words(F.f['to_sea'])} of the picture and the beach is beside it"
            if F.has("sand")
            else f"The sea is {side_words(F.f['to_sea'])} of the picture"
        )
        out.append(
            f"The coastline runs {F.axis()} across the picture between the sand and the sea"
            if F.has("sand")
            else f"The coastline runs {F.axis()} across the picture"
        )
        out.append("White foam lines the edge of the sea along the shore")
    return out


def _buildings(F: Facts) -> list[str]:
    if F.n("building") == 0:
        return _fallback(F)
    nb = F.n("building")
    be = F.be("building")
    roofs = F.colour("building")
    out = [
        f"There {be} {F.np('building')} in the commercial area",
        f"{F.np('building', colour=False, adj='large' if nb <= 4 else None)} {be} beside the busy roads",
        f"It is a crowded area with {F.np('building')} and some roads",
    ]
    if roofs:
        out.append(f"{F.np('building', colour=False)} with {roofs} roofs {be} in the city")
    if F.cars_np():
        out.append(
            f"{F.cars_np()} {'is' if F.n('car') + F.n('truck') == 1 else 'are'} on the roads beside the {F.noun('building')}"
        )
        out.append(
            f"It is a busy area with {F.np('building')} and {F.np('car')}"
            if F.n("car")
            else f"A road with {F.cars_np()} passes the {F.noun('building')}"
        )
    nr = F.f.get("n_roads", 0)
    if nr:
        out.append(
            f"{count_word(nr, F.rng)} {'road goes' if nr == 1 else 'roads go'} between the {F.noun('building')} in the city"
        )
    if F.has("grass"):
        out.append(f"{F.np('building')} and some {F.sc('grass')} lawns are near the roads")
    if F.n("tree"):
        out.append(f"{F.np('tree')} {F.be('tree')} planted beside the {F.noun('building')}")
    if not F.f.get("cross_street") and F.has("pavement"):
        out.append(
            f"The {'road runs' if F.f['n_roads'] == 1 else 'roads run'} {F.axis()} between the {F.noun('building')}"
        )
    out.append(f"{F.np('building')} {be} located in the downtown area of the city")
    return out


def _chaparral(F: Facts) -> list[str]:
    density = F.f["density"]
    ground = F.sc("chaparral")
    out = [
        f"There are many {density} green shrubs on the {ground} land",
        f"It is a piece of chaparral with {density} green bushes",
        f"The {ground} land is covered with {density} shrubs",
        f"Many shrubs are scattered on the {ground} ground of the chaparral",
        f"Lots of small bushes grow on the {ground} hills",
    ]
    if F.has("soil"):
        out.append(f"Some {F.sc('soil')} bare soil is among the shrubs of the chaparral")
        if F.f.get("dirt_road"):
            out.append("A winding dirt track passes through the chaparral")
    if F.f.get("road") and F.has("pavement"):
        out.append(f"A {F.f['road_shape']} road goes across the chaparral")
    if F.n("house"):
        out.append(f"{F.np('house')} {F.be('house')} beside the road in the chaparral")
    if F.f.get("dirt_road") and F.has("soil"):
        out.append(f"A dirt track runs {F.axis('dirt_axis')} through the shrubs")
    if F.f.get("road") and F.has("pavement"):
        out.append(f"A {F.f['road_shape']} road runs {F.axis()} across the chaparral")
    out.append(f"The hills are dotted with {density} dark green shrubs")
    if F.only("chaparral"):
        out.append(f"Scrubland with {density} bushes covers the whole picture")
    return out


def _residential(F: Facts, density: str) -> list[str]:
    nh = F.n("house")
    if nh == 0:
        return _fallback(F)
    be = F.be("house")
    area = f"{density} residential area"
    roofs = F.colour("house")
    out = [
        f"There {be} {F.np('house')} in the {area}",
        f"It is a {area} with {F.np('house')}",
    ]
    if density == "dense":
        out += [
            f"{F.np('house')} {be} densely arranged on both sides of the streets",
            f"{F.np('house', colour=False)} {be} crowded together in the {area}",
        ]
    elif density == "medium":
        out += [
            f"{F.np('house')} {be} arranged along the {F.f['road_shape']} road",
            f"Some houses with {F.sc(F.f['ground'])} lawns are in the {area}"
            if F.f["ground"] == "grass" and nh > 1
            else f"{F.np('house')} {be} neatly arranged in the neighborhood",
        ]
    else:
        out += [
            f"{F.np('house')} {be} scattered on the {F.ground()}",
            f"A few houses with big yards are in the {area}"
            if 2 <= nh <= 5
            else f"{F.np('house')} {be} far from each other",
        ]
    if roofs:
        out.append(f"{F.np('house', colour=False)} with {roofs} roofs {be} in the {area}")
    if F.f.get("houses_along_road") and F.has("pavement"):
        st = "street" if F.f["n_roads"] == 1 else "streets"
        out.append(f"{F.np('house')} {be} lined along the {F.f['road_shape']} {st}")
    if F.n("tree"):
        out.append(f"{F.np('tree')} {F.be('tree')} planted around the {F.noun('house')}")
        out.append(f"It is a {area} with {F.np('house', colour=False)} and {F.np('tree')}")
    if F.n("pool"):
        out.append(f"{F.np('pool')} {F.be('pool')} beside the {F.noun('house')}")
    if F.cars_np():
        out.append(
            f"{F.cars_np()} {'is' if F.n('car') + F.n('truck') == 1 else 'are'} parked on the streets of the {area}"
        )
    if F.f["n_roads"] >= 2:
        out.append(
            f"{count_word(F.f['n_roads'], F.rng)} {'straight' if F.f['road_shape'] == 'straight' else ''} streets go through the {area}"
        )
    if not F.f.get("cross_street") and F.has("pavement"):
        st = "street runs" if F.f["n_roads"] == 1 else "streets run"
        out.append(f"The {st} {F.axis()} through the {area}")
    if F.n("tree"):
        out.append(f"The neighborhood is quiet with {F.np('house', colour=False)} and {F.np('tree')}")
    if density == "sparse" and nh >= 2 and F.f["ground"] == "grass":
        out.append("The houses are far apart from each other with large lawns in between")
    return out


def _forest(F: Facts) -> list[str]:
    col = F.sc("forest")
    out = [
        f"It is a dense forest with {col} trees",
        f"The forest is full of {col} trees growing closely together",
        f"The {col} trees of the forest are thick and dense",
        f"Tall {col} trees grow close together in the woods",
        f"The woods are dense and the trees are {col}",
    ]
    if F.f.get("clearing") == "soil" and F.has("soil"):
        out.append(f"There is a piece of {F.sc('soil')} bare soil in the dense forest")
    if F.f.get("clearing") == "grass" and F.has("grass"):
        out.append(f"A small {F.sc('grass')} meadow lies in the middle of the forest")
    if F.f.get("path") and F.has("soil"):
        out.append("A narrow dirt path winds through the dense forest")
    if F.f.get("stream") and F.has("water"):
        out.append(f"A small stream flows through the {col} forest")
    if F.f.get("path") and F.has("soil"):
        out.append(f"A dirt path runs {F.axis('path_axis')} through the trees")
    if F.f.get("stream") and F.has("water"):
        out.append(f"A stream runs {F.axis('stream_axis')} through the dense woods")
    out.append(f"The canopy of the forest is {col} and thick")
    if F.only("forest"):
        out.append(f"Dense woods with {col} trees cover the whole picture")
    return out


def _freeway(F: Facts) -> list[str]:
    shape = F.f["road_shape"]
    cars = F.cars_np()
    side = F.f["side"]
    median = {"grass": "a green belt", "soil": "bare soil", "pavement": "a gray median"}[F.f["median"]]
    if not F.has(F.f["median"]):
        median = "a narrow median"
    out = [
        f"There is a {shape} freeway with two lanes in each direction",
        f"Two {shape} roads run side by side with {median} between them",
        f"The {shape} freeway goes through the {F.surface_words(side)}"
        if F.has(side)
        else f"A {shape} freeway crosses the scene",
    ]
    if cars:
        out.append(f"There is a {shape} freeway with {cars} on it")
        out.append(
            f"{cars} {'is' if F.n('car') + F.n('truck') == 1 else 'are'} driving on the {shape} freeway"
        )
    else:
        out.append(f"There are no cars on the {shape} freeway")
        out.append(f"The {shape} freeway is empty and {median} divides it")
    if F.f.get("trees_along") and F.n("tree"):
        out.append(f"{F.np('tree')} {F.be('tree')} growing along the freeway")
    if F.f.get("ramp"):
        out.append("A ramp joins the freeway from one side")
    if F.n("house"):
        out.append(f"{F.np('house')} {F.be('house')} beside the {shape} freeway")
    out.append(f"The {shape} freeway runs {F.axis()} across the picture")
    out.append(f"The {shape} highway is divided by {median} in the middle")
    out.append("White dashed lines separate the lanes of the freeway")
    return out


def _golfcourse(F: Facts) -> list[str]:
    out = [
        f"It is a golf course with {F.sc('grass')} grass and a light green fairway",
        "The golf course has a light green fairway with mowing stripes",
    ]
    if F.n("tree") and F.n("bunker"):
        out.append(f"It is a golf course with {F.np('tree')} and {F.np('bunker', mod='sand')}")
    if F.n("bunker"):
        out.append(f"{F.np('bunker', mod='sand', colour=False)} {F.be('bunker')} on the green golf course")
    if F.n("pond"):
        out.append(f"There {F.be('pond')} {F.np('pond')} on the golf course")
        out.append(
            f"{F.np('pond')} and {F.np('bunker', mod='sand')} are on the golf course"
            if F.n("bunker")
            else f"The golf course has {F.np('pond')} and green grass"
        )
    if F.n("tree"):
        out.append(f"{F.np('tree')} {F.be('tree')} scattered on the golf course")
    if F.f.get("woods") and F.has("forest"):
        out.append("Dense trees grow along the edge of the golf course")
    if F.f.get("path") and F.has("pavement"):
        out.append("A narrow road winds across the golf course")
    out.append(f"A light green fairway crosses the golf course {F.axis()}")
    if F.n("pond") == 1:
        out.append(f"A pond lies {F.where('pond')}")
    return out


def _harbor(F: Facts) -> list[str]:
    water = F.sc("water")
    out = [
        f"It is a harbor with {water} water and {F.np('dock')}"
        if F.n("dock")
        else f"It is a harbor with {water} water"
    ]
    if F.n("boat"):
        out += [
            f"There {F.be('boat')} {F.np('boat')} docked at the harbor",
            f"{F.np('boat')} {F.be('boat')} docked neatly at the harbor",
        ]
        if F.n("dock"):
            out.append(f"{F.np('boat')} {F.be('boat')} moored beside {F.np('dock')}")
            out.append(f"The harbor has {F.np('dock')} and {F.np('boat')}")
    if F.n("dock"):
        out.append(
            f"{F.np('dock')} {'stretches' if F.n('dock') == 1 else 'stretch'} into the {water} water of the harbor"
        )
    if F.n("ship"):
        out.append(f"{F.np('ship')} {F.be('ship')} anchored in the {water} water of the harbor")
    if F.n("building"):
        out.append(f"{F.np('building')} {F.be('building')} on the quay of the harbor")
    if F.n("car"):
        out.append(f"{F.np('car')} {F.be('car')} parked on the quay near the water")
    if len(out) < 5:
        out.append(f"The {water} water of the harbor is calm")
        out.append(f"A quay lies beside the {water} water of the harbor")
    if F.has("pavement"):
        out.append(f"The quay is {side_words(F.f['land_dir'])} of the picture")
    if F.n("dock"):
        out.append(f"{F.np('dock')} {F.be('dock')} built into the {water} water")
    if F.n("boat") and F.n("dock") >= 2:
        out.append("Boats are moored in the marina next to the piers")
    return out


def _intersection(F: Facts) -> list[str]:
    cars = F.cars_np()
    out = [
        f"Two {F.sc('pavement')} roads cross each other at the intersection",
        "It is an intersection where two straight roads meet",
        "White crosswalks are painted on the roads at the intersection",
    ]
    if cars:
        out.append(f"There {'is' if F.n('car') + F.n('truck') == 1 else 'are'} {cars} at the crossroads")
        out.append(
            f"{cars} {'is' if F.n('car') + F.n('truck') == 1 else 'are'} driving on the roads of the intersection"
        )
    else:
        out.append("There are no cars at the intersection")
    if F.f.get("corners_with") == "house" and F.n("house"):
        out.append(f"{F.np('house')} {F.be('house')} at the corners of the intersection")
    if F.f.get("corners_with") == "building" and F.n("building"):
        out.append(f"{F.np('building')} {F.be('building')} beside the crossroads")
    if F.n("tree"):
        out.append(f"{F.np('tree')} {F.be('tree')} growing near the intersection")
    a, b = F.axis(), F.axis("axis2")
    if a != b:
        out.append(f"One road runs {a} and the other runs {b}")
    out.append("Two roads meet nearly at a right angle at the crossroads")
    if F.f.get("yellow"):
        out.append("Double yellow lines mark the middle of one road")
    return out


def _mobilehomepark(F: Facts) -> list[str]:
    n = F.n("mobile home")
    if n == 0:
        return _fallback(F)
    be = F.be("mobile home")
    out = [
        f"There {be} {F.np('mobile home')} in the mobile home park",
        f"{F.np('mobile home')} {be} lined along the roads",
        f"This mobile home park has {F.np('mobile home')}",
    ]
    if F.f.get("in_rows"):
        out.append(f"{F.np('mobile home')} {be} arranged neatly in rows")
    if F.n("tree"):
        out.append(f"{F.np('tree')} {F.be('tree')} growing between the mobile homes")
    if F.n("car"):
        out.append(f"{F.np('car')} {F.be('car')} parked beside the mobile homes")
    if F.f.get("n_roads", 0) >= 2:
        out.append(f"{count_word(F.f['n_roads'], F.rng)} straight roads go through the mobile home park")
    if F.has(F.f["ground"]):
        out.append(f"The mobile homes stand on the {F.ground()}")
    if F.f.get("in_rows"):
        out.append(f"The rows of mobile homes run {F.axis()}")
    col = F.colour("mobile home")
    if col and " and " not in col:
        out.append(f"All the mobile homes in the park are {col}")
    out.append(f"{F.np('mobile home')} {be} packed closely together in the park")
    return out


def _overpass(F: Facts) -> list[str]:
    cars = F.cars_np()
    out = [
        "A road passes over another road on a bridge",
        "Two roads cross each other and one is above the other",
        "The bridge of the overpass casts a shadow on the road below",
        f"It is an overpass surrounded by the {F.ground()}"
        if F.has(F.f["ground"])
        else "It is an overpass with two roads",
    ]
    if cars:
        out.append(f"There is an overpass with {cars} on the roads")
    else:
        out.append("There are no cars on the roads of the overpass")
    if F.f.get("ramp"):
        out.append("A curved ramp joins the road below the bridge")
    if F.n("tree"):
        out.append(f"{F.np('tree')} {F.be('tree')} growing beside the overpass")
    a, b = F.axis(), F.axis("axis2")
    if a != b:
        out.append(f"The road below runs {a} and the bridge runs {b}")
    out.append("Concrete barriers line both sides of the bridge over the road")
    out.append("An overpass lets one road cross above another without meeting")
    return out


def _parkinglot(F: Facts) -> list[str]:
    n = F.n("car")
    out = [
        "It is a parking lot with white lines on the ground",
    ]
    if n:
        out += [
            f"There {F.be('car')} {F.np('car')} parked in the parking lot",
            f"{F.np('car')} {F.be('car')} parked in rows in the parking lot",
        ]
        if n >= 6 and F.colour("car") == "colorful":
            out.append(f"{F.np('car', colour=False)} of different colors are parked neatly in the lot")
    else:
        out.append("There are no cars in the parking lot")
    full = F.f.get("fullness")
    if full == "full":
        out.append("The parking lot is almost full of cars")
    elif full == "empty" and n:
        out.append(f"The parking lot is half empty with only {F.np('car')}")
    if F.n("building"):
        out.append(
            f"A parking lot with {F.np('car')} is next to a large building"
            if n
            else "A large building stands next to the parking lot"
        )
    if F.f.get("islands") and F.has("grass"):
        out.append(f"{F.sc('grass')} strips of grass divide the parking lot into parts")
    if F.n("tree"):
        out.append(f"{F.np('tree')} {F.be('tree')} growing on the grass in the parking lot")
    out.append(f"The rows of parking spaces run {F.axis()} in the lot")
    out.append("White lines mark the parking spaces in the lot")
    if n:
        out.append(f"{F.np('car')} {F.be('car')} parked side by side in the lot")
    return out


def _river(F: Facts) -> list[str]:
    shape, width = F.f["river_shape"], F.f["river_width"]
    col = F.sc("water")
    bank = F.f["bank"]
    out = [
        f"A {shape} river flows through the {F.surface_words(bank)}"
        if F.has(bank)
        else f"A {shape} river flows across the land",
        f"There is a {width} {col} river in the picture",
        f"The {col} water of the {shape} river is calm",
        (
            f"A {width} river winds across the {F.surface_words(bank)}"
            if F.has(bank)
            else f"A {width} river winds across the land"
        )
        if shape == "curved"
        else f"A {width} {col} river runs straight across the land",
    ]
    other = F.f.get("other_bank")
    if other and F.has(other) and F.has(bank):
        out.append(f"The river separates the {F.surface_words(bank)} from the {F.surface_words(other)}")
    if F.f.get("trees_along") and F.n("tree"):
        out.append(f"{F.np('tree')} {F.be('tree')} growing along the {shape} river")
    if F.f.get("sandbar") and F.has("sand"):
        out.append(f"Some {F.sc('sand')} sand lies on the bank of the river")
    if F.f.get("bridge") and F.has("pavement"):
        out.append("A bridge crosses the river" + (f" with {F.cars_np()} on it" if F.cars_np() else ""))
    if F.n("boat"):
        out.append(f"{F.np('boat')} {F.be('boat')} sailing on the {col} river")
    out.append(f"The {col} river runs {F.axis()} across the picture")
    if F.has(bank):
        out.append(f"The {shape} river has {F.surface_words(bank)} on its banks")
    return out


def _runway(F: Facts) -> list[str]:
    ground = F.ground()
    col = F.sc("pavement")
    out = [
        f"There is a long straight runway on the {ground}",
        f"A {col} runway with white markings lies on the {ground}",
        f"The runway is {col} with a dashed white line in the middle",
        "It is a long runway with white lines at the airport",
    ]
    if F.f.get("threshold"):
        out.append("White stripes are painted at the end of the runway")
    if F.f.get("taxiway"):
        out.append(f"A narrow taxiway runs parallel to the {col} runway")
    if F.f.get("n_runways") == 2:
        out.append("Two long runways cross each other at the airport")
    if F.n("airplane"):
        out.append(f"{F.np('airplane')} {F.be('airplane')} on the runway")
    out.append(f"The {col} runway runs {F.axis()} across the {ground}")
    out.append("The runway has white edge lines and a dashed center line")
    if F.f.get("taxiway"):
        out.append("A taxiway with a yellow line is beside the runway")
    return out


def _storagetanks(F: Facts) -> list[str]:
    n = F.n("tank")
    if n == 0:
        return _fallback(F)
    be = F.be("tank")
    out = [
        f"There {be} {F.np('tank', mod='storage')} in the factory area",
        f"{F.np('tank', mod='storage')} {be} on the {F.ground()}"
        if F.has(F.f["ground"])
        else f"{F.np('tank', mod='storage')} {be} in the picture",
        f"It is an industrial area with {F.np('tank', adj='round')}",
    ]
    if F.f.get("tanks_grid"):
        out.append(f"{F.np('tank', mod='storage')} {be} arranged neatly in rows")
    elif n > 1:
        out.append(
            f"{F.np('tank', mod='storage', colour=False)} of different sizes are scattered on the ground"
        )
    if F.f.get("road") and F.has("pavement"):
        out.append(f"A straight road is beside the storage {F.noun('tank')} in the factory")
    if F.n("building"):
        out.append(f"{F.np('building')} {F.be('building')} near the storage {F.noun('tank')}")
    if F.cars_np():
        out.append(
            f"{F.cars_np()} {'is' if F.n('car') + F.n('truck') == 1 else 'are'} on the road near the {F.noun('tank')}"
        )
    out.append(f"{F.np('tank', mod='storage')} with dark shadows {be} in the industrial area")
    col = F.colour("tank")
    if col and n > 1:
        out.append(f"The round tops of the storage tanks are {col}")
    return out


def _tenniscourt(F: Facts) -> list[str]:
    n = F.n("court")
    if n == 0:
        return _fallback(F)
    kind = F.f["court_kind"]
    be = F.be("court")
    out = [
        f"There {be} {F.np('court', mod=kind)} on the {F.ground()}"
        if F.has(F.f["ground"])
        else f"There {be} {F.np('court', mod=kind)}",
        f"{F.np('court', mod=kind, colour=True)} with white lines {be} in the picture",
        f"It is a sports area with {F.np('court', mod=kind)}",
    ]
    if n >= 2:
        out.append(f"{F.np('court', mod=kind)} are side by side")
    if F.f.get("trees_around") and F.n("tree"):
        out.append(f"{F.np('tree')} {F.be('tree')} growing around the {kind} {F.noun('court')}")
    if F.n("building"):
        out.append(f"{F.np('building')} {F.be('building')} beside the {kind} {F.noun('court')}")
    if F.f.get("road") and F.has("pavement"):
        out.append(f"A road passes by the {kind} {F.noun('court')} on one side")
    if F.cars_np():
        out.append(
            f"{F.cars_np()} {'is' if F.n('car') + F.n('truck') == 1 else 'are'} parked near the {F.noun('court')}"
        )
    if n == 1:
        out.append(f"A {kind} court is located {F.where('court')}")
    out.append(
        "Each tennis court has a net in the middle"
        if kind == "tennis"
        else "Each basketball court has a circle in the middle"
    )
    return out


def _fallback(F: Facts) -> list[str]:
    """Plain true statements about the main visible surfaces and objects (used when a composer's main
    object could not be placed, and to top a list up to five)."""
    out = []
    for s, share in sorted(F.visible.items(), key=lambda kv: -kv[1])[:3]:
        out.append(
            f"Most of the ground is covered by {F.surface_words(s)}"
            if share > 0.5
            else f"Some of the picture is covered by {F.surface_words(s)}"
        )
        out.append(f"The picture shows an area of {F.surface_words(s)}")
    for c, _ in F.counts.most_common(3):
        out.append(f"There {F.be(c)} {F.np(c)} in the picture")
        out.append(f"We can see {F.np(c)} in this area")
    return out


CAPTIONERS = {
    "agricultural": _agricultural,
    "airplane": _airplane,
    "baseballdiamond": _baseballdiamond,
    "beach": _beach,
    "buildings": _buildings,
    "chaparral": _chaparral,
    "denseresidential": lambda F: _residential(F, "dense"),
    "forest": _forest,
    "freeway": _freeway,
    "golfcourse": _golfcourse,
    "harbor": _harbor,
    "intersection": _intersection,
    "mediumresidential": lambda F: _residential(F, "medium"),
    "mobilehomepark": _mobilehomepark,
    "overpass": _overpass,
    "parkinglot": _parkinglot,
    "river": _river,
    "runway": _runway,
    "sparseresidential": lambda F: _residential(F, "sparse"),
    "storagetanks": _storagetanks,
    "tenniscourt": _tenniscourt,
}


def finish(sentence: str) -> str:
    s = fix_articles(" ".join(sentence.split()))
    return s[0].upper() + s[1:] + " ."


def captions(scene: str, facts: Facts, k: int = 5) -> list[str]:
    """k different captions for one picture, in a random order of its true candidate sentences."""
    cands = [finish(s) for s in CAPTIONERS[scene](facts)]
    unique = list(dict.fromkeys(cands))
    facts.rng.shuffle(unique)
    chosen = unique[:k]
    if len(chosen) < k:
        extra = [finish(s) for s in _fallback(facts)]
        for s in extra:
            if s not in chosen:
                chosen.append(s)
            if len(chosen) == k:
                break
    if len(chosen) < k:
        raise RuntimeError(f"{scene}: only {len(chosen)} distinct captions")
    return chosen
