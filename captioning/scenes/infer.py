"""``infer`` callables over the model store's runtimes, for the CLI (the service routes tiles through its own
batching pools and builds ``TileResult``s the same way, see ``results_from``).

``ModelInfer(labeller, extractor=None, captioner=None)`` takes loaded runtimes (``captioning.inference.load_model``):
the label predictor (``predict`` -> [B, 17] probabilities, ``labels``, ``threshold``), the concept extractor
(``extract`` -> per image a list of ``Concept(concept, score, box, label)``, boxes in preprocessed pixels)
and a captioner (``caption``). Each gets its own ``preprocess``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from captioning.scenes.job import Instance, TileResult

CAPTIONERS = {"lightcap": "lightcap", "ucm": "ucm-captioner"}


def _batch(model: Any, images: Sequence[Image.Image]) -> torch.Tensor:
    return torch.stack([model.preprocess(im) for im in images])


def call_caption(model: Any, batch: torch.Tensor) -> list:
    """The runtime contract's ``caption(images, options)`` with the model's published decoding; runtimes that
    still take only keyword options get ``caption(images)`` (which uses the same published decoding)."""
    if hasattr(model, "decoding"):
        params = list(inspect.signature(model.caption).parameters.values())
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(positional) >= 2:
            return model.caption(batch, model.decoding)
    return model.caption(batch)


def results_from(
    probabilities: torch.Tensor,
    labels: Sequence[str],
    threshold: float,
    concepts: Sequence[Sequence[Any]] | None,
    concept_input: tuple[int, int] | None,
    tile_size: tuple[int, int],
    captions: Sequence[str] | None = None,
) -> list[TileResult]:
    """Build ``TileResult``s from the runtimes' raw answers. ``concepts[i]`` are boxes in the extractor's input
    pixels ``concept_input`` (width, height); they are scaled onto the tile image ``tile_size``."""
    out = []
    probs = probabilities.detach().float().cpu().tolist()
    for i, row in enumerate(probs):
        instances = []
        if concepts is not None and concept_input is not None:
            sx, sy = tile_size[0] / concept_input[0], tile_size[1] / concept_input[1]
            for c in concepts[i]:
                x1, y1, x2, y2 = (float(v) for v in c.box)
                instances.append(
                    Instance(c.concept, float(c.score), (x1 * sx, y1 * sy, x2 * sx, y2 * sy), getattr(c, "label", None))
                )
        out.append(
            TileResult(
                probabilities=dict(zip(labels, row, strict=True)),
                threshold=float(threshold),
                instances=instances,
                caption=captions[i] if captions is not None else None,
            )
        )
    return out


class ModelInfer:
    """``infer(images) -> list[TileResult]`` over loaded runtimes; ``models`` lists ``name@version`` of each."""

    def __init__(self, labeller: Any, extractor: Any | None = None, captioner: Any | None = None):
        self.labeller, self.extractor, self.captioner = labeller, extractor, captioner
        self.models = tuple(f"{m.name}@{m.version}" for m in (labeller, extractor, captioner) if m is not None)

    @classmethod
    def from_store(
        cls, store: Any, *, concepts: bool = True, caption: str | None = None, **load_options: Any
    ) -> ModelInfer:
        """``load_options`` (e.g. ``device="cuda"``, ``precision="bf16"``) go to ``load_model`` (the runtime
        contract's keywords); a ``load_model`` without them refuses them with a ``UsageError``."""
        from captioning.errors import UsageError
        from captioning.inference import load_model

        accepted = inspect.signature(load_model).parameters
        unknown = [k for k in load_options if k not in accepted]
        if unknown:
            raise UsageError(f"this model loader takes no {', '.join(unknown)} option")

        def load(spec: str) -> Any:
            return load_model(store, spec, **load_options)

        labeller = load("ucm-classifier")
        extractor = load("concepts") if concepts else None
        captioner = None
        if caption and caption != "none":
            captioner = load(CAPTIONERS.get(caption, caption))
        return cls(labeller, extractor, captioner)

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> list[TileResult]:
        if not images:
            return []
        size = images[0].size
        probs = self.labeller.predict(_batch(self.labeller, images))
        concepts = concept_input = None
        if self.extractor is not None:
            batch = _batch(self.extractor, images)
            concepts = self.extractor.extract(batch)
            concept_input = (int(batch.shape[-1]), int(batch.shape[-2]))
        captions = None
        if self.captioner is not None:
            captions = [c.text for c in call_caption(self.captioner, _batch(self.captioner, images))]
        return results_from(probs, self.labeller.labels, self.labeller.threshold, concepts, concept_input, size, captions)
