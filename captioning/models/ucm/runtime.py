"""What the service loads for the UCM models (``captioning.inference.LOADERS``).

* ``load_classifier(version, store)`` -> ``UCMClassifier``: ``predict(images) -> [B, 17]`` probabilities,
  ``labels``, ``threshold`` (chosen on val at training time);
* ``load_captioner(version, store)`` -> ``UCMCaptioner``: ``caption(images, beam_size=..., ...)``; options
  left at None take the model's published decoding defaults (its config's ``decoding`` section: beam search
  with the repetition guard).

Both rebuild the model from the manifest's config, load the (fp16 or fp32) safetensors as fp32, and
``preprocess(pil) -> [3, S, S]`` resizes and normalises exactly as training did.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from captioning.data.vocab import BOS_ID, EOS_ID, Vocabulary
from captioning.decoding import DecodeOptions, decode
from captioning.errors import StoreError
from captioning.inference import CaptionOut
from captioning.models.ucm.data import preprocess
from captioning.models.ucm.model import Captioner, MultiLabelClassifier
from captioning.models.ucm.store_io import VOCAB, WEIGHTS, load_into

if TYPE_CHECKING:  # pragma: no cover
    from captioning.store import ModelStore, ModelVersion

CLASSIFIER_JSON = "classifier.json"


class _Runtime:
    def __init__(self, version: ModelVersion, model: torch.nn.Module, input_size: int):
        self.name = version.name
        self.version = version.version
        self.manifest = version.manifest
        self.model = model.eval()
        self.input_size = int(input_size)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return preprocess(image, self.input_size)

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        return images.float()


class UCMClassifier(_Runtime):
    def __init__(self, version: ModelVersion, model: MultiLabelClassifier, labels: list[str], threshold: float, input_size: int):
        super().__init__(version, model, input_size)
        self.labels = list(labels)
        self.threshold = float(threshold)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] (from ``preprocess``) -> label probabilities [B, 17]."""
        return torch.sigmoid(self.model(self._check(images)))


class UCMCaptioner(_Runtime):
    def __init__(self, version: ModelVersion, model: Captioner, vocab: Vocabulary, decoding: DecodeOptions, input_size: int):
        super().__init__(version, model, input_size)
        self.vocab = vocab
        self.decoding = decoding

    def options(self, **overrides: Any) -> DecodeOptions:
        return DecodeOptions.from_dict(self.decoding.to_dict(), **overrides)

    @torch.no_grad()
    def caption(self, images: torch.Tensor, options: DecodeOptions) -> list[CaptionOut]:
        """images [B, 3, S, S] -> one caption each, decoded with ``options`` (``self.decoding``: the published)."""
        hyps = decode(self.model, self._check(images), options, bos_id=BOS_ID, eos_id=EOS_ID)
        out = []
        for hyp in hyps:
            tokens = self.vocab.decode(hyp.tokens)
            out.append(CaptionOut(text=" ".join(tokens), tokens=tokens, score=hyp.mean_log_prob))
        return out


def _cpu_fp32_only(version: ModelVersion, device: str, precision: str) -> None:
    if str(device) != "cpu" or precision != "fp32":
        raise StoreError(f"{version.spec}: only device cpu / precision fp32 are implemented, not {device} / {precision}")


def _config(version: ModelVersion) -> dict[str, Any]:
    config = version.manifest.get("config")
    if not isinstance(config, dict) or "text" not in config or "image" not in config:
        raise StoreError(f"{version.name}@{version.version}: manifest has no UCM config (text / image sections)")
    return config


def load_classifier(version: ModelVersion, store: ModelStore | None = None, *, device: str = "cpu",
                    precision: str = "fp32") -> UCMClassifier:
    _cpu_fp32_only(version, device, precision)
    config = _config(version)
    try:
        info = json.loads(version.file(CLASSIFIER_JSON).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreError(f"{version.name}@{version.version}: cannot read {CLASSIFIER_JSON} ({exc})") from None
    model = MultiLabelClassifier(config["image"], len(info["labels"]))
    load_into(model, version.file(WEIGHTS))
    return UCMClassifier(version, model, info["labels"], info["threshold"], config["image"]["input_size"])


def load_captioner(version: ModelVersion, store: ModelStore | None = None, *, device: str = "cpu",
                   precision: str = "fp32") -> UCMCaptioner:
    _cpu_fp32_only(version, device, precision)
    config = _config(version)
    vocab = Vocabulary.load(version.file(VOCAB))
    model = Captioner(
        len(vocab), config["text"], config["image"], attention_dim=int(config["captioner"].get("attention_dim", 0))
    )
    load_into(model, version.file(WEIGHTS))
    decoding = DecodeOptions.from_dict(config.get("decoding"))
    return UCMCaptioner(version, model, vocab, decoding, config["image"]["input_size"])
