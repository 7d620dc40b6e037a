"""The tensors the UCM stages train and evaluate on, built once per run from ``captioning.data``.

Images of a split are decoded and resized once (``captioning.data`` Datasets with a uint8 transform) and
kept as one uint8 tensor ``[N, 3, S, S]``; batches are normalised (ImageNet mean/std) and, for training,
augmented with flips and 90-degree turns (aerial scenes have no "up") on the fly. Captions stay as the id
tensors the Datasets built (``<bos> w1 .. wn <eos>``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from captioning.data import CaptionCorpus, load_dataset
from captioning.data.datasets import ImageCaptionDataset, ImageLabelDataset, pad_sequences
from captioning.data.images import resize
from captioning.data.vocab import EOS_ID, PAD_ID, Vocabulary
from captioning.errors import DataError

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def open_dataset(root: str | Path | None, *, need_labels: bool = False, splits: tuple[str, ...] = ()) -> CaptionCorpus:
    """``load_dataset`` plus the checks a stage needs: labels present, the named splits not empty."""
    if root is None:
        raise DataError("no dataset given (use --data DIR, a folder in the UCM-captions layout)")
    root = Path(root)
    if not root.exists():
        raise DataError("dataset folder does not exist (generate one with `captioner synth DIR`)", path=root)
    corpus = load_dataset(root)
    if need_labels and corpus.labels is None:
        raise DataError("the dataset has no multilabels.txt, which this stage needs", path=root)
    for split in splits:
        if not corpus.split(split):
            raise DataError(f"the dataset has no images in split {split!r}", path=root / "dataset.json")
    return corpus


# ------------------------------------------------------------------------------------------------ images
def _uint8_images(dataset: torch.utils.data.Dataset, workers: int = 0) -> torch.Tensor:
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=64, shuffle=False, num_workers=workers, collate_fn=lambda items: items
    )
    chunks = []
    for items in loader:
        chunks.append(torch.stack([_image_of(item) for item in items]))
    return torch.cat(chunks) if chunks else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)


def _image_of(item: Any) -> torch.Tensor:
    image = item["image"] if isinstance(item, dict) else item[0]
    return image.as_subclass(torch.Tensor)


def label_split(corpus: CaptionCorpus, split: str, size: int, workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """-> images uint8 [N, 3, size, size], labels float [N, 17]."""
    dataset = ImageLabelDataset(corpus, split, transform=v2.ToImage(), image_size=size)
    return _uint8_images(dataset, workers), dataset.labels.clone()


@dataclass
class CaptionSplit:
    images: torch.Tensor  # uint8 [N, 3, S, S]
    captions: list[list[torch.Tensor]]  # per image, its captions as <bos> .. <eos> ids
    references: list[list[str]]  # per image, its reference captions (raw text, tokenised form)
    imgids: list[int]

    def __len__(self) -> int:
        return len(self.imgids)


def caption_split(
    corpus: CaptionCorpus, vocab: Vocabulary, split: str, size: int | None, max_words: int, workers: int = 0
) -> CaptionSplit:
    """Images (when ``size`` is given) with all their captions; ``size=None`` skips decoding images."""
    dataset = ImageCaptionDataset(
        corpus, vocab, split, caption_mode="references", transform=v2.ToImage(), image_size=size, max_words=max_words
    )
    images = _uint8_images(dataset, workers) if size is not None else torch.zeros(0, dtype=torch.uint8)
    return CaptionSplit(
        images=images,
        captions=[list(c) for c in dataset.captions],
        references=[list(rec.references) for rec in dataset.records],
        imgids=[rec.imgid for rec in dataset.records],
    )


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float, ImageNet-normalised."""
    return (images.float() / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def augment(images: torch.Tensor) -> torch.Tensor:
    """Random horizontal flip and 90-degree turn per image (torch's global RNG: seeded and checkpointed)."""
    turns = torch.randint(0, 4, (images.shape[0],))
    flips = torch.rand(images.shape[0]) < 0.5
    out = images.clone()
    for i in range(images.shape[0]):
        image = images[i]
        if flips[i]:
            image = image.flip(-1)
        out[i] = torch.rot90(image, int(turns[i]), dims=(-2, -1))
    return out


def preprocess(image: Image.Image, size: int) -> torch.Tensor:
    """A PIL image (any mode) -> normalised float [3, size, size], exactly as the stages see their data."""
    image = resize(image.convert("RGB"), size)
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return normalize(array[None])[0]


# ---------------------------------------------------------------------------------------------- captions
@dataclass
class CaptionBatch:
    enc_tokens: torch.Tensor  # [M, T] words + <eos> (what the text encoder reads)
    enc_lengths: torch.Tensor  # [M]
    inputs: torch.Tensor  # [M, T] <bos> + words (decoder input)
    targets: torch.Tensor  # [M, T] words + <eos> (decoder target; <pad> ignored)
    owner: torch.Tensor  # [M] which row of the image batch each caption belongs to

    def to(self, device: torch.device) -> CaptionBatch:
        return CaptionBatch(*(t.to(device) for t in (self.enc_tokens, self.enc_lengths, self.inputs, self.targets, self.owner)))


def caption_batch(ids: list[torch.Tensor], owner: list[int] | None = None) -> CaptionBatch:
    """<bos> .. <eos> id tensors -> the shifted encoder / decoder tensors."""
    padded, lengths = pad_sequences(ids)  # [M, T+2]
    return CaptionBatch(
        enc_tokens=padded[:, 1:],
        enc_lengths=lengths - 1,
        inputs=padded[:, :-1].masked_fill(padded[:, :-1] == EOS_ID, PAD_ID),  # <eos> is never an input
        targets=padded[:, 1:],
        owner=torch.tensor(owner if owner is not None else range(len(ids)), dtype=torch.long),
    )


def captions_of(split: CaptionSplit, rows: torch.Tensor) -> CaptionBatch:
    """All captions of the images ``rows`` (indices into ``split``), tagged with their batch row."""
    ids, owner = [], []
    for b, r in enumerate(rows.tolist()):
        for caption in split.captions[r]:
            ids.append(caption)
            owner.append(b)
    return caption_batch(ids, owner)


def codes_per_image(codes: torch.Tensor, owner: torch.Tensor, n_images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption codes [M, D] grouped by image -> [B, S, D] and a mask [B, S] (S = most captions of one image)."""
    counts = torch.bincount(owner, minlength=n_images)
    slots = max(int(counts.max()) if len(counts) else 0, 1)
    seen = [0] * n_images
    slot_of = []
    for b in owner.tolist():
        slot_of.append(b * slots + seen[b])
        seen[b] += 1
    index = torch.tensor(slot_of, dtype=torch.long, device=codes.device)
    grouped = codes.new_zeros(n_images * slots, codes.shape[1]).index_copy(0, index, codes)
    mask = codes.new_zeros(n_images * slots).index_fill(0, index, 1.0)
    return grouped.view(n_images, slots, -1), mask.view(n_images, slots)
