"""LightCap concept extractor pieces on random weights: vocabulary files, ROI pooling, the contrastive loss,
the YOLOv5n proposal detector, the batched extractor (tiny and paper profiles) and the drawing helper."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from captioning.config import load_config
from captioning.config_schema import AlignCfg, DetectorCfg, DetectorTrain
from captioning.errors import ConfigError
from captioning.inference import Concept
from captioning.models.lightcap.clip_encoder import GridEncoder
from captioning.models.lightcap.concepts import (
    ConceptExtractor,
    ConceptVocabulary,
    RegionAligner,
    concept_words,
    draw_concepts,
    pool_regions,
    read_concept_list,
    region_concept_loss,
    scale_concepts,
)
from captioning.models.lightcap.detector import ProposalDetector


def test_concept_list_file_parsing_and_errors(tmp_path):
    path = tmp_path / "objects.txt"
    path.write_text("# comment\nAirplane\tairplane\n\nbaseball  diamond\ntree\ttrees\n")
    assert read_concept_list(path) == (["airplane", "baseball diamond", "tree"], ["airplane", None, "trees"])
    path.write_text("car\ncat\ncar\tcars\n")
    with pytest.raises(ConfigError, match=r"objects\.txt: line 3: concept 'car' repeats line 1"):
        read_concept_list(path)
    path.write_text("car\tvehicles\n")
    with pytest.raises(ConfigError, match=r"line 1: label 'vehicles' is not one of the 17"):
        read_concept_list(path)


def test_vocabularies_of_both_profiles():
    from captioning.data import LABELS

    words, labels = concept_words(load_config("concepts", "paper").vocabulary)
    assert len(words) >= 150 and "airplane" in words and labels[words.index("tree")] == "trees"
    words, labels = concept_words(load_config("concepts", "tiny").vocabulary)
    # the 17 label words and the finer synthetic object words, each once
    assert set(LABELS) <= set(words) and {"car", "truck", "boat", "house", "tank"} <= set(words)
    assert len(words) == len(set(words))
    assert all(label is None or label in LABELS for label in labels)


def test_vocabulary_save_load(tmp_path):
    emb = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    vocab = ConceptVocabulary(["car", "tree", "dock"], ["cars", "trees", "dock"], emb)
    vocab.save(tmp_path)
    again = ConceptVocabulary.load(tmp_path)
    assert again.words == vocab.words and again.labels == vocab.labels
    torch.testing.assert_close(again.embeddings, emb, atol=2e-3, rtol=0)
    with pytest.raises(ConfigError, match="do not line up"):
        ConceptVocabulary(["car"], ["cars"], emb)


def test_pool_regions_reads_the_box_area_of_the_grid():
    grid = torch.zeros(2, 3, 8, 8)
    grid[0, :, :, :4] = 1.0  # left half of image 0
    grid[1, 1] = torch.arange(8.0).view(1, 8).expand(8, 8)  # channel 1 of image 1: column index
    boxes = [torch.tensor([[0.0, 0.0, 128.0, 256.0], [128.0, 0.0, 256.0, 256.0]]), torch.tensor([[0.0, 0.0, 256.0, 256.0]])]
    regions = pool_regions(grid, boxes, image_size=256, output_size=2)
    assert regions.shape == (3, 3)
    torch.testing.assert_close(regions[0], torch.ones(3))
    torch.testing.assert_close(regions[1], torch.zeros(3))
    assert regions[2, 1] == pytest.approx(3.5, abs=1e-4)  # mean column index over the whole grid
    assert pool_regions(grid, [torch.zeros(0, 4), torch.zeros(0, 4)], 256, 2).shape == (0, 3)


def test_pool_regions_with_context_appends_each_box_s_own_image_mean():
    grid = torch.zeros(2, 3, 8, 8)
    grid[0, :, :, :4] = 1.0  # image 0: left half on -> image mean 0.5
    grid[1] = 2.0  # image 1: all 2
    boxes = [torch.tensor([[0.0, 0.0, 128.0, 256.0], [128.0, 0.0, 256.0, 256.0]]), torch.tensor([[0.0, 0.0, 64.0, 64.0]])]
    regions = pool_regions(grid, boxes, image_size=256, output_size=2, context=True)
    assert regions.shape == (3, 6)
    torch.testing.assert_close(regions[:, :3], pool_regions(grid, boxes, 256, 2))
    torch.testing.assert_close(regions[0, 3:], torch.full((3,), 0.5))
    torch.testing.assert_close(regions[1, 3:], torch.full((3,), 0.5))  # same image, other box: same scene half
    torch.testing.assert_close(regions[2, 3:], torch.full((3,), 2.0))
    assert pool_regions(grid, [torch.zeros(0, 4), torch.zeros(0, 4)], 256, 2, context=True).shape == (0, 6)


def test_region_aligner_from_config_sizes_its_input_for_context():
    training = dict(epochs=1, batch_size=8, lr=1e-3, weight_decay=0.0)
    plain = RegionAligner.from_config(512, AlignCfg(hidden=64, **training), 32)
    assert plain.fc1.in_features == 512 and isinstance(plain.norm, torch.nn.Identity)
    assert set(plain.state_dict()) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "logit_scale"}
    ctx = RegionAligner.from_config(512, AlignCfg(hidden=64, context=True, input_norm=True, **training), 32)
    assert ctx.fc1.in_features == 1024 and isinstance(ctx.norm, torch.nn.LayerNorm)
    out = ctx(torch.randn(7, 1024) * 100 + 50)
    assert out.shape == (7, 32)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(7))


def test_region_concept_loss_is_clip_loss_when_concepts_are_distinct():
    from open_clip.loss import ClipLoss

    torch.manual_seed(0)
    regions = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    vocab = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    scale = torch.tensor(10.0)
    ours = region_concept_loss(regions, torch.arange(5), vocab, scale)
    torch.testing.assert_close(ours, ClipLoss()(regions, vocab, scale))
    # with repeated concepts and extra vocabulary it still trains the regions toward their concepts
    big_vocab = torch.nn.functional.normalize(torch.randn(12, 16), dim=-1)
    ids = torch.tensor([0, 0, 3, 3, 3, 7])
    aligner_in = torch.randn(6, 16, requires_grad=True)
    opt = torch.optim.SGD([aligner_in], lr=0.5)
    first = None
    for _ in range(50):
        loss = region_concept_loss(torch.nn.functional.normalize(aligner_in, dim=-1), ids, big_vocab, scale)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 3
    sims = torch.nn.functional.normalize(aligner_in, dim=-1) @ big_vocab.T
    assert torch.equal(sims.argmax(dim=1), ids)


def test_detector_weights_roundtrip_through_safetensors(tmp_path):
    torch.manual_seed(0)
    cfg = DetectorCfg(yaml="yolov5n.yaml", imgsz=128, conf=0.0, iou=0.6, max_det=10, train=DetectorTrain(epochs=1))
    detector = ProposalDetector(cfg)
    path = detector.save_weights(tmp_path / "detector.safetensors", dtype=torch.float32)
    torch.manual_seed(1)
    other = ProposalDetector(cfg)
    other.load_weights(path)
    images = torch.rand(2, 3, 128, 128)
    (b1, s1), (b2, s2) = detector(images)[0], other(images)[0]
    torch.testing.assert_close(b1, b2)
    torch.testing.assert_close(s1, s2)
    assert b1.shape[1] == 4 and len(b1) <= 10 and (s1[:-1] >= s1[1:]).all()
    # proposals come back in the pixels of the input, whatever size the network runs at
    boxes, _ = detector(torch.rand(1, 3, 256, 256))[0]
    assert float(boxes.max()) <= 256.0
    with pytest.raises(ConfigError, match="do not fit"):
        ProposalDetector(cfg.model_copy(update={"yaml": "yolov8n.yaml"})).load_weights(path)


def _random_extractor(profile: str, **extract):
    clip_cfg = load_config("clip", profile)
    cfg = load_config("concepts", profile)
    for key, value in extract.items():
        setattr(cfg.extract, key, value)
    encoder = GridEncoder.from_config(clip_cfg)
    detector = ProposalDetector(cfg.detector)
    dim = 1024 if profile == "paper" else clip_cfg.model.embed_dim
    aligner = RegionAligner.from_config(encoder.channels, cfg.align, dim)
    words = [f"thing{i}" for i in range(30)]
    vocab = ConceptVocabulary(words, [None] * 30, torch.nn.functional.normalize(torch.randn(30, dim), dim=-1))
    return ConceptExtractor(encoder, detector, aligner, vocab, cfg)


def test_tiny_extractor_batched_top_k_dedup():
    torch.manual_seed(0)
    extractor = _random_extractor("tiny", proposal_conf=0.0, min_score=0.0, top_k=5)
    images = torch.stack([extractor.preprocess(Image.new("RGB", (200, 300), c)) for c in ("red", "green", "blue")])
    images[1] = torch.rand(3, 256, 256)
    assert images.shape == (3, 3, 256, 256)
    results = extractor.extract_words(images)
    assert len(results) == 3
    for concepts in results:
        assert 0 < len(concepts) <= 5
        names = [c.concept for c in concepts]
        assert len(names) == len(set(names))  # de-duplicated
        scores = [c.score for c in concepts]
        assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
        assert all(0 <= v <= 256 for c in concepts for v in c.box)
    # batching does not change an image's answer
    alone = extractor.extract_words(images[1:2])[0]
    assert [c.concept for c in alone] == [c.concept for c in results[1]]
    assert [c.score for c in alone] == pytest.approx([c.score for c in results[1]], abs=1e-4)
    ids, scores, boxes = extractor.extract_tensors(images, top_k=20)
    assert ids.shape == (3, 20) and boxes.shape == (3, 20, 4)
    assert ((ids >= 0) == (scores > 0)).all()
    # extract: every instance (min_score 0 keeps every proposal after NMS per word), best first, more than K
    instances = extractor.extract(images)
    assert [len(i) for i in instances] > [len(w) for w in results] or any(len(i) > 5 for i in instances)
    for inst, words in zip(instances, results, strict=True):
        assert [c.score for c in inst] == sorted((c.score for c in inst), reverse=True)
        assert {c.concept for c in words} <= {c.concept for c in inst}
    # a high min_score keeps nothing of a random model
    extractor.min_score = extractor.instance_min_score = 1.01
    assert extractor.extract_words(images) == [[], [], []]
    assert extractor.extract(images) == [[], [], []]


def test_paper_extractor_runs_on_random_weights():
    torch.manual_seed(0)
    extractor = _random_extractor("paper", proposal_conf=0.0, min_score=0.0)
    assert extractor.encoder.channels == 2048 and extractor.aligner.fc1.weight.shape == (1024, 2048)
    assert extractor.aligner.fc2.weight.shape == (1024, 1024)
    images = torch.rand(1, 3, 640, 640)
    assert extractor.grid(images).shape == (1, 2048, 7, 7)
    [concepts] = extractor.extract_words(images)
    assert 0 < len(concepts) <= 20
    [instances] = extractor.extract(images)
    assert len(instances) >= len(concepts)


def test_draw_concepts_and_scaling():
    image = Image.new("RGB", (100, 50), (0, 0, 0))
    concepts = [Concept("car", 0.9, (32.0, 32.0, 96.0, 96.0), "cars")]
    scaled = scale_concepts(concepts, (128, 128), (100, 50))
    assert scaled[0].box == pytest.approx((25.0, 12.5, 75.0, 37.5))
    drawn = draw_concepts(image, concepts, 128, scale=2)
    assert drawn.size == (200, 100)
    assert drawn.getpixel((50, 60)) != (0, 0, 0)  # the left edge of the box (x=25*2)
    assert drawn.getpixel((120, 60)) == (0, 0, 0)  # inside the box: untouched
    assert image.getpixel((25, 30)) == (0, 0, 0)  # the input is not drawn on


def test_extract_instance_settings_are_config_keys_with_the_extractor_defaults():
    """``extract.instance_iou / instance_min_score / instance_conf`` are schema keys (docs/concepts.md); unset,
    the extractor keeps its defaults (the values chosen on val, or every proposal when min_score <= 0)."""
    from captioning.models.lightcap.concepts import (
        DEFAULT_INSTANCE_CONF,
        DEFAULT_INSTANCE_IOU,
        DEFAULT_INSTANCE_MIN_SCORE,
    )

    cfg = load_config("concepts", "tiny", overrides=["extract.instance_iou=0.3", "extract.instance_conf=0.5"])
    assert (cfg.extract.instance_iou, cfg.extract.instance_conf, cfg.extract.instance_min_score) == (0.3, 0.5, None)
    with pytest.raises(ConfigError, match="extract.instance_ious: unknown key"):
        load_config("concepts", "tiny", overrides=["extract.instance_ious=0.3"])
    torch.manual_seed(0)
    set_ = _random_extractor("tiny", min_score=0.29, instance_iou=0.3, instance_conf=0.5)
    assert (set_.instance_iou, set_.instance_conf, set_.instance_min_score) == (0.3, 0.5, DEFAULT_INSTANCE_MIN_SCORE)
    unset = _random_extractor("tiny", min_score=0.29)
    assert (unset.instance_iou, unset.instance_min_score, unset.instance_conf) == (
        DEFAULT_INSTANCE_IOU, DEFAULT_INSTANCE_MIN_SCORE, DEFAULT_INSTANCE_CONF
    )
    keep_all = _random_extractor("tiny", proposal_conf=0.1, min_score=0.0)
    assert (keep_all.instance_min_score, keep_all.instance_conf) == (0.0, 0.1)
