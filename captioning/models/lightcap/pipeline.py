"""LightCap end to end: concept extractor (frozen CLIP grid + concepts) -> captioner -> text.

* ``build_captioner(config.model, ...)``: a new ``LightCapCaptioner`` from a profile's typed ``model``/``teacher``
  section (``captioning.config_schema.CaptionerCfg``), loading a local (Tiny)BERT directory into the fusion module
  when ``fusion.pretrained`` is set.
* ``save_captioner(folder, ...)`` / ``load_captioner_folder(folder)``: the files of a published captioner::

      captioner.safetensors   weights (tied word embedding stored once; fp16 for the tiny defaults)
      model.json              the architecture dict (rebuilds the exact network) + decoding defaults
      tokenizer.json          the caption tokenizer

* ``LightCapPipeline``: the runtime object of task ``lightcap`` (docs/ARCHITECTURE.md "Inference contract"):
  ``preprocess(pil) -> [3,S,S]`` and ``caption(images [B,3,S,S], options) -> list[CaptionOut]``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from captioning.config_schema import (
    CaptionerCfg,
    DecodingConfig,
    FusionCfg,
    LightCapTokenizerCfg,
    expect_section,
)
from captioning.errors import ConfigError, StoreError
from captioning.models.lightcap.captioner import ConceptInputs, ConceptPacker, LightCapCaptioner, build_arch
from captioning.models.lightcap.tokenizer import TOKENIZER_FILE, CaptionTokenizer

WEIGHTS_FILE = "captioner.safetensors"
ARCH_FILE = "model.json"
TIED_PREFIX = "head.word_embeddings."  # the head's view of fusion.bert.embeddings.word_embeddings

if TYPE_CHECKING:  # pragma: no cover
    from captioning.decoding import DecodeOptions


# ---------------------------------------------------------------------------------------------- building
def make_tokenizer(
    tokenizer: LightCapTokenizerCfg, model: CaptionerCfg, captions: list[str] | None
) -> CaptionTokenizer:
    """The caption tokenizer of a config's ``tokenizer`` section (``model.fusion.pretrained`` is the BERT
    directory of ``bert-dir``); a word-level one is trained on ``captions``."""
    tokenizer = expect_section(tokenizer, LightCapTokenizerCfg, "make_tokenizer(tokenizer)")
    model = expect_section(model, CaptionerCfg, "make_tokenizer(model)")
    if tokenizer.type == "word-level":
        if captions is None:
            raise ConfigError("tokenizer.type word-level needs the training captions")
        assert tokenizer.vocab_size is not None  # the schema requires it for word-level
        return CaptionTokenizer.train(captions, vocab_size=tokenizer.vocab_size, min_frequency=tokenizer.min_frequency)
    folder = model.fusion.pretrained or tokenizer.path  # bert-dir (the schema allows no other type)
    if not folder:
        raise ConfigError("tokenizer.type bert-dir needs model.fusion.pretrained (or tokenizer.path): a BERT directory")
    return CaptionTokenizer.from_bert_dir(folder)


def build_captioner(
    model: CaptionerCfg, *, grid_channels: int, concept_dim: int, tokenizer: CaptionTokenizer
) -> LightCapCaptioner:
    """A fresh captioner of a ``model`` / ``teacher`` section; ``fusion.pretrained`` (a local BERT directory) is
    loaded when set."""
    model = expect_section(model, CaptionerCfg, "build_captioner(model)")
    fusion = model.fusion.to_dict()
    pretrained = fusion.get("pretrained")
    vocab_size = max(tokenizer.vocab_size, int(fusion.get("vocab_size", 0) or 0))
    if pretrained:
        from transformers import BertConfig

        if not (Path(pretrained) / "config.json").is_file():
            raise ConfigError(f"model.fusion.pretrained: {pretrained} has no config.json (a local BERT directory expected)")
        bert = BertConfig.from_pretrained(str(pretrained), local_files_only=True)
        if bert.vocab_size < tokenizer.vocab_size:
            raise ConfigError(
                f"fusion.pretrained {pretrained}: {bert.vocab_size} word embeddings < tokenizer's {tokenizer.vocab_size}"
            )
        # the stored architecture is what was loaded, so the model rebuilds without the directory
        fusion.update(
            layers=bert.num_hidden_layers, hidden=bert.hidden_size, heads=bert.num_attention_heads,
            intermediate=bert.intermediate_size, max_positions=bert.max_position_embeddings,
        )
        vocab_size = bert.vocab_size
    fusion["vocab_size"] = vocab_size
    sized = model.model_copy(update={"fusion": FusionCfg.model_validate(fusion)})
    arch = build_arch(sized, grid_channels=grid_channels, concept_dim=concept_dim, vocab_size=vocab_size)
    return LightCapCaptioner(arch, pretrained_dir=pretrained)


# ---------------------------------------------------------------------------------------------- files
def save_captioner(
    folder: str | Path,
    model: LightCapCaptioner,
    tokenizer: CaptionTokenizer,
    *,
    dtype: str = "float32",
    decoding: DecodingConfig | None = None,
) -> list[Path]:
    """Write the published captioner's files; ``decoding`` (the config's section) goes into ``model.json``."""
    from captioning.weights import save_state

    if decoding is not None:
        expect_section(decoding, DecodingConfig, "save_captioner(decoding=...)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(TIED_PREFIX)}
    weights = save_state(state, folder / WEIGHTS_FILE, dtype)
    arch_path = folder / ARCH_FILE
    meta = {"arch": model.arch, "decoding": decoding.to_dict() if decoding else {}, "dtype": dtype}
    arch_path.write_text(json.dumps(meta, indent=1))
    tok_path = tokenizer.save(folder / TOKENIZER_FILE)
    return [weights, arch_path, tok_path]


def load_captioner_folder(folder: str | Path) -> tuple[LightCapCaptioner, CaptionTokenizer, dict[str, Any]]:
    """(model in fp32 eval mode, tokenizer, the model.json dict) of a published captioner folder."""
    from captioning.weights import load_state

    folder = Path(folder)
    try:
        meta = json.loads((folder / ARCH_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"{folder / ARCH_FILE}: cannot read the captioner architecture ({exc})") from exc
    tokenizer = CaptionTokenizer.load(folder / TOKENIZER_FILE)
    model = LightCapCaptioner(meta["arch"])
    result = model.load_state_dict(load_state(folder / WEIGHTS_FILE), strict=False)  # fp32
    missing = [k for k in result.missing_keys if not k.startswith(TIED_PREFIX)]
    if missing or result.unexpected_keys:
        raise StoreError(
            f"{folder / WEIGHTS_FILE}: does not fit model.json (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})"
        )
    if tokenizer.vocab_size > model.arch["vocab_size"]:
        raise StoreError(f"{folder}: tokenizer has {tokenizer.vocab_size} words, the model {model.arch['vocab_size']}")
    return model.eval(), tokenizer, meta


# ---------------------------------------------------------------------------------------------- runtime
class LightCapPipeline:
    """Images -> captions with a concept extractor and a LightCap captioner (both frozen).

    The runtime contract (``captioning.inference``): ``name``, ``version``, ``manifest``, ``device``, ``dtype``,
    ``preprocessor`` (= ``preprocess``: PIL -> float32 CPU ``[3,S,S]``), ``decoding`` (the published
    ``DecodeOptions`` from ``model.json``) and ``caption(images, options)``.

    ``device``/``dtype`` are the extractor's (the CLIP and YOLO trunks compute in ``dtype``); the captioner's
    transformer stays float32 (it is small, its cost is per-step overhead, not arithmetic). ``fast``: the decode
    loop shares each image's prefix keys/values across its beams with a preallocated cache
    (``LightCapCaptioner.generate(fast=True)``), on the CPU as one compiled loop (``compiled_search``, compiled or
    loaded from its cache here, at load); ``fast=False`` is the reference loop (HF ``DynamicCache``).
    """

    def __init__(
        self,
        extractor: Any,
        model: LightCapCaptioner,
        tokenizer: CaptionTokenizer,
        *,
        decoding: DecodeOptions | None = None,
        name: str = "lightcap",
        version: int | None = None,
        manifest: dict[str, Any] | None = None,
        fast: bool = True,
    ) -> None:
        from captioning.decoding import DecodeOptions
        from captioning.models.lightcap.clip_encoder import PilToTensor

        if decoding is not None and not isinstance(decoding, DecodeOptions):
            raise TypeError(f"LightCapPipeline(decoding=...) takes a DecodeOptions, got {type(decoding).__name__}")
        self.extractor = extractor
        self.device = getattr(extractor, "device", torch.device("cpu"))
        self.dtype = getattr(extractor, "dtype", torch.float32)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.decoding = decoding if decoding is not None else DecodeOptions()
        self.name = name
        self.version = version
        self.manifest = manifest or {}
        self.fast = bool(fast)
        self.preprocessor = getattr(extractor, "preprocessor", None) or PilToTensor(extractor.image_size)
        self.preprocess = self.preprocessor
        vocab = extractor.vocab
        if vocab.dim != model.arch["concept_dim"]:
            raise StoreError(
                f"{name}: the concept extractor's embeddings are {vocab.dim}-d, the captioner expects {model.arch['concept_dim']}"
            )
        self.packer = ConceptPacker(
            vocab.words, vocab.embeddings, tokenizer,
            max_concepts=model.arch["max_concepts"], max_concept_tokens=model.arch["max_concept_tokens"],
        )
        # the published decoding's fast decoder, built once: the weights are frozen (LightCapCaptioner.generate)
        self._fast_decoder: Any = None
        if self.fast and self.device.type == "cpu":  # compile the CPU search now, not on the first request
            from captioning.models.lightcap import compiled_search
            from captioning.models.lightcap.captioner import FastLightCapDecoder

            self._fast_decoder = FastLightCapDecoder(self.model, self.decoding.max_length + 1)
            compiled_search.warm_up(self._fast_decoder)
        elif self.fast:  # on a GPU: the torch decoder under decoding.beam_search and its compiled bookkeeping
            from captioning import search_kernels

            search_kernels.warm_up()

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images [B,3,S,S] (CPU float32) -> CLIP grid [B,C,h,w] (float32, on ``device``), concept ids [B,K]
        (-1 = none), scores [B,K] (CPU)."""
        from captioning.accel import to_device

        images = to_device(images.float(), self.device)
        grid = self.extractor.grid(images)
        ids, scores, _ = self.extractor.extract_tensors(images, grid=grid)
        return grid, ids, scores

    def concept_inputs(self, ids: torch.Tensor, scores: torch.Tensor) -> ConceptInputs:
        return self.packer(ids, scores)

    @property
    def max_caption_length(self) -> int:
        """The longest caption the fusion's positions leave room for after the prefix (visual + concept tokens)."""
        arch = self.model.arch
        side = arch["visual_grid"] or self.extractor.encoder_size // self.extractor.encoder.stride
        prefix = side * side + (arch["max_concept_tokens"] if arch["use_concepts"] else 0)
        return int(self.model.fusion.bert.config.max_position_embeddings) - prefix - 1

    def decode_options(self, **overrides: Any):
        """The published decoding with non-None ``overrides`` (a new frozen ``DecodeOptions``)."""
        from captioning.decoding import DecodeOptions

        return DecodeOptions.from_dict(self.decoding.to_dict(), **overrides)

    @torch.no_grad()
    def caption_features(self, grid: torch.Tensor, ids: torch.Tensor, scores: torch.Tensor, options) -> list:
        from captioning.inference import CaptionOut

        concepts = self.packer(ids.cpu(), scores.cpu()).to(self.device)
        hyps = self.model.generate(
            grid.to(self.device).float(), concepts, options,
            bos_id=self.tokenizer.bos_id, eos_id=self.tokenizer.eos_id, fast=self.fast, kept=self._fast_decoder,
        )
        outs = []
        for hyp in hyps:
            words = self.tokenizer.words(hyp.tokens)
            outs.append(CaptionOut(text=" ".join(words), tokens=words, score=float(hyp.mean_log_prob)))
        return outs

    @torch.no_grad()
    def caption(self, images: torch.Tensor, options) -> list:
        """``images [B,3,S,S]`` (CPU float32, from ``preprocess``) -> captions decoded with ``options`` (a
        ``DecodeOptions``; ``self.decoding`` is the published one). Concept words in ``extra["concepts"]``."""
        from captioning.decoding import DecodeOptions

        if not isinstance(options, DecodeOptions):
            raise TypeError(f"caption(images, options): options must be a DecodeOptions, got {type(options).__name__}")
        grid, ids, scores = self.features(images)
        outs = self.caption_features(grid, ids, scores, options)
        for out, row_ids, row_scores in zip(outs, ids.tolist(), scores.tolist(), strict=True):
            out.extra["concepts"] = [
                {"concept": self.extractor.vocab.words[c], "score": round(float(s), 4)}
                for c, s in zip(row_ids, row_scores, strict=True) if c >= 0
            ]
        return outs


