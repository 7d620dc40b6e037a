"""LightCap's visual concept extractor (seed 003, Sec. 3.1 "Visual Concept Extractor").

    image [B,3,S,S] in [0,1]
      |-- ProposalDetector (class-agnostic YOLOv5n) --> boxes [N_b, 4], objectness [N_b]   per image
      |-- GridEncoder (CLIP ResNet, frozen) ----------> grid [B, C, S/32, S/32]
    roi_align(grid, boxes) -> mean over r x r bins -> regions [R, C]
    RegionAligner: fc1 C->H, GELU, fc2 H->D, L2-normalise -> region embeddings [R, D]
    similarity with the concept vocabulary [V, D] (CLIP text embeddings of "a photo of a [object]", computed once
    at training time and stored) -> each region takes its most similar concept
    score = objectness * softmax(logit_scale * cos)[best]
    instances (``extract``): proposals whose box does not fit their concept's size dropped
    (``extract.instance_sizes``), NMS per concept (``torchvision.ops.batched_nms``, ``extract.instance_iou``), then
    ``score >= instance_min_score`` and ``objectness >= instance_conf``, then optionally a merge of the concept's
    boxes that cover each other (intersection over the smaller box > ``instance_merge_ios``: SAHI's greedy NMM);
    each of the four can differ per word (``extract.instance_concepts``): every object, e.g. 29 houses
    LightCap's words (``extract_tensors``, derived from the instances): per concept its best instance, drop scores
    below ``min_score``, keep the top K (K = 20 in the paper) -- exactly what the captioner was trained on.

Training (``training/concepts_align.py``) uses ground-truth boxes and ``region_concept_loss``: CLIP's symmetric
contrastive loss between region embeddings and the embeddings of their concept words, with CLIP frozen.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from captioning.config_schema import AlignCfg, ConceptsConfig, ConceptsVocabulary, expect_section
from captioning.errors import ConfigError
from captioning.inference import Concept, counts, group_concepts
from captioning.models.lightcap.clip_encoder import GridEncoder, pil_to_tensor, resize_batch
from captioning.models.lightcap.detector import ProposalDetector

VOCAB_EMBEDDINGS_FILE = "concept_embeddings.safetensors"
VOCAB_WORDS_FILE = "concepts.json"
ALIGNER_FILE = "aligner.safetensors"
DEFAULT_TEMPLATE = "a photo of a {}"
# instance settings when a config's extract section has none (the published ones predate instances): chosen on
# seed 1's val split for the lowest counting error by `captioner eval concepts --data data/synth-seed1 --split val
# --tune-instances` (docs/concepts.md "Instances and counts"), with DEFAULT_INSTANCE_SIZES applied
DEFAULT_INSTANCE_IOU = 0.6
DEFAULT_INSTANCE_MIN_SCORE = 0.18
DEFAULT_INSTANCE_CONF = 0.3
DEFAULT_INSTANCE_MERGE_IOS: float | None = None  # no merge unless a word asks for one
# per-word settings (``extract.instance_concepts``) when a config has none: chosen on seed 1's val split by
# ``captioner eval concepts --tune-instances`` (a word keeps its own setting only where it lowers that word's
# counting error on both halves of val; docs/concepts.md "Instance figures")
DEFAULT_INSTANCE_CONCEPTS: dict[str, dict[str, float | None]] = {
    "airplane": {"iou": 0.3, "min_score": 0.1, "conf": 0.15},
    "car": {"min_score": 0.14, "conf": 0.25},
    "boat": {"iou": 0.4, "min_score": 0.14, "conf": 0.15},
    "building": {"iou": 0.3, "min_score": 0.1, "conf": 0.15},
    "house": {"iou": 0.4, "min_score": 0.34, "conf": 0.15},
    "tree": {"iou": 0.5, "min_score": 0.34, "conf": 0.4},
    "diamond": {"iou": 0.3, "min_score": 0.1, "conf": 0.15},
}
INSTANCE_CONCEPT_KEYS = ("iou", "min_score", "conf", "merge_ios")
# the plausible size of each word's box (its longer side, in the preprocessed image's pixels) when a config's
# extract section has no ``instance_sizes``: a proposal whose word does not fit it is no instance of that word
# (a 28 px "car" is a mobile home read as a car). The smallest and largest box of each word in seed 1's train
# split, widened by 10 % (``captioner eval concepts --tune-instances`` derives them; docs/concepts.md).
DEFAULT_INSTANCE_SIZES: dict[str, tuple[float, float | None]] = {
    "airplane": (32.0, 101.4), "boat": (11.2, 37.3), "building": (19.7, 200.1), "bunker": (11.7, 46.9),
    "car": (10.1, 23.2), "court": (31.1, 72.4), "diamond": (48.2, 121.4), "dock": (51.3, 184.3),
    "house": (12.3, 46.1), "mobile home": (15.8, 36.5), "pond": (40.7, 281.2), "pool": (12.4, 27.2),
    "ship": (39.0, 115.8), "tank": (16.1, 52.8), "tree": (9.1, 30.7), "truck": (21.5, 37.4),
}


# ---------------------------------------------------------------------------------------------- vocabulary
def read_concept_list(path: str | Path) -> tuple[list[str], list[str | None]]:
    """A concept list file: one concept per line, optionally ``<TAB>label`` (one of the 17 remote-sensing labels).

    Blank lines and lines starting with ``#`` are skipped; a repeated concept is an error naming its lines.
    """
    from captioning.data import LABELS

    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read concept list ({exc.strerror})") from exc
    words: list[str] = []
    labels: list[str | None] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        word, _, label = (part.strip() for part in text.partition("\t"))
        word = " ".join(word.lower().split())
        if not word:
            raise ConfigError(f"{path}: line {number}: empty concept")
        if word in first_line:
            raise ConfigError(f"{path}: line {number}: concept {word!r} repeats line {first_line[word]}")
        if label and label not in LABELS:
            raise ConfigError(f"{path}: line {number}: label {label!r} is not one of the 17 labels")
        first_line[word] = number
        words.append(word)
        labels.append(label or None)
    if not words:
        raise ConfigError(f"{path}: no concepts in the file")
    return words, labels


def concept_words(vocabulary: ConceptsVocabulary) -> tuple[list[str], list[str | None]]:
    """The concept words (and the label each maps to) of a concepts config's ``vocabulary`` section.

    ``source: synthetic``: every concept of the synthetic grammar (objects and surfaces, with their labels) plus
    the 17 label words themselves; ``source: file``: a concept list file (``read_concept_list``), a relative path
    being relative to ``captioning/configs/concepts/``.
    """
    from captioning.config import CONFIG_DIR

    section = expect_section(vocabulary, ConceptsVocabulary, "concept_words(vocabulary)")
    source = section.source
    if source == "synthetic":
        from captioning.data import LABELS
        from captioning.data.synth.concepts import CONCEPTS

        words = list(CONCEPTS)
        labels = [CONCEPTS[w].label for w in words]
        for label in LABELS:
            if label not in words:
                words.append(label)
                labels.append(label)
        return words, labels
    if source == "file":
        if not section.file:
            raise ConfigError("concepts config: vocabulary.source is 'file' but vocabulary.file is not set")
        path = Path(section.file)
        if not path.is_absolute() and not path.is_file():
            path = CONFIG_DIR / "concepts" / path
        return read_concept_list(path)
    raise ConfigError(f"concepts config: vocabulary.source {source!r} is not one of synthetic, file")


@dataclass
class ConceptVocabulary:
    """Concept words, the remote-sensing label each maps to (or None), and their CLIP text embeddings [V, D]."""

    words: list[str]
    labels: list[str | None]
    embeddings: torch.Tensor  # [V, D], L2-normalised
    template: str = DEFAULT_TEMPLATE

    def __post_init__(self) -> None:
        if len(self.words) != len(self.labels) or len(self.words) != self.embeddings.shape[0]:
            raise ConfigError(
                f"concept vocabulary: {len(self.words)} words, {len(self.labels)} labels and "
                f"{self.embeddings.shape[0]} embeddings do not line up"
            )
        self.index = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def save(self, folder: str | Path, dtype: torch.dtype = torch.float16) -> list[Path]:
        from captioning.weights import DTYPES, save_state

        folder = Path(folder)
        names = {d: n for n, d in DTYPES.items()}
        emb_path = save_state({"embeddings": self.embeddings}, folder / VOCAB_EMBEDDINGS_FILE, names[dtype])
        words_path = folder / VOCAB_WORDS_FILE
        words_path.write_text(
            json.dumps({"template": self.template, "words": self.words, "labels": self.labels}, indent=1)
        )
        return [emb_path, words_path]

    @classmethod
    def load(cls, folder: str | Path) -> ConceptVocabulary:
        from captioning.errors import StoreError
        from captioning.weights import load_state

        folder = Path(folder)
        words_path, emb_path = folder / VOCAB_WORDS_FILE, folder / VOCAB_EMBEDDINGS_FILE
        try:
            meta = json.loads(words_path.read_text())
            embeddings = load_state(emb_path)["embeddings"]  # fp32
        except (OSError, ValueError, KeyError, StoreError) as exc:
            raise ConfigError(f"{folder}: cannot read the concept vocabulary ({exc})") from exc
        return cls(meta["words"], meta["labels"], F.normalize(embeddings, dim=-1), meta.get("template", DEFAULT_TEMPLATE))


@torch.no_grad()
def embed_concepts(
    clip: nn.Module, tokenizer: Any, words: list[str], template: str = DEFAULT_TEMPLATE, batch_size: int = 256
) -> torch.Tensor:
    """CLIP text embeddings of ``template.format(word)`` for every word -> ``[V, D]`` L2-normalised (done once)."""
    if "{}" not in template:
        raise ConfigError(f"concept template {template!r} has no '{{}}' for the word")
    missing = sorted({w for word in words for w in tokenizer.unknown_words(template.format(word))})
    if missing:
        raise ConfigError(f"CLIP tokenizer does not know the concept words {missing[:10]} (retrain clip with them)")
    was_training = clip.training
    clip.eval()
    device = next(clip.parameters()).device
    chunks = []
    for start in range(0, len(words), batch_size):
        tokens = tokenizer([template.format(w) for w in words[start : start + batch_size]]).to(device)
        chunks.append(clip.encode_text(tokens, normalize=True).float().cpu())
    clip.train(was_training)
    return torch.cat(chunks)


# ---------------------------------------------------------------------------------------------- region alignment
def pool_regions(
    grid: torch.Tensor,
    boxes: list[torch.Tensor],
    image_size: int,
    output_size: int,
    sampling_ratio: int = 2,
    *,
    context: bool = False,
) -> torch.Tensor:
    """ROIAlign each box (xyxy in pixels of an ``image_size`` square) from ``grid`` [B,C,h,w] -> [R, C].

    ``context=True`` appends the mean of the box's whole image grid to each region -> [R, 2C]: what kind of scene
    a small box sits in (storage tanks vs buildings, a harbour's docks vs boats) is evidence for its word.
    """
    from torchvision.ops import roi_align

    width = grid.shape[1] * (2 if context else 1)
    if sum(len(b) for b in boxes) == 0:
        return grid.new_zeros((0, width))
    pooled = roi_align(
        grid,
        [b.to(grid.dtype) for b in boxes],
        output_size=output_size,
        spatial_scale=grid.shape[-1] / float(image_size),
        sampling_ratio=sampling_ratio,
        aligned=True,
    )  # [R, C, r, r]
    regions = pooled.mean(dim=(2, 3))  # [R, C]
    if not context:
        return regions
    counts = torch.tensor([len(b) for b in boxes], device=grid.device)
    scene = torch.repeat_interleave(grid.mean(dim=(2, 3)), counts, dim=0)  # [R, C], each region's image
    return torch.cat([regions, scene], dim=1)  # [R, 2C]


class RegionAligner(nn.Module):
    """Two linear blocks mapping ROI features into the concept-embedding space (paper: 2048x1024, 1024x1024).

    ``input_norm``: a LayerNorm on the input first (the region and scene halves of a context feature differ in
    scale). ``from_config`` builds it from a concepts config's ``align`` section and the grid's channels.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: int,
        out_dim: int,
        init_logit_scale: float = math.log(1 / 0.07),
        *,
        input_norm: bool = False,
    ):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim) if input_norm else nn.Identity()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))

    @classmethod
    def from_config(cls, channels: int, align: AlignCfg, out_dim: int) -> RegionAligner:
        align = expect_section(align, AlignCfg, "RegionAligner.from_config(align)")
        in_dim = channels * (2 if align.context else 1)
        return cls(in_dim, align.hidden, out_dim, input_norm=align.input_norm)

    def forward(self, regions: torch.Tensor) -> torch.Tensor:
        """regions [R, C] -> L2-normalised embeddings [R, D]."""
        return F.normalize(self.fc2(self.act(self.fc1(self.norm(regions)))), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(100.0)).exp()


