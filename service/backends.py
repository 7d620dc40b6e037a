"""Model backends: what a worker thread runs for one batch, per role, over objects from
``captioning.inference.load_model`` (contract in docs/ARCHITECTURE.md "Inference contract").

* caption: ``model.caption(images[B,3,H,W], beam_size=, max_length=) -> list[CaptionOut]``; the batch group is
  ``(beam_size, max_length)`` -- items with other decode parameters wait for their own batch;
* labels: ``model.predict(images) -> Tensor[B,17]`` probabilities (group: none);
* concepts: ``model.extract(images) -> list[list[Concept]]`` (group: none).

The runners are plain functions of (model, group, payloads) so the pool, the CLI and tests share them.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

# manifest task -> role (which route serves it)
ROLES = {
    "ucm-captioner": "caption",
    "lightcap": "caption",
    "ucm-classifier": "labels",
    "concepts": "concepts",
}


def caption_batch(model: Any, group: Hashable, payloads: list[torch.Tensor]) -> Sequence[Any]:
    beam_size, max_length = group
    images = torch.stack(payloads)  # [B, 3, H, W]
    with torch.inference_mode():
        return model.caption(images, beam_size=beam_size, max_length=max_length)


def labels_batch(model: Any, group: Hashable, payloads: list[torch.Tensor]) -> Sequence[Any]:
    images = torch.stack(payloads)
    with torch.inference_mode():
        probs = model.predict(images)  # [B, 17]
    return [row.float().tolist() for row in probs]


def concepts_batch(model: Any, group: Hashable, payloads: list[torch.Tensor]) -> Sequence[Any]:
    images = torch.stack(payloads)
    with torch.inference_mode():
        return model.extract(images)


RUNNERS: dict[str, Callable[[Any, Hashable, list[torch.Tensor]], Sequence[Any]]] = {
    "caption": caption_batch,
    "labels": labels_batch,
    "concepts": concepts_batch,
}


def runner_for(role: str):
    return RUNNERS[role]
