"""Data layer: UCM-captions / COCO Karpathy readers, vocabulary, image loading, torch Datasets.

Contract in docs/ARCHITECTURE.md ("Data"). Every malformed input raises ``captioning.errors.DataError``
naming the file and the record.
"""

from captioning.data.ucm import (
    LABELS,
    SPLITS,
    UCM_CLASSES,
    Box,
    CaptionCorpus,
    ImageRecord,
    Sentence,
    load_dataset,
    read_boxes,
    read_dataset_json,
    read_multilabels,
    tokenize,
)

__all__ = [
    "LABELS",
    "SPLITS",
    "UCM_CLASSES",
    "Box",
    "CaptionCorpus",
    "ImageRecord",
    "Sentence",
    "load_dataset",
    "read_boxes",
    "read_dataset_json",
    "read_multilabels",
    "tokenize",
]
