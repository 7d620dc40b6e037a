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

# The torch-side modules load on first use, so `from captioning.data import LABELS` (the synthetic
# generator, the CLI) does not pay for importing torch and torchvision.
_LAZY = {
    "captioning.data.datasets": (
        "CAPTION_MODES",
        "CaptionTextDataset",
        "ImageBoxDataset",
        "ImageCaptionDataset",
        "ImageLabelDataset",
        "collate_captions",
        "collate_image_boxes",
        "collate_image_captions",
        "pad_sequences",
    ),
    "captioning.data.images": ("default_transform", "load_image", "resize", "to_rgb"),
    "captioning.data.vocab": ("BOS_ID", "EOS_ID", "PAD_ID", "SPECIALS", "UNK_ID", "Vocabulary"),
}
_LAZY_NAMES = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str):
    module = _LAZY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "BOS_ID",
    "CAPTION_MODES",
    "EOS_ID",
    "LABELS",
    "PAD_ID",
    "SPECIALS",
    "SPLITS",
    "UCM_CLASSES",
    "UNK_ID",
    "Box",
    "CaptionCorpus",
    "CaptionTextDataset",
    "ImageBoxDataset",
    "ImageCaptionDataset",
    "ImageLabelDataset",
    "ImageRecord",
    "Sentence",
    "Vocabulary",
    "collate_captions",
    "collate_image_boxes",
    "collate_image_captions",
    "default_transform",
    "load_dataset",
    "load_image",
    "pad_sequences",
    "read_boxes",
    "read_dataset_json",
    "read_multilabels",
    "resize",
    "to_rgb",
    "tokenize",
]
