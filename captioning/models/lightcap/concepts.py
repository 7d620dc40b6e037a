"""LightCap's visual concept extractor (seed 003, Sec. 3.1 "Visual Concept Extractor").

    image [B,3,S,S] in [0,1]
      |-- ProposalDetector (class-agnostic YOLOv5n) --> boxes [N_b, 4], objectness [N_b]   per image
      |-- GridEncoder (CLIP ResNet, frozen) ----------> grid [B, C, S/32, S/32]
    roi_align(grid, boxes) -> mean over r x r bins -> regions [R, C]
    RegionAligner: fc1 C->H, GELU, fc2 H->D, L2-normalise -> region embeddings [R, D]
    similarity with the concept vocabulary [V, D] (CLIP text embeddings of "a photo of a [object]", computed once
    at training time and stored) -> each region takes its most similar concept
    score = objectness * softmax(logit_scale * cos)[best]; per image: de-duplicate concepts (best box each),
    drop scores below ``min_score``, keep the top K (K = 20 in the paper).

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

from captioning.errors import ConfigError
from captioning.inference import Concept
from captioning.models.lightcap.clip_encoder import GridEncoder, pil_to_tensor, resize_batch
from captioning.models.lightcap.detector import ProposalDetector

VOCAB_EMBEDDINGS_FILE = "concept_embeddings.safetensors"
VOCAB_WORDS_FILE = "concepts.json"
ALIGNER_FILE = "aligner.safetensors"
DEFAULT_TEMPLATE = "a photo of a {}"


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


def concept_words(cfg: dict[str, Any]) -> tuple[list[str], list[str | None]]:
    """The concept words (and the label each maps to) of a concepts config's ``vocabulary`` section.

    ``source: synthetic``: every concept of the synthetic grammar (objects and surfaces, with their labels) plus
    the 17 label words themselves; ``source: file``: a concept list file (``read_concept_list``), a relative path
    being relative to ``captioning/configs/concepts/``.
    """
    from captioning.config import CONFIG_DIR

    section = cfg.get("vocabulary", {}) or {}
    source = section.get("source", "file")
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
        if not section.get("file"):
            raise ConfigError("concepts config: vocabulary.source is 'file' but vocabulary.file is not set")
        path = Path(section["file"])
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
        from safetensors.torch import save_file

        folder = Path(folder)
        emb_path = folder / VOCAB_EMBEDDINGS_FILE
        save_file({"embeddings": self.embeddings.to(dtype).contiguous()}, str(emb_path))
        words_path = folder / VOCAB_WORDS_FILE
        words_path.write_text(
            json.dumps({"template": self.template, "words": self.words, "labels": self.labels}, indent=1)
        )
        return [emb_path, words_path]

    @classmethod
    def load(cls, folder: str | Path) -> ConceptVocabulary:
        from safetensors.torch import load_file

        folder = Path(folder)
        words_path, emb_path = folder / VOCAB_WORDS_FILE, folder / VOCAB_EMBEDDINGS_FILE
        try:
            meta = json.loads(words_path.read_text())
            embeddings = load_file(str(emb_path))["embeddings"].float()
        except (OSError, ValueError, KeyError) as exc:
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
    def from_config(cls, channels: int, align_cfg: dict[str, Any], out_dim: int) -> RegionAligner:
        in_dim = channels * (2 if align_cfg.get("context", False) else 1)
        return cls(in_dim, int(align_cfg["hidden"]), out_dim, input_norm=bool(align_cfg.get("input_norm", False)))

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

    ``preprocess(pil) -> [3, S, S]`` in [0, 1]; ``extract(images [B,3,S,S]) -> list[list[Concept]]`` with boxes
    in the preprocessed image's pixels (``scale_concepts`` maps them onto another size); ``extract_tensors`` gives
    padded tensors for the LightCap captioner (concept ids into ``vocab``, scores, boxes).
    """

    def __init__(
        self,
        encoder: GridEncoder,
        detector: ProposalDetector,
        aligner: RegionAligner,
        vocab: ConceptVocabulary,
        cfg: dict[str, Any],
    ):
        super().__init__()
        self.encoder = encoder.freeze()
        self.detector = detector
        self.aligner = aligner.eval()
        self.vocab = vocab
        self.register_buffer("vocab_embeddings", vocab.embeddings.float(), persistent=False)  # [V, D]
        align = cfg.get("align", {})
        extract = cfg.get("extract", {})
        self.image_size = int(cfg.get("image_size") or encoder.image_size)
        self.encoder_size = int(cfg.get("encoder_size") or encoder.image_size)
        self.roi_size = int(align.get("roi_size", 2))
        self.context = bool(align.get("context", False))
        self.top_k = int(extract.get("top_k", 20))
        self.min_score = float(extract.get("min_score", 0.0))
        self.proposal_conf = float(extract.get("proposal_conf", detector.conf))
        self.max_proposals = int(extract.get("max_proposals", detector.max_det))
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

    # the task method ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def extract_tensors(
        self, images: torch.Tensor, top_k: int | None = None, grid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-K de-duplicated concepts per image as padded tensors.

        Returns ``concept_ids [B, K]`` (-1 = padding), ``scores [B, K]`` (0 for padding), ``boxes [B, K, 4]``.
        ``vocab_embeddings[concept_ids.clamp(min=0)]`` gives their CLIP text embeddings.
        ``grid``: the images' CLIP grid when the caller already has it (the LightCap captioner reuses it).
        """
        k = self.top_k if top_k is None else int(top_k)
        proposals = self.propose(images)
        boxes = [b for b, _ in proposals]
        concept_ids, probs = self.classify_boxes(images, boxes, grid=grid)
        batch = images.shape[0]
        out_ids = torch.full((batch, k), -1, dtype=torch.long)
        out_scores = torch.zeros((batch, k))
        out_boxes = torch.zeros((batch, k, 4))
        for i, ((img_boxes, objectness), ids, prob) in enumerate(zip(proposals, concept_ids, probs, strict=True)):
            score = (objectness * prob).cpu()
            order = torch.argsort(score, descending=True)
            seen: set[int] = set()
            slot = 0
            for j in order.tolist():
                cid = int(ids[j])
                if cid in seen or float(score[j]) < self.min_score:
                    continue
                seen.add(cid)
                out_ids[i, slot], out_scores[i, slot], out_boxes[i, slot] = cid, score[j], img_boxes[j].cpu()
                slot += 1
                if slot == k:
                    break
        return out_ids, out_scores, out_boxes

    @torch.no_grad()
    def extract(self, images: torch.Tensor, top_k: int | None = None) -> list[list[Concept]]:
        """``images [B,3,S,S]`` -> per image its concepts, best first (at most ``top_k``, default 20)."""
        ids, scores, boxes = self.extract_tensors(images, top_k)
        out: list[list[Concept]] = []
        for row_ids, row_scores, row_boxes in zip(ids.tolist(), scores.tolist(), boxes.tolist(), strict=True):
            out.append(
                [
                    Concept(self.vocab.words[c], round(float(s), 6), tuple(round(v, 2) for v in b), self.vocab.labels[c])
                    for c, s, b in zip(row_ids, row_scores, row_boxes, strict=True)
                    if c >= 0
                ]
            )
        return out


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


def draw_concepts(image: Any, concepts: list[Concept], input_size: int | tuple[int, int] | None = None, *, scale: int = 1) -> Any:
    """A copy of ``image`` (PIL) with each concept's box and ``word score`` drawn on it.

    ``input_size`` is the side (or ``(width, height)``) the boxes are in (the extractor's ``image_size``); they
    are scaled onto ``image``. ``scale`` enlarges the drawing (small images read better at 2-3x).
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
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(10, canvas.width // 40))
    for i, c in enumerate(concepts):
        color = _PALETTE[i % len(_PALETTE)]
        x1, y1, x2, y2 = c.box
        draw.rectangle([x1, y1, x2, y2], outline=color, width=max(1, canvas.width // 200))
        text = f"{c.concept} {c.score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)  # offsets of the glyphs' box
        height = bottom - top + 2
        ty = y1 - height if y1 - height >= 0 else y2  # label above the box, or below it at the top edge
        draw.rectangle([x1, ty, x1 + (right - left) + 4, ty + height], fill=color)
        draw.text((x1 + 2, ty + 1 - top), text, fill=(0, 0, 0), font=font)
    return canvas
