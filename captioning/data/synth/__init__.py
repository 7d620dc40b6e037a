"""Synthetic aerial scenes for the 21 UCM classes, written in the UCM-captions layout.

``captioner synth OUT --per-class N --seed S [--size 256] [--workers W]`` (see docs/synthetic.md for the
scene grammar, the concept vocabulary and measured speed).

Public API:

* ``generate(out, per_class, seed, size=256, workers=None, overwrite=False) -> Summary`` writes a dataset;
* ``render(scene, seed, imgid, size=256) -> Rendered`` makes one picture with its labels, boxes, captions;
* ``CONCEPTS`` (concept word -> ``Concept(name, label, boxed, plural, looks)``), ``OBJECTS`` (the boxed
  concept words), ``STUFF`` (the surface concept words) - the vocabulary the concept extractor uses;
* ``COUNT_WORDS``, ``OBJECT_NOUNS``, ``LABEL_WORDS``: how captions say counts and which words claim labels.
"""

from captioning.data.synth.captions import ADJECTIVES, COUNT_WORDS, LABEL_WORDS, OBJECT_NOUNS, count_word
from captioning.data.synth.concepts import CONCEPTS, OBJECTS, STUFF, Concept
from captioning.data.synth.generator import (
    DATASET_NAME,
    GENERATOR_VERSION,
    TIFF_OPTIONS,
    Rendered,
    Summary,
    generate,
    render,
    split_counts,
)

__all__ = [
    "ADJECTIVES",
    "CONCEPTS",
    "COUNT_WORDS",
    "DATASET_NAME",
    "GENERATOR_VERSION",
    "LABEL_WORDS",
    "OBJECTS",
    "OBJECT_NOUNS",
    "STUFF",
    "TIFF_OPTIONS",
    "Concept",
    "Rendered",
    "Summary",
    "count_word",
    "generate",
    "render",
    "split_counts",
]
