"""CLIP for LightCap: the open_clip model, its tokenizer, and the grid image encoder.

LightCap (seed 003) keeps only the ResNet trunk of CLIP's image tower: open_clip's ``ModifiedResNet`` with
the attention pooler dropped, so an image becomes a grid of region features (RN50: 7x7x2048 at 224x224).
The text tower is used once, offline, to embed the concept vocabulary ("a photo of a [object]").

The model is always open_clip's own: ``open_clip.CLIP(**model_config)``, where the model config is either
a built-in open_clip config looked up by name (``{"name": "RN50"}`` -> ``open_clip.get_model_config``,
exactly what ``open_clip.create_model("RN50")`` builds) or an inline dict in the same format (the tiny
profile: a smaller ``ModifiedResNet`` because ``vision_cfg.layers`` is a list).

Public API
----------
``clip_model_config(config.model) -> dict``  the open_clip model config (``open_clip.CLIP(**it)``) of a typed
                                             ``model`` section (``captioning.config_schema.ClipModel``)
``build_clip(config) -> open_clip.CLIP``     random weights (``config.checkpoint`` loads a local file)
``read_clip_state_dict(path) -> dict``       OpenAI TorchScript archive / OpenAI or open_clip state dict / safetensors
``load_clip_weights(model, path)``           into a CLIP (strict) or a GridEncoder (visual trunk only)
``ClipTokenizer``                            open_clip's BPE ``SimpleTokenizer`` or a small word-level one
``GridEncoder``                              images [B,3,H,W] in [0,1] -> grid [B, C, H/32, W/32]
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from captioning.config_schema import ClipConfig, ClipModel, ClipVisionCfg, expect_section
from captioning.errors import ConfigError

# OpenAI's CLIP normalisation (open_clip.constants.OPENAI_DATASET_MEAN / _STD); kept here so that importing
# this module does not import open_clip.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# metadata entries of OpenAI checkpoints that are not tensors of the model
_OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")


# ---------------------------------------------------------------------------------------------- model config
def clip_model_config(model: ClipModel) -> dict[str, Any]:
    """The open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``, ``quick_gelu`` ...) of a clip
    config's ``model`` section: open_clip's own format (a plain dict of ``open_clip.CLIP`` arguments).

    ``name: RN50`` starts from open_clip's built-in config; the other keys given override it.
    """
    model_dict = copy.deepcopy(expect_section(model, ClipModel, "clip_model_config(model)").to_dict())
    name = model_dict.pop("name", None)
    if name is not None:
        import open_clip

        base = open_clip.get_model_config(name)
        if base is None:
            raise ConfigError(f"clip config: model.name {name!r} is not an open_clip model config")
        base.update(model_dict)
        model_dict = base
    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in model_dict:
            raise ConfigError(f"clip config: model is missing {key!r}")
    if not isinstance(model_dict["vision_cfg"].get("layers"), (list, tuple)):
        raise ConfigError(
            "clip config: model.vision_cfg.layers must be a list (a ModifiedResNet, as in RN50); "
            "LightCap's grid encoder needs CLIP's ResNet image tower"
        )
    return model_dict


def clip_vision_config(model: ClipModel) -> ClipVisionCfg:
    """The typed image tower (``vision_cfg``) of a ``model`` section, ``name`` resolved."""
    from pydantic import ValidationError

    vision = clip_model_config(model)["vision_cfg"]
    try:
        return ClipVisionCfg.model_validate(vision)
    except ValidationError as exc:
        raise ConfigError(f"clip config: model.vision_cfg does not fit the config schema: {exc}") from None


def build_clip(config: ClipConfig) -> nn.Module:
    """An ``open_clip.CLIP`` from a clip config; loads ``config.checkpoint`` (a local file) when set."""
    import open_clip

    config = expect_section(config, ClipConfig, "build_clip(config)")
    model_cfg = clip_model_config(config.model)
    model_cfg.pop("pretrained", None)
    try:
        model = open_clip.CLIP(**model_cfg)
    except TypeError as exc:
        raise ConfigError(f"clip config: open_clip.CLIP rejected the model config: {exc}") from exc
    if config.checkpoint:
        load_clip_weights(model, config.checkpoint)
    return model


# ---------------------------------------------------------------------------------------------- checkpoints
def read_clip_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a CLIP checkpoint from a local file into an open_clip-style state dict.

    Accepts OpenAI's TorchScript archives (``RN50.pt``), OpenAI/open_clip state dicts saved with
    ``torch.save`` (optionally under ``"state_dict"``, optionally with a DDP ``module.`` prefix) and
    safetensors files. OpenAI's metadata entries (input_resolution, context_length, vocab_size) are dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: CLIP checkpoint file not found")
    try:
        if path.suffix == ".safetensors":
            from captioning.weights import load_state

            state: Any = load_state(path)
        else:
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*TorchScript archive.*")
                    state = torch.load(path, map_location="cpu", weights_only=True)
            except RuntimeError as exc:  # a TorchScript archive (OpenAI's own files)
                if "TorchScript" not in str(exc) and "jit" not in str(exc).lower():
                    raise
                state = torch.jit.load(str(path), map_location="cpu")
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ConfigError(f"{path}: cannot read CLIP checkpoint ({type(exc).__name__}: {exc})") from exc
    if isinstance(state, torch.jit.ScriptModule):
        state = state.state_dict()
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise ConfigError(f"{path}: not a CLIP state dict (got {type(state).__name__})")
    state = dict(state)
    for key in _OPENAI_META_KEYS:
        state.pop(key, None)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConfigError(f"{path}: entries that are not tensors: {', '.join(bad[:5])}")
    return state


def load_clip_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local CLIP checkpoint into an open_clip CLIP (every tensor must match) or a GridEncoder."""
    state = read_clip_state_dict(path)
    if isinstance(model, GridEncoder):
        model.load_clip_state_dict(state, source=str(path))
        return
    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    _check_and_load(model, state, source=str(path))


