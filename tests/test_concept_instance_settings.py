"""Per-word instance settings of the concept extractor (issue 15, counting): the SAHI-style merge of a word's boxes
that cover each other (intersection over the smaller box), per-concept NMS IoU and floors, reading them from a
config (a bad one is a ConfigError naming its key), and the per-word search of ``captioner eval concepts
--tune-instances``."""

from __future__ import annotations

import math

import pytest
import torch

from captioning.config import load_config
from captioning.errors import ConfigError
from captioning.models.lightcap.concepts import (
    box_ios,
    fit_sizes,
    instance_concept_settings,
    instance_size_settings,
    merge_instances,
    select_instances,
)
from training.eval_concepts import choose_word_settings

NAN = float("nan")


def test_box_ios_is_intersection_over_the_smaller_box():
    fuselage = torch.tensor([[10.0, 0.0, 20.0, 60.0]])  # 600 px
    wing = torch.tensor([[0.0, 20.0, 40.0, 30.0]])  # 400 px, crosses the fuselage in a 10 x 10 square
    assert box_ios(fuselage, wing).item() == pytest.approx(100 / 400)
    inside = torch.tensor([[12.0, 10.0, 18.0, 20.0]])
    assert box_ios(fuselage, inside).item() == pytest.approx(1.0)
    assert box_ios(fuselage, torch.tensor([[100.0, 100.0, 110.0, 110.0]])).item() == 0.0
    assert box_ios(fuselage, torch.tensor([[15.0, 5.0, 15.0, 9.0]])).item() == 0.0  # an empty box never matches


def test_two_part_boxes_of_one_concept_merge_into_their_union():
    # best first: the fuselage of a plane, its wing (IOS 0.25 with the fuselage), and a second, separate plane
    ids = torch.tensor([0, 0, 0])
    boxes = torch.tensor([[10.0, 0.0, 20.0, 60.0], [0.0, 20.0, 40.0, 30.0], [100.0, 100.0, 130.0, 130.0]])
    scores = torch.tensor([0.9, 0.6, 0.5])
    objectness = torch.ones(3)
    kept_ids, kept_scores, kept_boxes = select_instances(ids, scores, boxes, objectness, iou=0.5, merge_ios=0.2)
    assert kept_ids.tolist() == [0, 0]
    assert kept_boxes[0].tolist() == [0.0, 0.0, 40.0, 60.0]  # the union of fuselage and wing
    assert kept_scores.tolist() == pytest.approx([0.9, 0.5])  # the merged plane keeps its best part's score
    assert kept_boxes[1].tolist() == [100.0, 100.0, 130.0, 130.0]  # the separate plane (IOS 0) stays itself
    # above the parts' IOS nothing merges; without merge_ios nothing merges either
    assert len(select_instances(ids, scores, boxes, objectness, iou=0.5, merge_ios=0.3)[0]) == 3
    assert len(select_instances(ids, scores, boxes, objectness, iou=0.5)[0]) == 3


def test_overlapping_boxes_of_different_concepts_never_merge():
    ids = torch.tensor([0, 1])  # a car parked under a tree: the car's box lies inside the tree's
    boxes = torch.tensor([[0.0, 0.0, 40.0, 40.0], [10.0, 10.0, 20.0, 20.0]])
    rows, merged = merge_instances(ids, boxes, 0.1)
    assert rows.tolist() == [0, 1] and torch.equal(merged, boxes)
    # the same two boxes of one word do merge (IOS 1)
    rows, merged = merge_instances(torch.tensor([0, 0]), boxes, 0.1)
    assert rows.tolist() == [0] and merged[0].tolist() == [0.0, 0.0, 40.0, 40.0]


