"""The typed shape of every profile YAML (``captioning/configs/<family>/<profile>.yaml``).

One pydantic model per family (``UCMConfig``, ``ClipConfig``, ``ConceptsConfig``, ``LightCapConfig``), one
nested model per section. Every level forbids unknown keys, and values are checked strictly (an int field
takes an int, not ``"32"`` nor ``32.5``; a float field takes an int or a float; a bool field only
``true``/``false``), so a misspelt key or a wrong type in a YAML file is refused when it is loaded
(``captioning.config.load_config`` turns the error into a ``ConfigError`` naming the file and the dotted key).

Defaults exist only where the code reading a key had one before the schema (``cfg.get(key, default)``);
every other key must be in the file. ``to_dict()`` gives the plain dict stored in a published manifest:
exactly the keys that were given (file + overrides), so manifests keep the shape they always had and the
embedded model store's manifests validate against the same models (``validate_manifest_config``).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal, TypeVar, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from captioning.decode_options import DecodeOptions

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

WeightsDtype = Literal["float16", "bfloat16", "float32"]
Triple = Annotated[list[float], Field(min_length=3, max_length=3)]


class Section(BaseModel):
    """Base of every config model: unknown keys refused, strict types, assignments validated."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True, protected_namespaces=())

    def to_dict(self) -> dict[str, Any]:
        """The keys that were given (not the defaults filled in), as plain Python values.

        This is what a manifest stores and what code that takes a config dict section receives: it reads
        a missing key with the same default the schema has.
        """
        return self.model_dump(mode="python", exclude_unset=True)


S = TypeVar("S", bound=Section)


def expect_section(value: object, kind: type[S], what: str) -> S:
    """``value`` when it is a ``kind`` config section, else a ``TypeError`` naming ``what`` took it.

    Model constructors and builders take typed sections only (``load_config(...).text``,
    ``validate_manifest_config(...).image``); a plain dict is refused here rather than failing later on a
    missing attribute."""
    if not isinstance(value, kind):
        raise TypeError(
            f"{what} takes a {kind.__name__} config section (captioning.config_schema), got {type(value).__name__}; "
            f"build it with captioning.config.load_config(...) or validate_manifest_config(...)"
        )
    return value


# ================================================================================================ shared
class _DecodingSection(Section):
    """``decoding``: the published captioner's defaults, field for field ``DecodeOptions``'s."""

    @model_validator(mode="after")
    def _consistent(self) -> _DecodingSection:
        DecodeOptions(**self.model_dump())  # its range checks (min_length <= max_length ...) raise ValueError
        return self

    def options(self, **overrides: Any) -> DecodeOptions:
        """These defaults as a frozen ``DecodeOptions``, with the non-None ``overrides`` applied."""
        return DecodeOptions.from_dict(self.to_dict(), **overrides)


# the fields (names, types, defaults) are DecodeOptions' own: one definition of the search options
DecodingConfig = create_model(
    "DecodingConfig", __base__=_DecodingSection, __module__=__name__,
    **{f.name: (get_type_hints(DecodeOptions)[f.name], f.default) for f in dataclasses.fields(DecodeOptions)},
)
DecodingConfig.__doc__ = _DecodingSection.__doc__


# ================================================================================================ ucm
class UCMText(Section):
    """``text``: the LSTM text autoencoder (stage 1); the code is the final cell state."""

    embed_dim: int
    hidden_dim: int
    num_layers: int
    dropout: float = 0.0
    min_freq: int
    max_words: int


class UCMImage(Section):
    """``image``: the torchvision ResNet trunk of the classifier / image encoder."""

    block: Literal["basic", "bottleneck"] = "bottleneck"
    layers: Annotated[list[int], Field(min_length=4, max_length=4)] = [3, 4, 6, 3]
    stages: Annotated[int, Field(ge=1, le=4)] = 4
    input_size: int
    dropout: float = 0.0
    pretrained: str | None = None
    augment: bool = False
    channels_last: bool = False
    autocast: Literal["bfloat16", "float16"] | None = None


class UCMTextAE(Section):
    epochs: int
    batch_size: int
    lr: float
    grad_clip: float
    teacher_forcing: float = 1.0


class UCMClassifier(Section):
    batch_size: int
    fine_tune_epochs: int
    fine_tune_lr: float
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_epochs: int = 0
    head_epochs: int
    head_lr: float
    weight_decay: float = 0.0


class UCMDistill(Section):
    epochs: int
    batch_size: int
    image_lr: float
    text_lr_ratio: float
    loss: Literal["mse", "cosine"]
    grad_clip: float


class UCMCaptioner(Section):
    epochs: int
    batch_size: int
    encoder_lr: float
    decoder_lr: float
    teacher_forcing: float = 1.0
    label_smoothing: float = 0.0
    attention_dim: int = 0
    grad_clip: float
    report_meteor: bool = True