def _check_and_load(module: nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} tensors of the wrong shape (e.g. {k}: {tuple(state[k].shape)} "
                f"instead of {tuple(expected[k].shape)})"
            )
        raise ConfigError(f"{source}: checkpoint does not fit the configured CLIP model: {'; '.join(parts)}")
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


# ---------------------------------------------------------------------------------------------- tokenizer
class ClipTokenizer:
    """Text -> token ids ``LongTensor[N, context_length]`` for the CLIP text tower.

    * ``openai-bpe``: open_clip's ``SimpleTokenizer`` (49,408 BPE tokens, ships with open_clip, offline);
      what OpenAI's RN50 was trained with, so the paper profile uses it.
    * ``word-level``: a ``tokenizers`` WordLevel model built from the training captions and the concept
      words (lower-cased, split on whitespace and punctuation). The tiny profile uses it because the
      synthetic grammar has a few hundred words: a 49,408-row token embedding would be ~6M parameters
      (12 MB in fp16), most of the embedded-default budget, to encode words that never occur. Its end
      token is ``<eot>``; the text tower pools there (open_clip ``text_cfg.pool_type: eos``).
    """

    SPECIALS = ("<pad>", "<unk>", "<sot>", "<eot>")

    def __init__(self, kind: str, context_length: int, tokenizer: Any):
        self.kind = kind
        self.context_length = int(context_length)
        self._tok = tokenizer

    # construction
    @classmethod
    def openai_bpe(cls, context_length: int = 77) -> ClipTokenizer:
        from open_clip.tokenizer import SimpleTokenizer

        return cls("openai-bpe", context_length, SimpleTokenizer(context_length=context_length))

    @classmethod
    def train_word_level(cls, texts: Iterable[str], context_length: int, min_freq: int = 1) -> ClipTokenizer:
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        trainer = trainers.WordLevelTrainer(special_tokens=list(cls.SPECIALS), min_frequency=int(min_freq))
        tok.train_from_iterator(list(texts), trainer=trainer)
        return cls._finish_word_level(tok, context_length)

    @classmethod
    def _finish_word_level(cls, tok: Any, context_length: int) -> ClipTokenizer:
        from tokenizers import processors

        sot, eot = tok.token_to_id("<sot>"), tok.token_to_id("<eot>")
        tok.post_processor = processors.TemplateProcessing(
            single="<sot> $A <eot>", special_tokens=[("<sot>", sot), ("<eot>", eot)]
        )
        tok.enable_truncation(int(context_length))
        tok.enable_padding(pad_id=tok.token_to_id("<pad>"), pad_token="<pad>", length=int(context_length))
        return cls("word-level", context_length, tok)

    @classmethod
    def from_config(cls, config: ClipConfig, folder: str | Path | None = None) -> ClipTokenizer:
        """The tokenizer of a clip config; a word-level one is read from ``folder/tokenizer.json``."""
        section = expect_section(config, ClipConfig, "ClipTokenizer.from_config(config)").tokenizer
        kind = section.type
        context_length = section.context_length
        if kind == "openai-bpe":
            return cls.openai_bpe(context_length)
        if kind == "word-level":
            if folder is None:
                raise ConfigError("word-level CLIP tokenizer: no folder to read tokenizer.json from")
            path = Path(folder) / "tokenizer.json"
            if not path.is_file():
                raise ConfigError(f"{path}: word-level CLIP tokenizer file not found")
            from tokenizers import Tokenizer

            try:
                tok = Tokenizer.from_file(str(path))
            except Exception as exc:  # noqa: BLE001
                raise ConfigError(f"{path}: not a tokenizers file ({exc})") from exc
            return cls._finish_word_level(tok, context_length)
        raise ConfigError(f"clip config: tokenizer.type {kind!r} is not one of openai-bpe, word-level")

    # use
    @property
    def vocab_size(self) -> int:
        return self._tok.vocab_size if self.kind == "openai-bpe" else self._tok.get_vocab_size()

    @property
    def eot_id(self) -> int:
        return self._tok.eot_token_id if self.kind == "openai-bpe" else self._tok.token_to_id("<eot>")

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        if self.kind == "openai-bpe":
            return self._tok(texts, context_length=self.context_length)
        return torch.tensor([e.ids for e in self._tok.encode_batch(list(texts))], dtype=torch.long)

    def unknown_words(self, text: str) -> list[str]:
        """Words of ``text`` the tokenizer maps to ``<unk>`` (always none for byte-level BPE)."""
        if self.kind == "openai-bpe":
            return []
        enc = self._tok.encode(text)
        unk = self._tok.token_to_id("<unk>")
        return [text[start:end] for (start, end), i in zip(enc.offsets, enc.ids, strict=True) if i == unk]

    def save(self, folder: str | Path) -> list[Path]:
        """Write what is needed to rebuild it (nothing for the BPE one, which ships with open_clip)."""
        if self.kind == "openai-bpe":
            return []
        path = Path(folder) / "tokenizer.json"
        self._tok.save(str(path))
        return [path]

    def text_cfg_overrides(self) -> dict[str, Any]:
        """What the text tower must agree on with this tokenizer."""
        out: dict[str, Any] = {"vocab_size": self.vocab_size, "context_length": self.context_length}
        if self.kind == "word-level":
            out.update(pool_type="eos", eos_id=self.eot_id, pad_id=0)
        return out