def test_merge_is_greedy_and_per_word():
    # a chain a-b-c: b covers part of a, c covers part of b but not of a. Greedy NMM (SAHI) merges b into a only
    # (matched against a's own box), and c stays; a NaN threshold (a word without merge) merges nothing
    ids = torch.tensor([0, 0, 0])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [14.0, 0.0, 24.0, 10.0]])
    rows, merged = merge_instances(ids, boxes, 0.4)
    assert rows.tolist() == [0, 2] and merged[0].tolist() == [0.0, 0.0, 15.0, 10.0]
    assert merge_instances(ids, boxes, torch.tensor([NAN, NAN, NAN]))[0].tolist() == [0, 1, 2]
    # per concept id: word 0 merges, word 1 does not
    ids = torch.tensor([0, 0, 1, 1])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 2.0, 8.0, 8.0]] * 2)
    kept = select_instances(ids, torch.tensor([0.9, 0.8, 0.7, 0.6]), boxes, torch.ones(4), iou=0.9,
                            merge_ios=torch.tensor([0.5, NAN]))
    assert kept[0].tolist() == [0, 1, 1]


def test_per_concept_iou_and_floors():
    ids = torch.tensor([0, 0, 1, 1])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 0.0, 12.0, 10.0], [50.0, 50.0, 60.0, 60.0], [52.0, 50.0, 62.0, 60.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.3])
    objectness = torch.tensor([0.9, 0.9, 0.9, 0.9])
    # IoU of each pair 0.67: word 0 at IoU 0.5 suppresses its second box, word 1 at 0.8 keeps both
    kept = select_instances(ids, scores, boxes, objectness, iou=torch.tensor([0.5, 0.8]))
    assert kept[0].tolist() == [0, 1, 1]
    # a score floor for word 1 only
    kept = select_instances(ids, scores, boxes, objectness, iou=torch.tensor([0.5, 0.8]),
                            min_score=torch.tensor([0.0, 0.5]))
    assert kept[0].tolist() == [0, 1] and kept[1].tolist() == pytest.approx([0.9, 0.7])
    # one IoU for every word as a tensor is the same as the number
    for iou in (0.5, 0.8):
        a = select_instances(ids, scores, boxes, objectness, iou=iou)
        b = select_instances(ids, scores, boxes, objectness, iou=torch.tensor([iou, iou]))
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


WORDS = ["house", "car", "airplane"]


def test_a_proposal_whose_word_does_not_fit_its_size_is_no_instance():
    # a 28 px "car" is a mobile home read as a car; a 16 px car fits; words without a range (inf) keep all
    ids = torch.tensor([1, 1, 0])
    boxes = torch.tensor([[0.0, 0.0, 12.0, 28.0], [50.0, 50.0, 66.0, 58.0], [100.0, 100.0, 190.0, 130.0]])
    scores, objectness = torch.tensor([0.9, 0.8, 0.7]), torch.ones(3)
    sizes = torch.tensor([[0.0, math.inf], [10.0, 23.0], [32.0, 100.0]])
    kept = fit_sizes(ids, scores, boxes, objectness, sizes)
    assert kept[0].tolist() == [1, 0] and kept[2][0].tolist() == [50.0, 50.0, 66.0, 58.0]
    served = select_instances(ids, scores, boxes, objectness, iou=0.5, sizes=sizes)
    assert served[0].tolist() == [1, 0] and served[1].tolist() == pytest.approx([0.8, 0.7])
    # the same without sizes keeps all three
    assert len(select_instances(ids, scores, boxes, objectness, iou=0.5)[0]) == 3
    assert instance_size_settings({"car": [10, 23.5], "airplane": [32, None]}, WORDS) == {
        "car": (10.0, 23.5), "airplane": (32.0, None)}
    for section, message in [
        ({"boat": [1, 2]}, r"extract\.instance_sizes\.boat: 'boat' is not a concept word"),
        ({"car": [23, 10]}, r"extract\.instance_sizes\.car \[23, 10\] needs 0 <= min < max"),
        ({"car": [10]}, r"extract\.instance_sizes\.car \[10\] must be \[min, max\]"),
        ({"car": ["small", 10]}, r"extract\.instance_sizes\.car 'small' must be a number"),
        ({"car": [-1, 10]}, r"extract\.instance_sizes\.car"),
    ]:
        with pytest.raises(ConfigError, match=message):
            instance_size_settings(section, WORDS)


