"""The concept vocabulary of the synthetic scenes and the named colours they are painted in.

A *concept* is one kind of thing the renderer paints. Every pixel of a synthetic image belongs to exactly
one concept (the renderer keeps a concept map beside the picture), and the 17 UCM labels of an image are
read off that map: a label is 1 exactly when a concept that maps to it is visible.

* **Object** concepts (``boxed=True``) are countable things; every one painted gets a box in
  ``boxes.json`` with its concept word and label, and captions count them.
* **Stuff** concepts (``boxed=False``) are surfaces (grass, water, pavement ...). They get no boxes and
  captions never count them.

``CONCEPTS`` is the table the concept extractor and the tests use. See docs/synthetic.md.
"""

from __future__ import annotations

from dataclasses import dataclass

# The 17 UCM labels (DESIGN.md order) and the 21 UCM classes come from the reader.
from captioning.data.ucm import LABELS, UCM_CLASSES  # noqa: F401  (re-exported for the generator)


@dataclass(frozen=True)
class Concept:
    name: str  # the concept word(s), as captions write the singular
    label: str | None  # the UCM label it makes present (None: it makes none by itself)
    boxed: bool  # an object with a box (True) or a surface without one (False)
    plural: str  # the plural captions use
    looks: str  # what it looks like, for the docs


# fmt: off
_TABLE = [
    # objects
    Concept("airplane", "airplane", True, "airplanes", "swept-wing plane, 36-96 px long, white/gray with a coloured tail"),
    Concept("car", "cars", True, "cars", "small box with dark windows, 13-19 px, many colours"),
    Concept("truck", "cars", True, "trucks", "cab and long trailer, 24-34 px"),
    Concept("ship", "ship", True, "ships", "long pointed hull with deck and bridge, 50-110 px"),
    Concept("boat", "ship", True, "boats", "short pointed hull with a cabin, 15-24 px moored, 20-34 px loose"),
    Concept("tank", "tanks", True, "tanks", "round storage tank with a rim and a long shadow, 18-48 px across"),
    Concept("building", "buildings", True, "buildings", "large flat roof with a parapet and roof units, 26-90 px"),
    Concept("house", "buildings", True, "houses", "small gabled roof in two shades, 15-27 px"),
    Concept("mobile home", "mobile-home", True, "mobile homes", "long box with a ribbed roof and a porch, in rows, 22-32 px"),
    Concept("court", "court", True, "courts", "tennis or basketball court: coloured surface with white lines"),
    Concept("dock", "dock", True, "docks", "long narrow pier from the shore into the water"),
    Concept("tree", "trees", True, "trees", "round crown with a highlight and a shadow, 10-28 px"),
    Concept("pool", None, True, "pools", "turquoise rectangle or oval with a white rim (not the water label)"),
    Concept("pond", "water", True, "ponds", "irregular blob of still water"),
    Concept("bunker", "sand", True, "bunkers", "irregular pale sand blob on a golf course"),
    Concept("diamond", None, True, "diamonds", "baseball diamond: dirt fan (bare soil) with a grass square and white lines"),
    # surfaces
    Concept("grass", "grass", False, "grass", "smooth green mottled lawn or meadow"),
    Concept("field", "field", False, "fields", "crop plots with parallel rows, green/yellow/brown"),
    Concept("soil", "bare-soil", False, "soil", "brown blotchy bare ground"),
    Concept("sand", "sand", False, "sand", "pale fine-grained sand with faint ripples"),
    Concept("sea", "sea", False, "sea", "deep water with white wave streaks and foam at the shore"),
    Concept("water", "water", False, "water", "calm river/lake/harbour water with faint ripples"),
    Concept("pavement", "pavement", False, "pavement", "gray asphalt or concrete with markings"),
    Concept("chaparral", "chaparral", False, "chaparral", "tan ground densely dotted with dark shrubs"),
    Concept("forest", "trees", False, "forest", "dense canopy of many crowns (not counted, not boxed)"),
]
# fmt: on

CONCEPTS: dict[str, Concept] = {c.name: c for c in _TABLE}
OBJECTS: tuple[str, ...] = tuple(c.name for c in _TABLE if c.boxed)
STUFF: tuple[str, ...] = tuple(c.name for c in _TABLE if not c.boxed)
# Ids in the concept map (0 = nothing painted yet).
CONCEPT_IDS: dict[str, int] = {c.name: i + 1 for i, c in enumerate(_TABLE)}
CONCEPT_BY_ID: dict[int, str] = {i: n for n, i in CONCEPT_IDS.items()}

