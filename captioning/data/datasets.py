"""torch Datasets over a ``CaptionCorpus`` and the collate functions that pad their batches.

* ``CaptionTextDataset``   one item per caption: token ids ``<bos> ... <eos>`` (the text autoencoder)
* ``ImageLabelDataset``    ``(image, labels[17])`` (the multi-label classifier)
* ``ImageCaptionDataset``  ``{"image", "caption", "references", ...}``: one caption per item, chosen by
  ``caption_mode``: ``each-sentence`` (every caption is an item), ``random-per-epoch`` (one item per image,
  its caption drawn afresh each epoch from ``(seed, epoch, index)``, call ``set_epoch``), or ``references``
  (one item per image, no target caption; for evaluation). Every item carries all the image's references.
* ``ImageBoxDataset``      ``(image, target)`` with ``target["boxes"]`` a ``tv_tensors.BoundingBoxes`` in the
  output image's pixels, so torchvision v2 transforms move boxes with the image.

Images are decoded with PIL per item (``load_image``: RGB, resized to ``image_size`` when given) and passed
to ``transform`` (torchvision transforms v2; default: float tensor in [0, 1]). Nothing re-reads the json.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from captioning.data.images import Size, default_transform, load_image, resize
from captioning.data.ucm import LABELS, CaptionCorpus, ImageRecord
from captioning.data.vocab import PAD_ID, Vocabulary
from captioning.errors import DataError

CAPTION_MODES = ("each-sentence", "random-per-epoch", "references")

Transform = Callable[..., Any]


def _records(corpus: CaptionCorpus, split: str | None) -> list[ImageRecord]:
    return list(corpus.images) if split is None else corpus.split(split)


def _encode(vocab: Vocabulary, tokens: Sequence[str], max_words: int | None) -> torch.Tensor:
    words = list(tokens) if max_words is None else list(tokens)[:max_words]
    return torch.tensor(vocab.encode(words), dtype=torch.long)


def pad_sequences(seqs: Sequence[torch.Tensor], pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """List of 1-D LongTensors -> (padded ``[B, T]``, lengths ``[B]``)."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    padded = torch.full((len(seqs), int(lengths.max()) if len(seqs) else 0), pad_id, dtype=torch.long)
    for i, seq in enumerate(seqs):
        padded[i, : len(seq)] = seq
    return padded, lengths


# ------------------------------------------------------------------------------------------- captions


class CaptionTextDataset(Dataset):
    """Every caption of the split as ids ``[<bos>, w1 .. wn, <eos>]`` (at most ``max_words`` words)."""

    def __init__(
        self, corpus: CaptionCorpus, vocab: Vocabulary, split: str | None = None, max_words: int | None = None
    ):
        self.vocab = vocab
        self.items: list[torch.Tensor] = []
        self.keys: list[tuple[int, int]] = []  # (imgid, sentid) of each item
        for rec in _records(corpus, split):
            for sent in rec.sentences:
                self.items.append(_encode(vocab, sent.tokens, max_words))
                self.keys.append((rec.imgid, sent.sentid))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.items[index]


def collate_captions(batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (ids ``[B, T]`` padded with ``<pad>``, lengths ``[B]`` counting ``<bos>``/``<eos>``)."""
    return pad_sequences(batch)


# ----------------------------------------------------------------------------------------- images


class _ImageDataset(Dataset):
    def __init__(self, records: list[ImageRecord], transform: Transform | None, image_size: Size | None):
        self.records = records
        self.transform = transform if transform is not None else default_transform()
        self.image_size = image_size

    def _image(self, rec: ImageRecord):
        return load_image(rec.path, self.image_size)


class ImageLabelDataset(_ImageDataset):
    """``(image, labels)``: ``labels`` is a float tensor ``[17]`` of 0/1 in ``LABELS`` order."""

    def __init__(
        self,
        corpus: CaptionCorpus,
        split: str | None = None,
        transform: Transform | None = None,
        image_size: Size | None = None,
    ):
        if corpus.labels is None:
            raise DataError("the dataset has no multilabels.txt, so it has no labels", path=corpus.root)
        indices = list(range(len(corpus.images))) if split is None else corpus.split_indices(split)
        super().__init__([corpus.images[i] for i in indices], transform, image_size)
        self.labels = torch.from_numpy(np.ascontiguousarray(corpus.labels[indices], dtype=np.float32))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self._image(self.records[index])), self.labels[index]


class ImageCaptionDataset(_ImageDataset):
    """Images with one caption per item (see ``caption_mode``) and all references of the image."""

    def __init__(
        self,
        corpus: CaptionCorpus,
        vocab: Vocabulary,
        split: str | None = None,
        caption_mode: str = "each-sentence",
        transform: Transform | None = None,
        image_size: Size | None = None,
        max_words: int | None = None,
        seed: int = 0,
    ):
        if caption_mode not in CAPTION_MODES:
            raise ValueError(f"caption_mode must be one of {', '.join(CAPTION_MODES)}, got {caption_mode!r}")
        records = _records(corpus, split)
        if caption_mode != "references":
            records = [rec for rec in records if rec.sentences]
        super().__init__(records, transform, image_size)
        self.vocab = vocab
        self.caption_mode = caption_mode
        self.seed = seed
        self.epoch = 0
        self.captions = [[_encode(vocab, s.tokens, max_words) for s in rec.sentences] for rec in records]
        # each-sentence: (record, sentence) per item; otherwise one item per record
        self.index: list[tuple[int, int]] = (
            [(r, s) for r, rec in enumerate(records) for s in range(len(rec.sentences))]
            if caption_mode == "each-sentence"
            else [(r, -1) for r in range(len(records))]
        )

    def set_epoch(self, epoch: int) -> None:
        """For ``random-per-epoch``: which caption each image gets depends on (seed, epoch, index) only, so
        it is the same with any number of DataLoader workers and after ``--resume``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.index)

    def caption_index(self, index: int) -> int | None:
        r, s = self.index[index]
        if self.caption_mode == "each-sentence":
            return s
        if self.caption_mode == "references":
            return None
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return int(rng.integers(len(self.captions[r])))

    def __getitem__(self, index: int) -> dict[str, Any]:
        r, _ = self.index[index]
        rec = self.records[r]
        s = self.caption_index(index)
        return {
            "image": self.transform(self._image(rec)),
            "caption": None if s is None else self.captions[r][s],
            "imgid": rec.imgid,
            "sentid": None if s is None else rec.sentences[s].sentid,
            "references": rec.references,
        }