def test_instance_concepts_are_read_and_checked():
    settings = instance_concept_settings(
        {"car": {"iou": 0.6, "min_score": 0.18, "conf": 0.25}, "airplane": {"merge_ios": 0.3, "iou": None},
         "house": {"merge_ios": None}}, WORDS)
    assert settings == {"car": {"iou": 0.6, "min_score": 0.18, "conf": 0.25}, "airplane": {"merge_ios": 0.3},
                        "house": {"merge_ios": None}}
    assert instance_concept_settings(None, WORDS) == {}
    bad = [
        ({"boat": {"iou": 0.5}}, r"extract\.instance_concepts\.boat: 'boat' is not a concept word"),
        ({"car": {"iou": 1.5}}, r"extract\.instance_concepts\.car\.iou 1\.5 must be a number in \(0, 1\]"),
        ({"car": {"iou": 0}}, r"extract\.instance_concepts\.car\.iou"),
        ({"car": {"merge_ios": True}}, r"extract\.instance_concepts\.car\.merge_ios"),
        ({"car": {"min_score": "high"}}, r"extract\.instance_concepts\.car\.min_score 'high' must be a number"),
        ({"car": {"conf": math.nan}}, r"extract\.instance_concepts\.car\.conf"),
        ({"car": {"nms": 0.5}}, r"extract\.instance_concepts\.car\.nms is not a setting"),
        ({"car": 0.5}, r"extract\.instance_concepts\.car must be a mapping"),
        (["car"], r"extract\.instance_concepts must be a mapping"),
    ]
    for section, message in bad:
        with pytest.raises(ConfigError, match=message):
            instance_concept_settings(section, WORDS)


@pytest.fixture(scope="module")
def random_parts():
    from captioning.models.lightcap.clip_encoder import GridEncoder
    from captioning.models.lightcap.concepts import ConceptVocabulary, RegionAligner
    from captioning.models.lightcap.detector import ProposalDetector

    torch.manual_seed(0)
    clip_cfg = load_config("clip", "tiny")
    cfg = load_config("concepts", "tiny")
    encoder = GridEncoder.from_config(clip_cfg)
    detector = ProposalDetector(cfg.detector)
    dim = clip_cfg.model.embed_dim
    aligner = RegionAligner.from_config(encoder.channels, cfg.align, dim)
    vocab = ConceptVocabulary(WORDS, [None] * 3, torch.nn.functional.normalize(torch.randn(3, dim), dim=-1))
    return encoder, detector, aligner, vocab, cfg


def _extractor(parts, **extract):
    """An extractor whose config's extract section has these keys set (checked by the schema on assignment)."""
    from captioning.models.lightcap.concepts import ConceptExtractor

    encoder, detector, aligner, vocab, cfg = parts
    cfg = cfg.model_copy(deep=True)
    for key, value in extract.items():
        setattr(cfg.extract, key, value)
    return ConceptExtractor(encoder, detector, aligner, vocab, cfg)