# ---------------------------------------------------------------------------------------------- grid encoder
class GridEncoder(nn.Module):
    """CLIP's ResNet image tower without its attention pooler: images -> grid of region features.

    ``forward(images)``: ``images`` is ``[B, 3, H, W]`` RGB in [0, 1] (what ``preprocess`` returns);
    the CLIP normalisation happens inside. Returns ``[B, C, H/32, W/32]`` (RN50 at 224: ``[B, 2048, 7, 7]``).
    Attributes: ``channels`` (C), ``stride`` (32), ``image_size`` (the side it was trained at).
    ``freeze()`` makes it a fixed feature extractor (no gradients, BatchNorm kept in eval mode).
    """

    stride = 32

    def __init__(self, vision: ClipVisionCfg, *, mean=OPENAI_MEAN, std=OPENAI_STD):
        super().__init__()
        from open_clip.modified_resnet import ModifiedResNet

        vision = expect_section(vision, ClipVisionCfg, "GridEncoder(vision)")
        layers = list(vision.layers)
        width = vision.width
        self.image_size = vision.image_size
        # output_dim/heads only size the attention pooler, which is dropped right away
        self.trunk = ModifiedResNet(layers=layers, output_dim=1, heads=1, image_size=self.image_size, width=width)
        self.trunk.attnpool = None
        self.channels = width * 32
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.frozen = False

    # construction ------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: ClipConfig) -> GridEncoder:
        """Random weights in the shape of the config's vision tower; ``config.checkpoint`` (a file) is loaded."""
        config = expect_section(config, ClipConfig, "GridEncoder.from_config(config)")
        encoder = cls(clip_vision_config(config.model), **_norm(config))
        if config.checkpoint:
            load_clip_weights(encoder, config.checkpoint)
        return encoder

    @classmethod
    def from_clip(cls, clip: nn.Module, config: ClipConfig) -> GridEncoder:
        """Share no memory with ``clip``: copies its visual trunk's weights."""
        config = expect_section(config, ClipConfig, "GridEncoder.from_clip(config)")
        encoder = cls(clip_vision_config(config.model), **_norm(config))
        encoder.load_clip_state_dict(clip.state_dict(), source="CLIP model")
        return encoder

    def load_clip_state_dict(self, state: dict[str, torch.Tensor], *, source: str) -> None:
        """Load the ``visual.*`` tensors of a full CLIP state dict (the attention pooler's are ignored)."""
        trunk_state = {
            k[len("visual."):]: v
            for k, v in state.items()
            if k.startswith("visual.") and not k.startswith("visual.attnpool.")
        }
        if not trunk_state:
            raise ConfigError(f"{source}: no visual.* tensors: not a CLIP checkpoint with a ResNet image tower")
        _check_and_load(self.trunk, trunk_state, source=source)

    # use ---------------------------------------------------------------------------------------------
    def freeze(self) -> GridEncoder:
        self.requires_grad_(False)
        self.frozen = True
        return self.eval()

    def train(self, mode: bool = True) -> GridEncoder:
        return super().train(mode and not self.frozen)

    def optimize_for_inference(self, dtype: torch.dtype = torch.float32, *, channels_last: bool = True) -> int:
        """Fold the trunk's batch norms into its convolutions, store the weights in ``dtype`` and (optionally)
        lay them out channels-last. Returns the number of batch norms folded. Frozen encoders only."""
        from captioning.accel import fold_batch_norms

        if not self.frozen:
            raise ValueError("optimize_for_inference: freeze() the grid encoder first (it folds running statistics)")
        folded = fold_batch_norms(self.trunk)
        self.trunk.to(dtype=dtype)
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.trunk.to(memory_format=torch.channels_last)
        return folded

    accelerated = None  # an OpenVinoNet running the trunk (``use_openvino``), else the torch trunk runs

    def use_openvino(self, precision: str, size: int, *, share: str | None = None) -> None:
        """Run the (folded) trunk on OpenVINO in ``precision`` for CPU batches of ``size`` x ``size`` pixels
        (what ``ConceptExtractor.grid`` feeds); other inputs keep the torch trunk. ``share``: the published
        version these weights come from; encoders of the same one share one converted network."""
        from captioning.ov_runtime import OpenVinoNet
        from captioning.sharing import shared

        def build() -> OpenVinoNet:
            network = TrunkToGrid(self.trunk, mean=self.pixel_mean, std=self.pixel_std)
            return OpenVinoNet(network, torch.zeros(1, 3, size, size), precision=precision, name="CLIP trunk")

        self.accelerated = build() if share is None else shared(("CLIP trunk", share, precision, size), build)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` on any device (moved to the encoder's); returns float32 whatever the compute dtype."""
        weight = self.trunk.conv1.weight
        images = images.to(weight.device, non_blocking=True).float()  # [B,3,H,W] in [0, 1]
        if self.accelerated is not None and self.accelerated.accepts(images):
            return self.accelerated(images)  # normalises inside the converted network (no batch-sized temporaries)
        x = ((images - self.pixel_mean) / self.pixel_std).to(weight.dtype)
        if getattr(self, "channels_last", False):
            x = x.contiguous(memory_format=torch.channels_last)
        return trunk_to_grid(self.trunk, x).float().contiguous()

    def preprocess(self, image: Any) -> torch.Tensor:
        """PIL image -> ``[3, S, S]`` float in [0, 1], S = ``image_size`` (aspect not kept, as in UCM tiles)."""
        return pil_to_tensor(image, self.image_size)


def trunk_to_grid(trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip's ModifiedResNet up to its last stage (no attention pool): normalised [B,3,H,W] -> grid."""
    x = trunk.stem(x)  # [B, width, H/4, W/4]
    x = trunk.layer1(x)  # [B, 4w, H/4, W/4]
    x = trunk.layer2(x)  # [B, 8w, H/8, W/8]
    x = trunk.layer3(x)  # [B, 16w, H/16, W/16]
    return trunk.layer4(x)  # [B, 32w, H/32, W/32]


class TrunkToGrid(nn.Module):
    """``trunk_to_grid`` as a module (what OpenVINO converts); with ``mean``/``std`` ``[1,3,1,1]`` it takes
    images in [0, 1] and normalises them first."""

    def __init__(self, trunk: nn.Module, *, mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
        super().__init__()
        self.trunk = trunk
        self.normalise = mean is not None
        if self.normalise:
            self.register_buffer("mean", mean.detach().float().clone(), persistent=False)
            self.register_buffer("std", std.detach().float().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalise:
            x = (x - self.mean) / self.std
        return trunk_to_grid(self.trunk, x)


class PilToTensor:
    """The preprocessor of LightCap's runtimes: PIL image -> ``[3, size, size]`` float32 RGB in [0, 1] on the CPU.

    Small and picklable (holds the side only, no weights), so worker processes can preprocess."""

    def __init__(self, size: int) -> None:
        self.size = int(size)

    def __call__(self, image: Any) -> torch.Tensor:
        return pil_to_tensor(image, self.size)

    def __repr__(self) -> str:
        return f"PilToTensor(size={self.size})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PilToTensor) and other.size == self.size

    def __hash__(self) -> int:
        return hash(("PilToTensor", self.size))


def _norm(config: ClipConfig) -> dict[str, Any]:
    return {"mean": tuple(config.image.mean), "std": tuple(config.image.std)}


def pil_to_tensor(image: Any, size: int) -> torch.Tensor:
    """PIL image (any mode) -> ``[3, size, size]`` float32 RGB in [0, 1] (bicubic resize)."""
    import numpy as np
    from PIL import Image

    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)  # [S,S,3]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """``[B,3,H,W]`` -> ``[B,3,size,size]`` (no-op when already that size)."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp_(0, 1)

