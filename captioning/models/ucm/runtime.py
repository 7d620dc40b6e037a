"""What the service loads for the UCM models (``captioning.inference.TASKS``).

* ``load_classifier(version, store)`` -> ``UCMClassifier``: ``predict(images) -> [B, 17]`` probabilities,
  ``labels``, ``threshold`` (chosen on val at training time);
* ``load_captioner(version, store)`` -> ``UCMCaptioner``: ``caption(images, options)``; ``decoding`` is the
  model's published ``DecodeOptions`` (its config's ``decoding`` section: beam search with the repetition guard).

Every loader takes ``device`` and ``precision`` (``captioning.accel``); batches come in as CPU float32 and
results go back on the CPU.

Both rebuild the model from the manifest's config, load the (fp16 or fp32) safetensors as fp32, and
``preprocess(pil) -> [3, S, S]`` resizes and normalises exactly as training did.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from captioning.config import manifest_config
from captioning.config_schema import UCMConfig
from captioning.data.vocab import BOS_ID, EOS_ID, Vocabulary
from captioning.decoding import DecodeOptions, decode
from captioning.errors import StoreError
from captioning.inference import CaptionOut
from captioning.models.ucm.data import preprocess
from captioning.models.ucm.model import Captioner, MultiLabelClassifier
from captioning.models.ucm.store_io import VOCAB, WEIGHTS
from captioning.weights import load_into

if TYPE_CHECKING:  # pragma: no cover
    from captioning.store import ModelStore, ModelVersion

CLASSIFIER_JSON = "classifier.json"


class UCMPreprocessor:
    """PIL image -> ImageNet-normalised float32 ``[3, size, size]`` on the CPU (``captioning.models.ucm.data``).
    Small and picklable: it holds the side only."""

    def __init__(self, size: int) -> None:
        self.size = int(size)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return preprocess(image, self.size)

    def __repr__(self) -> str:
        return f"UCMPreprocessor(size={self.size})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UCMPreprocessor) and other.size == self.size

    def __hash__(self) -> int:
        return hash(("UCMPreprocessor", self.size))


class _Runtime:
    """``device``/``dtype``: where the weights live and what the ResNet trunk computes in; heads and the LSTM
    decoder stay float32. ``fast``: batch norms folded, channels-last, and ``dtype`` is the trunk's weight dtype
    (fp32 is then true float32, where the published configs' ``image.autocast: bfloat16`` ran the trunk under
    bf16 autocast). ``fast=False`` is the reference: the network as trained, the config's autocast honoured."""

    def __init__(
        self, version: ModelVersion, model: torch.nn.Module, input_size: int, *,
        device: str = "cpu", precision: str = "fp32", fast: bool = True, vision_runtime: str | None = None,
    ):
        from captioning.accel import runtime_placement
        from captioning.ov_runtime import resolve_vision_runtime

        self.name = version.name
        self.version = version.version
        self.manifest = version.manifest
        self.device, self.dtype = runtime_placement(device, precision)
        self.fast = bool(fast)
        self.model = model.eval().to(self.device)
        trunk = self.model.trunk if isinstance(self.model, MultiLabelClassifier) else self.model.encoder.trunk
        if fast:  # the runtime's precision decides (a config's training-time ``autocast`` no longer applies)
            trunk.autocast_dtype = None
            trunk.optimize_for_inference(self.dtype, fold=True, channels_last=True)
            if resolve_vision_runtime(vision_runtime, self.device) == "openvino":
                trunk.use_openvino("bf16" if self.dtype == torch.bfloat16 else "fp32", int(input_size))
        elif self.dtype != torch.float32:
            trunk.to(dtype=self.dtype)
            trunk.autocast_dtype = None
        self.input_size = int(input_size)
        self.preprocessor = UCMPreprocessor(self.input_size)
        self.preprocess = self.preprocessor

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        from captioning.accel import to_device

        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        return to_device(images.float(), self.device)


class UCMClassifier(_Runtime):
    def __init__(
        self, version: ModelVersion, model: MultiLabelClassifier, labels: list[str], threshold: float, input_size: int,
        **placement: Any,
    ):
        super().__init__(version, model, input_size, **placement)
        self.labels = list(labels)
        self.threshold = float(threshold)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] (CPU float32, from ``preprocess``) -> label probabilities [B, 17], float32 on CPU."""
        return torch.sigmoid(self.model(self._check(images)).float()).cpu()


class UCMCaptioner(_Runtime):
    def __init__(
        self, version: ModelVersion, model: Captioner, vocab: Vocabulary, decoding: DecodeOptions, input_size: int,
        **placement: Any,
    ):
        super().__init__(version, model, input_size, **placement)
        self.vocab = vocab
        self.decoding = decoding
        self.max_caption_length: int | None = None  # an LSTM has no position limit
        if self.fast:  # the beam search's compiled bookkeeping: compiled (or loaded) now, not on the first request
            from captioning import search_kernels

            search_kernels.warm_up()

    def decode_options(self, **overrides: Any) -> DecodeOptions:
        """The published decoding with non-None ``overrides``."""
        return DecodeOptions.from_dict(self.decoding.to_dict(), **overrides)

    @torch.no_grad()
    def caption(self, images: torch.Tensor, options: DecodeOptions) -> list[CaptionOut]:
        """images [B, 3, S, S] (CPU float32, from ``preprocess``) -> one caption each, decoded with ``options``
        (``self.decoding`` is the published one)."""
        if not isinstance(options, DecodeOptions):
            raise TypeError(f"caption(images, options): options must be a DecodeOptions, got {type(options).__name__}")
        hyps = decode(self.model, self._check(images), options, bos_id=BOS_ID, eos_id=EOS_ID, reference=not self.fast)
        out = []
        for hyp in hyps:
            tokens = self.vocab.decode(hyp.tokens)
            out.append(CaptionOut(text=" ".join(tokens), tokens=tokens, score=hyp.mean_log_prob))
        return out


def _config(version: ModelVersion) -> UCMConfig:
    """The manifest's config as the typed ``UCMConfig`` (the same schema as the YAML profiles)."""
    return manifest_config(version, UCMConfig)


def load_classifier(
    version: ModelVersion, store: ModelStore | None = None, *, device: str = "cpu", precision: str = "fp32",
    fast: bool = True, vision_runtime: str | None = None,
) -> UCMClassifier:
    config = _config(version)
    try:
        info = json.loads(version.file(CLASSIFIER_JSON).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreError(f"{version.name}@{version.version}: cannot read {CLASSIFIER_JSON} ({exc})") from None
    model = MultiLabelClassifier(config.image, len(info["labels"]))
    load_into(model, version.file(WEIGHTS))
    return UCMClassifier(
        version, model, info["labels"], info["threshold"], config.image.input_size,
        device=device, precision=precision, fast=fast, vision_runtime=vision_runtime,
    )


def load_captioner(
    version: ModelVersion, store: ModelStore | None = None, *, device: str = "cpu", precision: str = "fp32",
    fast: bool = True, vision_runtime: str | None = None,
) -> UCMCaptioner:
    config = _config(version)
    vocab = Vocabulary.load(version.file(VOCAB))
    model = Captioner(len(vocab), config.text, config.image, attention_dim=config.captioner.attention_dim)
    load_into(model, version.file(WEIGHTS))
    decoding = config.decoding.options()
    return UCMCaptioner(
        version, model, vocab, decoding, config.image.input_size, device=device, precision=precision, fast=fast,
        vision_runtime=vision_runtime,
    )