def test_extractor_reads_per_word_settings_from_its_config(random_parts):
    extractor = _extractor(random_parts, min_score=0.3, instance_iou=0.5, instance_min_score=0.2, instance_conf=0.3,
                           instance_merge_ios=0.6, instance_sizes={},
                           instance_concepts={"car": {"min_score": 0.1, "iou": 0.7}, "airplane": {"merge_ios": None}})
    t = extractor.instance_thresholds()
    assert t["iou"].tolist() == pytest.approx([0.5, 0.7, 0.5])
    assert t["min_score"].tolist() == pytest.approx([0.2, 0.1, 0.2])
    assert t["min_objectness"].tolist() == pytest.approx([0.3, 0.3, 0.3])
    assert t["merge_ios"][:2].tolist() == pytest.approx([0.6, 0.6]) and math.isnan(t["merge_ios"][2])
    assert "sizes" not in t
    sized = _extractor(random_parts, min_score=0.3, instance_sizes={"car": [10, 23], "airplane": [32, None]})
    assert sized.instance_thresholds()["sizes"].tolist() == [[0.0, math.inf], [10.0, 23.0], [32.0, math.inf]]
    # without the keys: the code's defaults (a model that keeps every proposal keeps every instance, no word's own)
    plain = _extractor(random_parts, min_score=0.0)
    assert plain.instance_concepts == {} and plain.instance_merge_ios is None and plain.instance_sizes == {}
    # the per-word defaults (chosen for the synthetic grammar's words) apply to a synthetic vocabulary only,
    # and only to its words that the model has
    from captioning.models.lightcap.concepts import DEFAULT_INSTANCE_CONCEPTS, DEFAULT_INSTANCE_SIZES

    tuned = _extractor(random_parts, min_score=0.3)
    assert tuned.instance_sizes == {w: tuple(v) for w, v in DEFAULT_INSTANCE_SIZES.items() if w in WORDS}
    assert tuned.instance_concepts == {w: v for w, v in DEFAULT_INSTANCE_CONCEPTS.items() if w in WORDS}
    encoder, detector, aligner, vocab, cfg = random_parts
    cfg = cfg.model_copy(deep=True)
    cfg.vocabulary.source, cfg.vocabulary.file = "file", "x"
    other = _extractor((encoder, detector, aligner, vocab, cfg), min_score=0.3)
    assert other.instance_sizes == {} and other.instance_concepts == {}
    from pydantic import ValidationError

    # wrong types and ranges: the schema names the key on assignment; words outside the vocabulary and size
    # ranges the wrong way round: the extractor
    for extract, message in [
        ({"instance_concepts": {"car": {"iou": 2.0}}}, r"instance_concepts\.car\.iou"),
        ({"instance_concepts": {"ship": {"iou": 0.5}}}, r"extract\.instance_concepts\.ship"),
        ({"instance_merge_ios": 1.5}, r"instance_merge_ios"),
        ({"instance_iou": "wide"}, r"instance_iou"),
        ({"instance_min_score": [0.2]}, r"instance_min_score"),
        ({"instance_sizes": {"car": [30, 20]}}, r"extract\.instance_sizes\.car"),
    ]:
        with pytest.raises((ConfigError, ValidationError), match=message):
            _extractor(random_parts, **extract)


def test_profile_schema_takes_the_instance_keys_and_names_a_bad_one(tmp_path):
    from captioning.config import CONFIG_DIR

    text = (CONFIG_DIR / "concepts" / "tiny.yaml").read_text()
    good = text.replace("extract:\n", "extract:\n  instance_merge_ios: 0.5\n"
                        "  instance_concepts:\n    car: {iou: 0.6, min_score: 0.18}\n    airplane: {merge_ios: 0.3}\n"
                        "  instance_sizes:\n    car: [10.1, 23.2]\n    airplane: [32, null]\n")
    path = tmp_path / "good.yaml"
    path.write_text(good)
    cfg = load_config("concepts", path=path).to_dict()
    assert cfg["extract"]["instance_concepts"] == {"car": {"iou": 0.6, "min_score": 0.18}, "airplane": {"merge_ios": 0.3}}
    assert cfg["extract"]["instance_merge_ios"] == 0.5
    assert cfg["extract"]["instance_sizes"] == {"car": [10.1, 23.2], "airplane": [32, None]}
    path.write_text(good.replace("car: {iou: 0.6", "car: {iou: 1.6"))
    with pytest.raises(ConfigError, match=r"extract\.instance_concepts\.car\.iou"):
        load_config("concepts", path=path)
    path.write_text(good.replace("car: {iou: 0.6", "car: {nms: 0.6"))
    with pytest.raises(ConfigError, match=r"extract\.instance_concepts\.car\.nms"):
        load_config("concepts", path=path)


def _picture(word_boxes):
    """Classified proposals of one picture, best first: [(word id, score, box, objectness)]."""
    ids, scores, boxes, objectness = zip(*word_boxes, strict=True)
    order = torch.argsort(torch.tensor(scores), descending=True)
    return (torch.tensor(ids)[order], torch.tensor(scores)[order], torch.tensor(boxes, dtype=torch.float32)[order],
            torch.tensor(objectness)[order])


