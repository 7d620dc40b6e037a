"""Data and publishing helpers shared by the clip / concepts-detector / concepts-align / eval-concepts jobs.

* ``caption_pairs(corpus, split)``: the split's images with their raw captions; ``caption_for`` picks one per
  (seed, epoch, image), the same after ``--resume`` and with any number of workers.
* ``load_images_uint8(records, size)``: decoded once into one uint8 tensor ``[N, 3, S, S]`` (the tiny sets fit in
  memory; decoding TIFFs every epoch would cost more than the training step).
* ``box_split(corpus, split, size)``: images plus their ground-truth boxes (scaled to ``size``) and concept words.
* ``augment_views``: random flips and 90-degree turns of overhead images, boxes moved with them.

Weights files are read and written by ``captioning.weights`` (``save_state`` / ``load_state``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from captioning.data import CaptionCorpus, ImageRecord
from captioning.data.images import load_image
from captioning.errors import DataError


# ---------------------------------------------------------------------------------------------- captions
@dataclass
class CaptionPairs:
    records: list[ImageRecord]
    captions: list[list[str]]  # per image, its raw captions
    concepts: list[list[str]] = field(default_factory=list)  # per image, words for "a photo of a [word]" texts

    def caption_for(
        self, index: int, seed: int, epoch: int, *, prompt_prob: float = 0.0, template: str = "a photo of a {}"
    ) -> str:
        """One caption of image ``index``, drawn from (seed, epoch, index); with probability ``prompt_prob``
        (and when the image has concept words) a prompt ``template.format(word)`` of one of its words instead."""
        rng = np.random.default_rng([seed, epoch, index])
        words = self.concepts[index] if self.concepts else []
        if words and prompt_prob > 0 and rng.random() < prompt_prob:
            return template.format(words[int(rng.integers(len(words)))])
        caps = self.captions[index]
        return caps[int(rng.integers(len(caps)))]


def caption_pairs(corpus: CaptionCorpus, split: str) -> CaptionPairs:
    """The split's captioned images; each image's concept words are its boxes' words and its label words."""
    from captioning.data import LABELS

    records = [rec for rec in corpus.split(split) if rec.sentences]
    concepts = []
    for rec in records:
        words = {b.concept for b in (corpus.boxes or {}).get(rec.imgid, [])}
        if corpus.labels is not None:
            row = corpus.labels[corpus.index_of(rec.imgid)]
            words |= {label for label, on in zip(LABELS, row, strict=True) if on > 0}
        concepts.append(sorted(words))
    return CaptionPairs(records, [[s.raw for s in rec.sentences] for rec in records], concepts)


# ---------------------------------------------------------------------------------------------- images
def load_images_uint8(records: list[ImageRecord], size: int, workers: int = 0) -> torch.Tensor:
    """-> ``[N, 3, size, size]`` uint8 (RGB, bicubic resize)."""
    out = torch.empty((len(records), 3, size, size), dtype=torch.uint8)
    for i, rec in enumerate(records):
        array = np.asarray(load_image(rec.path, size), dtype=np.uint8)  # [S,S,3]
        out[i] = torch.from_numpy(array.copy()).permute(2, 0, 1)
    return out


@dataclass
class BoxSplit:
    records: list[ImageRecord]
    images: torch.Tensor  # uint8 [N, 3, S, S]
    boxes: list[torch.Tensor]  # per image [n, 4] xyxy in the S x S image's pixels
    concepts: list[list[str]]  # per image, per box, its concept word
    labels: list[list[str | None]]  # per image, per box, its label
    original_sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) of the files

    def __len__(self) -> int:
        return len(self.records)


def box_split(corpus: CaptionCorpus, split: str, size: int | None, workers: int = 0) -> BoxSplit:
    """The split's images (``size=None``: not decoded) and boxes scaled onto ``size`` x ``size``."""
    from PIL import Image

    if corpus.boxes is None:
        raise DataError("the dataset has no boxes.json, so it has no boxes", path=corpus.root)
    records = corpus.split(split)
    boxes, concepts, labels, sizes = [], [], [], []
    for rec in records:
        with Image.open(rec.path) as im:
            width, height = im.size
        sizes.append((width, height))
        scale = torch.tensor([1.0, 1.0, 1.0, 1.0]) if size is None else torch.tensor(
            [size / width, size / height, size / width, size / height]
        )
        items = corpus.boxes.get(rec.imgid, [])
        boxes.append(torch.tensor([b.xyxy for b in items], dtype=torch.float32).reshape(-1, 4) * scale)
        concepts.append([b.concept for b in items])
        labels.append([b.label for b in items])
    images = load_images_uint8(records, size, workers) if size is not None else torch.zeros(0, dtype=torch.uint8)
    return BoxSplit(records, images, boxes, concepts, labels, sizes)


def augment_views(
    images: torch.Tensor, gen: torch.Generator, boxes: list[torch.Tensor] | None = None
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Per image: a random horizontal flip and a random number of 90-degree turns (square images; an overhead
    view has no up). ``boxes`` (xyxy pixels) are moved with their image when given."""
    n, _, height, width = images.shape
    flips = torch.randint(0, 2, (n,), generator=gen)
    turns = torch.randint(0, 4, (n,), generator=gen)
    out = images.clone()
    moved = []
    for i in range(n):
        img = images[i]
        b = None if boxes is None else boxes[i].clone()
        if flips[i]:
            img = img.flip(-1)
            if b is not None:
                b[:, [0, 2]] = width - b[:, [2, 0]]
        for _ in range(int(turns[i])):  # counter-clockwise: (x, y) -> (y, W - x)
            img = img.rot90(1, dims=(-2, -1))
            if b is not None:
                b = torch.stack([b[:, 1], width - b[:, 2], b[:, 3], width - b[:, 0]], dim=1)
        out[i] = img
        moved.append(b)
    return out if boxes is None else (out, moved)