class UCMConfig(Section):
    """``captioning/configs/ucm/<profile>.yaml``: the four UCM stages share one file."""

    profile: str
    text: UCMText
    image: UCMImage
    weights_dtype: WeightsDtype = "float32"
    text_ae: UCMTextAE
    classifier: UCMClassifier
    distill: UCMDistill
    captioner: UCMCaptioner
    decoding: DecodingConfig = Field(default_factory=DecodingConfig)
    family: Literal["ucm"]


# ================================================================================================ clip
class ClipVisionCfg(Section):
    """``model.vision_cfg``: the open_clip ``CLIPVisionCfg`` keys this project uses (ModifiedResNet towers)."""

    layers: list[int]  # a list: CLIP's ResNet image tower (LightCap's grid encoder needs one)
    width: int = 64
    image_size: int = 224
    patch_size: int | None = None  # open_clip's RN50 config carries it (null for ResNets)


class ClipTextCfg(Section):
    """``model.text_cfg``: open_clip ``CLIPTextCfg`` keys; the tokenizer adds vocab_size, context_length and,
    for the word-level one, pool_type / eos_id / pad_id at training time (the published config has them)."""

    context_length: int | None = None
    vocab_size: int | None = None
    width: int | None = None
    heads: int | None = None
    layers: int | None = None
    pool_type: Literal["argmax", "eos", "first", "last", "none"] | None = None
    eos_id: int | None = None
    pad_id: int | None = None


class ClipModel(Section):
    """``model``: an open_clip model config (``open_clip.CLIP(**model)``), or ``name`` of open_clip's built-in
    config (e.g. RN50) whose keys the other entries override."""

    name: str | None = None
    embed_dim: int | None = None
    quick_gelu: bool = False
    vision_cfg: ClipVisionCfg | None = None
    text_cfg: ClipTextCfg | None = None

    @model_validator(mode="after")
    def _complete(self) -> ClipModel:
        if self.name is None:
            missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"without model.name, the model needs {', '.join(missing)}")
        return self


class ClipTokenizerCfg(Section):
    type: Literal["openai-bpe", "word-level"] = "openai-bpe"
    context_length: int = 77
    min_freq: int = 1


class ClipImage(Section):
    """``image``: the pixel normalisation (OpenAI's by default)."""

    mean: Triple = list(OPENAI_MEAN)
    std: Triple = list(OPENAI_STD)


class ClipTrain(Section):
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int = 0
    augment: bool = False
    concept_prompt_prob: float = 0.0
    concept_template: str = "a photo of a {}"
    val_batch_size: int = 128  # images / texts per forward pass of the val retrieval


class ClipConfig(Section):
    """``captioning/configs/clip/<profile>.yaml``."""

    profile: str
    model: ClipModel
    tokenizer: ClipTokenizerCfg = Field(default_factory=ClipTokenizerCfg)
    checkpoint: str | None = None
    image: ClipImage = Field(default_factory=ClipImage)
    train: ClipTrain
    weights_dtype: WeightsDtype = "float32"
    family: Literal["clip"]


# ================================================================================================ concepts
class ConceptsVocabulary(Section):
    source: Literal["synthetic", "file"] = "file"
    file: str | None = None
    template: str = "a photo of a {}"


class DetectorTrain(Section):
    """``detector.train``: the ultralytics ``train()`` arguments this project passes through (add one here to
    use another)."""

    epochs: int
    batch: int = 16
    optimizer: str | None = None
    lr0: float | None = None
    lrf: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    warmup_epochs: float | None = None
    cos_lr: bool | None = None
    patience: int | None = None
    mosaic: float | None = None
    close_mosaic: int | None = None
    mixup: float | None = None
    scale: float | None = None
    translate: float | None = None
    degrees: float | None = None
    flipud: float | None = None
    fliplr: float | None = None
    hsv_h: float | None = None
    hsv_s: float | None = None
    hsv_v: float | None = None


class DetectorCfg(Section):
    yaml: str = "yolov5n.yaml"
    imgsz: int = 640
    conf: float = 0.25
    iou: float = 0.6
    max_det: int = 50
    pretrained: str | None = None  # a local ultralytics .pt to start training from
    train: DetectorTrain


class AlignCfg(Section):
    roi_size: int = 2
    context: bool = False
    input_norm: bool = False
    hidden: int
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    box_jitter: float = 0.0


Fraction = Annotated[float, Field(gt=0.0, le=1.0)]


class InstanceConceptCfg(Section):
    """``extract.instance_concepts.<word>``: one concept word's own instance settings (null or absent: the
    extract section's; ``merge_ios: null`` given: this word does not merge)."""

    iou: Fraction | None = None
    min_score: float | None = None
    conf: float | None = None
    merge_ios: Fraction | None = None