def region_concept_loss(
    region_emb: torch.Tensor, concept_ids: torch.Tensor, vocab_emb: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """CLIP's symmetric contrastive loss between regions and the text embeddings of their concepts.

    ``region_emb`` [R, D] and ``vocab_emb`` [V, D] are L2-normalised; ``concept_ids`` [R] indexes the vocabulary.

    * region -> text: each region against the *whole* concept vocabulary (cross-entropy over V), so concepts that
      are not in this batch are pushed away too (at inference every region is compared with all V);
    * text -> region: each concept present in the batch against the batch's regions; several boxes of one concept
      are all its positives (soft target 1/n each), where CLIP's diagonal target would call them negatives.

    When the vocabulary is exactly the batch's concepts, one region each, this is ``open_clip.loss.ClipLoss``:
    ``(CE(logits_per_image, arange) + CE(logits_per_text, arange)) / 2``.
    """
    logits_per_region = logit_scale * region_emb @ vocab_emb.T  # [R, V]
    loss_region = F.cross_entropy(logits_per_region, concept_ids)
    present, target = torch.unique(concept_ids, return_inverse=True)  # [U], [R] in 0..U-1
    positives = F.one_hot(target, num_classes=present.numel()).T.float()  # [U, R]
    soft_target = positives / positives.sum(dim=1, keepdim=True)
    logits_per_text = logits_per_region[:, present].T  # [U, R]
    loss_text = -(soft_target * F.log_softmax(logits_per_text, dim=1)).sum(dim=1).mean()
    return (loss_region + loss_text) / 2


# ---------------------------------------------------------------------------------------------- the extractor
class ConceptExtractor(nn.Module):
    """Images -> the visual concepts in them (the runtime object of task ``concepts``).

    ``preprocess(pil) -> [3, S, S]`` in [0, 1]; ``extract(images [B,3,S,S]) -> list[list[Concept]]``: every object
    instance, boxes in the preprocessed image's pixels (``scale_concepts`` maps them onto another size);
    ``counts(instances)`` and ``group_concepts(instances)`` count and group them per word; ``extract_words`` (or
    ``concept_words(instances)``) gives the distinct top-K words, and ``extract_tensors`` the same as padded
    tensors for the LightCap captioner (concept ids into ``vocab``, scores, boxes).
    """

    def __init__(
        self,
        encoder: GridEncoder,
        detector: ProposalDetector,
        aligner: RegionAligner,
        vocab: ConceptVocabulary,
        cfg: ConceptsConfig,
    ):
        super().__init__()
        self.encoder = encoder.freeze()
        self.detector = detector
        self.aligner = aligner.eval()
        self.vocab = vocab
        self.register_buffer("vocab_embeddings", vocab.embeddings.float(), persistent=False)  # [V, D]
        cfg = expect_section(cfg, ConceptsConfig, "ConceptExtractor(cfg)")
        align = cfg.align
        extract = cfg.extract
        self.image_size = int(cfg.image_size or encoder.image_size)
        self.encoder_size = int(cfg.encoder_size or encoder.image_size)
        self.roi_size = align.roi_size
        self.context = align.context
        self.top_k = extract.top_k
        self.min_score = float(extract.min_score)
        self.proposal_conf = float(detector.conf if extract.proposal_conf is None else extract.proposal_conf)
        self.max_proposals = int(detector.max_det if extract.max_proposals is None else extract.max_proposals)
        # instances (every object, issue 15): per-concept NMS IoU, a per-instance score and objectness floor.
        # The published configs predate them, so the defaults here are the values chosen on val (docs/concepts.md);
        # a config with min_score 0 asks for every proposal (random-weight test models), and so do its instances
        keep_all = self.min_score <= 0.0
        given = {key: value for key, value in extract.to_dict().items() if value is not None}  # null: the default
        self.instance_iou = _number(given.get("instance_iou", DEFAULT_INSTANCE_IOU), "extract.instance_iou")
        self.instance_min_score = _number(
            given.get("instance_min_score", self.min_score if keep_all else DEFAULT_INSTANCE_MIN_SCORE),
            "extract.instance_min_score",
        )
        self.instance_conf = _number(
            given.get("instance_conf", self.proposal_conf if keep_all else DEFAULT_INSTANCE_CONF), "extract.instance_conf"
        )
        self.instance_merge_ios = given.get("instance_merge_ios", DEFAULT_INSTANCE_MERGE_IOS)
        # the per-word defaults were chosen for the synthetic grammar's words and pixel sizes: only for its models
        synthetic = not keep_all and cfg.vocabulary.source == "synthetic"
        self.instance_concepts = instance_concept_settings(
            given.get("instance_concepts", _known(DEFAULT_INSTANCE_CONCEPTS, vocab) if synthetic else {}), vocab.words
        )
        self.instance_sizes = instance_size_settings(
            given.get("instance_sizes", _known(DEFAULT_INSTANCE_SIZES, vocab) if synthetic else {}), vocab.words
        )
        if not 0.0 < self.instance_iou <= 1.0:
            raise ConfigError(f"concepts config: extract.instance_iou {self.instance_iou} must be in (0, 1]")
        self.instance_merge_ios = _fraction_or_none(self.instance_merge_ios, "extract.instance_merge_ios")
        if self.image_size % 32:
            raise ConfigError(f"concepts config: image_size {self.image_size} must be a multiple of 32")
        self.name = "concepts"
        self.version: int | None = None
        self.manifest: dict[str, Any] = {}

    def train(self, mode: bool = True) -> ConceptExtractor:  # an inference object
        return super().train(False)

    def preprocess(self, image: Any) -> torch.Tensor:
        return pil_to_tensor(image, self.image_size)

    # pieces, usable on their own -------------------------------------------------------------------------
    @torch.no_grad()
    def propose(self, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Detector proposals per image: (boxes [N,4] in input pixels, objectness [N])."""
        return self.detector(images, conf=self.proposal_conf, max_det=self.max_proposals)

    @torch.no_grad()
    def grid(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(resize_batch(images, self.encoder_size))  # [B, C, h, w]

    @torch.no_grad()
    def classify_boxes(
        self, images: torch.Tensor, boxes: list[torch.Tensor], grid: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Most similar concept per box: per image (concept ids [N], probabilities [N])."""
        grid = self.grid(images) if grid is None else grid
        regions = pool_regions(grid, boxes, images.shape[-1], self.roi_size, context=self.context)  # [R, C or 2C]
        emb = self.aligner(regions)  # [R, D]
        probs = (self.aligner.scale() * emb @ self.vocab_embeddings.T).softmax(dim=-1)  # [R, V]
        best_prob, best_id = probs.max(dim=-1) if len(regions) else (probs.new_zeros(0), probs.new_zeros(0).long())
        counts = [len(b) for b in boxes]
        return list(best_id.split(counts)), list(best_prob.split(counts))

    def instance_thresholds(self) -> dict[str, torch.Tensor]:
        """The instance settings per concept id, as ``[V]`` tensors ``iou``, ``min_score``, ``min_objectness``,
        ``merge_ios`` (NaN: no merge): the extractor's ``instance_*`` values, with ``instance_concepts``' words
        overriding theirs; and ``sizes`` ``[V, 2]`` (each word's box size range) when ``instance_sizes`` is set."""
        v = len(self.vocab)
        merge = math.nan if self.instance_merge_ios is None else float(self.instance_merge_ios)
        out = {
            "iou": torch.full((v,), float(self.instance_iou)),
            "min_score": torch.full((v,), float(self.instance_min_score)),
            "min_objectness": torch.full((v,), float(self.instance_conf)),
            "merge_ios": torch.full((v,), merge),
        }
        names = {"iou": "iou", "min_score": "min_score", "conf": "min_objectness", "merge_ios": "merge_ios"}
        for word, settings in self.instance_concepts.items():
            for key, value in settings.items():
                out[names[key]][self.vocab.index[word]] = math.nan if value is None else float(value)
        if self.instance_sizes:
            sizes = torch.tensor([[0.0, math.inf]] * v)
            for word, (low, high) in self.instance_sizes.items():
                sizes[self.vocab.index[word]] = torch.tensor([low, math.inf if high is None else high])
            out["sizes"] = sizes
        return out

    @torch.no_grad()
    def instance_tensors(
        self, images: torch.Tensor, grid: torch.Tensor | None = None, **overrides: float | torch.Tensor | None
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Every kept proposal per image, as CPU tensors ``(concept_ids [N], scores [N], boxes [N, 4])``, best first.

        Each proposal takes its most similar concept (``classify_boxes``) and the score objectness x probability;
        proposals are ordered by score (``torch.argsort(score, descending=True)``, the order ``extract_tensors``
        always used), then ``select_instances`` with the settings of ``instance_thresholds()``: non-maximum
        suppression per concept (``torchvision.ops.batched_nms``) in exactly that order, the score and objectness
        floors, and the merge of a concept's boxes that cover each other (where its ``merge_ios`` is set).
        ``overrides`` (``iou``, ``min_score``, ``min_objectness``, ``merge_ios``, ``sizes``) replace a setting.
        """
        settings: dict[str, Any] = self.instance_thresholds()
        unknown = sorted(set(overrides) - {*settings, "sizes"})
        if unknown:
            raise TypeError(f"instance_tensors: unknown setting {unknown[0]!r} (one of {', '.join(settings)})")
        settings.update(overrides)
        return [select_instances(*row, **settings) for row in self.classified_proposals(images, grid)]

    @torch.no_grad()
    def classified_proposals(
        self, images: torch.Tensor, grid: torch.Tensor | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Every proposal with its concept, per image as CPU tensors ``(concept_ids, scores, boxes, objectness)``
        in ``torch.argsort(score, descending=True)`` order (score = objectness x concept probability)."""
        proposals = self.propose(images)
        boxes = [b for b, _ in proposals]
        concept_ids, probs = self.classify_boxes(images, boxes, grid=grid)
        out = []
        for (img_boxes, objectness), ids, prob in zip(proposals, concept_ids, probs, strict=True):
            score = (objectness * prob).cpu()
            order = torch.argsort(score, descending=True)
            out.append((ids.cpu()[order], score[order], img_boxes.cpu()[order], objectness.cpu()[order]))
        return out

    # the task methods ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def extract_tensors(
        self, images: torch.Tensor, top_k: int | None = None, grid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-K de-duplicated concepts per image as padded tensors: the LightCap captioner's input, as trained.

        Returns ``concept_ids [B, K]`` (-1 = padding), ``scores [B, K]`` (0 for padding), ``boxes [B, K, 4]``.
        ``vocab_embeddings[concept_ids.clamp(min=0)]`` gives their CLIP text embeddings.
        ``grid``: the images' CLIP grid when the caller already has it (the LightCap captioner reuses it).
        Derived from the instances without the instance floors and merges (NMS per concept at ``instance_iou``
        only): per concept its best instance, scores ``>= min_score``, best first, at most K -- bit for bit what
        one box per concept over the raw proposals gave before instances existed (tests/test_concept_instances.py
        checks this). No instance setting can change it: NMS never suppresses a concept's best proposal.
        """
        k = self.top_k if top_k is None else int(top_k)
        instances = [select_instances(*row, iou=self.instance_iou) for row in self.classified_proposals(images, grid)]
        batch = images.shape[0]
        out_ids = torch.full((batch, k), -1, dtype=torch.long)
        out_scores = torch.zeros((batch, k))
        out_boxes = torch.zeros((batch, k, 4))
        for i, (ids, scores, boxes) in enumerate(instances):
            for slot, j in enumerate(top_concept_rows(ids, scores, k, self.min_score)):
                out_ids[i, slot], out_scores[i, slot], out_boxes[i, slot] = ids[j], scores[j], boxes[j]
        return out_ids, out_scores, out_boxes

    def _to_concepts(self, ids: torch.Tensor, scores: torch.Tensor, boxes: torch.Tensor) -> list[Concept]:
        return [
            Concept(self.vocab.words[c], round(float(s), 6), tuple(round(v, 2) for v in b), self.vocab.labels[c])
            for c, s, b in zip(ids.tolist(), scores.tolist(), boxes.tolist(), strict=True)
            if c >= 0
        ]

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> list[list[Concept]]:
        """``images [B,3,S,S]`` -> per image every object instance, best first.

        One ``Concept(word, score, box, label)`` per kept proposal (``instance_tensors`` with the extractor's
        ``instance_*`` settings and ``instance_concepts``), boxes in the preprocessed image's pixels (a merged
        instance: the union of its parts' boxes, with the best part's score).
        ``counts(instances)`` counts them per word; ``self.concept_words(instances)`` or ``extract_words`` give
        the distinct words (best box each) that the captioner uses.
        """
        return [self._to_concepts(*row) for row in self.instance_tensors(images)]

    @torch.no_grad()
    def extract_words(self, images: torch.Tensor, top_k: int | None = None) -> list[list[Concept]]:
        """Per image its distinct concept words, best box each, best first (``extract_tensors`` as Concepts)."""
        ids, scores, boxes = self.extract_tensors(images, top_k)
        return [self._to_concepts(*row) for row in zip(ids, scores, boxes, strict=True)]

    def concept_words(self, instances: list[Concept], top_k: int | None = None) -> list[Concept]:
        """The distinct words of one image's instances as the captioner sees them: best instance per word with
        ``score >= min_score``, best first, at most ``top_k`` (default the model's K). On ``extract``'s answer it
        equals ``extract_words`` whenever no word's instance floors are above the word floors (``min_score``,
        ``proposal_conf``), no size range is set and no word merges boxes, since then no instance the words need
        was filtered out or reshaped."""
        k = self.top_k if top_k is None else int(top_k)
        return group_concepts([c for c in instances if c.score >= self.min_score])[:k]


def select_instances(
    ids: torch.Tensor,
    scores: torch.Tensor,
    boxes: torch.Tensor,
    objectness: torch.Tensor,
    *,
    iou: float | torch.Tensor,
    min_score: float | torch.Tensor = -math.inf,
    min_objectness: float | torch.Tensor = -math.inf,
    merge_ios: float | torch.Tensor | None = None,
    sizes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's classified proposals (best first) -> its instances ``(ids, scores, boxes)``, best first:
    (``sizes`` set) the proposals whose word fits their size (``fit_sizes``), NMS per concept at ``iou`` in the
    given order, then ``score >= min_score`` and ``objectness >= min_objectness``, then (``merge_ios`` set)
    ``merge_instances``. The NMS ranks by position (``torchvision.ops.batched_nms`` on strictly decreasing
    surrogate scores), so ties and batched_nms's own sort cannot reorder what the caller's order decided.

    Each setting is one number for every concept or a ``[V]`` tensor indexed by concept id (per-word settings;
    a NaN ``merge_ios`` means no merge for that word)."""
    if sizes is not None:
        ids, scores, boxes, objectness = fit_sizes(ids, scores, boxes, objectness, sizes)
    keep = nms_per_concept(ids, boxes, iou)
    above = (scores[keep] >= _per_row(min_score, ids[keep])) & (objectness[keep] >= _per_row(min_objectness, ids[keep]))
    keep = keep[above]
    ids, scores, boxes = ids[keep], scores[keep], boxes[keep]
    if merge_ios is None or (isinstance(merge_ios, torch.Tensor) and bool(merge_ios.isnan().all())):
        return ids, scores, boxes
    rows, boxes = merge_instances(ids, boxes, _per_row(merge_ios, ids))
    return ids[rows], scores[rows], boxes


def fit_sizes(
    ids: torch.Tensor, scores: torch.Tensor, boxes: torch.Tensor, objectness: torch.Tensor, sizes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows (order kept) whose box's longer side lies in its word's range ``sizes[id] = (min, max)``."""
    side = (boxes[:, 2:] - boxes[:, :2]).max(dim=1).values if len(boxes) else boxes.new_zeros(0)
    limits = sizes.float()[ids]
    fits = (side >= limits[:, 0]) & (side <= limits[:, 1])
    return ids[fits], scores[fits], boxes[fits], objectness[fits]


def nms_per_concept(ids: torch.Tensor, boxes: torch.Tensor, iou: float | torch.Tensor) -> torch.Tensor:
    """Positions (ascending = best first) of the rows that survive non-maximum suppression per concept, rows
    ranked by position (``torchvision.ops.batched_nms`` on strictly decreasing surrogate scores). ``iou``: one
    number, or a ``[V]`` tensor of per-concept IoUs (one batched_nms per distinct value)."""
    from torchvision.ops import batched_nms

    rank = torch.arange(len(ids), 0, -1, dtype=torch.float32)
    if not isinstance(iou, torch.Tensor):
        return batched_nms(boxes.float(), rank, ids, float(iou))  # indices, best rank first
    row_iou = iou.float()[ids]
    kept = torch.zeros(len(ids), dtype=torch.bool)
    for value in row_iou.unique().tolist():
        rows = (row_iou == value).nonzero().flatten()
        kept[rows[batched_nms(boxes[rows].float(), rank[rows], ids[rows], value)]] = True
    return kept.nonzero().flatten()


def _per_row(value: float | torch.Tensor, ids: torch.Tensor) -> torch.Tensor | float:
    return value.float()[ids] if isinstance(value, torch.Tensor) else float(value)


def box_ios(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Intersection over the smaller box ``[N, M]`` (SAHI's ``IOS`` match metric) of xyxy boxes; 0 for an empty box."""
    from torchvision.ops import box_area

    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=2)
    smaller = torch.min(box_area(boxes1)[:, None], box_area(boxes2)[None, :])
    return torch.where(smaller > 0, inter / smaller.clamp(min=1e-12), torch.zeros_like(inter))


def merge_instances(
    ids: torch.Tensor, boxes: torch.Tensor, ios: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy non-maximum merging (SAHI's ``GREEDYNMM`` with ``match_metric="IOS"``) of one image's instances,
    best first: walking down the list, each instance still standing takes every later standing instance of its
    own concept whose intersection over the smaller box (``box_ios``) with it is above ``ios`` (one number, or
    per row; NaN: never) and becomes the union box of them; its score stays (it is the best of them). Returns
    the rows that stand (positions, best first) and their boxes. Two part boxes of one plane (a fuselage box that
    contains most of a wing box) become one plane; separate objects (IOS 0) and other concepts never merge."""
    n = len(ids)
    rows = torch.arange(n)
    if n < 2:
        return rows, boxes.clone()
    threshold = ios.float() if isinstance(ios, torch.Tensor) else torch.full((n,), float(ios))
    later = torch.ones(n, n, dtype=torch.bool).triu(diagonal=1)
    match = later & (ids[:, None] == ids[None, :]) & (box_ios(boxes.float(), boxes.float()) > threshold[:, None])
    standing = torch.ones(n, dtype=torch.bool)
    merged = boxes.clone()
    for i in match.any(dim=1).nonzero().flatten().tolist():  # only rows with a candidate can merge
        if not standing[i]:
            continue
        parts = match[i] & standing
        if parts.any():
            group = torch.cat([boxes[i : i + 1], boxes[parts]])
            merged[i] = torch.cat([group[:, :2].min(dim=0).values, group[:, 2:].max(dim=0).values])
            standing &= ~parts
    return rows[standing], merged[standing]


def _known(defaults: dict[str, Any], vocab: ConceptVocabulary) -> dict[str, Any]:
    return {word: value for word, value in defaults.items() if word in vocab.index}


def _number(value: Any, key: str) -> float:
    """A real number setting, else a ConfigError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(float(value)):
        raise ConfigError(f"concepts config: {key} {value!r} must be a number")
    return float(value)


def _fraction_or_none(value: Any, key: str) -> float | None:
    """A setting in (0, 1] or null (off), else a ConfigError naming ``key``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < float(value) <= 1.0:
        raise ConfigError(f"concepts config: {key} {value!r} must be a number in (0, 1] or null")
    return float(value)


def _word_entries(section: Any, words: list[str], base: str, value_shape: str):
    """A per-word config mapping ``base`` (null: none) -> ``(word, its dotted key, its value)`` for each entry;
    a section that is not a mapping, or a word not in the vocabulary, is a ConfigError naming it."""
    if section is None:
        return
    if not isinstance(section, dict):
        raise ConfigError(f"concepts config: {base} must be a mapping word -> {value_shape}, got {type(section).__name__}")
    known = set(words)
    for word, value in section.items():
        key = f"{base}.{word}"
        if word not in known:
            raise ConfigError(f"concepts config: {key}: {word!r} is not a concept word of the model's vocabulary")
        yield word, key, value


def instance_size_settings(section: Any, words: list[str]) -> dict[str, tuple[float, float | None]]:
    """``extract.instance_sizes``: ``{word: [min, max]}`` (the longer side of the word's box, in the preprocessed
    image's pixels; ``max`` null: no upper bound) -> ``{word: (min, max)}``, checked; a wrong one is a ConfigError
    naming its key (``extract.instance_sizes.car``)."""
    out: dict[str, tuple[float, float | None]] = {}
    for word, key, limits in _word_entries(section, words, "extract.instance_sizes", "[min, max]"):
        if not isinstance(limits, list | tuple) or len(limits) != 2:
            raise ConfigError(f"concepts config: {key} {limits!r} must be [min, max] (pixels of the box's longer side)")
        low = _number(limits[0], key)
        high = None if limits[1] is None else _number(limits[1], key)
        if low < 0 or (high is not None and high <= low):
            raise ConfigError(f"concepts config: {key} {list(limits)!r} needs 0 <= min < max")
        out[word] = (low, high)
    return out


def instance_concept_settings(section: Any, words: list[str]) -> dict[str, dict[str, float | None]]:
    """``extract.instance_concepts``: ``{word: {iou, min_score, conf, merge_ios}}`` (any subset of the keys) ->
    the same, checked: every word in the vocabulary, ``iou`` in (0, 1], ``merge_ios`` in (0, 1] or null (this
    word does not merge), ``min_score`` / ``conf`` numbers; a null ``iou`` / ``min_score`` / ``conf`` is the
    extract section's value. A wrong one is a ConfigError naming its key (``extract.instance_concepts.car.iou``)."""
    out: dict[str, dict[str, float | None]] = {}
    for word, key, settings in _word_entries(section, words, "extract.instance_concepts", "settings"):
        if not isinstance(settings, dict):
            raise ConfigError(f"concepts config: {key} must be a mapping of {', '.join(INSTANCE_CONCEPT_KEYS)}")
        unknown = sorted(set(settings) - set(INSTANCE_CONCEPT_KEYS))
        if unknown:
            raise ConfigError(
                f"concepts config: {key}.{unknown[0]} is not a setting (one of {', '.join(INSTANCE_CONCEPT_KEYS)})"
            )
        checked: dict[str, float | None] = {}
        for name, value in settings.items():
            if name == "merge_ios":  # null: this word does not merge, whatever instance_merge_ios says
                checked[name] = _fraction_or_none(value, f"{key}.{name}")
            elif value is None:  # null: the extract section's setting
                continue
            elif name == "iou":
                checked[name] = _fraction_or_none(value, f"{key}.{name}")
            else:
                checked[name] = _number(value, f"{key}.{name}")
        if checked:
            out[word] = checked
    return out


def top_concept_rows(ids: torch.Tensor, scores: torch.Tensor, k: int, min_score: float) -> list[int]:
    """Rows of one image's instances (best first) that make its top-K distinct concepts: the first row of each
    concept id with ``score >= min_score``, at most ``k``."""
    seen: set[int] = set()
    rows: list[int] = []
    for j, (cid, score) in enumerate(zip(ids.tolist(), scores.tolist(), strict=True)):
        if cid in seen or score < min_score:
            continue
        seen.add(cid)
        rows.append(j)
        if len(rows) == k:
            break
    return rows


def scale_concepts(concepts: list[Concept], from_size: tuple[int, int], to_size: tuple[int, int]) -> list[Concept]:
    """Boxes from a ``(width, height)`` image (the preprocessed one) onto another size (the original)."""
    sx, sy = to_size[0] / from_size[0], to_size[1] / from_size[1]
    return [
        Concept(c.concept, c.score, (c.box[0] * sx, c.box[1] * sy, c.box[2] * sx, c.box[3] * sy), c.label)
        for c in concepts
    ]


_PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40), (128, 0, 0),
]


LABEL_ALL_UP_TO = 8  # draw_concepts writes "word score" on every box up to this many instances, else a legend only


def draw_concepts(
    image: Any, concepts: list[Concept], input_size: int | tuple[int, int] | None = None, *, scale: int = 1
) -> Any:
    """A copy of ``image`` (PIL) with every concept instance drawn on it, legible when there are many.

    One colour per concept word (the best-scoring word first), a thin box per instance, and a legend in the
    corner with the fewest boxes: a swatch, the word and its count (``house 29``). Up to ``LABEL_ALL_UP_TO``
    instances each box also gets ``word score`` above it (below at the top edge) where that label does not cover
    another one; with more, only the legend names them. ``input_size`` is the side (or ``(width, height)``) the
    boxes are in (the extractor's ``image_size``); they are scaled onto ``image``. ``scale`` enlarges the drawing
    (small images read better at 2-3x). The image keeps its size.
    """
    from PIL import Image, ImageDraw, ImageFont

    canvas = image.convert("RGB")
    if scale != 1:
        canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.NEAREST)
    if input_size is None:
        input_size = image.size
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    concepts = scale_concepts(concepts, input_size, canvas.size)
    words = [c.concept for c in group_concepts(concepts)]  # best word first
    colour = {w: _PALETTE[i % len(_PALETTE)] for i, w in enumerate(words)}
    tally = counts(concepts)
    draw = ImageDraw.Draw(canvas)
    line = max(1, canvas.width // 256)
    for c in sorted(concepts, key=lambda c: c.score):  # the best drawn last, on top
        x1, y1, x2, y2 = c.box  # a dark rim outside the colour keeps a red box visible on a red roof
        draw.rectangle([x1 - line, y1 - line, x2 + line, y2 + line], outline=(0, 0, 0), width=1)
        draw.rectangle([x1, y1, x2, y2], outline=colour[c.concept], width=line)
    font = ImageFont.load_default(size=max(10, canvas.width // 40))
    taken: list[tuple[float, float, float, float]] = []

    def free(box: tuple[float, float, float, float]) -> bool:
        x1, y1, x2, y2 = box
        inside = x1 >= 0 and y1 >= 0 and x2 <= canvas.width and y2 <= canvas.height
        return inside and all(x2 <= a1 or x1 >= a2 or y2 <= b1 or y1 >= b2 for a1, b1, a2, b2 in taken)

    if not concepts:
        return canvas
    # legend: the corner whose area holds the fewest box centres
    rows = [(w, f"{w} {tally[w]}") for w in words]
    sizes = [draw.textbbox((0, 0), text, font=font) for _, text in rows]
    row_h = max(b[3] - b[1] for b in sizes) + 4
    swatch = row_h - 4
    legend_w = max(b[2] - b[0] for b in sizes) + swatch + 12
    legend_h = row_h * len(rows) + 4
    corners = [(2, 2), (canvas.width - legend_w - 2, 2), (2, canvas.height - legend_h - 2),
               (canvas.width - legend_w - 2, canvas.height - legend_h - 2)]

    def crowd(x: float, y: float) -> int:
        return sum(x <= (c.box[0] + c.box[2]) / 2 <= x + legend_w and y <= (c.box[1] + c.box[3]) / 2 <= y + legend_h
                   for c in concepts)

    lx, ly = min(corners, key=lambda xy: crowd(*xy))
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    ImageDraw.Draw(overlay).rectangle([lx, ly, lx + legend_w, ly + legend_h], fill=(255, 255, 255, 200))
    canvas = Image.alpha_composite(canvas.convert("RGBA"), overlay).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    taken.append((lx, ly, lx + legend_w, ly + legend_h))
    for r, ((word, text), (_, top, _, _)) in enumerate(zip(rows, sizes, strict=True)):
        y = ly + 2 + r * row_h
        draw.rectangle([lx + 4, y + 2, lx + 4 + swatch, y + 2 + swatch], fill=colour[word], outline=(0, 0, 0))
        draw.text((lx + swatch + 8, y + 2 - top), text, fill=(0, 0, 0), font=font)
    if len(concepts) > LABEL_ALL_UP_TO:
        return canvas
    for c in sorted(concepts, key=lambda c: -c.score):  # the best get their labels first
        x1, y1, x2, y2 = c.box
        text = f"{c.concept} {c.score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)  # offsets of the glyphs' box
        width, height = right - left + 4, bottom - top + 2
        x = max(0.0, min(x1, canvas.width - width))
        for ty in (y1 - height, y2, y1):  # above the box, below it, inside its top
            spot = (x, ty, x + width, ty + height)
            if free(spot):
                taken.append(spot)
                draw.rectangle(list(spot), fill=colour[c.concept])
                draw.text((x + 2, ty + 1 - top), text, fill=(0, 0, 0), font=font)
                break
    return canvas