assert all(c.label is None or c.label in LABELS for c in _TABLE)
assert {c.label for c in _TABLE} - {None} == set(LABELS), "every label must be paintable"

# fmt: off
# Named colours: anchors in RGB; each painted thing jitters around its anchor.
COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (228, 228, 224),
    "gray": (146, 148, 150),
    "light gray": (178, 178, 175),
    "dark gray": (88, 90, 94),
    "black": (48, 48, 52),
    "red": (178, 52, 46),
    "blue": (52, 88, 168),
    "light blue": (120, 170, 210),
    "dark blue": (28, 52, 100),
    "turquoise": (70, 185, 200),
    "green": (74, 128, 62),
    "light green": (128, 168, 84),
    "dark green": (46, 84, 44),
    "yellow": (216, 186, 70),
    "orange": (212, 120, 48),
    "brown": (128, 92, 60),
    "light brown": (176, 146, 108),
    "dark brown": (92, 66, 46),
    "beige": (206, 192, 160),
}

# Which colours each thing comes in, with weights. Surfaces' anchors are their own (textured later).
PALETTES: dict[str, list[tuple[str, float]]] = {
    "airplane": [("white", 0.6), ("gray", 0.3), ("light blue", 0.1)],
    "car": [("white", 0.3), ("black", 0.15), ("gray", 0.15), ("red", 0.15), ("blue", 0.15), ("yellow", 0.1)],
    "truck": [("white", 0.5), ("red", 0.2), ("blue", 0.15), ("yellow", 0.15)],
    "ship": [("white", 0.35), ("gray", 0.25), ("red", 0.2), ("blue", 0.2)],
    "boat": [("white", 0.6), ("blue", 0.15), ("red", 0.1), ("yellow", 0.15)],
    "tank": [("white", 0.55), ("gray", 0.3), ("green", 0.15)],
    "building": [("white", 0.3), ("gray", 0.3), ("dark gray", 0.1), ("brown", 0.15), ("red", 0.1), ("blue", 0.05)],
    "house": [("gray", 0.25), ("brown", 0.25), ("red", 0.2), ("orange", 0.1), ("white", 0.1), ("dark gray", 0.1)],
    "mobile home": [("white", 0.55), ("gray", 0.3), ("beige", 0.15)],
    "court": [("green", 0.45), ("blue", 0.3), ("red", 0.25)],
    "dock": [("gray", 0.6), ("brown", 0.4)],
    "tree": [("green", 0.5), ("dark green", 0.35), ("light green", 0.15)],
    "pool": [("turquoise", 0.7), ("light blue", 0.3)],
    "pond": [("blue", 0.45), ("dark blue", 0.3), ("turquoise", 0.25)],
    "bunker": [("white", 0.6), ("beige", 0.4)],
    "diamond": [("brown", 0.6), ("light brown", 0.4)],
}

STUFF_COLOURS: dict[str, list[tuple[str, tuple[int, int, int], float]]] = {
    "grass": [("green", (92, 138, 64), 0.5), ("light green", (128, 160, 82), 0.25), ("dark green", (66, 104, 52), 0.25)],
    "field": [("green", (92, 140, 62), 0.3), ("dark green", (58, 96, 48), 0.15), ("yellow", (200, 178, 96), 0.3),
              ("brown", (142, 106, 74), 0.25)],
    "soil": [("brown", (146, 112, 82), 0.5), ("light brown", (182, 152, 114), 0.3), ("dark brown", (104, 80, 60), 0.2)],
    "sand": [("white", (226, 218, 196), 0.45), ("yellow", (218, 196, 142), 0.35), ("beige", (204, 186, 152), 0.2)],
    "sea": [("blue", (40, 88, 140), 0.45), ("dark blue", (24, 50, 92), 0.3), ("turquoise", (44, 128, 140), 0.25)],
    "water": [("blue", (52, 86, 122), 0.4), ("dark blue", (30, 48, 72), 0.3), ("green", (44, 98, 96), 0.3)],
    "pavement": [("gray", (128, 128, 126), 0.5), ("dark gray", (86, 88, 90), 0.25), ("light gray", (170, 168, 164), 0.25)],
    "chaparral": [("brown", (150, 124, 90), 0.5), ("light brown", (178, 156, 116), 0.5)],
    "forest": [("dark green", (44, 78, 44), 0.45), ("green", (62, 104, 52), 0.4), ("light green", (92, 124, 62), 0.15)],
}
# fmt: on