def test_per_word_search_keeps_only_settings_that_help_on_both_halves():
    # four pictures, each with one true house, car and airplane. House: a weak false house (score 0.25) in every
    # picture, so a house floor of 0.3 helps in both halves. Car: the true car scores 0.2 and picture 0 also has a
    # false car at 0.35; no car floor helps (0.4 drops every true car). Airplane: two part boxes of one plane in
    # every picture (IoU 0.33, IOS 0.5): only a merge counts it right.
    pictures, truth = [], []
    for i in range(4):
        rows = [(0, 0.9, (0, 0, 10, 10), 0.9), (0, 0.25, (100, 100, 110, 110), 0.9),
                (1, 0.2, (40, 40, 50, 50), 0.9),
                (2, 0.8, (60, 60, 80, 70), 0.9), (2, 0.7, (70, 60, 80, 80), 0.9)]
        if i == 0:
            rows.append((1, 0.35, (200, 200, 210, 210), 0.9))
        pictures.append(_picture(rows))
        truth.append(["house", "car", "airplane"])
    base = {"iou": 0.5, "min_score": 0.1, "min_objectness": 0.0}
    grid = {"iou": (0.5,), "min_score": (0.1, 0.3, 0.4), "min_objectness": (0.0,)}
    chosen = choose_word_settings(pictures, truth, WORDS, base, grid, merge_grid=(0.3,))
    # house: 0.3 removes the false house in both halves; car keeps the base; airplane merges
    assert chosen["instance_concepts"] == {"house": {"min_score": 0.3}, "airplane": {"merge_ios": 0.3}}
    assert chosen["count_relative_error_global"] == pytest.approx((4 + 1 + 4) / 12, abs=1e-4)
    assert chosen["count_relative_error_per_word"] == pytest.approx(1 / 12, abs=1e-4)
    # a setting only one half favours is not kept: false cars (0.35) in pictures 0 and 2 (the even half), true
    # cars at 0.5 everywhere; a car floor of 0.4 lowers the total error (2 -> 0) but not the odd half's (0 -> 0)
    cars = [_picture([(1, 0.5, (40, 40, 50, 50), 0.9)] + ([(1, 0.35, (200, 200, 210, 210), 0.9)] if i % 2 == 0 else []))
            for i in range(4)]
    truth = [["car"]] * 4
    assert choose_word_settings(cars, truth, WORDS, base, grid, merge_grid=())["instance_concepts"] == {}
    # with the false cars in both halves (pictures 0 and 1) the floor is kept
    cars = [_picture([(1, 0.5, (40, 40, 50, 50), 0.9)] + ([(1, 0.35, (200, 200, 210, 210), 0.9)] if i < 2 else []))
            for i in range(4)]
    assert choose_word_settings(cars, truth, WORDS, base, grid, merge_grid=())["instance_concepts"] == {
        "car": {"min_score": 0.4}
    }


def test_detector_keeps_every_image_of_a_busy_batch(monkeypatch):
    """ultralytics' NMS stops after 2 s + 50 ms per image and answers nothing for the batch's remaining images;
    on a busy CPU that silently dropped proposals. The detector runs it without that limit: with a clock that
    jumps 10 s per reading, the second of two identical images still gets the first one's boxes."""
    import ultralytics.utils.nms as nms

    from captioning.models.lightcap.detector import ProposalDetector

    torch.manual_seed(0)
    detector = ProposalDetector(load_config("concepts", "tiny").detector)
    image = torch.rand(1, 3, 256, 256)
    batch = torch.cat([image, image])
    clock = iter(range(0, 10**6, 10))
    monkeypatch.setattr(nms.time, "time", lambda: float(next(clock)))
    (boxes_a, scores_a), (boxes_b, scores_b) = detector(batch, conf=0.0, max_det=20)
    assert len(boxes_a) > 0 and torch.equal(boxes_a, boxes_b) and torch.equal(scores_a, scores_b)