class ExtractCfg(Section):
    top_k: int = 20
    proposal_conf: float | None = None  # None: detector.conf
    max_proposals: int | None = None  # None: detector.max_det
    min_score: float = 0.0
    # instances (every object): None = the code's defaults (DEFAULT_INSTANCE_* in models/lightcap/concepts.py)
    instance_iou: Fraction | None = None  # NMS IoU per concept
    instance_min_score: float | None = None  # score floor of an instance
    instance_conf: float | None = None  # objectness floor of an instance
    instance_merge_ios: Fraction | None = None  # merge a concept's boxes above this intersection over the smaller
    instance_concepts: dict[str, InstanceConceptCfg] | None = None  # per word; words checked against the vocabulary
    # per word [min, max] of its box's longer side (pixels; max null: none): proposals outside are no instance of it
    instance_sizes: dict[str, Annotated[list[float | None], Field(min_length=2, max_length=2)]] | None = None


class ConceptsConfig(Section):
    """``captioning/configs/concepts/<profile>.yaml``: detector, aligner and extractor in one file."""

    profile: str
    image_size: int | None = None  # None: the CLIP encoder's size
    encoder_size: int | None = None  # None: the CLIP encoder's size
    vocabulary: ConceptsVocabulary = Field(default_factory=ConceptsVocabulary)
    detector: DetectorCfg
    align: AlignCfg
    extract: ExtractCfg = Field(default_factory=ExtractCfg)
    weights_dtype: WeightsDtype = "float32"
    family: Literal["concepts"]


# ================================================================================================ lightcap
class LightCapTokenizerCfg(Section):
    type: Literal["word-level", "bert-dir"] = "word-level"
    vocab_size: int | None = None  # word-level: at most this many words (required for it)
    min_frequency: int = 1
    path: str | None = None  # bert-dir without model.fusion.pretrained: the BERT directory

    @model_validator(mode="after")
    def _sized(self) -> LightCapTokenizerCfg:
        if self.type == "word-level" and self.vocab_size is None:
            raise ValueError("a word-level tokenizer needs vocab_size")
        return self


class FusionCfg(Section):
    """``fusion``: transformers ``BertConfig`` sizes of the prefix-LM fusion module."""

    layers: int
    hidden: int
    heads: int
    intermediate: int
    max_positions: int = 512
    vocab_size: int | None = None  # word-embedding rows; a smaller tokenizer uses the first rows
    dropout: float = 0.1
    attention_dropout: float = 0.1
    attention: Literal["sdpa", "eager"] = "sdpa"
    pretrained: str | None = None  # a local (Tiny)BERT directory

    @model_validator(mode="after")
    def _heads_divide(self) -> FusionCfg:
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not a multiple of heads {self.heads}")
        return self


class CaptionerCfg(Section):
    """``model`` (the student) and ``teacher``: one LightCap captioner's architecture."""

    fusion: FusionCfg
    use_concepts: bool
    use_modulator: bool
    modulator_hidden: int
    head_branches: int
    max_concepts: int
    max_concept_tokens: int
    max_caption_length: int
    visual_grid: int | None = None  # None: every grid cell is a visual token


class LightCapTrain(Section):
    epochs: int
    batch_size: int
    samples_per_image: int
    lr: float
    weight_decay: float
    warmup_steps: int
    grad_clip: float
    label_smoothing: float = 0.0
    autocast: Literal["bfloat16"] | None = None


class KDCfg(Section):
    teacher_seeds: list[int]
    ce_weight: float
    token: bool
    token_weight: float
    temperature: float
    hidden: bool
    hidden_weight: float
    attention: bool
    attention_weight: float
    sequence: bool
    sequence_beam_size: int


class LightCapEval(Section):
    batch_size: int
    meteor: bool = True
    latency_images: int = 20
    latency_threads: int = 1


class LightCapConfig(Section):
    """``captioning/configs/lightcap/<profile>.yaml``: student, teachers, distillation and decoding."""

    profile: str
    concepts: str | None = None  # a concepts spec (e.g. concepts@2); None: the newest of the profile
    tokenizer: LightCapTokenizerCfg
    model: CaptionerCfg
    teacher: CaptionerCfg
    train: LightCapTrain
    kd: KDCfg
    decoding: DecodingConfig = Field(default_factory=DecodingConfig)
    eval: LightCapEval
    weights_dtype: WeightsDtype = "float32"
    family: Literal["lightcap"]


# ================================================================================================ tables
FAMILIES: dict[str, type[Section]] = {
    "ucm": UCMConfig,
    "clip": ClipConfig,
    "concepts": ConceptsConfig,
    "lightcap": LightCapConfig,
}

# the family whose config a published task's manifest stores
TASK_FAMILY: dict[str, str] = {
    "ucm-text-ae": "ucm",
    "ucm-classifier": "ucm",
    "ucm-distill": "ucm",
    "ucm-captioner": "ucm",
    "clip": "clip",
    "concepts-detector": "concepts",
    "concepts": "concepts",
    "lightcap-teacher": "lightcap",
    "lightcap": "lightcap",
}

AnyConfig = UCMConfig | ClipConfig | ConceptsConfig | LightCapConfig