def collate_image_captions(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """-> ``images [B,3,H,W]``, ``captions [B,T]`` (padded; None in references mode), ``lengths [B]``,
    ``imgids [B]``, ``sentids`` (list), ``references`` (list of lists of strings)."""
    captions = [item["caption"] for item in batch]
    if all(c is None for c in captions):
        padded = lengths = None
    elif any(c is None for c in captions):
        raise ValueError("a batch mixes items with and without a caption")
    else:
        padded, lengths = pad_sequences(captions)
    return {
        "images": torch.stack([item["image"] for item in batch]),
        "captions": padded,
        "lengths": lengths,
        "imgids": torch.tensor([item["imgid"] for item in batch], dtype=torch.long),
        "sentids": [item["sentid"] for item in batch],
        "references": [item["references"] for item in batch],
    }


class ImageBoxDataset(_ImageDataset):
    """``(image, target)`` with ``target = {"boxes": BoundingBoxes [n,4] XYXY, "labels": [n] (index in LABELS,
    -1 for concepts outside the 17), "concepts": list[str], "concept_ids": [n] (with ``concepts`` given),
    "imgid": int}``. Boxes are scaled with the image when ``image_size`` resizes it, and ``transform`` is
    called as ``transform(image, target)`` so v2 geometric transforms move them too."""

    def __init__(
        self,
        corpus: CaptionCorpus,
        split: str | None = None,
        transform: Transform | None = None,
        image_size: Size | None = None,
        concepts: Sequence[str] | None = None,
    ):
        if corpus.boxes is None:
            raise DataError("the dataset has no boxes.json, so it has no boxes", path=corpus.root)
        records = _records(corpus, split)
        super().__init__(records, transform, image_size)
        self.concept_index = None if concepts is None else {c: i for i, c in enumerate(concepts)}
        label_index = {label: i for i, label in enumerate(LABELS)}
        self.boxes: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.concepts: list[list[str]] = []
        self.concept_ids: list[torch.Tensor] = []
        for rec in records:
            boxes = corpus.boxes[rec.imgid]
            self.boxes.append(torch.tensor([b.xyxy for b in boxes], dtype=torch.float32).reshape(-1, 4))
            self.labels.append(torch.tensor([label_index.get(b.label, -1) for b in boxes], dtype=torch.long))
            self.concepts.append([b.concept for b in boxes])
            if self.concept_index is not None:
                unknown = [b.concept for b in boxes if b.concept not in self.concept_index]
                if unknown:
                    raise DataError(
                        f"concept {unknown[0]!r} is not in the concept list",
                        path=corpus.root,
                        record=f"imgid {rec.imgid}",
                    )
                self.concept_ids.append(
                    torch.tensor([self.concept_index[b.concept] for b in boxes], dtype=torch.long)
                )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        rec = self.records[index]
        original = load_image(rec.path)
        image = resize(original, self.image_size)
        boxes = self.boxes[index].clone()
        if image.size != original.size:
            sx, sy = image.width / original.width, image.height / original.height
            boxes *= torch.tensor([sx, sy, sx, sy])
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(image.height, image.width)),
            "labels": self.labels[index].clone(),
            "concepts": list(self.concepts[index]),
            "imgid": rec.imgid,
        }
        if self.concept_index is not None:
            target["concept_ids"] = self.concept_ids[index].clone()
        return self.transform(image, target)


def collate_image_boxes(
    batch: Sequence[tuple[torch.Tensor, dict[str, Any]]],
) -> tuple[torch.Tensor, list[dict]]:
    """-> (images ``[B,3,H,W]``, list of B targets); boxes vary in number so they stay a list."""
    return torch.stack([image for image, _ in batch]), [target for _, target in batch]