def published_decoding(meta: dict[str, Any], *, where: str) -> DecodeOptions:
    """The ``decoding`` of a captioner's ``model.json`` (its config's section as published), checked by the same
    schema as the YAML profiles."""
    from pydantic import ValidationError

    try:
        return DecodingConfig.model_validate(meta.get("decoding") or {}).options()
    except ValidationError as exc:
        raise StoreError(f"{where}: decoding does not fit the config schema: {exc}") from None


def concepts_parent(version) -> dict[str, Any]:
    """The concept extractor a LightCap version was trained on (``extra.concepts``, else its ``concepts`` parent)."""
    used = (version.manifest.get("extra") or {}).get("concepts")
    if used:
        return used
    for parent in version.manifest.get("parents", []):
        if parent.get("name") == "concepts":
            return parent
    raise StoreError(f"{version.name}@{version.version}: the manifest names no concept extractor")


def load_lightcap(
    version, store, *, device: str = "cpu", precision: str = "fp32", fast: bool = True,
    vision_runtime: str | None = None,
) -> LightCapPipeline:
    """The runtime object of a stored LightCap captioner (student or teacher) and its concept extractor, on
    ``device`` in ``precision``; ``fast=False`` builds the reference path (unfolded networks, reference decoder)."""
    from captioning.models.lightcap.runtime import load_concept_extractor

    parent = concepts_parent(version)
    concepts_version = store.load(f"{parent['name']}@{parent['version']}")
    extractor = load_concept_extractor(concepts_version, store, device=device, precision=precision, fast=fast,
                                       vision_runtime=vision_runtime)
    model, tokenizer, meta = load_captioner_folder(version.path)
    return LightCapPipeline(
        extractor, model, tokenizer, decoding=published_decoding(meta, where=f"{version.spec}: {ARCH_FILE}"),
        name=version.name, version=version.version, manifest=version.manifest, fast=fast,
    )
